"""Plugin-path check: a tiny Gemma-like layer stack driven through EXACTLY the functions the vLLM plugin calls
(``kernels.plugin``: load-time layout conversion from compressed-tensors tensors, linear apply with fused shards
and per-shard static scales, tensor-parallel partial sums + requant, embedding gather, gather-only per-layer
table, int8-activation and weight-only lm_head), on the Triton backend vs the torch reference backend, same
device, same inputs.

    python -m kernels.plugin_check --out plugin_check.json                 # CUDA (kernels/run_gpu_checks.sh)
    TRITON_INTERPRET=1 python -m kernels.plugin_check --device cpu --small # CPU (tests/test_plugin_path.py)

Expected: every quantized step is bitwise equal (the Triton kernels implement the reference's exact integer
numerics), so the logits of the int8-activation lm_head are bitwise equal too (the float ops between the linears
— RMSNorm, GeGLU, attention — are the same torch code on the same device and inputs). The weight-only lm_head
accumulates in float: bound |d| <= 2^-7 * (|h| @ |q|^T) * scale (one bf16 rounding of the product sum relative to
the sum of magnitudes; the reference rounds the matmul to bf16 before scaling). TP (2 simulated ranks of a
row-parallel down_proj): Triton vs torch bitwise; vs the unsplit layer the f32 sum of two partials may round
differently from one f32 product (a few ulp of |y|), which can move a requantized output by one step s_y, never
more: checked.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from . import bitpack, plugin


def _rand_ct_linear(g, n_shards: list[int], k: int, bits: int, dev, same_sx: bool = False, sx_base: float = 0.02):
    """Random compressed-tensors tensors of a fused linear: int32 packed [N, ceil(K*bits/32)], f32 scales."""
    n = sum(n_shards)
    lo, hi = bitpack.code_range(bits)
    # symmetric codes (a uniform draw over [lo, hi] has mean -1/2 and saturates every output at K = 512),
    # plus a few lo codes so the most negative field value is exercised too
    codes = torch.randint(lo + 1, hi + 1, (n, k), generator=g, dtype=torch.int8)
    codes[torch.rand(n, k, generator=g) < 0.03] = lo
    ws = (torch.rand(n, generator=g) * 0.5 + 0.5) * (1.0 / (math.sqrt(k) * max(hi, 1)))
    sx = torch.full((len(n_shards),), 2 * sx_base) if same_sx else \
        torch.rand(len(n_shards), generator=g) * 2 * sx_base + sx_base
    sy = torch.rand(len(n_shards), generator=g) * 0.03 + 0.02
    return codes, dict(weight_packed=bitpack.ct_pack(codes, bits).to(dev), weight_scale=ws.to(dev),
                       input_scale=sx.to(dev), output_scale=sy.to(dev), shards=n_shards, k=k, bits=bits)


def _rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())).to(x.dtype)


def build(dev: torch.device, small: bool, seed: int = 0) -> dict:
    """The stack's loaded tensors (compressed-tensors form, as vLLM hands them to the plugin)."""
    g = torch.Generator().manual_seed(seed)
    if small:
        hid, inter, heads, hd, vocab, ple_w, layers = 128, 256, 2, 64, 256, 64, 2
    else:  # Gemma 4 E2B widths
        hid, inter, heads, hd, vocab, ple_w, layers = 1536, 6144, 8, 256, 16384, 256, 2
    cfg = dict(hidden=hid, inter=inter, heads=heads, head_dim=hd, vocab=vocab, ple_width=ple_w, layers=layers)
    t_codes = torch.randint(-2, 2, (vocab, hid), generator=g, dtype=torch.int8)
    t_scale = torch.rand(vocab, generator=g) * 0.05 + 0.02
    ple_codes = torch.randint(-8, 8, (vocab, ple_w * layers), generator=g, dtype=torch.int8)
    ple_scale = torch.rand(vocab, ple_w * layers // 32, generator=g) * 0.01 + 0.005  # group 32, per (row, block)
    st = {"cfg": cfg, "table": dict(weight_packed=bitpack.ct_pack(t_codes, 2).to(dev), weight_scale=t_scale.to(dev)),
          "ple": dict(packed=bitpack.ct_pack(ple_codes, 4).to(dev), scale=ple_scale.to(dev)),
          "head_scales": (0.08, 0.25), "layers": []}
    for i in range(layers):
        two = i == layers - 1  # last layer: a KV-shared-style 2-bit double-wide MLP
        mlp_bits, w = (2, 2 * inter) if two else (4, inter)
        lay = {"norm1": (torch.randn(hid, generator=g) * 0.1).to(dev),
               "norm2": (torch.randn(hid, generator=g) * 0.1).to(dev)}
        _, lay["qkv"] = _rand_ct_linear(g, [heads * hd, hd, hd], hid, 4, dev)
        _, lay["o"] = _rand_ct_linear(g, [hid], heads * hd, 8, dev)
        _, lay["gate_up"] = _rand_ct_linear(g, [w, w], hid, mlp_bits, dev, same_sx=True)
        codes, lay["down"] = _rand_ct_linear(g, [hid], w, mlp_bits, dev, sx_base=0.05)  # GeGLU outputs are wide
        lay["down_codes"] = codes
        lay["ple_proj"] = _rand_ct_linear(g, [hid], ple_w, 8, dev)[1]
        st["layers"].append(lay)
    return st


def prepare(st: dict, backend: str, tp: int = 1) -> dict:
    """Load-time conversion through kernels.plugin (what process_weights_after_loading does)."""
    cfg = st["cfg"]
    out = {"table": plugin.prepare_table(st["table"]["weight_packed"], st["table"]["weight_scale"], 2, cfg["hidden"],
                                         backend, head_scales=st["head_scales"]),
           "ple": plugin.GatherTable(st["ple"]["packed"], st["ple"]["scale"], 4, cfg["ple_width"] * cfg["layers"]),
           "layers": []}
    for lay in st["layers"]:
        p = {n: plugin.prepare_linear(lay[n]["weight_packed"], lay[n]["weight_scale"], lay[n]["input_scale"],
                                      lay[n]["output_scale"], lay[n]["shards"], lay[n]["k"], lay[n]["bits"], backend)
             for n in ("qkv", "o", "gate_up", "down", "ple_proj")}
        if tp > 1:  # row-parallel down_proj: rank r holds K slice r (vLLM's weight loader narrows the packed dim)
            d, codes = lay["down"], lay["down_codes"]
            kk = d["k"] // tp
            p["down_tp"] = [plugin.prepare_linear(
                bitpack.ct_pack(codes[:, r * kk:(r + 1) * kk].contiguous(), d["bits"]).to(d["weight_packed"].device),
                d["weight_scale"], d["input_scale"], d["output_scale"], d["shards"], kk, d["bits"], backend)
                for r in range(tp)]
        p["norm1"], p["norm2"] = lay["norm1"], lay["norm2"]
        out["layers"].append(p)
    return out


def forward(model: dict, cfg: dict, ids: torch.Tensor, quantized_head: bool = True, tp: bool = False,
            trace: dict | None = None) -> torch.Tensor:
    """Gemma-like decoder on ``ids`` (one causal sequence): embedding * sqrt(H), per layer RMSNorm -> qkv ->
    causal SDPA -> o -> residual, RMSNorm -> gate_up -> GeGLU -> down (TP: 2 rank partials, summed = all-reduce,
    then finish) -> residual, + per-layer-embedding projection; final lm_head from the same table."""
    hid, heads, hd = cfg["hidden"], cfg["heads"], cfg["head_dim"]
    t = ids.numel()
    x = plugin.table_embedding(model["table"], ids, torch.bfloat16) * torch.tensor(hid ** 0.5, dtype=torch.bfloat16)
    ple = plugin.gather_embedding(model["ple"], ids).to(torch.bfloat16).view(t, cfg["layers"], cfg["ple_width"])
    for i, p in enumerate(model["layers"]):
        h = _rms(x, p["norm1"])
        qkv = plugin.linear_apply(p["qkv"], h)
        q, k, v = qkv.split([heads * hd, hd, hd], dim=-1)
        q = q.view(t, heads, hd).transpose(0, 1).float()
        k = k.view(t, 1, hd).transpose(0, 1).float().expand(heads, t, hd)
        v = v.view(t, 1, hd).transpose(0, 1).float().expand(heads, t, hd)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + plugin.linear_apply(p["o"], a.transpose(0, 1).reshape(t, heads * hd).to(torch.bfloat16))
        h = _rms(x, p["norm2"])
        gu = plugin.linear_apply(p["gate_up"], h)
        gate, up = gu.chunk(2, dim=-1)
        act = (torch.nn.functional.gelu(gate.float(), approximate="tanh") * up.float()).to(torch.bfloat16)
        if tp:
            kk = p["down_tp"][0].packed[0].k
            y = sum(plugin.linear_partial(r, act[:, j * kk:(j + 1) * kk].contiguous())
                    for j, r in enumerate(p["down_tp"]))  # the all-reduce
            d = plugin.linear_finish(p["down_tp"][0], y, None, torch.bfloat16)
        else:
            d = plugin.linear_apply(p["down"], act)
        if trace is not None:
            trace[f"layer{i}.down"] = d
        x = x + d + plugin.linear_apply(p["ple_proj"], ple[:, i].contiguous())
    return plugin.table_lm_head(model["table"], _rms(x, model["layers"][0]["norm1"]), quantized_head)


def run(dev: torch.device, small: bool, seed: int = 0) -> dict:
    st = build(dev, small, seed)
    cfg = st["cfg"]
    g = torch.Generator().manual_seed(seed + 1)
    rep: dict = {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev), "config": cfg,
                 "cases": []}
    tri, ref = prepare(st, "triton", tp=2), prepare(st, "torch", tp=2)
    ok = True
    for t in (1, 16):
        ids = torch.randint(0, cfg["vocab"], (t,), generator=g).to(dev)
        case: dict = {"tokens": t}
        # embedding gathers (table and per-layer table) are exact
        case["embedding_equal"] = torch.equal(plugin.table_embedding(tri["table"], ids, torch.bfloat16),
                                              plugin.table_embedding(ref["table"], ids, torch.bfloat16))
        a, b = forward(tri, cfg, ids), forward(ref, cfg, ids)
        case["logits_int8_head_equal"] = torch.equal(a, b)
        case["logits_int8_head_max_abs_diff"] = float((a.float() - b.float()).abs().max())
        # weight-only lm_head on the same hidden state: float accumulation, bound in the module docstring
        h = torch.randn(t, cfg["hidden"], generator=g).to(dev, torch.bfloat16)
        wa = plugin.table_lm_head(tri["table"], h, False).float()
        wb = plugin.table_lm_head(ref["table"], h, False).float()
        codes = bitpack.ct_unpack(st["table"]["weight_packed"], 2, cfg["hidden"]).float()
        bound = 2.0 ** -7 * (h.float().abs() @ codes.abs().t()) * st["table"]["weight_scale"] + 1e-6
        case["weight_only_head_within_bound"] = bool(((wa - wb).abs() <= bound).all())
        case["weight_only_head_max_abs_diff"] = float((wa - wb).abs().max())
        # tensor parallel: 2 simulated ranks of every row-parallel down_proj
        ta, tb = {}, {}
        la, lb = forward(tri, cfg, ids, tp=True, trace=ta), forward(ref, cfg, ids, tp=True, trace=tb)
        case["tp_logits_equal"] = torch.equal(la, lb)
        tu = {}
        forward(ref, cfg, ids, trace=tu)
        steps = []
        for i, lay in enumerate(st["layers"]):
            sy = float(lay["down"]["output_scale"][0])
            dd = (tb[f"layer{i}.down"].float() - tu[f"layer{i}.down"].float()).abs()
            steps.append({"layer": i, "differing": int((dd > 0).sum()), "max_steps": float(dd.max()) / sy})
        # only the first layer's down sees identical inputs in both runs; later layers inherit its differences
        case["tp_vs_unsplit_first_layer"] = steps[0]
        case["tp_within_one_step"] = steps[0]["max_steps"] <= 1.0 + 1e-3
        case_ok = all(case[k] for k in ("embedding_equal", "logits_int8_head_equal", "weight_only_head_within_bound",
                                         "tp_logits_equal", "tp_within_one_step"))
        case["ok"] = case_ok
        ok &= case_ok
        rep["cases"].append(case)
    if dev.type == "cuda":  # one decode step of the stack: Triton vs the torch reference ops (not a target)
        ids = torch.randint(0, cfg["vocab"], (1,), generator=g).to(dev)
        for name, m in (("triton", tri), ("torch", ref)):
            forward(m, cfg, ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                forward(m, cfg, ids)
            torch.cuda.synchronize()
            rep[f"decode_step_ms_{name}"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
    rep["ok"] = ok
    return rep


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "plugin_check.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny widths (CPU interpreter)")
    args = ap.parse_args(argv)
    rep = run(torch.device(args.device), args.small)
    with open(args.out, "w") as f:
        json.dump(rep, f, indent=1)
    print(json.dumps(rep, indent=1))
    if not rep["ok"]:
        raise SystemExit(1)
    return rep


if __name__ == "__main__":
    main()
