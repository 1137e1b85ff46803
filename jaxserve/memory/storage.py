"""L3 KV storage: whole KV pages on disk, addressed by a chained hash of their prefix.

Keys. :func:`page_keys` gives one key per *full* page of a token sequence (a partial
trailing page gets none). Key ``i`` is ``sha256(key_{i-1} || tokens of page i)`` over the
raw 32-byte digest of the previous key and the page's token ids as int32 little-endian
bytes, so a key names the whole prefix up to and including its page: two sequences share
the key of page ``i`` only if they share all tokens of pages ``0..i``. The chain starts
from ``sha256(namespace || 0x00 || page_size)``, where the namespace
(:func:`storage_namespace`) names the model and the KV layout (dtype, layers, kv heads,
head dim, page size, ...), so pages of another model or layout never match. Keys are
64 lowercase hex characters.

Files. :class:`FileStorage` keeps one file per key at ``<dir>/<key[:2]>/<key>.kv``
(fanned out by the first two hex characters). A page is written to a temporary file in
the same subdirectory and moved into place with ``os.replace``, so a reader sees either
no file or a whole one. There is no fsync: after a power loss a file may be empty or
truncated, which reads as a miss. Layout (little-endian)::

    header  "<4sHH16sQ16sH": magic b"JSKV", version, ndim, dtype name (NUL-padded),
            payload length, blake2b-128 of the payload, key length
    shape   ndim x uint64
    key     key length bytes (ASCII)
    payload the page's bytes in C order

A read checks every field against the storage's page shape and dtype and the key asked
for; a file that fails any check is a miss: logged, counted as ``corrupt`` and removed.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FileStorage", "KVStorage", "StorageStats", "page_keys", "storage_namespace"]

logger = logging.getLogger(__name__)

_MAGIC = b"JSKV"
_VERSION = 1
_HEADER = struct.Struct("<4sHH16sQ16sH")
_DIM = struct.Struct("<Q")
_KEY_RE = re.compile(r"[0-9a-f]{16,128}")


def storage_namespace(model_id: str, kv_layout: dict[str, Any]) -> str:
    """The namespace for :func:`page_keys`: the model (name or path) and every field of
    the KV layout that changes a page's bytes (dtype, num_layers, num_kv_heads, head_dim,
    page_size, ...), in a canonical order so equal layouts give equal strings."""
    layout = json.dumps(kv_layout, sort_keys=True, separators=(",", ":"), default=str)
    return f"{model_id}|{layout}"


def page_keys(tokens: np.ndarray | Sequence[int], page_size: int, namespace: str,
              parent: str | None = None) -> list[str]:
    """One chained key per full page of ``tokens`` (see the module docstring). With
    ``parent`` (the key of the page just before ``tokens``), the chain continues from it
    instead of starting from the namespace, so ``page_keys(a + b, ...)`` equals
    ``page_keys(a, ...) + page_keys(b, ..., parent=<last key of a>)`` for whole pages a."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    ids = np.asarray(tokens).astype("<i4", copy=False).reshape(-1)
    if parent is None:
        prev = hashlib.sha256(f"{namespace}\0{page_size}".encode()).digest()
    else:
        prev = bytes.fromhex(parent)
    keys = []
    for start in range(0, len(ids) - page_size + 1, page_size):
        prev = hashlib.sha256(prev + ids[start : start + page_size].tobytes()).digest()
        keys.append(prev.hex())
    return keys


