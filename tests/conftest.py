"""Test setup: CPU only, four virtual devices for the sharding tests."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved once per test session."""
    from jaxserve.tokenizer import load_tokenizer
    from jaxserve.weights.gguf_file import bundled_model_path
    from tests.hf_models import save_tiny_model

    path = tmp_path_factory.mktemp("tiny")
    save_tiny_model("llama3", path, seed=11, vocab_size=49152, max_position_embeddings=512)
    load_tokenizer(bundled_model_path()).save(path)
    return path


@pytest.fixture(scope="session")
def smollm2_engine():
    """One engine on the bundled SmolLM2-135M-Instruct for every module that needs the real
    model: building one (GGUF load and warm-up) takes over half a minute on two cores."""
    import jaxserve

    engine = jaxserve.Engine(max_running_requests=32, max_prefill_tokens=512, chunked_prefill_size=512,
                             context_length=1024)
    yield engine
    engine.shutdown()
