"""`load()`: a model ready to run on a mesh, and `LoadedModel`, the inspection API."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve import sharding
from jaxserve.models.batch import ForwardBatch
from jaxserve.models.config import ModelConfig
from jaxserve.models.registry import model_class
from jaxserve.weights import checkpoint, gguf_file, hf, hub, quantization as quantization_plan
from jaxserve.weights.params import hf_to_params

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_model_path(model_path: str | Path | None) -> Path:
    """`None` is the bundled SmolLM2-135M-Instruct GGUF; a path that does not exist but
    reads `org/name` is a Hugging Face Hub repository (`hub.py`); anything else must exist."""
    if model_path is None:
        return gguf_file.bundled_model_path()
    path = Path(model_path).expanduser()
    if not path.exists():
        if hub.looks_like_repo_id(str(model_path)):
            return hub.resolve_repo(str(model_path))
        raise FileNotFoundError(f"--model-path {path} does not exist (a HF directory, a .gguf file, a converted "
                                "dir, or a Hugging Face Hub id org/name)")
    return path


def read_source(path: Path, keep_quantized: bool = False) -> tuple[dict, dict | None]:
    """(HF config dict, HF tensors or None for a converted orbax checkpoint)."""
    if path.suffix == ".gguf":
        return gguf_file.read_gguf(path, keep_quantized)
    config = hf.read_hf_config(path)
    ModelConfig.from_hf(config)  # an unsupported architecture fails before any tensor is read
    return config, None if checkpoint.is_converted(path) else hf.read_hf_tensors(path)


@dataclasses.dataclass
class LoadedModel:
    """A model on its mesh. `logits(input_ids)` runs the paged forward for inspection."""

    config: ModelConfig
    hf_config: dict
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: jax.sharding.Mesh
    dtype: jnp.dtype
    page_size: int
    model_path: Path
    tokenizer: object | None = None
    quant: dict = dataclasses.field(default_factory=dict)  # {weight name: QuantFormat}

    @property
    def param_tree(self) -> dict:
        return nnx.to_pure_dict(self.params)

    def new_kv_cache(self, num_pages: int):
        """A zeroed KV pool (k, v), each [layers, num_pages, page_size, kv_heads, head_dim]."""
        cfg = self.config
        shape = (cfg.num_layers, num_pages, self.page_size, cfg.num_kv_heads, cfg.head_dim)
        kv_sharding = sharding.kv_sharding(cfg, self.mesh)
        zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=kv_sharding)
        return zeros(), zeros()

    @functools.cached_property
    def _forward(self):
        graphdef = self.graphdef

        def forward(params, batch, k_cache, v_cache):
            model = nnx.merge(graphdef, params)
            hidden, k_cache, v_cache = model(batch, k_cache, v_cache)
            return model.logits(hidden), k_cache, v_cache

        return jax.jit(forward, donate_argnums=(2, 3))

    def forward(self, batch: ForwardBatch, k_cache, v_cache):
        """Logits of every token of a ragged batch [T, vocab] and the updated KV pool (donated)."""
        return self._forward(self.params, batch, k_cache, v_cache)

    def logits(self, input_ids) -> np.ndarray:
        """Float32 logits [len(input_ids), vocab] of one sequence, prefilled in one paged step."""
        ids = np.asarray(input_ids, np.int32)
        num_pages = -(-len(ids) // self.page_size)
        k, v = self.new_kv_cache(num_pages + 1)
        batch = ForwardBatch.build([(ids, 0, np.arange(1, num_pages + 1))], self.page_size)
        logits, _, _ = self.forward(batch, k, v)
        return np.asarray(logits, np.float32)

    def generate_greedy(self, input_ids, max_new_tokens: int, stop_ids=()) -> list[int]:
        """Greedy decoding one token per step over the paged pool (a reference for the engine)."""
        ids = list(np.asarray(input_ids, np.int32))
        total = len(ids) + max_new_tokens
        pages = np.arange(1, -(-total // self.page_size) + 1)
        k, v = self.new_kv_cache(len(pages) + 1)
        new, start, out = ids, 0, []
        for _ in range(max_new_tokens):
            batch = ForwardBatch.build([(new, start, pages)], self.page_size)
            logits, k, v = self.forward(batch, k, v)
            token = int(np.argmax(np.asarray(logits[-1])))
            out.append(token)
            if token in stop_ids:
                break
            start, new = start + len(new), [token]
        return out


def load(model_path: str | Path | None = None, *, dtype: str = "bfloat16", tp_size: int = 1,
         page_size: int = 16, attention_backend: str = "auto", interpret: bool = False,
         chat_template: str | None = None, with_tokenizer: bool = True,
         quantization: str = "none") -> LoadedModel:
    """Load a HF directory, a GGUF file or a converted checkpoint onto a `tp_size` mesh,
    with the weights `quantization` names stored quantized (weights/quantization.py)."""
    if dtype == "auto":  # bfloat16 on accelerators; float32 on CPU, where bf16 is slow and lossy
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    start = time.perf_counter()
    path = resolve_model_path(model_path)
    hf_config, tensors = read_source(path, keep_quantized=quantization in ("gguf", "auto"))
    cfg = ModelConfig.from_hf(hf_config)
    quant = quantization_plan.from_config(hf_config) if tensors is None else None
    if quant is not None and quantization not in ("none", "auto"):
        raise ValueError(f"{path.name} was converted with its own quantization; load it with --quantization none")
    quant = quant or quantization_plan.plan(cfg, quantization, tensors, jax.default_backend())
    jdtype = DTYPES[dtype]
    mesh = sharding.make_mesh(tp_size)
    if attention_backend in ("pallas", "triton", "tpu") and jax.default_backend() == "cpu":
        interpret = True  # Pallas kernels run on CPU only in interpret mode (slow; for tests)
    abstract = nnx.eval_shape(lambda: model_class(cfg)(cfg, dtype=jdtype, rngs=nnx.Rngs(0), quant=quant,
                                                       attention_impl=attention_backend, interpret=interpret,
                                                       mesh=mesh))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    shardings = sharding.param_shardings(cfg, shapes, mesh)
    if tensors is None:
        params = checkpoint.restore_params(path, checkpoint.abstract_like(shapes, shardings))
    else:
        host = hf_to_params(cfg, tensors, np.dtype(jdtype), quant)
        params = jax.tree.map(jax.device_put, host, shardings)
    nnx.replace_by_pure_dict(state, params)
    tokenizer = None
    if with_tokenizer:
        from jaxserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path, chat_template=chat_template)
    formats = ", ".join(sorted({f"{f.name}" for f in quant.values()})) or "none"
    logger.info("loaded %s (%s, quantization %s, tp=%d) in %.2fs", path.name, dtype, formats, tp_size,
                time.perf_counter() - start)
    return LoadedModel(cfg, hf_config, graphdef, state, mesh, jdtype, page_size, path, tokenizer, quant)
