"""radixlm's frontend language (SGLang's): programs that interleave prompt text, generation,
choices and parallel branches, run on an in-process engine or a server.

    import radixlm as rl

    @rl.function
    def qa(s, question):
        s += rl.system("You are a helpful assistant.")
        s += rl.user(question)
        s += rl.assistant(rl.gen("answer", max_tokens=64))

    rl.set_default_backend(rl.RuntimeEndpoint("http://127.0.0.1:30000"))
    state = qa.run(question="What is a radix tree?")
    print(state["answer"])

Importing this package is light: backends load their dependencies on first use.
"""

from radixlm.lang.api import (
    SglFunction,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_default_backend,
    get_server_info,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixlm.lang.backend.base import BackendConnectionError, BackendError, BaseBackend
from radixlm.lang.chat_template import ChatTemplate
from radixlm.lang.choices import (
    ChoicesDecision,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixlm.lang.executor import ProgramError
from radixlm.lang.program_state import ProgramState, ProgramStateGroup
from radixlm.lang.tracer import ProgramGraph

_BACKENDS = ("RuntimeEndpoint", "Runtime", "EngineBackend", "OpenAI")


def __getattr__(name):
    if name in _BACKENDS:
        import radixlm.lang.backend as backend

        return getattr(backend, name)
    raise AttributeError(f"module 'radixlm.lang' has no attribute {name!r}")


__all__ = [
    "function", "gen", "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin",
    "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end", "set_default_backend",
    "get_default_backend", "flush_cache", "get_server_info", "RuntimeEndpoint", "Runtime", "EngineBackend", "OpenAI",
    "token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized", "ProgramState",
    "ProgramStateGroup", "ProgramError", "ProgramGraph", "ChoicesDecision", "ChatTemplate", "SglFunction",
    "BaseBackend", "BackendError", "BackendConnectionError",
]
