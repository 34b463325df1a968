"""The quantized paged KV cache on CPU (``cpu_kv.cpp``: AVX2 + FMA, 16 lanes with AVX-512 where built for it;
built with ``kernels.cpu_packed``'s extension):
the same functions, signatures and numerics as the torch reference in ``kernels.kvcache`` (which documents the
cache layout), without its per-request torch ops.

``write_kv_cache``: bitwise the reference (one scalar quantizer with the reference's rounding steps).
``paged_attention``: K/V dequantized exactly like the reference (``T(code * T(s))``); scores, softmax and P @ V in
f32 with 8- or 16-lane partial sums (``lanes``) instead of torch's BLAS order, ``std::exp`` / ``std::tanh`` instead
of torch's
vectorised ones - so it equals the reference up to f32 rounding before the final cast to the activation dtype
(bound in ``tests/test_cpu_kv.py``).
"""

from __future__ import annotations

import contextlib
import struct
from typing import Iterator, Optional

import torch

from . import cpu_packed
from .kvcache import ScaleLike, code_bytes

__all__ = ["available", "write_kv_cache", "paged_attention", "lanes", "eight_lanes"]


def available() -> bool:
    return cpu_packed.available()


def lanes() -> int:
    """f32 lanes of the attention kernels for a head_dim that is a multiple of 16: 16 in builds for a CPU with
    AVX-512 F / BW (unless switched off by `eight_lanes`), else 8 (head_dims that are a multiple of 8 only: 8)."""
    cpu_packed.require()
    return 16 if torch.ops.gemma_mobile.kv_zmm(-1) == 1 else 8


@contextlib.contextmanager
def eight_lanes() -> Iterator[None]:
    """Run the attention kernels 8 lanes wide (the AVX2 code) inside the block, in this process: tests of that path
    and same-process benchmarks of both widths. Not thread-safe against concurrent attention calls."""
    cpu_packed.require()
    was = torch.ops.gemma_mobile.kv_zmm(0)
    try:
        yield
    finally:
        if was >= 0:
            torch.ops.gemma_mobile.kv_zmm(was)


def _f32(scale: ScaleLike) -> float:
    """The f32 value of a scale (tensor or float) as a Python float (exact)."""
    if isinstance(scale, torch.Tensor):
        return float(scale.detach().to(torch.float32).reshape(-1)[0])
    return struct.unpack("f", struct.pack("f", float(scale)))[0]


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: ScaleLike, v_scale: ScaleLike, bits: int) -> None:
    """``kernels.kvcache.write_kv_cache`` in one C++ call (bitwise equal)."""
    cpu_packed.require()
    code_bytes(key.shape[-1], bits)  # the reference's bit / head_dim checks and messages
    torch.ops.gemma_mobile.kv_write(kv_cache.view(torch.uint8), key, value, slot_mapping, _f32(k_scale),
                                    _f32(v_scale), bits)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, k_scale: ScaleLike, v_scale: ScaleLike,
                    bits: int, scale: float, *, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, causal: bool = True,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``kernels.kvcache.paged_attention`` in one C++ call (parallel over requests x kv heads x query tiles)."""
    cpu_packed.require()
    if out is None:
        out = torch.empty_like(query)
    torch.ops.gemma_mobile.kv_paged_attention(
        query, kv_cache.view(torch.uint8), query_start_loc.cpu(), seq_lens.cpu(), block_table, _f32(k_scale),
        _f32(v_scale), bits, float(scale), int(sliding_window or 0) if (sliding_window or 0) > 0 else 0,
        float(softcap or 0.0), bool(causal), out)
    return out
