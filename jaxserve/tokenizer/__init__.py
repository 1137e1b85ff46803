"""Tokenization for jaxserve: text <-> ids, chat templates, streamed detokenization.

tokenizer.py holds `Tokenizer` and `load_tokenizer`, gguf.py rebuilds a tokenizer from a
GGUF file's metadata, chat.py renders chat templates, detokenizer.py streams ids to text.
"""

from jaxserve.tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from jaxserve.tokenizer.tokenizer import Tokenizer, load_tokenizer

__all__ = ["REPLACEMENT_CHAR", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]
