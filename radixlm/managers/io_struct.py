"""Typed messages between radixlm's processes, and their one codec.

Flow: TokenizerManager --TokenizedGenerateReqInput/AbortReq/...--> Scheduler
      Scheduler --BatchTokenIDOut--> DetokenizerManager --BatchStrOut--> TokenizerManager
      Scheduler --control replies (FlushCacheReqOutput, GetInternalStateReqOutput, ...)--> TokenizerManager
`encode`/`decode` turn any registered message into bytes and back; decoding anything else raises
`IPCDecodeError`, so a stray object can never be mistaken for a message. Receivers use
`decode_or_drop`: a message that fails to decode is logged and dropped, never fatal to the process.
Control requests carry a `req_id` that their reply echoes, so a late reply never answers a newer request.
A request's `SamplingParams` travels as the one typed object from RequestBuilder to the scheduler's
`Req` (`to_req`); the codec admits it (and only the classes listed in `_ALLOWED`) inside a message.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from radixlm.core import FinishReason, ReqOutput
from radixlm.sampling_params import SamplingParams, compile_stop_regexes


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_ids: List[int]
    sampling_params: SamplingParams  # verified by RequestBuilder; max_new_tokens resolved
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    seed_offset: int = 0  # the i-th of n samples uses sampling_seed + i
    extra_key: Optional[str] = None  # with cache_salt: the request's radix-cache namespace
    cache_salt: Optional[str] = None
    priority: Optional[int] = None  # --enable-priority-scheduling
    bootstrap_host: Optional[str] = None  # PD disaggregation (RequestBuilder.bootstrap checked them)
    bootstrap_port: Optional[int] = None
    bootstrap_room: Optional[int] = None
    lora_path: Optional[str] = None  # LoRA adapter name (None: the base model)

    @property
    def cache_namespace(self) -> Optional[tuple]:
        """None (the shared namespace) or the (extra_key, cache_salt) the request's KV is cached under."""
        if self.extra_key is None and self.cache_salt is None:
            return None  # (a LoRA adapter's requests get one of its own in the scheduler)
        return (self.extra_key, self.cache_salt)


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False


@dataclass
class FlushCacheReq:
    req_id: int = 0


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""
    req_id: int = 0


@dataclass
class GetInternalStateReq:
    req_id: int = 0


@dataclass
class GetInternalStateReqOutput:
    state: Dict[str, Any]
    req_id: int = 0


@dataclass
class LoRAAdapterReq:
    """Load (lora_name from lora_path) or unload (lora_name) a LoRA adapter at run time."""

    action: str  # load | unload
    lora_name: str
    lora_path: str = ""
    req_id: int = 0


@dataclass
class LoRAAdapterReqOutput:
    success: bool
    error_message: str = ""
    loaded_adapters: Dict[str, str] = field(default_factory=dict)  # name -> path
    req_id: int = 0


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
    stop_regex: List[str] = field(default_factory=list)


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
                 GetInternalStateReqOutput, LoRAAdapterReq, LoRAAdapterReqOutput,
                 SchedulerReady, DetokenizeParams, BatchTokenIDOut, StrOut, BatchStrOut)
_ALLOWED = {f"{c.__module__}.{c.__qualname__}" for c in MESSAGE_TYPES + (ReqOutput, FinishReason, SamplingParams)}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if f"{module}.{name}" in _ALLOWED or (module == "builtins" and name in ("list", "dict", "tuple", "set")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a radixlm IPC message")


def encode(msg: Any) -> bytes:
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"{type(msg).__name__} is not a radixlm IPC message")
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


class IPCDecodeError(pickle.UnpicklingError):
    """The bytes are not an encoded radixlm IPC message (garbage, truncated, or a foreign object)."""


def decode(data: bytes) -> Any:
    try:
        msg = _Unpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same error to a receiver
        raise IPCDecodeError(f"{e} ({type(e).__name__}, {len(data)} bytes)") from e
    if not isinstance(msg, MESSAGE_TYPES):
        raise IPCDecodeError(f"{type(msg).__name__} is not a radixlm IPC message")
    return msg


def decode_or_drop(data: bytes, receiver: str, log: Optional[logging.Logger] = None) -> Optional[Any]:
    """decode(), but a message that fails to decode is logged and dropped (None) instead of raising."""
    try:
        return decode(data)
    except IPCDecodeError as e:
        (log or logging.getLogger(__name__)).error("%s dropped an undecodable IPC message: %s", receiver, e)
        return None


def to_req(msg: TokenizedGenerateReqInput):
    """The scheduler-side Req for a tokenized request (same in-process and in the scheduler process).
    The Req gets its own copy of the sampling params (the scheduler may cap max_new_tokens), checked
    again: a message from another process is not trusted to hold a verified SamplingParams."""
    import torch

    from radixlm.core import Req

    if type(msg.sampling_params) is not SamplingParams:
        raise TypeError(f"sampling_params must be a SamplingParams, got {type(msg.sampling_params).__name__}")
    sp = dataclasses.replace(msg.sampling_params)
    sp.verify()
    req = Req(msg.rid, list(msg.input_ids), sp, msg.return_logprob, msg.top_logprobs_num)
    req.logprob_start_len = msg.logprob_start_len
    req.cache_namespace = msg.cache_namespace
    req.priority = msg.priority
    req.bootstrap_host, req.bootstrap_port, req.bootstrap_room = msg.bootstrap_host, msg.bootstrap_port, \
        msg.bootstrap_room
    req.lora_path = msg.lora_path
    if sp.stop_regex_strs:  # compiled once per request, here in the scheduler (never on the server's loop)
        req.stop_regexes = compile_stop_regexes(sp.stop_regex_strs)
    if sp.sampling_seed is not None:
        req.generator = torch.Generator(device="cpu").manual_seed(sp.sampling_seed + msg.seed_offset)
    return req


def detok_params_of(sp: SamplingParams) -> DetokenizeParams:
    return DetokenizeParams(sp.skip_special_tokens, sp.spaces_between_special_tokens, sp.no_stop_trim, sp.stop_strs,
                            sp.stop_regex_strs)
