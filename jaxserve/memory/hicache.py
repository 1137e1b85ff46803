"""HiCache: moves KV pages between the tiers (device L1, host L2, storage L3).

The scheduler thread owns it, like the tree. Three transfers:

- **backup** (device -> host, and on to storage): the tree asks for it (write policy);
  the gather of the node's device pages is dispatched at once (`runner/kv_io.py`), the
  copy into the host pool and the storage write run on the `jaxserve-kv-write` thread.
  `poll` settles finished copies (each iteration): their host pages become evictable.
- **load** (host -> device): at admission, a request's host-only chain is loaded all or
  nothing, within a quota of pages per scheduling pass: device pages are reserved, the
  host pages read and scattered into the pool (dispatched ahead of the step that reads
  them), and the chain is on the device again.
- **prefetch** (storage -> host): when a request arrives, the pages of its prompt past
  what the tree holds are looked up in storage by their chained keys; those found are
  read into host pages on the `jaxserve-kv-prefetch` thread. Admission asks `ready`:
  `best_effort` takes what has arrived by the time the request is picked,
  `wait_complete` waits for all of it, `timeout` waits up to the timeout. What arrived
  enters the tree as a host-only leaf and is loaded like any host hit.

Pages of a transfer in flight are "locked" (`locked_pages`), outside both evictions. A
storage failure (unwritable directory, full disk, a bad file) costs only the storage
tier: it is logged and counted, never raised.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from jaxserve.memory.hiradix_cache import HiRadixCache
from jaxserve.memory.host_pool import HostKVPool
from jaxserve.memory.storage import KVStorage, page_keys

logger = logging.getLogger(__name__)

PREFETCH_POLICIES = ("best_effort", "wait_complete", "timeout")
MIN_PREFETCH_PAGES = 1


@dataclasses.dataclass(eq=False)
class Write:
    nodes: list  # the nodes whose host pages it fills (a split adds one)
    pages: np.ndarray  # host pages
    future: Future | None = None


@dataclasses.dataclass(eq=False)
class Prefetch:
    tokens: np.ndarray  # the prompt's whole pages up to the last one found
    start: int  # first page read from storage (the tree had the ones before)
    keys: list[str]
    pages: np.ndarray  # host pages, one per key
    deadline: float
    count: int = 0  # pages read so far
    cancelled: bool = False
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    future: Future | None = None


class HiCache:
    def __init__(self, cache: HiRadixCache, host: HostKVPool, io, *, storage: KVStorage | None = None,
                 namespace: str = "", prefetch_policy: str = "best_effort", prefetch_timeout: float = 2.0,
                 load_quota_pages: int = 1024):
        if prefetch_policy not in PREFETCH_POLICIES:
            raise ValueError(f"prefetch policy must be one of {PREFETCH_POLICIES}, got {prefetch_policy!r}")
        self.cache, self.host, self.io, self.storage = cache, host, io, storage
        self.namespace = namespace
        self.prefetch_policy, self.prefetch_timeout = prefetch_policy, prefetch_timeout
        self.load_quota_pages = load_quota_pages
        self.page_size = cache.page_size
        cache.backup = self.backup
        self._writes: list[Write] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jaxserve-kv-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="jaxserve-kv-prefetch")
        self.locked_pages = 0  # host pages in transfers in flight
        self._loaded_this_pass = 0
        self.counters = collections.Counter()  # pages / bytes / seconds moved, per direction

    # ---- backup: device -> host (-> storage) ----

    def backup(self, node) -> bool:
        """Start a host copy of `node`'s device pages; False when the host is full."""
        n = len(node.pages)
        host_pages = self._host_alloc(n)
        if host_pages is None and self._writes:  # the host is full of copies in flight: settle them
            self.poll(wait=True)
            host_pages = self._host_alloc(n)
        if host_pages is None:
            self.counters["backup_skipped_pages"] += n
            return False
        keys = self.cache.keys_of(node, self._keys) if self.storage is not None else None
        write = Write([node], host_pages)
        node.host, node.writing = host_pages, write
        write.future = self._writer.submit(self._write, self.io.gather(node.pages), host_pages, keys)
        self._writes.append(write)
        self.locked_pages += n
        return True

    def _write(self, parts, host_pages: np.ndarray, keys: list[str] | None) -> None:
        """On the write thread: the gathered pages into host memory, then into storage."""
        start, at = time.perf_counter(), 0
        for count, k, v in parts:
            self.host.write(host_pages[at : at + count], np.asarray(k), np.asarray(v))
            at += count
        self.counters["d2h_seconds"] += time.perf_counter() - start
        if keys is not None:
            start = time.perf_counter()
            written = self.storage.set(keys, [self.host.page(p) for p in host_pages])
            self.counters["storage_write_seconds"] += time.perf_counter() - start
            self.counters["storage_written_pages"] += sum(written)

    @property
    def busy(self) -> bool:
        """Copies to the host are in flight (the idle loop keeps polling them)."""
        return bool(self._writes)

    def poll(self, wait: bool = False) -> None:
        """Settle finished copies (all of them, waiting, with `wait`)."""
        pending = []
        for write in self._writes:
            if not (wait or write.future.done()):
                pending.append(write)
                continue
            error = write.future.exception()
            if error is not None:
                logger.warning("KV backup to host failed (%s: %s); the pages stay device-only", type(error).__name__,
                               error)
            self.cache.write_done(write.nodes, error is None)
            self.locked_pages -= len(write.pages)
            if error is None:
                self.counters["d2h_pages"] += len(write.pages)
        self._writes = pending

    # ---- load: host -> device ----

    def begin_pass(self) -> None:
        self._loaded_this_pass = 0

    def load(self, book, nodes: list) -> int:
        """Load a host-only chain (just matched) to the device, all or nothing; the tokens
        loaded."""
        try:
            return self._load(book, nodes)
        finally:
            self.cache.end_load()

    def _load(self, book, nodes: list) -> int:
        if any(n.writing is not None for n in nodes):
            for n in nodes:
                if n.writing is not None:
                    n.writing.future.exception()  # wait for the copy
            self.poll()
            if any(n.host is None for n in nodes):
                return 0  # a copy failed: the chain is gone
        host_pages = np.concatenate([n.host for n in nodes])
        count = len(host_pages)
        if self._loaded_this_pass + count > self.load_quota_pages or not book.reserve(count):
            self.counters["load_refused_pages"] += count
            return 0
        device_pages = book.allocator.alloc(count)
        start = time.perf_counter()
        for at, n in self.io.pieces(count):
            self.io.scatter(device_pages[at : at + n], *self.host.read(host_pages[at : at + n]))
        self.counters["h2d_seconds"] += time.perf_counter() - start
        self.counters["h2d_pages"] += count
        self.cache.attach_device(nodes, device_pages)
        self._loaded_this_pass += count
        return count * self.page_size

    # ---- prefetch: storage -> host ----

    def _keys(self, tokens: np.ndarray, parent: str | None) -> list[str]:
        return page_keys(tokens, self.page_size, self.namespace, parent=parent)

    def on_arrival(self, req) -> None:
        """Start reading the pages of `req`'s prompt that storage has and the tree lacks."""
        if self.storage is None:
            return
        ps = self.page_size
        tokens = req.tokens[: req.match_limit()]
        have = self.cache.peek_prefix(tokens) // ps
        if len(tokens) // ps - have < MIN_PREFETCH_PAGES:
            return
        keys = self._keys(tokens, None)[have:]
        found = 0
        for exists in self.storage.exists(keys):
            if not exists:
                break
            found += 1
        self.counters["storage_lookup_pages"] += len(keys)
        if found == 0:
            return
        pages = self._host_alloc(found, partial=True)
        if pages is None:
            return
        end = (have + len(pages)) * ps
        pf = Prefetch(tokens[:end].copy(), have, keys[: len(pages)], pages, time.monotonic() + self.prefetch_timeout)
        pf.future = self._reader.submit(self._fetch, pf)
        req.prefetch = pf
        self.locked_pages += len(pages)

    def _fetch(self, pf: Prefetch) -> None:
        """On the prefetch thread: pages from storage into host memory, in order, until a
        miss or a cancel."""
        start = time.perf_counter()
        for i, key in enumerate(pf.keys):
            page = self.storage.get([key])[0]
            with pf.lock:
                if page is None or pf.cancelled:
                    break
                self.host.set_page(int(pf.pages[i]), page)
                pf.count += 1
        self.counters["storage_read_seconds"] += time.perf_counter() - start

    def ready(self, req) -> bool:
        """Whether `req` may be admitted now (see the prefetch policies); when its prefetch
        is over, what arrived joins the tree as host pages."""
        pf = req.prefetch
        if pf is None:
            return True
        if not pf.future.done():
            waiting = self.prefetch_policy == "wait_complete" or (
                self.prefetch_policy == "timeout" and time.monotonic() < pf.deadline)
            if waiting:
                return False
        count = self._end_prefetch(req)
        end = pf.start + count
        req.storage_tokens = self.cache.insert_host(pf.tokens[: end * self.page_size], pf.pages[:count], pf.start,
                                                    pf.keys[:count]) if count else 0
        self.counters["storage_read_pages"] += count
        return True

    def cancel(self, req) -> None:
        """`req` leaves before its prefetch is used: its host pages go back."""
        if req.prefetch is not None:
            pf = req.prefetch
            self.host.allocator.free(pf.pages[: self._end_prefetch(req)])

    def _end_prefetch(self, req) -> int:
        """Stop `req`'s prefetch; frees the pages that were not read; returns the count read."""
        pf, req.prefetch = req.prefetch, None
        with pf.lock:
            pf.cancelled = True
            count = pf.count
        self.host.allocator.free(pf.pages[count:])
        self.locked_pages -= len(pf.pages)
        return count

    # ---- host memory ----

    def _host_alloc(self, n: int, partial: bool = False) -> np.ndarray | None:
        alloc = self.host.allocator
        if alloc.num_free < n:
            self.cache.evict_host(max(n - alloc.num_free, alloc.num_pages // 32))
        if alloc.num_free < n:
            if not partial or alloc.num_free == 0:
                return None
            n = alloc.num_free
        return alloc.alloc(n)

    def flush(self) -> None:
        """Settle every copy, then drop both tiers' unlocked entries (storage keeps its files)."""
        self.cache.flush()
        self.poll(wait=True)  # with write_back, the flush itself started copies
        self.cache.flush_host()

    def close(self) -> None:
        """Finish the copies in flight (so storage has them), then stop the threads."""
        self.poll(wait=True)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict:
        c, page_bytes = self.counters, self.host.page_bytes
        out = {**self.cache.host_stats(), "host_locked_pages": self.locked_pages,
               "hicache_write_policy": self.cache.write_policy}
        for way in ("d2h", "h2d"):
            out[f"{way}_pages"] = c[f"{way}_pages"]
            out[f"{way}_bytes"] = c[f"{way}_pages"] * page_bytes
            out[f"{way}_seconds"] = c[f"{way}_seconds"]
        for name in ("storage_read_pages", "storage_written_pages", "storage_lookup_pages", "backup_skipped_pages",
                     "load_refused_pages"):
            out[name] = c[name]
        if self.storage is not None:
            s = self.storage.stats()
            out.update(storage_bytes_read=s.bytes_read, storage_bytes_written=s.bytes_written,
                       storage_read_seconds=c["storage_read_seconds"], storage_write_seconds=c["storage_write_seconds"],
                       storage_corrupt_pages=s.corrupt, storage_write_failures=s.write_failures)
        return out
