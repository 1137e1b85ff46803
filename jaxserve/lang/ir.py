"""The expressions a program appends to its state (`s += ...`).

A program is plain Python; what it adds to `s` are these small values, executed in order by
the state's executor (`executor.py`). `+` between expressions (or with strings) builds an
`ExprList`, so `s += "Q: " + sgl.gen("a")` is one append.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class Expr:
    """Anything that can be appended to a state."""

    def __add__(self, other: Expr | str) -> ExprList:
        return ExprList([*_items(self), *_items(as_expr(other))])

    def __radd__(self, other: Expr | str) -> ExprList:
        return ExprList([*_items(as_expr(other)), *_items(self)])


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"cannot append a {type(value).__name__} to a program state; append a str or an expression")


def _items(expr: Expr) -> list[Expr]:
    return list(expr.items) if isinstance(expr, ExprList) else [expr]


@dataclass(eq=False)
class ExprList(Expr):
    items: list[Expr]


@dataclass(eq=False)
class Text(Expr):
    value: str


@dataclass(eq=False)
class Gen(Expr):
    """`gen(name, ...)`: sampling overrides (None = the run's default) and the output type."""

    name: str | None
    params: dict[str, Any]
    dtype: type | None = None

    def __post_init__(self):
        if self.params.get("regex") is not None:
            re.compile(self.params["regex"])  # a bad pattern fails where it is written


@dataclass(eq=False)
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float
    method: Any  # a choices method (choices.py)

    def __post_init__(self):
        if not self.choices or not all(isinstance(c, str) for c in self.choices):
            raise ValueError("select needs a non-empty list of string choices")


@dataclass(eq=False)
class RoleBegin(Expr):
    role: str


@dataclass(eq=False)
class RoleEnd(Expr):
    role: str


@dataclass(eq=False)
class VarScopeBegin(Expr):
    name: str


@dataclass(eq=False)
class VarScopeEnd(Expr):
    name: str


@dataclass(eq=False)
class ConcatBranches(Expr):
    """`join(mode="concate_and_append")`: the branches' new text appended to the parent."""

    executors: list = field(default_factory=list)


def role(name: str, expr: Expr | str | None = None) -> ExprList:
    inner = [] if expr is None else [as_expr(expr)]
    return ExprList([RoleBegin(name), *inner, RoleEnd(name)])


def named_exprs(expr: Expr) -> list[str]:
    """Names of the variables an expression will set (their readers wait for them)."""
    if isinstance(expr, ExprList):
        return [n for e in expr.items for n in named_exprs(e)]
    if isinstance(expr, (Gen, Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, VarScopeBegin):
        return [expr.name]
    return []
