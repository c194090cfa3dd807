"""ServerArgs: every engine/server option, with SGLang's names and meanings, declared once.

Each field carries its default, its help text, its choices (a tuple, or a registry looked up
lazily) and its bounds; from these the command line (`launch_server.make_parser`) is generated and
`__post_init__` validates, so `Engine(**kwargs)` and `launch_server --flag` accept and reject
exactly the same values. The internal configs (`SchedulerConfig`, `RunnerConfig`) are derived from
it with `derive_config`, and take their defaults from it with `default_of`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DEFAULT_MAX_RUNNING_REQUESTS = 256  # when max_running_requests is not given
# Serving defaults that differ by device (docs/benchmarks.md, "CPU serving path"): on a CPU a prefill step
# costs ~0.5 ms per token, so an 8192-token step stalls every running stream for seconds; mixed chunk keeps
# them decoding inside prefill steps; overlap scheduling's worker thread competes with torch's intra-op
# threads for the cores and measured slower there.
DEFAULT_CHUNKED_PREFILL_SIZE = 8192
CPU_CHUNKED_PREFILL_SIZE = 512
DISAGGREGATION_MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("tcp", "mooncake", "nixl")
SPECULATIVE_ALGORITHMS = ("NGRAM", "STANDALONE")
SPECULATIVE_DEFAULT_STEPS = {"NGRAM": 7, "STANDALONE": 3}  # SGLang's STANDALONE default is 3 / 1 / 4

Choices = Union[Tuple[str, ...], Callable[[], Any]]


def _policies():
    from radixlm.sched.schedule_policy import POLICIES

    return POLICIES


def _attention_backends():
    from radixlm.attention import available_backends

    return available_backends()


def _moe_runner_backends():
    from radixlm.layers.moe.fused_moe import MOE_RUNNER_BACKENDS

    return MOE_RUNNER_BACKENDS


def _grammar_backends():
    from radixlm.constrained import GRAMMAR_BACKENDS

    return GRAMMAR_BACKENDS


def _quantization_methods():
    from radixlm.layers.quantization import QUANTIZATION_METHODS

    return QUANTIZATION_METHODS


def _tool_call_parsers():
    from radixlm.entrypoints.openai.tool_parser import TOOL_CALL_PARSERS

    return TOOL_CALL_PARSERS


def _reasoning_parsers():
    from radixlm.entrypoints.openai.reasoning_parser import REASONING_PARSERS

    return REASONING_PARSERS


def opt(default: Any, help: str, *, choices: Optional[Choices] = None, ge: Optional[float] = None,
        le: Optional[float] = None, group: Optional[str] = None, cli: bool = True, positive: bool = False,
        aliases: Tuple[str, ...] = ()):
    """A ServerArgs field: default, help text (flag's `--help`), choices, inclusive bounds
    (`positive`: strictly above 0), argument group, whether the command line has it, and other
    spellings of its flag (SGLang's aliases)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "ge": ge, "le": le, "group": group, "cli": cli,
        "positive": positive, "aliases": aliases})


def choices_of(f: dataclasses.Field) -> Optional[Tuple[str, ...]]:
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


