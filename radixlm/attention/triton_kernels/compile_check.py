"""Compile every kernel configuration the backend uses for a CUDA target, without a GPU.

    python -m radixlm.attention.triton_kernels.compile_check [--arch 90] [--head-dims 64,96,128,256]
        [--hidden-sizes 1024,4096] [--act-sizes 1024,4096,14336] [--kernels attention,layers]

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the
extend, decode and KV-store kernels at the block sizes `triton_backend` picks, and for the layers'
fused kernels (`radixlm.layers.triton_ops`: RMSNorm with and without the residual add at the hidden
sizes and per head, SiLU-and-mul, rotary at the head dims) at the launch configs their wrappers pick,
in bf16 and fp32, and prints one line per kernel with its shared memory use and whether it uses
tensor cores. It catches what the CPU
interpreter cannot: type errors in compiled mode, unsupported ops, and configurations that need
more shared memory than the target has (sm_90: 227 KiB per block). Must run without
TRITON_INTERPRET (it unsets it before importing triton).
"""

from __future__ import annotations

import argparse
import os
import re
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


def _widest_access(ptx: str) -> str:
    """The widest global load and store in the PTX, in bits (128: fully vectorised)."""
    widest = {"ld": 0, "st": 0}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx):
        widest[op] = max(widest[op], int(vec or 1) * int(bits))
    return f"ld{widest['ld']}/st{widest['st']}"


