"""Benchmark workloads as token ids (token-exact prompt lengths), deterministic for a given seed.

* `random`: lengths uniform in [floor(L * ratio), L] (input at least 1), random ids.
* `generated-shared-prefix`: G groups x P prompts; a prompt = the group's system prompt + a
  separator + its own question; shuffled.
* `sharegpt`: the first two turns (human, gpt) of each conversation of a local ShareGPT JSON file;
  pairs whose prompt or answer is shorter than 2 tokens are dropped.
* `agent-multiturn`: N sessions x T turns sharing one system prompt. The prompt of turn t is the
  prompt of turn t-1 + its answer + ~turn_len new tokens; the answer is only known at run time,
  so an `AgentSession` holds the per-turn new messages and the runner builds the prompts.
  A share of turns (`retry_ratio`) is sent a second time with a different last message (a branch
  off the same history, as an agent that retries a step); the retry's answer continues the session.

Random ids are drawn from [3, vocab): ids 0-2 are the demo tokenizer's special tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import List, Optional

FIRST_ID = 3  # skip <|endoftext|>, <|im_start|>, <|im_end|>


@dataclass
class BenchRequest:
    prompt_ids: List[int]
    output_len: int
    group: int = -1  # generated-shared-prefix group


@dataclass
class AgentTurn:
    new_ids: List[int]  # the turn's new message (tokens appended to the history)
    retry_ids: Optional[List[int]] = None  # a different last message sent as a retry (branch)


@dataclass
class AgentSession:
    session_id: int
    system_ids: List[int]
    turns: List[AgentTurn] = field(default_factory=list)
    output_len: int = 32


def _ids(rng: random.Random, n: int, vocab: int) -> List[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def _len(rng: random.Random, full: int, ratio: float) -> int:
    lo = max(1, int(full * ratio))
    return rng.randint(lo, max(lo, full))


def gen_random(num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
               seed: int = 1) -> List[BenchRequest]:
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_prompts):
        n_in = max(1, _len(rng, input_len, range_ratio))
        n_out = max(1, _len(rng, output_len, range_ratio))
        reqs.append(BenchRequest(_ids(rng, n_in, vocab), n_out))
    return reqs


def gen_shared_prefix(num_groups: int, prompts_per_group: int, system_prompt_len: int, question_len: int,
                      output_len: int, vocab: int, seed: int = 1, sep: Optional[List[int]] = None
                      ) -> List[BenchRequest]:
    rng = random.Random(seed)
    sep = list(sep) if sep is not None else [FIRST_ID, FIRST_ID]  # stands in for "\n\n"
    reqs = []
    for g in range(num_groups):
        system = _ids(rng, system_prompt_len, vocab)
        for _ in range(prompts_per_group):
            reqs.append(BenchRequest(system + sep + _ids(rng, question_len, vocab), output_len, group=g))
    rng.shuffle(reqs)
    return reqs


def gen_agent_sessions(num_sessions: int, num_turns: int, system_prompt_len: int, turn_len: int,
                       output_len: int, retry_ratio: float, vocab: int, seed: int = 1) -> List[AgentSession]:
    """The per-turn message is ~turn_len tokens (uniform in [0.9, 1.1] x turn_len). Turn 1 is
    never retried (nothing to branch from but the system prompt)."""
    rng = random.Random(seed)
    system = _ids(rng, system_prompt_len, vocab)
    sessions = []
    for s in range(num_sessions):
        sess = AgentSession(s, system, output_len=output_len)
        for t in range(num_turns):
            n = rng.randint(max(1, int(turn_len * 0.9)), max(1, int(round(turn_len * 1.1))))
            new = _ids(rng, n, vocab)
            retry = None
            if t > 0 and rng.random() < retry_ratio:
                retry = _ids(rng, n, vocab)
            sess.turns.append(AgentTurn(new, retry))
        sessions.append(sess)
    return sessions


def agent_num_requests(sessions: List[AgentSession]) -> int:
    return sum(len(s.turns) + sum(1 for t in s.turns if t.retry_ids is not None) for s in sessions)


def load_sharegpt(path: str, num_prompts: int, tokenize, output_len: Optional[int] = None,
                  context_len: Optional[int] = None, seed: int = 1) -> List[BenchRequest]:
    """`tokenize(text) -> ids`. ShareGPT JSON: [{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}, ...]."""
    with open(path) as f:
        data = json.load(f)
    pairs = []
    for d in data:
        conv = d.get("conversations") or d.get("conversation") or []
        if len(conv) >= 2:
            pairs.append((conv[0]["value"], conv[1]["value"]))
    random.Random(seed).shuffle(pairs)
    reqs = []
    for prompt, answer in pairs:
        if len(reqs) == num_prompts:
            break
        p_ids = tokenize(prompt)
        n_out = output_len if output_len is not None else len(tokenize(answer))
        if len(p_ids) < 2 or n_out < 2:
            continue
        if context_len is not None and len(p_ids) + n_out > context_len:
            continue
        reqs.append(BenchRequest(p_ids, n_out))
    return reqs
