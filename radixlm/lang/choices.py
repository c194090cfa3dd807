"""How `select` turns per-token log-probabilities of each choice into a decision.

Every method receives, per choice, the log-probabilities of the choice's own tokens given the
prompt (`token_logprobs[i]`; None where a position has none, e.g. the very first token) and, for
the methods that need it, the same tokens scored without the prompt (`unconditional_logprobs[i]`).
Each returns a `ChoicesDecision` whose meta info carries the per-choice scores.

* `token_length_normalized` (default): argmax of the mean token log-probability.
* `greedy_token_selection`: compare the choices token by token, keeping those with the highest
  log-probability at each position; a shorter choice is padded with its own mean.
* `unconditional_likelihood_normalized`: argmax of the mean of (conditional - unconditional)
  log-probabilities (how much the prompt raises each token's likelihood).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence


@dataclasses.dataclass
class ChoicesDecision:
    decision: str
    meta_info: Dict[str, Any]


def mean(xs: Sequence[Optional[float]]) -> float:
    """Mean of the known values (a prompt's first token has no log-probability: None)."""
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else float("-inf")


def _argmax(scores: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(scores):
        if v > scores[best]:
            best = i
    return best


class ChoicesSamplingMethod:
    name = "base"
    requires_unconditional_logprobs = False

    def __call__(self, choices: List[str], token_logprobs: List[List[float]],
                 unconditional_logprobs: Optional[List[List[Optional[float]]]] = None) -> ChoicesDecision:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class TokenLengthNormalized(ChoicesSamplingMethod):
    name = "token_length_normalized"

    def __call__(self, choices, token_logprobs, unconditional_logprobs=None):
        scores = [mean(lps) for lps in token_logprobs]
        i = _argmax(scores)
        return ChoicesDecision(choices[i], {"scores": scores, "decision_index": i})


class GreedyTokenSelection(ChoicesSamplingMethod):
    name = "greedy_token_selection"

    def __call__(self, choices, token_logprobs, unconditional_logprobs=None):
        known = [[x for x in lps if x is not None] for lps in token_logprobs]
        means = [mean(lps) for lps in known]
        width = max((len(lps) for lps in known), default=0)
        padded = [lps + [m] * (width - len(lps)) for lps, m in zip(known, means)]
        alive = list(range(len(choices)))
        for pos in range(width):
            best = max(padded[i][pos] for i in alive)
            alive = [i for i in alive if padded[i][pos] == best]
            if len(alive) == 1:
                break
        i = alive[0]
        return ChoicesDecision(choices[i], {"scores": means, "decision_index": i})


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    name = "unconditional_likelihood_normalized"
    requires_unconditional_logprobs = True

    def __call__(self, choices, token_logprobs, unconditional_logprobs=None):
        if unconditional_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs the unconditional log-probabilities")
        scores = []
        for cond, unc in zip(token_logprobs, unconditional_logprobs):
            if len(cond) != len(unc):
                raise ValueError("conditional and unconditional log-probabilities differ in length")
            diffs = [c - u for c, u in zip(cond, unc) if c is not None and u is not None and math.isfinite(u)]
            scores.append(mean(diffs) if diffs else mean(cond))
        i = _argmax(scores)
        return ChoicesDecision(choices[i], {"scores": scores, "decision_index": i})


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

_BY_NAME = {m.name: m for m in (token_length_normalized, greedy_token_selection,
                                unconditional_likelihood_normalized)}
_BY_NAME.update({"greedy": greedy_token_selection, "token_length": token_length_normalized,
                 "unconditional": unconditional_likelihood_normalized})


def resolve_method(method: Any) -> ChoicesSamplingMethod:
    if method is None:
        return token_length_normalized
    if isinstance(method, str):
        try:
            return _BY_NAME[method]
        except KeyError:
            raise ValueError(f"unknown choices_method {method!r}; use one of {sorted(_BY_NAME)}") from None
    if not callable(method):
        raise ValueError(f"choices_method must be a ChoicesSamplingMethod, got {method!r}")
    return method
