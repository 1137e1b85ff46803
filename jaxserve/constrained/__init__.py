"""Structured outputs: regex, JSON schema, EBNF and choices through llguidance (see
docs/ARCHITECTURE.md): `grammar` (request fields -> grammars), `compiler` (compiled off
the scheduler, cached), `matcher` (a request's state), `masks` (a step's bitmask)."""

from jaxserve.constrained.compiler import GrammarCompiler
from jaxserve.constrained.grammar import FIELDS, GrammarSpec, spec_of
from jaxserve.constrained.masks import allows_nothing, fill_masks, mask_words
from jaxserve.constrained.matcher import Grammar

__all__ = ["FIELDS", "Grammar", "GrammarCompiler", "GrammarSpec", "allows_nothing", "fill_masks", "mask_words",
           "spec_of"]
