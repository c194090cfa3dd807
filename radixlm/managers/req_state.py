"""ReqState: the client side of one generate request, the same for the offline Engine and the
server's TokenizerManager.

Owns what the client knows of one request: its validated message (`msg`), the output ids and text
so far, the output and prompt logprobs, cached tokens, retractions, the finish reason or a runtime
error, and the SGLang-shaped result (`to_dict`: text, output_ids, meta_info).
In: one `StrOut` at a time through `absorb` (a scheduler ReqOutput and its text delta; the server
gets it from the detokenizer process, the Engine from an in-process DetokenizerManager), or `fail`
when the runtime itself gives up on the request. `event` is set on every change, for asyncio
waiters (the server). No I/O, no tokenizer, no scheduler.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from radixlm.core import FinishReason
from radixlm.managers.io_struct import StrOut, TokenizedGenerateReqInput


@dataclass
class ReqState:
    msg: TokenizedGenerateReqInput
    created: float = field(default_factory=time.perf_counter)
    text: str = ""
    output_ids: List[int] = field(default_factory=list)
    logprobs: List[Tuple[float, int]] = field(default_factory=list)  # (logprob, token id) per output token
    top_logprobs: List[Any] = field(default_factory=list)  # [(logprob, token id), ...] per output token
    input_logprobs: Optional[List[Any]] = None
    input_top_logprobs: Optional[List[Any]] = None
    finished_reason: Optional[FinishReason] = None
    cached_tokens: int = 0
    num_retractions: int = 0
    spec_stats: Optional[tuple] = None  # speculative decoding: (verify steps, drafts proposed, drafts accepted)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    error: Optional[BaseException] = None

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None or self.error is not None

    def absorb(self, item: StrOut) -> None:
        """Folds one output (new tokens, their text and logprobs, maybe the finish) into the state."""
        out = item.output
        self.text += item.text_delta
        self.output_ids.extend(out.new_token_ids)
        self.cached_tokens = out.cached_tokens
        self.num_retractions = out.num_retractions
        if out.spec_stats is not None:
            self.spec_stats = out.spec_stats
        if out.input_token_logprobs is not None:
            self.input_logprobs, self.input_top_logprobs = out.input_token_logprobs, out.input_top_logprobs
        if out.new_logprobs:
            self.logprobs.extend(zip(out.new_logprobs, out.new_token_ids))
            self.top_logprobs.extend(out.new_top_logprobs or [])
        if out.finished_reason is not None:
            self.finished_reason = out.finished_reason
        self.event.set()

    def fail(self, error: BaseException) -> None:
        """Ends the request with an error that is not the scheduler's (e.g. the runtime is gone)."""
        self.error = error
        self.event.set()

    def to_dict(self, return_text_in_logprobs: bool = False,
                decode_one: Optional[Callable[[int], str]] = None) -> Dict[str, Any]:
        """SGLang's result: {"text", "output_ids", "meta_info"}. Logprob entries are
        (logprob, token id, token text or None) tuples; top logprobs only with top_logprobs_num > 0;
        e2e_latency once finished."""
        def entry(lp: float, t: int) -> tuple:
            return lp, t, decode_one(t) if return_text_in_logprobs and decode_one else None

        def row(tops):
            return None if tops is None else [entry(v, t) for v, t in tops]

        meta: Dict[str, Any] = {
            "id": self.msg.rid,
            "finish_reason": self.finished_reason.to_json() if self.finished_reason else None,
            "prompt_tokens": len(self.msg.input_ids),
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
        }
        if self.finished:
            meta["e2e_latency"] = time.perf_counter() - self.created
        if self.num_retractions:
            meta["num_retractions"] = self.num_retractions
        if self.spec_stats is not None:  # SGLang's names; accept length = completion_tokens / verify_ct
            verify_ct, drafted, accepted = self.spec_stats
            meta["spec_verify_ct"] = verify_ct
            meta["spec_accept_length"] = len(self.output_ids) / verify_ct if verify_ct else 0.0
            meta["spec_accept_rate"] = accepted / drafted if drafted else 0.0
            meta["spec_accept_token_num"] = accepted
            meta["spec_draft_token_num"] = drafted
        if self.msg.return_logprob:
            with_top = self.msg.top_logprobs_num > 0
            meta["output_token_logprobs"] = [entry(lp, t) for lp, t in self.logprobs]
            if with_top:
                meta["output_top_logprobs"] = [row(tops) for tops in self.top_logprobs]
            # prompt logprobs: empty unless logprob_start_len asked for them (newer SGLang's shape)
            meta["input_token_logprobs"] = [entry(lp, t) for lp, t in self.input_logprobs or []]
            if with_top:
                meta["input_top_logprobs"] = [row(tops) for tops in self.input_top_logprobs or []]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
