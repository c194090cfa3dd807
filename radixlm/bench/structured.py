"""Structured-generation benchmark, side by side in one run on the same model:

1. free vs JSON-schema-constrained decoding: the same prompts and the same number of output
   tokens (the constrained run goes first, the free run then generates exactly as many tokens per
   prompt with ignore_eos); jump-forward off, so both pay one decode step per token and the
   difference is the cost of the grammar (bitmask fill + apply + matcher update). Reported as
   ms/token for both and their ratio, one request at a time and as one batch.
2. jump-forward on vs off, for a schema with long fixed keys (compact JSON): generated tokens,
   decode and extend steps (scheduler stats), tokens appended by jump-forward, wall time.

    python -m radixlm.bench_structured [--model-path DIR] [--batch 16] [--sequential 2] [--repeats 5]

Prints one JSON line per measurement and a summary line per part. The demo model has random
weights: the constraint alone makes its output valid, which is what is measured here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Dict, List

# Compact JSON: bounded integers, enums and booleans only (a random-weight model writes unbounded
# numbers and strings for as long as it pleases), 3 to 5 objects: about 60-120 tokens per output.
OVERHEAD_SCHEMA = {
    "type": "array", "minItems": 3, "maxItems": 5,
    "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["alpha", "beta", "gamma", "delta"]},
        "ok": {"type": "boolean"},
        "level": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["id", "kind", "ok", "level"], "additionalProperties": False},
}

LONG_KEYS = ["a_very_long_property_name_number_one", "another_quite_long_property_name_two",
             "yet_another_long_property_name_three", "and_finally_the_fourth_long_property_name"]
JUMP_SCHEMA = {
    "type": "object", "properties": {
        LONG_KEYS[0]: {"type": "boolean"},
        LONG_KEYS[1]: {"enum": ["low", "medium", "high"]},
        LONG_KEYS[2]: {"const": "schema-version-1"},
        LONG_KEYS[3]: {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": LONG_KEYS, "additionalProperties": False,
}


def make_prompts(seed: int, n: int, length: int, vocab: int) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def validator(schema):
    try:
        import jsonschema
    except ImportError:  # optional: fall back to parsing only
        return lambda text: _parses(text)
    v = jsonschema.validators.validator_for(schema)(schema)

    def ok(text: str) -> bool:
        try:
            return v.is_valid(json.loads(text))
        except json.JSONDecodeError:
            return False
    return ok


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _stats(eng) -> Dict[str, int]:
    s = eng.scheduler.stats
    return {"decode_steps": s.num_decode_batches, "extend_steps": s.num_prefill_batches,
            "jump_forward_tokens": s.jump_forward_tokens}


def _timed(eng, prompts: List[List[int]], sps: List[Dict], batched: bool):
    """Runs the requests (as one batch, or one at a time); returns (outputs, wall s, process CPU s,
    stats delta). CPU time counts every thread of this process (scheduler, torch, detokenizer) and
    is less disturbed than wall time by other processes on a shared machine."""
    eng.flush_cache()  # every run starts cold; also zeroes the scheduler stats
    c0, t0 = time.process_time(), time.perf_counter()
    if batched:
        outs = eng.generate(input_ids=prompts, sampling_params=sps)
    else:
        outs = [eng.generate(input_ids=p, sampling_params=sp) for p, sp in zip(prompts, sps)]
    return outs, time.perf_counter() - t0, time.process_time() - c0, _stats(eng)


def bench_overhead(eng, prompts: List[List[int]], repeats: int, batched: bool) -> Dict:
    """Free vs constrained ms/token at equal output lengths (jump-forward is off in this engine).
    The constrained run fixes each prompt's length (greedy: the same every time); then the two
    alternate, swapping order each repeat; min and median over the repeats are reported."""
    ok = validator(OVERHEAD_SCHEMA)
    con_sps = [{"temperature": 0, "max_new_tokens": 512, "json_schema": OVERHEAD_SCHEMA}] * len(prompts)
    first, _, _, con_st = _timed(eng, prompts, con_sps, batched)
    lengths = [o["meta_info"]["completion_tokens"] for o in first]
    tokens = sum(lengths)
    free_sps = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lengths]
    wall = {"free": [], "constrained": []}
    cpu = {"free": [], "constrained": []}
    for r in range(repeats):
        for kind in (("constrained", "free") if r % 2 == 0 else ("free", "constrained")):
            outs, dt, ct, st = _timed(eng, prompts, con_sps if kind == "constrained" else free_sps, batched)
            assert [o["meta_info"]["completion_tokens"] for o in outs] == lengths
            wall[kind].append(1000 * dt / tokens)
            cpu[kind].append(1000 * ct / tokens)
            if kind == "free":
                free_steps = st["decode_steps"]
    row = {"bench": "free_vs_constrained", "mode": "batch" if batched else "sequential",
           "requests": len(prompts), "output_tokens": tokens, "decode_steps_constrained": con_st["decode_steps"],
           "decode_steps_free": free_steps, "valid_json": f"{sum(ok(o['text']) for o in first)}/{len(first)}",
           "finish_stop": f"{sum(o['meta_info']['finish_reason']['type'] == 'stop' for o in first)}/{len(first)}",
           "repeats": repeats}
    for name, d in (("wall", wall), ("cpu", cpu)):
        for stat, fn in (("min", min), ("median", statistics.median)):
            f, c = fn(d["free"]), fn(d["constrained"])
            row[f"{name}_ms_per_token_free_{stat}"] = round(f, 3)
            row[f"{name}_ms_per_token_constrained_{stat}"] = round(c, 3)
            row[f"{name}_overhead_ratio_{stat}"] = round(c / f, 3)
    return row


def bench_jump_forward(eng, prompts: List[List[int]], jump_forward: bool, batched: bool) -> Dict:
    ok = validator(JUMP_SCHEMA)
    sp = {"temperature": 0, "max_new_tokens": 512, "json_schema": JUMP_SCHEMA}
    outs, dt, ct, st = _timed(eng, prompts, [sp] * len(prompts), batched)
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    return {"bench": "jump_forward", "jump_forward": jump_forward, "mode": "batch" if batched else "sequential",
            "requests": len(prompts), "generated_tokens": tokens, "decode_steps": st["decode_steps"],
            "extend_steps": st["extend_steps"], "forward_steps": st["decode_steps"] + st["extend_steps"],
            "jump_forward_tokens": st["jump_forward_tokens"], "wall_s": round(dt, 3), "cpu_s": round(ct, 3),
            "wall_ms_per_token": round(1000 * dt / tokens, 3),
            "valid_json": f"{sum(ok(o['text']) for o in outs)}/{len(outs)}",
            "_texts": [o["text"] for o in outs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="structured generation: grammar overhead and jump-forward")
    ap.add_argument("--model-path", default=None, help="HF checkpoint (default: build/use the demo model)")
    ap.add_argument("--batch", type=int, default=16, help="requests per batched run")
    ap.add_argument("--sequential", type=int, default=2, help="requests in the one-at-a-time runs")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="overhead runs per mode (min and median reported)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import radixlm
    from radixlm.demo import ensure_demo_model

    path = args.model_path or ensure_demo_model()
    common = dict(model_path=path, log_level="warning", constrained_json_disable_any_whitespace=True)
    results: List[Dict] = []

    def emit(row: Dict) -> None:
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)

    with radixlm.Engine(disable_jump_forward=True, **common) as off, radixlm.Engine(**common) as on:
        vocab = off.model_config.vocab_size
        prompts = make_prompts(args.seed, args.batch, args.prompt_len, min(vocab, len(off.tokenizer)))
        seq = prompts[:args.sequential]
        compile_s = {}
        for name, schema in (("overhead_schema", OVERHEAD_SCHEMA), ("jump_schema", JUMP_SCHEMA)):
            for eng in (off, on):  # compile off the clock (cached per engine), and warm up both paths
                t0 = time.perf_counter()
                eng.scheduler.grammar_backend().compile_async(("json", json.dumps(schema))).result()
                compile_s.setdefault(name, round(time.perf_counter() - t0, 3))
                eng.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": 512,
                                                                    "json_schema": schema})
        off.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": 8})
        emit({"bench": "setup", "model_path": path, "vocab_size": vocab, "device": off.server_args.resolved_device,
              "grammar_compile_s": compile_s, "prompt_len": args.prompt_len})

        rows = [bench_overhead(off, seq, args.repeats, batched=False),
                bench_overhead(off, prompts, args.repeats, batched=True)]
        for row in rows:
            emit(row)

        for batched, group in ((False, seq), (True, prompts)):
            r_off = bench_jump_forward(off, group, False, batched)
            r_on = bench_jump_forward(on, group, True, batched)
            emit(r_off)
            emit(r_on)
            emit({"bench": "jump_forward_summary", "mode": r_on["mode"], "requests": len(group),
                  "tokens_saved_by_jump_forward": r_on["jump_forward_tokens"],
                  "decode_steps_off": r_off["decode_steps"], "decode_steps_on": r_on["decode_steps"],
                  "forward_steps_off": r_off["forward_steps"], "forward_steps_on": r_on["forward_steps"],
                  "forward_steps_ratio_off_on": round(r_off["forward_steps"] / max(r_on["forward_steps"], 1), 2),
                  "wall_speedup_off_on": round(r_off["wall_s"] / r_on["wall_s"], 2),
                  "cpu_speedup_off_on": round(r_off["cpu_s"] / r_on["cpu_s"], 2),
                  "identical_texts": f"{sum(a == b for a, b in zip(r_off['_texts'], r_on['_texts']))}/{len(group)}"})


if __name__ == "__main__":
    main()
