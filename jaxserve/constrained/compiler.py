"""GrammarCompiler: grammars compiled once, off the scheduler thread.

Compiling a grammar (its lexer over the whole vocabulary) takes from a millisecond to a
second. The compiler runs it in a small thread pool (llguidance releases the GIL) and
keeps the compiled matchers in an LRU cache keyed by (field, text), so a repeated schema
compiles once, even when its requests arrive together; each request then starts from a
cheap copy. The caller (the engine's request validation, already off the event loop)
waits for its own grammar only; the scheduler never sees a grammar that did not compile.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading

import llguidance

from jaxserve.constrained.grammar import GrammarSpec, to_llguidance
from jaxserve.constrained.matcher import Grammar
from jaxserve.errors import InvalidRequestError

COMPILE_TIMEOUT_S = 60.0


def llguidance_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer, `vocab_size` wide (the model's logits): mask bits
    past the tokenizer's own vocabulary stay zero."""
    return llguidance.LLTokenizer(tokenizer.rust.to_str(), n_vocab=vocab_size,
                                  eos_token=sorted(tokenizer.eos_token_ids))


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, *, json_whitespace: str | None = None, workers: int = 2,
                 cache_size: int = 256):
        self.json_whitespace = json_whitespace
        self.cache_size = cache_size
        self._tokenizer = None
        self._source = (tokenizer, vocab_size)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxserve-grammar")
        self._cache: collections.OrderedDict[GrammarSpec, concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # built on first use (~0.4 s for a 50k vocabulary)
            if self._tokenizer is None:
                self._tokenizer = llguidance_tokenizer(*self._source)
            return self._tokenizer

    def get(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (a template: `Grammar.start()` gives a request its
        own matcher). Raises `InvalidRequestError` naming the field if it does not compile."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
            else:
                self.misses += 1
                future = self._cache[spec] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        try:
            return future.result(timeout=COMPILE_TIMEOUT_S)
        except InvalidRequestError:
            raise
        except concurrent.futures.TimeoutError:
            raise InvalidRequestError(f"{spec.what} did not compile within {COMPILE_TIMEOUT_S:.0f} s; "
                                      "simplify it") from None

    def _compile(self, spec: GrammarSpec) -> Grammar:
        grammar = to_llguidance(spec, self.json_whitespace)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{spec.what} is invalid: {matcher.get_error()}")
        return Grammar(matcher)

    def stats(self) -> dict:
        return {"grammar_cache_size": len(self._cache), "grammar_cache_hits": self.hits,
                "grammar_cache_misses": self.misses}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
