"""Building an engine: model on the mesh, KV pool sized per device, runner, scheduler."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxserve import sharding
from jaxserve.config import ServerArgs
from jaxserve.memory import KVPoolSize, NoRadixCache, PageAllocator, RadixCache, size_kv_pool
from jaxserve.runner import ModelRunner, compile_count
from jaxserve.scheduler import Scheduler
from jaxserve.weights import LoadedModel, load

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Parts:
    args: ServerArgs  # with the per-backend defaults filled in
    model: LoadedModel
    context_length: int
    pool: KVPoolSize
    scheduler: Scheduler
    compiles_at_ready: int


def per_device_bytes(model: LoadedModel) -> tuple[int, int]:
    """(weight bytes on one device, KV bytes per token on one device): with tensor
    parallelism each device holds its shard, and the pool is sized from that."""
    weights = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(model.param_tree))
    cfg = model.config
    shape = (cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim)
    heads = sharding.kv_sharding(cfg, model.mesh).shard_shape(shape)[3]
    itemsize = np.dtype(model.dtype).itemsize
    return weights, 2 * cfg.num_layers * heads * cfg.head_dim * itemsize


def build(args: ServerArgs) -> Parts:
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    args = args.with_backend_defaults(jax.default_backend())
    model = load(args.model_path, dtype=args.dtype, tp_size=args.tp_size, page_size=args.page_size,
                 attention_backend=args.attention_backend, chat_template=args.chat_template)
    context_length = args.context_length or model.config.max_position_embeddings
    weights, kv_per_token = per_device_bytes(model)
    pool = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=kv_per_token, page_size=args.page_size,
                        max_total_tokens=args.max_total_tokens, mem_fraction_static=args.mem_fraction_static,
                        context_length=context_length)
    logger.info(pool.log_line())
    allocator = PageAllocator(pool.num_pages)
    cache = (NoRadixCache if args.disable_radix_cache else RadixCache)(allocator, args.page_size)
    chunked = args.chunked_prefill_size != -1
    max_step_tokens = args.max_prefill_tokens if chunked else max(args.max_prefill_tokens, context_length)
    chunk = min(args.chunked_prefill_size if chunked else context_length, max_step_tokens)
    runner = ModelRunner(model, pool.num_pages, args.max_running_requests, max_step_tokens, context_length)
    runner.warmup()
    scheduler = Scheduler(runner, cache, allocator, chunk_size=chunk, max_step_tokens=max_step_tokens,
                          policy=args.schedule_policy, overlap=not args.disable_overlap_schedule)
    logger.info("engine: max_running_requests %d, max_prefill_tokens %d, chunked_prefill_size %d, overlap %s",
                args.max_running_requests, max_step_tokens, chunk, scheduler.overlap)
    return Parts(args, model, context_length, pool, scheduler, compile_count())
