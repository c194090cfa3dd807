"""Every request field of SGLang 0.5.x (`GenerateReqInput`, `SamplingParams`) and how radixlm treats it:
the one table to edit when SGLang's wire format grows.

SGLang's own clients send whole structures: `sglang-router` forwards the full `GenerateReqInput`
(`model`, `background`, `no_logs`, `return_bytes`, ...) and the frontend's `RuntimeEndpoint` sends
every sampling key (`stop_regex`, `json_schema`, ... as null). A field is one of:

* HANDLED: radixlm implements it (the request builder reads it).
* METADATA: accepted whatever its value; it does not change what is generated (ids, labels, logging
  and tracing switches, routing hints).
* UNSUPPORTED: a feature radixlm lacks. Accepted silently at its default (null, false, empty, or the
  value in `DEFAULTS`; a per-prompt list of such values too); any other value is a 400 naming the field.

`check_generate_fields(obj)` and `check_sampling_fields(d)` apply the table (and reject names SGLang
does not have either); `docs/limits.md` ("SGLang fields") documents it.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

HANDLED, METADATA, UNSUPPORTED = "handled", "metadata", "unsupported"

SGLANG_VERSION = "0.5.23"  # the field lists below are this version's

GENERATE_FIELDS: Dict[str, str] = {
    # inputs and outputs radixlm implements
    "text": HANDLED, "input_ids": HANDLED, "sampling_params": HANDLED, "rid": HANDLED, "stream": HANDLED,
    "return_logprob": HANDLED, "logprob_start_len": HANDLED, "top_logprobs_num": HANDLED,
    "return_text_in_logprobs": HANDLED,
    "extra_key": HANDLED, "cache_salt": HANDLED,  # separate radix-cache namespaces
    "priority": HANDLED,  # with --enable-priority-scheduling
    "bootstrap_host": HANDLED, "bootstrap_port": HANDLED, "bootstrap_room": HANDLED,  # PD (--disaggregation-mode)
    "lora_path": HANDLED,  # adapter name per prompt, with --enable-lora
    # harmless metadata
    "model": METADATA, "log_metrics": METADATA, "no_logs": METADATA, "custom_labels": METADATA,
    "received_time": METADATA, "routing_key": METADATA, "conversation_id": METADATA,
    "external_trace_header": METADATA, "http_worker_ipc": METADATA,
    # features radixlm lacks: accepted at their default only
    "session_id": UNSUPPORTED, "input_embeds": UNSUPPORTED, "image_data": UNSUPPORTED, "video_data": UNSUPPORTED,
    "audio_data": UNSUPPORTED, "mm_hashes": UNSUPPORTED, "mm_content_hashes": UNSUPPORTED,
    "use_audio_in_video": UNSUPPORTED, "video_config": UNSUPPORTED, "watermark": UNSUPPORTED,
    "token_ids_logprob": UNSUPPORTED, "return_sampling_mask": UNSUPPORTED, "sampling_logprobs_mode": UNSUPPORTED,
    "return_flat_raw_top_logprobs": UNSUPPORTED, "return_flat_raw_output_top_logprobs": UNSUPPORTED,
    "return_flat_raw_top_logprobs_b64": UNSUPPORTED, "return_hidden_states": UNSUPPORTED,
    "return_routed_experts": UNSUPPORTED, "routed_experts_start_len": UNSUPPORTED,
    "return_indexer_topk": UNSUPPORTED, "modalities": UNSUPPORTED, "session_params": UNSUPPORTED,
    "lora_id": UNSUPPORTED, "custom_logit_processor": UNSUPPORTED,
    "positional_embed_overrides": UNSUPPORTED, "bootstrap_pair_key": UNSUPPORTED, "decode_tp_size": UNSUPPORTED,
    "routed_dp_rank": UNSUPPORTED, "data_parallel_rank": UNSUPPORTED, "disagg_prefill_dp_rank": UNSUPPORTED,
    "background": UNSUPPORTED, "require_reasoning": UNSUPPORTED, "max_thinking_tokens": UNSUPPORTED,
    "return_bytes": UNSUPPORTED, "return_entropy": UNSUPPORTED, "return_prompt_token_ids": UNSUPPORTED,
    "need_wait_for_mm_inputs": UNSUPPORTED, "num_items_assigned": UNSUPPORTED, "encoder_urls": UNSUPPORTED,
    "max_dynamic_patch": UNSUPPORTED, "min_dynamic_patch": UNSUPPORTED, "image_max_dynamic_patch": UNSUPPORTED,
    "video_max_dynamic_patch": UNSUPPORTED, "images_config": UNSUPPORTED, "mm_processor_kwargs": UNSUPPORTED,
    "multi_item_delimiter_indices": UNSUPPORTED, "token_indices_to_pool": UNSUPPORTED, "kv_hints": UNSUPPORTED,
}

SAMPLING_FIELDS: Dict[str, str] = {
    **{name: HANDLED for name in (
        "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p",
        "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "n", "json_schema",
        "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
        "no_stop_trim", "stream_interval", "logit_bias", "sampling_seed", "custom_params")},
    "seed": HANDLED,  # OpenAI's name for sampling_seed
    "beam_width": UNSUPPORTED, "watermark": UNSUPPORTED,
    # SGLang's internal (normalized) fields: a client that sets them expects behaviour radixlm lacks
    "stop_strs": UNSUPPORTED, "stop_regex_strs": UNSUPPORTED, "stop_str_max_len": UNSUPPORTED,
    "stop_regex_max_len": UNSUPPORTED, "is_normalized": UNSUPPORTED, "ebnf_full_assistant": UNSUPPORTED,
}

# Defaults other than null/false/empty: values that mean "the feature is off" for these fields.
DEFAULTS: Dict[str, Tuple[Any, ...]] = {
    "routed_experts_start_len": (0,),
    "routed_dp_rank": (0,), "data_parallel_rank": (0,), "disagg_prefill_dp_rank": (0,),  # one DP rank here
    "decode_tp_size": (0, 1),
    "beam_width": (0, 1),
    "stop_str_max_len": (0,), "stop_regex_max_len": (0,),
}

WHY: Dict[str, str] = {  # the 400's reason, for fields where "not supported" needs a word more
    "background": "background generation is not supported; send the request and wait for it",
    "return_hidden_states": "returning hidden states is not supported",
    "return_entropy": "returning entropies is not supported",
    "lora_path": "LoRA adapters are not supported", "lora_id": "LoRA adapters are not supported",
    "image_data": "this server serves text-only models", "video_data": "this server serves text-only models",
    "audio_data": "this server serves text-only models", "input_embeds": "input embeddings are not supported",
    "session_params": "sessions are not supported", "session_id": "sessions are not supported",
    "bootstrap_pair_key": "bootstrap_pair_key is not supported (one bootstrap room per request)",
    "routed_dp_rank": "this server is one data-parallel rank (0)",
    "data_parallel_rank": "this server is one data-parallel rank (0)",
    "beam_width": "beam search is not supported", "watermark": "watermarking is not supported",
    "custom_logit_processor": "custom logit processors are not supported",
}


def is_default(name: str, value: Any) -> bool:
    """null, false, an empty string/list/dict, the field's off value in DEFAULTS, or a list of those."""
    if value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value):
        return True
    if not isinstance(value, bool) and value in DEFAULTS.get(name, ()):
        return True
    if isinstance(value, list):
        return all(is_default(name, v) for v in value)
    return False


