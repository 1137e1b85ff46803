"""The device side: params, KV pool and per-request rows on the mesh, and the jitted programs."""

from jaxserve.runner.batch import Layout, StepBatch
from jaxserve.runner.kv_io import PageIO
from jaxserve.runner.rows import MAX_STOP_IDS
from jaxserve.runner.runner import INPUT_LOGPROB_ROWS, MAX_TOP_LOGPROBS, ModelRunner, compile_count, token_buckets

__all__ = ["INPUT_LOGPROB_ROWS", "MAX_STOP_IDS", "MAX_TOP_LOGPROBS", "Layout", "ModelRunner", "PageIO", "StepBatch", "compile_count",
           "token_buckets"]
