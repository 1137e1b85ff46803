"""Shared set-up of the server tests: a tiny random Llama with SmolLM2's tokenizer (and chat
template), a persistent compilation cache so that every module after the first starts in
seconds, and a real uvicorn server on a free port of 127.0.0.1.

Test modules import the `server` and `http` fixtures; being module-scoped, each module
gets its own server."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import httpx
import pytest

import jaxserve
from jaxserve.server import ServerThread

ENGINE_ARGS = dict(max_running_requests=32, max_prefill_tokens=256, chunked_prefill_size=128, context_length=512,
                   max_total_tokens=16384, dtype="float32")


def tiny_model_dir(tmp_path_factory, max_position_embeddings: int = 1024) -> Path:
    """The tiny model, saved once per test session (per position limit)."""
    path = tmp_path_factory.getbasetemp() / f"server-tiny-model-{max_position_embeddings}"
    if not (path / "config.json").exists():
        from jaxserve.tokenizer import load_tokenizer
        from jaxserve.weights.gguf_file import bundled_model_path
        from tests.hf_models import save_tiny_model

        save_tiny_model("llama3", path, seed=11, vocab_size=49152, max_position_embeddings=max_position_embeddings)
        load_tokenizer(bundled_model_path()).save(path)
    return path


def compilation_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.getbasetemp() / "server-jax-cache")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp_path_factory, **overrides):
    """An engine on the tiny model and a real HTTP server for it; yields the `ServerThread`."""
    engine = jaxserve.Engine(str(tiny_model_dir(tmp_path_factory)),
                             **{**ENGINE_ARGS, "compilation_cache_dir": compilation_cache_dir(tmp_path_factory),
                                "served_model_name": "tiny", **overrides})
    server = ServerThread(engine)
    try:
        yield server
    finally:
        server.stop()
        engine.shutdown()


def assert_idle_accounting(client) -> dict:
    """At idle every page is free, evictable or locked, and none is locked."""
    import time

    for _ in range(100):  # aborts reach the scheduler asynchronously
        info = client.get("/get_server_info").json()
        if info["num_running_reqs"] == info["num_waiting_reqs"] == 0 and info["locked_pages"] == 0:
            break
        time.sleep(0.1)
    assert info["num_running_reqs"] == info["num_waiting_reqs"] == 0, info
    assert info["free_pages"] + info["evictable_pages"] + info["locked_pages"] == info["total_pages"], info
    assert info["locked_pages"] == info["private_pages"] == 0, info
    return info


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """A real server on the tiny model, for one test module; it requires the module's
    `API_KEY` where the module sets one (the engine's shapes stay those of `ENGINE_ARGS`)."""
    api_key = getattr(request.module, "API_KEY", None)
    with running_server(tmp_path_factory, **({"api_key": api_key} if api_key else {})) as s:
        yield s


@pytest.fixture(scope="module")
def http(request, server):
    """An httpx client for `server` (sending the module's `API_KEY`, if any)."""
    api_key = getattr(request.module, "API_KEY", None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=server.url, timeout=60, headers=headers) as c:
        yield c
