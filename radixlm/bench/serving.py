"""Online serving benchmark (SGLang's bench_serving flags where they fit).

Against a running server:

    python -m radixlm.bench_serving --backend radixlm --base-url http://127.0.0.1:30000 \
        --dataset-name random --num-prompts 64 --random-input-len 256 --random-output-len 64

A llama.cpp `llama-server` (bash scripts/build_llama_server.sh) with the same token-id prompts: `--backend llama-cpp
--base-url ... --tokenizer MODEL_DIR` (radixlm vs llama.cpp vs HF in one run: python -m radixlm.bench.cpu_peers).

Side by side, launching the servers itself (radix cache on, off) and running the same workload
through HF transformers `generate` in this process, then printing the ratios:

    python -m radixlm.bench_serving --launch-server --model-path models/bench-qwen2-medium \
        --compare radix,no-radix,hf --dataset-name agent-multiturn --num-sessions 8 --num-turns 4 \
        --system-prompt-len 1500 --turn-len 150

Data parallelism behind the real sglang-router (`pip install sglang-router`), router policies side
by side (each setting launches `launch_server --dp-size N --router-policy P`; prompts go as text,
which the router's cache_aware policy matches on; cache figures are summed over the replicas the
router lists at /workers):

    python -m radixlm.bench_serving --launch-server --model-path models/bench-qwen2-medium --dp-size 2 \
        --compare cache_aware,round_robin --backend openai --dataset-name generated-shared-prefix \
        --gsp-num-groups 4 --gsp-prompts-per-group 8

Datasets: random, generated-shared-prefix, agent-multiturn, sharegpt (local JSON via --dataset-path).
Prompts are token ids (native backend: `input_ids`; openai backend: `prompt` as ids) so lengths are
token-exact. Ctrl-C prints the summary of what finished.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import httpx

from radixlm.bench import datasets as ds
from radixlm.bench.metrics import RequestResult, cache_delta, format_summary, summarize

ROUTER_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")  # --dp-size N behind sglang-router
SETTINGS = ("radix", "no-radix", "no-overlap", "overlap", "hf") + ROUTER_POLICIES
BACKENDS = ("radixlm", "sglang", "openai", "llama-cpp")
SETTING_FLAGS = {"radix": [], "no-radix": ["--disable-radix-cache"], "no-overlap": ["--disable-overlap-schedule"],
                 "overlap": ["--disable-overlap-schedule", "false"],  # (off by default on a CPU)
                 **{p: ["--router-policy", p] for p in ROUTER_POLICIES}}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="radixlm serving benchmark",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", choices=BACKENDS, default="radixlm",
                    help="radixlm/sglang: native /generate; openai: /v1/completions; llama-cpp: llama.cpp "
                         "llama-server's native /completion (token-id prompt; needs --tokenizer)")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--model", default=None, help="openai backend: model name (default: GET /v1/models)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer dir (vocab for random ids, sharegpt, openai agent history); "
                         "default: the server's model_path from /get_server_info")
    ap.add_argument("--dataset-name", choices=("random", "generated-shared-prefix", "agent-multiturn", "sharegpt"),
                    default="random")
    ap.add_argument("--dataset-path", default=None, help="sharegpt: local JSON file")
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--sharegpt-output-len", type=int, default=None)
    ap.add_argument("--sharegpt-context-len", type=int, default=None)
    ap.add_argument("--random-input-len", type=int, default=1024)
    ap.add_argument("--random-output-len", type=int, default=128)
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--gsp-num-groups", type=int, default=64)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=16)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    ap.add_argument("--gsp-question-len", type=int, default=128)
    ap.add_argument("--gsp-output-len", type=int, default=256)
    ap.add_argument("--num-sessions", type=int, default=8, help="agent-multiturn")
    ap.add_argument("--num-turns", type=int, default=4, help="agent-multiturn")
    ap.add_argument("--system-prompt-len", type=int, default=3000, help="agent-multiturn: shared system prompt")
    ap.add_argument("--turn-len", type=int, default=500, help="agent-multiturn: new tokens per turn (~)")
    ap.add_argument("--turn-output-len", type=int, default=32, help="agent-multiturn: answer tokens per turn")
    ap.add_argument("--retry-ratio", type=float, default=0.25,
                    help="agent-multiturn: share of turns (>= 2) sent again with a different last message")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests (agent: sessions) per second, Poisson; inf = all at once")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup-requests", type=int, default=1)
    ap.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run")
    ap.add_argument("--extra-request-body", default=None, help="JSON merged into every request")
    ap.add_argument("--output-file", default=None, help="append one JSON line per run")
    ap.add_argument("--output-details", action="store_true", help="include per-request results in --output-file")
    ap.add_argument("--llama-exact-ids", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                    metavar="BOOL", help="llama-cpp backend: recover the exact output ids a stream lost (tokens "
                                         "that ended mid-character) with an untimed unstreamed repeat; default: "
                                         "on for agent-multiturn, whose history is the answers' ids")
    ap.add_argument("--llama-pin-slots", type=int, default=None, metavar="N",
                    help="llama-cpp backend: pin sessions to N server slots (id_slot; the server's -np): a prompt "
                         "extending a slot's cached sequence goes there, others to unused slots; 0 = the server "
                         "chooses; default: 32 for agent-multiturn, else 0")
    ap.add_argument("--plot", default=None, help="PNG: TTFT/ITL CDFs (+ TTFT by turn depth); needs matplotlib")
    ap.add_argument("--disable-tqdm", action="store_true")
    ap.add_argument("--launch-server", action="store_true", help="start the server(s) here (needs --model-path)")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--compare", default=None,
                    help="with --launch-server: comma list of radix,no-radix,no-overlap,hf and router policies "
                         "(cache_aware,round_robin,power_of_two,random: --dp-size replicas behind sglang-router), "
                         "run side by side (no-overlap: radix with --disable-overlap-schedule)")
    ap.add_argument("--dp-size", type=int, default=2, help="replicas behind the router for the router-policy "
                                                           "settings of --compare")
    ap.add_argument("--send-text", action="store_true",
                    help="send prompts as text (decoded from the generated ids) instead of token ids; on by "
                         "default for router-policy settings (sglang-router routes on text)")
    ap.add_argument("--server-args", default="", help="extra launch_server flags for launched servers")
    ap.add_argument("--hf-batch-size", type=int, default=None, help="hf peer batch size (default: all requests)")
    ap.add_argument("--hf-agent-mode", choices=["served", "per-call"], default="served",
                    help="hf peer on agent-multiturn: 'served' = the sessions are concurrent clients of one HF worker "
                         "(first come first served; TTFT includes waiting, as on the server); 'per-call' = sessions "
                         "one after another, TTFT per generate call without any waiting (a lower bound)")
    return ap


# ---------------------------------------------------------------------------------------- workload
class Workload:
    def __init__(self, name: str, requests: Optional[List[ds.BenchRequest]] = None,
                 sessions: Optional[List[ds.AgentSession]] = None):
        self.name, self.requests, self.sessions = name, requests, sessions

    @property
    def num_requests(self) -> int:
        return ds.agent_num_requests(self.sessions) if self.sessions is not None else len(self.requests)


def load_tokenizer(path: Optional[str]):
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - not a local tokenizer dir
        return None


def build_workload(args, tokenizer) -> Workload:
    vocab = len(tokenizer) if tokenizer is not None else None
    if args.dataset_name != "sharegpt" and vocab is None:
        raise SystemExit("need the vocabulary size: pass --tokenizer DIR (or run against a radixlm server whose "
                         "model_path is local)")
    n = args.dataset_name
    if n == "random":
        return Workload(n, ds.gen_random(args.num_prompts, args.random_input_len, args.random_output_len,
                                         args.random_range_ratio, vocab, args.seed))
    if n == "generated-shared-prefix":
        sep = tokenizer.encode("\n\n", add_special_tokens=False) if tokenizer is not None else None
        return Workload(n, ds.gen_shared_prefix(args.gsp_num_groups, args.gsp_prompts_per_group,
                                                args.gsp_system_prompt_len, args.gsp_question_len,
                                                args.gsp_output_len, vocab, args.seed, sep=sep or None))
    if n == "agent-multiturn":
        return Workload(n, sessions=ds.gen_agent_sessions(args.num_sessions, args.num_turns, args.system_prompt_len,
                                                          args.turn_len, args.turn_output_len, args.retry_ratio,
                                                          vocab, args.seed))
    if not args.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path FILE.json (no downloads here)")
    if tokenizer is None:
        raise SystemExit("sharegpt needs a tokenizer: --tokenizer DIR")
    return Workload(n, ds.load_sharegpt(args.dataset_path, args.num_prompts,
                                        lambda t: tokenizer.encode(t, add_special_tokens=False),
                                        args.sharegpt_output_len, args.sharegpt_context_len, args.seed))


# ---------------------------------------------------------------------------------------- running
def _progress(total: int, disable: bool, desc: str = ""):
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc=desc, file=sys.stderr)


async def _run(send: Callable, wl: Workload, args, results: List[RequestResult], t_origin: float, pbar) -> None:
    rng = random.Random(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def one(prompt, out_len) -> RequestResult:
        if sem is None:
            return await send(prompt, out_len, t_origin)
        async with sem:
            return await send(prompt, out_len, t_origin)

    async def plain(req: ds.BenchRequest) -> None:
        r = await one(req.prompt_ids, req.output_len)
        results.append(r)
        pbar.update(1)

    async def session(sess: ds.AgentSession) -> None:
        history = list(sess.system_ids)
        for depth, turn in enumerate(sess.turns, 1):
            msgs = [(turn.new_ids, False)] + ([(turn.retry_ids, True)] if turn.retry_ids is not None else [])
            for new_ids, is_retry in msgs:
                prompt = history + new_ids
                r = await one(prompt, sess.output_len)
                r.session, r.turn, r.is_retry = sess.session_id, depth, is_retry
                results.append(r)
                pbar.update(1)
                if not r.success:
                    return
                last = (prompt, r.output_ids)
            history = last[0] + last[1]

    items = wl.sessions if wl.sessions is not None else wl.requests
    fn = session if wl.sessions is not None else plain
    tasks = []
    for it in items:
        tasks.append(asyncio.create_task(fn(it)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))
    await asyncio.gather(*tasks)


def _get_json(base_url: str, path: str) -> Optional[Dict]:
    try:
        r = httpx.get(base_url + path, timeout=30)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


CACHE_KEYS = ("prefill_cached_tokens", "prefill_new_tokens")


def server_stats(base_url: str) -> Optional[Dict]:
    """/get_server_info of a radixlm server; behind sglang-router (whose /get_server_info has no
    scheduler stats) the cache counters summed over the workers it lists at /workers, with each
    worker's own counters under "workers"."""
    info = _get_json(base_url, "/get_server_info")
    if info is not None and "prefill_cached_tokens" in info:
        return info
    listed = (_get_json(base_url, "/workers") or {}).get("workers") or []
    per = {}
    for w in listed:
        wi = _get_json(w["url"], "/get_server_info")
        if wi is not None and "prefill_cached_tokens" in wi:
            per[w["url"]] = wi
    if not per:
        return info
    first = next(iter(per.values()))
    out = {k: first.get(k) for k in ("model_path", "tokenizer_path")}
    out.update({k: sum(wi[k] for wi in per.values()) for k in CACHE_KEYS})
    out["workers"] = {u: {k: wi[k] for k in CACHE_KEYS} for u, wi in per.items()}
    return out


