"""scripts/bench_kernels.py --quick runs on CPU (interpret mode), so the script cannot rot."""

import os
import subprocess
import sys
from pathlib import Path


def test_bench_kernels_quick():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "### Validation against the jnp reference" in out and "False" not in out
    for kernel in ("triton", "tpu"):
        assert f"| {kernel} | ragged |" in out and f"| {kernel} | decode |" in out
    assert "### Decode" in out and "| pallas | 2 | 64 |" in out and "| reference | 1 | 32 |" in out
    assert "### Prefill" in out and "TFLOP/s" in out and "copy bandwidth" in out
