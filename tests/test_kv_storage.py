"""L3 KV storage (jaxserve/memory/storage.py): chained page keys and the file backend,
including its faults (corrupt, truncated, garbage and swapped files; failing writes)."""

from __future__ import annotations

import errno
import logging
import os
import threading

import ml_dtypes
import numpy as np
import pytest

from jaxserve.memory.storage import FileStorage, page_keys, storage_namespace

PAGE = 4
SHAPE = (2, PAGE, 2, 8)  # [layers, page_size, kv heads, head_dim]
NS = storage_namespace("org/tiny", {"dtype": "float32", "num_layers": 2, "num_kv_heads": 2,
                                    "head_dim": 8, "page_size": PAGE})


def _pages(n: int, dtype=np.float32, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.uint16:  # bfloat16 bits, NaN patterns included
        return [rng.integers(0, 2**16, SHAPE, dtype=np.uint16) for _ in range(n)]
    return [rng.standard_normal(SHAPE).astype(dtype) for _ in range(n)]


def _keys(n: int, seed: int = 0) -> list[str]:
    return page_keys(np.arange(n * PAGE) + 1000 * seed, PAGE, NS)


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return (a is not None and a.shape == b.shape and a.dtype == b.dtype
            and a.tobytes() == b.tobytes())


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "jaxserve.memory.storage"]


def test_keys_are_deterministic_namespaced_chained_and_whole_pages_only():
    tokens = list(range(3 * PAGE + 2))
    keys = page_keys(tokens, PAGE, NS)
    assert len(keys) == 3  # the partial trailing page gets no key
    assert keys == page_keys(np.array(tokens, dtype=np.int64), PAGE, NS)
    assert len(set(keys)) == 3 and all(len(k) == 64 for k in keys)
    assert page_keys(tokens[: 3 * PAGE], PAGE, NS) == keys
    assert page_keys(tokens[: PAGE - 1], PAGE, NS) == []

    other = storage_namespace("org/tiny", {"dtype": "bfloat16", "num_layers": 2,
                                           "num_kv_heads": 2, "head_dim": 8, "page_size": PAGE})
    assert not set(page_keys(tokens, PAGE, other)) & set(keys)
    assert NS == storage_namespace("org/tiny", dict(reversed(list(
        {"dtype": "float32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8,
         "page_size": PAGE}.items()))))

    changed = tokens.copy()
    changed[PAGE + 1] += 1  # a token of page 1
    new = page_keys(changed, PAGE, NS)
    assert new[0] == keys[0] and new[1] != keys[1] and new[2] != keys[2]

    # The chain continues from a parent key.
    assert page_keys(tokens[PAGE:], PAGE, NS, parent=keys[0]) == keys[1:]


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, ml_dtypes.bfloat16])
def test_round_trip_is_exact_and_survives_a_restart(tmp_path, dtype):
    store = FileStorage.open(tmp_path / "l3", SHAPE, dtype)  # a missing directory is created
    pages = _pages(5, np.float32 if dtype == ml_dtypes.bfloat16 else dtype)
    pages = [p.astype(dtype) for p in pages]
    keys = _keys(5)
    assert store.exists(keys) == [False] * 5
    assert store.get(keys[:1]) == [None]
    assert store.set(keys, pages) == [True] * 5
    assert store.exists(keys) == [True] * 5
    assert all(_same(g, p) for g, p in zip(store.get(keys), pages))
    assert all(os.path.dirname(store.path(k)).endswith(k[:2]) for k in keys)

    again = FileStorage(tmp_path / "l3", SHAPE, dtype)  # a restart
    assert all(_same(g, p) for g, p in zip(again.get(keys), pages))
    s = store.stats()
    assert (s.hits, s.misses, s.corrupt, s.write_failures) == (5, 1, 0, 0)
    assert s.bytes_read == 5 * pages[0].nbytes and s.bytes_written > s.bytes_read


