"""The engine cannot wedge: a dead scheduler thread, a failed step, a failed admission and
a shutdown with streams in flight each end every affected request promptly, with an
error, and (where the engine lives on) leave it serving with exact page accounting.

Faults are injected by making one of the engine's own functions raise, once."""

import gc
import threading
import time
import weakref

import pytest

import jaxserve
from jaxserve.errors import EngineUnavailableError

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
PROMPT = list(range(100, 140))


def make_engine(tiny_dir, **kw):
    args = dict(max_running_requests=8, max_prefill_tokens=64, context_length=256, dtype="float32")
    return jaxserve.Engine(str(tiny_dir), **{**args, **kw})


@pytest.fixture(scope="module")
def engine(tiny_dir):
    e = make_engine(tiny_dir, disable_overlap_schedule=False)  # the overlap loop: failures mid-flight
    yield e
    e.shutdown()


def assert_idle_accounting(engine):
    info = engine.get_server_info()
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == 0
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
    assert info["locked_pages"] == 0


class Injected(Exception):
    pass


def fail_once(obj, name, monkeypatch, before=None):
    """Make `obj.name` raise `Injected` on its next call (after `before(*args)`, if given)."""
    real = getattr(obj, name)
    calls = []

    def wrapper(*args, **kwargs):
        if calls:
            return real(*args, **kwargs)
        calls.append(1)
        if before is not None:
            before(*args)
        raise Injected(f"injected failure in {name}")

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def lose_pool(runner):
    """Run the step program on the pool (donating it) and drop its results, as a step that
    fails on the device would."""
    def run(batch):
        runner._forward(batch.layout, runner.param_leaves, runner.k_cache, runner.v_cache, runner.bounds,
                        runner.page_table, runner.rows.ints, batch.buf)
        assert runner.lost_state()
    return run


@pytest.mark.parametrize("pool_lost", [False, True], ids=["before-dispatch", "pool-lost"])
def test_failed_step_ends_only_its_requests(engine, monkeypatch, pool_lost):
    expected = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    runner = engine.scheduler.runner
    calls = fail_once(runner, "forward", monkeypatch, before=lose_pool(runner) if pool_lost else None)
    failed = engine.generate(input_ids=PROMPT, sampling_params=GREEDY)
    assert calls and failed["meta_info"]["finish_reason"]["type"] == "abort"
    assert "injected failure" in failed["meta_info"]["finish_reason"]["message"]
    assert engine.scheduler.runner.lost_state() is False  # re-created if the failure took it
    again = engine.generate(input_ids=[PROMPT, PROMPT[::-1]], sampling_params=GREEDY)
    assert again[0]["output_ids"] == expected
    assert engine.healthy
    assert_idle_accounting(engine)


def test_failed_admission_leaks_nothing(engine, monkeypatch):
    expected = engine.generate(input_ids=PROMPT[:20], sampling_params=GREEDY)["output_ids"]
    engine.flush_cache()
    fail_once(engine.scheduler.runner, "set_row", monkeypatch)
    results = engine.generate(input_ids=[PROMPT[:20], PROMPT[:20]], sampling_params=GREEDY)
    reasons = sorted(r["meta_info"]["finish_reason"]["type"] for r in results)
    assert reasons == ["abort", "length"]
    assert [r["output_ids"] for r in results if r["meta_info"]["finish_reason"]["type"] == "length"] == [expected]
    assert_idle_accounting(engine)


def test_a_shut_down_engine_frees_its_kv_pool(tiny_dir):
    """Nothing process-wide keeps a runner (its pool, its params) alive after shutdown: a
    notebook that makes engine after engine does not run out of memory."""
    e = make_engine(tiny_dir)
    e.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 4, "regex": "(yes|no)"})  # masks too
    runner = weakref.ref(e.scheduler.runner)
    e.shutdown()
    del e
    gc.collect()
    assert runner() is None


def test_shutdown_ends_every_stream_in_flight(tiny_dir):
    e = make_engine(tiny_dir)
    ends, started = [], threading.Barrier(5)

    def consume(i):
        stream = e.generate(input_ids=PROMPT[i:], sampling_params={**GREEDY, "max_new_tokens": 200}, stream=True)
        last = next(stream)
        started.wait(timeout=60)
        for last in stream:
            pass
        ends.append(last["meta_info"]["finish_reason"])

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    start = time.monotonic()
    e.shutdown()
    assert time.monotonic() - start < 10
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a stream never ended"
    assert [r["type"] for r in ends] == ["abort"] * 4
    with pytest.raises(EngineUnavailableError, match="shut down"):
        e.generate(input_ids=PROMPT, sampling_params=GREEDY)


class Killed(BaseException):
    """Escapes every `except Exception` guard, as a bug in the loop itself would."""


def test_dead_scheduler_fails_pending_requests_and_new_ones(tiny_dir, monkeypatch):
    e = make_engine(tiny_dir)
    try:
        stream = e.generate(input_ids=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 200}, stream=True)
        next(stream)

        def killed():
            raise Killed("injected death of the scheduler thread")

        monkeypatch.setattr(e.scheduler, "_iterate", killed)
        start = time.monotonic()
        for last in stream:
            pass
        assert time.monotonic() - start < 10
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert "scheduler died" in last["meta_info"]["finish_reason"]["message"]
        assert not e.healthy
        with pytest.raises(EngineUnavailableError, match="scheduler died"):
            e.generate(input_ids=PROMPT, sampling_params=GREEDY)
        with pytest.raises(EngineUnavailableError):
            e.get_server_info()
    finally:
        e.shutdown()
