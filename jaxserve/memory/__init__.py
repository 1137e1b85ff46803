"""KV memory on the host side: page free list, radix prefix cache, pool sizing."""

from jaxserve.memory.allocator import OutOfPagesError, PageAllocator, PageFreeError
from jaxserve.memory.radix_cache import NoRadixCache, RadixCache, RadixNode, token_key
from jaxserve.memory.radix_view import NodeInfo, export_tree, pretty_tree
from jaxserve.memory.sizing import (
    KVPoolSize,
    KVPoolSizeError,
    kv_bytes_per_token,
    size_kv_pool,
)

__all__ = [
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
