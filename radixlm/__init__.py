"""radixlm: an SGLang-style LLM inference and serving engine.

The package imports without a GPU, Triton or the server's packages; heavy parts load on first use.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from radixlm.entrypoints.engine import Engine
        return Engine
    if name in ("SamplingParams", "Req", "FinishReason"):
        import radixlm.core as core
        return getattr(core, name)
    if name == "ServerArgs":
        from radixlm.server_args import ServerArgs
        return ServerArgs
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")


__all__ = ["Engine", "SamplingParams", "ServerArgs", "__version__"]
