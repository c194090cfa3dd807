"""SamplingParams: SGLang's per-request sampling fields, their defaults and their validation
(`verify` raises a ValueError naming the field, with SGLang's messages). Plain data: no device,
no model; it crosses the process boundary as it is."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

GREEDY_EPS = 1e-6  # temperatures below this are greedy (SGLang's rule)
# A stop_regex whose match can be longer than this (in characters; `.*`, `+`) is matched on the last
# STOP_REGEX_MAX_WINDOW (+4) tokens of the output, and streaming holds back at most this many - 1
# characters for it. Bounded patterns use their own maximum width.
STOP_REGEX_MAX_WINDOW = 256
STOP_REGEX_SEARCH_TIMEOUT_S = 0.1  # one search of the output tail; longer (catastrophic backtracking) aborts


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
    structural_tag: Optional[Union[str, Dict[str, Any]]] = None  # xgrammar structural tag (JSON text or object)
    stop_regex: Optional[Union[str, List[str]]] = None  # stops at the first match in the output's tail
    stream_interval: Optional[int] = None  # tokens per streamed chunk for this request (None: --stream-interval)
    custom_params: Optional[Dict[str, Any]] = None  # for a custom logit processor: carried, not interpreted

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]], defaults: Optional[Dict[str, Any]] = None) -> "SamplingParams":
        """`defaults`: values for the fields `d` leaves unset (missing or null), e.g. the model's
        generation_config.json sampling fields (--sampling-defaults model); the class defaults after
        that. A SamplingParams object is copied as it is (its fields are all set)."""
        if d is None:
            d = {}
        if isinstance(d, SamplingParams):
            return dataclasses.replace(d)
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(d).__name__}")
        d = dict(d)
        if "seed" in d:  # OpenAI's name for the same thing
            d["sampling_seed"] = d.pop("seed")
        d = {k: v for k, v in d.items() if v is not None}  # null means "use the default"
        for k, v in (defaults or {}).items():
            d.setdefault(k, v)
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
        if self.stop_regex is not None:
            pats = [self.stop_regex] if isinstance(self.stop_regex, str) else self.stop_regex
            if not isinstance(pats, list) or not all(isinstance(p, str) and p for p in pats):
                raise ValueError("stop_regex must be a non-empty string or a list of non-empty strings")
            for p in pats:
                regex_max_width(p)  # raises naming stop_regex when the pattern does not parse
        if self.stream_interval is not None and (isinstance(self.stream_interval, bool)
                                                 or not isinstance(self.stream_interval, int)
                                                 or not 1 <= self.stream_interval < 2**31):
            raise ValueError(f"stream_interval must be a positive integer, got {self.stream_interval!r}")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError("custom_params must be a JSON object")
        if self.structural_tag is not None and not isinstance(self.structural_tag, (str, dict)):
            raise ValueError("structural_tag must be a JSON string or object")
        constraints = [n for n in ("regex", "json_schema", "ebnf", "structural_tag") if getattr(self, n) is not None]
        if len(constraints) > 1 and "structural_tag" not in constraints:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")  # SGLang's message
        if len(constraints) > 1:
            raise ValueError(f"Only one of regex, json_schema, ebnf or structural_tag can be set (got "
                             f"{', '.join(constraints)}).")

    # ------------------------------------------------------------------ derived
    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def stop_strs(self) -> List[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def stop_regex_strs(self) -> List[str]:
        if self.stop_regex is None:
            return []
        return [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex)

    @property
    def structural_tag_text(self) -> Optional[str]:
        t = self.structural_tag
        return t if t is None or isinstance(t, str) else json.dumps(t)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- stop_regex
def regex_max_width(pattern: str) -> Optional[int]:
    """Most characters a match of `pattern` can span (None: unbounded), as SGLang's
    `get_max_seq_length` computes it. Raises a ValueError naming stop_regex if it does not parse."""
    try:
        import re._parser as sre_parse  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse  # type: ignore[no-redef]
    try:
        lo_hi = sre_parse.parse(pattern).getwidth()
    except Exception as e:  # noqa: BLE001 - re.error, RecursionError, OverflowError
        raise ValueError(f"stop_regex: invalid pattern {pattern!r}: {e}") from None
    hi = lo_hi[1]
    return None if hi >= sre_parse.MAXREPEAT or hi >= 2**31 - 1 else int(hi)


@dataclass(frozen=True)
class StopRegex:
    """One compiled stop_regex: compiled once per request (in the scheduler's Req and in the
    detokenizer's per-request state), searched with a deadline (`regex` module: a pathological
    pattern aborts its request instead of stalling the process)."""

    pattern: str
    compiled: Any
    width: int  # characters of output to hold back / match on (capped at STOP_REGEX_MAX_WINDOW)

    def search(self, text: str):
        """The first match in `text`, or None; TimeoutError past STOP_REGEX_SEARCH_TIMEOUT_S."""
        try:
            return self.compiled.search(text, timeout=STOP_REGEX_SEARCH_TIMEOUT_S)
        except TypeError:  # the standard `re` module (no timeout)
            return self.compiled.search(text)


def compile_stop_regexes(patterns: List[str]) -> List[StopRegex]:
    try:
        import regex as engine  # transformers' dependency: searches with a timeout
    except ImportError:  # pragma: no cover
        import re as engine  # type: ignore[no-redef]
    out = []
    for p in patterns:
        w = regex_max_width(p)
        try:
            compiled = engine.compile(p)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"stop_regex: invalid pattern {p!r}: {e}") from None
        out.append(StopRegex(p, compiled, STOP_REGEX_MAX_WINDOW if w is None else min(w, STOP_REGEX_MAX_WINDOW)))
    return out
