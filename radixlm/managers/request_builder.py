"""Turns a user's generate call (text or ids, single or batch, sampling params, n) into validated
`TokenizedGenerateReqInput`s. Shared by the offline Engine and the HTTP server's tokenizer manager,
so both accept and reject exactly the same inputs. Every rejection is a ValueError naming the field,
raised before anything reaches the scheduler.

Owns the request limits (`RequestLimits`, from the server's --max-* flags): prompts per batch, `n`,
`top_logprobs_num`, count and length of stop strings, size of a regex / EBNF / JSON schema and the
time its syntax check may take. Cheap checks come first: a batch's size, a text's length against the
context (before tokenizing it), lone UTF-16 surrogates (which no tokenizer can encode), then the
tokens, then the grammar. `build` may block (tokenizing, the grammar check): servers call it off
their event loop. Each message carries its prompt's verified `SamplingParams` object (the n samples
of a prompt share it; messages are read-only, and the scheduler's Req gets its own copy).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, List, Optional, Tuple

from radixlm.constrained import call_with_deadline, check_grammar_syntax, grammar_key
from radixlm.managers.io_struct import TokenizedGenerateReqInput
from radixlm.managers.sglang_fields import check_sampling_fields
from radixlm.sampling_params import SamplingParams

_GRAMMAR_FIELD = {"regex": "regex", "json": "json_schema", "ebnf": "ebnf", "structural_tag": "structural_tag"}


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds; the defaults are ServerArgs' (see the --max-* flags)."""

    max_n: int = 128
    max_batch_prompts: int = 1024
    max_top_logprobs_num: int = 20
    max_stop_strings: int = 64
    max_stop_string_len: int = 1024
    max_grammar_bytes: int = 128 * 1024
    grammar_compile_timeout: float = 30.0

    @classmethod
    def from_server_args(cls, args) -> "RequestLimits":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def check_text(s: str, field: str) -> None:
    """A string every tokenizer and the JSON encoder can take: no lone UTF-16 surrogate."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{field}: the text holds a lone UTF-16 surrogate ({s[e.start]!r} at character "
                         f"{e.start}); send valid Unicode") from None


def check_strings(obj: Any, field: str) -> None:
    """check_text over every string (dict keys too) of a JSON-like value."""
    if isinstance(obj, str):
        check_text(obj, field)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str):
                check_text(k, field)
            check_strings(v, f"{field}.{k}")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            check_strings(v, field)


class RequestBuilder:
    def __init__(self, tokenizer, vocab_size: int, context_len: int, grammar_backend: str = "xgrammar",
                 limits: Optional[RequestLimits] = None, enable_priority_scheduling: bool = False,
                 sampling_defaults: Optional[Dict[str, Any]] = None, disaggregation_mode: str = "null"):
        self.tokenizer = tokenizer
        # values for the sampling fields a request leaves unset (generation_config.json, --sampling-defaults)
        self.sampling_defaults: Dict[str, Any] = dict(sampling_defaults or {})
        self.vocab_size = vocab_size
        self.context_len = context_len
        self.grammar_backend = grammar_backend
        self.limits = limits or RequestLimits()
        self.enable_priority_scheduling = enable_priority_scheduling
        self.disaggregation_mode = disaggregation_mode
        # LoRA adapter names a request may pick (set by the owner with --enable-lora; None: LoRA off)
        self.lora_names: Optional[Callable[[], Collection[str]]] = None
        self._max_token_chars: Optional[int] = None

    @classmethod
    def from_server_args(cls, args, tokenizer, vocab_size: int, context_len: int) -> "RequestBuilder":
        defaults = None
        if getattr(args, "sampling_defaults", "model") == "model" and args.model_path:
            from radixlm.models.model_config import read_sampling_defaults

            defaults = read_sampling_defaults(args.model_path)
        return cls(tokenizer, vocab_size, context_len, args.grammar_backend, RequestLimits.from_server_args(args),
                   bool(getattr(args, "enable_priority_scheduling", False)), defaults,
                   getattr(args, "disaggregation_mode", "null"))

    # ------------------------------------------------------------------ text
    @property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: a text of C characters is at least
        C / max_token_chars tokens (byte-level BPE and SentencePiece entries are at least as long as
        the text they stand for)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab() if hasattr(self.tokenizer, "get_vocab") else {}
            self._max_token_chars = max((len(t) for t in vocab), default=0) or 64
        return self._max_token_chars

    def encode(self, text: str, field: str = "text", add_special_tokens: bool = True) -> List[int]:
        """Tokenizes one prompt after the cheap checks: valid Unicode, and not so many characters that
        it cannot fit into the context whatever its tokens."""
        if self.tokenizer is None:
            raise ValueError(f"{field}: this engine has no tokenizer (skip_tokenizer_init); pass input_ids")
        check_text(text, field)
        if len(text) > self.context_len * self.max_token_chars:
            raise ValueError(f"{field}: the input ({len(text)} characters) is longer than the model's context "
                             f"length ({self.context_len} tokens) allows")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    # ------------------------------------------------------------------ build
    def build(self, text=None, input_ids=None, sampling_params=None, rid=None, return_logprob: bool = False,
              top_logprobs_num: int = 0, logprob_start_len: int = -1, stream: bool = False,
              extra_key=None, cache_salt=None, priority: Optional[int] = None, lora_path=None,
              bootstrap_host=None, bootstrap_port=None, bootstrap_room=None,
              ) -> Tuple[List[TokenizedGenerateReqInput], bool]:
        """Returns (messages, batched). A prompt with n samples gives n consecutive messages.
        `extra_key` / `cache_salt` (a string, or one per prompt) put a prompt in its own radix-cache
        namespace; `priority` orders the waiting queue (--enable-priority-scheduling)."""
        lim = self.limits
        if (text is None) == (input_ids is None):
            raise ValueError("Either text or input_ids should be provided (exactly one of them).")
        field = "text" if text is not None else "input_ids"
        prompts = text if text is not None else input_ids
        if text is not None:
            batched = isinstance(text, list)
        else:
            if not isinstance(input_ids, list):
                raise ValueError("input_ids must be a list of integers or a list of such lists")
            batched = len(input_ids) > 0 and isinstance(input_ids[0], list)
        if batched and not prompts:
            raise ValueError(f"{field}: the batch is empty")
        n_prompts = len(prompts) if batched else 1
        if n_prompts > lim.max_batch_prompts:
            raise ValueError(f"{field}: {n_prompts} prompts in one request; at most {lim.max_batch_prompts} "
                             "(--max-batch-prompts)")
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n_prompts
        if len(sps) != n_prompts:
            raise ValueError(f"sampling_params: got {len(sps)} for {n_prompts} prompts")
        rids = self._rids(rid, n_prompts, batched)
        if isinstance(return_logprob, list):
            raise ValueError("return_logprob: per-prompt lists are not supported; pass one bool")
        if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise ValueError("top_logprobs_num must be a non-negative integer")
        if top_logprobs_num > lim.max_top_logprobs_num:
            raise ValueError(f"top_logprobs_num: {top_logprobs_num} is more than the {lim.max_top_logprobs_num} "
                             "allowed (--max-top-logprobs-num)")
        if isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise ValueError("logprob_start_len must be an integer >= -1")
        extra_keys = self._per_prompt(extra_key, "extra_key", n_prompts, batched)
        salts = self._per_prompt(cache_salt, "cache_salt", n_prompts, batched)
        priority = self._priority(priority)
        boot = self.bootstrap(bootstrap_host, bootstrap_port, bootstrap_room)
        loras = self._lora_paths(lora_path, n_prompts, batched)
        # sampling params first: they are cheap, and a bad one should not cost a tokenization
        sp_objs = []
        for sp_dict in sps:
            check_strings(sp_dict, "sampling_params")
            if isinstance(sp_dict, dict):
                sp_dict = check_sampling_fields(sp_dict)
            sp = SamplingParams.from_dict(sp_dict, defaults=self.sampling_defaults)
            self.check_limits(sp)  # bounds first: a thousand patterns are refused before any is parsed
            sp.verify(self.vocab_size)
            if self.tokenizer is None and sp.stop_regex_strs:
                raise ValueError("stop_regex: matching needs a tokenizer (skip_tokenizer_init is set)")
            sp_objs.append(sp)
        if text is not None:
            texts = text if batched else [text]
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            if self.tokenizer is None:
                raise ValueError("text: this engine has no tokenizer (skip_tokenizer_init); pass input_ids")
            ids_list = [self.encode(t, field) for t in texts]
        else:
            ids_list = input_ids if batched else [input_ids]
        msgs: List[TokenizedGenerateReqInput] = []
        for ids, sp, r, ek, salt, lora in zip(ids_list, sp_objs, rids, extra_keys, salts, loras):
            ids = self.validate_ids(ids, sp)
            if return_logprob and logprob_start_len >= len(ids):
                raise ValueError(f"logprob_start_len ({logprob_start_len}) is higher than the number of input "
                                 f"tokens ({len(ids)})")
            for i in range(sp.n):
                msgs.append(TokenizedGenerateReqInput(
                    rid=r if sp.n == 1 else f"{r}-{i}", input_ids=list(ids), sampling_params=sp,
                    return_logprob=bool(return_logprob), top_logprobs_num=top_logprobs_num,
                    logprob_start_len=logprob_start_len if return_logprob else -1, stream=stream, seed_offset=i,
                    extra_key=ek, cache_salt=salt, priority=priority, lora_path=lora, **boot))
        if boot and len(msgs) != 1:
            raise ValueError("bootstrap_room: a PD disaggregation request carries one prompt with n = 1")
        if len({m.rid for m in msgs}) != len(msgs):
            raise ValueError("rid: request ids must be unique")
        return msgs, batched

    @staticmethod
    def _per_prompt(value: Any, field: str, n: int, batched: bool) -> List[Optional[str]]:
        """A string for every prompt, or one per prompt (SGLang's rule); "" means none."""
        if value is None:
            return [None] * n
        if isinstance(value, list) and batched:
            if len(value) != n or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{field}: a list of {n} strings is required for {n} prompts")
            vals = value
        elif isinstance(value, str):
            vals = [value] * n
        else:
            raise ValueError(f"{field} must be a string" + (" or a list of strings" if batched else ""))
        for v in vals:
            check_text(v, field)
            if len(v) > 4096:
                raise ValueError(f"{field}: {len(v)} characters; at most 4096")
        return [v or None for v in vals]

    def bootstrap(self, host: Any, port: Any, room: Any) -> Dict[str, Any]:
        """The PD disaggregation fields sglang-router adds (bootstrap_host/port/room), checked; {} when
        absent (a PD worker also serves plain requests, e.g. /health_generate)."""
        if host is None and port is None and room is None:
            return {}
        if self.disaggregation_mode == "null":
            raise ValueError("bootstrap_room: this server is not a PD worker (start it with "
                             "--disaggregation-mode prefill or decode)")
        if isinstance(room, bool) or not isinstance(room, int) or not 0 <= room < 2**64:
            raise ValueError(f"bootstrap_room must be an unsigned 64-bit integer, got {room!r}")
        if not isinstance(host, str) or not host or len(host) > 255 or any(c.isspace() for c in host):
            raise ValueError(f"bootstrap_host must be the prefill worker's host name or address, got {host!r}")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
            raise ValueError(f"bootstrap_port must be a port number (1-65535) or null, got {port!r}")
        return {"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room}

    def _lora_paths(self, value: Any, n: int, batched: bool) -> List[Optional[str]]:
        """SGLang's lora_path: an adapter name (or null: the base model), or one per prompt."""
        vals = value if isinstance(value, list) and batched else [value] * n
        if len(vals) != n:
            raise ValueError(f"lora_path: a list of {n} adapter names (or nulls) is required for {n} prompts")
        if all(v is None for v in vals):
            return list(vals)
        if self.lora_names is None:
            raise ValueError("lora_path: LoRA is not enabled on this server (--enable-lora / --lora-paths)")
        known = self.lora_names()
        for v in vals:
            if v is not None and not isinstance(v, str):
                raise ValueError(f"lora_path must be an adapter name or null, got {type(v).__name__}")
            if v is not None and v not in known:
                raise ValueError(f"lora_path: unknown LoRA adapter {v[:200]!r} (loaded: "
                                 f"{', '.join(sorted(known)) or 'none'})")
        return list(vals)

    def _priority(self, priority: Any) -> Optional[int]:
        if priority is None:
            return None
        if isinstance(priority, bool) or not isinstance(priority, int) or not -(2**63) <= priority < 2**63:
            raise ValueError(f"priority must be a 64-bit integer, got {priority!r}")
        if not self.enable_priority_scheduling:
            raise ValueError("priority: priority scheduling is disabled; start the server with "
                             "--enable-priority-scheduling, or leave priority out")
        return priority

    @staticmethod
    def _rids(rid: Any, n: int, batched: bool) -> List[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(n)]
        if isinstance(rid, list):
            if len(rid) != n or not all(isinstance(r, str) for r in rid):
                raise ValueError(f"rid: a list of {n} strings is required for {n} prompts")
            for r in rid:
                check_text(r, "rid")
            return rid
        if not isinstance(rid, str):
            raise ValueError("rid must be a string or a list of strings")
        check_text(rid, "rid")
        return [f"{rid}_{i}" for i in range(n)] if batched else [rid]

    def check_limits(self, sp: SamplingParams) -> None:
        """The server's bounds on n, stop strings and grammar size (no tokenizer, no grammar compile)."""
        lim = self.limits
        if isinstance(sp.n, int) and not isinstance(sp.n, bool) and sp.n > lim.max_n:
            raise ValueError(f"n: {sp.n} samples per prompt; at most {lim.max_n} (--max-n)")
        if isinstance(sp.stop, (list, tuple)) and len(sp.stop) > lim.max_stop_strings:
            raise ValueError(f"stop: {len(sp.stop)} stop strings; at most {lim.max_stop_strings} (--max-stop-strings)")
        if sp.stop is not None:
            for s in [sp.stop] if isinstance(sp.stop, str) else sp.stop if isinstance(sp.stop, (list, tuple)) else []:
                if isinstance(s, str) and len(s) > lim.max_stop_string_len:
                    raise ValueError(f"stop: a stop string of {len(s)} characters; at most "
                                     f"{lim.max_stop_string_len} (--max-stop-string-len)")
        regexes = sp.stop_regex_strs if isinstance(sp.stop_regex, (str, list)) else []
        if len(regexes) > lim.max_stop_strings:
            raise ValueError(f"stop_regex: {len(regexes)} patterns; at most {lim.max_stop_strings} "
                             "(--max-stop-strings)")
        for p in regexes:
            if isinstance(p, str) and len(p) > lim.max_stop_string_len:
                raise ValueError(f"stop_regex: a pattern of {len(p)} characters; at most "
                                 f"{lim.max_stop_string_len} (--max-stop-string-len)")
        if sp.stop_token_ids is not None and isinstance(sp.stop_token_ids, (list, tuple)) \
                and len(sp.stop_token_ids) > self.vocab_size:
            raise ValueError(f"stop_token_ids: {len(sp.stop_token_ids)} ids; at most the vocabulary size "
                             f"({self.vocab_size})")
        for name in ("regex", "json_schema", "ebnf", "structural_tag"):
            v = getattr(sp, name)
            if v is None:
                continue
            size = len(v.encode("utf-8")) if isinstance(v, str) else grammar_size(v)
            if size > lim.max_grammar_bytes:
                raise ValueError(f"{name}: {size} bytes; at most {lim.max_grammar_bytes} (--max-grammar-bytes)")

    def validate_ids(self, ids: Any, sp: SamplingParams) -> List[int]:
        vocab, ctx = self.vocab_size, self.context_len
        if not isinstance(ids, (list, tuple)):
            raise ValueError("input_ids must be a list of integers (or a list of such lists)")
        if len(ids) >= ctx:  # before looking at each token: a huge list is refused at once
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length ({ctx} tokens).")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("input_ids must be a list of integers (or a list of such lists)")
        if len(ids) == 0:
            raise ValueError("The input is empty: give a non-empty prompt (text or input_ids).")
        bad: Optional[int] = next((t for t in ids if not (0 <= t < vocab)), None)
        if bad is not None:
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        sp.verify(vocab)
        self.check_limits(sp)
        if sp.max_new_tokens is None:
            sp.max_new_tokens = ctx - len(ids)
            if sp.min_new_tokens > sp.max_new_tokens:
                raise ValueError(f"min_new_tokens ({sp.min_new_tokens}) is more than the context leaves for the "
                                 f"completion ({sp.max_new_tokens} tokens)")
        elif len(ids) + sp.max_new_tokens > ctx:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
                f"total of {len(ids) + sp.max_new_tokens} tokens: {len(ids)} tokens from the input and "
                f"{sp.max_new_tokens} tokens for the completion (max_new_tokens). Please reduce the number of "
                "tokens in the input or the completion.")
        key = grammar_key(sp)
        if key is not None:
            if self.grammar_backend == "none":
                raise ValueError(f"{_GRAMMAR_FIELD[key[0]]}: constrained decoding is disabled "
                                 "(--grammar-backend none)")
            if self.tokenizer is None:
                raise ValueError("constrained decoding needs a tokenizer (skip_tokenizer_init is set)")
            self.check_grammar(key)
        return list(ids)

    def check_grammar(self, key) -> None:
        """check_grammar_syntax on a worker, bounded by the compile timeout (a pathological grammar
        fails its request instead of holding the caller)."""
        field = _GRAMMAR_FIELD[key[0]]
        if isinstance(key[1], str) and len(key[1].encode("utf-8", "replace")) > self.limits.max_grammar_bytes:
            raise ValueError(f"{field}: {len(key[1].encode('utf-8', 'replace'))} bytes; at most "
                             f"{self.limits.max_grammar_bytes} (--max-grammar-bytes)")
        try:
            call_with_deadline(check_grammar_syntax, (key,), self.limits.grammar_compile_timeout, "grammar-check")
        except concurrent.futures.TimeoutError:  # the stuck check keeps its (daemon) thread
            raise ValueError(f"{field}: checking the grammar took longer than {self.limits.grammar_compile_timeout:g} "
                             "s (--grammar-compile-timeout)") from None


def grammar_size(obj: Any) -> int:
    """Bytes of a JSON schema given as an object (its compact JSON text)."""
    import json

    try:
        return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace"))
    except (TypeError, ValueError):
        return 0
