"""Engine behaviour on a tiny random Llama (SmolLM2's tokenizer): invariance of greedy
output under caching, chunking, batching and retraction; logprobs; accounting; compiles."""

import numpy as np
import pytest

import jaxserve
from jaxserve.errors import InvalidRequestError
from tests.hf_models import hf_logits

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 49152, size=40).tolist()
    out = [shared + rng.integers(3, 49152, size=n).tolist() for n in (3, 17, 30, 1, 9, 50, 22, 5)]
    out += [rng.integers(3, 49152, size=n).tolist() for n in (7, 64, 12, 33, 2, 41, 19, 27)]
    return out  # 16 prompts, half sharing a 40-token prefix


def make_engine(tiny_dir, **kw):
    # One persistent compilation cache for every engine of the session: those of the same
    # shapes (radix cache off, overlap off, the same pool) compile nothing.
    args = dict(max_running_requests=16, max_prefill_tokens=128, chunked_prefill_size=128, context_length=256,
                dtype="float32", compilation_cache_dir=str(tiny_dir.parent / "engine-jax-cache"))
    return jaxserve.Engine(str(tiny_dir), **{**args, **kw})


def assert_idle_accounting(engine):
    info = engine.get_server_info()
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == 0
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
    assert info["locked_pages"] == 0
    return info


