"""Token masks for one step: a `[rows, ceil(V / 32)]` int32 bitmask, bit `v % 32` of word
`v // 32` set where token v is allowed.

Rows without a grammar are all ones (every token allowed), so a free request batched with
constrained ones samples exactly what it samples alone. The constrained rows are filled
by llguidance's parallel filler, which releases the GIL: the scheduler calls this while
the device runs the step's forward.
"""

from __future__ import annotations

import llguidance
import numpy as np

_executor: llguidance.LLExecutor | None = None


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_masks(grammars: list[tuple[int, "object"]], num_rows: int, vocab_size: int) -> np.ndarray:
    """The step's bitmask [num_rows, words]; `grammars` is [(row index, Grammar)]."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    mask = np.full((num_rows, mask_words(vocab_size)), -1, np.int32)
    if grammars:
        _executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, g in grammars], mask.ctypes.data,
                                          mask.shape[1] * 4, num_rows)
    return mask


def allows_nothing(mask: np.ndarray, row: int) -> bool:
    return not mask[row].any()
