"""A tiny random Llama written as a GGUF file, each weight in a chosen GGML type, with the
bundled SmolLM2's tokenizer (so an engine can serve it)."""

from __future__ import annotations

import numpy as np

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 49152
_SHAPES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV_HEADS * 16, HIDDEN), "attn_v": (KV_HEADS * 16, HIDDEN),
           "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
           "ffn_down": (HIDDEN, INTER)}


def write_tiny_gguf(path, types: dict, seed: int = 0) -> None:
    """`types` maps a GGUF weight name (`attn_q` ... `ffn_down`, `token_embd`) to a
    GGMLQuantizationType, or to a list of one type per layer; the rest are F32."""
    import gguf

    from jaxserve.weights.gguf_file import bundled_model_path

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    source = gguf.GGUFReader(str(bundled_model_path()))
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    def add(name: str, shape: tuple[int, int], qtype) -> None:
        data = (rng.standard_normal(shape) * 0.08).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    f32 = gguf.GGMLQuantizationType.F32
    add("token_embd.weight", (VOCAB, HIDDEN), types.get("token_embd", f32))
    w.add_tensor("output_norm.weight", (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i in range(LAYERS):
        for name, shape in _SHAPES.items():
            qtype = types.get(name, f32)
            add(f"blk.{i}.{name}.weight", shape, qtype[i] if isinstance(qtype, list) else qtype)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
