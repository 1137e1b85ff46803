"""Engine: the in-process API (sync, async, streaming) over the scheduler thread.

Requests and responses have the shapes of SGLang's `/generate`. The HTTP server, the
notebooks and the frontend language all come through here:

    gen = await engine.prepare(text=..., sampling_params=...)   # validate, tokenize off the loop
    async for index, delta in engine.run(gen): ...                # deltas of every branch

`generate` / `async_generate` build SGLang's response dicts on top of that.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any, AsyncIterator, Iterator

from jaxserve.config import ServerArgs
from jaxserve.constrained import GrammarCompiler
from jaxserve.engine.build import build
from jaxserve.engine.fanout import Fanout
from jaxserve.engine.inputs import GenerateInput, LogprobOptions, check_input, split_prompts
from jaxserve.engine.profiler import Profiler
from jaxserve.engine.responses import ResponseBuilder
from jaxserve.engine.sessions import Sessions
from jaxserve.errors import EngineOverloadedError, EngineUnavailableError, InvalidRequestError
from jaxserve.memory import export_tree
from jaxserve.runner import compile_count
from jaxserve.sampling import SamplingParams
from jaxserve.scheduler import RequestOutput


class Engine:
    """`Engine(model_path=None, **server_args)`; see `ServerArgs` for the knobs."""

    def __init__(self, model_path: str | None = None, **server_args):
        parts = build(ServerArgs.from_kwargs(model_path=model_path, **server_args))
        self.args, self.model, self.pool = parts.args, parts.model, parts.pool
        self.tokenizer = self.model.tokenizer
        self.context_length = parts.context_length
        self.compiles_at_ready = parts.compiles_at_ready
        self.scheduler = parts.scheduler
        self.scheduler.start()
        self.sessions = Sessions(self.scheduler, self.args.session_timeout, self.args.max_sessions)
        self.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size,
                                        json_whitespace=self.args.constrained_json_whitespace_pattern)
        self.profiler = Profiler(self.args.profile_dir)  # /start_profile, /stop_profile
        # No token covers more characters than the longest vocabulary entry (in its surface
        # form), so a longer text than this is over the context whatever it tokenizes to.
        longest = max(map(len, self.tokenizer.rust.get_vocab(with_added_tokens=True)))
        self._max_prompt_chars = self.context_length * longest
        self._seeds = itertools.count(self.args.random_seed * 1_000_003 + 1)
        self._active: dict[str, Fanout] = {}  # by the client's rid
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_streams = 0
        self._lock = threading.Lock()
        self._stopped = False

    # ---- the core API: validate, then stream deltas ----

    async def prepare(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                      logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False, rid=None,
                      session_params=None) -> GenerateInput:
        """Validate one `/generate` call and tokenize its text, off the event loop."""
        options = LogprobOptions(return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs)
        return await asyncio.to_thread(self._prepare, prompt, input_ids, sampling_params, rid, options, session_params)

    def _prepare(self, prompt, input_ids, sampling_params, rid, options, session_params) -> GenerateInput:
        texts, id_lists, batched = split_prompts(prompt, input_ids)
        if texts is not None:
            for text in texts:  # refuse what cannot fit before spending time tokenizing it
                if len(text) > self._max_prompt_chars:
                    raise InvalidRequestError(f"the prompt has {len(text)} characters, more than any "
                                              f"{self.context_length}-token context holds; shorten it")
            id_lists = [self.tokenizer.encode(t) for t in texts]
        gen = check_input(id_lists, sampling_params, rid, options, self.sessions.get(session_params), batched,
                          vocab_size=self.model.config.vocab_size, context_length=self.context_length,
                          num_eos=len(self.tokenizer.eos_token_ids))
        gen.grammars = [self.grammars.get(spec) if spec is not None else None for spec in gen.specs]
        return gen

    async def run(self, gen: GenerateInput) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every branch's deltas as they come, `(branch index, delta)`; each branch ends with
        a finished one. Closing the iterator early aborts what has not finished."""
        if not self.healthy:
            raise EngineUnavailableError(self.unavailable_reason)
        taken = [r for r in gen.rids if r in self._active]
        if taken:
            raise InvalidRequestError(f"rid {taken[0]!r} is already in use; give each request a unique rid")
        bound = self.args.max_queued_requests
        if bound is not None and self.scheduler.num_queued() + gen.num_branches > bound:
            raise EngineOverloadedError(f"the request queue is full ({bound} waiting, --max-queued-requests); "
                                        "retry later")
        if gen.session is not None:
            gen.session.begin_turn()
        fanout = Fanout(self, gen)
        for rid in gen.rids:
            self._active[rid] = fanout
        try:
            async for item in fanout.stream():
                yield item
        finally:
            for rid in gen.rids:
                if self._active.get(rid) is fanout:
                    del self._active[rid]

    # ---- SGLang-shaped results ----

    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, return_text_in_logprobs: bool = False,
                 rid: str | list[str] | None = None, stream: bool = False, session_params: dict | None = None):
        """Blocking `/generate`: a dict, a list of dicts (list input or n > 1), or an iterator when streaming."""
        kwargs = dict(prompt=prompt, sampling_params=sampling_params, input_ids=input_ids,
                      return_logprob=return_logprob, logprob_start_len=logprob_start_len,
                      top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs,
                      rid=rid, stream=stream, session_params=session_params)
        if not self.healthy:
            raise EngineUnavailableError(self.unavailable_reason)
        loop = self._private_loop()
        result = asyncio.run_coroutine_threadsafe(self.async_generate(**kwargs), loop).result()
        if not stream:
            return result
        with self._lock:
            self._sync_streams += 1  # the private loop outlives shutdown until this stream ends
        return self._sync_iter(result, loop)

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                             logprob_start_len=-1, top_logprobs_num=0, return_text_in_logprobs=False,
                             rid=None, stream=False, session_params=None):
        """Async `/generate`; with `stream=True` an async iterator of response dicts (cumulative
        text, logprob entries new since the previous one)."""
        gen = await self.prepare(prompt, sampling_params, input_ids, return_logprob, logprob_start_len,
                                 top_logprobs_num, return_text_in_logprobs, rid, session_params)
        if stream:
            if gen.num_branches != 1:
                raise InvalidRequestError("stream=true takes one prompt with n=1")
            return self._stream(gen)
        builders = self.builders(gen)
        async for index, out in self.run(gen):
            builders[index].add(out)
        results = [b.final() for b in builders]
        return results if gen.batched or len(results) > 1 else results[0]

    def builders(self, gen: GenerateInput) -> list[ResponseBuilder]:
        """One response builder per branch, in branch order."""
        return [ResponseBuilder(gen.branch_rid(p, j), gen.logprobs, self.tokenizer)
                for p, params in enumerate(gen.params) for j in range(params.n)]

    async def _stream(self, gen: GenerateInput) -> AsyncIterator[dict]:
        builder = self.builders(gen)[0]
        async for _, out in self.run(gen):
            builder.add(out)
            yield builder.chunk()

    # ---- control ----

    def seed_for(self, params: SamplingParams, branch: int) -> int:
        return params.sampling_seed + branch if params.sampling_seed is not None else next(self._seeds)

    def abort(self, rid: str) -> bool:
        """Abort the call a client named `rid` (all its branches), or one scheduler request;
        whether `rid` named a call of this engine."""
        fanout = self._active.get(rid)
        for target in list(fanout.rids) if fanout is not None else [rid]:
            self.scheduler.abort(target)
        return fanout is not None

    def abort_all(self) -> int:
        fanouts = set(self._active.values())
        for fanout in fanouts:
            for target in list(fanout.rids):
                self.scheduler.abort(target)
        return len(fanouts)

    def flush_cache(self) -> bool:
        """Drop every unlocked radix-cache entry; True if nothing is running."""
        def flush():
            if self.scheduler.running or self.scheduler.waiting:
                return False
            if self.scheduler.hicache is not None:
                self.scheduler.hicache.flush()  # the host tier too (storage keeps its files)
            else:
                self.scheduler.cache.flush()
            return True

        return self.scheduler.call(flush)

    def open_session(self, capacity_of_str_len: int | None = None, session_id: str | None = None) -> str:
        """Start a conversation whose KV stays cached between turns; returns its id."""
        return self.sessions.create(capacity_of_str_len, session_id)

    def close_session(self, session_id: str) -> None:
        """Let a session's KV go (it stays in the radix cache as evictable)."""
        self.sessions.close(session_id)

    @property
    def healthy(self) -> bool:
        return self.scheduler.alive and not self._stopped

    @property
    def unavailable_reason(self) -> str | None:
        """Why the engine takes no requests (None while it does)."""
        if self.healthy:
            return None
        return "the engine is shut down" if self._stopped else self.scheduler.unavailable_reason()

    def get_server_info(self) -> dict[str, Any]:
        stats = self.scheduler.call(self.scheduler.stats)
        args = {**vars(self.args), "api_key": "<set>" if self.args.api_key else None}  # never echo the key
        return {**args, **stats, **self.grammars.stats(), "page_size": self.args.page_size,
                "context_length": self.context_length, "max_total_num_tokens": self.pool.max_total_tokens,
                "compilations_after_warmup": compile_count() - self.compiles_at_ready}

    def cache_summary(self) -> dict[str, Any]:
        """Radix-cache counters for `/health`, read without waiting for the scheduler thread
        (each is one attribute read, so a probe never queues behind a step): nodes, the
        nodes where cached sequences branch (`shared_prefix_nodes`) and the mean length in
        tokens of those shared prefixes, and for each tier the fraction of looked-up prompt
        tokens it supplied (storage hits come up through the host, so they count in both)."""
        cache, hicache = self.scheduler.cache, self.scheduler.hicache
        looked_up = max(cache.hit_tokens + cache.miss_tokens, 1)
        out = {"nodes": cache.num_nodes, "shared_prefix_nodes": cache.shared_nodes,
               "mean_shared_prefix_tokens": round(cache.mean_shared_depth, 2), "hit_rate": round(cache.hit_rate, 4),
               "device_hit_tokens": cache.hit_tokens}
        tiers = {"device": cache.hit_tokens}
        if hicache is not None:
            page = cache.page_size
            host, storage = hicache.counters["h2d_pages"] * page, hicache.counters["storage_read_pages"] * page
            out.update(host_hit_tokens=host, storage_hit_tokens=storage)
            tiers.update(host=host, storage=storage)
        out["hit_rate_by_tier"] = {tier: round(tokens / looked_up, 4) for tier, tokens in tiers.items()}
        return out

    def radix_tree(self, head: int = 16) -> dict[str, Any]:
        """The radix cache as nested plain data (JSON-able): the page counts and the root
        node; each node has its size, hits, LRU time, lock state, the first `head` tokens
        of its edge (ids and text) and its children. An empty root with
        `disable_radix_cache`. Read on the scheduler thread, so it is one consistent state."""
        cache = self.scheduler.cache

        def snapshot():
            counts = {name: getattr(cache, name) for name in ("total_pages", "free_pages", "evictable_pages",
                                                              "locked_pages")}
            return counts, export_tree(cache, head)

        counts, rows = self.scheduler.call(snapshot)
        nodes: dict[int, dict[str, Any]] = {}
        for row in rows:  # depth first, so a parent comes before its children
            locked = row.lock_ref > 0
            nodes[row.id] = node = {
                "id": row.id, "num_tokens": row.num_tokens, "num_pages": row.num_pages, "host_pages": row.host_pages,
                "hits": row.hits,
                "last_access": row.last_access, "lock_ref": row.lock_ref, "locked": locked,
                "evictable": row.parent_id is not None and not locked and row.num_pages > 0, "head_tokens": list(row.head_tokens),
                "head_text": self.tokenizer.decode(row.head_tokens, skip_special_tokens=False),
                "children": []}
            if row.parent_id is not None:
                nodes[row.parent_id]["children"].append(node)
        return {"page_size": cache.page_size, **counts, "root": nodes[rows[0].id]}

    def shutdown(self) -> None:
        """Stop: in-flight work is aborted and every stream or call ends with an abort."""
        self._stopped = True
        self.sessions.stop()
        self.scheduler.stop()
        self.scheduler.runner.close()
        self.grammars.shutdown()
        with self._lock:
            if self._loop is not None and self._sync_streams == 0:
                self._loop.call_soon_threadsafe(self._loop.stop)

    # ---- the private event loop behind the blocking API ----

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="jaxserve-engine-loop", daemon=True).start()
            return self._loop

    def _sync_iter(self, agen, loop) -> Iterator[dict]:
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), loop).result()
            with self._lock:
                self._sync_streams -= 1
                if self._stopped and self._sync_streams == 0:
                    loop.call_soon_threadsafe(loop.stop)
