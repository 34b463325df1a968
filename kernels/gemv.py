"""Small-M (decode) Triton kernel: packed int2/int4/int8 weights x int8 activations on CUDA cores, split-K.

One program owns ``BLOCK_N`` output channels x ``BLOCK_M`` (<= 4) rows x one K slice. Per step it loads a
``[BLOCK_N, BLOCK_KW]`` tile of int32 words (rows contiguous: coalesced 16-byte loads). Integer path, SWAR:
``(words >> t*bits) & 0x0303..`` leaves one unsigned code per byte (byte ``i`` = field ``i*CPB + t``, i.e. runs of
8 consecutive k in layout ``kgroup8``); the 4 matching int8 activations (contiguous vector loads, L1/L2 hits,
quantized in registers and shared by the tile's rows) are packed into one int32 and ``dp4a`` does 4 MACs per
instruction. The offset-binary ``-2^(bits-1)`` is folded out: ``sum x*(f-o) = sum x*f - o*sum x``.

Numerics (``INT_MATH``): x quantized in-kernel (``clamp(rne(x / s_x))``, IEEE division) unless already int8,
exact int32 accumulation, epilogue ``f32(acc) * (s_x * weight_scale[n]) (+bias)`` then optional static requant
with a scalar or per-column ``output_scale`` -- bit-identical to ``reference.linear``.
Weight-only (``INT_MATH=False``, tied lm_head): ``sum_k f32(x) * f32(q)`` in f32, then ``* weight_scale[n]``.
Split-K (int path only) combines exact int32 partials with the self-cleaning atomic fix-up of ``_common``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import dp4a, finish, load_x_int8  # raw; rebound per mode
from .layout import PackedWeight, pack_factor

MAX_BLOCK_M = 4


def _configs() -> list[triton.Config]:
    cfg = []
    for bn, bkw, sk, warps in [
        (64, 32, 1, 4), (32, 64, 1, 4), (128, 16, 1, 4),
        (64, 32, 4, 4), (32, 32, 8, 4), (16, 64, 4, 4), (32, 64, 16, 4),
    ]:
        cfg.append(triton.Config({"BLOCK_N": bn, "BLOCK_KW": bkw, "SPLIT_K": sk}, num_warps=warps, num_stages=2))
    return cfg


def _prune(configs, named_args, **kwargs):
    """Weight-only (float) path: no split-K (float atomics would be order-dependent)."""
    if not kwargs.get("INT_MATH", named_args.get("INT_MATH", True)):
        configs = [c for c in configs if c.kwargs["SPLIT_K"] == 1]
    kw = named_args["KW"]
    return [c for c in configs if c.kwargs["SPLIT_K"] == 1 or kw >= 2 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_KW"]]


INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_KW": 16}
GPU_DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_KW": 32}  # base of an explicit ``config`` on a GPU


def gemv_kernel(
    x_ptr, w_ptr, wscale_ptr, si_ptr, so_ptr, bias_ptr, out_ptr, work_ptr, cnt_ptr,
    M, N, K, KW, stride_xm, stride_om, so_stride, M_BUCKET,
    BITS: tl.constexpr, INT_MATH: tl.constexpr, X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SO: tl.constexpr, INT8_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, WG: tl.constexpr, DP4A: tl.constexpr, X_PACKED: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    GK: tl.constexpr = PACK * WG
    CPB: tl.constexpr = PACK // 4  # codes per byte
    MASK4: tl.constexpr = ((1 << BITS) - 1) * 0x01010101 if BITS < 8 else 0  # one field per byte (unused for 8)
    MASK: tl.constexpr = (1 << BITS) - 1
    FPH: tl.constexpr = 16 // BITS  # fields per 16-bit half word
    OFF: tl.constexpr = 1 << (BITS - 1)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    kw_per_split = (((KW + SPLIT_K - 1) // SPLIT_K + BLOCK_KW - 1) // BLOCK_KW) * BLOCK_KW
    kw_lo = pid_k * kw_per_split
    kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * KW
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # Accumulate elementwise over [BLOCK_M, BLOCK_N, BLOCK_KW] and reduce over KW once after the K loop: a
    # reduction per field would cost cross-lane shuffles per code.
    if INT_MATH:
        s_x = tl.load(si_ptr)
        acc3 = tl.full((BLOCK_M, BLOCK_N, BLOCK_KW), 0, tl.int32)
        xs2 = tl.full((BLOCK_M, BLOCK_KW), 0, tl.int32)
    else:
        s_x = 1.0
        acc3 = tl.full((BLOCK_M, BLOCK_N, BLOCK_KW), 0, tl.float32)
    for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        kw_mask = offs_kw < kw_hi
        words = tl.load(w_rows + offs_kw[None, :], mask=n_mask[:, None] & kw_mask[None, :], other=0)
        kbase = (offs_kw // WG) * GK + (offs_kw % WG)
        if INT_MATH:
            # SWAR: (words >> t*BITS) & MASK4 leaves one field per byte: byte i holds field j = i*CPB + t.
            # The 4 matching int8 activations are packed into one int32 and dp4a does 4 MACs in one op.
            for t in tl.static_range(CPB):
                if X_PACKED:  # pre-quantized and pre-packed by pack_x_kernel: [M, CPB, KW] int32
                    xp = tl.load(x_rows + t * KW + offs_kw[None, :], mask=m_mask[:, None] & kw_mask[None, :],
                                 other=0)
                else:
                    xp = tl.full((BLOCK_M, BLOCK_KW), 0, tl.int32)
                    for i in tl.static_range(4):
                        offs_k = kbase + (i * CPB + t) * WG
                        xmask = m_mask[:, None] & (kw_mask & (offs_k < K))[None, :]
                        xq = load_x_int8(x_rows + offs_k[None, :], xmask, s_x, X_INT8).to(tl.int32)
                        xp = xp | ((xq & 0xFF) << (8 * i))
                xs2 = dp4a(tl.full((BLOCK_M, BLOCK_KW), 0x01010101, tl.int32), xp, xs2, DP4A)  # sum of the 4 x
                if BITS == 8:
                    e = words  # 4 offset-binary bytes = 4 unsigned codes
                else:
                    e = (words >> (t * BITS)) & MASK4
                acc3 = dp4a(tl.broadcast_to(e[None, :, :], (BLOCK_M, BLOCK_N, BLOCK_KW)),
                            tl.broadcast_to(xp[:, None, :], (BLOCK_M, BLOCK_N, BLOCK_KW)), acc3, DP4A)
        else:
            # Weight-only: one LOP3 per code. Field t of a 16-bit half stays in place: (w & mask<<e) | 2^23-magic
            # is the float 2^23 + f*2^e (exact, e + BITS <= 16 < 23), minus (2^23 + o*2^e) = (f - o)*2^e exactly;
            # the 2^-e goes onto the activations (exact power-of-2 scaling, amortized over the tile's rows).
            for h in tl.static_range(2):
                if h == 0:
                    wh = words
                else:
                    wh = words >> 16
                for t in tl.static_range(FPH):
                    offs_k = kbase + (h * FPH + t) * WG
                    xmask = m_mask[:, None] & (kw_mask & (offs_k < K))[None, :]
                    xf = tl.load(x_rows + offs_k[None, :], mask=xmask, other=0.0).to(tl.float32)
                    xf = xf * (1.0 / (1 << (BITS * t)))
                    v = ((wh & (MASK << (BITS * t))) | 0x4B000000).to(tl.float32, bitcast=True)
                    v = v - (8388608.0 + OFF * (1 << (BITS * t)))
                    acc3 += xf[:, None, :] * v[None, :, :]
    acc = tl.reduce(acc3, 2, tl.standard._sum_combine)
    wscale = tl.load(wscale_ptr + offs_n, mask=n_mask, other=0.0)
    if INT_MATH:
        acc = acc - OFF * tl.reduce(xs2, 1, tl.standard._sum_combine)[:, None]
        col_scale = s_x * wscale
    else:
        col_scale = wscale
    mask_mn = m_mask[:, None] & n_mask[None, :]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    finish(acc, col_scale, offs_m, offs_n, mask_mn, n_mask, tile_id, work_ptr, cnt_ptr, N,
             bias_ptr, so_ptr, so_stride, out_ptr, stride_om, SPLIT_K, HAS_BIAS, HAS_SO, INT8_OUT)


def pack_x_kernel(x_ptr, out_ptr, si_ptr, K, KW, stride_xm,
                  BITS: tl.constexpr, X_INT8: tl.constexpr, BLOCK_KW: tl.constexpr, WG: tl.constexpr):
    """x [M, K] (float: quantized with the static scale; or int8) -> int32 [M, CPB, KW] in the GEMV's dp4a
    order: element (t, kw) packs the int8 activations of k = g*GK + (i*CPB + t)*WG + w, i = 0..3, one per byte
    (zero beyond K). Done once per call instead of once per thread of every GEMV program."""
    PACK: tl.constexpr = 32 // BITS
    GK: tl.constexpr = PACK * WG
    CPB: tl.constexpr = PACK // 4
    pid_m = tl.program_id(0)
    offs_kw = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    kw_mask = offs_kw < KW
    kbase = (offs_kw // WG) * GK + (offs_kw % WG)
    s_x = tl.load(si_ptr)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    for t in tl.static_range(CPB):
        xp = tl.full((BLOCK_KW,), 0, tl.int32)
        for i in tl.static_range(4):
            offs_k = kbase + (i * CPB + t) * WG
            xq = load_x_int8(x_row + offs_k, kw_mask & (offs_k < K), s_x, X_INT8).to(tl.int32)
            xp = xp | ((xq & 0xFF) << (8 * i))
        tl.store(out_ptr + pid_m.to(tl.int64) * (CPB * KW) + t * KW + offs_kw, xp, mask=kw_mask)


@functools.cache
def _build_pack(interpret_mode: bool):
    return C.jit_kernel(pack_x_kernel, interpret_mode)


def pack_x(x2: torch.Tensor, si: torch.Tensor, bits: int, kw: int) -> torch.Tensor:
    """Quantize (unless int8) and pack activations for the GEMV: int32 ``[M, CPB * KW]``."""
    m = x2.shape[0]
    cpb = 32 // bits // 4
    out = torch.empty(m, cpb * kw, dtype=torch.int32, device=x2.device)
    block = 32 if C.interpret() else 256
    _build_pack(C.interpret())[(m, triton.cdiv(kw, block))](
        x2, out, si, x2.shape[1], kw, x2.stride(0), BITS=bits, X_INT8=x2.dtype == torch.int8, BLOCK_KW=block,
        WG=C.WG, **C.launch_opts())
    return out


def prepack_default() -> bool:
    """Integer GEMV: pre-pack x in a separate tiny kernel (default) or quantize+pack inside every program
    (``GEMMA_MOBILE_GEMV_PREPACK=0``: one launch, but the packing work is repeated per thread)."""
    return os.environ.get("GEMMA_MOBILE_GEMV_PREPACK", "1") != "0"


@functools.cache
def _build(interpret_mode: bool):
    if interpret_mode:
        return C.jit_kernel(gemv_kernel, interpret_mode)
    return triton.autotune(
        configs=_configs(), key=["M_BUCKET", "N", "KW", "BITS", "INT_MATH", "X_INT8", "X_PACKED"],
        prune_configs_by={"early_config_prune": _prune}, warmup=5, rep=20,
    )(C.jit_kernel(gemv_kernel, interpret_mode))


def launch(
    x2: torch.Tensor, w: PackedWeight, ws: torch.Tensor, si: Optional[torch.Tensor], so: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], out: torch.Tensor, config: Optional[dict] = None,
) -> torch.Tensor:
    """Run the GEMV on prepared args (``x2`` [M, K] contiguous rows, f32 scale vectors, ``out`` [M, N]).
    ``config`` (e.g. ``{"BLOCK_N": 16, "BLOCK_KW": 16, "SPLIT_K": 2}``) bypasses autotuning (tests/bench)."""
    m, k = x2.shape
    n, kw = w.n, w.packed.shape[1]
    if m > MAX_BLOCK_M * 64:
        raise ValueError(f"gemv is for small M, got M={m}")
    block_m = min(C.next_pow2(m), MAX_BLOCK_M)
    int_math = si is not None
    dev = x2.device
    interp = C.interpret()
    kern = _build(interp)
    prepack = prepack_default()
    if config is not None and "PREPACK" in config:  # host-side option, not a kernel meta-parameter
        config = dict(config)
        prepack = bool(config.pop("PREPACK"))
        config = config or None
    if interp or config is not None:
        cfg = dict(INTERPRET_CONFIG if interp else GPU_DEFAULT_CONFIG, SPLIT_K=1)
        cfg.update(config or {})
    else:
        cfg = None
    x_packed = int_math and prepack
    if x_packed:
        x2 = pack_x(x2, si, w.bits, kw)
    work, cnt = C.splitk_workspace(dev, m, n, triton.cdiv(n, 16) * triton.cdiv(m, block_m)) if int_math \
        else (C.dummy(dev, torch.int32), C.dummy(dev, torch.int32))
    if not int_math and cfg is not None and cfg.get("SPLIT_K", 1) != 1:
        raise ValueError("split-K is only for the integer path")
    d = C.dummy(dev)
    args = (
        x2, w.packed, ws, si if int_math else d, so if so is not None else d, bias if bias is not None else d,
        out, work, cnt, m, n, k, kw, x2.stride(0), out.stride(0), 0 if so is None or so.numel() == 1 else 1,
        min(C.next_pow2(m), 64),
    )
    meta = dict(BITS=w.bits, INT_MATH=int_math, X_INT8=x2.dtype == torch.int8, HAS_BIAS=bias is not None,
                HAS_SO=so is not None, INT8_OUT=out.dtype == torch.int8, BLOCK_M=block_m, WG=C.WG,
                DP4A=C.use_dp4a(), X_PACKED=x_packed)
    if cfg is not None:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, block_m), cfg["SPLIT_K"])
        fn = kern.fn if hasattr(kern, "configs") else kern
        fn[grid](*args, **meta, **cfg, **C.launch_opts(exact_epilogue=int_math))
    else:
        def grid(meta_):
            return (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, block_m), meta_["SPLIT_K"])
        kern[grid](*args, **meta, **C.launch_opts(exact_epilogue=int_math))
    return out


__all__ = ["launch", "MAX_BLOCK_M", "pack_factor"]
