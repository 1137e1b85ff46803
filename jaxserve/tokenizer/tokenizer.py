"""`Tokenizer`: a Rust `tokenizers.Tokenizer` (no torch) with special tokens and a chat template.

It loads from an HF tokenizer directory or from the metadata of a GGUF file (gguf.py),
renders chat templates (chat.py), and can save itself as an HF directory.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from jaxserve.tokenizer.bytelevel import token_bytes
from jaxserve.tokenizer.chat import read_template, render_chat
from jaxserve.tokenizer.gguf import bos_processor, read_gguf_tokenizer

# Tokens chat templates use to end a turn. When the template emits one that the vocabulary
# marks special, generation must stop on it even if the model's eos is another token.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """A text tokenizer with special-token ids and a chat template."""

    def __init__(
        self,
        tokenizer: RustTokenizer,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None = None,
        pad_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self._extra_eos = set(extra_eos_token_ids)
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )

    @property
    def rust(self) -> RustTokenizer:
        """The wrapped Rust tokenizer (for `tokenizers.decoders.DecodeStream`)."""
        return self._tok

    @functools.cached_property
    def byte_table(self) -> list[bytes | str] | None:
        """Each token's bytes (an added token's content as `str`) when the vocabulary is
        plain byte-level, else None (see bytelevel.py)."""
        return token_bytes(self._tok)

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Build the byte-level BPE tokenizer described by a GGUF file's metadata."""
        tok, bos, eos, template, pad = read_gguf_tokenizer(path)
        return cls(tok, bos, eos, template, pad_token=pad)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF tokenizer directory (tokenizer.json + tokenizer_config.json)."""
        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json")
        tok = RustTokenizer.from_file(str(root / "tokenizer.json"))

        def read_json(name: str) -> dict[str, Any]:
            file = root / name
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}

        config = read_json("tokenizer_config.json")
        bos = _token_content(config.get("bos_token"))
        eos = _token_content(config.get("eos_token"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates; the default one is for chat
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        # tokenizer.json's post-processor usually adds bos already; the config flag only
        # matters where it asks for bos that the post-processor does not add.
        bos_id = tok.token_to_id(bos) if bos else None
        if config.get("add_bos_token") and bos_id is not None:
            if tok.encode("", add_special_tokens=True).ids[:1] != [bos_id]:
                tok.post_processor = bos_processor(bos, bos_id)
        gen_eos = read_json("generation_config.json").get("eos_token_id")
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return cls(tok, bos, eos, template, _token_content(config.get("pad_token")), extra)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json so that `from_dir` restores this."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(root / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",  # lets transformers load it too
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # -- ids --------------------------------------------------------------------------------

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` prepends bos."""
        ids = self._tok.encode("", add_special_tokens=True).ids
        return self.bos_token_id is not None and ids[:1] == [self.bos_token_id]

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self._tok.token_to_id(self.pad_token) if self.pad_token else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, generation_config's extra ones, and the special token
        the chat template ends each turn with."""
        ids = set(self._extra_eos)
        if self.eos_token and (eos := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(eos)
        for token in _TURN_END_TOKENS:
            i = self._tok.token_to_id(token)
            if i in self.special_token_ids and token in (self.chat_template or ""):
                ids.add(i)
        return frozenset(ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.
        With `add_special_tokens`, bos is prepended only when the model asks for it."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Text of `ids`. `spaces_between_special_tokens` is accepted for SGLang's API and,
        as in SGLang with any Rust-backed tokenizer, has no effect."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Raw vocabulary strings (byte-level spelling, e.g. 'Ġthe')."""
        return [self._tok.id_to_token(i) for i in ids]

    def id_to_text(self, token_id: int) -> str:
        """Decoded text of one token, special tokens included (for logprob output). A token
        holding part of a multi-byte character decodes to U+FFFD."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template; token ids if `tokenize` (no extra bos:
        the template writes any special tokens it wants). Extra kwargs (tools, ...) are passed
        to the template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass one with chat_template=")
        text = render_chat(self.chat_template, messages, add_generation_prompt,
                           self.bos_token or "", self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_tokenizer(model_path: str | os.PathLike, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer of a `.gguf` file or an HF model directory. `chat_template`, a path
    to a jinja file (or inline jinja), replaces the model's own template."""
    path = Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        tokenizer = Tokenizer.from_gguf(path)
    elif path.is_dir():
        tokenizer = Tokenizer.from_dir(path)
    else:
        raise FileNotFoundError(f"{model_path}: neither a .gguf file nor a model directory")
    if chat_template is not None:
        tokenizer.chat_template = read_template(chat_template)
    return tokenizer