@dataclass(frozen=True)
class ServerArgs:
    # model
    model_path: Optional[str] = opt(None, "Local HF checkpoint directory (config.json, *.safetensors), or a "
                                          "Hugging Face hub id (org/name; downloaded to the hub cache, HF_HOME "
                                          "and HF_HUB_OFFLINE respected).")
    revision: Optional[str] = opt(None, "Hub revision (branch, tag or commit) of a hub id --model-path.")
    hub_model_id: Optional[str] = opt(None, "The hub id model_path was resolved from (set by the loader).",
                                      cli=False)
    tokenizer_path: Optional[str] = opt(None, "Tokenizer directory (default: --model-path).")
    dtype: str = opt("auto", "Weight and activation dtype; auto = the checkpoint's (bfloat16 for float32 ones "
                             "on CUDA).", choices=DTYPES)
    context_length: Optional[int] = opt(None, "Maximum context length (default: the model's "
                                              "max_position_embeddings).", ge=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")
    load_format: str = opt("auto", "dummy = random weights of the config's shape, no weight file read "
                                   "(benchmarks).", choices=LOAD_FORMATS)
    quantization: Optional[str] = opt(None, "Weight quantization: fp8 = block-quantize a bf16/fp32 checkpoint's "
                                            "linear layers to FP8 (e4m3, 128x128 blocks) while loading. An FP8 "
                                            "checkpoint (quantization_config in config.json) needs no flag.",
                                      choices=_quantization_methods)
    trust_remote_code: bool = opt(False, "Allow custom tokenizer code in the checkpoint.")
    skip_tokenizer_init: bool = opt(False, "No tokenizer: requests must carry input_ids, responses carry no "
                                           "text.")
    sampling_defaults: str = opt("model", "Sampling defaults for fields a request leaves unset: model = the "
                                          "checkpoint's generation_config.json (temperature, top_p, top_k, min_p, "
                                          "repetition_penalty), openai = the plain defaults.",
                                 choices=("model", "openai"))
    chat_template: Optional[str] = opt(None, "Chat template for the chat API (and the frontend language): a file "
                                             "(Jinja, or JSON with a chat_template key) or a built-in name "
                                             "(chatml). Default: the tokenizer's.")
    show_progress: bool = opt(False, "Progress bar while loading weights (the server turns it on).", cli=False)
    # memory and scheduling
    mem_fraction_static: float = opt(0.88, "Fraction of GPU memory for weights + KV cache pool.",
                                     positive=True, le=0.999)
    max_total_tokens: Optional[int] = opt(None, "KV cache pool size in tokens (overrides "
                                                "--mem-fraction-static).", ge=1)
    max_running_requests: Optional[int] = opt(None, "Maximum requests decoding at once (default "
                                                    f"{DEFAULT_MAX_RUNNING_REQUESTS}).", ge=1)
    max_queued_requests: Optional[int] = opt(None, "Load shedding: answer 503 when more than max-running + "
                                                   "this many requests are in flight.", ge=1)
    max_prefill_tokens: int = opt(16384, "Token budget of one prefill batch.", ge=1)
    chunked_prefill_size: Optional[int] = opt(None, "Split long prompts into chunks of this many tokens; it also "
                                                    "bounds the prompt tokens of one prefill step. -1 disables. "
                                                    f"Default: {DEFAULT_CHUNKED_PREFILL_SIZE}, on a CPU "
                                                    f"{CPU_CHUNKED_PREFILL_SIZE}.")
    schedule_policy: str = opt("lpm", "Order of waiting requests: lpm = longest cached prefix first.",
                               choices=_policies)
    schedule_conservativeness: float = opt(1.0, "Scales the KV reserved for future decode tokens when "
                                                "admitting (higher = fewer retractions).", positive=True)
    enable_mixed_chunk: Optional[bool] = opt(None, "Running requests decode inside prefill steps instead of "
                                                   "waiting for them. Default: on for a CPU, off on GPUs; "
                                                   "`--enable-mixed-chunk false` turns it off.")
    disable_radix_cache: bool = opt(False, "Turn off prefix reuse (for ablation).")
    page_size: int = opt(1, "Tokens per KV page.", ge=1)
    attention_backend: str = opt("auto", "auto = triton on CUDA when available, else torch_native.",
                                 choices=_attention_backends)
    moe_runner_backend: str = opt("auto", "Runner of Mixture-of-Experts layers: triton = fused grouped-GEMM "
                                          "kernel (CUDA), torch_grouped = tokens sorted by expert, one matmul "
                                          "per expert, torch_reference = plain loop over experts; auto = triton "
                                          "on CUDA, else torch_grouped.",
                                  choices=_moe_runner_backends)
    random_seed: int = opt(0, "Seed for weights (dummy) and unseeded sampling.")
    cuda_graph_max_bs: Optional[int] = opt(None, "Largest decode batch replayed from a CUDA graph (default: "
                                                 "160, or 8 on GPUs under 25 GiB; never above "
                                                 "--max-running-requests). CUDA with the triton attention "
                                                 "backend only.", ge=1)
    disable_cuda_graph: bool = opt(False, "Run every decode step eagerly, without CUDA graphs (for debugging "
                                          "or ablation).")
    enable_torch_compile: bool = opt(False, "CPU: run decode steps of up to --torch-compile-max-bs requests "
                                            "through torch.compile (inductor; one compile per batch-size bucket "
                                            "at its first use, tens of seconds each on 2 cores; each bucket "
                                            "holds its own prepacked weight copy). torch_native attention, no "
                                            "LoRA, tensor parallelism or sliding windows.")
    torch_compile_max_bs: Optional[int] = opt(None, "Largest decode batch run compiled with "
                                                    "--enable-torch-compile (default 32; never above "
                                                    "--max-running-requests).", ge=1)
    disable_overlap_schedule: Optional[bool] = opt(None, "Process each decode step's results before launching "
                                                         "the next, instead of while it computes. Default: overlap "
                                                         "on GPUs, none on a CPU (measured slower there); "
                                                         "`--disable-overlap-schedule false` overlaps on a CPU too. "
                                                         "Overlap needs --page-size 1.")
    enable_priority_scheduling: bool = opt(False, "Order waiting requests by their `priority` field first (higher "
                                                  "values first), then by the schedule policy.")
    schedule_low_priority_values_first: bool = opt(False, "With --enable-priority-scheduling: lower `priority` "
                                                          "values go first.")
    # parallelism (SGLang's names)
    tp_size: int = opt(1, "Tensor parallelism: ranks one model is split across.", ge=1,
                       aliases=("--tp", "--tensor-parallel-size"), group="parallelism")
    dp_size: int = opt(1, "Data parallelism: replicas launched behind sglang-router (pip install sglang-router).",
                       ge=1, aliases=("--dp", "--data-parallel-size"), group="parallelism")
    nnodes: int = opt(1, "Nodes a tensor-parallel group spans.", ge=1, group="parallelism")
    node_rank: int = opt(0, "This node's index among --nnodes.", ge=0, group="parallelism")
    dist_init_addr: Optional[str] = opt(None, "host:port of rank 0 for torch.distributed (default: a free port on "
                                              "127.0.0.1).", aliases=("--nccl-init-addr",), group="parallelism")
    router_policy: str = opt("cache_aware", "sglang-router policy in front of --dp-size replicas.",
                             choices=("cache_aware", "round_robin", "power_of_two", "random"), group="parallelism")
    router_args: Optional[str] = opt(None, "Extra sglang-router flags, passed through as one string (e.g. "
                                           "\"--cb-failure-threshold 10 --health-check-interval-secs 5\").",
                                     group="parallelism")
    # structured generation and tool calls
    disaggregation_mode: str = opt("null", "Prefill/decode disaggregation role: null = a plain server; prefill = "
                                   "compute prompts and send their KV to decode workers (bootstrap server on "
                                   "--disaggregation-bootstrap-port); decode = receive the KV and decode. Driven "
                                   "by sglang-router --pd-disaggregation.", choices=DISAGGREGATION_MODES,
                                   group="disaggregation")
    disaggregation_bootstrap_port: int = opt(8998, "Prefill worker: port of its bootstrap server (decode workers "
                                                   "register there and receive the KV over it).", ge=1, le=65535,
                                             group="disaggregation")
    disaggregation_transfer_backend: str = opt("tcp", "KV transfer backend: tcp = ZeroMQ over TCP (CPU or GPU, any "
                                                      "network). mooncake and nixl are not implemented.",
                                               choices=TRANSFER_BACKENDS, group="disaggregation")
    disaggregation_timeout: float = opt(5.0, "Seconds a PD request waits for its peer (registration, KV, "
                                             "acknowledgement, keep-alives) before it is aborted and its KV freed.",
                                        positive=True, le=3600, group="disaggregation")
    disaggregation_max_inflight_bytes: int = opt(16 * 1024 * 1024, "Prefill worker: most KV bytes sent to a "
                                                 "decode worker and not yet acknowledged, per request.",
                                                 ge=4096, group="disaggregation")
    grammar_backend: str = opt("xgrammar", "Backend for regex / json_schema / ebnf constraints; none disables "
                                           "them.", choices=_grammar_backends)
    disable_jump_forward: bool = opt(False, "Decode grammar-forced text token by token instead of appending "
                                            "it at once (ablation).")
    constrained_json_disable_any_whitespace: bool = opt(False, "JSON constraints allow no free whitespace "
                                                               "(compact separators only).")
    constrained_json_max_whitespace: Optional[int] = opt(4, "Longest whitespace run a JSON constraint allows, "
                                                            "so a weak model cannot pad its answer until "
                                                            "max_new_tokens.", ge=0)
    tool_call_parser: Optional[str] = opt(None, "Format of tool calls in the model's output (chat API tools): "
                                                "hermes / qwen25 / qwen = <tool_call>{json}</tool_call> blocks, "
                                                "llama3 = Llama-3.1 JSON calls. Default: hermes when the chat "
                                                "template contains <tool_call>, else llama3.",
                                          choices=_tool_call_parsers)
    reasoning_parser: Optional[str] = opt(None, "Split the model's <think>...</think> block off its answer in chat "
                                                "completions (message.reasoning_content / delta.reasoning_content): "
                                                "deepseek-r1 (the output starts inside the block), qwen3 (inside it "
                                                "unless chat_template_kwargs.enable_thinking is false).",
                                          choices=_reasoning_parsers)
    # multi-LoRA (radixlm/lora/)
    enable_lora: bool = opt(False, "Serve LoRA adapters of the base model (on when --lora-paths is given).",
                                      group="lora")
    lora_paths: Optional[Tuple[str, ...]] = opt(None, "Adapters to load at start-up: NAME=PATH (a PEFT directory: "
                                                      "adapter_config.json + adapter_model.safetensors) or PATH.",
                                                group="lora")
    max_loras_per_batch: int = opt(8, "Adapter slots on the device: most distinct adapters in one batch (the "
                                      "base model counts as one).", ge=1, group="lora")
    max_lora_rank: Optional[int] = opt(None, "Largest adapter rank (default: the largest of --lora-paths, or 64).",
                                       ge=1, group="lora")
    lora_target_modules: Optional[Tuple[str, ...]] = opt(None, "Modules adapters may target: q_proj k_proj v_proj "
                                                               "o_proj gate_proj up_proj down_proj qkv_proj "
                                                               "gate_up_proj all (default: those of --lora-paths, "
                                                               "all when none).", group="lora")
    lora_backend: str = opt("auto", "LoRA kernels: torch (segment-grouped matmuls), triton (segmented GEMM "
                                    "kernels, CUDA); auto = triton on CUDA.", choices=("auto", "torch", "triton"),
                            group="lora")
    # speculative decoding (SGLang's names; radixlm/speculative/)
    speculative_algorithm: Optional[str] = opt(None, "Speculative decoding: NGRAM drafts from n-gram matches in the "
                                                     "request's own prompt and output (no model); STANDALONE drafts "
                                                     "with a small model (--speculative-draft-model-path). Turns "
                                                     "overlap scheduling off.",
                                               choices=SPECULATIVE_ALGORITHMS, group="speculative decoding")
    speculative_draft_model_path: Optional[str] = opt(None, "The STANDALONE draft model (same tokenizer and "
                                                            "vocabulary as the target).",
                                                      aliases=("--speculative-draft-model",),
                                                      group="speculative decoding")
    speculative_num_steps: Optional[int] = opt(None, "Draft tokens proposed per verify step (default: STANDALONE "
                                                     "3, NGRAM 7; with topk 1 it is num_draft_tokens - 1).", ge=1,
                                               le=64, group="speculative decoding")
    speculative_eagle_topk: Optional[int] = opt(None, "Draft branches per step; only 1 (a chain of drafts) is "
                                                      "supported.", ge=1, group="speculative decoding")
    speculative_num_draft_tokens: Optional[int] = opt(None, "Tokens one verify forward computes per request: the "
                                                            "last token plus the drafts (num_steps + 1).", ge=2,
                                                      le=65, group="speculative decoding")
    speculative_ngram_max_trie_depth: int = opt(18, "NGRAM: the longest suffix n-gram matched against the "
                                                    "request's earlier tokens (the longest match wins, then the "
                                                    "most recent occurrence).", ge=1, le=64,
                                                group="speculative decoding")
    # server
    host: str = opt("127.0.0.1", "Address to bind.")
    port: int = opt(30000, "Port to bind.", ge=0, le=65535)
    served_model_name: Optional[str] = opt(None, "Model name in the OpenAI API (default: model path).")
    api_key: Optional[str] = opt(None, "Require 'Authorization: Bearer KEY' on every API route.")
    log_level: str = opt("info", "Logging level.", choices=LOG_LEVELS)
    log_requests: bool = opt(False, "Log every request's ids.")
    stream_interval: int = opt(1, "Send a streaming chunk every N tokens.", ge=1)
    enable_metrics: bool = opt(False, "Serve Prometheus metrics at /metrics.")
    cors_allow_origins: Optional[str] = opt(None, "Send CORS headers for these origins (comma-separated; '*' "
                                                  "for any). Default: no CORS.")
    enable_debug_integrity_check: bool = opt(False, "Stop the scheduler when a KV-ownership invariant is "
                                                    "violated (default: log and count it).")
    # limits: every one is answered with a 4xx naming the field (docs/limits.md)
    max_request_body_bytes: int = opt(32 * 1024 * 1024, "Largest HTTP request body; larger bodies get 413.",
                                      ge=1, group="limits")
    max_n: int = opt(128, "Most parallel samples (n) of one prompt.", ge=1, group="limits")
    max_batch_prompts: int = opt(1024, "Most prompts in one batched request.", ge=1, group="limits")
    max_top_logprobs_num: int = opt(20, "Largest top_logprobs_num / top_logprobs (OpenAI's cap).", ge=0,
                                    group="limits")
    max_stop_strings: int = opt(64, "Most stop strings in one request.", ge=1, group="limits")
    max_stop_string_len: int = opt(1024, "Longest stop string in characters.", ge=1, group="limits")
    max_grammar_bytes: int = opt(128 * 1024, "Largest regex / ebnf / json_schema text in bytes.", ge=1,
                                 group="limits")
    grammar_compile_timeout: float = opt(30.0, "Seconds a grammar may take to compile before its request "
                                               "fails.", positive=True, group="limits")
    grammar_cache_size: int = opt(256, "Compiled grammars kept, least recently used dropped first.", ge=1,
                                  group="limits")

    def __post_init__(self):
        if self.model_path is None:
            raise ValueError("model_path: is required")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size <= 0:  # -1 (SGLang): no chunks
            object.__setattr__(self, "chunked_prefill_size", -1)
        if isinstance(self.log_level, str):
            object.__setattr__(self, "log_level", self.log_level.lower())
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        self._check_lora()
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank: {self.node_rank} is not below nnodes ({self.nnodes})")
        if self.tp_size % self.nnodes:
            raise ValueError(f"tp_size: {self.tp_size} is not divisible by nnodes ({self.nnodes})")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("dist_init_addr: required with nnodes > 1 (host:port of rank 0, reachable from "
                             "every node)")
        self._check_disaggregation()
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        self._resolve_speculative()

    def _resolve_speculative(self) -> None:
        """Checks the speculative flags and fills num_steps / eagle_topk / num_draft_tokens (a chain of
        drafts: num_draft_tokens = num_steps + 1)."""
        algo = self.speculative_algorithm
        if algo is None:
            for name in ("speculative_draft_model_path", "speculative_num_steps", "speculative_eagle_topk",
                         "speculative_num_draft_tokens"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: needs --speculative-algorithm")
            return
        if algo == "STANDALONE" and not self.speculative_draft_model_path:
            raise ValueError("speculative_draft_model_path: required with --speculative-algorithm STANDALONE")
        # combinations not built or tested together: refused rather than silently wrong
        if self.enable_lora or self.lora_paths:
            raise ValueError("speculative_algorithm: speculative decoding with LoRA adapters is not supported")
        if self.disaggregation_mode != "null":
            raise ValueError("speculative_algorithm: speculative decoding on a PD disaggregation worker is not "
                             "supported")
        if algo != "STANDALONE" and self.speculative_draft_model_path:
            raise ValueError(f"speculative_draft_model_path: {algo} uses no draft model")
        if self.speculative_eagle_topk not in (None, 1):
            raise ValueError(f"speculative_eagle_topk: {self.speculative_eagle_topk} is not supported; radixlm "
                             "drafts one chain (topk 1)")
        steps, n = self.speculative_num_steps, self.speculative_num_draft_tokens
        if steps is not None and n is not None and n != steps + 1:
            raise ValueError(f"speculative_num_draft_tokens: {n} must be speculative_num_steps + 1 = {steps + 1} "
                             "with topk 1")
        steps = steps if steps is not None else (n - 1 if n is not None else SPECULATIVE_DEFAULT_STEPS[algo])
        object.__setattr__(self, "speculative_num_steps", steps)
        object.__setattr__(self, "speculative_eagle_topk", 1)
        object.__setattr__(self, "speculative_num_draft_tokens", steps + 1)
        if self.page_size != 1:
            raise ValueError("page_size: speculative decoding needs --page-size 1 (rejected drafts free single "
                             "slots)")
        if algo == "STANDALONE" and self.tp_size > 1:
            raise ValueError("tp_size: STANDALONE speculative decoding runs with tp_size 1 only")

    def _check_disaggregation(self) -> None:
        if self.disaggregation_transfer_backend != "tcp":
            from radixlm.disaggregation.transfer import check_backend

            check_backend(self.disaggregation_transfer_backend)
        if self.disaggregation_mode == "null":
            return
        if self.tp_size > 1 or self.dp_size > 1:
            raise ValueError(f"disaggregation_mode: {self.disaggregation_mode} with tp_size {self.tp_size} / dp_size "
                             f"{self.dp_size} is not supported (PD workers run one rank each; start more workers "
                             "behind the router instead)")

    def _check_lora(self) -> None:
        for name in ("lora_paths", "lora_target_modules"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
        if self.lora_paths:  # SGLang: adapters given turn LoRA on
            object.__setattr__(self, "enable_lora", True)
        if not self.enable_lora:
            return
        from radixlm.lora.adapter import TARGET_CHOICES
        from radixlm.lora.manager import parse_lora_paths

        parse_lora_paths(self.lora_paths)  # NAME=PATH items, names unique
        bad = [m for m in self.lora_target_modules or () if m not in TARGET_CHOICES]
        if bad:
            raise ValueError(f"lora_target_modules: {', '.join(map(repr, bad))} not among {', '.join(TARGET_CHOICES)}")
        if self.tp_size > 1:
            raise ValueError("enable_lora: LoRA adapters are supported with tp_size 1 only")

    def replace(self, **kw) -> "ServerArgs":
        return dataclasses.replace(self, **kw)

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def on_cpu(self) -> bool:
        return self.resolved_device == "cpu"

    @property
    def resolved_chunked_prefill_size(self) -> Optional[int]:
        """Tokens per prefill chunk and step (None: no chunking): the flag, else the device's default."""
        if self.chunked_prefill_size is None:
            return CPU_CHUNKED_PREFILL_SIZE if self.on_cpu else DEFAULT_CHUNKED_PREFILL_SIZE
        return None if self.chunked_prefill_size <= 0 else self.chunked_prefill_size

    @property
    def resolved_enable_mixed_chunk(self) -> bool:
        return self.on_cpu if self.enable_mixed_chunk is None else self.enable_mixed_chunk

    @property
    def resolved_enable_overlap(self) -> bool:
        """Overlap scheduling: on unless --disable-overlap-schedule; by default off on a CPU."""
        if self.disable_overlap_schedule is None:
            return not self.on_cpu
        return not self.disable_overlap_schedule

    @property
    def resolved_tokenizer_path(self) -> str:
        return self.tokenizer_path or self.model_path

    @property
    def resolved_max_running_requests(self) -> int:
        return self.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS


def check_field(f: dataclasses.Field, v: Any) -> None:
    """Raises ValueError naming the field when `v` is outside its choices or bounds."""
    if v is None:
        return
    m = f.metadata
    choices = choices_of(f)
    if choices is not None and v not in choices:
        raise ValueError(f"{f.name}: {v!r} is not one of {', '.join(choices)}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{f.name}: must be a finite number")
    if m.get("positive") and not v > 0:
        raise ValueError(f"{f.name}: must be positive")
    if m.get("ge") is not None and v < m["ge"]:
        raise ValueError(f"{f.name}: must be at least {m['ge']}")
    if m.get("le") is not None and v > m["le"]:
        raise ValueError(f"{f.name}: must be at most {m['le']}")


def default_of(name: str) -> Any:
    """ServerArgs' default for a field: internal configs take their defaults from here."""
    return ServerArgs.__dataclass_fields__[name].default


def derive_config(cls, args: ServerArgs, **values: Any):
    """An internal config dataclass from ServerArgs: every field of `cls` named like a ServerArgs
    field takes its value; `values` gives the rest (renamed or computed ones)."""
    own = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
           if f.name in ServerArgs.__dataclass_fields__ and f.name not in values}
    return cls(**own, **values)


def cli_fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ServerArgs) if f.metadata.get("cli", True)}
