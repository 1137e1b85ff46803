"""Sampling: per-request ``SamplingParams`` (host, :mod:`.params`) and the on-device
sampler (:mod:`.sampler`)."""

from jaxserve.sampling.params import SamplingParams
from jaxserve.sampling.sampler import (
    SampleOutput,
    SamplingBatch,
    adjust_logits,
    apply_penalties,
    filter_probs,
    sample,
    update_output_counts,
)

__all__ = [
    "SampleOutput",
    "SamplingBatch",
    "SamplingParams",
    "adjust_logits",
    "apply_penalties",
    "filter_probs",
    "sample",
    "update_output_counts",
]