def test_bad_files_are_misses_counted_and_removed(tmp_path, caplog):
    store = FileStorage(tmp_path, SHAPE, np.float32)
    pages, keys = _pages(8), _keys(8)
    assert store.set(keys, pages) == [True] * 8
    paths = [store.path(k) for k in keys]

    with open(paths[0], "r+b") as f:  # flip a payload byte
        f.seek(-5, os.SEEK_END)
        byte = f.read(1)
        f.seek(-5, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    with open(paths[1], "r+b") as f:  # truncate
        f.truncate(os.path.getsize(paths[1]) - 7)
    with open(paths[2], "wb") as f:  # garbage
        f.write(os.urandom(100))
    with open(paths[3], "wb"):  # empty, as after a crash without fsync
        pass
    blob4, blob5 = open(paths[4], "rb").read(), open(paths[5], "rb").read()
    open(paths[4], "wb").write(blob5)  # swap two files' contents
    open(paths[5], "wb").write(blob4)

    with caplog.at_level(logging.WARNING, logger="jaxserve.memory.storage"):
        got = store.get(keys)
    assert got[:6] == [None] * 6
    assert _same(got[6], pages[6]) and _same(got[7], pages[7])
    assert len(_warnings(caplog)) == 6 and "removing bad file" in caplog.text
    assert store.exists(keys) == [False] * 6 + [True] * 2  # the bad files are gone
    s = store.stats()
    assert (s.hits, s.misses, s.corrupt) == (2, 6, 6)

    assert store.set(keys[:6], pages[:6]) == [True] * 6  # a re-write heals them
    assert all(_same(g, p) for g, p in zip(store.get(keys), pages))

    # A storage of another page shape or dtype on the same directory (a wrong namespace
    # would be the bug) reads misses, never pages of the wrong layout.
    assert FileStorage(tmp_path, (2, PAGE, 2, 4), np.float32).get(keys[6:7]) == [None]
    assert FileStorage(tmp_path, SHAPE, np.int32).get(keys[7:8]) == [None]
    assert store.exists(keys[6:]) == [False, False]


def test_start_up_errors(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        FileStorage.open(tmp_path / "file", SHAPE, np.float32)
    with pytest.raises(ValueError, match="cannot create"):
        FileStorage.open(tmp_path / "file" / "sub", SHAPE, np.float32)
    store = FileStorage(tmp_path / "ok", SHAPE, np.float32)
    with pytest.raises(ValueError, match="does not match"):
        store.set(_keys(1), [np.zeros((1, 2), np.float32)])
    with pytest.raises(ValueError, match="bad KV storage key"):
        store.get(["../etc/passwd"])


def _block_writes(store: FileStorage, key: str, how: str, monkeypatch) -> None:
    """Make writing ``key`` fail: a read-only fan-out directory (not as root, which
    writes anyway), a regular file where the fan-out directory goes, or a full disk
    (``os.replace``, the OS boundary, raising ENOSPC)."""
    sub = os.path.dirname(store.path(key))
    if how == "readonly":
        os.makedirs(sub, exist_ok=True)
        os.chmod(sub, 0o500)
    elif how == "file_in_the_way":
        with open(sub, "wb") as f:
            f.write(b"not a directory")
    else:
        def full_disk(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "replace", full_disk)


@pytest.mark.parametrize("how", ["readonly", "file_in_the_way", "full_disk"])
def test_failed_writes_return_false_and_reads_continue(tmp_path, monkeypatch, caplog, how):
    if how == "readonly" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions (file_in_the_way covers it)")
    store = FileStorage(tmp_path, SHAPE, np.float32)
    pages, keys = _pages(4), _keys(4)
    assert store.set(keys[:2], pages[:2]) == [True, True]
    blocked = next(k for k in _keys(50, seed=1) if k[:2] not in {x[:2] for x in keys})
    try:
        _block_writes(store, blocked, how, monkeypatch)
        with caplog.at_level(logging.WARNING, logger="jaxserve.memory.storage"):
            assert store.set([blocked], pages[2:3]) == [False]
            assert store.set([blocked], pages[2:3]) == [False]
        assert len(_warnings(caplog)) == 1 and "cannot write" in caplog.text  # one line
        assert store.get([blocked]) == [None]
        assert all(_same(g, p) for g, p in zip(store.get(keys[:2]), pages[:2]))
        assert store.stats().write_failures == 2
        leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
        assert leftovers == []
    finally:
        if how == "readonly":
            os.chmod(os.path.dirname(store.path(blocked)), 0o700)


def test_concurrent_set_and_get_never_return_wrong_data(tmp_path):
    store = FileStorage(tmp_path, SHAPE, np.float32)
    pages, keys = _pages(24), _keys(24)
    wrong: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(40):
            idx = rng.choice(len(keys), size=4, replace=False)
            if rng.random() < 0.5:
                store.set([keys[i] for i in idx], [pages[i] for i in idx])
            for i, got in zip(idx, store.get([keys[i] for i in idx])):
                if got is not None and not _same(got, pages[i]):
                    wrong.append(keys[i])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    s = store.stats()
    assert s.corrupt == 0 and s.write_failures == 0
    assert all(g is None or _same(g, p) for g, p in zip(store.get(keys), pages))
