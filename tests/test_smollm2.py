"""The bundled SmolLM2-135M-Instruct GGUF against transformers loading the same file."""

import numpy as np
import pytest

from jaxserve.weights.gguf_file import BUNDLED_GGUF, bundled_model_path


@pytest.fixture(scope="module")
def hf_model():
    import torch
    import transformers

    path = bundled_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=BUNDLED_GGUF, dtype=torch.float32)


@pytest.fixture(scope="module")
def ours():
    from jaxserve.weights import load

    # float32 from the dequantized file, as transformers loads it (the engine's CPU default
    # keeps the Q4_1 blocks and re-quantizes the embedding: tests/test_quant_models.py)
    model = load(None, dtype="float32")
    assert np.dtype(model.dtype) == np.float32 and model.quant == {}
    return model


def test_config_from_gguf(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings


def test_logits_match_transformers(ours, hf_model):
    import torch

    ids = ours.tokenizer.encode("The quick brown fox jumps over the lazy dog. In 1969, humans first")
    ours_logits = ours.logits(ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours_logits - ref).max()
    assert err < 2e-3, err


def test_greedy_chat_matches_transformers(ours, hf_model):
    import torch

    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    ids = ours.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = ours.generate_greedy(ids, 32)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert got == ref, (ours.tokenizer.decode(got), ours.tokenizer.decode(ref))
    assert len(set(got)) > 5  # real text, not a repeated token