def per_worker_delta(before: Optional[Dict], after: Optional[Dict]) -> Optional[List[Dict]]:
    """Cached / new prompt tokens each router worker computed during the run."""
    if not before or not after or "workers" not in after:
        return None
    rows = []
    for url, a in sorted(after["workers"].items()):
        b = (before.get("workers") or {}).get(url, {})
        rows.append({"worker": url, **{k: a[k] - b.get(k, 0) for k in CACHE_KEYS}})
    return rows


def make_sender(args, base_url: str, tokenizer, client: httpx.AsyncClient) -> Callable:
    from radixlm.bench.client import LlamaSlotPinner, request_llama_cpp, request_native, request_openai

    extra = json.loads(args.extra_request_body) if args.extra_request_body else None
    as_text = None
    if getattr(args, "send_text", False):
        if tokenizer is None:
            raise SystemExit("--send-text needs a tokenizer: --tokenizer DIR")

        def as_text(ids):
            return tokenizer.decode(ids)
    if args.backend == "openai":
        model = args.model
        if model is None:
            models = _get_json(base_url, "/v1/models") or {}
            model = (models.get("data") or [{}])[0].get("id", "default")
        tok = (lambda t: tokenizer.encode(t, add_special_tokens=False)) if tokenizer is not None else None

        def send(prompt, n, t0):
            return request_openai(client, base_url, prompt, n, t0, model, tok, extra, as_text)
    elif args.backend == "llama-cpp":  # token ids only: llama-server would tokenize text with its own vocab
        if as_text is not None:
            raise SystemExit("--backend llama-cpp sends token ids; --send-text is not supported")
        exact_ids = getattr(args, "llama_exact_ids", None)
        if exact_ids is None:  # multi-turn sessions send the answer's ids back as history
            exact_ids = args.dataset_name == "agent-multiturn"

        n_slots = getattr(args, "llama_pin_slots", None)
        if n_slots is None:
            n_slots = 32 if args.dataset_name == "agent-multiturn" else 0
        slots = LlamaSlotPinner(n_slots) if n_slots > 0 else None

        def send(prompt, n, t0):
            return request_llama_cpp(client, base_url, prompt, n, t0, extra, exact_ids, slots)
    else:
        def send(prompt, n, t0):
            return request_native(client, base_url, prompt, n, t0, extra, as_text)
    return send