@dataclasses.dataclass
class StorageStats:
    """Counters since start. ``hits``/``misses`` count keys asked of ``get``; ``corrupt``
    counts files that failed verification (each also a miss); ``write_failures`` counts
    keys that ``set`` could not write."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    write_failures: int = 0


class KVStorage(abc.ABC):
    """A store of KV pages by key, batched. Implementations are thread-safe."""

    @abc.abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether a page is stored under each key (not verified: ``get`` may still miss)."""

    @abc.abstractmethod
    def get(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The page under each key, or None for a miss. Never raises for a bad entry."""

    @abc.abstractmethod
    def set(self, keys: Sequence[str], pages: Sequence[np.ndarray]) -> list[bool]:
        """Store ``pages[i]`` under ``keys[i]``; False where it was not written."""

    @abc.abstractmethod
    def stats(self) -> StorageStats:
        """A snapshot of the counters."""


class _Corrupt(Exception):
    """A stored file failed verification; the message says how."""


class FileStorage(KVStorage):
    """Pages of one shape and dtype as files under ``directory`` (see the module docstring).

    The directory is created if missing; a path that exists and is not a directory, or
    one that cannot be created, raises ValueError here. A write that fails (unwritable
    directory, full disk: any OSError) makes ``set`` return False for that key and logs
    one warning when writes start failing; reads keep working. Pages from ``get`` are
    read-only arrays. A page already stored under a key is not rewritten (a key names
    its content), so ``set`` of a present key returns True without writing.
    """

    def __init__(self, directory: str | os.PathLike[str], page_shape: Sequence[int],
                 dtype: npt.DTypeLike) -> None:
        self.directory = os.fspath(directory)
        self.page_shape = tuple(int(d) for d in page_shape)
        self.dtype = np.dtype(dtype)
        self._page_bytes = int(np.prod(self.page_shape, dtype=np.int64)) * self.dtype.itemsize
        self._dtype_name = self.dtype.name.encode()
        if len(self._dtype_name) > 16:
            raise ValueError(f"dtype name {self.dtype.name!r} is longer than 16 bytes")
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"KV storage path {self.directory!r} exists and is not a directory")
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create KV storage directory {self.directory!r}: {e}") from e
        self._lock = threading.Lock()  # guards _stats and _write_failing
        self._stats = StorageStats()
        self._write_failing = False

    @classmethod
    def open(cls, directory: str | os.PathLike[str], page_shape: Sequence[int],
             dtype: npt.DTypeLike) -> FileStorage:
        """Same as the constructor; reads better at a call site."""
        return cls(directory, page_shape, dtype)

    def path(self, key: str) -> str:
        """The file of ``key``. Raises ValueError for a key that is not lowercase hex."""
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"bad KV storage key {key!r}: want 16..128 lowercase hex chars")
        return os.path.join(self.directory, key[:2], key + ".kv")

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return [os.path.isfile(self.path(k)) for k in keys]

    def get(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        hits = nbytes = corrupt = 0
        for key in keys:
            path = self.path(key)
            page = None
            try:
                with open(path, "rb") as f:
                    page = self._decode(f.read(), key)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as e:
                logger.warning("KV storage: cannot read %s: %s", path, e)
            except _Corrupt as e:
                corrupt += 1
                logger.warning("KV storage: removing bad file %s: %s", path, e)
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if page is not None:
                hits += 1
                nbytes += page.nbytes
            out.append(page)
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
            self._stats.bytes_read += nbytes
            self._stats.corrupt += corrupt
        return out

    def set(self, keys: Sequence[str], pages: Sequence[np.ndarray]) -> list[bool]:
        if len(keys) != len(pages):
            raise ValueError(f"{len(keys)} keys but {len(pages)} pages")
        arrays = [np.asarray(p) for p in pages]
        for page in arrays:
            if page.shape != self.page_shape or page.dtype != self.dtype:
                raise ValueError(f"page {page.shape} {page.dtype} does not match storage "
                                 f"{self.page_shape} {self.dtype}")
        out: list[bool] = []
        nbytes = 0
        first_error: OSError | None = None
        for key, page in zip(keys, arrays):
            path = self.path(key)
            if os.path.isfile(path):
                out.append(True)
                continue
            try:
                nbytes += self._write(path, key, page.tobytes())
                out.append(True)
            except OSError as e:
                first_error = first_error or e
                out.append(False)
        failures = out.count(False)
        with self._lock:
            self._stats.bytes_written += nbytes
            self._stats.write_failures += failures
            newly_failing = failures > 0 and not self._write_failing
            recovered = failures == 0 and nbytes > 0 and self._write_failing
            if newly_failing:
                self._write_failing = True
            elif recovered:
                self._write_failing = False
        if newly_failing:
            logger.warning("KV storage: cannot write to %s (%s); %d of %d pages not stored, "
                           "reads continue (further write failures are only counted)",
                           self.directory, first_error, failures, len(keys))
        elif recovered:
            logger.info("KV storage: writes to %s work again", self.directory)
        return out

    def stats(self) -> StorageStats:
        with self._lock:
            return dataclasses.replace(self._stats)

    def _write(self, path: str, key: str, payload: bytes) -> int:
        """Write one file atomically; returns the bytes written. Raises OSError."""
        subdir = os.path.dirname(path)
        os.makedirs(subdir, exist_ok=True)
        header = _HEADER.pack(_MAGIC, _VERSION, len(self.page_shape), self._dtype_name,
                              len(payload), _checksum(payload), len(key))
        shape = b"".join(_DIM.pack(d) for d in self.page_shape)
        fd, tmp = tempfile.mkstemp(dir=subdir, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.writelines((header, shape, key.encode(), payload))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return len(header) + len(shape) + len(key) + len(payload)

    def _decode(self, blob: bytes, key: str) -> np.ndarray:
        """The page in ``blob`` after checking it all; raises :class:`_Corrupt`."""
        if len(blob) < _HEADER.size:
            raise _Corrupt(f"{len(blob)} bytes, shorter than the header")
        magic, version, ndim, dtype_name, length, checksum, key_len = _HEADER.unpack_from(blob)
        if magic != _MAGIC or version != _VERSION:
            raise _Corrupt(f"magic {magic!r} version {version}, want {_MAGIC!r} {_VERSION}")
        offset = _HEADER.size + ndim * _DIM.size
        if len(blob) < offset + key_len:
            raise _Corrupt("truncated in the shape or key")
        shape = tuple(_DIM.unpack_from(blob, _HEADER.size + i * _DIM.size)[0]
                      for i in range(ndim))
        dtype_name = dtype_name.rstrip(b"\0")
        if dtype_name != self._dtype_name or shape != self.page_shape:
            raise _Corrupt(f"page {shape} {dtype_name.decode(errors='replace')}, "
                           f"want {self.page_shape} {self.dtype.name}")
        stored_key = blob[offset : offset + key_len]
        if stored_key != key.encode():
            raise _Corrupt(f"holds key {stored_key.decode(errors='replace')}")
        payload = memoryview(blob)[offset + key_len :]  # no copy of a large page
        if length != self._page_bytes or len(payload) != length:
            raise _Corrupt(f"payload of {len(payload)} bytes, header says {length}, "
                           f"want {self._page_bytes}")
        if _checksum(payload) != checksum:
            raise _Corrupt("payload checksum mismatch")
        return np.frombuffer(payload, dtype=self.dtype).reshape(self.page_shape)


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()
