"""`@function`: an LLM program, run once (`run`), in a batch (`run_batch`), or traced for the
prefix its runs share (`cache`)."""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

from jaxserve.lang.executor import Executor
from jaxserve.lang.params import RUN_DEFAULTS, run_defaults
from jaxserve.lang.state import ProgramState

# A batch prefills the prefix its programs share when it is at least this long (characters).
MIN_SHARED_PREFIX_CHARS = 64


class _Defaults:
    backend = None


defaults = _Defaults()


def resolve_backend(backend):
    backend = backend or defaults.backend
    if backend is None:
        raise RuntimeError("no backend: call set_default_backend(...) or pass backend=")
    return getattr(backend, "endpoint", backend)  # a Runtime stands for its endpoint


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        params = list(inspect.signature(func).parameters)
        if not params or params[0] != "s":
            raise TypeError(f"{func.__name__}: the first parameter of a program must be named 's'")
        self.func, self.arg_names = func, params[1:]
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})

    def bind(self, **kwargs) -> SglFunction:
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.func.__name__} has no parameters {sorted(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def __call__(self, *args, **kwargs) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(self, *args, stream: bool = False, backend=None, use_thread: bool = True, **kwargs) -> ProgramState:
        """Run the program. Sampling arguments (`max_new_tokens`, `temperature`, `stop`, ...)
        are the defaults of its `gen`s; the other keyword arguments are the program's. With
        `stream=True` it returns at once (read it with `text_iter`); otherwise it raises the
        first failure as a `ProgramError`."""
        # Sampling defaults by name, unless the program has a parameter of that name.
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in RUN_DEFAULTS and k not in self.arg_names}
        state = ProgramState(Executor(resolve_backend(backend), run_defaults(**sampling), stream))
        if stream:
            threading.Thread(target=self._execute, args=(state, args, kwargs), daemon=True).start()
            return state
        self._execute(state, args, kwargs)
        if state.error() is not None:
            raise state.error()
        return state

    def run_batch(self, batch_kwargs: list, *, backend=None, num_threads: int | str = "auto",
                  progress_bar: bool = False, generator_style: bool = False, **sampling) -> list[ProgramState]:
        """Run the program once per argument dict (or tuple), concurrently so their requests
        share one continuous batch, after prefilling the prefix they all share. A program
        that fails does not stop the others: its state's `error()` says why."""
        backend = resolve_backend(backend)
        batch = [dict(zip(self.arg_names, a)) if isinstance(a, (list, tuple)) else dict(a) for a in batch_kwargs]
        if not batch:
            return []
        defaults_ = run_defaults(**sampling)
        if len(batch) > 1:
            self.cache(backend)
        threads = min(len(batch), 128 if num_threads == "auto" else int(num_threads))
        bar = _progress(len(batch)) if progress_bar else None

        def one(kwargs: dict) -> ProgramState:
            state = ProgramState(Executor(backend, defaults_))
            self._execute(state, (), kwargs)
            state.sync()
            if bar is not None:
                bar.update()
            return state

        pool = ThreadPoolExecutor(threads, thread_name_prefix="jaxserve-lang-batch")
        futures = [pool.submit(one, kwargs) for kwargs in batch]
        pool.shutdown(wait=False)

        def results():
            try:
                for future in futures:
                    yield future.result()
            finally:
                if bar is not None:
                    bar.close()
        return results() if generator_style else list(results())

    def cache(self, backend=None) -> str:
        """Prefill the text every run starts with (found by tracing the program up to its
        first argument or generation); returns that prefix."""
        backend = resolve_backend(backend)
        prefix = trace_prefix(self, backend)
        if len(prefix) >= MIN_SHARED_PREFIX_CHARS:
            backend.cache_prefix(prefix)
        return prefix

    # ---- internals ----

    def _execute(self, state: ProgramState, args, kwargs) -> None:
        try:
            state.ret_value = self.func(state, *args, **{**kwargs, **self.bind_arguments})
        except Exception as e:
            state.executor.fail(e)
        finally:
            state.executor.end()


class _StopTrace(Exception):
    pass


class _TraceBackend:
    """Stands in for the backend while tracing: the first model call ends the trace."""

    def __init__(self, chat_template):
        self.chat_template = chat_template

    def _stop(self, *args, **kwargs):
        raise _StopTrace

    generate = generate_stream = select = cache_prefix = _stop


def trace_prefix(program: SglFunction, backend) -> str:
    """The text every run of `program` starts with: its text until the first model call,
    cut where the first argument's value would appear."""
    marks = {name: f"\x00{name}\x00" for name in program.arg_names if name not in program.bind_arguments}
    executor = Executor(_TraceBackend(backend.chat_template), run_defaults(), threaded=False)
    try:
        program.func(ProgramState(executor), **marks, **program.bind_arguments)
    except Exception:
        pass  # tracing ends at the first thing it cannot do
    return executor.text_.split("\x00", 1)[0]


def _progress(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total)
