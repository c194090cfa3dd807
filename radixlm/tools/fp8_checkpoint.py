"""Offline conversion of HF checkpoints to and from the published block-FP8 format.

`quantize_checkpoint(src, dst)` writes a copy of a bf16/fp32 checkpoint whose linear-layer weights
(every 2-D `*.weight` except the embeddings and the LM head) are float8_e4m3fn with a float32
`weight_scale_inv` [ceil(out/bn), ceil(in/bk)] beside each, and config.json gains
`quantization_config` {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [bn, bk], "modules_to_not_convert": ["lm_head", ...]} -- the layout of
Qwen3-*-FP8 / DeepSeek-V3. `dequantize_checkpoint(src, dst)` does the reverse (weight * scale per
block, in float32, quantization_config removed), the checkpoint HF transformers runs as the
reference of an FP8 one. Tokenizer and other files are copied unchanged. One safetensors file out.

CLI::

    python -m radixlm.tools.fp8_checkpoint quantize SRC DST [--block 128 128]
    python -m radixlm.tools.fp8_checkpoint dequantize SRC DST
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Dict, Sequence

import torch

from radixlm.layers.quantization.fp8_utils import block_dequantize, block_quantize
from radixlm.models.loader import iterate_weights

KEPT = ("embed_tokens", "lm_head")  # stay in the checkpoint's dtype (as the published checkpoints keep them)


def _copy_side_files(src: str, dst: str) -> dict:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json" or name == "config.json":
            continue
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        return json.load(f)


def _save(dst: str, tensors: Dict[str, torch.Tensor], config: dict) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


def quantize_checkpoint(src: str, dst: str, block: Sequence[int] = (128, 128),
                        modules_to_not_convert: Sequence[str] = ("lm_head",)) -> str:
    """`modules_to_not_convert`: name parts of modules left in the checkpoint's dtype (besides the
    embeddings and the LM head, which always are)."""
    config = _copy_side_files(src, dst)
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    out: Dict[str, torch.Tensor] = {}
    for name, t in iterate_weights(src):
        keep = any(k in name for k in KEPT + tuple(modules_to_not_convert))
        if name.endswith(".weight") and t.dim() == 2 and not keep:
            out[name], out[name + "_scale_inv"] = block_quantize(t, block)
        else:
            out[name] = t
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [int(block[0]), int(block[1])],
                                     "modules_to_not_convert": list(modules_to_not_convert)}
    return _save(dst, out, config)


def dequantize_checkpoint(src: str, dst: str) -> str:
    config = _copy_side_files(src, dst)
    qc = config.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != "fp8":
        raise ValueError(f"{src} is not an fp8 checkpoint")
    block = qc["weight_block_size"]
    tensors = dict(iterate_weights(src))
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv")
        out[name] = block_dequantize(t, scale, block, torch.float32) if scale is not None else t.float()
    config["torch_dtype"] = "float32"
    if "dtype" in config:  # newer transformers' spelling
        config["dtype"] = "float32"
    return _save(dst, out, config)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("quantize", "dequantize"))
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128], metavar=("ROWS", "COLS"))
    a = ap.parse_args(argv)
    if a.action == "quantize":
        print(quantize_checkpoint(a.src, a.dst, a.block))
    else:
        print(dequantize_checkpoint(a.src, a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