def _aligned_attrs(fn, names) -> dict:
    """What the launcher tells the compiler at run time for 16-byte aligned pointers and ints that are
    multiples of 16 (Triton specializes on both): without it loads are never vectorised."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--head-dims", default="64,96,128,256")
    ap.add_argument("--gqa", default="4,2,1", help="q heads per kv head")
    ap.add_argument("--hidden-sizes", default="1024,4096", help="RMSNorm widths (per-head norms use --head-dims)")
    ap.add_argument("--act-sizes", default="1024,4096,14336", help="SiLU-and-mul output widths (intermediate size)")
    ap.add_argument("--kernels", default="attention,layers", help="which groups to compile")
    args = ap.parse_args(argv)
    groups = set(args.kernels.split(","))
    if not groups <= {"attention", "layers"}:
        ap.error(f"--kernels: unknown {sorted(groups - {'attention', 'layers'})} (valid: attention, layers)")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from radixlm.attention import triton_backend as tb
    from radixlm.attention.triton_kernels import common
    from radixlm.attention.triton_kernels import decode_attention as da
    from radixlm.attention.triton_kernels import extend_attention as ea
    from radixlm.attention.triton_kernels import kv_store as ks
    from radixlm.layers.triton_ops import kernels as lk
    if common.INTERPRETED or lk.INTERPRETED:
        print("kernels were decorated for the interpreter; run in a fresh process without TRITON_INTERPRET")
        return 2

    target = GPUTarget("cuda", args.arch, 32)
    smem_limit = 232448 if args.arch >= 90 else 166912 if args.arch >= 80 else 101376
    failed = 0

    def compile_one(label, fn, types, constexprs, num_warps, num_stages, aligned=None):
        nonlocal failed
        t0 = time.perf_counter()
        try:
            attrs = _aligned_attrs(fn, aligned) if aligned is not None else None
            src = ASTSource(fn=fn, signature=_sig(fn, types, constexprs), constexprs=constexprs, attrs=attrs)
            k = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
            md = k.metadata
            shared = getattr(md, "shared", None)
            ptx = k.asm.get("ptx", "")
            mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma"
            ok = shared is None or shared <= smem_limit
            failed += not ok
            if aligned is not None:
                mma = f"{mma} {_widest_access(ptx)}"
            print(f"{'ok ' if ok else 'BAD'} {label}: shared={shared} B {mma} "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report and continue
            failed += 1
            print(f"ERR {label}: {type(e).__name__}: {str(e)[:800]}", flush=True)

    head_dims = [int(x) for x in args.head_dims.split(",")]
    for dt in ("bf16", "fp32") if "attention" in groups else ():
        for d in head_dims:
            bd = common.block_d(d)
            for group in [int(x) for x in args.gqa.split(",")]:
                cfg = tb.extend_config(d, cuda=True)
                ptr = {n: f"*{dt}" for n in ("Q", "KNew", "VNew", "O", "KBuf", "VBuf")}
                ptr.update({"ReqToToken": "*i64", "ReqPoolIdx": "*i64", "PrefixLens": "*i64", "ExtendLens": "*i64",
                            "QoStart": "*i32", "TileReq": "*i32", "TileM": "*i32", "sm_scale_log2": "fp32"})
                for sw in (False, True):
                    compile_one(f"extend {dt} D={d} G={group} sliding={sw} {cfg}", ea._extend_attn_kernel, ptr,
                                dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg["block_m"],
                                     BLOCK_N=cfg["block_n"], IEEE=dt == "fp32", SLIDING=sw),
                                cfg["num_warps"], cfg["num_stages"])
                dcfg = tb.decode_config(d, cuda=True)
                ptr = {n: f"*{dt}" for n in ("Q", "KBuf", "VBuf")}
                ptr.update({"ReqToToken": "*i64", "ReqPoolIdx": "*i64", "SeqLens": "*i64", "MidO": "*fp32",
                            "MidLse": "*fp32", "sm_scale_log2": "fp32"})
                for sw in (False, True):
                    compile_one(f"decode-1 {dt} D={d} G={group} sliding={sw} {dcfg}", da._decode_stage1_kernel, ptr,
                                dict(GROUP=group, HEAD_DIM=d, BLOCK_D=bd, BLOCK_H=max(16, common.next_pow2(group)),
                                     BLOCK_N=dcfg["block_n"], IEEE=dt == "fp32", SLIDING=sw),
                                dcfg["num_warps"], dcfg["num_stages"])
            for sw in (False, True):
                compile_one(f"decode-2 {dt} D={d} sliding={sw}", da._decode_stage2_kernel,
                            {"MidO": "*fp32", "MidLse": "*fp32", "O": f"*{dt}", "SeqLens": "*i64"},
                            dict(HEAD_DIM=d, BLOCK_D=bd, SLIDING=sw), 4 if bd <= 128 else 8, 2)
            row = 8 * d
            bc = min(common.next_pow2(row), 1024)
            compile_one(f"kv-store {dt} row={row}", ks._store_kv_kernel,
                        {"K": f"*{dt}", "V": f"*{dt}", "Loc": "*i64", "KBuf": f"*{dt}", "VBuf": f"*{dt}"},
                        dict(ROW=row, BLOCK_T=max(1, 4096 // bc), BLOCK_C=bc), 4, 2)
    # layers' fused kernels: pointers and row strides aligned as in a model (hidden sizes, head dims)
    norm_aligned = ["X", "Res", "W", "Out", "ResOut", "stride_x0", "stride_x1", "stride_r", "stride_o", "stride_ro"]
    rope_aligned = ["Positions", "Q", "K", "QOut", "KOut", "Cos", "Sin", "stride_qt", "stride_qh", "stride_kt",
                    "stride_kh", "stride_qot", "stride_qoh", "stride_kot", "stride_koh", "stride_cos", "stride_sin"]
    for dt in ("bf16", "fp32") if "layers" in groups else ():
        for n in [int(x) for x in args.hidden_sizes.split(",")] + head_dims:
            cfg = lk.norm_config(n, interpreted=False)
            for res in (False, True):
                compile_one(f"rmsnorm{'+add' if res else ''} {dt} N={n} {cfg}", lk._rmsnorm_kernel,
                            {"X": f"*{dt}", "Res": f"*{dt}", "W": f"*{dt}", "Out": f"*{dt}", "ResOut": f"*{dt}",
                             "eps": "fp32"},
                            dict(N=n, HAS_RES=res, BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"]), cfg["num_warps"], 1,
                            aligned=norm_aligned)
        for d in [int(x) for x in args.act_sizes.split(",")]:
            cfg = lk.act_config(d, interpreted=False)
            compile_one(f"silu_and_mul {dt} D={d} {cfg}", lk._silu_and_mul_kernel, {"X": f"*{dt}", "Out": f"*{dt}"},
                        dict(D=d, BLOCK=cfg["BLOCK"], ROWS=cfg["ROWS"]), cfg["num_warps"], 1,
                        aligned=["X", "Out", "stride_x", "stride_o"])
        for d in head_dims:
            for hq, hk in ((32, 8), (28, 4), (8, 8)):
                cfg = lk.rope_config(hq, hk, d, interpreted=False)
                compile_one(f"rotary {dt} D={d} Hq={hq} Hk={hk} {cfg}", lk._rope_kernel,
                            {"Positions": "*i64", "Q": f"*{dt}", "K": f"*{dt}", "QOut": f"*{dt}", "KOut": f"*{dt}",
                             "Cos": "*fp32", "Sin": "*fp32"},
                            dict(HQ=hq, HK=hk, HALF=d // 2, BLOCK_H=cfg["BLOCK_H"], BLOCK_HALF=cfg["BLOCK_HALF"],
                                 Q_BLOCKS=cfg["Q_BLOCKS"]), cfg["num_warps"], 1, aligned=rope_aligned)
    print("compile check:", "FAILED" if failed else "all kernels compiled", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
