"""Quest page selection (pallas_kernels/sparse.py) against brute-force numpy: the bounds stay
exact through chunked writes and page reuse, the selection is numpy's top-k, a budget of
every page gives the dense output, and the sparse output is attention over exactly the
kept tokens."""

import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import sparse

SEED = int(np.random.SeedSequence().entropy % 2**32)  # fresh inputs each run; in the test ids
PAGE, HKV, GROUP, D = 4, 2, 3, 8


@pytest.mark.parametrize("seed", [SEED])
def test_bounds_exact_through_chunked_writes_and_reuse(seed):
    rng = np.random.default_rng(seed)
    pages = 6
    kmin, kmax = sparse.new_bounds(pages, HKV, D)
    rows_of = {p: [] for p in range(pages)}  # the keys each page holds now
    filled = {p: 0 for p in range(pages)}
    for _ in range(40):
        # one step: a few pages each get a chunk of rows; a full page may be reused from row 0
        page_ids, row_ids, keys = [], [], []
        for p in rng.choice(pages, size=rng.integers(1, 4), replace=False):
            if filled[p] == PAGE or rng.random() < 0.15:
                filled[p], rows_of[p] = 0, []
            n = int(rng.integers(1, PAGE - filled[p] + 1))
            for r in range(filled[p], filled[p] + n):
                k = rng.standard_normal((HKV, D)).astype(np.float32)
                page_ids.append(p), row_ids.append(r), keys.append(k), rows_of[p].append(k)
            filled[p] += n
        order = rng.permutation(len(keys))  # a step's tokens come in any order
        kmin, kmax = sparse.update_bounds(kmin, kmax, np.stack(keys)[order], np.array(page_ids)[order],
                                          np.array(row_ids)[order])
        for p, held in rows_of.items():
            if held:
                np.testing.assert_array_equal(np.asarray(kmin[p]), np.min(held, axis=0))
                np.testing.assert_array_equal(np.asarray(kmax[p]), np.max(held, axis=0))


def _brute_select(q, kmin, kmax, table, kv_len, sm_scale, budget, sink, recent, threshold):
    """The kept page-table slots of one sequence, by loops in numpy."""
    n = -(-kv_len // PAGE)
    if n == 0:
        return []
    bounds = np.empty((n, q.shape[0]))
    for slot in range(n):
        for h in range(q.shape[0]):
            lo, hi = kmin[table[slot], h // GROUP], kmax[table[slot], h // GROUP]
            bounds[slot, h] = sum(max(a * b, a * c) for a, b, c in zip(q[h], lo, hi))
    score = ((bounds - bounds.max(axis=0)) * sm_scale).max(axis=1)
    forced = [s for s in range(n) if s < sink or s >= n - recent]
    rest = [s for s in np.argsort(-score, kind="stable") if s not in forced]
    if threshold is not None:
        rest = [s for s in rest if np.exp(score[s]) >= threshold]
    return sorted(forced + rest[:max(0, min(budget, len(table)) - len(forced))])


@pytest.mark.parametrize("seed", [SEED])
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_selection_equals_brute_force_top_k(seed, threshold):
    rng = np.random.default_rng(seed)
    pages, width, budget = 40, 9, 5
    q = rng.standard_normal((5, HKV * GROUP, D)).astype(np.float32)
    keys = rng.standard_normal((pages, PAGE, HKV, D)).astype(np.float32)
    kmin, kmax = keys.min(axis=1), keys.max(axis=1)
    table = np.stack([rng.permutation(np.arange(1, pages))[:width] for _ in range(5)]).astype(np.int32)
    kv_lens = np.array([0, 3, 4 * PAGE, 4 * PAGE + 1, width * PAGE - 2], np.int32)
    got, lens, kept = sparse.select_pages(q, kmin, kmax, table, kv_lens, page_size=PAGE, sm_scale=0.3,
                                          budget_pages=budget, sink_pages=1, recent_pages=2, threshold=threshold)
    got, lens, kept = np.asarray(got), np.asarray(lens), np.asarray(kept)
    for b in range(5):
        slots = _brute_select(q[b], kmin, kmax, table[b], int(kv_lens[b]), 0.3, budget, 1, 2, threshold)
        assert kept[b] == len(slots)
        np.testing.assert_array_equal(got[b, :kept[b]], table[b, slots])
        last = int(kv_lens[b]) - (-(-int(kv_lens[b]) // PAGE) - 1) * PAGE if kv_lens[b] else 0
        assert lens[b] == (max(len(slots) - 1, 0) * PAGE + last if slots else 0)


def _inputs(rng, kv_lens, width, pages=64):
    q = rng.standard_normal((len(kv_lens), HKV * GROUP, D)).astype(np.float32)
    k = rng.standard_normal((pages, PAGE, HKV, D)).astype(np.float32)
    v = rng.standard_normal((pages, PAGE, HKV, D)).astype(np.float32)
    table = np.stack([rng.permutation(np.arange(1, pages))[:width] for _ in kv_lens]).astype(np.int32)
    return q, k, v, table, np.asarray(kv_lens, np.int32)


@pytest.mark.parametrize("seed", [SEED])
def test_budget_of_every_page_is_dense(seed):
    rng = np.random.default_rng(seed)
    q, k, v, table, kv_lens = _inputs(rng, [1, 13, 40, 0], width=10)
    dense = pallas_kernels.paged_decode_reference(q, k, v, kv_lens, table, sm_scale=0.35)
    t, lens, _ = sparse.select_pages(q, k.min(axis=1), k.max(axis=1), table, kv_lens, page_size=PAGE,
                                     sm_scale=0.35, budget_pages=10)
    out = pallas_kernels.paged_decode_reference(q, k, v, lens, t, sm_scale=0.35)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [SEED])
def test_sparse_output_is_attention_over_the_kept_tokens(seed):
    rng = np.random.default_rng(seed)
    q, k, v, table, kv_lens = _inputs(rng, [50, 23, 37], width=13)
    t, lens, kept = sparse.select_pages(q, k.min(axis=1), k.max(axis=1), table, kv_lens, page_size=PAGE,
                                        sm_scale=0.35, budget_pages=4, sink_pages=1, recent_pages=1)
    out = np.asarray(pallas_kernels.paged_decode_reference(q, k, v, lens, t, sm_scale=0.35))
    t, kept = np.asarray(t), np.asarray(kept)
    for b in range(len(kv_lens)):
        n = -(-int(kv_lens[b]) // PAGE)
        assert kept[b] == 4 and t[b, 0] == table[b, 0] and t[b, 3] == table[b, n - 1]  # sink and recent
        rows = [(p, r) for i, p in enumerate(t[b, :4]) for r in range(PAGE if i < 3 else int(kv_lens[b]) - (n - 1) * PAGE)]
        keys = np.stack([k[p, r] for p, r in rows])  # [N, HKV, D]
        vals = np.stack([v[p, r] for p, r in rows])
        for h in range(HKV * GROUP):
            s = keys[:, h // GROUP] @ q[b, h].astype(np.float64) * 0.35
            w = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, h], (w / w.sum()) @ vals[:, h // GROUP], rtol=1e-5, atol=1e-5)
