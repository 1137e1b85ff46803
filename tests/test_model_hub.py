"""`--model-path org/name` resolves through huggingface_hub: a model placed in a local HF
cache loads when the hub is unreachable or the machine is offline, and a model that is
in neither fails with an error naming both. Each case runs in a fresh process, since
huggingface_hub reads its environment when imported."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = "jaxserve-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD = ("import json, sys; from jaxserve.weights.loader import load; m = load(sys.argv[1], dtype='float32'); "
        "print(json.dumps({'path': str(m.model_path), 'layers': m.config.num_layers}))")


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory) -> Path:
    """A HF cache holding `REPO` (the tiny model) the way huggingface_hub lays one out."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def load(model_path: str, cache: Path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env = {**base, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-c", LOAD, model_path], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.parametrize("hub", ["unreachable", "offline"])
def test_a_model_in_the_local_cache_loads_without_the_hub(hub, hub_cache, tiny_dir):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    out = load(REPO, hub_cache, **env)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(loaded["path"]) == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert loaded["layers"] == json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]
    assert "loading weights: 100%" in out.stderr  # the progress bar


def test_a_model_in_neither_place_is_a_clear_error(hub_cache):
    port = closed_port()
    out = load("jaxserve-test/not-there", hub_cache, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()[-1]
    assert "FileNotFoundError" in message and "jaxserve-test/not-there" in message
    assert f"127.0.0.1:{port}" in message and str(hub_cache) in message  # the hub asked, the cache looked in
    local = load("./no/such/dir", hub_cache)
    assert "does not exist" in local.stderr  # a path, not a hub id
    cli = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--model-path", "jaxserve-test/not-there"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert cli.returncode == 1 and cli.stderr.strip().splitlines()[-1].startswith(
        "error: --model-path jaxserve-test/not-there: not a local path")  # a message, not a traceback
