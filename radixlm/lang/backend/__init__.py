"""Backends of the frontend language. Imported lazily: `RuntimeEndpoint` needs `requests`,
`EngineBackend` the engine (torch), `OpenAI` the openai package."""

from radixlm.lang.backend.base import BackendConnectionError, BackendError, BaseBackend


def __getattr__(name):
    if name == "RuntimeEndpoint":
        from radixlm.lang.backend.runtime_endpoint import RuntimeEndpoint
        return RuntimeEndpoint
    if name == "Runtime":
        from radixlm.lang.backend.runtime import Runtime
        return Runtime
    if name == "EngineBackend":
        from radixlm.lang.backend.engine_backend import EngineBackend
        return EngineBackend
    if name == "OpenAI":
        from radixlm.lang.backend.openai_backend import OpenAI
        return OpenAI
    raise AttributeError(f"module 'radixlm.lang.backend' has no attribute {name!r}")


__all__ = ["BaseBackend", "BackendError", "BackendConnectionError", "RuntimeEndpoint", "Runtime", "EngineBackend",
           "OpenAI"]
