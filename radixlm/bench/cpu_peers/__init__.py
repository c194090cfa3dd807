"""radixlm vs llama.cpp vs HF transformers on one CPU machine, back to back, same token-id prompts.

    python -m radixlm.bench.cpu_peers                      # the five tools x five workloads of issue 18
    python -m radixlm.bench.cpu_peers --quick --tools llama-f32,radixlm-fp32 --workloads decode,agent

Tools (each with `--threads` threads, greedy, end-of-sequence suppressed, one after another):
`hf` (transformers `generate`, fp32, in this process: radixlm/bench/hf_peer.py), `llama-f32` / `llama-f16`
(llama.cpp `llama-server` on a GGUF converted from the same checkpoint, in its prompt-caching configuration:
`--llama-args`), `llama-f32-stock` / `llama-f16-stock` (llama-server's default slots, opt-in), `radixlm-fp32` /
`radixlm-bf16` (`launch_server --dtype ...`). Servers are driven by bench_serving's clients (`--backend radixlm`,
`--backend llama-cpp`).

Workloads (`--quick`: smaller, for a short run), the prompts from radixlm/bench/datasets.py with one seed:
`decode` single-stream decode tok/s; `ttft` TTFT of a 2048-token prompt; `concurrent` 32 requests (256 in, 64
out), all in flight, output tok/s; `shared` 1024 shared + 64 new tokens x 16 sequential, mean TTFT (HF also with the
prefix's KV reused by hand); `agent` 8 interleaved sessions x 4 turns (one request in flight), mean TTFT and by
turn. The model: an 88M Llama (hidden 768, 12 layers, GQA 12/4, intermediate 2048, vocab 8000, random weights),
generated once at --model-path if missing. Writes a markdown table with ratios (+ JSON with every metric), with
the load average and wall time, since the machine may be shared.
"""
