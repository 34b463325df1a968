"""Pieces shared by the Triton kernel families: mode detection, jit helpers, split-K workspace, launch options.

Kernels are built lazily by a factory per mode (``interpret()``: ``TRITON_INTERPRET=1`` read at *launch* time,
not at import), so importing this package never decides the mode and CPU tests can switch the interpreter on
for themselves only. Under the interpreter each kernel runs one fixed config (no autotuning).

The kernels avoid the ``@jit`` functions of ``triton.language.standard`` (``tl.sum``, ``tl.cdiv``, ``tl.zeros``):
those are decorated when triton is *imported*, so in a process that imported triton before setting
``TRITON_INTERPRET=1`` they cannot run in the interpreter. ``tl.reduce(x, axis, tl.standard._sum_combine)`` is
exactly what ``tl.sum`` compiles to, and the interpreter short-cuts it to ``np.sum``.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import triton
import triton.language as tl

from .layout import WORDS_PER_GROUP


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_dp4a() -> bool:
    """GEMV integer path: PTX dp4a on a GPU (env ``GEMMA_MOBILE_DP4A=0``: portable integer ops instead)."""
    return not interpret() and os.environ.get("GEMMA_MOBILE_DP4A", "1") != "0"


def next_pow2(v: int) -> int:
    return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def launch_opts(exact_epilogue: bool = True) -> dict:
    """Compile options for real GPUs. Integer path: no mul+add -> FMA contraction, so the f32 epilogue rounds
    exactly like the torch reference (each op IEEE round-to-nearest). Weight-only float path (tolerance-based
    anyway): FMA allowed, one instruction per multiply-accumulate."""
    return {} if interpret() else {"enable_fp_fusion": not exact_epilogue}


# ------------------------------------------------------------------ jit helpers (raw; jitted per mode below)
def rne_clamp_i8(v):
    """f32 -> f32 integral value clamp(round_half_even(v), -128, 127) (clamp first: same result)."""
    v = tl.minimum(tl.maximum(v, -128.0), 127.0)
    f = tl.floor(v)
    d = v - f  # exact for |v| <= 128
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)

def load_x_int8(x_ptrs, mask, s_x, X_INT8: tl.constexpr):
    """Load an activation tile; quantize floats with the static scale (IEEE division, RNE, clamp)."""
    if X_INT8:
        xq = tl.load(x_ptrs, mask=mask, other=0)
    else:
        xf = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        xq = rne_clamp_i8(tl.math.div_rn(xf, s_x)).to(tl.int8)
    return xq

def dp4a(a, b, c, USE_ASM: tl.constexpr):
    """``c + sum_i u8(byte_i(a)) * s8(byte_i(b))`` (int32): PTX ``dp4a.u32.s32`` on the GPU (4 int8 MACs in one
    instruction), the same in plain integer ops otherwise (interpreter)."""
    if USE_ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return r


def field_to_float(words, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Signed code of field SHIFT as exact f32 via the 2^23 magic (no int->float convert)."""
    f = ((words >> SHIFT) & ((1 << BITS) - 1)) | 0x4B000000
    return f.to(tl.float32, bitcast=True) - (8388608.0 + (1 << (BITS - 1)))

def round_bf16(y):
    """f32 -> f32 holding the round-to-nearest-even bf16 value (finite y), via integer ops; the final
    ``.to(bfloat16)`` is then exact. Same result as ``cvt.rn.bf16.f32``, and also right under the interpreter
    (whose f32->bf16 conversion truncates)."""
    b = y.to(tl.int32, bitcast=True)
    b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
    return b.to(tl.float32, bitcast=True)


