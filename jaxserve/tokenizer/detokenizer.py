"""Incremental detokenization: generated ids to text chunks, as the ids arrive.

Byte-level vocabularies stream through a table of each token's bytes and an incremental
UTF-8 decoder (`_ByteStream`, well under a microsecond per token). Any other tokenizer
goes through `tokenizers.decoders.DecodeStream`, which decodes only a short window of
recent ids per step. Either way the work per token does not grow with the output.
"""

from __future__ import annotations

import codecs

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from jaxserve.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _ByteStream:
    """Byte-level streaming: each token's bytes into an incremental UTF-8 decoder.

    Added tokens decode to their content between byte runs, as `decode` does (a byte run
    cut by one ends there, its unfinished character as U+FFFD); skipped special tokens
    are dropped before decoding, so the runs on either side join.
    """

    def __init__(self, table: list, skip: frozenset[int], prompt: list[int]):
        self.table, self.skip = table, skip
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.prompt_pending = False
        self.add(prompt[-4:])  # a character the prompt left unfinished is finished by the output
        # If it is not, the U+FFFD it becomes was the prompt's text already, not the output's.
        self.prompt_pending = bool(self.utf8.getstate()[0])

    def add(self, ids: list[int]) -> str:
        out = []
        for i in ids:
            piece = self.table[i]
            if isinstance(piece, bytes):
                out.append(self.utf8.decode(piece))
            elif i not in self.skip:
                out.append(self.utf8.decode(b"", final=True))
                self.utf8.reset()
                out.append(piece)
        return self._own("".join(out))

    def flush(self) -> str:
        return self._own(self.utf8.decode(b"", final=True))

    def _own(self, text: str) -> str:
        if self.prompt_pending and text:
            self.prompt_pending = False
            if text.startswith(REPLACEMENT_CHAR):
                return text[1:]
        return text


