"""Public dispatch API (what the vLLM plugin calls). vLLM-free; Triton is imported only when used.

Backend choice: ``backend`` argument, else env ``GEMMA_MOBILE_BACKEND`` (``triton`` | ``torch`` | ``packed``), else
by device: CUDA -> Triton (``gemv`` for ``M <= gemv_max_m(N)``, ``gemm`` above), CPU -> torch
reference (``torch._int_mm``). ``packed``: the reference's numerics with the products computed by
``kernels.cpu_packed`` (AVX2 C++ over the packed codes, CPU). Forcing ``triton`` on CPU needs ``TRITON_INTERPRET=1``.

Numerics (every backend): see ``kernels.reference`` -- int8 x int-b exact int32, f32 epilogue, round-half-even,
static per-tensor input scale, scalar or per-column ``[N]`` output scale.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import torch

from . import reference
from .layout import PackedWeight
from .reference import ScaleLike

BACKENDS = ("triton", "torch", "packed")
MAX_K = 65536  # int32 accumulation bound: 8-bit fields 255*128*K + offset term stay < 2^31


def gemv_max_m(n: int = 0) -> int:
    """Largest M sent to the GEMV for an N-row weight: env ``GEMMA_MOBILE_GEMV_MAX_M`` if set, else 16 for
    N <= 16384 and 4 above. Measured on an H200 (kernels/README.md, ``kernels.bench`` + ``kernels.tune``): at
    M=16 the GEMV (4-row blocks, each re-reading the weights) beat the autotuned tensor-core GEMM on every E2B/E4B
    linear with N <= 16384 (10-29 us vs 15-37 us), tied or lost above (gate_up_2x, e4b.gate_up, the lm_head)."""
    env = os.environ.get("GEMMA_MOBILE_GEMV_MAX_M")
    if env:
        return int(env)
    return 16 if n <= 16384 else 4


def select_backend(device: torch.device, backend: Optional[str] = None) -> str:
    b = backend or os.environ.get("GEMMA_MOBILE_BACKEND") or None
    if b is None:
        return "triton" if device.type == "cuda" else "torch"
    if b not in BACKENDS:
        raise ValueError(f"unknown backend {b!r}: expected one of {BACKENDS}")
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    if b == "triton" and device.type != "cuda" and not interp:
        raise ValueError("backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1")
    if b == "packed" and device.type != "cpu":
        raise ValueError(f"backend 'packed' runs on CPU tensors only, got {device}")
    return b


def linear(
    x: torch.Tensor,
    w: PackedWeight,
    weight_scale: torch.Tensor,
    input_scale: ScaleLike = None,
    output_scale: ScaleLike = None,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    int8_out: bool = False,
    kernel: Optional[str] = None,
    config: Optional[dict] = None,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Quantized linear ``x[..., K] @ (q * weight_scale)^T -> [..., N]`` (wNa8o8 contract numerics).

    - ``input_scale`` (scalar tensor/float): x (bf16/f16/f32) is quantized to int8 with it, or x is already int8
      at that scale. ``None``: weight-only float path (the tied lm_head).
    - ``output_scale``: ``None`` (float out), a scalar, or a per-column ``[N]`` vector (fused qkv / gate_up
      whose shards carry different static output scales: expand each shard's scalar over its columns).
    - ``int8_out=True``: return the int8 output codes (feed them to the next linear with
      ``input_scale=output_scale``). ``out_dtype`` defaults to x's dtype (bf16 for an int8 x).
    - ``kernel`` (``"gemv"``/``"gemm"``) and ``config`` (fixed Triton meta-parameters) are for tests/benches.
    Scale *values* (finite, > 0) are checked on CPU unless ``check_values=False`` (callers that validated them once
    at load, like the vLLM plugin: the per-call check is data-dependent and cannot be traced by torch.compile);
    on CUDA check them once at load (``check_scale_values``).
    """
    be = select_backend(x.device, backend)
    check = x.device.type == "cpu" if check_values is None else check_values
    if be in ("torch", "packed"):
        return reference.linear(x, w, weight_scale, input_scale, output_scale, bias, out_dtype, int8_out, check,
                                packed_cpu=be == "packed")
    ws, si, so, b = reference.normalize_args(x, w, weight_scale, input_scale, output_scale, bias, int8_out, check)
    if w.k > MAX_K:
        raise ValueError(f"K={w.k} > {MAX_K}: int32 accumulation could overflow")
    odt = reference.resolve_out_dtype(x, out_dtype, int8_out)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < w.k):
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, w.n, dtype=odt, device=x.device)
    if m > 0:
        which = kernel or ("gemv" if m <= gemv_max_m(w.n) else "gemm")
        if which == "gemv":
            from . import gemv as mod
        elif which == "gemm":
            from . import gemm as mod  # type: ignore[no-redef]
        else:
            raise ValueError(f"unknown kernel {kernel!r}")
        mod.launch(x2, w, ws, si, so, b, out, config)
    return out.reshape(*lead, w.n)


def embedding(
    ids: torch.Tensor,
    w: PackedWeight,
    weight_scale: torch.Tensor,
    backend: Optional[str] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Quantized embedding rows ``E[t] = q[t] * weight_scale[t]`` -> ``[*ids.shape, K]`` in ``out_dtype``
    (Gemma's ``* sqrt(hidden)`` stays in the model code)."""
    be = select_backend(ids.device, backend)
    check = ids.device.type == "cpu" if check_values is None else check_values
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    if be in ("torch", "packed"):  # packed: rows unpacked from the packed table (no codes cached)
        return reference.embedding(ids, w, weight_scale, out_dtype, check)
    ws = reference.check_embedding_args(ids, w, weight_scale, check)
    out = torch.empty(ids.numel(), w.k, dtype=out_dtype, device=ids.device)
    _embedding_kernels().launch(ids, w, ws, out)
    return out.reshape(*ids.shape, w.k)


def _embedding_kernels():
    """The ``kernels/embedding.py`` module. Importing a submodule sets the package attribute of the same name,
    which would shadow the public ``kernels.embedding`` function: put the function back."""
    mod = importlib.import_module(__package__ + ".embedding")
    pkg = sys.modules[__package__]
    if getattr(pkg, "embedding", None) is mod:
        pkg.embedding = embedding
    return mod


def quantize_int8(x: torch.Tensor, scale: ScaleLike) -> torch.Tensor:
    """``clamp(round_half_even(x / scale), -128, 127)`` as int8 (f32, IEEE division)."""
    return reference.quantize_int8(x, scale)


def check_scale_values(name: str, s: torch.Tensor | float) -> None:
    """Load-time check: every element finite and > 0 (``kernels.scales``), else ValueError."""
    reference.check_scale_values(name, s)


__all__ = ["linear", "embedding", "quantize_int8", "check_scale_values", "select_backend", "BACKENDS"]
