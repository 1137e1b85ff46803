"""`python -m jaxserve convert` round trip: identical logits, faster load than the GGUF."""

import subprocess
import sys
import time

import numpy as np

from jaxserve.weights import load


def test_convert_round_trip(tmp_path):
    out = tmp_path / "smollm2"
    subprocess.run([sys.executable, "-m", "jaxserve", "convert", "--output", str(out), "--dtype", "float32"],
                   check=True, timeout=600)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()

    start = time.perf_counter()
    from_gguf = load(None, dtype="float32")
    gguf_seconds = time.perf_counter() - start
    start = time.perf_counter()
    converted = load(out, dtype="float32")
    orbax_seconds = time.perf_counter() - start
    print(f"load time: GGUF {gguf_seconds:.2f}s, converted orbax checkpoint {orbax_seconds:.2f}s")

    ids = converted.tokenizer.encode("Converted checkpoints load straight into their shardings.")
    assert ids == from_gguf.tokenizer.encode("Converted checkpoints load straight into their shardings.")
    np.testing.assert_array_equal(converted.logits(ids), from_gguf.logits(ids))
    assert orbax_seconds < gguf_seconds
