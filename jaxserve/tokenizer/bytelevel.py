"""Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): the bytes of every token, for fast streaming.

In a byte-level vocabulary every token spells raw bytes, one printable character per byte
(GPT-2's fixed byte-to-character map), and decoding is: map back to bytes, join, decode
UTF-8 with replacement. Added tokens (specials such as `<|im_end|>`) decode to their
content, between the byte runs. So with a table of each token's bytes, streaming text is a
table lookup and an incremental UTF-8 decoder per token: no decoder window, no context.
"""

from __future__ import annotations

import json
from functools import lru_cache


@lru_cache(maxsize=1)
def _char_to_byte() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte back to the byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in
    order, to the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(rust_tokenizer) -> list[bytes | str] | None:
    """Per token id: its bytes, or for an added token its content (a `str`); None when
    the tokenizer is not plain byte-level (its decoder does more than map bytes back)."""
    spec = json.loads(rust_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel" or spec.get("normalizer") not in (None, {}):
        return None
    char_to_byte = _char_to_byte()
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    table: list[bytes | str] = [b""] * rust_tokenizer.get_vocab_size(with_added_tokens=True)
    for token, i in rust_tokenizer.get_vocab(with_added_tokens=False).items():
        try:
            table[i] = bytes(char_to_byte[c] for c in token)
        except KeyError:  # a character outside the byte map: not a byte-level vocabulary
            return None
    for i, content in added.items():
        table[i] = content
    return table
