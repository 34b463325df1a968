"""Benchmark of the wNa8o8 kernels against cuBLAS bf16 (and gemlite when importable), same run, same GPU.

    python -m kernels.bench --out bench.json            # CUDA: E2B/E4B shapes, M in {1,4,16,64,256}, bits 2/4/8
    TRITON_INTERPRET=1 python -m kernels.bench --smoke --out smoke.json   # CPU: one tiny shape, parity only

Per case: our op (bf16 x in, static int8 in/out scales, bf16 out; the tied lm_head twice: weight-only, and with a
static int8 input scale and float logits, ``lm_head_a8``, as Google's checkpoints serve it) timed with CUDA graphs
(``triton.testing.do_bench_cudagraph``, fallback ``do_bench``), ``torch.matmul(x, W_bf16.T)``, gemlite A16W{bits}
(channel-wise, bf16 activations) when importable; ratios = baseline time / our time; effective weight bandwidth =
packed weight bytes / our time; bitwise parity against the torch reference on the same device. Copy bandwidth
first (read+write). Cases run in priority order (M=1 first) until ``--budget-s`` is spent; the rest are listed as
skipped. ``--warm`` only compiles and autotunes our kernels for the given cases (no timings, no baselines): the
GPU check runs a few of those in parallel so that the timed run finds every binary in Triton's disk cache.
Targets (docs/anchors): M=1 W4A8 >= 3.2x, W2A8 >= 5x; M=16 >= 1.5x; M=256 >= 1.2x; 2-bit lm_head
262144x2560 at M=1 >= 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Optional

import torch

from . import ops, reference
from .layout import from_int

# (label, K in, N out, bits to run). vLLM fuses q/k/v and gate/up.
SHAPES: list[tuple[str, int, int, tuple[int, ...]]] = [
    ("e2b.qkv", 1536, 2560, (4, 8)),
    ("e2b.o", 2048, 1536, (4, 8)),
    ("e2b.gate_up", 1536, 12288, (2, 4, 8)),
    ("e2b.down", 6144, 1536, (2, 4, 8)),
    ("e2b.gate_up_2x", 1536, 24576, (2, 4)),
    ("e2b.down_2x", 12288, 1536, (2, 4)),
    ("e4b.qkv", 2560, 3072, (4, 8)),
    ("e4b.o", 2048, 2560, (4, 8)),
    ("e4b.gate_up", 2560, 20480, (2, 4, 8)),
    ("e4b.down", 10240, 2560, (2, 4, 8)),
    ("e2b.lm_head", 1536, 262144, (2,)),
    ("e4b.lm_head", 2560, 262144, (2,)),
]
MS = (1, 16, 256, 4, 64)  # priority order
TARGETS = {("linear", 1, 4): 3.2, ("linear", 1, 2): 5.0, ("linear", 16, None): 1.5, ("linear", 256, None): 1.2,
           ("lm_head", 1, 2): 5.0, ("lm_head_a8", 1, 2): 5.0}


def target_for(kind: str, m: int, bits: int) -> Optional[float]:
    return TARGETS.get((kind, m, bits)) or (TARGETS.get((kind, m, None)) if kind == "linear" else None)


def _timer() -> Callable[[Callable[[], object]], tuple[float, str]]:
    import triton.testing as tt

    def bench(fn: Callable[[], object]) -> tuple[float, str]:
        fn()
        torch.cuda.synchronize()
        try:
            return float(tt.do_bench_cudagraph(fn, rep=30)), "cudagraph"
        except Exception:  # noqa: BLE001 - capture can fail (e.g. a library syncing): plain events instead
            return float(tt.do_bench(fn, warmup=10, rep=30)), "events"

    return bench


def copy_bandwidth(bench) -> float:
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms, _ = bench(lambda: b.copy_(a))
    del a, b
    return 2 * n / ms / 1e6  # GB/s, read + write


def _gemlite(bits: int, w_codes: torch.Tensor, ws: torch.Tensor, act: str = "A16"):
    """gemlite's channel-wise layer on the same codes: act "A16" (bf16 activations, weight-only) or "A8"
    (`A8W{bits}_HQQ_INT_dynamic`: int8 activations with a dynamic per-row scale, gemlite's closest peer of ours)."""
    try:
        import gemlite.helper as gh
    except Exception as e:  # noqa: BLE001
        return None, f"gemlite unavailable: {e!r}"[:200]

    name = f"A16W{bits}_HQQ_INT" if act == "A16" else f"A8W{bits}_HQQ_INT_dynamic"
    cls = getattr(gh, name, None)
    if cls is None:
        return None, f"no gemlite {name}"
    try:
        n = w_codes.shape[0]
        wq = (w_codes.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
        s = ws.to(torch.bfloat16).reshape(n, 1)
        z = torch.full((n, 1), 2 ** (bits - 1), device=w_codes.device, dtype=torch.bfloat16)
        return cls(device="cuda", dtype=torch.bfloat16).from_weights(wq, s, z), None
    except Exception as e:  # noqa: BLE001
        return None, repr(e)[:200]


def _gemlite_acts(bits: int, m: int, kind: str, gl_cache: dict, gemlite_max_m: int) -> list[tuple[str, str]]:
    """gemlite peers timed for a case: A16 for linears and the weight-only lm_head, A8 for linears and lm_head_a8."""
    if bits not in (2, 4) or not gl_cache.get("enabled", True) or m > gemlite_max_m:
        return []
    return [(act, tag) for act, tag in (("A16", "gemlite"), ("A8", "gemlite_a8"))
            if not kind.startswith("lm_head") or act == ("A8" if kind == "lm_head_a8" else "A16")]


def _warm_gemlite(bits, codes, ws, x, m, kind, gl_cache, gemlite_max_m) -> None:
    """--warm: build and call each gemlite peer once (its autotuner compiles into Triton's disk cache)."""
    for act, _ in _gemlite_acts(bits, m, kind, gl_cache, gemlite_max_m):
        lin, err = _gemlite(bits, codes, ws, act)
        if lin is None:
            if err and "unavailable" in err:
                gl_cache["enabled"] = False
            continue
        try:
            lin(x)
        except Exception:  # noqa: BLE001 - the timed run records the error
            pass
        del lin


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def run_case(label: str, k: int, n: int, bits: int, m: int, bench, kind: str, gl_cache: dict,
             gemlite_max_m: int = 4096, warm: bool = False, device: str = "cuda") -> dict:
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(m * 7 + bits)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, device=dev, generator=g)
    w = from_int(codes, bits)
    w.codes = codes  # the reference reads these; the kernels read w.packed (so parity also checks the packing)
    ws = torch.rand(n, device=dev, generator=g) * 0.01 + 1e-3
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
    row: dict = {"kind": kind, "shape": label, "K": k, "N": n, "M": m, "bits": bits}
    if kind in ("lm_head", "lm_head_a8"):  # float logits; _a8: x quantized with a static input scale first
        si = torch.tensor([0.05], device=dev) if kind == "lm_head_a8" else None
        call = lambda: ops.linear(x, w, ws, si, None)  # noqa: E731
        got = call()
        if warm:
            _warm_gemlite(bits, codes, ws, x, m, kind, gl_cache, gemlite_max_m)
            _sync(dev)
            return row
        ref = reference.linear(x, w, ws, si, None, check_values=False)
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
        row["max_rel_diff"] = row["max_abs_diff"] / max(float(ref.float().abs().max()), 1e-30)
    else:
        si = torch.tensor([0.05], device=dev)
        so = torch.tensor([0.02], device=dev)
        call = lambda: ops.linear(x, w, ws, si, so)  # noqa: E731
        got = call()
        if warm:  # also compile the alternatives timed below
            if m <= 16:
                ops.linear(x, w, ws, si, so, kernel="gemm" if m <= ops.gemv_max_m(n) else "gemv")
            if m <= 4:
                from .gemv import prepack_default

                ops.linear(x, w, ws, si, so, kernel="gemv", config={"PREPACK": not prepack_default()})
            _warm_gemlite(bits, codes, ws, x, m, kind, gl_cache, gemlite_max_m)
            _sync(dev)
            return row
        ref = reference.linear(x, w, ws, si, so, check_values=False)
        row["max_abs_diff"] = float((got.float() - ref.float()).abs().max())
    t_ours, how = bench(call)
    wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    t_bf16, _ = bench(lambda: torch.matmul(x, wb.t()))
    del wb
    wbytes = w.nbytes()
    row.update(
        ours_us=round(t_ours * 1e3, 2), bf16_us=round(t_bf16 * 1e3, 2), speedup_vs_bf16=round(t_bf16 / t_ours, 3),
        weight_GBps=round(wbytes / t_ours / 1e6, 1), bf16_weight_GBps=round(n * k * 2 / t_bf16 / 1e6, 1),
        timing=how, kernel="gemv" if m <= ops.gemv_max_m(n) else "gemm",
    )
    if m <= 16 and kind == "linear":  # the other small-M kernel, to tune GEMMA_MOBILE_GEMV_MAX_M
        other = "gemm" if row["kernel"] == "gemv" else "gemv"
        try:
            t_o, _ = bench(lambda: ops.linear(x, w, ws, si, so, kernel=other))
            row[f"{other}_us"] = round(t_o * 1e3, 2)
        except Exception as e:  # noqa: BLE001
            row[f"{other}_err"] = repr(e)[:200]
    if m <= 4 and kind == "linear":  # GEMV with x quantized+packed inside every program (one launch)
        from .gemv import prepack_default

        try:
            t_f, _ = bench(lambda: ops.linear(x, w, ws, si, so, kernel="gemv",
                                              config={"PREPACK": not prepack_default()}))
            row["gemv_prepack_" + ("off" if prepack_default() else "on") + "_us"] = round(t_f * 1e3, 2)
        except Exception as e:  # noqa: BLE001
            row["gemv_prepack_toggle_err"] = repr(e)[:200]
    for act, tag in _gemlite_acts(bits, m, kind, gl_cache, gemlite_max_m):
        lin, err = _gemlite(bits, codes, ws, act)
        if lin is None:
            row[f"{tag}_err"] = err
            if err and "unavailable" in err:
                gl_cache["enabled"] = False
        else:
            try:
                t_gl, _ = bench(lambda: lin(x))
                row[f"{tag}_us"] = round(t_gl * 1e3, 2)
                row[f"speedup_vs_{tag}"] = round(t_gl / t_ours, 3)
            except Exception as e:  # noqa: BLE001
                row[f"{tag}_err"] = repr(e)[:200]
            del lin
    tgt = target_for(kind, m, bits)
    if tgt is not None:
        row["target_vs_bf16"] = tgt
        row["meets_target"] = row["speedup_vs_bf16"] >= tgt
    return row


def smoke(out: str) -> dict:
    """CPU: one tiny shape per kernel family through the Triton interpreter, parity vs the torch reference."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read at launch time by kernels._common
    try:
        return _smoke(out)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _smoke(out: str) -> dict:
    g = torch.Generator().manual_seed(0)
    results = []
    for bits, m, n, k, kernel in [(2, 1, 24, 136, "gemv"), (4, 20, 24, 72, "gemm"), (8, 2, 16, 40, "gemm")]:
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=torch.int8, generator=g)
        w = from_int(codes, bits)
        ws = torch.rand(n, generator=g) * 0.01 + 1e-3
        x = torch.randn(m, k, generator=g).bfloat16()
        t0 = time.perf_counter()
        y = ops.linear(x, w, ws, 0.05, 0.02, backend="triton", kernel=kernel)
        dt = time.perf_counter() - t0
        yr = reference.linear(x, w, ws, 0.05, 0.02)
        results.append({"kind": "linear", "kernel": kernel, "bits": bits, "M": m, "N": n, "K": k,
                        "max_abs_diff": float((y.float() - yr.float()).abs().max()), "interpreter_s": round(dt, 3)})
    ids = torch.tensor([0, 5, 5, 23])
    w = from_int(torch.randint(-2, 2, (24, 40), dtype=torch.int8, generator=g), 2)
    ws = torch.rand(24, generator=g) + 0.1
    e = ops.embedding(ids, w, ws, backend="triton")
    results.append({"kind": "embedding", "bits": 2, "max_abs_diff":
                    float((e.float() - reference.embedding(ids, w, ws).float()).abs().max())})
    rep = {"meta": {"mode": "smoke", "device": "cpu (TRITON_INTERPRET=1)", "torch": torch.__version__},
           "results": results}
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)
    print(json.dumps(rep, indent=1))
    return rep


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels_bench.json"))
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter parity smoke run (no timings)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this long")
    ap.add_argument("--shapes", default="", help="comma-separated labels to run (default: all)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--bits", default="", help="comma-separated bit widths to run (default: each shape's)")
    ap.add_argument("--kinds", default="", help="comma-separated kinds: linear,lm_head,lm_head_a8 (default: all)")
    ap.add_argument("--gemlite-max-m", type=int, default=4096,
                    help="time gemlite only up to this M (its autotuning costs ~10 s per new shape)")
    ap.add_argument("--warm", action="store_true", help="compile + autotune our kernels only (no timings)")
    args = ap.parse_args(argv)
    if args.smoke:
        return smoke(args.out)
    if not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
        raise SystemExit(2)
    import triton

    bench = _timer()
    t_start = time.time()
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
            "gemv_max_m_small_n": ops.gemv_max_m(0), "gemv_max_m_large_n": ops.gemv_max_m(1 << 30),
            "gemlite_max_m": args.gemlite_max_m, "warm": args.warm}
    if not args.warm:
        meta["copy_GBps"] = round(copy_bandwidth(bench), 1)
    print(json.dumps(meta), flush=True)
    wanted = {s for s in args.shapes.split(",") if s}
    ms = [int(v) for v in args.ms.split(",") if v]
    want_bits = {int(b) for b in args.bits.split(",") if b}
    want_kinds = {s for s in args.kinds.split(",") if s}
    cases = []
    for m in ms:
        for label, k, n, bits_list in SHAPES:
            if wanted and label not in wanted:
                continue
            for bits in bits_list:
                if want_bits and bits not in want_bits:
                    continue
                for kind in (("lm_head", "lm_head_a8") if "lm_head" in label else ("linear",)):
                    if not want_kinds or kind in want_kinds:
                        cases.append((label, k, n, bits, m, kind))
    rows, skipped, gl_cache = [], [], {}

    def dump() -> dict:
        rep = {"meta": meta, "results": rows, "skipped": skipped, "elapsed_s": round(time.time() - t_start, 1)}
        with open(args.out, "w") as f:
            json.dump(rep, f, indent=1)
        return rep

    for label, k, n, bits, m, kind in cases:
        if time.time() - t_start > args.budget_s:
            skipped.append({"shape": label, "M": m, "bits": bits})
            continue
        try:
            row = run_case(label, k, n, bits, m, bench, kind, gl_cache, args.gemlite_max_m, args.warm)
        except Exception as e:  # noqa: BLE001 - record and go on
            row = {"kind": kind, "shape": label, "K": k, "N": n, "M": m, "bits": bits, "error": repr(e)[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
        dump()
    rep = dump()
    if args.warm:
        print(f"warmed {len(rows)} cases in {rep['elapsed_s']} s ({len(skipped)} skipped)")
        return rep
    print("\nshape            M bits  ours_us  bf16_us  x_bf16  GB/s   target")
    for r in rows:
        if "error" in r:
            print(f"{r['shape'] + ('/a8' if r['kind'] == 'lm_head_a8' else ''):<15} {r['M']:>3} {r['bits']:>3}  ERROR {r['error'][:80]}")
            continue
        tgt = f"{r['target_vs_bf16']}x {'ok' if r['meets_target'] else 'MISS'}" if "target_vs_bf16" in r else ""
        print(f"{r['shape'] + ('/a8' if r['kind'] == 'lm_head_a8' else ''):<15} {r['M']:>3} {r['bits']:>3}  {r['ours_us']:>7} {r['bf16_us']:>8} "
              f"{r['speedup_vs_bf16']:>6}x {r['weight_GBps']:>6}  {tgt}")
    print(f"wrote {args.out} ({len(rows)} cases, {len(skipped)} skipped, {rep['elapsed_s']} s)")
    return rep


if __name__ == "__main__":
    main()