def run_against_server(args, base_url: str, wl: Workload, tokenizer, label: str = "") -> Tuple[Dict, List]:
    """Runs the workload against one server; returns (metrics, per-request results). Ctrl-C: partial."""
    results: List[RequestResult] = []

    async def main_coro():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
            send = make_sender(args, base_url, tokenizer, client)
            for _ in range(args.warmup_requests):
                await send([5, 6, 7, 8, 9, 10, 11, 12], 4, time.perf_counter())
            if args.flush_cache:
                await client.post(base_url + "/flush_cache")
            nonlocal t0, before
            before = server_stats(base_url)
            t0 = time.perf_counter()
            await _run(send, wl, args, results, t0, pbar)

    t0, before = time.perf_counter(), None
    pbar = _progress(wl.num_requests, args.disable_tqdm, label)
    interrupted = False
    try:
        asyncio.run(main_coro())
    except KeyboardInterrupt:
        interrupted = True
    duration = time.perf_counter() - t0
    pbar.close()
    after = server_stats(base_url)
    m = summarize(results, duration, backend=args.backend, dataset_name=wl.name, request_rate=args.request_rate,
                  max_concurrency=args.max_concurrency, server_cache=cache_delta(before, after))
    workers = per_worker_delta(before, after)
    if workers is not None:
        m["server_workers"] = workers
    m["interrupted"] = interrupted
    m["label"] = label or args.backend
    if interrupted:
        print(format_summary(m, "Serving Benchmark Result (interrupted)"))
        raise KeyboardInterrupt
    return m, results