class IncrementalDetokenizer:
    """Streams generated ids to text, one chunk per `add`, never splitting a character.

    Each id's text is taken in the context of the ids before it, the end of the prompt for
    the first ones, so a leading space (which a SentencePiece decoder drops at the start of
    a text) and a character whose bytes span several ids come out as `decode` of the whole
    sequence has them. The text of ids that end in an unfinished UTF-8 character waits
    for the rest; `flush` emits it as U+FFFD.
    """

    # Prompt ids kept as context for the first generated ones.
    CONTEXT = 6
    # Ids the stream may hold back before their text is forced out. A character needs at
    # most 4 ids (bytes), so a longer wait is text that keeps ending in U+FFFD (stray bytes):
    # DecodeStream would decode its whole growing window again at every step.
    MAX_HELD = 16

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._rust = tokenizer.rust
        self._skip = skip_special_tokens
        self._special = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self.text = ""  # everything emitted so far
        prompt = list(prompt_ids) if prompt_ids is not None else []
        table = tokenizer.byte_table
        self._bytes = _ByteStream(table, self._special, prompt) if table is not None else None
        if self._bytes is not None:
            return
        self._context: list[int] = []  # ids whose text was emitted (or is the prompt's)
        self._held: list[int] = []  # ids given to the stream since it last emitted
        self._echo = ""  # text that the stream's next chunk repeats, already shown
        # (a few more prompt ids than CONTEXT, as skipped special tokens are left out)
        self._restart(self._visible(prompt[-4 * self.CONTEXT:]))

    def add(self, ids: int | Iterable[int]) -> str:
        """Feed generated id(s); returns the newly completed text (possibly "")."""
        if self._bytes is not None:
            chunk = self._bytes.add([ids] if isinstance(ids, int) else [int(i) for i in ids])
            self.text += chunk
            return chunk
        new = self._visible([ids] if isinstance(ids, int) else ids)
        return self._step(new) if new else ""

    def flush(self) -> str:
        """Emit whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self._bytes is not None:
            chunk = self._bytes.flush()
            self.text += chunk
            return chunk
        return self._force(final=True) if self._held else ""

    def _visible(self, ids: Iterable[int]) -> list[int]:
        # decode drops skipped special tokens before its decoder runs, so leaving them out
        # changes no text, and keeps a run of them (eos repeated under ignore_eos) out of the
        # stream's window, which is decoded again at each step until some text comes.
        return [int(i) for i in ids if i not in self._special]

    def _decode(self, ids: list[int]) -> str:
        return self._rust.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, chunk: str) -> str:
        if self._echo:  # drop what was already shown, as far as the chunk repeats it
            n = _common_prefix_len(chunk, self._echo)
            self._echo = self._echo[n:] if n == len(chunk) else ""
            chunk = chunk[n:]
        self.text += chunk
        return chunk

    def _step(self, new: list[int], force: bool = True) -> str:
        self._held += new
        try:
            chunk = self._stream.step(self._rust, new)
        except Exception:
            # DecodeStream raises when its window's text no longer starts with what it
            # emitted (a decoder whose text for earlier ids depends on later ones). Diffing
            # the decoded held ids against the context still gives the right text.
            return self._force(final=False) if force else ""
        if chunk is None:
            return self._force(final=False) if force and len(self._held) > self.MAX_HELD else ""
        # The chunk's ids are the next context: they start and end where the text was
        # whole, as DecodeStream's own window does.
        self._context, self._held = self._held, []
        return self._emit(chunk)

    def _force(self, final: bool) -> str:
        """Emit the held ids' text, decoded after the context, and start a new stream after
        them. Unless `final`, that is only up to the last id where the text is whole, as if a
        step had ended there; ids after it go to the new stream."""
        held, before = self._held, self._decode(self._context)
        n = len(held) if final else self._last_whole(len(before))
        # No such id: the held ids add no text, or bytes that are no UTF-8 (a character is
        # whole within 4 bytes); all their text is final but a U+FFFD the next ids may extend.
        done = held[:n] if n else held
        text = self._decode(self._context + done)
        text = text[_common_prefix_len(before, text):]
        keep = not n and text.endswith(REPLACEMENT_CHAR)
        chunk = self._emit(text[:-1] if keep else text)
        # Echo left over means the prompt already showed the held-back U+FFFD.
        self._restart(self._context + done, last_shown=not keep or bool(self._echo))
        if n and held[n:]:
            chunk += self._step(held[n:], force=False)
        return chunk

    def _last_whole(self, shown: int) -> int:
        """The largest n such that the held ids' first n add text that ends whole; 0 if none."""
        for n in range(len(self._held), 0, -1):
            text = self._decode(self._context + self._held[:n])
            if len(text) > shown and not text.endswith(REPLACEMENT_CHAR):
                return n
        return 0

    def _restart(self, context: list[int], last_shown: bool = True) -> None:
        """Start a stream after `context`, whose text counts as shown (but for its final
        character unless `last_shown`)."""
        context = context[-self.CONTEXT:]
        # Context that starts inside a character only adds U+FFFDs, and after ByteFallback
        # (which turns a whole run of byte tokens into U+FFFDs when it is not valid UTF-8) it
        # spoils the characters that follow in the same run: start at the first id where the
        # text starts cleanly, if there is one.
        for start in range(len(context)):
            full = self._decode(context[start:])
            if full and not full.startswith(REPLACEMENT_CHAR):
                break
        else:
            start, full = 0, self._decode(context)
        context = context[start:]
        # DecodeStream takes context whose text ends in U+FFFD (an unfinished character, or
        # a real U+FFFD: text cannot tell them apart) as no context at all and emits its text
        # again. So the stream starts after the last id where the text ends cleanly, the ids
        # after it are fed as held, and the text they showed is cut from the stream's next
        # chunk as far as that chunk repeats it. An id that completes the character changes
        # the text there, so the whole completed character counts as new.
        cut, head = len(context), full
        while cut and head.endswith(REPLACEMENT_CHAR):
            cut -= 1
            head = self._decode(context[:cut])
        self._context, self._held = context[:cut], context[cut:]
        self._stream = DecodeStream(self._context, skip_special_tokens=self._skip)
        if self._held:
            self._stream.step(self._rust, self._held)  # None: the text ends in U+FFFD
        shown = full[len(head):]
        self._echo = shown if last_shown else shown[:-1]
