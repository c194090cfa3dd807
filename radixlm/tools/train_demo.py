"""Trains the demo model pair on CPU: a Llama-architecture target and a much smaller draft with the
same tokenizer (the pair speculative decoding needs: a random draft never agrees with its target).

Owns: the training corpus (the Python standard library's own source, present wherever Python is:
`.py` files under `sysconfig`'s stdlib path, tests and vendored packages left out, sorted, cut at
`--corpus-bytes`), the byte-level BPE trained on it (tiny_tokenizer.train_bpe: ids 0-2 are the
special tokens, ChatML template), the two model shapes (PAIR), and the training loop (AdamW, warm-up
then cosine decay, gradient clipping, next-token loss on random windows of the token stream).

Output: `<out>/target` and `<out>/draft`, HF checkpoints (safetensors, config.json,
generation_config.json, tokenizer files) that HF transformers and radixlm load, each with
`train_log.json` (the loss curve, the held-out loss, seconds, parameters, seed, corpus size).

Deterministic for a seed and a Python version (the corpus is its stdlib): the same command writes the
same weights (1 and 2 torch threads gave the same weights at the test's size). Single-threaded by
default: on a shared machine two OpenMP threads that spin at barriers used ~6x the CPU per step of one.
Target and draft train at once, one single-threaded process each (`--sequential`: one after the
other in this process; the same weights). The step counts are fixed; `--time-budget` is a guard that
stops training early (logged as `stopped_early`, which gives up that determinism) so the tool always
fits the machine; when it binds, the learning rate's decay follows the clock so the cut-short model
still ends annealed.

    python -m radixlm.tools.train_demo --out models/demo-pair
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from radixlm.tools.tiny_tokenizer import EOS_TOKEN_ID, IM_END_ID, special_tokens_map, tokenizer_config, train_bpe

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "ensurepip",
             "turtledemo", "tkinter", "pydoc_data",
             "encodings"}  # codec tables: megabytes of hex literals that teach a small model nothing about Python


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    steps: int  # optimizer steps
    lr: float


# Sized for the budget, not for size: on one CPU core a step of the target (4.2M parameters, a
# quarter of them the tied 4096-token embedding) over batch 4 x 256 tokens costs ~0.4 s of CPU, the
# draft's (0.9M) ~0.12 s (measured: 1500 steps in 610 + 173 CPU seconds). The two train at once, one
# process and one core each, so the target's 1400 steps (~1.4M tokens, about one pass over the corpus)
# set the wall time: ~9.5 minutes on 2 idle cores, inside the default --time-budget (600 s), which only
# binds on a busier machine (then the learning rate anneals by the clock).
# A bigger target at the same budget sees fewer tokens; 256-token windows (not 128) so that prompts
# of a few hundred tokens (the speculative benchmark's) stay within the positions it was trained on.
PAIR: Dict[str, Shape] = {
    "target": Shape(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=768, steps=1400, lr=2e-3),
    "draft": Shape(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=384, steps=1500, lr=3e-3),
}
VOCAB_SIZE = 4096
CONTEXT_LEN = 2048


def stdlib_corpus(max_bytes: int) -> List[str]:
    """The stdlib's `.py` files in sorted order, up to `max_bytes` of text in all."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files += [pathlib.Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    texts, total = [], 0
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        try:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes:
            break
        texts.append(text)
        total += len(text)
    if not texts:
        raise RuntimeError(f"no Python sources found under {root}")
    return texts


def hf_config(shape: Shape, vocab_size: int) -> Dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
        "intermediate_size": shape.intermediate_size, "vocab_size": vocab_size,
        "max_position_embeddings": CONTEXT_LEN, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": EOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID, "pad_token_id": EOS_TOKEN_ID,
        "torch_dtype": "float32",
    }


