"""Engine: the in-process API (sync, async, streaming) over the scheduler thread.

Requests and responses have the shapes of SGLang's `/generate`. Everything a request can
get wrong is checked here, before anything is scheduled, and raised as
`InvalidRequestError` with a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Iterator

import jax
import numpy as np

from jaxserve.config import ServerArgs
from jaxserve.errors import InvalidRequestError
from jaxserve.memory import NoRadixCache, PageAllocator, RadixCache, size_kv_pool
from jaxserve.outputs import OutputCollector
from jaxserve.runner import MAX_TOP_LOGPROBS, ModelRunner, compile_count
from jaxserve.sampling import SamplingParams
from jaxserve.scheduler import Request, Scheduler
from jaxserve.scheduler.session import Session
from jaxserve.weights import load

logger = logging.getLogger(__name__)


class Engine:
    """`Engine(model_path=None, **server_args)`; see `ServerArgs` for the knobs."""

    def __init__(self, model_path: str | None = None, **server_args):
        self.args = args = ServerArgs.from_kwargs(model_path=model_path, **server_args)
        if args.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        self.model = load(args.model_path, dtype=args.dtype, tp_size=args.tp_size, page_size=args.page_size,
                          attention_backend=args.attention_backend, chat_template=args.chat_template)
        self.tokenizer = self.model.tokenizer
        cfg = self.model.config
        self.context_length = args.context_length or cfg.max_position_embeddings
        weights = sum(x.nbytes for x in jax.tree.leaves(self.model.param_tree))
        size = size_kv_pool(weights_bytes=weights, kv_bytes_per_token=cfg.kv_bytes_per_token(np.dtype(self.model.dtype).itemsize),
                            page_size=args.page_size, max_total_tokens=args.max_total_tokens,
                            mem_fraction_static=args.mem_fraction_static, context_length=self.context_length)
        logger.info(size.log_line())
        self.pool = size
        allocator = PageAllocator(size.num_pages)
        cache = (NoRadixCache if args.disable_radix_cache else RadixCache)(allocator, args.page_size)
        chunked = args.chunked_prefill_size != -1
        max_step_tokens = args.max_prefill_tokens if chunked else max(args.max_prefill_tokens, self.context_length)
        chunk = min(args.chunked_prefill_size if chunked else self.context_length, max_step_tokens)
        runner = ModelRunner(self.model, size.num_pages, args.max_running_requests, max_step_tokens,
                             self.context_length)
        runner.warmup()
        self.compiles_at_ready = compile_count()
        self.scheduler = Scheduler(runner, cache, allocator, chunk_size=chunk, policy=args.schedule_policy,
                                   context_length=self.context_length)
        self.scheduler.start()
        self._seeds = itertools.count(args.random_seed * 1_000_003 + 1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.sessions: dict[str, Session] = {}
        self._stopped = threading.Event()
        threading.Thread(target=self._reap_sessions, name="jaxserve-sessions", daemon=True).start()

    # ---- the public API ----

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
                 rid: str | list[str] | None = None, stream: bool = False, session_params: dict | None = None):
        """Blocking `/generate`: a dict, a list of dicts (list input or n > 1), or an iterator when streaming."""
        kwargs = dict(prompt=prompt, sampling_params=sampling_params, input_ids=input_ids,
                      return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                      top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
                      rid=rid, stream=stream, session_params=session_params)
        loop = self._private_loop()
        if not stream:
            return asyncio.run_coroutine_threadsafe(self.async_generate(**kwargs), loop).result()
        agen = asyncio.run_coroutine_threadsafe(self.async_generate(**kwargs), loop).result()
        return _sync_iter(agen, loop)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                             rid=None, stream=False, session_params=None):
        """Async `/generate`; with `stream=True` an async iterator of cumulative dicts.

        `session_params={"id": sid}` appends the input to that session's conversation.
        """
        if self._stopped.is_set():
            raise RuntimeError("the engine is shut down")
        options = dict(return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                       top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)
        session = self._session_for(session_params)
        items = self._prepare(prompt, sampling_params, input_ids, rid, options, session)
        options["session"] = session
        batched = isinstance(prompt, list) or (input_ids is not None and input_ids and isinstance(input_ids[0], list))
        if stream:
            if len(items) != 1 or items[0][1].n != 1:
                raise InvalidRequestError("stream=true takes one prompt with n=1")
            ids, params, req_rid = items[0]
            return self._stream(ids, params, req_rid, options)
        results = await asyncio.gather(*(self._run(ids, params, req_rid, options) for ids, params, req_rid in items))
        flat = [r for group in results for r in group]
        return flat if batched or len(flat) > 1 else flat[0]

    def abort(self, rid: str) -> None:
        self.scheduler.abort(rid)

    def flush_cache(self) -> bool:
        """Drop every unlocked radix-cache entry; True if nothing is running."""
        def flush():
            if self.scheduler.running or self.scheduler.waiting:
                return False
            self.scheduler.cache.flush()
            return True

        return self.scheduler.call(flush)

    def open_session(self, capacity_of_str_len: int | None = None, session_id: str | None = None) -> str:
        """Start a conversation whose KV stays cached between turns; returns its id."""
        sid = session_id or uuid.uuid4().hex
        if sid in self.sessions:
            raise InvalidRequestError(f"session {sid} is already open")
        self.sessions[sid] = Session(sid, capacity_of_str_len)
        return sid

    def close_session(self, session_id: str) -> None:
        """Unlock a session's KV (it stays in the radix cache as evictable)."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            raise InvalidRequestError(f"no open session {session_id!r}")
        self.scheduler.call(lambda: self.scheduler.close_session(session))

    def _session_for(self, session_params) -> Session | None:
        if session_params is None:
            return None
        if not isinstance(session_params, dict) or not isinstance(session_params.get("id"), str):
            raise InvalidRequestError("`session_params` must be an object with a string `id`")
        extra = sorted(k for k, v in session_params.items() if k != "id" and v not in (None, False))
        if extra:
            raise InvalidRequestError(f"session_params {extra} are not supported; only `id` (append to the conversation)")
        if session_params["id"] not in self.sessions:
            raise InvalidRequestError(f"no open session {session_params['id']!r}; call /open_session first")
        return self.sessions[session_params["id"]]

    def _reap_sessions(self) -> None:
        while not self._stopped.wait(min(5.0, self.args.session_timeout / 2)):
            for sid, session in list(self.sessions.items()):
                if not session.busy and session.idle_for() > self.args.session_timeout:
                    logger.info("closing session %s: idle for %.0fs", sid, session.idle_for())
                    self.close_session(sid)

    def get_server_info(self) -> dict[str, Any]:
        stats = self.scheduler.call(self.scheduler.stats)
        args = {**vars(self.args), "api_key": "<set>" if self.args.api_key else None}  # never echo the key
        return {**args, **stats, "context_length": self.context_length,
                "max_total_num_tokens": self.pool.max_total_tokens,
                "compilations_after_warmup": compile_count() - self.compiles_at_ready}

    def shutdown(self) -> None:
        self._stopped.set()
        self.scheduler.stop()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    # ---- internals ----

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="jaxserve-engine-loop", daemon=True).start()
        return self._loop

    def _prepare(self, prompt, sampling_params, input_ids, rid, options, session=None) -> list[tuple[np.ndarray, SamplingParams, str]]:
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("give exactly one of `text` (prompt) and `input_ids`")
        if prompt is not None:
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise InvalidRequestError("`text` must be a string or a non-empty list of strings")
            id_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            id_lists = input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
        params_list = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(id_lists)
        rids = rid if isinstance(rid, list) else [rid] if rid is not None else [None] * len(id_lists)
        if len(params_list) != len(id_lists) or len(rids) != len(id_lists):
            raise InvalidRequestError("`sampling_params` and `rid` lists must match the number of prompts")
        if session is not None:
            first = params_list[0] if isinstance(params_list[0], dict) else {}
            if len(id_lists) != 1 or session.busy or first.get("n") not in (1, None):
                raise InvalidRequestError(f"session {session.id} takes one prompt at a time, with n=1")
            id_lists = [session.tokens.tolist() + list(id_lists[0])]
        return [(self._check_ids(ids), self._check_params(p, len(ids), options), r or uuid.uuid4().hex)
                for ids, p, r in zip(id_lists, params_list, rids)]

    def _check_ids(self, ids) -> np.ndarray:
        vocab = self.model.config.vocab_size
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError("the prompt is empty: give non-empty `text` or `input_ids`")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"`input_ids` must be integers in [0, {vocab})")
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; the context length is {self.context_length}: shorten it")
        return np.asarray(ids, np.int32)

    def _check_params(self, raw, prompt_len: int, options) -> SamplingParams:
        if raw is not None and not isinstance(raw, dict):
            raise InvalidRequestError("`sampling_params` must be an object")
        params = SamplingParams.from_dict(raw)
        params.validate(self.model.config.vocab_size)
        if len(params.stop_token_ids or []) + len(self.tokenizer.eos_token_ids) > self.scheduler.runner.max_stop_ids:
            raise InvalidRequestError(f"at most {self.scheduler.runner.max_stop_ids - len(self.tokenizer.eos_token_ids)} stop_token_ids")
        if not 0 <= options["top_logprobs_num"] <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]")
        if options["return_logprob"] and options["logprob_start_len"] >= prompt_len:
            raise InvalidRequestError(
                f"logprob_start_len {options['logprob_start_len']} must be below the prompt length {prompt_len}")
        return params

    def _request(self, ids, params: SamplingParams, rid: str, options, seed: int, on_output) -> Request:
        stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        return Request(rid, ids, params, seed, sorted(stop_ids), on_output,
                       return_logprob=options["return_logprob"], logprob_start_len=options["logprob_start_len"],
                       top_logprobs_num=options["top_logprobs_num"], session=options.get("session"))

    async def _outputs(self, ids, params, rid, options, seed) -> AsyncIterator[OutputCollector]:
        """Submit one request and yield its collector after every update, until finished."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        collector = OutputCollector(rid, self.tokenizer, params, prompt_tokens=len(ids),
                                    return_logprob=options["return_logprob"],
                                    return_text_in_logprobs=options["return_text_in_logprobs"],
                                    top_logprobs_num=options["top_logprobs_num"])
        req = self._request(ids, params, rid, options, seed, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        session = options.get("session")
        if session is not None:
            session.busy = True
        self.scheduler.submit(req)
        try:
            while not collector.finished:
                if collector.update(await queue.get()):
                    self.scheduler.abort(rid, collector.finish_reason)
                yield collector
        finally:
            if not collector.finished:  # the consumer went away: free the request's pages
                self.scheduler.abort(rid)
            if session is not None:
                if collector.finished and collector.finish_reason.get("type") != "abort":
                    session.tokens = np.concatenate([ids, np.asarray(collector.output_ids, np.int32)])
                session.busy, session.last_used = False, time.monotonic()

    def _seed(self, params: SamplingParams, branch: int) -> int:
        return params.sampling_seed + branch if params.sampling_seed is not None else next(self._seeds)

    async def _run(self, ids, params: SamplingParams, rid: str, options) -> list[dict]:
        if params.n == 1:
            return [await self._final(ids, params, rid, options, self._seed(params, 0))]
        # n > 1: prefill the prompt once so that every branch shares its pages via the radix cache.
        prefill = SamplingParams.from_dict({"max_new_tokens": 0})
        await self._final(ids, prefill, rid + "-prefill", {**options, "return_logprob": False}, 0)
        branch = SamplingParams(**{**params.__dict__, "n": 1})
        return list(await asyncio.gather(*(
            self._final(ids, branch, f"{rid}-{i}", options, self._seed(params, i)) for i in range(params.n))))

    async def _final(self, ids, params, rid, options, seed) -> dict:
        collector = None
        async for collector in self._outputs(ids, params, rid, options, seed):
            pass
        return collector.result()

    async def _stream(self, ids, params, rid, options) -> AsyncIterator[dict]:
        async for collector in self._outputs(ids, params, rid, options, self._seed(params, 0)):
            yield collector.result()


def _sync_iter(agen, loop) -> Iterator[dict]:
    try:
        while True:
            try:
                yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
            except StopAsyncIteration:
                return
    finally:
        asyncio.run_coroutine_threadsafe(agen.aclose(), loop).result()
