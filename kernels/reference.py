"""Torch reference of every op, on the ``kgroup8`` layout, with the checkpoint contract's numerics
(docs/checkpoint-format.md). Runs on any device; on CPU it is also the production path (``torch._int_mm``).

Quantized linear (``input_scale`` given), all float math in f32, IEEE division, round-half-even:
```
x_q[m, k] = clamp(round(x[m, k] / s_x), -128, 127)                    int8   (skipped if x is already int8)
acc[m, n] = sum_k x_q[m, k] * q[n, k]                                  int32, exact
y[m, n]   = f32(acc[m, n]) * (s_x * weight_scale[n])  (+ f32(bias[n])) f32
q_y       = clamp(round(y / s_y[n]), -128, 127)                        s_y scalar or per column [N]
out       = q_y * s_y[n]  -> out_dtype          (or q_y as int8 when int8_out=True)
```
Weight-only (``input_scale=None``, the tied lm_head): ``y = (x @ q^T) * weight_scale[n] (+ bias)`` with float
accumulation (f32 inside; a bf16/f16 ``x`` gets the matmul result rounded to its dtype before the scale), then
the same optional output requantization. Embedding: ``E[t] = q[t] * weight_scale[t]`` in f32 -> out dtype.
"""

from __future__ import annotations

import weakref
from typing import Optional, Union

import torch

from . import cpu_packed
from .layout import PackedWeight, unpack
from .scales import invalid_scales

ScaleLike = Union[torch.Tensor, float, None]


# ----------------------------------------------------------------------------------------------- validation
def _as_f32_vector(name: str, s: ScaleLike, allowed: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if isinstance(s, (int, float)):
        s = torch.tensor([float(s)], dtype=torch.float32, device=device)
    if not isinstance(s, torch.Tensor):
        raise ValueError(f"{name} must be a tensor or a float, got {type(s).__name__}")
    if not s.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor, got {s.dtype}")
    s = s.reshape(-1)
    if s.numel() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} element(s), got {s.numel()}")
    if s.device != device:
        s = s.to(device)
    return s.to(torch.float32).contiguous()


def check_scale_values(name: str, s: torch.Tensor | float) -> None:
    """Raise ValueError unless ``s`` obeys ``kernels.scales``' rule: every element finite and > 0; an empty tensor
    passes (syncs on CUDA: call at load time)."""
    if invalid_scales(s):
        raise ValueError(f"{name} must be finite and > 0 (0 = uncalibrated is invalid in our checkpoints)")


_CHECKED: dict[int, tuple[weakref.ref, int]] = {}


def _check_cached(name: str, orig: ScaleLike, s: torch.Tensor) -> None:
    """``check_scale_values`` once per (tensor object, in-place version): per-call checks cost ~nothing for the
    persistent scale tensors of a model; Python floats are checked without tensor ops."""
    if isinstance(orig, (int, float)):
        return check_scale_values(name, orig)
    hit = _CHECKED.get(id(orig))
    if hit is not None and hit[0]() is orig and hit[1] == orig._version:
        return
    check_scale_values(name, s)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[id(orig)] = (weakref.ref(orig), orig._version)


