"""Larger-M Triton kernel: int8 tensor cores (``tl.dot`` int8 x int8 -> int32) with weights unpacked in registers.

Tile ``[BLOCK_M, BLOCK_N]``, grouped program order (L2 reuse of weight tiles), optional split-K for small M with
large K. Per K step the program loads a ``[BLOCK_KW, BLOCK_N]`` tile of int32 words (each column = one output
channel's contiguous words) once, and for each field ``j`` (``32 // bits`` of them) issues one
``tl.dot(x_j [BLOCK_M, BLOCK_KW], f_j [BLOCK_KW, BLOCK_N])``: ``f_j`` is one shift+mask(+truncate) of the word
tile, ``x_j`` the activations of the k it covers (runs of 8 consecutive k, layout ``kgroup8``), quantized in
registers from bf16 with the static ``input_scale`` (or loaded as int8). 2/4-bit fields are fed unsigned and the
``2^(bits-1)`` offset is removed once per row (``acc -= o * sum_k x``); 8-bit fields are sign-flipped (``^ 128``).

Numerics as ``gemv`` / ``reference.linear``: exact int32 accumulation, f32 epilogue identical op by op.
Weight-only (``INT_MATH=False``): codes become exact bf16/f16 (2^23 magic) and ``tl.dot`` accumulates in f32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import field_to_float, finish, load_x_int8  # raw; rebound per mode
from .layout import PackedWeight

SPLITK_MAX_M = 64  # split-K configs are only considered up to this M (workspace is M*N int32)


def _configs(small_m: bool) -> list[triton.Config]:
    """Config lists checked for zero register spills on sm_90 (``python -m kernels.compile_check --all``).
    Small M (fused bf16 -> int8 quantization, mma.sync): BLOCK_M <= 32, split-K for occupancy. Large M
    (pre-quantized int8 x, wgmma): 64-row tiles (128-row and 64x256 tiles spilled registers)."""
    if small_m:
        rows = [(16, 64, 32, 1, 4, 4), (16, 128, 32, 1, 4, 4), (16, 64, 64, 4, 4, 3), (16, 128, 32, 4, 4, 4),
                (32, 64, 32, 2, 4, 4), (32, 128, 32, 1, 8, 3), (16, 64, 32, 8, 4, 4)]
    else:
        rows = [(64, 128, 32, 1, 8, 3), (64, 64, 32, 1, 4, 4), (64, 128, 64, 1, 8, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KW": bkw, "SPLIT_K": sk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bkw, sk, w, s in rows]


def _prune(configs, named_args, **kwargs):
    m, kw = named_args["M"], named_args["KW"]
    int_math = kwargs.get("INT_MATH", True)
    out = []
    for c in configs:
        sk, bm = c.kwargs["SPLIT_K"], c.kwargs["BLOCK_M"]
        if sk > 1 and (not int_math or kw < 2 * sk * c.kwargs["BLOCK_KW"]):
            continue
        if bm > 16 and bm >= 2 * max(m, 16):  # don't waste a huge M tile on a tiny M
            continue
        out.append(c)
    return out or configs[:1]


INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_KW": 16, "SPLIT_K": 1, "GROUP_M": 4}
# base of an explicit ``config`` on a GPU (int8 ``tl.dot`` needs K >= 32 per dot: BLOCK_KW >= 32)
GPU_DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_KW": 32, "SPLIT_K": 1, "GROUP_M": 8}


def gemm_kernel(
    x_ptr, w_ptr, wscale_ptr, si_ptr, so_ptr, bias_ptr, out_ptr, work_ptr, cnt_ptr,
    M, N, K, KW, stride_xm, stride_om, so_stride, M_BUCKET,
    BITS: tl.constexpr, INT_MATH: tl.constexpr, X_INT8: tl.constexpr, X_F32: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SO: tl.constexpr, INT8_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, WG: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    GK: tl.constexpr = PACK * WG
    MASK: tl.constexpr = (1 << BITS) - 1
    OFF: tl.constexpr = 1 << (BITS - 1)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    kw_per_split = (((KW + SPLIT_K - 1) // SPLIT_K + BLOCK_KW - 1) // BLOCK_KW) * BLOCK_KW
    kw_lo = pid_k * kw_per_split
    kw_hi = tl.minimum(kw_lo + kw_per_split, KW)
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * KW
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if INT_MATH:
        s_x = tl.load(si_ptr)
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        xsum = tl.full((BLOCK_M,), 0, tl.int32)
    else:
        s_x = 1.0
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for kw0 in range(kw_lo, kw_hi, BLOCK_KW):
        offs_kw = kw0 + tl.arange(0, BLOCK_KW)
        kw_mask = offs_kw < kw_hi
        words = tl.load(w_cols + offs_kw[:, None], mask=kw_mask[:, None] & n_mask[None, :], other=0)
        kbase = (offs_kw // WG) * GK + (offs_kw % WG)
        for j in range(PACK):  # not unrolled: unrolling all fields spills registers (16 dots for int2)
            offs_k = kbase + j * WG
            xmask = m_mask[:, None] & (kw_mask & (offs_k < K))[None, :]
            if INT_MATH:
                xq = load_x_int8(x_rows + offs_k[None, :], xmask, s_x, X_INT8)
                if BITS == 8:
                    f = ((words >> (j * BITS)) ^ 128).to(tl.int8)
                else:
                    f = ((words >> (j * BITS)) & MASK).to(tl.int8)
                    xsum += tl.reduce(xq.to(tl.int32), 1, tl.standard._sum_combine)
                acc = tl.dot(xq, f, acc, out_dtype=tl.int32)
            else:
                xf = tl.load(x_rows + offs_k[None, :], mask=xmask, other=0.0)
                wf = field_to_float(words, j * BITS, BITS)
                if X_F32:  # f32 x (or bf16 under the interpreter, whose bf16 dot is wrong): exact f32 dot
                    acc = tl.dot(xf.to(tl.float32), wf, acc, input_precision="ieee")
                else:  # bf16/f16 x: codes are exact in bf16/f16, f32 accumulation on tensor cores
                    acc = tl.dot(xf, wf.to(xf.dtype), acc)
    wscale = tl.load(wscale_ptr + offs_n, mask=n_mask, other=0.0)
    if INT_MATH:
        if BITS != 8:
            acc = acc - OFF * xsum[:, None]
        col_scale = s_x * wscale
    else:
        col_scale = wscale
    mask_mn = m_mask[:, None] & n_mask[None, :]
    tile_id = pid_m * num_pid_n + pid_n
    finish(acc, col_scale, offs_m, offs_n, mask_mn, n_mask, tile_id, work_ptr, cnt_ptr, N,
             bias_ptr, so_ptr, so_stride, out_ptr, stride_om, SPLIT_K, HAS_BIAS, HAS_SO, INT8_OUT)


def quant_kernel(x_ptr, out_ptr, si_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """x[m, k] (bf16/f16/f32) -> int8 clamp(rne(x / s_x)), once, for the large-M GEMM (whose N-tiles would
    otherwise each redo the IEEE division of the same activations)."""
    pid_m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    xq = load_x_int8(x_ptr + pid_m.to(tl.int64) * stride_xm + offs, mask, tl.load(si_ptr), False)
    tl.store(out_ptr + pid_m.to(tl.int64) * K + offs, xq, mask=mask)


@functools.cache
def _build_quant(interpret_mode: bool):
    return C.jit_kernel(quant_kernel, interpret_mode)


def quantize_rows(x2: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
    """Triton ``quantize_int8`` of a [M, K] row-strided activation (same numerics as the reference)."""
    m, k = x2.shape
    out = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    block = 256 if C.interpret() else 1024
    _build_quant(C.interpret())[(m, triton.cdiv(k, block))](x2, out, si, k, x2.stride(0), BLOCK_K=block,
                                                            **C.launch_opts())
    return out


@functools.cache
def _build(interpret_mode: bool, small_m: bool):
    if interpret_mode:
        return C.jit_kernel(gemm_kernel, interpret_mode)
    return triton.autotune(
        configs=_configs(small_m), key=["M_BUCKET", "N", "KW", "BITS", "INT_MATH", "X_INT8", "X_F32"],
        prune_configs_by={"early_config_prune": _prune}, warmup=5, rep=20,
    )(C.jit_kernel(gemm_kernel, interpret_mode))


def launch(
    x2: torch.Tensor, w: PackedWeight, ws: torch.Tensor, si: Optional[torch.Tensor], so: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], out: torch.Tensor, config: Optional[dict] = None,
) -> torch.Tensor:
    """Run the tensor-core GEMM on prepared args (see ``gemv.launch``). ``config`` bypasses autotuning."""
    m, k = x2.shape
    n, kw = w.n, w.packed.shape[1]
    int_math = si is not None
    dev = x2.device
    interp = C.interpret()
    small_m = m <= SPLITK_MAX_M
    kern = _build(interp, small_m)
    cfg = None
    if interp or config is not None:
        cfg = dict(INTERPRET_CONFIG if interp else GPU_DEFAULT_CONFIG, **({} if small_m else {"BLOCK_M": 64}))
        cfg.update(config or {})
        if not interp and cfg["BLOCK_KW"] < 32:
            raise ValueError("BLOCK_KW must be >= 32 on a GPU (int8 tl.dot K)")
        if cfg["SPLIT_K"] > 1 and (not int_math or not small_m):
            raise ValueError("split-K is only for the integer path with M <= %d" % SPLITK_MAX_M)
    if int_math and not small_m and x2.dtype != torch.int8:
        x2 = quantize_rows(x2, si)  # large M: quantize once, then int8 loads (half the activation bytes)
    if int_math and small_m:
        work, cnt = C.splitk_workspace(dev, m, n, triton.cdiv(n, 16) * triton.cdiv(m, 16))
    else:
        work, cnt = C.dummy(dev, torch.int32), C.dummy(dev, torch.int32)
    d = C.dummy(dev)
    args = (
        x2, w.packed, ws, si if int_math else d, so if so is not None else d, bias if bias is not None else d,
        out, work, cnt, m, n, k, kw, x2.stride(0), out.stride(0), 0 if so is None or so.numel() == 1 else 1,
        min(C.next_pow2(m), 4096),
    )
    meta = dict(BITS=w.bits, INT_MATH=int_math, X_INT8=x2.dtype == torch.int8, 
                X_F32=x2.dtype == torch.float32 or (interp and x2.dtype == torch.bfloat16),
                HAS_BIAS=bias is not None, HAS_SO=so is not None, INT8_OUT=out.dtype == torch.int8, WG=C.WG)
    if cfg is not None:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        fn = kern.fn if hasattr(kern, "configs") else kern
        fn[grid](*args, **meta, **cfg, **C.launch_opts())
    else:
        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), meta_["SPLIT_K"])
        kern[grid](*args, **meta, **C.launch_opts())
    return out


__all__ = ["launch", "SPLITK_MAX_M"]
