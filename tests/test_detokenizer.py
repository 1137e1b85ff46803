"""IncrementalDetokenizer against whole-sequence `decode`, on byte-level BPE (SmolLM2) and on
SentencePiece-style tokenizers trained here."""

import json
import time

import numpy as np
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import jaxserve.tokenizer.detokenizer as detokenizer
from jaxserve.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer, load_tokenizer
from jaxserve.weights.gguf_file import bundled_model_path

PIECES = [
    "Hello", " there", " world", ",", ".", " the", " a", "  ", "\n", "\t", "1", "42", " café",
    " naïve", "ß", "é", "Ångström", "中", "中文", "日本語", " 界", "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️",
    "\ufffd", " ",
]
SENTENCES = [
    "Hello there world, this is a small test.",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming text one token at a time keeps its spaces.",
    "hello world hello there café naïve Ångström ß",
    "中文 日本語 界 😀 👍🏽 ❤️ 1 42",
]


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """Byte-level: streamed through its table of token bytes."""
    tok = load_tokenizer(bundled_model_path())
    assert tok.byte_table is not None
    return tok


@pytest.fixture(scope="module")
def smol_stream() -> Tokenizer:
    """The same vocabulary through the generic DecodeStream path."""
    tok = load_tokenizer(bundled_model_path())
    tok.__dict__["byte_table"] = None  # the cached property: no table
    return tok


