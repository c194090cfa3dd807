"""Acceptance rules of speculative decoding, given the target's outputs at [last token + k drafts].

Greedy: the target's argmax at each position says what greedy decoding would emit; the drafts are
accepted while they equal it, and the target's own token at the first mismatch (or after the last
draft) is committed too, so every verify step commits 1..k+1 tokens, exactly greedy decoding's.

Sampling (temperature > 0): standard speculative sampling. At position j the target distribution
is p_j (after temperature, top-k, top-p, min-p) and the draft d_j was drawn from q_j. Accept d_j
with probability min(1, p_j(d_j) / q_j(d_j)); on rejection draw from the residual
max(0, p_j - q_j) / Z and stop; after k accepted drafts draw the bonus token from p_k. Each
committed token is then distributed as p_j: P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y),
q(y))) (p(x) - min(p(x), q(x))) / Z = min(p, q)(x) + (p(x) - min(p, q)(x)) = p(x), since
Z = sum_x max(0, p(x) - q(x)) = 1 - sum_y min(p(y), q(y)). A deterministic drafter (NGRAM, or a
draft model decoding greedily) has q_j = one-hot(d_j): accept with probability p_j(d_j), else draw
from p_j with d_j's mass removed and renormalised (`q=None` below).

`greedy_accept_reference` / `speculative_sample_reference` are the plain per-request rules;
`greedy_accept_batched` is the vectorised greedy path the worker uses (tested equal).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def greedy_accept_reference(drafts: Sequence[int], target: Sequence[int]) -> List[int]:
    """`target`: the target's argmax at [last, d_1..d_k] (k+1 entries). Returns the committed tokens:
    the accepted drafts plus the target's next token."""
    assert len(target) == len(drafts) + 1
    out = []
    for d, t in zip(drafts, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def greedy_accept_batched(drafts: torch.Tensor, num_drafts: torch.Tensor, target: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """drafts [B, K] (padded), num_drafts [B], target [B, K+1] argmaxes. Returns (accepted drafts
    per request [B], the target's token after them [B]); committed = drafts[:a] + [bonus]."""
    k = drafts.shape[1]
    valid = torch.arange(k, device=drafts.device)[None, :] < num_drafts[:, None]
    match = (drafts == target[:, :k]) & valid
    accepted = match.to(torch.int64).cumprod(dim=1).sum(dim=1)
    bonus = target.gather(1, accepted[:, None]).squeeze(1)
    return accepted, bonus


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def _uniform(device, generator: Optional[torch.Generator]) -> float:
    dev = generator.device if generator is not None else device
    return float(torch.rand((), device=dev, generator=generator))


def speculative_sample_reference(p: torch.Tensor, drafts: Sequence[int], q: Optional[torch.Tensor] = None,
                                 generator: Optional[torch.Generator] = None) -> List[int]:
    """p [k+1, V]: the target's distributions at [last, d_1..d_k]; q [k, V]: the distributions the
    drafts were drawn from (None: deterministic drafts, q_j = one-hot(d_j)). Returns the committed
    tokens (1..k+1)."""
    out: List[int] = []
    for j, d in enumerate(drafts):
        pj = p[j]
        qd = 1.0 if q is None else float(q[j, d])
        # accept with probability min(1, p/q): u < p/q  <=>  u * q < p  (q > 0: d was drawn from q)
        if _uniform(p.device, generator) * qd < float(pj[d]):
            out.append(int(d))
            continue
        if q is None:
            residual = pj.clone()
            residual[d] = 0.0
        else:
            residual = (pj - q[j]).clamp_min(0.0)
        z = float(residual.sum())
        # z == 0 only if p <= q everywhere, i.e. p == q, where rejection has probability 0
        out.append(_draw(residual / z if z > 0 else pj, generator))
        return out
    out.append(_draw(p[len(drafts)], generator))
    return out
