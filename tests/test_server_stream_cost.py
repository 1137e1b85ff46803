"""A streamed response costs linear time in its length: every OpenAI chunk carries only its
new text and logprob entries, and each token's logprob text is looked up once.

Streams `/v1/chat/completions` with top-20 logprobs for 500 and then 1000 tokens on a tiny
random model: the `id_to_text` calls per token are the same for both (a formatter that
re-walked the output would call it more per token the longer the output), and the SSE
bytes of 1000 tokens stay near twice those of 500 (quadratic would be ~4x)."""

from __future__ import annotations

import json

import httpx
import pytest

import jaxserve
from jaxserve.server import ServerThread
from tests.server_harness import compilation_cache_dir, tiny_model_dir

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    engine = jaxserve.Engine(str(tiny_model_dir(tmp_path_factory, max_position_embeddings=2048)), context_length=2048,
                             dtype="float32", max_running_requests=4, served_model_name="tiny",
                             compilation_cache_dir=compilation_cache_dir(tmp_path_factory))
    server = ServerThread(engine)
    try:
        yield engine, server
    finally:
        server.stop()
        engine.shutdown()


def chat(url: str, max_tokens: int, stream: bool, **extra) -> httpx.Response | tuple[str, int, int]:
    """Non-streaming: the response. Streaming: (content, SSE bytes received, completion tokens)."""
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, **extra}
    if not stream:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    raw = bytearray()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for piece in r.iter_bytes():
            raw += piece
    content, tokens = [], 0
    blocks = raw.decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    for block in blocks[:-2]:
        chunk = json.loads(block.removeprefix("data: "))
        for choice in chunk["choices"]:
            content.append(choice["delta"].get("content") or "")
            tokens += len((choice["logprobs"] or {}).get("content") or [])
        if chunk.get("usage"):
            assert chunk["usage"]["completion_tokens"] == tokens
    return "".join(content), len(raw), tokens


def test_stream_cost_is_linear(served, monkeypatch):
    engine, server = served
    calls = 0
    id_to_text = engine.tokenizer.id_to_text

    def counted(token_id: int) -> str:
        nonlocal calls
        calls += 1
        return id_to_text(token_id)

    monkeypatch.setattr(engine.tokenizer, "id_to_text", counted)
    per_token, sizes, contents = {}, {}, {}
    for max_tokens in (500, 1000):
        calls = 0
        content, size, tokens = chat(server.url, max_tokens, True, logprobs=True, top_logprobs=20,
                                     stream_options={"include_usage": True})
        assert tokens == max_tokens  # ignore_eos: exactly max_tokens, each with its logprob entry
        per_token[max_tokens], sizes[max_tokens], contents[max_tokens] = calls / tokens, size, content
    print(f"id_to_text calls per token: {per_token}; SSE bytes: {sizes} (ratio {sizes[1000] / sizes[500]:.3f})")
    assert per_token[500] == per_token[1000] == 21  # the token and its 20 alternatives, once each
    assert sizes[1000] < 2.3 * sizes[500]
    full = chat(server.url, 500, False).json()
    assert full["usage"]["completion_tokens"] == 500
    assert contents[500] == full["choices"][0]["message"]["content"]
