"""Typed messages between radixlm's processes, and their one codec.

Flow: TokenizerManager --TokenizedGenerateReqInput/AbortReq/...--> Scheduler
      Scheduler --BatchTokenIDOut--> DetokenizerManager --BatchStrOut--> TokenizerManager
      Scheduler --control replies (FlushCacheReqOutput, GetInternalStateReqOutput, ...)--> TokenizerManager
`encode`/`decode` turn any registered message into bytes and back; decoding an unregistered type
raises, so a stray object can never be mistaken for a message.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List

from radixlm.core import FinishReason, ReqOutput


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_ids: List[int]
    sampling_params: Dict[str, Any]  # verified SamplingParams.to_dict(); max_new_tokens resolved
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    seed_offset: int = 0  # the i-th of n samples uses sampling_seed + i


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class GetInternalStateReqOutput:
    state: Dict[str, Any]


@dataclass
class SchedulerReady:
    """First message of the scheduler process: it loaded the model (or failed to)."""

    ok: bool
    info: Dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class DetokenizeParams:
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop: List[str] = field(default_factory=list)


@dataclass
class BatchTokenIDOut:
    """Scheduler -> detokenizer: one step's new tokens for each touched request."""

    outputs: List[ReqOutput]
    detok_params: List[DetokenizeParams]


@dataclass
class StrOut:
    rid: str
    text_delta: str
    output: ReqOutput  # carries the prompt logprobs too, with a request's first output


@dataclass
class BatchStrOut:
    """Detokenizer -> tokenizer manager."""

    items: List[StrOut]


MESSAGE_TYPES = (TokenizedGenerateReqInput, AbortReq, FlushCacheReq, FlushCacheReqOutput, GetInternalStateReq,
                 GetInternalStateReqOutput, SchedulerReady, DetokenizeParams, BatchTokenIDOut, StrOut, BatchStrOut)
_ALLOWED = {f"{c.__module__}.{c.__qualname__}" for c in MESSAGE_TYPES + (ReqOutput, FinishReason)}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if f"{module}.{name}" in _ALLOWED or (module == "builtins" and name in ("list", "dict", "tuple", "set")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a radixlm IPC message")


def encode(msg: Any) -> bytes:
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"{type(msg).__name__} is not a radixlm IPC message")
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Any:
    import io

    msg = _Unpickler(io.BytesIO(data)).load()
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"{type(msg).__name__} is not a radixlm IPC message")
    return msg


def to_req(msg: TokenizedGenerateReqInput):
    """The scheduler-side Req for a tokenized request (same in-process and in the scheduler process)."""
    import torch

    from radixlm.core import Req, SamplingParams

    sp = SamplingParams(**msg.sampling_params)
    req = Req(msg.rid, list(msg.input_ids), sp, msg.return_logprob, msg.top_logprobs_num)
    req.logprob_start_len = msg.logprob_start_len
    if sp.sampling_seed is not None:
        req.generator = torch.Generator(device="cpu").manual_seed(sp.sampling_seed + msg.seed_offset)
    return req


def detok_params_of(sp) -> DetokenizeParams:
    return DetokenizeParams(sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.no_stop_trim, sp.stop_strs)
