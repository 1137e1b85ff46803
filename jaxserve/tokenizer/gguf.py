"""A Rust `tokenizers.Tokenizer` rebuilt from the tokenizer metadata of a GGUF file.

llama.cpp stores the vocabulary, merges, token types and the name of its pre-tokenizer
(`tokenizer.ggml.pre`) instead of a tokenizer.json; this module maps them back onto the
`tokenizers` pipeline so that encoding matches the model's own HF tokenizer.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes of llama.cpp's `tokenizer.ggml.pre` names, for byte-level vocabularies
# whose merges were learned on text split this way.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# StarCoder-family vocabularies (SmolLM among them) isolate every digit, then apply the
# GPT-2 split; HF's tokenizer.json spells that Digits(individual) + ByteLevel(use_regex).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


class GGUFTokenizer(NamedTuple):
    """What the `Tokenizer` constructor needs, as read from a GGUF file."""

    tokenizer: RustTokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    pad_token: str | None


def bos_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    """A post-processor that prepends `bos` to every encoding."""
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer that llama.cpp applies for this `tokenizer.ggml.pre` name."""
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _PRE_TOKENIZER_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; use an HF tokenizer directory")


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizer:
    """Build the byte-level BPE tokenizer described by a GGUF file's metadata."""
    import gguf  # only needed here; keeps `import jaxserve` light

    fields = gguf.GGUFReader(path).fields

    def get(key: str, default: Any = None) -> Any:
        return fields[key].contents() if key in fields else default

    if get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"{path}: GGUF tokenizer model {get('tokenizer.ggml.model')!r} is not supported "
            "(only byte-level BPE, 'gpt2'); use an HF tokenizer directory"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens")
    types: list[int] = get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges", [])]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # Control tokens are matched whole in raw text and dropped by skip_special_tokens;
    # user-defined ones (e.g. <think>) are matched whole but kept in decoded text, as HF does.
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types) if kind == _CONTROL
    ])
    tok.add_tokens([
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types) if kind == _USER_DEFINED
    ])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: special tokens are not all in the GGUF vocabulary")

    def token(key: str) -> str | None:
        i = get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    bos = token("bos_token_id")
    if get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = bos_processor(bos, vocab[bos])
    return GGUFTokenizer(tok, bos, token("eos_token_id"), get("tokenizer.chat_template"),
                         token("padding_token_id"))
