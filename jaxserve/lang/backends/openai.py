"""`OpenAI`: programs that only `gen` run against any OpenAI-compatible server, through its
`/v1/completions` route (the program's text, roles included, is the prompt)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from jaxserve.lang.backends.base import Backend, BackendError
from jaxserve.lang.backends.http import check_response
from jaxserve.lang.chat_template import ChatTemplate, template_for_model_name

_STANDARD = ("n", "stop", "temperature", "top_p", "frequency_penalty", "presence_penalty")
# Extensions (SGLang, vLLM, jaxserve) are sent only when set: a plain OpenAI server may
# refuse fields it does not know. (their name in the body, their unset value)
_EXTRAS = {"top_k": ("top_k", -1), "min_p": ("min_p", 0.0), "min_new_tokens": ("min_tokens", 0),
           "ignore_eos": ("ignore_eos", False), "regex": ("regex", None), "stop_token_ids": ("stop_token_ids", [])}


class OpenAI(Backend):
    """`OpenAI(model_name, base_url="https://api.openai.com/v1", api_key=None)`."""

    def __init__(self, model_name: str, base_url: str = "https://api.openai.com/v1", api_key: str | None = None,
                 chat_template: ChatTemplate | None = None, timeout: float | None = None):
        self.model_name = model_name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.chat_template = chat_template or template_for_model_name(model_name)

    def _body(self, text: str, params: dict[str, Any]) -> dict[str, Any]:
        body = {"model": self.model_name, "prompt": text, "max_tokens": params["max_new_tokens"]}
        body.update({k: params[k] for k in _STANDARD if params.get(k) not in (None, [])})
        body.update({name: params[k] for k, (name, unset) in _EXTRAS.items() if params.get(k, unset) != unset})
        if params.get("json_schema"):
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": json.loads(params["json_schema"])}}
        if params.get("stop_regex"):
            raise BackendError(400, "stop_regex has no OpenAI API field; use RuntimeEndpoint or EngineBackend")
        if params.get("return_logprob"):
            body["logprobs"] = params.get("top_logprobs_num") or 0
        return body

    @staticmethod
    def _meta(out: dict, choice: dict) -> dict:
        usage = out.get("usage") or {}
        return {"id": out.get("id"), "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                "finish_reason": choice.get("finish_reason"), "logprobs": choice.get("logprobs")}

    def generate(self, text: str, params: dict[str, Any]):
        out = check_response(self.client.post("/completions", json=self._body(text, params))).json()
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) > 1:
            return [c["text"] for c in choices], [self._meta(out, c) for c in choices]
        return choices[0]["text"], self._meta(out, choices[0])

    def generate_stream(self, text: str, params: dict[str, Any]) -> Iterator[tuple[str, dict]]:
        body = {**self._body(text, params), "stream": True, "stream_options": {"include_usage": True}}
        meta: dict = {}
        with self.client.stream("POST", "/completions", json=body) as response:
            check_response(response)
            for line in response.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                meta = {k: v if v is not None else meta.get(k) for k, v in self._meta(chunk, choice).items()}
                yield choice.get("text", ""), meta

    def select(self, text, choices, temperature, method):
        raise BackendError(400, "select needs input logprobs, which the OpenAI API does not give; "
                                "use RuntimeEndpoint or EngineBackend")

    def cache_prefix(self, text: str) -> dict:
        return {}  # no prefill-only request in the OpenAI API; the server's own caching applies

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict[str, Any]:
        return {"model": self.model_name, "base_url": str(self.client.base_url)}
