"""Role prefixes and suffixes for `sgl.system/user/assistant`.

The model's own jinja template is the source of truth: the text a role adds is what the
template renders for the conversation with one more message minus what it renders
without it, split around a marker content. So a program's text is exactly the template's
rendering of its messages (a default system prompt the template inserts included). When
no template is known, or it refuses a conversation, a fixed template chosen from the model
name is used (ChatML, Llama 3, or plain `ROLE: text` lines).
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxserve.tokenizer.chat import render_chat

_MARK = "\u2063jaxserve-content\u2063"


class ChatTemplate:
    """A role's text before and after its content, given the messages before it."""

    def prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        raise NotImplementedError


@dataclass
class JinjaChatTemplate(ChatTemplate):
    """The model's template (HF jinja)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    fallback: ChatTemplate | None = None
    name: str = "model"

    def _render(self, messages: list[dict]) -> str:
        if not messages:
            return ""
        return render_chat(self.source, messages, False, self.bos_token, self.eos_token)

    def prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        try:
            base = self._render(history)
            full = self._render([*history, {"role": role, "content": _MARK}])
        except Exception:
            full = base = ""
        if full.startswith(base) and full.count(_MARK) == 1:
            prefix, suffix = full[len(base):].split(_MARK)
            return prefix, suffix
        if self.fallback is None:
            raise ValueError(f"the chat template cannot render a {role!r} message after {len(history)} messages")
        return self.fallback.prefix_and_suffix(role, history)


@dataclass
class FixedChatTemplate(ChatTemplate):
    """A template given as a prefix and suffix per role (and an optional default system
    prompt inserted before the first non-system message)."""

    name: str
    roles: dict[str, tuple[str, str]]
    default_system: str | None = None

    def prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"the {self.name!r} chat template has no role {role!r}")
        prefix, suffix = self.roles[role]
        if not history and role != "system" and self.default_system is not None:
            system_prefix, system_suffix = self.roles["system"]
            prefix = system_prefix + self.default_system + system_suffix + prefix
        return prefix, suffix


CHATML = FixedChatTemplate("chatml", {r: (f"<|im_start|>{r}\n", "<|im_end|>\n")
                                      for r in ("system", "user", "assistant")})
LLAMA3 = FixedChatTemplate("llama-3-instruct", {
    r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")})
PLAIN = FixedChatTemplate("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"),
                                      "assistant": ("ASSISTANT:", "\n")})


def template_for_model_name(name: str) -> FixedChatTemplate:
    """A fixed template guessed from a model path or name."""
    lowered = (name or "").lower()
    if any(k in lowered for k in ("smollm", "qwen", "chatml", "hermes")):
        return CHATML
    if "llama-3" in lowered or "llama3" in lowered:
        return LLAMA3
    return PLAIN


def chat_template_for(source: str | None, bos_token: str | None, eos_token: str | None,
                      model_name: str) -> ChatTemplate:
    """The model's jinja template when there is one, the name-guessed one otherwise."""
    fixed = template_for_model_name(model_name)
    if not source:
        return fixed
    return JinjaChatTemplate(source, bos_token or "", eos_token or "", fallback=fixed)