def _train(tok: RustTokenizer) -> RustTokenizer:
    trainer = trainers.BpeTrainer(vocab_size=180, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return tok


@pytest.fixture(scope="module")
def metaspace() -> Tokenizer:
    """SentencePiece-style: Metaspace pre-tokenizer and decoder, whose decode drops the
    leading space of a text."""
    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    return Tokenizer(_train(tok), "<s>", "</s>")


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    """Llama-2 style: unknown characters become <0xXX> byte tokens; the decoder chain is
    Replace, ByteFallback, Fuse, Strip."""
    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    spec = json.loads(_train(tok).to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    spec["model"]["byte_fallback"] = True
    tok = RustTokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    return Tokenizer(tok, "<s>", "</s>")


@pytest.fixture(params=["smol", "smol_stream", "metaspace", "byte_fallback"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["smol", "smol_stream"])
def byte_level(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def test_only_byte_level_vocabularies_get_a_byte_table(smol, metaspace, byte_fallback):
    assert smol.byte_table[smol.rust.token_to_id("Ġthe")] == b" the"
    assert smol.byte_table[2] == "<|im_end|>"  # an added token: its content
    assert metaspace.byte_table is None and byte_fallback.byte_table is None


def byte_fallback_decoder(tok: Tokenizer) -> bool:
    return "ByteFallback" in tok.rust.to_str()


def fresh_rng() -> tuple[np.random.Generator, int]:
    """A new random generator and its seed, to reproduce a failure."""
    seed = int(np.random.SeedSequence().entropy)
    return np.random.default_rng(seed), seed


def random_ids(tok: Tokenizer, rng: np.random.Generator, n_pieces: int) -> list[int]:
    """Encodings of random strings (emoji, CJK, accents, special tokens), some cut short so
    that a character's bytes end up split, special ids and random vocabulary ids."""
    specials = sorted(tok.special_token_ids)
    # A ByteFallback decoder turns a whole run of byte tokens into U+FFFDs once the run is
    # not valid UTF-8, changing text already streamed; it only gets well-formed text here
    # (prompt and output may still split a character between them).
    whole_only = byte_fallback_decoder(tok)
    ids: list[int] = []
    for _ in range(n_pieces):
        kind = rng.random()
        if kind < 0.1:
            ids.append(int(rng.choice(specials)))
        elif kind < 0.2 and not whole_only:
            size = int(rng.integers(1, 3))
            ids.extend(int(i) for i in rng.integers(0, tok.vocab_size, size=size))
        else:
            piece = tok.encode("".join(rng.choice(PIECES, size=int(rng.integers(1, 6)))))
            if not whole_only and rng.random() < 0.5:
                piece = piece[: int(rng.integers(0, len(piece) + 1))]
            ids.extend(piece)
    return ids


def stream(tok: Tokenizer, ids: list[int], rng: np.random.Generator, prompt=None, skip=True) -> str:
    """The streamed text of `ids`, fed one to three at a time."""
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    chunks, i = [], 0
    while i < len(ids):
        n = int(rng.integers(1, 4))
        chunks.append(detok.add(ids[i]) if n == 1 else detok.add(ids[i:i + n]))
        i += n
    chunks.append(detok.flush())
    assert "".join(chunks) == detok.text
    return detok.text


@pytest.mark.parametrize("skip", [True, False])
def test_random_streams_match_decode(tok, skip):
    rng, seed = fresh_rng()
    for _ in range(150):
        ids = random_ids(tok, rng, int(rng.integers(1, 8)))
        text = stream(tok, ids, rng, skip=skip)
        assert text == tok.decode(ids, skip_special_tokens=skip), (seed, ids)


@pytest.mark.parametrize("skip", [True, False])
def test_random_streams_after_prompt(tok, skip):
    rng, seed = fresh_rng()
    checked = 0
    for _ in range(150):
        ids = random_ids(tok, rng, int(rng.integers(2, 10)))
        cut = int(rng.integers(0, len(ids) + 1))
        prompt, output = ids[:cut], ids[cut:]
        before = tok.decode(prompt, skip_special_tokens=skip)
        whole = tok.decode(ids, skip_special_tokens=skip)
        if not whole.startswith(before):
            continue  # the output completes a character the prompt began: no clean split
        checked += 1
        text = stream(tok, output, rng, prompt=prompt, skip=skip)
        assert text == whole[len(before):], (seed, prompt, output)
    assert checked > 75


@pytest.mark.parametrize("name", ["metaspace", "byte_fallback"])
def test_first_token_keeps_its_space(request, name):
    tok = request.getfixturevalue(name)
    ids = tok.encode("Hello there world")
    assert tok.convert_ids_to_tokens(ids[-1:]) == ["▁world"]
    detok = IncrementalDetokenizer(tok, prompt_ids=ids[:-1])
    assert detok.add(ids[-1]) == " world"
    # without context the decoder drops it, as decode of the output alone does
    assert IncrementalDetokenizer(tok).add(ids[-1]) == "world" == tok.decode(ids[-1:])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(smol, skip):
    ids = smol.encode("Hi<|im_end|><|im_end|>\n<|im_start|>😀<|im_end|>")
    detok = IncrementalDetokenizer(smol, prompt_ids=smol.encode("<|im_start|>assistant\n"),
                                   skip_special_tokens=skip)
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == smol.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in chunks) != skip


def test_prompt_ends_inside_a_character(byte_level):
    smol = byte_level
    ids = smol.encode("a 😀 b")
    assert smol.decode(ids[:2]) == "a " + REPLACEMENT_CHAR  # the emoji's bytes span ids 1 and 2
    detok = IncrementalDetokenizer(smol, prompt_ids=ids[:2])
    # the character the output completes is output text; the prompt's space is not repeated
    assert [detok.add(i) for i in ids[2:]] + [detok.flush()] == ["😀", " b", ""]
    # a prompt that ends inside a character and gets no more of it: its U+FFFD is not repeated
    detok = IncrementalDetokenizer(smol, prompt_ids=ids[:2])
    assert detok.add(smol.encode(" x")) == " x" and detok.flush() == ""
    assert IncrementalDetokenizer(smol, prompt_ids=ids[:2]).flush() == ""
    # nor is a real U+FFFD that ends a prompt
    detok = IncrementalDetokenizer(smol, prompt_ids=smol.encode("x\ufffd"))
    assert detok.add(smol.encode(" y")) == " y"


def test_long_runs_stay_bounded(smol_stream):
    smol = smol_stream
    stray = smol.encode("😀")[-1]  # continuation bytes only: U+FFFD after U+FFFD
    ids = [*smol.encode("ok"), *[stray] * 300, *smol.encode(" end")]
    detok = IncrementalDetokenizer(smol)
    held = []
    for i in ids:
        detok.add(i)
        held.append(len(detok._held))
    assert detok.text + detok.flush() == smol.decode(ids)
    assert max(held) <= IncrementalDetokenizer.MAX_HELD
    # skipped special tokens never reach the stream
    detok = IncrementalDetokenizer(smol)
    assert [detok.add(i) for i in [*smol.encode("a"), *[2] * 300]] == ["a"] + [""] * 300
    assert detok._held == []


def test_decoder_that_rewrites_earlier_text(byte_fallback):
    # ByteFallback turns a byte run that stops being valid UTF-8 into U+FFFDs, changing text
    # already streamed; DecodeStream raises there, the detokenizer carries on.
    tok = byte_fallback
    byte = {b: tok.rust.token_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0xF0)}
    ids = [*tok.encode("x"), byte[0xC3], byte[0xA9], byte[0xF0], *tok.encode(" ok")]
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text.startswith("xé") and text.endswith(" ok")


def test_work_per_token_does_not_grow(smol_stream, monkeypatch):
    smol = smol_stream  # the byte-level path is a table lookup per token
    rng, _ = fresh_rng()
    ids: list[int] = []
    while len(ids) < 1000:
        ids += smol.encode("".join(rng.choice(PIECES, size=20)))
    ids = ids[:1000]
    prompt, output = ids[:50], ids[50:]
    calls = {"step": 0, "decode": 0}
    real_stream = detokenizer.DecodeStream

    class CountingStream:
        def __init__(self, *args, **kwargs):
            self._stream = real_stream(*args, **kwargs)

        def step(self, tokenizer, ids):
            calls["step"] += 1
            return self._stream.step(tokenizer, ids)

    decode = detokenizer.IncrementalDetokenizer._decode

    def counting_decode(self, ids):
        calls["decode"] += 1
        return decode(self, ids)

    with monkeypatch.context() as patch:
        patch.setattr(detokenizer, "DecodeStream", CountingStream)
        patch.setattr(detokenizer.IncrementalDetokenizer, "_decode", counting_decode)
        detok = IncrementalDetokenizer(smol, prompt_ids=prompt)
        for i in output:
            detok.add(i)
    # one step per id (and one for the end of a prompt that splits a character); decodes
    # only when the detokenizer starts
    assert calls["step"] <= len(output) + 1 and calls["decode"] <= 12

    def seconds(n: int) -> float:
        best = float("inf")
        for _ in range(5):
            detok = IncrementalDetokenizer(smol)
            start = time.perf_counter()
            for i in ids[:n]:
                detok.add(i)
            best = min(best, time.perf_counter() - start)
        return best

    assert seconds(1000) / seconds(500) < 2.6
