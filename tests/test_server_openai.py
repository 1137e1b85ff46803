"""The `openai` client against a real server: chat and completions, streaming and not,
n=2, stop strings, logprobs, cached-token usage, errors."""

import openai
import pytest

from tests.server_harness import assert_idle_accounting, http, server  # noqa: F401 (fixtures)

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def stream_texts(chunks) -> dict[int, str]:
    texts: dict[int, str] = {}
    for c in chunks:
        for choice in c.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
    return texts


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]


def test_chat_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert stream_texts(chunks) == {0: choice.message.content}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(client.chat.completions.create(**kw, stream=True))  # no usage chunk unless asked for
    assert all(c.choices for c in plain) and stream_texts(plain) == {0: choice.message.content}


def test_completions_streaming_and_not(client):
    kw = dict(model="tiny", prompt="The capital of France is", max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(**kw, stream=True))
    assert all(len(c.choices) == 1 and isinstance(c.choices[0].text, str) for c in chunks)
    assert stream_texts(chunks) == {0: full.choices[0].text}
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_seeded_is_reproducible_streaming_or_not(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2, seed=7)
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    texts = {c.index: c.message.content for c in first.choices}
    assert sorted(texts) == [0, 1] and texts[0] != texts[1]
    assert {c.index: c.message.content for c in again.choices} == texts
    assert first.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert stream_texts(chunks) == texts
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]

    completions = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=4, n=2, seed=1)
    assert sorted(c.index for c in completions.choices) == [0, 1, 2, 3]


def test_repeated_prompt_reports_cached_tokens(client):
    prompt = "A long shared preamble about radix caches. " * 12  # ~100 tokens, unique to this test
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    second = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens  # whole pages only

    chat = [{"role": "system", "content": prompt}, {"role": "user", "content": "hi"}]
    client.chat.completions.create(model="tiny", messages=chat, max_tokens=2)
    again = client.chat.completions.create(model="tiny", messages=chat, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 16


def test_stop_string_truncates_streaming_and_not(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    expected = text[: text.find(stop)]
    stopped = client.completions.create(**kw, stop=[stop])
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    assert stream_texts(client.completions.create(**kw, stop=stop, stream=True)) == {0: expected}


def test_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and "".join(e.token for e in content) == out.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)  # greedy
    comp = client.completions.create(model="tiny", prompt="hello world", max_tokens=3, logprobs=2, echo=True)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text.startswith("hello world")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == comp.usage.prompt_tokens + 3
    assert lp.text_offset == sorted(lp.text_offset)


def test_extra_fields_are_honoured(client):
    out = client.completions.create(model="tiny", prompt="x", max_tokens=6, temperature=0.7,
                                    extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.01,
                                                "repetition_penalty": 1.1, "min_tokens": 6})
    assert out.usage.completion_tokens == 6
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3)
    assert out.usage.completion_tokens == 3


def test_errors_have_openai_shape(client, http):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-1)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": -3})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "max_tokens must be >= 0" in r.json()["error"]["message"]
    assert_idle_accounting(http)


def test_streamed_logprobs_and_usage_match_non_streamed(client):
    kw = dict(model="tiny", prompt="hello world", max_tokens=4, temperature=0, logprobs=2, echo=True)
    full = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(**kw, stream=True))
    assert stream_texts(chunks) == {0: full.text}
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == full.logprobs.tokens  # the prompt's, then each new one
    assert [o for lp in streamed for o in lp.text_offset] == full.logprobs.text_offset

    kw = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in full]

    # n > 1: the prompt counts once in the usage, every branch's tokens count
    one = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, n=1).usage
    three = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, n=3,
                                           extra_body={"ignore_eos": True}).usage
    assert three.prompt_tokens == one.prompt_tokens and three.completion_tokens == 9
