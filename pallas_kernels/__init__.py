"""Paged-attention kernels behind one API, each with a pure-jnp reference.

`ragged_paged_attention` (prefill, extend and decode in one ragged batch) and
`paged_decode` (decode only, split-K), each with impl "auto" | "reference" |
"triton" (GPU) | "tpu" | "pallas"; see `dispatch.py`. The KV page layout and the
ragged-batch conventions are documented in `reference.py`; the math shared by all
implementations is in `common.py`.
"""

from pallas_kernels.decode_reference import paged_decode as paged_decode_reference
from pallas_kernels.dispatch import IMPLS, paged_decode, ragged_paged_attention, resolve_impl
from pallas_kernels.reference import ragged_paged_attention as ragged_paged_attention_reference

__all__ = [
    "IMPLS",
    "paged_decode",
    "paged_decode_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "resolve_impl",
]
