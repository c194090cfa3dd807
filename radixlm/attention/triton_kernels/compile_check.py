"""Compile every kernel configuration the backend uses for a CUDA target, without a GPU.

    python -m radixlm.attention.triton_kernels.compile_check [--arch 90] [--head-dims 64,96,128,256]

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
extend, decode and KV-store kernels at the block sizes `triton_backend` picks, in bf16 and fp32,
and prints one line per kernel with its shared memory use and whether it uses tensor cores. It catches what the CPU
interpreter cannot: type errors in compiled mode, unsupported ops, and configurations that need
more shared memory than the target has (sm_90: 227 KiB per block). Must run without
TRITON_INTERPRET (it unsets it before importing triton).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _sig(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "i32")
    return sig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dims", default="64,96,128,256")
    ap.add_argument("--gqa", default="4,2,1", help="q heads per kv head")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from radixlm.attention import triton_backend as tb
    from radixlm.attention.triton_kernels import common, decode_attention as da, extend_attention as ea, kv_store as ks
    if common.INTERPRETED:
        print("kernels were decorated for the interpreter; run in a fresh process without TRITON_INTERPRET")
        return 2

    target = GPUTarget("cuda", args.arch, 32)
    smem_limit = 232448 if args.arch >= 90 else 166912 if args.arch >= 80 else 101376
    failed = 0

    def compile_one(label, fn, types, constexprs, num_warps, num_stages):
        nonlocal failed
        t0 = time.perf_counter()
        try:
            src = ASTSource(fn=fn, signature=_sig(fn, types, constexprs), constexprs=constexprs)
            k = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
            md = k.metadata
            shared = getattr(md, "shared", None)
            ptx = k.asm.get("ptx", "")
            mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma"
            ok = shared is None or shared <= smem_limit
            failed += not ok
            print(f"{'ok ' if ok else 'BAD'} {label}: shared={shared} B {mma} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report and continue
            failed += 1
            print(f"ERR {label}: {type(e).__name__}: {str(e)[:800]}", flush=True)

    for dt in ("bf16", "fp32"):
        for d in [int(x) for x in args.head_dims.split(",")]:
            bd = common.block_d(d)
            for group in [int(x) for x in args.gqa.split(",")]:
                cfg = tb.extend_config(d, cuda=True)
                ptr = {n: f"*{dt}" for n in ("Q", "KNew", "VNew", "O", "KBuf", "VBuf")}
                ptr.update({"ReqToToken": "*i64", "ReqPoolIdx": "*i64", "PrefixLens": "*i64", "ExtendLens": "*i64",
                            "QoStart": "*i32", "TileReq": "*i32", "TileM": "*i32", "sm_scale_log2": "fp32"})
                compile_one(f"extend {dt} D={d} G={group} {cfg}", ea._extend_attn_kernel, ptr,
                            dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"],
                                 IEEE=dt == "fp32"), cfg["num_warps"], cfg["num_stages"])
                dcfg = tb.decode_config(d, cuda=True)
                ptr = {n: f"*{dt}" for n in ("Q", "KBuf", "VBuf")}
                ptr.update({"ReqToToken": "*i64", "ReqPoolIdx": "*i64", "SeqLens": "*i64", "MidO": "*fp32",
                            "MidLse": "*fp32", "sm_scale_log2": "fp32"})
                compile_one(f"decode-1 {dt} D={d} G={group} {dcfg}", da._decode_stage1_kernel, ptr,
                            dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_H=max(16, common.next_pow2(group)),
                                 BLOCK_N=dcfg["block_n"], IEEE=dt == "fp32"), dcfg["num_warps"], dcfg["num_stages"])
            compile_one(f"decode-2 {dt} D={d}", da._decode_stage2_kernel,
                        {"MidO": "*fp32", "MidLse": "*fp32", "O": f"*{dt}", "SeqLens": "*i64"},
                        dict(HEAD_DIM=d, BLOCK_D=bd), 4 if bd <= 128 else 8, 2)
            row = 8 * d
            bc = min(common.next_pow2(row), 1024)
            compile_one(f"kv-store {dt} row={row}", ks._store_kv_kernel,
                        {"K": f"*{dt}", "V": f"*{dt}", "Loc": "*i64", "KBuf": f"*{dt}", "VBuf": f"*{dt}"},
                        dict(ROW=row, BLOCK_T=max(1, 4096 // bc), BLOCK_C=bc), 4, 2)
    print("compile check:", "FAILED" if failed else "all kernels compiled", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
