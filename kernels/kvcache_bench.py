"""Small timed check of the Triton KV-cache kernels (``kvcache_triton.py``) on a GPU, E2B-like attention:
8 query heads, 1 kv head, batch 16 decode at 2k and 8k context; head_dim 256 with int8 KV (sliding layers) and
head_dim 512 with int4 KV (global layers). Per case:

- ``write_decode_us``: ``write_kv_cache_triton`` of one decode step (16 tokens) and ``write_prefill_us`` of a
  2048-token chunk (``prefill_chunk``);
- ``attn_us``: ``paged_attention_triton`` decode (1 query per request) over the paged uint8 cache, with the
  default key split (``num_splits``, flash-decoding) and ``attn_single_pass_us`` without it;
- ``sdpa_bf16_us``: the baseline, ``torch.nn.functional.scaled_dot_product_attention`` (bf16, contiguous
  dense K/V = the same dequantized values, GQA) on the same data;
- parity: max |Δ| vs the torch reference ``kvcache.paged_attention`` and vs SDPA (informational: the test file
  checks the derived tolerance), cache bytes per step and the effective cache bandwidth.

```
python -m kernels.kvcache_bench --out FILE.json [--budget-s 60]          # CUDA
TRITON_INTERPRET=1 python -m kernels.kvcache_bench --smoke --out s.json  # CPU: tiny shapes, no timings
```
Timed with CUDA graphs (``triton.testing.do_bench_cudagraph``, fallback ``do_bench``), as ``kernels.bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

from . import kvcache as kvc
from .kvcache_triton import default_num_splits, paged_attention_triton, write_kv_cache_triton

CASES = [  # (label, head_dim, bits)
    ("e2b.sliding", 256, 8),
    ("e2b.global", 512, 4),
]
CONTEXTS = (2048, 8192)
BATCH, HQ, HKV, BLOCK_SIZE = 16, 8, 1, 16


def _timer(on_gpu: bool):
    if not on_gpu:
        return lambda fn: (fn(), (None, "none"))[1]
    import triton.testing as tt

    def bench(fn):
        fn()
        torch.cuda.synchronize()
        try:
            return float(tt.do_bench_cudagraph(fn, rep=30)) * 1e3, "cudagraph"
        except Exception:  # noqa: BLE001 - capture can fail: plain events instead
            return float(tt.do_bench(fn, warmup=10, rep=30)) * 1e3, "events"

    return bench


def run_case(label: str, d: int, bits: int, ctx: int, batch: int, dev: torch.device, bench) -> dict:
    g = torch.Generator(device="cpu").manual_seed(ctx + d)
    bs = BLOCK_SIZE
    nbr = (ctx + bs - 1) // bs  # blocks per request
    nb = batch * nbr + 1
    cb = kvc.code_bytes(d, bits)
    cache = torch.zeros(nb, HKV, bs, 2 * cb, dtype=torch.uint8, device=dev)
    block_table = torch.randperm(nb, generator=g)[: batch * nbr].view(batch, nbr).to(torch.int32).to(dev)
    ks = torch.tensor(0.04 if bits == 8 else 0.5, device=dev)
    vs = torch.tensor(0.03 if bits == 8 else 0.45, device=dev)
    pos = torch.arange(ctx, device=dev)
    # fill the cache request by request (the bulk write kernel, also timed once below as a 2048-token chunk)
    for r in range(batch):
        k = (torch.randn(ctx, HKV, d, generator=g) * 1.5).to(torch.bfloat16).to(dev)
        v = (torch.randn(ctx, HKV, d, generator=g) * 1.5).to(torch.bfloat16).to(dev)
        slots = block_table[r, pos // bs].long() * bs + pos % bs
        write_kv_cache_triton(cache, k, v, slots, ks, vs, bits)
    q = (torch.randn(batch, HQ, d, generator=g)).to(torch.bfloat16).to(dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    scale = 1.0
    out = torch.empty_like(q)

    def attn():
        paged_attention_triton(q, cache, qsl, lens, block_table, ks, vs, bits, scale, out=out)

    attn_us, how = bench(attn)
    single_us, _ = bench(lambda: paged_attention_triton(q, cache, qsl, lens, block_table, ks, vs, bits, scale,
                                                        out=out, num_splits=1))
    splits = default_num_splits(batch * HQ, dev)
    attn()
    ref = kvc.paged_attention(q, cache, qsl.cpu(), lens.cpu(), block_table, ks, vs, bits, scale)
    # bf16 baseline on the same values: dense dequantized K/V [B, Hkv, ctx, D]
    kd, vd = [], []
    for r in range(batch):
        k_, v_ = kvc.gather_kv(cache, block_table[r], 0, ctx, ks, vs, bits, torch.bfloat16)
        kd.append(k_)
        vd.append(v_)
    kd, vd = torch.stack(kd), torch.stack(vd)
    qd = q.unsqueeze(2)  # [B, Hq, 1, D]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def base():
        try:
            return sdpa(qd, kd, vd, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: no enable_gqa, broadcast the kv head instead
            return sdpa(qd, kd.expand(-1, HQ, -1, -1), vd.expand(-1, HQ, -1, -1), scale=scale)

    base_us, _ = bench(base)
    base_out = base().squeeze(2)
    # writes: one decode step (one token per request) and a 2048-token prefill chunk
    k1 = torch.randn(batch, HKV, d, generator=g).to(torch.bfloat16).to(dev)
    slots1 = block_table[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    write_us, _ = bench(lambda: write_kv_cache_triton(cache, k1, k1, slots1, ks, vs, bits))
    chunk = min(2048, ctx)
    kc = torch.randn(chunk, HKV, d, generator=g).to(torch.bfloat16).to(dev)
    pos_c = torch.arange(chunk, device=dev)
    slots_c = block_table[0, pos_c // bs].long() * bs + pos_c % bs
    write_prefill_us, _ = bench(lambda: write_kv_cache_triton(cache, kc, kc, slots_c, ks, vs, bits))
    cache_bytes = batch * ctx * HKV * 2 * cb
    row = {
        "case": label, "head_dim": d, "bits": bits, "context": ctx, "batch": batch, "q_heads": HQ,
        "kv_heads": HKV, "timing": how, "attn_us": attn_us, "num_splits": splits, "attn_single_pass_us": single_us,
        "sdpa_bf16_us": base_us,
        "speedup_vs_sdpa_bf16": (base_us / attn_us) if attn_us and base_us else None,
        "write_decode_us": write_us, "write_prefill_us": write_prefill_us, "prefill_chunk": chunk,
        "cache_bytes_read": cache_bytes, "bf16_kv_bytes_read": batch * ctx * HKV * 2 * d * 2,
        "cache_GBps": (cache_bytes / attn_us / 1e3) if attn_us else None,
        "max_abs_diff_vs_reference": float((out.float() - ref.float()).abs().max()),
        "max_abs_diff_vs_sdpa": float((out.float() - base_out.float()).abs().max()),
        "max_abs_out": float(ref.float().abs().max()),
    }
    for k_ in ("attn_us", "attn_single_pass_us", "sdpa_bf16_us", "write_decode_us", "write_prefill_us"):
        if row[k_] is not None:
            row[k_] = round(row[k_], 2)
    return row


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kvcache_bench.json"))
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop starting new cases after this long")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter run, tiny shapes, no timings")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.smoke:
        dev, contexts, batch = torch.device("cpu"), (40,), 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on CPU", file=sys.stderr)
            raise SystemExit(2)
        dev, contexts, batch = torch.device("cuda"), CONTEXTS, BATCH
    bench = _timer(dev.type == "cuda")
    meta = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__}
    rows, skipped = [], []
    for ctx in contexts:
        for label, d, bits in CASES:
            if time.time() - t0 > args.budget_s:
                skipped.append({"case": label, "context": ctx})
                continue
            try:
                row = run_case(label, d, bits, ctx, batch, dev, bench)
            except Exception as e:  # noqa: BLE001 - record and go on
                row = {"case": label, "context": ctx, "error": repr(e)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rep = {"meta": meta, "results": rows, "skipped": skipped, "elapsed_s": round(time.time() - t0, 1)}
    with open(args.out, "w") as f:
        json.dump(rep, f, indent=1)
    return rep


if __name__ == "__main__":
    main()
