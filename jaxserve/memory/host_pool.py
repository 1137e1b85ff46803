"""The L2 tier: KV pages in host memory, with their own allocator.

`HostKVPool` is allocated once: K and V as `[num_layers, num_pages, page_size,
num_kv_heads, head_dim]` numpy arrays in the model's dtype (the whole heads, gathered
from every tensor-parallel shard), and a `PageAllocator` over pages `1 .. num_pages - 1`
(page 0 is unused, like the device pool's dummy page). Plain host memory: a host page is
read into a fresh array for its device upload, and written from a gathered device array.

`host_pool_pages` turns `--hicache-ratio` / `--hicache-size` into a page count and
rejects sizes that make no sense (a ratio below 1, more bytes than the machine has).
"""

from __future__ import annotations

import os

import numpy as np

from jaxserve.memory.allocator import PageAllocator


class HostPoolSizeError(ValueError):
    """A host pool size the machine cannot hold or that makes no sense; names the flag."""


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_pool_pages(device_pages: int, page_bytes: int, ratio: float, size_gb: float | None) -> int:
    """Host pages (including the unused page 0) for `device_pages` usable device pages of
    `page_bytes` each (K and V): `size_gb` when given, else `ratio` times the device pool."""
    if size_gb is not None:
        if size_gb <= 0:
            raise HostPoolSizeError(f"--hicache-size must be > 0 GB, got {size_gb}")
        nbytes = int(size_gb * (1 << 30))
        source = f"--hicache-size {size_gb} GB"
    else:
        if ratio < 1.0:
            raise HostPoolSizeError(f"--hicache-ratio must be >= 1 (the host pool is at least as large as "
                                    f"the device pool), got {ratio}")
        nbytes = int(ratio * device_pages * page_bytes)
        source = f"--hicache-ratio {ratio}"
    if nbytes > physical_memory_bytes():
        raise HostPoolSizeError(f"{source} asks for {nbytes / (1 << 30):.1f} GiB of host memory but this machine "
                                f"has {physical_memory_bytes() / (1 << 30):.1f} GiB; lower it")
    pages = nbytes // page_bytes
    if pages < 1:
        raise HostPoolSizeError(f"{source} holds no KV page ({page_bytes} bytes each); raise it")
    return pages + 1


class HostKVPool:
    """K and V pages in host memory and the free list over them (see the module doc)."""

    def __init__(self, num_pages: int, page_shape: tuple[int, ...], dtype, num_layers: int):
        self.page_shape = tuple(page_shape)  # [page_size, kv_heads, head_dim]
        self.dtype = np.dtype(dtype)
        shape = (num_layers, num_pages, *self.page_shape)
        self.k = np.zeros(shape, self.dtype)
        self.v = np.zeros(shape, self.dtype)
        self.allocator = PageAllocator(num_pages)

    @property
    def total_pages(self) -> int:
        return self.allocator.num_pages - 1

    @property
    def page_bytes(self) -> int:
        """Bytes of one page, K and V, all layers."""
        return 2 * self.k[:, 0].nbytes

    def write(self, pages: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store `k`, `v` `[layers, len(pages), ...]` into host `pages`."""
        self.k[:, pages] = k
        self.v[:, pages] = v

    def read(self, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of host `pages`, `[layers, len(pages), ...]` each."""
        return self.k[:, pages], self.v[:, pages]

    def page(self, page: int) -> np.ndarray:
        """One page as stored on disk: `[2, layers, page_size, kv_heads, head_dim]`."""
        return np.stack([self.k[:, page], self.v[:, page]])

    def set_page(self, page: int, data: np.ndarray) -> None:
        self.k[:, page] = data[0]
        self.v[:, page] = data[1]