def normalize_args(
    x: torch.Tensor,
    w: PackedWeight,
    weight_scale: torch.Tensor,
    input_scale: ScaleLike,
    output_scale: ScaleLike,
    bias: Optional[torch.Tensor],
    int8_out: bool,
    check_values: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Shared argument checks of reference and Triton ``linear``: returns f32 ``(weight_scale [N],
    input_scale [1] | None, output_scale [1]|[N] | None, bias f32 [N] | None)``."""
    if not isinstance(w, PackedWeight):
        raise ValueError(f"w must be a PackedWeight, got {type(w).__name__}")
    n, k = w.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K={k}], got {list(x.shape)}")
    if x.device != w.device:
        raise ValueError(f"x on {x.device} but weight on {w.device}")
    dev = x.device
    ws = _as_f32_vector("weight_scale", weight_scale, (n,), dev)
    si = None if input_scale is None else _as_f32_vector("input_scale", input_scale, (1,), dev)
    so = None if output_scale is None else _as_f32_vector("output_scale", output_scale, (1, n), dev)
    if x.dtype == torch.int8:
        if si is None:
            raise ValueError("an int8 x needs its input_scale (it is the quantized input)")
    elif x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32/bfloat16/float16 or int8, got {x.dtype}")
    if int8_out and so is None:
        raise ValueError("int8_out=True needs an output_scale")
    b = None
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"bias must have N={n} elements, got {list(bias.shape)}")
        b = bias.reshape(-1).to(device=dev, dtype=torch.float32).contiguous()
    if check_values:
        for name, orig, s in (("weight_scale", weight_scale, ws), ("input_scale", input_scale, si),
                              ("output_scale", output_scale, so)):
            if s is not None:
                _check_cached(name, orig, s)
    return ws, si, so, b


def resolve_out_dtype(x: torch.Tensor, out_dtype: Optional[torch.dtype], int8_out: bool) -> torch.dtype:
    if int8_out:
        return torch.int8
    if out_dtype is not None:
        if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype must be float32/bfloat16/float16, got {out_dtype}")
        return out_dtype
    return torch.bfloat16 if x.dtype == torch.int8 else x.dtype


# ----------------------------------------------------------------------------------------------------- ops
def quantize_int8(x: torch.Tensor, scale: ScaleLike) -> torch.Tensor:
    """``clamp(round_half_even(f32(x) / f32(scale)), -128, 127)`` as int8 (IEEE f32 division)."""
    s = _as_f32_vector("scale", scale, (1,), x.device)
    q = torch.div(x, s) if x.dtype != torch.float64 else torch.div(x.to(torch.float32), s)  # f32 (promotion)
    return q.round_().clamp_(-128, 127).to(torch.int8)


def int_matmul(xq: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact ``xq[M, K] @ codes[N, K]^T`` as int32 (``torch._int_mm`` on CPU, exact f64 GEMM elsewhere)."""
    if xq.device.type == "cpu":
        return torch._int_mm(xq.contiguous(), codes.t())
    # |acc| < 2^31 << 2^53: f64 is exact. Only used for tests / fallback on CUDA.
    return (xq.to(torch.float64) @ codes.to(torch.float64).t()).to(torch.int32)


def _codes(w: PackedWeight, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    c = w.codes if w.codes is not None else unpack(w)
    return c if c.dtype == dtype else c.to(dtype)


def epilogue(
    acc: torch.Tensor,
    col_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    output_scale: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``y = f32(acc) * col_scale (+ bias)``; optional static int8 requant with ``output_scale`` ([1] or [N]);
    ``out_dtype=torch.int8`` returns the int8 codes."""
    y = acc.to(torch.float32) if acc.dtype != torch.float32 else acc.clone()
    y.mul_(col_scale)
    if bias is not None:
        y.add_(bias)
    if output_scale is not None:
        y.div_(output_scale).round_().clamp_(-128, 127)
        if out_dtype == torch.int8:
            return y.to(torch.int8)
        y.mul_(output_scale)
    return y.to(out_dtype)


def linear(
    x: torch.Tensor,
    w: PackedWeight,
    weight_scale: torch.Tensor,
    input_scale: ScaleLike = None,
    output_scale: ScaleLike = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    int8_out: bool = False,
    check_values: bool = True,
    packed_cpu: bool = False,
) -> torch.Tensor:
    """Reference quantized linear ``x[..., K] -> [..., N]`` (numerics in the module docstring).

    ``packed_cpu=True`` (the ``packed`` backend): the products come from ``kernels.cpu_packed`` reading the packed
    codes in place -- int32-exact, so the int8 path is bitwise this function; the weight-only path accumulates in
    f32 instead of the bf16 GEMM (bound in ``cpu_packed.float_mm``).

    ``x`` float (quantized here with ``input_scale``) or int8 (already quantized at ``input_scale``).
    ``output_scale``: scalar or per-column ``[N]`` (fused qkv / gate_up shards with their own scales).
    ``int8_out=True`` returns the int8 output codes (to feed the next linear with ``input_scale=output_scale``).
    """
    ws, si, so, b = normalize_args(x, w, weight_scale, input_scale, output_scale, bias, int8_out, check_values)
    odt = resolve_out_dtype(x, out_dtype, int8_out)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.k)
    if packed_cpu and x2.dtype != torch.int8:  # one fused call (bitwise this function's int8 path)
        y = cpu_packed.linear(x2, w, ws if si is None else si * ws, si, b, so, odt)
    elif si is None:
        if x2.dtype == torch.float32 or x2.device.type != "cpu":
            acc = x2.to(torch.float32) @ _codes(w, torch.float32).t()
        else:
            acc = x2 @ _codes(w, x2.dtype).t()
        y = epilogue(acc, ws, b, so, odt)
    else:
        xq = x2 if x2.dtype == torch.int8 else quantize_int8(x2, si)
        acc = cpu_packed.int_mm(xq, w) if packed_cpu else int_matmul(xq, _codes(w, torch.int8))
        y = epilogue(acc, si * ws, b, so, odt)
    return y.reshape(*lead, w.n)


def embedding(
    ids: torch.Tensor,
    w: PackedWeight,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    check_values: bool = True,
) -> torch.Tensor:
    """Rows ``E[t, :] = f32(q[t, :]) * weight_scale[t]`` -> ``out_dtype``, shape ``[*ids.shape, K]``.
    Unpacks only the gathered rows (no table-sized temporaries)."""
    ws = check_embedding_args(ids, w, weight_scale, check_values)
    flat = ids.reshape(-1).long()
    if w.codes is not None:
        codes = w.codes[flat]
    else:
        codes = unpack(PackedWeight(w.bits, (flat.numel(), w.k), w.packed[flat])) if flat.numel() else \
            torch.empty(0, w.k, dtype=torch.int8, device=w.device)
    out = codes.to(torch.float32) * ws[flat][:, None]
    return out.to(out_dtype).reshape(*ids.shape, w.k)


def check_embedding_args(ids: torch.Tensor, w: PackedWeight, weight_scale: torch.Tensor, check_values: bool) -> torch.Tensor:
    if not isinstance(w, PackedWeight):
        raise ValueError(f"w must be a PackedWeight, got {type(w).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32/int64, got {ids.dtype}")
    if ids.device != w.device:
        raise ValueError(f"ids on {ids.device} but table on {w.device}")
    ws = _as_f32_vector("weight_scale", weight_scale, (w.n,), ids.device)
    if check_values:
        _check_cached("weight_scale", weight_scale, ws)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.n):
            raise ValueError(f"ids out of range [0, {w.n})")
    return ws


def naive_linear_f64(
    x: torch.Tensor, codes: torch.Tensor, weight_scale: torch.Tensor, input_scale: float | None,
    output_scale: torch.Tensor | float | None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Textbook float64 formula of the contract (tests only): fake-quant x, dequantized W, fake-quant y."""
    xd = x.double()
    if input_scale is not None:
        xd = torch.clamp(torch.round(xd / input_scale), -128, 127) * input_scale
    wd = codes.double() * weight_scale.double().reshape(-1, 1)
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.double()
    if output_scale is not None:
        so = torch.as_tensor(output_scale, dtype=torch.float64).reshape(-1)
        y = torch.clamp(torch.round(y / so), -128, 127) * so
    return y


__all__ = [
    "quantize_int8", "linear", "embedding", "int_matmul", "epilogue", "check_scale_values", "naive_linear_f64",
    "normalize_args", "resolve_out_dtype", "check_embedding_args",
]
