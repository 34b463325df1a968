"""Timed check of the C++ quantized-KV attention (``cpu_kv.cpp``) on this CPU: both kernel widths in one process.

Per case (Gemma 3 270M / Gemma 4 E2B attention shapes; 1 kv head): decode = ``batch`` requests x 1 query over
``ctx`` cached tokens (sliding layers see their window only), prefill = one request's ``chunk``-token chunk over
itself; the 16-lane (AVX-512) kernels vs the 8-lane (AVX2) ones (``cpu_kv.eight_lanes``). Best of ``--reps`` after
one warm-up. (Against vLLM's own bf16 attention it is compared end to end: ``gemma-mobile bench --kv-compare``.)

```
python -m kernels.cpu_kv_bench [--ctx 2048 8192] [--batch 16] [--chunk 512] [--reps 5] [--out FILE.json]
```
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Optional

import torch

from kernels import cpu_kv
from kernels import kvcache as kvc

# label, query heads, head_dim, bits, sliding window (None: global)
SHAPES = [("270m-sliding-int8", 4, 256, 8, 512), ("270m-global-int4", 4, 256, 4, None),
          ("e2b-sliding-int8", 8, 256, 8, 512), ("e2b-global-int4", 8, 512, 4, None)]


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def run_case(label: str, hq: int, d: int, bits: int, window: Optional[int], ctx: int, batch: int, chunk: int,
             reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    bs = 16
    per = -(-ctx // bs)
    cache = torch.empty(batch * per + 1, 1, bs, 2 * kvc.code_bytes(d, bits), dtype=torch.uint8)
    tables = torch.arange(batch * per).reshape(batch, per)
    ks, vs = 0.05, 0.04
    k = (torch.randn(batch * per * bs, 1, d, generator=g) * 2).bfloat16()
    v = torch.randn(batch * per * bs, 1, d, generator=g).bfloat16()
    cpu_kv.write_kv_cache(cache, k, v, torch.arange(batch * per * bs), ks, vs, bits)
    q = torch.randn(batch, hq, d, generator=g).bfloat16()
    lens = torch.full((batch,), ctx)
    dec = lambda: cpu_kv.paged_attention(q, cache, torch.arange(batch + 1), lens, tables, ks, vs, bits,  # noqa: E731
                                         d ** -0.5, sliding_window=window)
    qp = torch.randn(chunk, hq, d, generator=g).bfloat16()
    pre = lambda: cpu_kv.paged_attention(qp, cache, torch.tensor([0, chunk]), torch.tensor([chunk]),  # noqa: E731
                                         tables[:1], ks, vs, bits, d ** -0.5, sliding_window=window)
    out = {"label": label, "hq": hq, "d": d, "bits": bits, "window": window, "ctx": ctx, "batch": batch,
           "chunk": chunk}
    out["decode_ms"], out["prefill_ms"] = _best(dec, reps), _best(pre, reps)
    with cpu_kv.eight_lanes():
        out["decode_ms_8_lanes"], out["prefill_ms_8_lanes"] = _best(dec, reps), _best(pre, reps)
    out["speedup_16_vs_8"] = {"decode": out["decode_ms_8_lanes"] / out["decode_ms"],
                              "prefill": out["prefill_ms_8_lanes"] / out["prefill_ms"]}
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    a = ap.parse_args(argv)
    res = {"machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "lanes": cpu_kv.lanes()},
           "cases": []}
    for ctx in a.ctx:
        for label, hq, d, bits, window in SHAPES:
            r = run_case(label, hq, d, bits, window, ctx, a.batch, a.chunk, a.reps)
            res["cases"].append(r)
            print(f"{label:20s} ctx {ctx:5d}: decode {r['decode_ms']:7.2f} ms (8 lanes {r['decode_ms_8_lanes']:7.2f}); "
                  f"prefill {r['chunk']} {r['prefill_ms']:7.2f} ms "
                  f"(8 lanes {r['prefill_ms_8_lanes']:7.2f})", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
