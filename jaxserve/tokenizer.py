"""Tokenizer, chat template and incremental detokenizer.

`Tokenizer` wraps a Rust `tokenizers.Tokenizer` (no torch). It loads from an HF tokenizer
directory or from the metadata of a GGUF file, renders chat templates with a sandboxed
jinja2, and can save itself as an HF directory. `IncrementalDetokenizer` turns a stream of
generated ids into text chunks that never split a UTF-8 character.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2.sandbox
from jinja2.ext import loopcontrols
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

REPLACEMENT_CHAR = "\ufffd"

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Tokens chat templates use to end a turn. When the template emits one that the vocabulary
# marks special, generation must stop on it even if the model's eos is another token.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eom_id|>")

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


def _bos_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_template(value: str) -> str:
    """A chat template given as a path to a jinja file, or inline jinja text."""
    if os.path.isfile(value):
        return Path(value).read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"chat template {value!r} is neither a file nor a jinja template")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # HF overrides jinja's tojson: no HTML escaping and non-ASCII kept, which templates rely on.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and flatten text-part content lists to plain strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}]['role'] must be a non-empty string")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ValueError(
                        f"messages[{i}]['content'][{j}] must be {{'type': 'text', 'text': str}}"
                    )
                texts.append(part["text"])
            # Same joining as vLLM's OpenAI server for templates that expect a string.
            content = "\n".join(texts)
        elif content is None and message.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of text parts")
        checked.append({**message, "content": content})
    return checked


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

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
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
            tok.post_processor = _bos_processor(bos, vocab[bos])
        return cls(tok, bos, token("eos_token_id"), get("tokenizer.chat_template"),
                   pad_token=token("padding_token_id"))

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
                tok.post_processor = _bos_processor(bos, bos_id)
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
        text = _compile_template(self.chat_template).render(
            messages=_validate_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
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
        tokenizer.chat_template = _read_template(chat_template)
    return tokenizer


class IncrementalDetokenizer:
    """Streams generated ids to text, one chunk per `add`, never splitting a character.

    Keeps a short window of ids: `[0, read)` was already emitted, `[read, end)` is pending.
    Each step decodes the window with and without the pending ids and emits the difference,
    so a token whose text depends on its predecessor (leading spaces) comes out right, and
    pending bytes of an unfinished UTF-8 character (decoded as a trailing U+FFFD) wait for
    the rest. Work per token is bounded by the window, not by the text length.
    """

    # Prompt ids kept as context for the first generated token (its leading space may
    # depend on what precedes it).
    CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = list(prompt_ids or [])[-self.CONTEXT:]
        self._read = len(self._window)
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed generated id(s); returns the newly completed text (possibly "")."""
        self._window.extend([ids] if isinstance(ids, int) else ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character becomes U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self._window[: self._read])
        after = self._decode(self._window)
        if not final and (after.endswith(REPLACEMENT_CHAR) or len(after) < len(before)):
            return ""  # wait for the rest of a character
        delta = after[len(before):]
        if delta:
            # The ids just read become the context of the next step. Ids that added no text
            # (skipped special tokens) are no context: they stay behind the older one.
            self._window = self._window[self._read:]
        self._read = len(self._window)
        self.text += delta
        return delta
