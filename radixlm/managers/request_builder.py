"""Turns a user's generate call (text or ids, single or batch, sampling params, n) into validated
`TokenizedGenerateReqInput`s. Shared by the offline Engine and the HTTP server's tokenizer manager,
so both accept and reject exactly the same inputs. Every rejection is a ValueError naming the field,
raised before anything reaches the scheduler.
"""

from __future__ import annotations

import uuid
from typing import Any, List, Optional, Tuple

from radixlm.constrained import check_grammar_syntax, grammar_key
from radixlm.core import SamplingParams
from radixlm.managers.io_struct import TokenizedGenerateReqInput


class RequestBuilder:
    def __init__(self, tokenizer, vocab_size: int, context_len: int, grammar_backend: str = "xgrammar"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.context_len = context_len
        self.grammar_backend = grammar_backend

    def build(self, text=None, input_ids=None, sampling_params=None, rid=None, return_logprob: bool = False,
              top_logprobs_num: int = 0, logprob_start_len: int = -1, stream: bool = False
              ) -> Tuple[List[TokenizedGenerateReqInput], bool]:
        """Returns (messages, batched). A prompt with n samples gives n consecutive messages."""
        if (text is None) == (input_ids is None):
            raise ValueError("Either text or input_ids should be provided (exactly one of them).")
        if text is not None:
            batched = isinstance(text, list)
            texts = text if batched else [text]
            if batched and not texts:
                raise ValueError("text: the batch is empty")
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            if self.tokenizer is None:
                raise ValueError("text: this engine has no tokenizer (skip_tokenizer_init); pass input_ids")
            ids_list = [self.tokenizer.encode(t) for t in texts]
        else:
            if not isinstance(input_ids, list):
                raise ValueError("input_ids must be a list of integers or a list of such lists")
            batched = len(input_ids) > 0 and isinstance(input_ids[0], list)
            ids_list = input_ids if batched else [input_ids]
            if batched and not ids_list:
                raise ValueError("input_ids: the batch is empty")
        n_prompts = len(ids_list)
        sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n_prompts
        if len(sps) != n_prompts:
            raise ValueError(f"sampling_params: got {len(sps)} for {n_prompts} prompts")
        rids = self._rids(rid, n_prompts, batched)
        if isinstance(return_logprob, list):
            raise ValueError("return_logprob: per-prompt lists are not supported; pass one bool")
        if isinstance(top_logprobs_num, bool) or not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise ValueError("top_logprobs_num must be a non-negative integer")
        if isinstance(logprob_start_len, bool) or not isinstance(logprob_start_len, int) or logprob_start_len < -1:
            raise ValueError("logprob_start_len must be an integer >= -1")
        msgs: List[TokenizedGenerateReqInput] = []
        for ids, sp_dict, r in zip(ids_list, sps, rids):
            sp = SamplingParams.from_dict(sp_dict)
            ids = self.validate_ids(ids, sp)
            if return_logprob and logprob_start_len >= len(ids):
                raise ValueError(f"logprob_start_len ({logprob_start_len}) is higher than the number of input "
                                 f"tokens ({len(ids)})")
            for i in range(sp.n):
                msgs.append(TokenizedGenerateReqInput(
                    rid=r if sp.n == 1 else f"{r}-{i}", input_ids=list(ids), sampling_params=sp.to_dict(),
                    return_logprob=bool(return_logprob), top_logprobs_num=top_logprobs_num,
                    logprob_start_len=logprob_start_len if return_logprob else -1, stream=stream, seed_offset=i))
        if len({m.rid for m in msgs}) != len(msgs):
            raise ValueError("rid: request ids must be unique")
        return msgs, batched

    @staticmethod
    def _rids(rid: Any, n: int, batched: bool) -> List[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(n)]
        if isinstance(rid, list):
            if len(rid) != n or not all(isinstance(r, str) for r in rid):
                raise ValueError(f"rid: a list of {n} strings is required for {n} prompts")
            return rid
        if not isinstance(rid, str):
            raise ValueError("rid must be a string or a list of strings")
        return [f"{rid}_{i}" for i in range(n)] if batched else [rid]

    def validate_ids(self, ids: Any, sp: SamplingParams) -> List[int]:
        vocab, ctx = self.vocab_size, self.context_len
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("input_ids must be a list of integers (or a list of such lists)")
        if len(ids) == 0:
            raise ValueError("The input is empty: give a non-empty prompt (text or input_ids).")
        bad: Optional[int] = next((t for t in ids if not (0 <= t < vocab)), None)
        if bad is not None:
            raise ValueError(f"input_ids: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= ctx:
            raise ValueError(f"The input ({len(ids)} tokens) is longer than the model's context length ({ctx} tokens).")
        sp.verify(vocab)
        key = grammar_key(sp)
        if key is not None:
            if self.grammar_backend == "none":
                raise ValueError(f"{key[0] if key[0] != 'json' else 'json_schema'}: constrained decoding is "
                                 "disabled (--grammar-backend none)")
            if self.tokenizer is None:
                raise ValueError("constrained decoding needs a tokenizer (skip_tokenizer_init is set)")
            check_grammar_syntax(key)
        if sp.max_new_tokens is None:
            sp.max_new_tokens = ctx - len(ids)
        elif len(ids) + sp.max_new_tokens > ctx:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
                f"total of {len(ids) + sp.max_new_tokens} tokens: {len(ids)} tokens from the input and "
                f"{sp.max_new_tokens} tokens for the completion (max_new_tokens). Please reduce the number of "
                "tokens in the input or the completion.")
        return list(ids)
