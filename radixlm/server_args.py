"""ServerArgs: every engine/server option, with SGLang's names and meanings, validated once and
then frozen. `Engine(**kwargs)` and `launch_server --flag` both build one of these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from radixlm.attention import available_backends
from radixlm.sched.schedule_policy import POLICIES

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerArgs:
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    dtype: str = "auto"
    context_length: Optional[int] = None
    device: str = "auto"
    load_format: str = "auto"
    trust_remote_code: bool = False
    skip_tokenizer_init: bool = False
    show_progress: bool = False  # progress bar while loading weights (the server turns it on)
    # memory and scheduling
    mem_fraction_static: float = 0.88
    max_total_tokens: Optional[int] = None
    max_running_requests: Optional[int] = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: Optional[int] = 8192
    schedule_policy: str = "lpm"
    schedule_conservativeness: float = 1.0
    disable_radix_cache: bool = False
    page_size: int = 1
    attention_backend: str = "auto"
    random_seed: int = 0
    enable_mixed_chunk: bool = False
    # CUDA graphs for decode (CUDA + triton attention): batches up to cuda_graph_max_bs (None: 160, or 8
    # on GPUs under 25 GiB; capped at max_running_requests)
    cuda_graph_max_bs: Optional[int] = None
    disable_cuda_graph: bool = False
    # overlap scheduling: decode step N+1 computes while step N's results are processed (SGLang's default)
    disable_overlap_schedule: bool = False
    # structured generation
    grammar_backend: str = "xgrammar"
    disable_jump_forward: bool = False
    constrained_json_disable_any_whitespace: bool = False
    constrained_json_max_whitespace: Optional[int] = 4  # per whitespace run, so a weak model cannot pad
    # tool calling (OpenAI chat API): hermes / qwen25 / qwen / llama3; None = from the chat template
    # (hermes when it contains "<tool_call>", else llama3)
    tool_call_parser: Optional[str] = None
    # server
    host: str = "127.0.0.1"
    port: int = 30000
    served_model_name: Optional[str] = None
    api_key: Optional[str] = None
    log_level: str = "info"
    log_requests: bool = False
    stream_interval: int = 1
    enable_metrics: bool = False
    max_queued_requests: Optional[int] = None
    # CORS: comma-separated allowed origins ("*" for any); None = no CORS headers at all
    cors_allow_origins: Optional[str] = None
    # hardening limits (docs/limits.md): every one is answered with a 4xx naming the field
    max_request_body_bytes: int = 32 * 1024 * 1024  # HTTP body size; larger -> 413
    max_n: int = 128  # parallel samples of one prompt (`n`)
    max_batch_prompts: int = 1024  # prompts in one batched request (text / input_ids lists)
    max_top_logprobs_num: int = 20  # native top_logprobs_num and OpenAI top_logprobs
    max_stop_strings: int = 64  # entries of `stop`
    max_stop_string_len: int = 1024  # characters of each stop string
    max_grammar_bytes: int = 128 * 1024  # regex / ebnf / json_schema text
    grammar_compile_timeout: float = 30.0  # seconds; a slower compile fails its request with a 400
    grammar_cache_size: int = 256  # compiled grammars kept (LRU)
    # debug: fail the scheduler on a KV-ownership invariant violation (checked when idle) instead of
    # logging and counting it
    enable_debug_integrity_check: bool = False

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"{field}: {why}")

        if self.model_path is None:
            bad("model_path", "is required")
        if not (0 < self.mem_fraction_static < 1):
            bad("mem_fraction_static", "must be in (0, 1)")
        for name in ("max_total_tokens", "max_running_requests", "context_length", "max_queued_requests",
                     "cuda_graph_max_bs"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, "must be at least 1")
        if self.max_prefill_tokens < 1:
            bad("max_prefill_tokens", "must be at least 1")
        for name in ("max_request_body_bytes", "max_n", "max_batch_prompts", "max_stop_strings",
                     "max_stop_string_len", "max_grammar_bytes", "grammar_cache_size"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.max_top_logprobs_num < 0:
            bad("max_top_logprobs_num", "must be at least 0")
        if not self.grammar_compile_timeout > 0:
            bad("grammar_compile_timeout", "must be positive")
        if self.page_size < 1:
            bad("page_size", "must be at least 1")
        if self.schedule_conservativeness <= 0:
            bad("schedule_conservativeness", "must be positive")
        if self.schedule_policy not in POLICIES:
            bad("schedule_policy", f"{self.schedule_policy!r} is not one of {', '.join(POLICIES)}")
        if self.attention_backend not in available_backends():
            bad("attention_backend", f"{self.attention_backend!r} is not one of {', '.join(available_backends())}")
        from radixlm.constrained import GRAMMAR_BACKENDS

        if self.grammar_backend not in GRAMMAR_BACKENDS:
            bad("grammar_backend", f"{self.grammar_backend!r} is not one of {', '.join(GRAMMAR_BACKENDS)}")
        if self.constrained_json_max_whitespace is not None and self.constrained_json_max_whitespace < 0:
            bad("constrained_json_max_whitespace", "must be at least 0")
        if self.tool_call_parser is not None:
            from radixlm.entrypoints.openai.tool_parser import TOOL_CALL_PARSERS

            if self.tool_call_parser not in TOOL_CALL_PARSERS:
                bad("tool_call_parser", f"{self.tool_call_parser!r} is not one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            bad("load_format", f"{self.load_format!r} is not one of auto, safetensors, dummy")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("device", f"{self.device!r} is not one of auto, cpu, cuda")
        if self.log_level.lower() not in LOG_LEVELS:
            bad("log_level", f"{self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.stream_interval < 1:
            bad("stream_interval", "must be at least 1")
        if not (0 <= self.port < 65536):
            bad("port", "must be in [0, 65535]")

    def replace(self, **kw) -> "ServerArgs":
        return dataclasses.replace(self, **kw)

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path
