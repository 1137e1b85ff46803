"""One Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM) in Flax NNX.

The layers are stacked on a leading axis and run under `jax.lax.scan`, so the traced
program (and its compile time) does not grow with depth. Attention reads and writes the
paged KV pool `[num_layers, num_pages, page_size, num_kv_heads, head_dim]`; inside the scan
the pool is viewed as one array of `num_layers * num_pages` pages (a free reshape) and the
page table is offset by `layer * num_pages`, so no layer slice is ever copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from jaxserve.models.batch import ForwardBatch
from jaxserve.models.config import ModelConfig
from jaxserve.models.quant import QuantEmbed, QuantLinear
from pallas_kernels.sparse import update_bounds

_INIT = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(din, dout, bias, dtype, rngs, fmt=None):
    """A dense layer; `fmt` (a `QuantFormat`) makes it weight-only quantized."""
    if fmt is not None:
        return QuantLinear(din, dout, use_bias=bias, dtype=dtype, fmt=fmt, rngs=rngs)
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=_INIT, rngs=rngs)


def apply_rope(x, cos, sin):
    """Rotate-half rotary embedding. x [T, H, D]; cos, sin [T, D // 2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quant: dict):
        hd, h = cfg.head_dim, cfg.hidden_size
        self.q_proj = _linear(h, cfg.num_heads * hd, cfg.attention_bias, dtype, rngs, quant.get("q_proj"))
        self.k_proj = _linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs, quant.get("k_proj"))
        self.v_proj = _linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs, quant.get("v_proj"))
        self.o_proj = _linear(cfg.num_heads * hd, h, False, dtype, rngs, quant.get("o_proj"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype)
        self.cfg = cfg

    def __call__(self, x, cos, sin, batch: ForwardBatch, k_pages, v_pages, page_offset, attn, bounds=None):
        cfg = self.cfg
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        page_size = k_pages.shape[1]
        page = batch.slot_mapping // page_size + page_offset
        row = batch.slot_mapping % page_size
        k_pages = k_pages.at[page, row].set(k.astype(k_pages.dtype))
        v_pages = v_pages.at[page, row].set(v.astype(v_pages.dtype))
        sparse = attn.get("sparse")
        common = dict(sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window,
                      impl=attn["impl"], interpret=attn["interpret"], mesh=attn["mesh"])
        table, kv_lens = batch.page_table + page_offset, batch.kv_lens
        if bounds is not None:
            bounds = update_bounds(*bounds, k, page, row)
            if batch.decode_only and sparse is not None:  # Quest: read only the selected pages
                table, kv_lens = sparse.select(q, *bounds, table, kv_lens, page_size, common["sm_scale"])
        if batch.decode_only:
            out = pallas_kernels.paged_decode(q, k_pages, v_pages, kv_lens, table, **common)
        else:
            out = pallas_kernels.ragged_paged_attention(
                q, k_pages, v_pages, kv_lens, table, batch.cu_q_lens, batch.num_seqs, **common)
        return self.o_proj(out.reshape(t, -1)), k_pages, v_pages, bounds, kv_lens


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quant: dict):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(h, i, False, dtype, rngs, quant.get("gate_proj"))
        self.up_proj = _linear(h, i, False, dtype, rngs, quant.get("up_proj"))
        self.down_proj = _linear(i, h, False, dtype, rngs, quant.get("down_proj"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quant: dict):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs, quant)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs, quant)

    def __call__(self, h, cos, sin, batch, k_pages, v_pages, page_offset, attn, bounds=None):
        """(h, k_pages, v_pages, bounds, KV tokens attention read per sequence)."""
        a, k_pages, v_pages, bounds, read = self.attn(self.input_norm(h), cos, sin, batch, k_pages, v_pages,
                                                      page_offset, attn, bounds)
        h = h + a
        return h + self.mlp(self.post_norm(h)), k_pages, v_pages, bounds, read


class LlamaForCausalLM(nnx.Module):
    """Decoder-only LM over a paged KV pool.

    `attention_impl` / `interpret` pick the paged-attention backend (see `pallas_kernels`;
    with a tensor-parallel `mesh` the kernels run per device over its heads);
    `quant` maps weight names (`q_proj` ... `down_proj`, `lm_head`, `embed`) to the
    `QuantFormat` they are stored in (models/quant.py); the others stay in `dtype`.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 attention_impl: str = "reference", interpret: bool = False, quant: dict | None = None,
                 mesh=None):
        quant = quant or {}
        self.mesh = mesh
        self.cfg = cfg
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.interpret = interpret
        if "embed" in quant:
            self.embed = QuantEmbed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, fmt=quant["embed"], rngs=rngs)
        else:
            self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                   embedding_init=_INIT, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return DecoderLayer(cfg, dtype, rngs, quant)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs, quant.get("lm_head"))

    def __call__(self, batch: ForwardBatch, k_cache, v_cache, bounds=None, sparse=None):
        """Run a ragged batch; returns (final hidden [T, H], k_cache, v_cache).

        k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
        `bounds` (kmin, kmax), each [num_layers, num_pages, num_kv_heads, head_dim], are the
        pages' key bounds (pallas_kernels/sparse.py), updated with the keys this step
        writes; with them the result also has the new bounds and, per sequence, the KV
        tokens decode attention read summed over layers ([max_seqs]; with `sparse`, a
        `SparseAttention`, decode steps read only the pages it selects).
        """
        shape = k_cache.shape
        num_layers, num_pages = shape[0], shape[1]
        inv_freq = jnp.asarray(self.cfg.rope_inv_freq())  # [head_dim // 2]
        freqs = batch.positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)  # [T, head_dim // 2]
        h = self.embed(batch.input_ids)
        graphdef, layer_state = nnx.split(self.layers)
        attn = {"impl": self.attention_impl, "interpret": self.interpret, "sparse": sparse, "mesh": self.mesh}
        flat = (num_layers * num_pages, *shape[2:])

        def body(carry, state):
            h, k_pages, v_pages, bounds, read, layer = carry
            h, k_pages, v_pages, bounds, read_lens = nnx.merge(graphdef, state)(
                h, cos, sin, batch, k_pages, v_pages, layer * num_pages, attn, bounds)
            return (h, k_pages, v_pages, bounds, read + read_lens, layer + 1), None

        flat_bounds = None if bounds is None else tuple(b.reshape(num_layers * num_pages, *b.shape[2:]) for b in bounds)
        init = (h, k_cache.reshape(flat), v_cache.reshape(flat), flat_bounds, jnp.zeros_like(batch.kv_lens),
                jnp.int32(0))
        (h, k_flat, v_flat, flat_bounds, read, _), _ = jax.lax.scan(body, init, layer_state)
        out = self.norm(h), k_flat.reshape(shape), v_flat.reshape(shape)
        if bounds is None:
            return out
        return *out, tuple(b.reshape(bounds[0].shape) for b in flat_bounds), read

    def logits(self, hidden):
        """Float32 logits [N, vocab] of final hidden states [N, H]."""
        if self.cfg.tie_word_embeddings:
            if isinstance(self.embed, QuantEmbed):
                return self.embed.attend(hidden)
            w = self.embed.embedding[...]
            return jnp.einsum("nh,vh->nv", hidden, w, preferred_element_type=jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)
