"""Config sweep of the GEMM / GEMV kernels on a GPU: which fixed meta-parameters win per (shape, bits, M).

    python -m kernels.tune --cases e2b.gate_up:4:16,e4b.down:2:256 --out tune.json
    python -m kernels.tune --cases ... --warm --part 3/8     # compile 1/8 of the configs only (no timings)

The autotune lists in ``gemm._configs`` / ``gemv._configs`` are small (compile time); this times a wider grid so
that they can be chosen from data. Every config is checked bitwise against the torch reference on the same
device (``max_abs_diff``); a config that fails to compile or run is recorded with its error. ``run_gpu_checks.sh``
runs the ``--warm`` parts in parallel first (compiling dominates), then one timed pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from typing import Optional

import torch

from . import ops, reference
from .bench import SHAPES, _timer
from .layout import from_int


def gemm_grid(m: int) -> list[dict]:
    """Tensor-core GEMM configs: small-M (fused quantization, split-K allowed) or large-M (pre-quantized x)."""
    out = []
    if m <= 64:
        for bm, bn, bkw, sk, w, s in itertools.product((16, 32, 64), (32, 64, 128), (32, 64), (1, 4), (4,), (3,)):
            if bm <= max(16, m):
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, GROUP_M=8, num_warps=w,
                                num_stages=s))
    else:
        for bm, bn, bkw, w, s in itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3,)):
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=s))
    return out


def gemv_grid(m: int) -> list[dict]:
    """SWAR dp4a GEMV configs (rows in blocks of <= 4; more rows re-read the weights once per block)."""
    if m > 64:
        return []
    return [dict(BLOCK_N=bn, BLOCK_KW=bkw, SPLIT_K=sk, num_warps=w)
            for bn, bkw, sk, w in itertools.product((16, 32, 64, 128), (16, 32, 64), (1, 4, 8), (4,))]


def parse_cases(spec: str) -> list[tuple[str, int, int, int, int]]:
    shapes = {label: (k, n) for label, k, n, _ in SHAPES}
    cases = []
    for item in filter(None, spec.split(",")):
        label, bits, m = item.split(":")
        k, n = shapes[label]
        cases.append((label, k, n, int(bits), int(m)))
    return cases


def run(cases, out: str, warm: bool, part: Optional[tuple[int, int]], device: str = "cuda", bench=None) -> dict:
    """Time (or with ``warm`` only compile) every config of each ``(label, K, N, bits, M)`` case."""
    bench = bench or (None if warm else _timer())
    dev = torch.device(device)
    rows, t0 = [], time.time()
    for label, k, n, bits, m in cases:
        g = torch.Generator(device=dev).manual_seed(m * 7 + bits)
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, device=dev,
                              generator=g)
        w = from_int(codes, bits)
        w.codes = codes
        ws = torch.rand(n, device=dev, generator=g) * 0.01 + 1e-3
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        si, so = torch.tensor([0.05], device=dev), torch.tensor([0.02], device=dev)
        ref = None if warm else reference.linear(x, w, ws, si, so, check_values=False)
        grid = [("gemm", c) for c in gemm_grid(m)] + [("gemv", c) for c in gemv_grid(m)]
        if part is not None:
            grid = grid[part[0]::part[1]]
        for kernel, cfg in grid:
            row = {"shape": label, "K": k, "N": n, "bits": bits, "M": m, "kernel": kernel, "config": cfg}
            try:
                call = lambda: ops.linear(x, w, ws, si, so, kernel=kernel, config=cfg)  # noqa: E731
                got = call()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if not warm:
                    row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
                    row["us"] = round(bench(call)[0] * 1e3, 2)
            except Exception as e:  # noqa: BLE001 - record and go on
                row["error"] = repr(e)[:200]
            rows.append(row)
        if not warm:
            ok = [r for r in rows if r["shape"] == label and r["bits"] == bits and r["M"] == m and "us" in r]
            for kern in ("gemm", "gemv"):
                best = min((r for r in ok if r["kernel"] == kern), key=lambda r: r["us"], default=None)
                if best:
                    print(f"{label:<15} M={m:<3} {bits}-bit best {kern}: {best['us']:>7} us  {best['config']}",
                          flush=True)
    rep = {"meta": {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else device, "warm": warm, "part": part,
                    "elapsed_s": round(time.time() - t0, 1)}, "results": rows}
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)
    return rep


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", required=True, help="comma-separated label:bits:M (labels of kernels.bench.SHAPES)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "tune.json"))
    ap.add_argument("--warm", action="store_true", help="compile only (no timings, no parity)")
    ap.add_argument("--part", default="", help="i/J: only every J-th config starting at i (for parallel warm-up)")
    args = ap.parse_args(argv)
    part = tuple(int(v) for v in args.part.split("/")) if args.part else None
    return run(parse_cases(args.cases), args.out, args.warm, part)


if __name__ == "__main__":
    main()
