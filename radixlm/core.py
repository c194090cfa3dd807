"""The nouns of radixlm: sampling parameters, requests, finish reasons, forward modes.

Owns: `SamplingParams` (validation of every user-facing sampling field), `Req` (one sequence's
state while it lives in the scheduler), `FinishReason`, `ForwardMode`.
Must not touch: devices, models, I/O. Everything here is plain data plus the checks that keep it
well-formed, so the scheduler's policy can be tested without a model.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens on top of a (possibly empty) cached prefix
    DECODE = "decode"  # exactly one new token per request

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


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
        if self.sampling_seed is not None and (isinstance(self.sampling_seed, bool) or not isinstance(self.sampling_seed, int)):
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


@dataclass
class FinishReason:
    """Why a request stopped. `to_json` gives SGLang's `meta_info.finish_reason` shape."""

    type: str  # "stop" | "length" | "abort"
    matched: Optional[Union[int, str]] = None
    length: Optional[int] = None
    message: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            d["matched"] = self.matched
        elif self.type == "length":
            d["length"] = self.length
        elif self.type == "abort":
            d["message"] = self.message
        return d


@dataclass(eq=False)
class Req:
    """One sequence in the scheduler: prompt, generated tokens and where its KV lives.

    KV ownership: `req_to_token[req_pool_idx, :kv_len]` are this request's slots; the first
    `cache_protected_len` of them belong to the radix cache (held via the lock on `last_node`),
    the rest belong to the request and are freed or handed to the cache when it finishes.
    """

    rid: str
    origin_input_ids: List[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # first prompt position whose logprob is returned (-1: none)
    arrival_seq: int = 0  # order of arrival, for fcfs

    output_ids: List[int] = field(default_factory=list)
    finished_reason: Optional[FinishReason] = None

    # KV state (reset on retraction)
    req_pool_idx: Optional[int] = None
    kv_len: int = 0  # tokens whose KV is computed and stored
    cache_protected_len: int = 0  # leading slots owned by the radix cache
    last_node: Any = None  # radix-cache node locked by this request
    prefix_len: int = 0  # cached prefix matched at admission
    extend_len: int = 0  # tokens computed in the current extend step
    extend_is_first_chunk: bool = False  # this extend is the first since admission (counts cache hits)

    # accounting
    cached_tokens: int = 0  # tokens served from the radix cache (over all admissions)
    num_retractions: int = 0
    generator: Optional[torch.Generator] = None
    output_logprobs: List[float] = field(default_factory=list)
    output_top_logprobs: List[List[tuple]] = field(default_factory=list)
    # prompt logprobs: [(position, logprob | None, token_id, top | None)] from logprob_start_len on
    input_logprobs: List[tuple] = field(default_factory=list)
    input_logprobs_sent: bool = False
    # structured generation
    grammar: Any = None  # the request's matcher once its grammar is compiled
    grammar_future: Any = None  # compile in flight (concurrent.futures.Future)
    jump_forward_tokens: int = 0  # tokens appended by jump-forward instead of decoding

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0 and not self.input_logprobs_sent

    def input_logprob_range(self, prefix_len: int, extend_len: int) -> Optional[tuple]:
        """Positions of this extend whose logits score the next prompt token."""
        if not self.wants_input_logprobs:
            return None
        a = max(prefix_len, self.logprob_start_len - 1, 0)
        b = min(prefix_len + extend_len, len(self.origin_input_ids) - 1)
        return (a, b) if a < b else None

    @property
    def fill_ids(self) -> List[int]:
        """Every token whose KV the request needs before it can sample the next one."""
        return self.origin_input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def max_new_tokens(self) -> int:
        m = self.sampling_params.max_new_tokens
        return 1 << 30 if m is None else m

    @property
    def pending_tokens(self) -> int:
        """Tokens appended without KV beyond the last one (jump-forward): they need an extend."""
        return max(self.seq_len - self.kv_len - 1, 0) if self.kv_len else 0

    def reset_kv_state(self) -> None:
        self.req_pool_idx = None
        self.kv_len = 0
        self.cache_protected_len = 0
        self.last_node = None
        self.prefix_len = 0
        self.extend_len = 0
        self.extend_is_first_chunk = False


@dataclass
class ScheduleBatch:
    """What the scheduler hands the model runner for one step: the requests, which of their tokens
    to compute, and where the new tokens' KV goes. Host-side lists; the runner makes tensors."""

    reqs: List[Req]
    forward_mode: ForwardMode
    input_ids: List[int]  # concatenated new tokens of every request (a device tensor in overlapped decode)
    out_cache_loc: torch.Tensor  # [len(input_ids)] KV slots for them
    prefix_lens: List[int]  # per request: tokens already in the pool
    extend_lens: List[int]  # per request: new tokens this step
    sample: List[bool] = field(default_factory=list)  # per request: sample after this step (False mid-chunk)
    # per request: absolute positions [a, b) whose next-token (prompt) logprobs to compute, or None
    input_logprob_ranges: List[Optional[tuple]] = field(default_factory=list)
    num_mixed_decode: int = 0  # the last this-many requests are decoding ones mixed into an extend step

    @property
    def batch_size(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class ReqOutput:
    """What one scheduler step produced for one request: new tokens and, at the end, the reason."""

    rid: str
    new_token_ids: List[int]
    finished_reason: Optional[FinishReason]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    new_logprobs: Optional[List[float]] = None
    new_top_logprobs: Optional[List[list]] = None
    num_retractions: int = 0
    input_token_logprobs: Optional[List[list]] = None  # [[logprob | None, token_id]] once, with the first output
    input_top_logprobs: Optional[List[Optional[list]]] = None
