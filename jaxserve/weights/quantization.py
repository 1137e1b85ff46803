"""`--quantization`: which weights a loaded model stores quantized, and in which format.

    auto   (the server's default) `gguf` on CPU for a GGUF whose layers are all in kept
           types, else `none`: on CPU that is the fastest format that keeps greedy output
           equal to float32's on the test chats (docs/BENCHMARKS.md, "Quantized weights")
    none   every weight in `--dtype` (a GGUF is dequantized)
    int8   weight-only int8, one scale per output channel: the seven projections of every
           layer, the LM head and the embedding (quantized per vocabulary row)
    fp8    the same in float8 e4m3 (on CPU XLA emulates it; for GPUs that have it)
    w8a16  the int8 weights, with each dot on bfloat16 operands (the activation rounded to
           bfloat16 there, float32 accumulation): on CPUs with bfloat16 dot instructions
           1.25x / 1.5x int8's dots at 8 / 32 rows; its greedy output can depend on the
           batch (bfloat16 rounding magnifies last-bit differences between batch shapes)
    gguf   a GGUF's Q8_0 / Q4_0 / Q4_1 / Q4_K weights kept as they are in the file (blocks of
           32); a projection whose layers mix types, or use another type, and the embedding and
           LM head (whose dot runs across the blocks), become int8 per channel

The plan is recorded in a converted checkpoint's config.json (`quantization_config`), so a
quantized checkpoint loads back in its formats.
"""

from __future__ import annotations

from jaxserve.config import QUANTIZATIONS
from jaxserve.models import quant
from jaxserve.models.config import ModelConfig
from jaxserve.weights.gguf_file import GGUFBlocks

PROJECTIONS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "down_proj": "mlp.down_proj"}
_KEPT = {"Q8_0": quant.Q8_0, "Q4_0": quant.Q4, "Q4_1": quant.Q4, "Q4_K": quant.Q4}
CONFIG_KEY = "quantization_config"


def plan(cfg: ModelConfig, quantization: str, tensors: dict | None, backend: str = "cpu") -> dict:
    """{weight name: QuantFormat} for `LlamaForCausalLM(quant=...)`; names not in it stay float."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "auto":
        kept = backend == "cpu" and any(isinstance(t, GGUFBlocks) for t in (tensors or {}).values())
        formats = plan(cfg, "gguf", tensors) if kept else {}
        return formats if all(formats.get(name) in (quant.Q8_0, quant.Q4) for name in PROJECTIONS) else {}
    if quantization == "none":
        return {}
    if quantization == "gguf" and not any(isinstance(t, GGUFBlocks) for t in (tensors or {}).values()):
        raise ValueError("--quantization gguf keeps a GGUF file's quantized blocks; this model has none "
                         "(use int8 or fp8)")
    fmt = quant.INT8 if quantization == "gguf" else quant.FORMATS[quantization]
    out = {name: fmt for name in PROJECTIONS}
    out["embed"] = fmt
    if not cfg.tie_word_embeddings:
        out["lm_head"] = fmt
    if quantization == "gguf":
        for name, hf_name in PROJECTIONS.items():
            kinds = {_kept(tensors[f"model.layers.{i}.{hf_name}.weight"]) for i in range(cfg.num_layers)}
            if len(kinds) == 1 and None not in kinds:
                out[name] = kinds.pop()
    return out


def _kept(tensor) -> quant.QuantFormat | None:
    return _KEPT.get(tensor.qtype) if isinstance(tensor, GGUFBlocks) else None


def to_config(formats: dict[str, quant.QuantFormat]) -> dict:
    """The `quantization_config` entry of a converted checkpoint's config.json."""
    return {"quant_method": "jaxserve", "formats": {name: f.name for name, f in formats.items()}}


def from_config(hf_config: dict) -> dict[str, quant.QuantFormat] | None:
    """The formats a converted checkpoint was saved in (None: not a jaxserve-quantized checkpoint)."""
    entry = hf_config.get(CONFIG_KEY)
    if not entry or entry.get("quant_method") != "jaxserve":
        return None
    return {name: quant.FORMATS[f] for name, f in entry["formats"].items()}