def greedy_outputs(engine, prompts, batched=True):
    if batched:
        return [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=GREEDY)]
    return [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    e = make_engine(tiny_dir)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def alone(engine, prompts):
    """Each prompt alone, radix cache flushed in between: the reference outputs."""
    out = []
    for p in prompts:
        engine.flush_cache()
        out.append(engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"])
    return out


def test_batch_of_16_equals_alone(engine, prompts, alone):
    engine.flush_cache()
    assert greedy_outputs(engine, prompts) == alone
    assert len({tuple(o) for o in alone}) > 8  # distinct, non-degenerate outputs
    assert_idle_accounting(engine)


def test_radix_cache_on_equals_off_and_reports_hits(tiny_dir, engine, prompts, alone):
    engine.flush_cache()
    first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
    second = engine.generate(input_ids=prompts[1], sampling_params=GREEDY)
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] == 32  # the shared 40 tokens, cut to whole pages
    assert greedy_outputs(engine, prompts, batched=False) == alone  # warm cache
    assert engine.flush_cache()
    assert engine.generate(input_ids=prompts[1], sampling_params=GREEDY)["meta_info"]["cached_tokens"] == 0
    off = make_engine(tiny_dir, disable_radix_cache=True)
    try:
        assert greedy_outputs(off, prompts) == alone
        assert all(r["meta_info"]["cached_tokens"] == 0
                   for r in off.generate(input_ids=prompts[:4], sampling_params=GREEDY))
        assert_idle_accounting(off)
    finally:
        off.shutdown()


# Each setting once (an engine costs ~20 s to build here); the overlap loop gets the ones
# that stress it (tiny chunks, reordering, sharding), the synchronous loop runs in every other test.
@pytest.mark.parametrize("overlap,kw", [
    (True, {"chunked_prefill_size": 8}), (False, {"chunked_prefill_size": -1}),
    (True, {"schedule_policy": "lpm", "max_running_requests": 4}), (True, {"tp_size": 2}),
], ids=["overlap-chunk8", "sync-unchunked", "overlap-lpm", "overlap-tp2"])
def test_chunking_lpm_and_tensor_parallel_equal_alone(tiny_dir, engine, prompts, alone, overlap, kw):
    e = make_engine(tiny_dir, disable_overlap_schedule=not overlap, **kw)
    try:
        assert greedy_outputs(e, prompts) == alone, kw
        assert_idle_accounting(e)
        if "tp_size" in kw:  # the pool is sized from what one device holds: half the KV heads
            assert e.pool.kv_bytes_per_token * 2 == engine.pool.kv_bytes_per_token
            assert e.pool.weights_bytes < engine.pool.weights_bytes
            assert e.pool.max_total_tokens >= engine.pool.max_total_tokens
    finally:
        e.shutdown()


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
def test_retraction_keeps_results(tiny_dir, prompts, alone, overlap):
    # 256 tokens of KV for 16 requests of up to ~90 tokens each: decode must retract.
    e = make_engine(tiny_dir, max_total_tokens=256, disable_overlap_schedule=not overlap)
    try:
        assert greedy_outputs(e, prompts) == alone
        info = assert_idle_accounting(e)
        assert info["num_retractions"] > 0
        assert info["compilations_after_warmup"] == 0
    finally:
        e.shutdown()


PENALISED = {**GREEDY, "repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3,
             "logit_bias": {"17": 2.0}}


def test_penalties_survive_retraction(tiny_dir, engine, prompts):
    """Penalty state is recounted when a retracted request is admitted again."""
    alone = []
    for p in prompts[:8]:
        engine.flush_cache()
        alone.append(engine.generate(input_ids=p, sampling_params=PENALISED)["output_ids"])
    plain = [engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts[:8]]
    assert alone != plain  # the penalties change the outputs
    e = make_engine(tiny_dir, max_total_tokens=256)  # 8 requests of up to ~90 tokens: retraction
    try:
        assert [r["output_ids"] for r in e.generate(input_ids=prompts[:8], sampling_params=PENALISED)] == alone
        assert assert_idle_accounting(e)["num_retractions"] > 0
    finally:
        e.shutdown()


def test_admission_reserves_pages_for_the_whole_pass(tiny_dir, prompts):
    """Four long prompts fit the step budget in 32-token chunks but not the pool together:
    one pass admits only what the pool can finish, so nothing is retracted."""
    rng = np.random.default_rng(3)
    long = [rng.integers(3, 49152, size=100).tolist() for _ in range(4)]
    params = {**GREEDY, "max_new_tokens": 8}
    e = make_engine(tiny_dir, max_total_tokens=256, chunked_prefill_size=32, max_prefill_tokens=128)
    try:
        together = [r["output_ids"] for r in e.generate(input_ids=long, sampling_params=params)]
        assert assert_idle_accounting(e)["num_retractions"] == 0
        e.flush_cache()
        assert together == [e.generate(input_ids=p, sampling_params=params)["output_ids"] for p in long]
    finally:
        e.shutdown()


def test_logprobs_match_transformers(engine, tiny_dir, prompts):
    prompt = prompts[3]
    engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0})  # cache the prefix
    r = engine.generate(input_ids=prompt, sampling_params=GREEDY, return_logprob=True, logprob_start_len=5,
                        top_logprobs_num=3)
    meta = r["meta_info"]
    full = prompt + r["output_ids"]
    ref = hf_logits(tiny_dir, full)
    ref = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    out_lp = [lp for lp, _, _ in meta["output_token_logprobs"]]
    expect_out = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(r["output_ids"])]
    np.testing.assert_allclose(out_lp, expect_out, atol=1e-4)
    inp = meta["input_token_logprobs"]
    assert [t for _, t, _ in inp] == prompt[5:]
    np.testing.assert_allclose([lp for lp, _, _ in inp], [ref[i - 1, prompt[i]] for i in range(5, len(prompt))],
                               atol=1e-4)
    top = meta["output_top_logprobs"][0]
    assert [t for _, t, _ in top] == list(np.argsort(-ref[len(prompt) - 1])[:3])
    first = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                            logprob_start_len=0)["meta_info"]["input_token_logprobs"]
    assert first[0][0] is None and len(first) == len(prompt)


