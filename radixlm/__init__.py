"""radixlm: an SGLang-style LLM inference and serving engine.

The package imports without a GPU, Triton or the server's packages; heavy parts load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from radixlm.entrypoints.engine import Engine
        return Engine
    if name == "SamplingParams":
        from radixlm.sampling_params import SamplingParams
        return SamplingParams
    if name in ("Req", "FinishReason"):
        import radixlm.core as core
        return getattr(core, name)
    if name == "ServerArgs":
        from radixlm.server_args import ServerArgs
        return ServerArgs
    if name in _LANG or name == "lang":
        import importlib

        lang = importlib.import_module("radixlm.lang")
        return lang if name == "lang" else getattr(lang, name)
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")


# The frontend language (radixlm.lang), re-exported lazily: `import radixlm as rl; rl.gen(...)`.
_LANG = (
    "function", "gen", "gen_int", "gen_string", "select", "system", "user", "assistant", "system_begin",
    "system_end", "user_begin", "user_end", "assistant_begin", "assistant_end", "set_default_backend",
    "get_default_backend", "flush_cache", "get_server_info", "RuntimeEndpoint", "Runtime", "EngineBackend",
    "OpenAI", "token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized",
    "ProgramState", "ProgramGraph", "ProgramError",
)

__all__ = ["Engine", "SamplingParams", "ServerArgs", "__version__", *_LANG]
