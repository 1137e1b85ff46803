"""The engine benchmarks run end to end in their --quick mode, so they cannot rot."""

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
])
def test_bench_quick(script, expect):
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout
