"""`ProgramState` (the `s` a program writes to) and `ProgramStateGroup` (what `fork` returns)."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from typing import Any, Callable

from jaxserve.lang import ir
from jaxserve.lang.executor import Executor


class ProgramState:
    def __init__(self, executor: Executor):
        self.executor = executor
        self.ret_value: Any = None

    # ---- writing ----

    def __iadd__(self, other: ir.Expr | str) -> ProgramState:
        if other is None:
            raise ValueError("cannot append None to a program state")
        self.executor.submit(ir.as_expr(other))
        return self

    def _role(self, name: str, expr: ir.Expr | str | None):
        if expr is not None:
            self += ir.role(name, expr)
            return None

        @contextmanager
        def scope():
            self.executor.submit(ir.RoleBegin(name))
            yield
            self.executor.submit(ir.RoleEnd(name))
        return scope()

    def system(self, expr=None):
        return self._role("system", expr)

    def user(self, expr=None):
        return self._role("user", expr)

    def assistant(self, expr=None):
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str):
        """The text appended inside the block becomes variable `name`."""
        self.executor.submit(ir.VarScopeBegin(name))
        yield
        self.executor.submit(ir.VarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset=None) -> ProgramStateGroup:
        """`size` branches continuing from here; join them with `.join()`."""
        return ProgramStateGroup([ProgramState(e) for e in self.executor.fork(size)], self)

    @contextmanager
    def copy(self, position_ids_offset=None):
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ---- reading ----

    def __getitem__(self, name: str) -> Any:
        return self.executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.executor.variables[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self.executor.variables

    def get_var(self, name: str) -> Any:
        return self.executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.executor.variables[name] = value

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        """The server's meta_info for `gen` / `select` `name` (prompt_tokens, cached_tokens, ...)."""
        return self.executor.get_meta_info(name, timeout)

    def text(self) -> str:
        self.executor.sync()
        return self.executor.text_

    def messages(self) -> list[dict[str, str]]:
        self.executor.sync()
        return self.executor.messages_

    def sync(self) -> None:
        self.executor.sync()

    def error(self) -> BaseException | None:
        self.executor.sync()
        return self.executor.error_

    def text_iter(self, var_name: str | None = None):
        """With `run(stream=True)`: the text (or one variable's text) in pieces as it is
        generated; otherwise the finished text in one piece."""
        if self.executor.stream:
            yield from self.executor.watch(var_name)
        else:
            yield self.text() if var_name is None else str(self.get_var(var_name))

    async def text_async_iter(self, var_name: str | None = None):
        pieces = self.text_iter(var_name)
        done = object()
        while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ProgramStateGroup:
    """The branches of a `fork`."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        self.states, self.parent = states, parent

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        if value is not self.states[i]:
            raise ValueError("a fork's branches cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __iadd__(self, other: ir.Expr | str | Callable[[int], Any] | list) -> ProgramStateGroup:
        """An expression for every branch, a function of the branch index, or a list (one each)."""
        for i, state in enumerate(self.states):
            state += other(i) if callable(other) else other[i] if isinstance(other, (list, tuple)) else other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """`gather_variable`: each variable the branches created becomes a list of their
        values in the parent. `concate_and_append`: the branches' new text is appended to the
        parent's text, in order."""
        if mode == "gather_variable":
            before = set(self.parent.executor.variables)
            for state in self.states:
                if state.error() is not None:
                    raise state.error()
                for name, value in state.executor.variables.items():
                    if name not in before:
                        self.parent.executor.variables.setdefault(name, []).append(value)
        elif mode == "concate_and_append":
            self.parent += ir.ConcatBranches([s.executor for s in self.states])
            self.parent.sync()
        else:
            raise ValueError(f"join mode {mode!r}: use 'gather_variable' or 'concate_and_append'")
        for state in self.states:
            state.executor.end()
