"""Per-token CPU time of a checkpoint's quantized matmuls: the packed AVX2 kernels vs bf16 ``F.linear`` on the
same shapes, in one process (ratios measured side by side). vLLM-free: shapes and bits come from the
compressed-tensors checkpoint's safetensors (``*.weight_packed`` + ``*.weight_shape``).

    python -m kernels.cpu_bench CHECKPOINT_DIR [--m 1 16] [--reps 20] [--json OUT]

Per module kind (q/k/v and gate/up fused as vLLM fuses them, o, down, per-layer-embedding gate / projection,
the lm_head over the tied table): count per token, bits, ms per call and ms per token for
``cpu_packed.linear`` with the scales prepared as at load (input quant + int GEMM + f32 epilogue + requant in
one op: exactly the plugin's call, without ``ops.linear``'s per-call argument handling, ~30 us) and
for ``torch.nn.functional.linear`` on bf16 weights, and -- where vLLM is installed -- for the linear a bf16 vLLM
engine really runs on this CPU (``vllm_bf16``: vLLM's own ``dispatch_cpu_unquantized_gemm`` on the same weight,
i.e. oneDNN's prepacked ``onednn_mm`` on x86 without AMX, SGL's kernel for small weights with AMX). That column is
the baseline of the engine benchmarks: ``F.linear`` re-reads an unpacked weight every call and is up to 1.9x
slower than it at M = 16 (measured on a Zen 5 VM, 2026-12-02), so ratios against ``F.linear`` overstate the gain.
The weight-only lm_head (no lm_head SRQ scales) is timed with the float path. Attention, norms, sampling and vLLM's own overhead are NOT included: compare the total with
the engine's measured decode time to see what they cost.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from . import cpu_packed
from .layout import PackedWeight, from_int, padded_k, pack_factor

_FUSE = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def checkpoint_linears(ckpt: Path) -> tuple[dict[tuple, int], dict]:
    """{(kind, n, k, bits): count per token} with q/k/v and gate/up fused per layer; plus the table's shape."""
    config = json.loads((ckpt / "config.json").read_text())
    where = {name: f for f in sorted(ckpt.glob("*.safetensors")) for name in safe_open(str(f), "pt").keys()}
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, f in where.items():
        if name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            n, words = safe_open(str(f), "pt").get_slice(name).get_shape()
            k = int(safe_open(str(where[base + ".weight_shape"]), "pt").get_tensor(base + ".weight_shape")[1])
            bits = next(b for b in (2, 4, 8) if words == -(-k * b // 32))  # words == ceil(k * b / 32)
            shapes[base] = (n, k, bits)
    fused: dict[tuple, list[int]] = defaultdict(list)
    table = None
    for base, (n, k, bits) in shapes.items():
        leaf = base.rsplit(".", 1)[-1]
        if leaf == "embed_tokens":
            table = {"n": n, "k": k, "bits": bits}
            continue
        if leaf == "embed_tokens_per_layer":
            continue  # gather-only table: no matmul
        layer = re.search(r"layers\.(\d+)\.", base)
        key = (_FUSE.get(leaf, leaf), None if layer is None else int(layer.group(1)), k, bits)
        fused[key].append(n)
    counts: dict[tuple, int] = defaultdict(int)
    for (kind, _, k, bits), ns in fused.items():
        counts[(kind, sum(ns), k, bits)] += 1
    head = (config.get("quantization_config") or {}).get("gemma_mobile", {}).get("lm_head")
    return dict(counts), {"table": table, "lm_head_srq": head is not None}


def _time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def _weight(n: int, k: int, bits: int) -> PackedWeight:
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    return from_int(torch.randint(lo, hi, (n, k), dtype=torch.int8), bits)


def vllm_bf16_linear(wb: torch.Tensor):
    """The bf16 linear a vLLM CPU engine builds for weight ``wb [N, K]`` (its own dispatch), or None without vLLM.
    Optional import: kernels/ stays usable without vLLM."""
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    except Exception:  # vLLM absent (the GPU image) or not a CPU build
        return None
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(wb, requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, layer.weight, None)


def _items(ckpt: Path) -> list[tuple[str, int, int, int, int, bool]]:
    """(kind, n, k, bits, count per token, int8 activations) of every matmul of a decode step, the lm_head last."""
    counts, extra = checkpoint_linears(ckpt)
    items = [(kind, n, k, bits, c, True) for (kind, n, k, bits), c in sorted(counts.items())]
    t = extra["table"]
    if t is not None:
        items.append(("lm_head (tied table)", t["n"], t["k"], t["bits"], 1, extra["lm_head_srq"]))
    return items


def _operands(n: int, k: int, bits: int, int8_act: bool) -> tuple:
    """A random packed weight and its scales prepared as the plugin does at load: (w, col_scale, s_x, s_y)."""
    w = _weight(n, k, bits)
    ws = torch.rand(n) * 0.01 + 1e-3
    sx = torch.tensor([0.05]) if int8_act else None
    so = torch.tensor([0.1]) if int8_act else None
    return w, (sx * ws).contiguous() if int8_act else ws, sx, so


def profile(ckpt: Path, ms: list[int], reps: int) -> dict:
    rows = []
    for kind, n, k, bits, count, int8_act in _items(ckpt):
        w, cs, sx, so = _operands(n, k, bits, int8_act)
        wb = torch.randn(n, k, dtype=torch.bfloat16)
        vl = vllm_bf16_linear(wb)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            # the plugin's call (kernels.plugin.linear_apply, packed backend): one fused op, scales prepared at load
            packed = _time(lambda: cpu_packed.linear(x, w, cs, sx, None, so, x.dtype), reps)
            bf16 = _time(lambda: torch.nn.functional.linear(x, wb), reps)
            vb = None if vl is None else round(_time(lambda: vl(x), reps), 4)
            rows.append({"module": kind, "n": n, "k": k, "bits": bits, "int8_activations": int8_act,
                         "per_token": count, "m": m, "packed_ms": round(packed, 4), "bf16_ms": round(bf16, 4),
                         "vllm_bf16_ms": vb,
                         "packed_bytes": n * padded_k(k, bits) // pack_factor(bits) * 4, "bf16_bytes": n * k * 2})
        del wb, vl
    totals = {m: {key: round(sum(r[key] * r["per_token"] for r in rows if r["m"] == m), 3)
                  for key in ("packed_ms", "bf16_ms", "vllm_bf16_ms") if all(r[key] is not None for r in rows)}
              for m in ms}
    return {"checkpoint": str(ckpt), "threads": torch.get_num_threads(), "rows": rows, "totals_per_step": totals}


def step(ckpt: Path, ms: list[int], reps: int) -> dict:
    """Cold-cache mode (``--step``): every matmul of a decode step in the engine's order (per layer: qkv, o, gate_up,
    down, ...; then the lm_head), each layer with its OWN weights, so that -- as in the engine -- the weights stream
    from memory instead of staying in cache the way one shape timed in a loop does (``profile``). Per module kind:
    ms per step, summed over its calls (best of ``reps`` steps); packed vs vLLM's bf16 linear (None without vLLM).
    Holds one bf16 copy of every matrix: meant for the 270M, not for E2B (~10 GB)."""
    items = _items(ckpt)
    mats = {(kind, n, k, bits): [(*_operands(n, k, bits, int8_act),
                                  vllm_bf16_linear(torch.randn(n, k, dtype=torch.bfloat16))) for _ in range(count)]
            for kind, n, k, bits, count, int8_act in items}
    depth = max(c for *_, c, _ in items)
    order = [(key, i) for i in range(depth) for key in mats if i < len(mats[key])]  # layer by layer, like the model
    out: dict = {"checkpoint": str(ckpt), "threads": torch.get_num_threads(), "mode": "step (cold cache)", "m": {}}
    for m in ms:
        xs = {key: torch.randn(m, key[2], dtype=torch.bfloat16) for key in mats}
        res = {}
        for path in ("packed", "vllm_bf16"):
            if path == "vllm_bf16" and any(e[4] is None for v in mats.values() for e in v):
                continue
            best: dict | None = None
            for _ in range(reps + 1):  # the first pass warms up (oneDNN primitive creation, page faults)
                acc = defaultdict(float)
                for key, i in order:
                    w, cs, sx, so, vl = mats[key][i]
                    x = xs[key]
                    t0 = time.perf_counter()
                    if path == "packed":
                        cpu_packed.linear(x, w, cs, sx, None, so, x.dtype)
                    else:
                        vl(x)
                    acc[key[0]] += time.perf_counter() - t0
                total = sum(acc.values())
                if best is None or total < best["total"]:
                    best = {"total": total, **acc}
            res[path] = {k2: round(v * 1e3, 3) for k2, v in best.items()}
        out["m"][m] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16], help="activation rows (tokens per step)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--step", action="store_true", help="cold-cache mode: a whole decode step, each layer with its "
                    "own weights (see `step`)")
    a = ap.parse_args()
    if a.step:
        res = step(a.checkpoint, a.m, a.reps)
        for m, r in res["m"].items():
            vb = r.get("vllm_bf16", {})
            for kind, v in r["packed"].items():
                ratio = f"{vb[kind] / v:.2f}x" if kind in vb else ""
                print(f"M={m:3d} {kind:24} packed {v:8.3f} ms/step   vLLM bf16 {vb.get(kind, float('nan')):8.3f}  {ratio}")
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
        return
    res = profile(a.checkpoint, a.m, a.reps)
    print(f"{'module':24} {'N':>7} {'K':>6} {'b':>2} {'x/tok':>5} {'M':>3} {'packed ms':>10} {'F.linear':>9} "
          f"{'ratio':>6} {'vllm bf16':>9} {'ratio':>6}")
    for r in res["rows"]:
        vb = r["vllm_bf16_ms"]
        tail = "" if vb is None else f" {vb * r['per_token']:9.3f} {vb / r['packed_ms']:6.2f}"
        print(f"{r['module']:24} {r['n']:7d} {r['k']:6d} {r['bits']:2d} {r['per_token']:5d} {r['m']:3d} "
              f"{r['packed_ms'] * r['per_token']:10.3f} {r['bf16_ms'] * r['per_token']:9.3f} "
              f"{r['bf16_ms'] / r['packed_ms']:6.2f}{tail}")
    for m, t in res["totals_per_step"].items():
        vb = t.get("vllm_bf16_ms")
        print(f"total per step, M={m}: packed {t['packed_ms']:.2f} ms, F.linear bf16 {t['bf16_ms']:.2f} ms "
              f"({t['bf16_ms'] / t['packed_ms']:.2f}x)" + ("" if vb is None else
              f", vLLM's bf16 linear {vb:.2f} ms ({vb / t['packed_ms']:.2f}x)"))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
