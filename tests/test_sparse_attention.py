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
    assert got.shape == table.shape
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


class _Model:
    """A loaded tiny model run with page bounds (and optionally Quest) through jit."""

    def __init__(self, path, sparse=None):
        import jax
        from flax import nnx

        from jaxserve.weights import load

        self.m = load(path, dtype="float32", page_size=PAGE, with_tokenizer=False)
        cfg = self.m.config
        graphdef = self.m.graphdef

        def run(params, batch, k, v, lo, hi):
            model = nnx.merge(graphdef, params)
            hidden, k, v, (lo, hi), read = model(batch, k, v, (lo, hi), sparse)
            return model.logits(hidden), k, v, lo, hi, read

        self.run = jax.jit(run)
        self.k, self.v = self.m.new_kv_cache(48)
        self.lo, self.hi = sparse_new(cfg.num_layers, 48, cfg.num_kv_heads, cfg.head_dim)

    def step(self, seqs, decode_only=False):
        from jaxserve.models import ForwardBatch

        n = sum(len(ids) for ids, _, _ in seqs)
        batch = ForwardBatch.build(seqs, PAGE, num_tokens=n, max_seqs=len(seqs), pages_per_seq=12)
        assert batch.decode_only == decode_only
        logits, self.k, self.v, self.lo, self.hi, read = self.run(self.m.params, batch, self.k, self.v, self.lo,
                                                                  self.hi)
        return np.asarray(logits), np.asarray(read)


def sparse_new(layers, pages, heads, dim):
    lo, hi = sparse.new_bounds(layers * pages, heads, dim)
    return lo.reshape(layers, pages, heads, dim), hi.reshape(layers, pages, heads, dim)


def _assert_bounds_exact(model, pages_and_rows):
    k = np.asarray(model.k)  # [L, P, S, H, D]
    for page, rows in pages_and_rows.items():
        np.testing.assert_array_equal(np.asarray(model.lo)[:, page], k[:, page, :rows].min(axis=1))
        np.testing.assert_array_equal(np.asarray(model.hi)[:, page], k[:, page, :rows].max(axis=1))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.hf_models import save_tiny_model

    path = tmp_path_factory.mktemp("sparse")
    save_tiny_model("llama3", path, seed=21)
    return path


@pytest.mark.parametrize("seed", [SEED])
def test_model_bounds_exact_after_chunked_prefill_and_page_reuse(tiny_llama, seed):
    rng = np.random.default_rng(seed)
    model = _Model(tiny_llama)
    prompt = rng.integers(3, 256, size=23).tolist()
    pages = [5, 9, 2, 30, 7, 11]
    for start, end in ((0, 6), (6, 17), (17, 23)):  # chunked prefill
        model.step([(prompt[start:end], start, pages)])
    _assert_bounds_exact(model, {5: 4, 9: 4, 2: 4, 30: 4, 7: 4, 11: 3})
    for pos in range(23, 26):  # decode steps fill page 11, then page 40
        model.step([([int(rng.integers(3, 256))], pos, pages + [40])], decode_only=True)
    _assert_bounds_exact(model, {11: 4, 40: 2})
    # pages 9 and 2 freed (retraction) and reused by another sequence
    other = rng.integers(3, 256, size=6).tolist()
    model.step([(other, 0, [9, 2])])
    _assert_bounds_exact(model, {9: 4, 2: 2, 5: 4})


@pytest.mark.parametrize("seed", [SEED])
def test_model_sparse_decode(tiny_llama, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (41, 7, 30)]
    pages = [list(range(1 + 12 * i, 13 + 12 * i)) for i in range(3)]
    full = sparse.SparseAttention(token_budget=12 * PAGE, min_context=0)
    tight = sparse.SparseAttention(token_budget=3 * PAGE, min_context=35)
    runs = {}
    for name, config in (("dense", None), ("full", full), ("tight", tight)):
        model = _Model(tiny_llama, config)
        for ids, p in zip(prompts, pages):
            model.step([(ids, 0, p)])
        token = [[int(rng.integers(3, 256))] for _ in prompts] if name == "dense" else runs["dense"][2]
        logits, read = model.step([(t, len(ids), p) for t, ids, p in zip(token, prompts, pages)], decode_only=True)
        runs[name] = (logits, read, token)
    layers = 2
    dense_lens = np.array([len(p) + 1 for p in prompts]) * layers
    np.testing.assert_array_equal(runs["dense"][1], dense_lens)
    np.testing.assert_array_equal(runs["full"][1], dense_lens)  # a budget of the whole context: dense
    np.testing.assert_allclose(runs["full"][0], runs["dense"][0], rtol=1e-5, atol=1e-5)
    # 42 tokens (11 pages) read 3 pages: the sink, one chosen, the last (2 tokens); 8 tokens stay dense
    # (below the budget) and 31 tokens stay dense (below min_context)
    np.testing.assert_array_equal(runs["tight"][1], np.array([2 * PAGE + 2, 8, 31]) * layers)
    np.testing.assert_allclose(runs["tight"][0][1:], runs["dense"][0][1:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(runs["tight"][0][0], runs["dense"][0][0], rtol=1e-5, atol=1e-5)


KERNELS = {"triton": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


def _sparse_decode(kernel, q, k, v, lo, hi, table, lens, interpret=False):
    from pallas_kernels import tpu_decode, triton_decode

    fn = {"triton": triton_decode.paged_decode, "tpu": tpu_decode.paged_decode}[kernel]
    t, n, _ = sparse.select_pages(q, lo, hi, table, lens, page_size=PAGE, sm_scale=0.35, budget_pages=4)
    return fn(q, k, v, n, t, sm_scale=0.35, num_splits=2, interpret=interpret, block_kv=PAGE)


@pytest.mark.parametrize("seed", [SEED])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernels_on_selected_pages_match_the_reference(kernel, seed):
    import functools

    import jax

    q, k, v, table, kv_lens = _inputs(np.random.default_rng(seed), [50, 0, 23, 37], width=13)
    lo, hi = k.min(axis=1), k.max(axis=1)
    t, n, _ = sparse.select_pages(q, lo, hi, table, kv_lens, page_size=PAGE, sm_scale=0.35, budget_pages=4)
    expect = pallas_kernels.paged_decode_reference(q, k, v, n, t, sm_scale=0.35)
    got = jax.jit(functools.partial(_sparse_decode, kernel, interpret=True))(q, k, v, lo, hi, table, kv_lens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), rtol=2e-5, atol=2e-5)
    # and the same program lowers for the kernel's accelerator
    platform, marker = KERNELS[kernel]
    text = jax.jit(functools.partial(_sparse_decode, kernel)).trace(q, k, v, lo, hi, table, kv_lens).lower(
        lowering_platforms=(platform,)).as_text()
    assert marker in text
