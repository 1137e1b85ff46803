"""Chat templates: HF-compatible jinja2 rendering in a sandbox.

Templates come from model files, so they run in jinja2's immutable sandbox, with the
helpers HF's `apply_chat_template` gives them (`raise_exception`, `strftime_now` and a
`tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2.sandbox
from jinja2.ext import loopcontrols


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    **kwargs: Any,
) -> str:
    """Render checked `messages` with the jinja `template`; extra kwargs (tools, ...) are
    passed to the template."""
    return _compile_template(template).render(
        messages=_validate_messages(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **kwargs,
    )


def read_template(value: str) -> str:
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
