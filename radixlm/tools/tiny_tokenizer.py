"""The tokenizer of the generated checkpoints: a byte-level BPE trained deterministically with the
``tokenizers`` library on ``corpus.txt`` (next to this file; cached per process), its
``tokenizer_config.json`` with a ChatML chat template, and ``special_tokens_map.json``.
Special tokens have fixed ids: ``<|endoftext|>`` = 0 (eos / pad), ``<|im_start|>`` = 1,
``<|im_end|>`` = 2.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN_ID = 0  # <|endoftext|>, also pad and bos id in config.json
IM_START_ID = 1
IM_END_ID = 2

CORPUS_PATH = pathlib.Path(__file__).with_name("corpus.txt")

# ChatML.  Each message renders exactly as
#   <|im_start|>{role}\n{content}<|im_end|>\n
# for roles system / user / assistant / tool.  ``content`` may be a string,
# None (rendered empty) or a list of OpenAI-style parts ({"type": "text",
# "text": ...}).  Assistant ``tool_calls`` are appended to the content as
# <tool_call>{json}</tool_call> lines; a ``tools`` list, if given, is
# described in a leading system message (merged into the first system message
# if there is one).  ``add_generation_prompt`` appends
# "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{ content }}"
    "{%- else -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(tools_text='') -%}"
    "{%- if tools -%}"
    "{%- set ns.tools_text = '# Tools\\n\\nYou may call one or more functions. "
    "Function signatures are given within <tools></tools>:\\n<tools>' -%}"
    "{%- for tool in tools -%}"
    "{%- set ns.tools_text = ns.tools_text ~ '\\n' ~ (tool | tojson) -%}"
    "{%- endfor -%}"
    "{%- set ns.tools_text = ns.tools_text ~ '\\n</tools>\\n\\nFor each call return "
    "<tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.' -%}"
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n' ~ ns.tools_text ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('Unsupported chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}"
    "{{- render_content(message['content'] if 'content' in message else none) -}}"
    "{%- if loop.first and message['role'] == 'system' and ns.tools_text -%}"
    "{{- '\\n\\n' ~ ns.tools_text -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if 'function' in call else call -%}"
    "{%- set args = fn['arguments'] if 'arguments' in fn else {} -%}"
    "{{- '\\n' if (loop.first and message['content']) or not loop.first else '' -}}"
    "{{- '<tool_call>{\"name\": ' ~ (fn['name'] | tojson) ~ ', \"arguments\": ' -}}"
    "{{- (args if args is string else (args | tojson)) ~ '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# Reasoning-model variants (``chat_template_style``), for the reasoning parsers' tests: ChatML whose
# generation prompt handles the think block as the real templates do.
#   qwen3        Qwen3's: the model opens <think> itself; ``enable_thinking=False`` (a chat_template_kwargs
#                key) makes the prompt close an empty block ("<think>\n\n</think>\n\n").
#   deepseek-r1  DeepSeek-R1's (recent revisions): the prompt opens the block ("<think>\n"), so the
#                model's output starts inside it.
_GEN_PROMPT = "{{- '<|im_start|>assistant\\n' -}}"
CHAT_TEMPLATES = {
    "chatml": CHAT_TEMPLATE,
    "qwen3": CHAT_TEMPLATE.replace(
        _GEN_PROMPT, _GEN_PROMPT + "{%- if enable_thinking is defined and enable_thinking is false -%}"
                                   "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"),
    "deepseek-r1": CHAT_TEMPLATE.replace(_GEN_PROMPT, _GEN_PROMPT + "{{- '<think>\\n' -}}"),
}


def _read_corpus() -> list[str]:
    text = CORPUS_PATH.read_text(encoding="utf-8")
    # Normalise line endings so a checkout with CRLF conversion trains the
    # exact same tokenizer.
    text = text.replace("\r\n", "\n")
    return [p for p in text.split("\n\n") if p.strip()]


@functools.lru_cache(maxsize=None)
def get_tokenizer_json(vocab_size: int) -> str:
    """Train (once per process) the byte-level BPE on ``corpus.txt`` and return its JSON text.

    Deterministic: same corpus + same ``vocab_size`` -> identical tokenizer.
    Ids 0, 1, 2 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``;
    then the 256 byte symbols, then merges.
    """
    return train_bpe(_read_corpus(), vocab_size)


def train_bpe(texts: list[str], vocab_size: int) -> str:
    """A byte-level BPE with the special tokens above at ids 0-2, trained on ``texts``; its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    n = tok.get_vocab_size()
    if n != vocab_size:
        raise RuntimeError(f"corpus too small: trained {n} tokens, wanted {vocab_size}")
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} did not get id {i}")
    return tok.to_str()


def tokenizer_config(model_max_length: int, chat_template_style: str = "chatml") -> dict[str, Any]:
    if chat_template_style not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template_style {chat_template_style!r}: one of {', '.join(CHAT_TEMPLATES)}")
    added = {
        str(i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATES[chat_template_style],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def special_tokens_map() -> dict[str, Any]:
    def tok(s: str) -> dict[str, Any]:
        return {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": [tok("<|im_start|>"), tok("<|im_end|>")],
        "eos_token": tok("<|endoftext|>"),
        "pad_token": tok("<|endoftext|>"),
    }
