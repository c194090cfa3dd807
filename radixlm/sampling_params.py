"""SamplingParams: SGLang's per-request sampling fields, their defaults and their validation
(`verify` raises a ValueError naming the field, with SGLang's messages). Plain data: no device,
no model; it crosses the process boundary as it is."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

GREEDY_EPS = 1e-6  # temperatures below this are greedy (SGLang's rule)


@dataclass
class SamplingParams:
    """Per-request sampling settings with SGLang's field names and defaults.

    `from_dict` rejects unknown fields and treats `None` as "use the default"; `verify` raises a
    ValueError that names the offending field.
    """

    max_new_tokens: Optional[int] = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    regex: Optional[str] = None
    json_schema: Optional[Union[str, Dict[str, Any]]] = None
    ebnf: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "SamplingParams":
        if d is None:
            return cls()
        if isinstance(d, SamplingParams):
            return dataclasses.replace(d)
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(d).__name__}")
        d = dict(d)
        if "seed" in d:  # OpenAI's name for the same thing
            d["sampling_seed"] = d.pop("seed")
        d = {k: v for k, v in d.items() if v is not None}  # null means "use the default"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"Unknown sampling parameter(s): {', '.join(unknown)}. Valid fields: {', '.join(sorted(names))}"
            )
        return cls(**d)

    # ------------------------------------------------------------------ validation
    def verify(self, vocab_size: Optional[int] = None) -> None:
        def num(name: str, integer: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                kind = "an integer" if integer else "a number"
                raise ValueError(f"{name} must be {kind}, got {v!r}")

        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            num(name)
        for name in ("top_k", "min_new_tokens", "n"):
            num(name, integer=True)
        for name in ("top_k", "min_new_tokens", "n"):
            if not (-(2**63) <= getattr(self, name) < 2**63):
                raise ValueError(f"{name} must be a 64-bit integer")
        if self.max_new_tokens is not None:
            num("max_new_tokens", integer=True)
            if self.max_new_tokens >= 2**63:
                raise ValueError("max_new_tokens must be a 64-bit integer")
            if self.max_new_tokens < 0:
                raise ValueError("max_new_tokens must be at least 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be a non-negative finite number")
        if not (0 < self.top_p <= 1):
            raise ValueError("top_p must be in (0, 1]")
        if not (0 <= self.min_p <= 1):
            raise ValueError("min_p must be in [0, 1]")
        if not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError("top_k must be -1 (disable) or at least 1")
        if not (-2 <= self.frequency_penalty <= 2):
            raise ValueError("frequency_penalty must be in [-2, 2]")
        if not (-2 <= self.presence_penalty <= 2):
            raise ValueError("presence_penalty must be in [-2, 2]")
        if not (0 < self.repetition_penalty <= 2):
            raise ValueError("repetition_penalty must be in (0, 2]")
        if self.min_new_tokens < 0 or (self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens):
            raise ValueError("min_new_tokens must be in [0, max_new_tokens]")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        seed = self.sampling_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"sampling_seed must be an integer, got {self.sampling_seed!r}")
        if self.sampling_seed is not None and not (-(2**63) <= self.sampling_seed < 2**63):
            raise ValueError("sampling_seed must be a 64-bit integer")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set)) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
            ):
                raise ValueError("stop_token_ids must be a list of non-negative integers")
            if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
                raise ValueError(f"stop_token_ids must be in [0, {vocab_size - 1}]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a dict {token_id: bias}")
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
                if vocab_size is not None and not (0 <= tid < vocab_size):
                    raise ValueError(f"logit_bias must has keys in [0, {vocab_size - 1}]")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"logit_bias values must be finite numbers, got {v!r}")
        constraints = [n for n in ("regex", "json_schema", "ebnf") if getattr(self, n) is not None]
        if len(constraints) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")

    # ------------------------------------------------------------------ derived
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def stop_strs(self) -> List[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
