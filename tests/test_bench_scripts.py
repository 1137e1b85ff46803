"""The engine benchmarks and the soak run end to end in their --quick mode, so they cannot rot."""

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("script,expect", [
    ("scripts/bench_offline.py", "transformers generate"),
    ("scripts/bench_prefix.py", "throughput ratio on/off"),
    ("scripts/bench_host_overhead.py", "device-idle gap"),
    ("scripts/bench_prefill.py", "one long prompt tok/s"),
    ("scripts/bench_constrained.py", "constrained/unconstrained throughput ratio"),
    ("scripts/bench_lang.py", "lang speed-up over raw calls"),
    ("scripts/soak.py", "soak: ok"),  # mixed hostile load on a real server; exits 1 if a check fails
])
def test_bench_quick(script, expect, tmp_path_factory):
    # One persistent compilation cache for every script: their engines share many shapes.
    cache = tmp_path_factory.getbasetemp() / "bench-jax-cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout
