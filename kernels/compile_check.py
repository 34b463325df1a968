"""Compile the Triton kernels for a real GPU target on a machine without one (``triton.compile`` + bundled ptxas).

    python -m kernels.compile_check [--all] [--arch 90] [--out FILE.json]

Catches what the interpreter cannot: GPU-only type/shape rules (int8 ``tl.dot`` tiles, scalar branches,
atomics), register pressure (``--all`` reports registers / spills / shared memory per autotune config from the
cubin) and which MMA instructions the int8 dots lower to (``IMMA``/``IGMMA`` in SASS vs none). The default set is a
few representative variants (used by the tests); ``--all`` compiles every autotune config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from typing import Iterator

COMMON_SIG = {
    "w_ptr": "*i32", "wscale_ptr": "*fp32", "si_ptr": "*fp32", "so_ptr": "*fp32", "bias_ptr": "*fp32",
    "work_ptr": "*i32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "stride_xm": "i32",
    "stride_om": "i32", "so_stride": "i32", "M_BUCKET": "i32",
}


def _variants(all_configs: bool) -> Iterator[tuple[str, str, dict, dict, dict]]:
    """(name, family, pointer dtypes, constexprs, options). ``all_configs``: every autotune config at 2 and 8 bits
    (int2 has the most fields per word: the register-pressure worst case) in the modes each kernel really runs."""
    from . import gemm, gemv

    bf16_int = (True, False, "*bf16", "*bf16", False, True)  # (INT_MATH, X_INT8, x, out, INT8_OUT, HAS_SO)
    packed_int = (True, False, "*i32", "*bf16", False, True)  # GEMV on pre-packed x (pack_x_kernel)
    int8_int = (True, True, "*i8", "*i8", True, True)
    weight_only = (False, False, "*bf16", "*fp32", False, False)
    bits_list = (2, 8) if all_configs else (2,)
    plans = [  # (family, configs, modes, extra constexprs sets)
        ("gemv", gemv._configs() if all_configs else gemv._configs()[3:4], [packed_int, bf16_int, weight_only],
         [{"BLOCK_M": bm, "DP4A": True} for bm in ((1, 4) if all_configs else (1,))]),
        ("gemm", gemm._configs(True) if all_configs else gemm._configs(True)[2:3], [bf16_int, weight_only],
         [{"X_F32": False}]),
        ("gemm", gemm._configs(False) if all_configs else gemm._configs(False)[:1], [int8_int, weight_only],
         [{"X_F32": False}]),
    ]
    for family, cfgs, modes, extras in plans:
        for bits in bits_list:
            for im, x8, xt, ot, i8o, so in modes:
                for extra in extras:
                    for c in cfgs:
                        if not im and c.kwargs["SPLIT_K"] > 1:
                            continue
                        const = dict(BITS=bits, INT_MATH=im, X_INT8=x8, HAS_BIAS=True, HAS_SO=so, INT8_OUT=i8o,
                                     WG=8, **extra, **c.kwargs)
                        if family == "gemv":
                            const["X_PACKED"] = xt == "*i32"
                        name = (f"{family} b{bits} {'int' if im else 'wo'}{' x8' if x8 else ''}"
                                f"{' packed' if xt == '*i32' else ''} "
                                f"{extra} {c.kwargs} w{c.num_warps} s{c.num_stages}")
                        yield name, family, {"x_ptr": xt, "out_ptr": ot}, const, {
                            "num_warps": c.num_warps, "num_stages": c.num_stages}
    yield "gemm quant_kernel", "quant", {}, {"BLOCK_K": 1024}, {"num_warps": 4}
    for bits in (2, 4, 8) if all_configs else (2,):
        yield f"gemv pack_x_kernel b{bits}", "pack", {}, {"BITS": bits, "X_INT8": False, "BLOCK_KW": 256, "WG": 8}, {
            "num_warps": 4}
    for bits in (2, 4, 8) if all_configs else (2,):
        yield f"embedding b{bits}", "embedding", {}, dict(BITS=bits, BLOCK_K=1024, WG=8), {"num_warps": 4}


def _sass_stats(cubin: bytes) -> dict:
    from triton.backends.nvidia import compiler as nv

    out: dict = {}
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, timeout=60).stdout
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
        except Exception:  # noqa: BLE001
            return out
    for op in ("IGMMA", "HGMMA", "IMMA", "HMMA", "IDP", "IMAD", "LOP3", "FFMA", "LDL", "STL"):
        out[op] = len(re.findall(rf"\b{op}\b", sass))
    out["atomics"] = len(re.findall(r"\b(?:RED|REDG|ATOM|ATOMG)\b", sass))
    m = re.search(r"REG:(\d+)", res)
    if m:
        out["regs"] = int(m.group(1))
    m = re.search(r"STACK:(\d+)", res)
    if m:
        out["stack"] = int(m.group(1))
    m = re.search(r"SHARED:(\d+)", res)
    if m:
        out["shared"] = int(m.group(1))
    return out


def compile_one(family: str, ptrs: dict, const: dict, options: dict, arch: int = 90, sass: bool = False) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import importlib

    from . import _common as C, gemm, gemv

    if family == "pack":
        fn = C.jit_kernel(gemv.pack_x_kernel, False)
        sig = {"x_ptr": "*bf16", "out_ptr": "*i32", "si_ptr": "*fp32", "K": "i32", "KW": "i32", "stride_xm": "i32"}
    elif family == "quant":
        fn = C.jit_kernel(gemm.quant_kernel, False)
        sig = {"x_ptr": "*bf16", "out_ptr": "*i8", "si_ptr": "*fp32", "K": "i32", "stride_xm": "i32"}
    elif family == "embedding":
        fn = C.jit_kernel(importlib.import_module(__package__ + ".embedding").embedding_kernel, False)
        sig = {"ids_ptr": "*i64", "w_ptr": "*i32", "scale_ptr": "*fp32", "out_ptr": "*bf16", "K": "i32", "KW": "i32"}
    else:
        fn = C.jit_kernel(gemv.gemv_kernel if family == "gemv" else gemm.gemm_kernel, False)
        sig = dict(COMMON_SIG, **ptrs)
    sig.update({k: "constexpr" for k in const})
    sig = {name: sig[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options, enable_fp_fusion=False))
    info = {"ok": True, "compile_s": round(time.time() - t0, 2), "shared_bytes": ck.metadata.shared}
    if sass:
        info.update(_sass_stats(ck.asm["cubin"]))
    return info


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every autotune config (slow: minutes)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    saved = os.environ.pop("TRITON_INTERPRET", None)  # triton.jit must build compilable JITFunctions
    rows = []
    try:
        for name, family, ptrs, const, opts in _variants(args.all):
            try:
                info = compile_one(family, ptrs, const, opts, args.arch, sass=True)
            except Exception as e:  # noqa: BLE001
                info = {"ok": False, "error": repr(e)[:500]}
            info["name"] = name
            rows.append(info)
            print(json.dumps(info), flush=True)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r["name"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} compiled for sm_{args.arch}" + (f"; FAILED: {bad}" if bad else ""))
    return rows


if __name__ == "__main__":
    main()
