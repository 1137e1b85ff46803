"""The executor behind one program state: runs the appended expressions in order on a
worker thread, so `s += gen(...)` returns at once and `s["x"]` waits for `x`.

It owns the state's text, chat messages and variables. The first failing expression
records a `ProgramError` saying which `gen` / `select` failed and why; what was appended
after it is skipped, and whoever waits for a variable gets the error.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from jaxserve.lang import ir
from jaxserve.lang.params import resolve, typed_value


class ProgramError(RuntimeError):
    """A program step failed; the message names the step."""


class Executor:
    def __init__(self, backend, defaults: dict[str, Any], stream: bool = False, chat_template=None,
                 threaded: bool = True):
        self.backend, self.defaults, self.stream = backend, defaults, stream
        self.chat_template = chat_template or backend.chat_template
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.var_text: dict[str, str] = {}  # a gen's raw text, growing while it streams
        self.meta_info: dict[str, Any] = {}
        self.error_: BaseException | None = None
        self.finished = False
        self.fork_start: int | None = None
        self._ready: dict[str, threading.Event] = {}
        self._scopes: dict[str, int] = {}
        self._branches: list[Executor] = []
        self._ended = False
        self._step: ir.Expr | None = None  # the gen / select running, for error messages
        self._role: tuple[str, int, str] | None = None  # (role, where its content starts, its suffix)
        self._changed = threading.Condition()
        self._queue: queue.Queue | None = None
        if threaded:
            self._queue = queue.Queue()
            threading.Thread(target=self._work, name="jaxserve-lang", daemon=True).start()

    # ---- submission ----

    def submit(self, expr: ir.Expr) -> None:
        for name in ir.named_exprs(expr):
            self._ready[name] = threading.Event()
        if self._queue is None:
            self._run(expr)
        else:
            self._queue.put(expr)

    def sync(self) -> None:
        if self._queue is not None:
            self._queue.join()

    def end(self) -> None:
        """No more expressions: the worker stops after the queued ones (and so do the
        workers of branches never joined)."""
        if self._ended:
            return
        self._ended = True
        for branch in self._branches:
            branch.end()
        if self._queue is None:
            self._finish()
        else:
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            expr = self._queue.get()
            try:
                if expr is None:
                    self._finish()
                    return
                self._run(expr)
            finally:
                self._queue.task_done()

    def _run(self, expr: ir.Expr) -> None:
        if self.error_ is not None:
            return
        self._step = None
        try:
            self._execute(expr)
        except Exception as e:  # recorded; readers and the run raise it
            where = _describe(self._step or expr)
            self.fail(e if isinstance(e, ProgramError) else ProgramError(f"{where} failed: {e}"))

    def fail(self, error: BaseException) -> None:
        if self.error_ is None:
            if not isinstance(error, ProgramError):
                error = ProgramError(f"the program raised {type(error).__name__}: {error}").with_traceback(
                    error.__traceback__)
            self.error_ = error
        for event in self._ready.values():
            event.set()
        self._notify()

    def _finish(self) -> None:
        self.finished = True
        for event in self._ready.values():
            event.set()
        self._notify()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # ---- reading ----

    def get_var(self, name: str) -> Any:
        if name in self._ready:
            self._ready[name].wait()
        if name not in self.variables:
            if self.error_ is not None:
                raise self.error_
            raise KeyError(f"the program has no variable {name!r}")
        return self.variables[name]

    def get_meta_info(self, name: str, timeout: float | None = None) -> Any:
        if name in self._ready and not self._ready[name].wait(timeout):
            raise TimeoutError(f"variable {name!r} was not ready within {timeout} s")
        return self.meta_info.get(name)

    def watch(self, name: str | None = None):
        """The state's text (or variable `name`'s text) as pieces, as they are produced."""
        def current() -> str:
            return self.text_ if name is None else self.var_text.get(name, "")

        def done() -> bool:
            ended = self.finished or self.error_ is not None
            return ended or (name is not None and name in self._ready and self._ready[name].is_set())

        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(current()) > seen or done())
                text, finished = current(), done()
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            elif finished:
                return

    # ---- execution ----

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, ir.Text):
            self._fill(expr.value)
        elif isinstance(expr, ir.Gen):
            self._step = expr
            self._gen(expr)
            self._step = None
        elif isinstance(expr, ir.Select):
            self._step = expr
            decision = self.backend.select(self.text_, expr.choices, expr.temperature, expr.method)
            self._fill(decision.decision)
            self._set(expr.name, decision.decision, decision.decision, decision.meta_info)
            self._step = None
        elif isinstance(expr, ir.RoleBegin):
            if self._role is not None:
                raise ValueError(f"role {expr.role!r} begins inside role {self._role[0]!r}; roles do not nest")
            prefix, suffix = self.chat_template.prefix_and_suffix(expr.role, self.messages_)
            self._fill(prefix)
            self._role = (expr.role, len(self.text_), suffix)
        elif isinstance(expr, ir.RoleEnd):
            if self._role is None or self._role[0] != expr.role:
                raise ValueError(f"role {expr.role!r} ends but {self._role and self._role[0]!r} is open")
            role, start, suffix = self._role
            self._role = None
            self.messages_.append({"role": role, "content": self.text_[start:]})
            self._fill(suffix)
        elif isinstance(expr, ir.VarScopeBegin):
            self._scopes[expr.name] = len(self.text_)
        elif isinstance(expr, ir.VarScopeEnd):
            value = self.text_[self._scopes.pop(expr.name):]
            self._set(expr.name, value, value, None)
        elif isinstance(expr, ir.ConcatBranches):
            for branch in expr.executors:
                branch.sync()
                if branch.error_ is not None:
                    raise branch.error_
                self._fill(branch.text_[branch.fork_start:])
        else:
            raise TypeError(f"cannot execute {type(expr).__name__}")

    def _gen(self, expr: ir.Gen) -> None:
        params = resolve(self.defaults, expr.params, expr.dtype)
        if not self.stream:
            text, meta = self.backend.generate(self.text_, params)
            first = text[0] if isinstance(text, list) else text
            value = [typed_value(t, expr.dtype) for t in text] if isinstance(text, list) else typed_value(
                text, expr.dtype)
            self._fill(first)
            self._set(expr.name, value, first, meta)
            return
        self.var_text[expr.name] = ""
        meta: dict = {}
        for piece, meta in self.backend.generate_stream(self.text_, params):
            with self._changed:
                self.text_ += piece
                self.var_text[expr.name] += piece
                self.meta_info[expr.name] = meta
                self._changed.notify_all()
        text = self.var_text[expr.name]
        self._set(expr.name, typed_value(text, expr.dtype), text, meta)

    def _fill(self, value: str) -> None:
        with self._changed:
            self.text_ += str(value)
            self._changed.notify_all()

    def _set(self, name: str | None, value: Any, text: str, meta: Any) -> None:
        with self._changed:
            self.variables[name] = value
            self.var_text[name] = text
            self.meta_info[name] = meta
            self._changed.notify_all()
        if name in self._ready:
            self._ready[name].set()

    # ---- fork ----

    def fork(self, size: int) -> list[Executor]:
        """`size` executors continuing from this one's text; the shared prefix is prefilled
        once first so the branches find it in the radix cache."""
        self.sync()
        if self.error_ is not None:
            raise self.error_
        if size > 1 and self.text_:
            self.backend.cache_prefix(self.text_)
        branches = []
        for _ in range(int(size)):
            branch = Executor(self.backend, self.defaults, self.stream, self.chat_template)
            branch.text_, branch.messages_ = self.text_, list(self.messages_)
            branch.variables, branch.var_text = dict(self.variables), dict(self.var_text)
            branch._role, branch.fork_start = self._role, len(self.text_)
            branches.append(branch)
        self._branches += branches
        return branches


def _describe(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Gen):
        return f"gen({expr.name!r})"
    if isinstance(expr, ir.Select):
        return f"select({expr.name!r}, choices={expr.choices!r})"
    return type(expr).__name__
