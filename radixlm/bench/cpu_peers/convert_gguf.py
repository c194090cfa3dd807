"""HF checkpoint -> GGUF (f32 / f16 / bf16) with the `convert_hf_to_gguf.py` shipped in the llama-cpp-python sdist.

Run as a subprocess (the converter parses sys.argv and edits sys.path):

    python -m radixlm.bench.cpu_peers.convert_gguf MODEL_DIR --converter .peers/.../convert_hf_to_gguf.py \
        --outtype f16 --outfile OUT.gguf

The converter imports `gguf` from the `gguf-py/` beside it: the PyPI `gguf` release (0.19.0) is older than the
converter of the vendored llama.cpp (it lacks `gguf.LazyChunkedTensor`), so the two are used as shipped together.

Our checkpoints (radixlm/tools/make_tiny_model.py) carry a locally trained byte-level BPE tokenizer: a
`tokenizer.json` only, no sentencepiece `tokenizer.model`. The converter's Llama path tries sentencepiece first
(and fails on the missing module, not on the missing file) and then recognises BPE pre-tokenizers by hashing the
tokens of a probe string, which no published model shares with ours. Two adjustments, both exact for this tokenizer:
the sentencepiece / Llama-HF vocab paths report "no such file" when `tokenizer.model` is absent, so the converter
takes its GPT-2/Llama-3 BPE path (vocab + merges written as they are in tokenizer.json, padded to the model's
vocab_size); and an unrecognised pre-tokenizer hash is named `gpt-2` when tokenizer.json's pre-tokenizer is
`ByteLevel(use_regex=True)`, which is exactly GPT-2's split regex. Anything else still fails as the converter would.
The benchmark sends token ids, so text tokenization never decides what the model sees; it matters only for the
server's detokenized `content`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
from typing import List, Optional


def is_gpt2_byte_level(model_dir: pathlib.Path) -> bool:
    """tokenizer.json's pre-tokenizer is ByteLevel with GPT-2's regex (alone, or the only step of a Sequence)."""
    p = model_dir / "tokenizer.json"
    if not p.is_file():
        return False
    pre = json.loads(p.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True)


def _patch(base, model_dir: pathlib.Path) -> None:
    text_model = base.TextModel
    if not (model_dir / "tokenizer.model").is_file():
        def no_sentencepiece(self, *a, **k):
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")

        text_model._set_vocab_sentencepiece = no_sentencepiece
        text_model._set_vocab_llama_hf = no_sentencepiece
    orig_pre = text_model.get_vocab_base_pre
    gpt2 = is_gpt2_byte_level(model_dir)

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return orig_pre(self, tokenizer)
        except NotImplementedError:
            if not gpt2:
                raise
            print("convert_gguf: pre-tokenizer hash not in the converter's list; tokenizer.json is "
                  "ByteLevel(use_regex=True) = GPT-2's split: writing tokenizer.ggml.pre = 'gpt-2'", file=sys.stderr)
            return "gpt-2"  # llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2 (GPT-2's split regex)

    text_model.get_vocab_base_pre = vocab_base_pre


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m radixlm.bench.cpu_peers.convert_gguf")
    ap.add_argument("model_dir")
    ap.add_argument("--converter", required=True, help="convert_hf_to_gguf.py of the llama.cpp source tree")
    ap.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16"))
    ap.add_argument("--outfile", required=True)
    args = ap.parse_args(argv)
    conv = pathlib.Path(args.converter).resolve()
    sys.path[:0] = [str(conv.parent), str(conv.parent / "gguf-py")]
    import conversion.base as base  # the converter's package, beside the script

    _patch(base, pathlib.Path(args.model_dir).resolve())
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", conv)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.argv = [str(conv), args.model_dir, "--outtype", args.outtype, "--outfile", args.outfile]
    mod.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
