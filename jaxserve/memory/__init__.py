"""KV memory on the host side: page free list, radix prefix cache, pool sizing, the host and
storage tiers of the hierarchical cache."""

from jaxserve.memory.allocator import OutOfPagesError, PageAllocator, PageFreeError
from jaxserve.memory.hicache import HiCache
from jaxserve.memory.hiradix_cache import HiRadixCache, TierMatch
from jaxserve.memory.host_pool import HostKVPool, HostPoolSizeError, host_pool_pages
from jaxserve.memory.no_radix_cache import NoRadixCache
from jaxserve.memory.radix_cache import RadixCache, RadixNode, token_key
from jaxserve.memory.radix_view import NodeInfo, export_tree, pretty_tree
from jaxserve.memory.sizing import (
    KVPoolSize,
    KVPoolSizeError,
    kv_bytes_per_token,
    size_kv_pool,
)
from jaxserve.memory.storage import FileStorage, KVStorage, page_keys, storage_namespace

__all__ = [
    "FileStorage",
    "HiCache",
    "HiRadixCache",
    "HostKVPool",
    "HostPoolSizeError",
    "KVStorage",
    "TierMatch",
    "host_pool_pages",
    "page_keys",
    "storage_namespace",
    "KVPoolSize",
    "KVPoolSizeError",
    "NoRadixCache",
    "NodeInfo",
    "export_tree",
    "pretty_tree",
    "OutOfPagesError",
    "PageAllocator",
    "PageFreeError",
    "RadixCache",
    "RadixNode",
    "kv_bytes_per_token",
    "size_kv_pool",
    "token_key",
]