def _check(obj: Dict[str, Any], table: Dict[str, str], where: str) -> None:
    unknown = sorted(k for k in obj if k not in table)
    if unknown:
        raise ValueError(f"Unknown {where} field(s): {', '.join(unknown)} (not in SGLang {SGLANG_VERSION}'s "
                         f"{'GenerateReqInput' if where == 'request' else 'SamplingParams'})")
    for name, value in obj.items():
        if table[name] == UNSUPPORTED and not is_default(name, value):
            field = name if where == "request" else f"sampling_params.{name}"
            raise ValueError(f"{field}: {WHY.get(name, 'not supported by radixlm')} (got {_short(value)}); "
                             "send it at its default (null) or leave it out")


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def check_generate_fields(obj: Dict[str, Any]) -> None:
    """Raises a ValueError naming the first field radixlm cannot honour (see the module docstring)."""
    _check(obj, GENERATE_FIELDS, "request")


def check_sampling_fields(d: Dict[str, Any]) -> Dict[str, Any]:
    """Checks one `sampling_params` dict; returns it without the UNSUPPORTED fields (all at their
    default by then), ready for `SamplingParams.from_dict`."""
    _check(d, SAMPLING_FIELDS, "sampling_params")
    return {k: v for k, v in d.items() if SAMPLING_FIELDS[k] != UNSUPPORTED}


def names(table: Dict[str, str], kind: str) -> Iterable[str]:
    return sorted(k for k, v in table.items() if v == kind)
