"""Bounds on what clients can make the server hold: the request queue, open sessions,
body size, prompt length; and the operator-facing odds and ends (`/clear_radix_cache`,
SGLang's flag aliases, a suggestion for a mistyped flag)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest

from jaxserve.config import ServerArgs
from jaxserve.errors import InvalidRequestError
from tests.server_harness import running_server

QUEUE = 8
GEN = {"input_ids": list(range(100, 140)),
       "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # The harness's shapes (32 running requests), so the compiled programs come from the cache.
    with running_server(tmp_path_factory, max_queued_requests=QUEUE, max_sessions=2,
                        max_request_body_bytes=4096) as server:
        yield server


def test_a_full_queue_answers_503_fast_and_admitted_requests_complete(server):
    async def one(client: httpx.AsyncClient):
        start = time.monotonic()
        r = await client.post("/generate", json=GEN)
        return r, time.monotonic() - start

    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(96)))

    results = asyncio.run(burst())
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code == 503]
    assert len(ok) + len(refused) == 96
    assert refused and len(ok) >= QUEUE, (len(ok), len(refused))
    for r, seconds in refused:
        assert r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]["message"]
        assert seconds < 5  # refused at once, not after waiting for the queue
    for r in ok:
        assert r.json()["meta_info"]["completion_tokens"] == 64
    info = httpx.get(server.url + "/get_server_info", timeout=30).json()
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == 0
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"]
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_sessions_bodies_and_prompts_are_bounded(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sids = [http.post("/open_session", json={}).json() for _ in range(2)]
        third = http.post("/open_session", json={})
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "--max-sessions" in third.json()["error"]["message"]
        for sid in sids:
            assert http.post("/close_session", json={"session_id": sid}).status_code == 200
        assert http.post("/open_session", json={}).status_code == 200  # room again

        big = {"text": "x" * 5000, "sampling_params": {"max_new_tokens": 1}}
        r = http.post("/generate", json=big)
        assert r.status_code == 413 and "--max-request-body-bytes" in r.json()["error"]["message"]
        streamed = http.post("/generate", content=(b"x" * 1000 for _ in range(6)))  # no Content-Length
        assert streamed.status_code == 413
        assert http.post("/generate", json=GEN).status_code == 200  # and the server goes on

        assert http.post("/clear_radix_cache").json()["success"] is True
    engine = server.app.state.server.engine
    with pytest.raises(InvalidRequestError, match="characters, more than any"):
        engine.generate(prompt="y" * (engine._max_prompt_chars + 1))


def test_a_client_that_stops_reading_holds_no_pages_and_loses_nothing(server):
    """A streaming client that stops reading: the engine finishes the request and frees its
    KV anyway (what waits for the client is its output, bounded by max_new_tokens), other
    requests are served meanwhile, and when the client reads again it gets every token."""
    body = {"input_ids": list(range(200, 230)),
            "sampling_params": {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}
    expected = httpx.post(server.url + "/generate", json=body, timeout=120).json()["text"]
    payload = json.dumps({**body, "stream": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, so the server's sends back up
    sock.settimeout(120)
    sock.connect((host, int(port)))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    received = sock.recv(1024)  # the headers and the first event, then nothing for a while
    assert received.startswith(b"HTTP/1.1 200")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        other = http.post("/generate", json=GEN)  # served while that client is stalled
        assert other.status_code == 200 and other.json()["meta_info"]["completion_tokens"] == 64
        deadline = time.monotonic() + 60
        while True:  # the stalled request finishes in the engine and its pages are released
            info = http.get("/get_server_info").json()
            if info["num_running_reqs"] == 0 and info["locked_pages"] == info["private_pages"] == 0:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
    chunks = [received]
    while not b"".join(chunks).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):  # the rest, chunked
        received = sock.recv(65536)
        assert received, "the server closed the stream early"
        chunks.append(received)
    sock.close()
    events = re.findall(rb"data: (\{.*?\})\n\n", _dechunk(b"".join(chunks)))
    last = json.loads(events[-1])
    assert last["meta_info"]["finish_reason"]["type"] == "length"
    assert last["meta_info"]["completion_tokens"] == 200 and last["text"] == expected  # every token, in order


def _dechunk(raw: bytes) -> bytes:
    """The body of an HTTP/1.1 response in chunked transfer encoding."""
    rest = raw.split(b"\r\n\r\n", 1)[1]
    body = b""
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return body
        body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]


def test_cli_aliases_and_a_mistyped_flag():
    out = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--max-runing-requests", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "did you mean --max-running-requests?" in out.stderr
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_cli(parser.parse_args(["--tensor-parallel-size", "2", "--dtype", "half",
                                                  "--trust-remote-code"]))
    assert (args.tp_size, args.dtype) == (2, "float16")
