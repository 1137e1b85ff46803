"""`RuntimeEndpoint`: programs talk to a jaxserve (or SGLang) server over its native HTTP API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from jaxserve.lang.backends.base import Backend, BackendError
from jaxserve.lang.chat_template import ChatTemplate, chat_template_for


def check_response(response: httpx.Response) -> httpx.Response:
    """The response, or a `BackendError` with the server's message."""
    if response.status_code != 200:
        response.read()
        try:
            error = response.json()
            message = error["error"].get("message") if isinstance(error.get("error"), dict) else error
        except (json.JSONDecodeError, AttributeError):
            message = response.text
        raise BackendError(response.status_code, str(message))
    return response


class RuntimeEndpoint(Backend):
    """`RuntimeEndpoint(base_url, api_key=None)`. The chat template is the server's model
    template (`/get_model_info` carries it), else one guessed from the model path;
    `chat_template=` (a `ChatTemplate`) overrides both."""

    def __init__(self, base_url: str, api_key: str | None = None, verify: Any = True,
                 chat_template: ChatTemplate | None = None, timeout: float | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.client = httpx.Client(base_url=self.base_url, headers=headers, verify=verify, timeout=timeout,
                                   limits=limits)
        self.model_info = check_response(self.client.get("/get_model_info")).json()
        self.model_name = self.model_info.get("model_path") or ""
        self.chat_template = chat_template or chat_template_for(
            self.model_info.get("chat_template"), self.model_info.get("bos_token"),
            self.model_info.get("eos_token"), self.model_name)

    def _generate(self, body: dict[str, Any]) -> dict | list[dict]:
        return check_response(self.client.post("/generate", json=body)).json()

    def _stream(self, body: dict[str, Any]) -> Iterator[dict]:
        with self.client.stream("POST", "/generate", json=body) as response:
            check_response(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)

    def flush_cache(self) -> bool:
        return self.client.post("/flush_cache").status_code == 200

    def get_server_info(self) -> dict[str, Any]:
        return check_response(self.client.get("/get_server_info")).json()

    def close(self) -> None:
        self.client.close()