def run_hf(args, wl: Workload, label: str = "hf") -> Tuple[Dict, List]:
    from radixlm.bench import hf_peer

    pbar = _progress(wl.num_requests, args.disable_tqdm, label)
    model = hf_peer.load_model(args.model_path)
    if wl.sessions is not None:
        rng, offsets, t = random.Random(args.seed), [], 0.0
        for _ in wl.sessions:  # the same session start times as the server run's client
            offsets.append(t)
            if args.request_rate != float("inf"):
                t += rng.expovariate(args.request_rate)
        results, duration = hf_peer.run_agent(args.model_path, wl.sessions, model=model, progress=pbar,
                                              mode=args.hf_agent_mode, max_concurrency=args.max_concurrency,
                                              start_offsets=offsets)
    else:
        results, duration = hf_peer.run_batched(args.model_path, wl.requests, args.hf_batch_size, model=model,
                                                progress=pbar)
    pbar.close()
    m = summarize(results, duration, backend="hf-transformers", dataset_name=wl.name, request_rate=args.request_rate,
                  max_concurrency=args.max_concurrency)
    m["label"] = label
    if wl.sessions is not None:
        m["hf_agent_mode"] = args.hf_agent_mode
    return m, results


def comparison_table(ms: Dict[str, Dict]) -> str:
    keys = [("mean_ttft_ms", "Mean TTFT (ms)", "lower"), ("mean_ttft_turn_ge2_ms", "Mean TTFT turns>=2 (ms)", "lower"),
            ("mean_e2e_latency_ms", "Mean E2E (ms)", "lower"), ("output_throughput", "Output tok/s", "higher"),
            ("total_throughput", "Total tok/s", "higher"), ("request_throughput", "Requests/s", "higher"),
            ("server_cache_hit_rate", "Cache hit rate", None), ("server_cached_tokens", "Cached tokens", None)]
    labels = list(ms)
    L = [" Side-by-side ".center(50 + 14 * max(0, len(labels) - 2), "="),
         "{:<28}".format("") + "".join("{:>14}".format(lb) for lb in labels)]
    for k, name, _ in keys:
        if not any(k in m for m in ms.values()):
            continue
        cells = []
        for lb in labels:
            v = ms[lb].get(k)
            cells.append("-" if v is None else f"{100 * v:.2f}%" if k == "server_cache_hit_rate"
                         else f"{v:d}" if isinstance(v, int) else f"{v:.2f}")
        L.append("{:<28}".format(name) + "".join("{:>14}".format(c) for c in cells))
    base = labels[0]
    L.append(f"Ratios ({base} vs each; > 1 means {base} is better):")
    for lb in labels[1:]:
        for k, name, better in keys:
            a, b = ms[base].get(k), ms[lb].get(k)
            if better is None or not a or not b:
                continue
            r = b / a if better == "lower" else a / b
            L.append(f"  {name:<26} {lb} / {base} = {r:.2f}x" if better == "lower"
                     else f"  {name:<26} {base} / {lb} = {r:.2f}x")
    L.append("=" * len(L[0]))
    return "\n".join(L)


