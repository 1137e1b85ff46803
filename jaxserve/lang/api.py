"""The public calls of the frontend language, with SGLang's names and arguments."""

from __future__ import annotations

from typing import Any

from jaxserve.lang import ir
from jaxserve.lang.choices import token_length_normalized
from jaxserve.lang.function import SglFunction, defaults, resolve_backend


def function(func=None, num_api_spec_tokens: int | None = None):
    """`@function` (or `@function(...)`) makes `def prog(s, ...)` a program."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens)


def set_default_backend(backend) -> None:
    defaults.backend = backend


def flush_cache(backend=None) -> bool:
    return resolve_backend(backend).flush_cache()


def get_server_info(backend=None) -> dict[str, Any]:
    return resolve_backend(backend).get_server_info()


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        n: int | None = None, stop=None, stop_token_ids=None, stop_regex=None, temperature: float | None = None,
        top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
        frequency_penalty: float | None = None, presence_penalty: float | None = None,
        ignore_eos: bool | None = None, return_logprob: bool | None = None, logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None, dtype=None,
        choices: list[str] | None = None, choices_method=None, regex: str | None = None,
        json_schema: str | dict | None = None) -> ir.Expr:
    """Generate into variable `name`. Unset arguments take the run's defaults. `choices`
    makes it a `select`; `regex` / `json_schema` / `dtype` (int, float, bool, str)
    constrain the output, and `dtype` also converts the variable's value."""
    if choices:
        return select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    params = dict(max_new_tokens=max_tokens, min_new_tokens=min_tokens, n=n, stop=stop,
                  stop_token_ids=stop_token_ids, stop_regex=stop_regex, temperature=temperature, top_p=top_p,
                  top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
                  presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
                  logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
                  return_text_in_logprobs=return_text_in_logprobs, regex=regex, json_schema=json_schema)
    return ir.Gen(name, params, dtype)


def gen_int(name: str | None = None, **kwargs) -> ir.Expr:
    return gen(name, dtype=int, **kwargs)


def gen_string(name: str | None = None, **kwargs) -> ir.Expr:
    return gen(name, dtype=str, **kwargs)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method=token_length_normalized) -> ir.Expr:
    """Append the choice the model scores highest (see `choices.py` for the methods)."""
    return ir.Select(name, list(choices or []), temperature, choices_method)


def system(expr=None) -> ir.Expr:
    return ir.role("system", expr)


def user(expr=None) -> ir.Expr:
    return ir.role("user", expr)


def assistant(expr=None) -> ir.Expr:
    return ir.role("assistant", expr)


def system_begin() -> ir.Expr:
    return ir.RoleBegin("system")


def system_end() -> ir.Expr:
    return ir.RoleEnd("system")


def user_begin() -> ir.Expr:
    return ir.RoleBegin("user")


def user_end() -> ir.Expr:
    return ir.RoleEnd("user")


def assistant_begin() -> ir.Expr:
    return ir.RoleBegin("assistant")


def assistant_end() -> ir.Expr:
    return ir.RoleEnd("assistant")
