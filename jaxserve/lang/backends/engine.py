"""The in-process backend: programs call a `jaxserve.Engine` directly (no HTTP), for
notebooks and scripts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jaxserve.errors import EngineUnavailableError, InvalidRequestError
from jaxserve.lang.backends.base import Backend, BackendError
from jaxserve.lang.chat_template import chat_template_for


class EngineBackend(Backend):
    """`EngineBackend(engine)`; `chat_template=` (a `ChatTemplate`) overrides the model's."""

    def __init__(self, engine, chat_template=None):
        self.engine = engine
        tok = engine.tokenizer
        self.model_name = engine.args.model_path or engine.args.served_model_name or "jaxserve"
        self.chat_template = chat_template or chat_template_for(tok.chat_template, tok.bos_token, tok.eos_token,
                                                                self.model_name)

    def _call(self, body: dict[str, Any], stream: bool):
        kwargs = {("prompt" if k == "text" else k): v for k, v in body.items() if k != "stream"}
        try:
            return self.engine.generate(**kwargs, stream=stream)
        except InvalidRequestError as e:
            raise BackendError(400, str(e)) from None
        except EngineUnavailableError as e:
            raise BackendError(503, str(e)) from None

    def _generate(self, body: dict[str, Any]) -> dict | list[dict]:
        return self._call(body, stream=False)

    def _stream(self, body: dict[str, Any]) -> Iterator[dict]:
        return self._call(body, stream=True)

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_server_info()
