"""The nouns of radixlm: requests, batches, finish reasons, forward modes (sampling parameters
live in sampling_params.py).

Owns: `Req` (one sequence's state while it lives in the scheduler), `ScheduleBatch`, `ReqOutput`,
`FinishReason`, `ForwardMode`.
Must not touch: devices, models, I/O. Everything here is plain data plus the checks that keep it
well-formed, so the scheduler's policy can be tested without a model.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch

from radixlm.sampling_params import SamplingParams


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # new tokens on top of a (possibly empty) cached prefix
    DECODE = "decode"  # exactly one new token per request

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class FinishReason:
    """Why a request stopped. `to_json` gives SGLang's `meta_info.finish_reason` shape."""

    type: str  # "stop" | "length" | "abort"
    matched: Optional[Union[int, str]] = None
    length: Optional[int] = None
    message: Optional[str] = None
    status_code: Optional[int] = None  # an abort's HTTP status (None: 400)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            d["matched"] = self.matched
        elif self.type == "length":
            d["length"] = self.length
        elif self.type == "abort":
            d["message"] = self.message
            if self.status_code is not None:
                d["status_code"] = self.status_code
        return d


@dataclass
class ReqKV:
    """Where a request's KV lives. `req_to_token[req_pool_idx, :kv_len]` are its slots; the first
    `cache_protected_len` of them belong to the radix cache (held via the lock on `last_node`), the
    rest belong to the request and are freed or handed to the cache when it finishes. Retraction
    and parking reset it in one assignment (`req.kv = ReqKV()`)."""

    req_pool_idx: Optional[int] = None  # the request's row of req_to_token
    kv_len: int = 0  # tokens whose KV is computed and stored
    cache_protected_len: int = 0  # leading slots owned by the radix cache
    last_node: Any = None  # radix-cache node locked by this request


@dataclass(eq=False)
class Req:
    """One sequence in the scheduler: prompt, generated tokens, where its KV lives (`kv`), and what
    it accumulated for its client (logprobs, cached-token count, retractions). Per-step quantities
    (how many tokens a step computes for it) live in the step's `ScheduleBatch`, not here.
    """

    rid: str
    origin_input_ids: List[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # first prompt position whose logprob is returned (-1: none)
    arrival_seq: int = 0  # order of arrival, for fcfs
    priority: Optional[int] = None  # SGLang's `priority` (--enable-priority-scheduling); None counts as 0
    cache_namespace: Optional[tuple] = None  # radix-cache namespace (extra_key, cache_salt); None: shared
    stop_regexes: List[Any] = field(default_factory=list)  # compiled stop_regex (sampling_params.StopRegex)
    bootstrap_host: Optional[str] = None  # PD disaggregation: the prefill worker's bootstrap server and the
    bootstrap_port: Optional[int] = None  # room pairing this request's prefill and decode halves
    bootstrap_room: Optional[int] = None
    lora_path: Optional[str] = None  # LoRA adapter name (None: the base model)

    output_ids: List[int] = field(default_factory=list)
    finished_reason: Optional[FinishReason] = None

    kv: ReqKV = field(default_factory=ReqKV)  # reset on retraction

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
    # speculative decoding (SGLang's meta_info names): verify forwards taken, drafts proposed / accepted
    spec_verify_ct: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

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
        return max(self.seq_len - self.kv.kv_len - 1, 0) if self.kv.kv_len else 0


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
    # speculative verify step: per request the draft tokens that follow its last token in input_ids
    # (extend_lens[i] == 1 + len(spec_drafts[i])); None for every other step
    spec_drafts: Optional[List[List[int]]] = None

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
    # speculative decoding, the request's totals so far: (verify forwards, drafts proposed, drafts accepted)
    spec_stats: Optional[tuple] = None
