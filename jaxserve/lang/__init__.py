"""jaxserve's frontend language: SGLang's, so `import jaxserve.lang as sgl` runs an SGLang
program unchanged.

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.EngineBackend(jaxserve.Engine()))   # or sgl.RuntimeEndpoint(url)
    state = qa.run(question="Why is the sky blue?")
    print(state["answer"])
"""

from jaxserve.lang.api import (
    assistant, assistant_begin, assistant_end, flush_cache, function, gen, gen_int, gen_string, get_server_info,
    select, set_default_backend, system, system_begin, system_end, user, user_begin, user_end,
)
from jaxserve.lang.backends import Backend, BackendError, EngineBackend, OpenAI, Runtime, RuntimeEndpoint
from jaxserve.lang.chat_template import ChatTemplate, FixedChatTemplate, JinjaChatTemplate
from jaxserve.lang.choices import (
    ChoicesDecision, ChoicesSamplingMethod, greedy_token_selection, token_length_normalized,
    unconditional_likelihood_normalized,
)
from jaxserve.lang.executor import ProgramError
from jaxserve.lang.function import SglFunction
from jaxserve.lang.state import ProgramState, ProgramStateGroup

__all__ = [
    "Backend", "BackendError", "ChatTemplate", "ChoicesDecision", "ChoicesSamplingMethod", "EngineBackend",
    "FixedChatTemplate", "JinjaChatTemplate", "OpenAI", "ProgramError", "ProgramState", "ProgramStateGroup", "Runtime",
    "RuntimeEndpoint", "SglFunction", "assistant", "assistant_begin", "assistant_end", "flush_cache",
    "function", "gen", "gen_int", "gen_string", "get_server_info", "greedy_token_selection", "select",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
]
