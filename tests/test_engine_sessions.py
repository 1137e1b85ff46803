"""Sessions: one turn at a time, and pinned conversations that never block other work."""

import numpy as np
import pytest

import jaxserve
from jaxserve.errors import InvalidRequestError
from jaxserve.tokenizer import load_tokenizer
from jaxserve.weights.gguf_file import bundled_model_path
from tests.hf_models import save_tiny_model

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model("llama3", path, seed=5, vocab_size=49152, max_position_embeddings=512)
    load_tokenizer(bundled_model_path()).save(path)
    # 25 pages of 16 tokens: three 166-token conversations would pin more than all of it.
    e = jaxserve.Engine(str(path), max_running_requests=8, max_prefill_tokens=128, context_length=256,
                        max_total_tokens=400, dtype="float32")
    yield e
    e.shutdown()


def random_ids(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 49152, size=n).tolist()


def test_concurrent_turns_on_one_session_are_refused(engine):
    sid = engine.open_session()
    stream = engine.generate(input_ids=random_ids(1, 20), sampling_params={**GREEDY, "max_new_tokens": 60},
                             session_params={"id": sid}, stream=True)
    next(stream)
    with pytest.raises(InvalidRequestError, match="already has a turn in flight"):
        engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, session_params={"id": sid})
    for last in stream:
        pass
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    second = engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, session_params={"id": sid})
    assert second["meta_info"]["prompt_tokens"] == 20 + 60 + 3
    engine.close_session(sid)


def test_pinned_sessions_are_bounded_and_yield_to_other_requests(engine):
    total = engine.get_server_info()["total_pages"]
    sids = [engine.open_session() for _ in range(3)]
    histories = []
    for i, sid in enumerate(sids):
        ids = random_ids(10 + i, 150)
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, session_params={"id": sid})
        histories.append(ids + out["output_ids"])
        assert engine.get_server_info()["session_pinned_pages"] <= total // 2
    # A request that needs more than the unpinned part of the pool runs anyway: pinned
    # conversations give way.
    pinned = engine.get_server_info()["session_pinned_pages"]
    big = random_ids(99, 236)
    assert -(-(236 + 16) // 16) > total - pinned
    done = engine.generate(input_ids=big, sampling_params=GREEDY)
    assert done["meta_info"]["finish_reason"]["type"] == "length"
    assert engine.get_server_info()["session_pinned_pages"] < pinned
    # A session whose KV was evicted recomputes it and answers as if nothing happened.
    turn = engine.generate(input_ids=[7, 8, 9], sampling_params=GREEDY, session_params={"id": sids[0]})
    for sid in sids:
        engine.close_session(sid)
    engine.flush_cache()
    alone = engine.generate(input_ids=histories[0] + [7, 8, 9], sampling_params=GREEDY)
    assert turn["output_ids"] == alone["output_ids"]
    info = engine.get_server_info()
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
    assert info["locked_pages"] == 0 and info["session_pinned_pages"] == 0