def store_float(ptrs, y, mask):
    """Store f32 ``y`` converting round-to-nearest-even to the pointer's float type."""
    if ptrs.dtype.element_ty == tl.float32:
        tl.store(ptrs, y, mask=mask)
    elif ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, round_bf16(y).to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptrs, y.to(ptrs.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def epilogue(acc, col_scale, offs_m, offs_n, mask_mn, n_mask, bias_ptr, so_ptr, so_stride, out_ptr, stride_om,
             HAS_BIAS: tl.constexpr, HAS_SO: tl.constexpr, INT8_OUT: tl.constexpr):
    """y = f32(acc) * col_scale[n] (+ bias[n]); optional static requant with so[n * so_stride]; store."""
    y = acc.to(tl.float32) * col_scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if HAS_SO:
        so = tl.load(so_ptr + offs_n * so_stride, mask=n_mask, other=1.0)[None, :]
        q = rne_clamp_i8(tl.math.div_rn(y, so))
        if INT8_OUT:
            tl.store(out_ptrs, q.to(tl.int8), mask=mask_mn)
        else:
            store_float(out_ptrs, q * so, mask_mn)
    else:
        store_float(out_ptrs, y, mask_mn)

def finish(acc, col_scale, offs_m, offs_n, mask_mn, n_mask, tile_id, ws_ptr, cnt_ptr, N,
           bias_ptr, so_ptr, so_stride, out_ptr, stride_om,
           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SO: tl.constexpr, INT8_OUT: tl.constexpr):
    """Split-K serial fix-up: every K-slice atomically adds its exact int32 partial into a zeroed [M, N]
    workspace and bumps the tile's counter; the last one reads the total, resets workspace and counter to 0
    (self-cleaning: no memset launch) and runs the epilogue. Integer adds: order-independent, exact."""
    if SPLIT_K == 1:
        epilogue(acc, col_scale, offs_m, offs_n, mask_mn, n_mask, bias_ptr, so_ptr, so_stride, out_ptr,
                 stride_om, HAS_BIAS, HAS_SO, INT8_OUT)
    else:
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask_mn, sem="release")
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.atomic_xchg(ws_ptrs, tl.full(acc.shape, 0, acc.dtype), mask=mask_mn, sem="acquire")
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
            epilogue(total, col_scale, offs_m, offs_n, mask_mn, n_mask, bias_ptr, so_ptr, so_stride, out_ptr,
                     stride_om, HAS_BIAS, HAS_SO, INT8_OUT)


_HELPERS = (rne_clamp_i8, round_bf16, load_x_int8, dp4a, field_to_float, store_float, epilogue, finish)


def _rebind(fn, g: dict):
    """Same code, other globals: lets one source be jitted once per mode with that mode's helpers."""
    f = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    f.__module__, f.__qualname__, f.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    # FunctionType() drops the annotations; triton <= 3.6 finds `tl.constexpr` parameters through them
    # (inspect.signature), so without this copy every constexpr became a runtime argument on a real GPU.
    f.__annotations__ = dict(fn.__annotations__)
    f.__kwdefaults__ = fn.__kwdefaults__
    return f


@functools.cache
def helpers(interpret_mode: bool) -> dict:  # noqa: ARG001 - the flag keys the cache
    """The helpers jitted under the current mode, calling each other (shared globals)."""
    g = dict(globals())
    out = {fn.__name__: triton.jit(_rebind(fn, g)) for fn in _HELPERS}
    g.update(out)
    return out


def jit_kernel(fn, interpret_mode: bool):
    """``triton.jit`` of kernel ``fn`` whose helper calls resolve to this mode's jitted helpers."""
    g = dict(fn.__globals__)
    g.update(helpers(interpret_mode))
    return triton.jit(_rebind(fn, g))


_WORKSPACES: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def splitk_workspace(device: torch.device, m: int, n: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int32 workspace (>= m*n) and tile counters (>= tiles) per device; kept zero by the kernels.
    Not safe for two split-K launches running concurrently on different streams of one device."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < m * n or cnt.numel() < tiles:
        size = max(m * n, 1 << 16, 0 if ws is None else ws.numel())
        ntiles = max(tiles, 1 << 12, 0 if cnt is None else cnt.numel())
        ws = torch.zeros(size, dtype=torch.int32, device=device)
        cnt = torch.zeros(ntiles, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return ws, cnt


def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(1, dtype=dtype, device=device)


WG = WORDS_PER_GROUP
