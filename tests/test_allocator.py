"""PageAllocator: alloc / free against a plain set of free pages."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.memory import OutOfPagesError, PageAllocator, PageFreeError


def test_fresh_allocator_hands_out_increasing_pages_never_page_0():
    alloc = PageAllocator(6)
    assert alloc.num_pages == 6 and alloc.num_free == 5 and alloc.num_used == 0
    pages = alloc.alloc(5)
    assert pages.dtype == np.int32
    assert pages.tolist() == [1, 2, 3, 4, 5]
    assert alloc.num_free == 0 and alloc.num_used == 5


def test_alloc_more_than_free_raises_and_allocates_nothing():
    alloc = PageAllocator(4)
    alloc.alloc(2)
    with pytest.raises(OutOfPagesError, match="asked for 2 KV pages but only 1"):
        alloc.alloc(2)
    assert alloc.num_free == 1
    assert alloc.alloc(0).shape == (0,)


def test_free_then_alloc_reuses_pages():
    alloc = PageAllocator(8)
    pages = alloc.alloc(7)
    alloc.free(pages[[2, 5]])
    assert alloc.num_free == 2
    assert sorted(alloc.alloc(2).tolist()) == [3, 6]


@pytest.mark.parametrize(
    "bad, message",
    [([0], "reserved dummy"), ([8], "valid pages are 1..7"), ([-1], "valid pages"),
     ([3, 3], "freed twice in one call")],
)
def test_bad_free_is_detected_and_frees_nothing(bad, message):
    alloc = PageAllocator(8)
    alloc.alloc(7)
    with pytest.raises(PageFreeError, match=message):
        alloc.free(bad)
    assert alloc.num_free == 0


def test_double_free_across_calls_is_detected():
    alloc = PageAllocator(8)
    pages = alloc.alloc(3)
    alloc.free(pages[:2])
    with pytest.raises(PageFreeError, match=r"double free of page\(s\) \[2\]"):
        alloc.free([3, 2])
    assert alloc.num_free == 6  # page 3 was not freed either
    assert alloc.is_free([1, 2, 3]).tolist() == [True, True, False]


def test_too_small_pool_rejected():
    with pytest.raises(ValueError, match="dummy page"):
        PageAllocator(1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 2**31 - 1)), max_size=40))
def test_random_alloc_free_matches_a_set(ops):
    num_pages = 12
    alloc = PageAllocator(num_pages)
    free = set(range(1, num_pages))
    held: list[int] = []
    for is_alloc, n, seed in ops:
        if is_alloc:
            if n > len(free):
                with pytest.raises(OutOfPagesError):
                    alloc.alloc(n)
                continue
            pages = alloc.alloc(n).tolist()
            assert len(set(pages)) == n and set(pages) <= free
            free -= set(pages)
            held += pages
        else:
            rng = np.random.default_rng(seed)
            give = rng.permutation(held)[: min(n, len(held))].tolist()
            alloc.free(np.array(give, dtype=np.int32))
            free |= set(give)
            held = [p for p in held if p not in give]
        assert alloc.num_free == len(free)
        assert alloc.is_free(sorted(free)).all()
        assert not alloc.is_free(np.array(held, dtype=np.int64)).any()