def test_abort_and_prefill_only_leave_accounting_exact(engine, prompts):
    import threading

    from jaxserve.runner import compile_count

    compiles = compile_count()
    stream = engine.generate(input_ids=prompts[5], sampling_params={**GREEDY, "max_new_tokens": 150}, stream=True,
                             rid="to-abort")
    chunks = 0
    for chunk in stream:
        chunks += 1
        if chunks == 3:
            threading.Thread(target=engine.abort, args=("to-abort",)).start()
        last = chunk
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    r = engine.generate(input_ids=prompts[6], sampling_params={"max_new_tokens": 0})
    assert r["text"] == "" and r["meta_info"]["completion_tokens"] == 0
    again = engine.generate(input_ids=prompts[6], sampling_params={"max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] >= 32
    # a prefill small enough for a decode-sized bucket samples through the same programs
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["output_ids"]
    assert_idle_accounting(engine)
    assert compile_count() == compiles  # a mixed workload after warm-up compiles nothing


def test_stop_conditions_and_streaming_text(engine, prompts):
    base = engine.generate(input_ids=prompts[2], sampling_params=GREEDY)
    text = base["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = engine.generate(input_ids=prompts[2], sampling_params={**GREEDY, "stop": stop})
    assert cut["text"] == text[: text.find(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    token = base["output_ids"][4]
    by_id = engine.generate(input_ids=prompts[2], sampling_params={**GREEDY, "stop_token_ids": [token]})
    assert by_id["output_ids"] == base["output_ids"][: base["output_ids"].index(token) + 1]
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    pieces = [c["text"] for c in engine.generate(input_ids=prompts[2], sampling_params=GREEDY, stream=True)]
    assert pieces[-1] == text and all(text.startswith(p) for p in pieces)


@pytest.mark.parametrize("kwargs,match", [
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "bogus"),
    ({"input_ids": list(range(300))}, "context length"),
    ({"input_ids": [1, 10**9]}, "input_ids"),
    ({"input_ids": []}, "empty"),
    ({"prompt": "hi", "input_ids": [1]}, "exactly one"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3}, "logprob_start_len"),
])
def test_bad_requests_are_refused(engine, kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.generate(**kwargs)
    assert engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_session_keeps_conversation_locked(engine, prompts):
    sid = engine.open_session()
    first = engine.generate(input_ids=prompts[8], sampling_params=GREEDY, session_params={"id": sid})
    info = engine.get_server_info()
    assert info["locked_pages"] == (len(prompts[8]) + len(first["output_ids"]) - 1) // 16
    engine.flush_cache()  # flushing cannot drop a locked conversation
    second = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, session_params={"id": sid})
    history = len(prompts[8]) + len(first["output_ids"])
    assert second["meta_info"]["prompt_tokens"] == history + 3
    assert second["meta_info"]["cached_tokens"] == (history - 1) // 16 * 16
    alone = engine.generate(input_ids=prompts[8] + first["output_ids"] + [5, 6, 7], sampling_params=GREEDY)
    assert alone["output_ids"] == second["output_ids"]
    with pytest.raises(InvalidRequestError, match="no open session"):
        engine.generate(input_ids=[1], session_params={"id": "nope"})
    engine.close_session(sid)
    assert_idle_accounting(engine)


def test_prefill_progress_is_shared_with_later_requests(engine, alone):
    """A long shared prefix computed by one request's first chunk serves a request admitted
    while the first is still prefilling; outputs stay those of each prompt alone."""
    engine.flush_cache()
    rng = np.random.default_rng(1)
    shared = rng.integers(3, 49152, size=200).tolist()
    prompts = [shared + rng.integers(3, 49152, size=5).tolist() for _ in range(2)]
    both = engine.generate(input_ids=prompts, sampling_params=GREEDY)
    assert both[0]["meta_info"]["cached_tokens"] == 0
    assert both[1]["meta_info"]["cached_tokens"] >= 128  # the first chunk (budget 128) of request 0
    engine.flush_cache()
    assert [r["output_ids"] for r in both] == [
        engine.generate(input_ids=p, sampling_params=GREEDY)["output_ids"] for p in prompts]
    assert_idle_accounting(engine)


def test_consumer_loop_closing_mid_stream_aborts_only_that_request(engine, prompts):
    import asyncio
    import time

    async def read_one_chunk():
        stream = await engine.async_generate(input_ids=prompts[0], sampling_params={**GREEDY, "max_new_tokens": 200},
                                             stream=True)
        await stream.__anext__()

    asyncio.run(read_one_chunk())  # the loop closes with the request still running
    time.sleep(1.0)
    assert engine.scheduler._thread.is_alive()
    assert engine.generate(input_ids=prompts[1], sampling_params=GREEDY)["meta_info"]["completion_tokens"] == 24
    deadline = time.monotonic() + 10
    while engine.get_server_info()["num_running_reqs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_idle_accounting(engine)


def test_streamed_text_only_grows_with_stop_strings(engine, prompts):
    text = engine.generate(input_ids=prompts[4], sampling_params=GREEDY)["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    pieces = [c["text"] for c in engine.generate(input_ids=prompts[4], sampling_params={**GREEDY, "stop": stop},
                                                 stream=True)]
    assert pieces[-1] == text[: text.find(stop)]
    assert all(pieces[-1].startswith(p) for p in pieces)  # no piece showed text the stop later cut


def test_server_info_never_echoes_the_api_key(engine):
    engine.args.api_key = "secret-key"
    try:
        assert "secret-key" not in str(engine.get_server_info())
    finally:
        engine.args.api_key = None
