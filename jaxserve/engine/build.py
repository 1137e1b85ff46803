"""Building an engine: model on the mesh, KV pool sized per device, runner, scheduler."""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from jaxserve import sharding
from jaxserve.config import ServerArgs
from jaxserve.distributed.mirror import LeaderRunner
from jaxserve.distributed.multihost import agree_on_pages
from jaxserve.memory import (FileStorage, HiCache, HiRadixCache, HostKVPool, KVPoolSize, NoRadixCache, PageAllocator,
                             RadixCache, host_pool_pages, size_kv_pool, storage_namespace)
from jaxserve.runner import ModelRunner, PageIO, compile_count
from jaxserve.scheduler import Scheduler
from jaxserve.weights import LoadedModel, load
from pallas_kernels.sparse import SparseAttention

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Parts:
    args: ServerArgs  # with the per-backend defaults filled in
    model: LoadedModel
    context_length: int
    pool: KVPoolSize
    scheduler: Scheduler
    compiles_at_ready: int


def per_device_bytes(model: LoadedModel, sparse: bool = False) -> tuple[int, int]:
    """(weight bytes on one device, KV bytes per token on one device): with tensor
    parallelism each device holds its shard, and the pool is sized from that. With sparse
    attention each page also holds its keys' bounds (two float32 rows per page)."""
    weights = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(model.param_tree))
    cfg = model.config
    shape = (cfg.num_layers, 1, 1, cfg.num_kv_heads, cfg.head_dim)
    heads = sharding.kv_sharding(cfg, model.mesh).shard_shape(shape)[3]
    itemsize = np.dtype(model.dtype).itemsize
    bounds = -(-2 * cfg.num_layers * heads * cfg.head_dim * 4 // model.page_size) if sparse else 0
    return weights, 2 * cfg.num_layers * heads * cfg.head_dim * itemsize + bounds


def sparse_config(args: ServerArgs) -> SparseAttention | None:
    if args.sparse_attention == "none":
        return None
    return SparseAttention(args.sparse_attention_token_budget, args.sparse_attention_min_context,
                           threshold=args.attention_sparsity_threshold)


@dataclasses.dataclass
class Core:
    """What every node of a multi-host model builds alike: the model, the pool, the runner."""

    args: ServerArgs
    model: LoadedModel
    context_length: int
    pool: KVPoolSize
    runner: ModelRunner
    max_step_tokens: int
    chunk: int


def build_runner(args: ServerArgs) -> Core:
    """The model on the mesh, the KV pool sized per device, and the runner (not warmed up)."""
    if args.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    args = args.with_backend_defaults(jax.default_backend())
    model = load(args.model_path, dtype=args.dtype, tp_size=args.tp_size, page_size=args.page_size,
                 attention_backend=args.attention_backend, chat_template=args.chat_template,
                 quantization=args.quantization)
    context_length = args.context_length or model.config.max_position_embeddings
    weights, kv_per_token = per_device_bytes(model, sparse=args.sparse_attention != "none")
    pool = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=kv_per_token, page_size=args.page_size,
                        max_total_tokens=args.max_total_tokens, mem_fraction_static=args.mem_fraction_static,
                        context_length=context_length)
    if args.nnodes > 1:  # every node holds the same pool: the smallest any of them can
        pages = agree_on_pages(pool.num_pages)
        pool = dataclasses.replace(pool, num_pages=pages, max_total_tokens=(pages - 1) * args.page_size,
                                   kv_bytes=pages * args.page_size * kv_per_token)
    logger.info(pool.log_line())
    chunked = args.chunked_prefill_size != -1
    max_step_tokens = args.max_prefill_tokens if chunked else max(args.max_prefill_tokens, context_length)
    chunk = min(args.chunked_prefill_size if chunked else context_length, max_step_tokens)
    runner = ModelRunner(model, pool.num_pages, args.max_running_requests, max_step_tokens, context_length,
                         sparse=sparse_config(args))
    if args.nnodes > 1 and args.node_rank == 0:
        runner = LeaderRunner(runner)  # every call also runs on the other nodes
    return Core(args, model, context_length, pool, runner, max_step_tokens, chunk)


def build(args: ServerArgs) -> Parts:
    core = build_runner(args)
    args = core.args
    allocator = PageAllocator(core.pool.num_pages)
    core.runner.warmup()
    hicache = None
    if args.enable_hierarchical_cache:
        hicache = build_hicache(args, core.model, core.runner, allocator, core.pool.num_pages - 1,
                                core.max_step_tokens)
        cache = hicache.cache
    else:
        cache = (NoRadixCache if args.disable_radix_cache else RadixCache)(allocator, args.page_size)
    scheduler = Scheduler(core.runner, cache, allocator, chunk_size=core.chunk, max_step_tokens=core.max_step_tokens,
                          policy=args.schedule_policy, overlap=not args.disable_overlap_schedule, hicache=hicache)
    logger.info("engine: max_running_requests %d, max_prefill_tokens %d, chunked_prefill_size %d, overlap %s",
                args.max_running_requests, core.max_step_tokens, core.chunk, scheduler.overlap)
    return Parts(args, core.model, core.context_length, core.pool, scheduler, compile_count())


def build_hicache(args: ServerArgs, model: LoadedModel, runner: ModelRunner, allocator: PageAllocator,
                  device_pages: int, max_step_tokens: int) -> HiCache:
    """The host pool (L2), the tree over both tiers, the page transfers and, when asked
    for, the storage tier (L3; one that cannot be opened is logged and left off)."""
    cfg = model.config
    page_shape = (args.page_size, cfg.num_kv_heads, cfg.head_dim)
    page_bytes = 2 * cfg.num_layers * int(np.prod(page_shape)) * np.dtype(model.dtype).itemsize
    host_pages = host_pool_pages(device_pages, page_bytes, args.hicache_ratio, args.hicache_size)
    host = HostKVPool(host_pages, page_shape, model.dtype, cfg.num_layers)
    cache = HiRadixCache(allocator, args.page_size, host.allocator, args.hicache_write_policy)
    io = PageIO(runner)
    io.warmup()
    storage, namespace = None, ""
    if args.hicache_storage_backend == "file":
        layout = {"dtype": np.dtype(model.dtype).name, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "page_size": args.page_size}
        namespace = storage_namespace(str(args.model_path or "bundled-smollm2"), layout)
        try:
            storage = FileStorage(args.hicache_storage_dir, (2, cfg.num_layers, *page_shape), model.dtype)
        except ValueError as e:
            logger.error("hierarchical cache: the storage tier is off (%s); serving with device and host memory", e)
    logger.info("hierarchical cache: %d host pages (%.2f GiB, %.1fx the device pool), write policy %s, storage %s",
                host_pages - 1, (host_pages - 1) * page_bytes / (1 << 30), (host_pages - 1) / max(device_pages, 1),
                args.hicache_write_policy, args.hicache_storage_dir if storage else "off")
    return HiCache(cache, host, io, storage=storage, namespace=namespace,
                   prefetch_policy=args.hicache_storage_prefetch_policy,
                   prefetch_timeout=args.hicache_storage_prefetch_timeout,
                   load_quota_pages=max(4 * max_step_tokens // args.page_size, 1))
