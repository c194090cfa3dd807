"""`python -m radixlm.launch_server --model-path DIR [flags]`: SGLang's flag names and meanings."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from radixlm.server_args import ServerArgs


def make_parser() -> argparse.ArgumentParser:
    d = ServerArgs.__dataclass_fields__
    p = argparse.ArgumentParser(prog="radixlm.launch_server",
                                description="Start the radixlm HTTP server (OpenAI-compatible and SGLang-native API).")
    p.add_argument("--model-path", required=True, help="Local HF checkpoint directory (config.json, *.safetensors).")
    p.add_argument("--tokenizer-path", default=None, help="Tokenizer directory (default: --model-path).")
    p.add_argument("--host", default=d["host"].default, help="Address to bind (default %(default)s).")
    p.add_argument("--port", type=int, default=d["port"].default, help="Port to bind (default %(default)s).")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                   help="Weight and activation dtype; auto = the checkpoint's (bfloat16 for float32 ones on CUDA).")
    p.add_argument("--context-length", type=int, default=None,
                   help="Maximum context length (default: the model's max_position_embeddings).")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy = random weights of the config's shape, no weight file read (benchmarks).")
    p.add_argument("--trust-remote-code", action="store_true", help="Allow custom tokenizer code in the checkpoint.")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="No tokenizer: requests must carry input_ids, responses carry no text.")
    p.add_argument("--mem-fraction-static", type=float, default=d["mem_fraction_static"].default,
                   help="Fraction of GPU memory for weights + KV cache pool (default %(default)s).")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV cache pool size in tokens (overrides --mem-fraction-static).")
    p.add_argument("--max-running-requests", type=int, default=None, help="Maximum requests decoding at once.")
    p.add_argument("--max-queued-requests", type=int, default=None,
                   help="Load shedding: answer 503 when more than max-running + this many requests are in flight.")
    p.add_argument("--max-prefill-tokens", type=int, default=d["max_prefill_tokens"].default,
                   help="Token budget of one prefill batch (default %(default)s).")
    p.add_argument("--chunked-prefill-size", type=int, default=d["chunked_prefill_size"].default,
                   help="Split long prompts into chunks of this many tokens; -1 disables (default %(default)s).")
    p.add_argument("--schedule-policy", default="lpm", choices=["lpm", "fcfs", "dfs-weight", "random", "lof"],
                   help="Order of waiting requests: lpm = longest cached prefix first (default).")
    p.add_argument("--schedule-conservativeness", type=float, default=1.0,
                   help="Scales the KV reserved for future decode tokens when admitting (higher = fewer retractions).")
    p.add_argument("--enable-mixed-chunk", action="store_true",
                   help="Running requests decode inside prefill steps instead of waiting for them.")
    p.add_argument("--disable-radix-cache", action="store_true", help="Turn off prefix reuse (for ablation).")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="Largest decode batch replayed from a CUDA graph (default: 160, or 8 on GPUs under 25 GiB; "
                        "never above --max-running-requests). CUDA with the triton attention backend only.")
    p.add_argument("--disable-cuda-graph", action="store_true",
                   help="Run every decode step eagerly, without CUDA graphs (for debugging or ablation).")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="Process each decode step's results before launching the next, instead of while it "
                        "computes (for debugging or ablation). Overlap needs --page-size 1.")
    p.add_argument("--page-size", type=int, default=1, help="Tokens per KV page (default 1).")
    p.add_argument("--attention-backend", default="auto", help="auto, torch_native (triton on CUDA when available).")
    p.add_argument("--random-seed", type=int, default=0, help="Seed for weights (dummy) and unseeded sampling.")
    p.add_argument("--grammar-backend", default="xgrammar", choices=["xgrammar", "none"],
                   help="Backend for regex / json_schema / ebnf constraints; none disables them.")
    p.add_argument("--disable-jump-forward", action="store_true",
                   help="Decode grammar-forced text token by token instead of appending it at once (ablation).")
    p.add_argument("--constrained-json-disable-any-whitespace", action="store_true",
                   help="JSON constraints allow no free whitespace (compact separators only).")
    p.add_argument("--constrained-json-max-whitespace", type=int, default=4,
                   help="Longest whitespace run a JSON constraint allows (default %(default)s), so a weak model "
                        "cannot pad its answer until max_new_tokens.")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "qwen25", "qwen", "llama3"],
                   help="Format of tool calls in the model's output (chat API tools): hermes / qwen25 / qwen = "
                        "<tool_call>{json}</tool_call> blocks, llama3 = Llama-3.1 JSON calls. Default: hermes when "
                        "the chat template contains <tool_call>, else llama3.")
    p.add_argument("--served-model-name", default=None, help="Model name in the OpenAI API (default: model path).")
    p.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every API route.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="Logging level.")
    p.add_argument("--log-requests", action="store_true", help="Log every request's ids.")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="Send a streaming chunk every N tokens (default 1).")
    p.add_argument("--enable-metrics", action="store_true", help="Serve Prometheus metrics at /metrics.")
    p.add_argument("--cors-allow-origins", default=None,
                   help="Send CORS headers for these origins (comma-separated; '*' for any). Default: no CORS.")
    lim = p.add_argument_group("limits", "Every limit is answered with a 4xx naming the field (docs/limits.md).")
    lim.add_argument("--max-request-body-bytes", type=int, default=d["max_request_body_bytes"].default,
                     help="Largest HTTP request body; larger bodies get 413 (default %(default)s).")
    lim.add_argument("--max-n", type=int, default=d["max_n"].default,
                     help="Most parallel samples (n) of one prompt (default %(default)s).")
    lim.add_argument("--max-batch-prompts", type=int, default=d["max_batch_prompts"].default,
                     help="Most prompts in one batched request (default %(default)s).")
    lim.add_argument("--max-top-logprobs-num", type=int, default=d["max_top_logprobs_num"].default,
                     help="Largest top_logprobs_num / top_logprobs (default %(default)s, OpenAI's cap).")
    lim.add_argument("--max-stop-strings", type=int, default=d["max_stop_strings"].default,
                     help="Most stop strings in one request (default %(default)s).")
    lim.add_argument("--max-stop-string-len", type=int, default=d["max_stop_string_len"].default,
                     help="Longest stop string in characters (default %(default)s).")
    lim.add_argument("--max-grammar-bytes", type=int, default=d["max_grammar_bytes"].default,
                     help="Largest regex / ebnf / json_schema text in bytes (default %(default)s).")
    lim.add_argument("--grammar-compile-timeout", type=float, default=d["grammar_compile_timeout"].default,
                     help="Seconds a grammar may take to compile before its request fails (default %(default)s).")
    lim.add_argument("--grammar-cache-size", type=int, default=d["grammar_cache_size"].default,
                     help="Compiled grammars kept, least recently used dropped first (default %(default)s).")
    p.add_argument("--enable-debug-integrity-check", action="store_true",
                   help="Stop the scheduler when a KV-ownership invariant is violated (default: log and count it).")
    return p


def parse_args(argv: Optional[List[str]] = None) -> ServerArgs:
    ns = make_parser().parse_args(argv)
    kw = vars(ns)
    if kw["chunked_prefill_size"] is not None and kw["chunked_prefill_size"] <= 0:
        kw["chunked_prefill_size"] = None
    try:
        return ServerArgs(show_progress=True, **kw)
    except ValueError as e:
        make_parser().error(str(e))


def main(argv: Optional[List[str]] = None) -> None:
    from radixlm.entrypoints.http_server import launch_server

    args = parse_args(argv)
    try:
        launch_server(args)
    except RuntimeError as e:
        print(f"radixlm: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