def _write_output(args, m: Dict, results: List[RequestResult]) -> None:
    if not args.output_file:
        return
    rec = dict(m)
    rec["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.output_details:
        rec["details"] = [r.to_json() for r in results]
    with open(args.output_file, "a") as f:
        f.write(json.dumps(rec) + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    runs: Dict[str, Tuple[Dict, List]] = {}
    try:
        if args.launch_server or args.compare:
            if not args.model_path:
                raise SystemExit("--launch-server/--compare need --model-path")
            settings = [s.strip() for s in (args.compare or "radix").split(",") if s.strip()]
            bad = [s for s in settings if s not in SETTINGS]
            if bad:
                raise SystemExit(f"--compare: unknown {bad}; choose from {SETTINGS}")
            if any(s != "hf" for s in settings) and not args.launch_server:
                raise SystemExit("--compare radix/no-radix/no-overlap need --launch-server")
            tokenizer = load_tokenizer(args.tokenizer or args.model_path)
            wl = build_workload(args, tokenizer)
            args.flush_cache = True
            for s in settings:
                if s == "hf":
                    m, res = run_hf(args, wl)
                else:
                    from radixlm.bench.launcher import ServerProcess

                    extra = shlex.split(args.server_args) + SETTING_FLAGS[s]
                    run_args, ready = args, "/health"
                    if s in ROUTER_POLICIES:  # N replicas behind sglang-router, which routes on text
                        extra += ["--dp-size", str(args.dp_size)]
                        run_args, ready = argparse.Namespace(**{**vars(args), "send_text": True}), "/readiness"
                    with ServerProcess(args.model_path, extra, timeout=300.0, ready_path=ready) as srv:
                        m, res = run_against_server(run_args, srv.base_url, wl, tokenizer, label=s)
                m["label"] = s
                runs[s] = (m, res)
                print(format_summary(m, f"Serving Benchmark Result: {s}"))
                _write_output(args, m, res)
            if len(runs) > 1:
                print(comparison_table({k: v[0] for k, v in runs.items()}))
        else:
            base_url = args.base_url or f"http://{args.host}:{args.port}"
            info = server_stats(base_url) or {}
            tokenizer = load_tokenizer(args.tokenizer or info.get("tokenizer_path") or info.get("model_path"))
            wl = build_workload(args, tokenizer)
            m, res = run_against_server(args, base_url, wl, tokenizer, label=args.backend)
            runs[args.backend] = (m, res)
            print(format_summary(m))
            _write_output(args, m, res)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.plot and runs:
        from radixlm.bench.plot import PlotUnavailable, plot_runs

        try:
            print("plot:", plot_runs({k: v[1] for k, v in runs.items()}, args.plot, title=f"{args.dataset_name}"))
        except PlotUnavailable as e:
            print(f"--plot skipped: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
