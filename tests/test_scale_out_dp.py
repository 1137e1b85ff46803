"""`--dp-size 2` on the bundled SmolLM2: two replica processes behind SGLang's own router
(`sglang-router`, Rust), started by `python -m jaxserve serve` like a user would.

The process group has a hard wall-clock limit; the module kills it whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.server_harness import free_port

FLAGS = ["--max-running-requests", "4", "--max-prefill-tokens", "128", "--chunked-prefill-size", "128",
         "--context-length", "512", "--log-level", "warning"]
START_LIMIT_S = 480
PAGE = 16


@pytest.fixture(scope="module")
def router_url(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("dp") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve", "serve", "--dp-size", "2", "--router-policy",
                             "cache_aware", "--port", str(port), *FLAGS], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            assert proc.poll() is None, _tail(log)
            assert time.monotonic() < deadline, "dp 2 did not start in time\n" + _tail(log)
            try:
                workers = httpx.get(url + "/get_loads", timeout=2).json()["workers"]
                if len(workers) == 2 and all(w["load"] >= 0 for w in workers):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-3000:]


def _generate(url: str, text: str, max_new_tokens: int = 8) -> dict:
    response = httpx.post(url + "/generate", json={"text": text, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0}}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_cache_aware_keeps_each_conversation_on_one_replica(router_url):
    """Two interleaved conversations: every turn of each finds the previous turn's prompt
    cached, which it could not on the other replica (round robin would alternate)."""
    topics = {"a": "Tell me about the history of the lighthouse keepers on the northern coast.",
              "b": "What are good habits for learning to play the violin as an adult?"}
    history = {k: f"User: {v}\nAssistant:" for k, v in topics.items()}
    cached = {k: [] for k in topics}
    prompts = {k: [] for k in topics}
    for turn in range(3):
        for k in topics:
            out = _generate(router_url, history[k])
            cached[k].append(out["meta_info"]["cached_tokens"])
            prompts[k].append(out["meta_info"]["prompt_tokens"])
            history[k] += out["text"] + f"\nUser: Tell me more, part {turn + 2}.\nAssistant:"
    for k in topics:
        for turn in (1, 2):
            # The previous turn's prompt is cached, up to its last partial page.
            assert cached[k][turn] >= prompts[k][turn - 1] - PAGE, (k, cached, prompts)
            assert cached[k][turn] > cached[k][turn - 1], (k, cached)


def test_greedy_outputs_equal_one_replica(router_url, smollm2_engine):
    prompts = ["The three primary colors are", "def fibonacci(n):", "Water boils at a temperature of"]
    for prompt in prompts:
        ours = _generate(router_url, prompt, max_new_tokens=16)
        alone = smollm2_engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0})
        assert ours["output_ids"] == alone["output_ids"], (prompt, ours["text"], alone["text"])


def test_openai_client_through_the_router(router_url):
    client = openai.OpenAI(base_url=router_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = httpx.get(router_url + "/v1/models", timeout=10).json()["data"][0]["id"]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text == client.completions.create(model=model, prompt="Once upon a time", max_tokens=6,
                                             temperature=0).choices[0].text