def lr_at(step: int, steps: int, peak: float, warmup: int, time_progress: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to a tenth of `peak`. The decay follows the steps, or the time
    budget (`time_progress`, 0..1) once that is clearly ahead (a fifth of the budget spent and 25% behind
    the pace that finishes the steps in it): a run that the budget will cut short still ends annealed
    instead of stopping at a high learning rate, and a run that fits its budget (or nearly) depends on
    the step alone (deterministic)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if time_progress > max(0.2, 1.25 * progress):
        progress = time_progress
    progress = min(1.0, progress)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(name: str, shape: Shape, tokens, val_tokens, seed: int, batch: int, seq_len: int,
                deadline: float, progress: bool, log_every: int = 10) -> tuple:
    """Trains one model; returns (the HF model, its log dict)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**hf_config(shape, VOCAB_SIZE)))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=shape.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed + 1)
    n = tokens.numel() - seq_len - 1
    curve, t0, cpu0, stopped_early = [], time.monotonic(), time.process_time(), False
    span = max(1e-9, deadline - t0)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=shape.steps, desc=f"train {name}", unit="step",
                   position=None if progress is True else int(progress) - 1)
    step = 0
    for step in range(shape.steps):
        if time.monotonic() > deadline:
            stopped_early = True
            break
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, shape.steps, shape.lr, warmup=max(1, shape.steps // 20),
                            time_progress=(time.monotonic() - t0) / span)
        loss = _loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == shape.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "lr": round(opt.param_groups[0]["lr"], 6),
                          "seconds": round(time.monotonic() - t0, 1)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    log = {"name": name, "shape": asdict(shape), "seed": seed, "batch": batch, "seq_len": seq_len,
           "steps_done": step + (0 if stopped_early else 1), "stopped_early": stopped_early,
           "parameters": sum(p.numel() for p in model.parameters()),
           "seconds": round(time.monotonic() - t0, 1),
           # CPU seconds over threads: the wall time this run would take alone on the machine (a shared
           # machine's wall time is inflated by the other processes; its CPU time is not)
           "idle_seconds_estimate": round((time.process_time() - cpu0) / torch.get_num_threads(), 1),
           "loss_curve": curve,
           "val_loss": round(_val_loss(model, val_tokens, seq_len), 4), "torch_threads": torch.get_num_threads()}
    return model, log


def _work(shape: Shape) -> int:
    """A step's cost relative to other shapes': steps x (layer + embedding parameters)."""
    h, kv = shape.hidden_size, shape.hidden_size * shape.num_key_value_heads // shape.num_attention_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * shape.intermediate_size
    return shape.steps * (shape.num_hidden_layers * layer + VOCAB_SIZE * h)


SAMPLE_PROMPTS = ("def ", "import os\n", "class Foo:\n")


def samples(model, tok, max_new_tokens: int = 48) -> Dict[str, str]:
    """Greedy continuations of SAMPLE_PROMPTS (written to the log: what the model learned, at a glance)."""
    import torch

    out = {}
    with torch.no_grad():
        for prompt in SAMPLE_PROMPTS:
            ids = torch.tensor([tok.encode(prompt).ids])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=EOS_TOKEN_ID,
                                 eos_token_id=EOS_TOKEN_ID)
            out[prompt] = tok.decode(gen[0].tolist())
    return out


def _loss(model, x):
    """Next-token cross entropy over a batch of windows [B, L+1]."""
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))


def _val_loss(model, val_tokens, seq_len: int, windows: int = 16) -> float:
    import torch

    n = min(windows, (val_tokens.numel() - 1) // (seq_len + 1))
    if n == 0:
        return float("nan")
    x = val_tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    with torch.no_grad():
        return _loss(model, x).item()


def write_tokenizer(out: pathlib.Path, tok_json: str) -> None:
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(CONTEXT_LEN), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2) + "\n")
    # sampling defaults for requests that set none (--sampling-defaults model): a model this small loops
    # when greedy ("import\nimport\n..."); sampled at 0.7 it writes varied Python
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": EOS_TOKEN_ID, "eos_token_id": [EOS_TOKEN_ID, IM_END_ID], "pad_token_id": EOS_TOKEN_ID,
         "do_sample": True, "temperature": 0.7, "top_p": 0.95}, indent=2) + "\n")


def train_pair(out_dir, seed: int = 0, corpus_bytes: int = 6_000_000, time_budget: float = 600.0,
               batch: int = 4, seq_len: int = 256, pair: Optional[Dict[str, Shape]] = None,
               progress: bool = True, threads: int = 1, parallel: bool = False) -> Dict[str, Dict]:
    """Trains and writes the pair, one model after the other or (`parallel`) each in its own process at
    the same time; the weights are the same either way. Returns each model's log."""
    import torch
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    pair = pair or PAIR
    t0 = time.monotonic()
    texts = stdlib_corpus(corpus_bytes)
    tok_json = train_bpe(texts, VOCAB_SIZE)
    tok = Tokenizer.from_str(tok_json)
    ids: List[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [EOS_TOKEN_ID]
    tokens = torch.tensor(ids, dtype=torch.long)
    n_val = max(len(ids) // 50, (seq_len + 1) * 4)
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    meta = {"corpus_bytes": sum(len(t) for t in texts), "corpus_files": len(texts), "corpus_tokens": len(ids),
            "python": sys.version.split()[0], "total_steps": sum(s.steps for s in pair.values())}
    common = (train_tokens, val_tokens, seed, batch, seq_len, tok_json, meta, str(out_dir), threads)
    if parallel:
        # one single-threaded process per model, side by side on the cores (a model's steps are too small
        # to keep two threads busy, and each process alone is as deterministic as the sequential run);
        # both have what is left of the whole budget
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        deadline = t0 + time_budget
        with ProcessPoolExecutor(max_workers=len(pair), mp_context=multiprocessing.get_context("spawn")) as ex:
            futs = {name: ex.submit(_train_and_write, name, shape, deadline, progress and (i + 1), *common)
                    for i, (name, shape) in enumerate(pair.items())}
            return {name: f.result() for name, f in futs.items()}
    logs = {}
    for name, shape in pair.items():
        # each model gets the budget's share its work (steps x parameters) is of the work left
        left = time_budget - (time.monotonic() - t0)
        share = left * _work(shape) / max(1, sum(_work(s) for k, s in pair.items() if k not in logs))
        logs[name] = _train_and_write(name, shape, time.monotonic() + share, progress, *common)
    return logs


def _train_and_write(name: str, shape: Shape, deadline: float, progress, train_tokens, val_tokens, seed: int,
                     batch: int, seq_len: int, tok_json: str, meta: Dict, out_dir: str, threads: int) -> Dict:
    """Trains one model of the pair and writes its checkpoint; returns its log. `progress`: False, True, or
    the progress bar's line (parallel runs). Runs in a worker process when the pair trains in parallel."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    torch.set_num_threads(threads)
    model, log = train_model(name, shape, train_tokens, val_tokens, seed, batch, seq_len, deadline, progress)
    log["samples"] = samples(model, Tokenizer.from_str(tok_json))
    log.update(meta)
    out = pathlib.Path(out_dir, name)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(out, tok_json)
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    # config.json last: its presence marks a complete checkpoint (the Makefile's target)
    (out / "config.json").write_text(json.dumps(hf_config(shape, VOCAB_SIZE), indent=2) + "\n")
    return log


def loss_table(logs: Dict[str, Dict], rows: int = 10) -> str:
    """The loss curves side by side at ~`rows` evenly spaced logged steps (a compact view of train_log.json)."""
    names = list(logs)
    curves = {n: {p["step"]: p for p in logs[n]["loss_curve"]} for n in names}
    steps = sorted(set().union(*curves.values()))
    if not steps:
        return "(no steps trained)"
    picked = sorted({steps[round(i * (len(steps) - 1) / max(1, rows - 1))] for i in range(rows)})
    lines = ["step  " + "".join(f"{n + ' loss':>14}" for n in names)]
    for s in picked:
        lines.append(f"{s:>4}  " + "".join(f"{curves[n][s]['loss']:>14.3f}" if s in curves[n] else f"{'':>14}"
                                           for n in names))
    lines.append(f"{'val':>4}  " + "".join(f"{logs[n]['val_loss']:>14.3f}" for n in names))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/demo-pair", help="output directory (target/ and draft/ inside)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds for both models (a guard)")
    ap.add_argument("--corpus-bytes", type=int, default=6_000_000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the most work per CPU second on a shared machine)")
    ap.add_argument("--target-steps", type=int, default=PAIR["target"].steps)
    ap.add_argument("--draft-steps", type=int, default=PAIR["draft"].steps)
    ap.add_argument("--sequential", action="store_true",
                    help="train the draft after the target in this process (default: both at once, one process "
                         "each, the same weights)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    # OpenMP threads that spin at barriers burn the CPU of a shared machine while a descheduled peer thread
    # is away (measured here: 2 spinning threads used ~6x the CPU per step of 1 thread under load);
    # passive waiting costs little when idle. Before torch starts its thread pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # the thread pools sized from the start, not narrowed later
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(a.threads))
    from dataclasses import replace

    pair = {"target": replace(PAIR["target"], steps=a.target_steps),
            "draft": replace(PAIR["draft"], steps=a.draft_steps)}
    logs = train_pair(a.out, a.seed, a.corpus_bytes, a.time_budget, a.batch, a.seq_len, pair, not a.no_progress,
                      a.threads, parallel=not a.sequential)
    print(loss_table(logs))
    for name, log in logs.items():
        first, last = log["loss_curve"][0]["loss"], log["loss_curve"][-1]["loss"]
        print(f"{name}: {log['parameters'] / 1e6:.1f}M parameters, {log['steps_done']} steps in {log['seconds']} s, "
              f"(~{log['idle_seconds_estimate']} s on an idle machine), loss {first} -> {last}, "
              f"held-out loss {log['val_loss']}"
              + (" (stopped early by --time-budget)" if log["stopped_early"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
