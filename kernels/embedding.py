"""2/4/8-bit embedding row gather (Triton) with one f32 scale per row: ``E[t, k] = f32(q[t, k]) * scale[t]``.

One program per (token, BLOCK_K slice): the row's int32 words are contiguous (``kgroup8``), each output element
reads its word (repeated words hit L1) and extracts its field with a per-element shift. Output in bf16/f16/f32.
The tied lm_head (``logits = h @ E^T``, weight-only, float) reuses the same table through ``gemv`` / ``gemm``
with ``input_scale=None`` (see ``ops.linear``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import store_float  # raw; rebound per mode
from .layout import PackedWeight


def embedding_kernel(ids_ptr, w_ptr, scale_ptr, out_ptr, K, KW,
                     BITS: tl.constexpr, BLOCK_K: tl.constexpr, WG: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    GK: tl.constexpr = PACK * WG
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tok = tl.load(ids_ptr + pid).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    word = (offs_k // GK) * WG + (offs_k % WG)
    shift = ((offs_k % GK) // WG) * BITS
    words = tl.load(w_ptr + tok * KW + word, mask=kmask, other=0)
    q = ((words >> shift) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
    s = tl.load(scale_ptr + tok)
    store_float(out_ptr + pid.to(tl.int64) * K + offs_k, q.to(tl.float32) * s, kmask)


@functools.cache
def _build(interpret_mode: bool):
    return C.jit_kernel(embedding_kernel, interpret_mode)


def launch(ids: torch.Tensor, w: PackedWeight, ws: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gather rows ``ids`` (flattened, int32/int64, in range) into ``out`` ``[T, K]``."""
    t = ids.numel()
    if t == 0:
        return out
    k, kw = w.k, w.packed.shape[1]
    block_k = 64 if C.interpret() else min(1024, C.next_pow2(k))
    grid = (t, triton.cdiv(k, block_k))
    _build(C.interpret())[grid](ids.reshape(-1).contiguous(), w.packed, ws, out, k, kw,
                                BITS=w.bits, BLOCK_K=block_k, WG=C.WG)
    return out


__all__ = ["launch"]
