"""Straight-through fake quantization of exactly the served numerics, with learned (LSQ) scales.

Forward values are those of the contract (docs/checkpoint-format.md, `kernels.reference`), computed in f32:
    x_q = clamp(round_half_even(x / s_x), -128, 127)                  (x / s_x: IEEE f32 division)
    w_q = clamp(round_half_even(W / s_w[n]), -2^(b-1), 2^(b-1) - 1)
    acc = x_q @ w_q^T                       f32 holding an exact integer while |acc| < 2^24 (checked: K * 128 * 2^(b-1))
    y   = acc * (s_x * s_w[n]) (+ bias)     the reference's f32 epilogue, same operation order
    out = clamp(round_half_even(y / s_y), -128, 127) * s_y
so for a bf16 `x` and the exported codes/scales, `QATLinear` equals `kernels.reference.linear(..., out_dtype=f32)`
bit for bit (tests/test_qat.py). Backward: round is the identity (straight-through estimator); the clamp passes
no gradient to its input outside the range, and the scales get LSQ's gradient (Esser et al. 2020) scaled by
1 / sqrt(numel * q_max) so all scales learn at a comparable rate.
"""

from __future__ import annotations

import math

import torch

from kernels import bitpack
from kernels.scales import invalid_scales


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """round_half_even(v) forward (exactly: `+ 0`), identity backward."""
    return torch.round(v.detach()) + (v - v.detach())


def grad_scale(s: torch.Tensor, g: float) -> torch.Tensor:
    """s forward (exactly), gradient multiplied by g backward (LSQ's step-size gradient scale)."""
    return s.detach() + (s * g - (s * g).detach())


def quant_ste(x: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integer-valued f32 codes clamp(round(x / s), lo, hi) with the straight-through estimator."""
    return torch.clamp(round_ste(x / s), lo, hi)


def lsq_gscale(numel: int, qmax: int) -> float:
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


class StaticInt8(torch.nn.Module):
    """Learned static per-tensor int8 activation quant-dequant (`clamp(round(x / s), -128, 127) * s`)."""

    def __init__(self, scale: float):
        super().__init__()
        if invalid_scales(scale):
            raise ValueError(f"static activation scale must be finite and > 0, got {scale}")
        # learned as a multiplier of the initial scale (Adam's steps are then relative: lr 0.01 = ~1 % per step);
        # scale0 * 1.0 == scale0 exactly, so the first forward is the initial model bit for bit
        self.register_buffer("scale0", torch.tensor(float(scale), dtype=torch.float32))
        self.rel = torch.nn.Parameter(torch.ones((), dtype=torch.float32))

    @property
    def scale(self) -> torch.Tensor:
        return self.scale0 * self.rel

    def codes(self, x: torch.Tensor, per_sample: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued f32 codes of x, the scale with LSQ's gradient scaling). `per_sample`: the elements per
        sample in LSQ's gradient scale (default x.numel() // x.shape[0]; a caller that feeds a chunk of a batch
        passes the whole batch's figure so the scale learns as if the batch came in one piece)."""
        s = grad_scale(self.scale, lsq_gscale(per_sample or x.numel() // max(x.shape[0], 1), 127))
        return quant_ste(x.float(), s, -128, 127), s

    def forward(self, x: torch.Tensor, per_sample: int | None = None) -> torch.Tensor:
        q, s = self.codes(x, per_sample)
        return q * s


class QATLinear(torch.nn.Module):
    """wNa8o8 linear with latent f32 weights and learned weight / input / output scales (see module docstring)."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bits: int, input_scale: float,
                 output_scale: float | None, bias: torch.Tensor | None = None):
        super().__init__()
        bitpack.check_bits(bits)
        self.bits = bits
        self.lo, self.hi = bitpack.code_range(bits)
        n, k = weight.shape
        if k * 128 * (1 << (bits - 1)) >= 2 ** 24:
            raise ValueError(f"K={k} at {bits} bits: the f32 accumulator would no longer be exact")
        self.weight = torch.nn.Parameter(weight.detach().float().clone())
        self.register_buffer("weight_scale0", weight_scale.detach().float().reshape(n, 1).clone())
        self.weight_rel = torch.nn.Parameter(torch.ones(n, 1, dtype=torch.float32))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone())
        self.inp = StaticInt8(input_scale)
        self.out = None if output_scale is None else StaticInt8(output_scale)

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.weight_scale0 * self.weight_rel

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued f32 weight codes, per-row scales with LSQ's gradient scaling)."""
        s = grad_scale(self.weight_scale, lsq_gscale(self.weight.shape[1], self.hi))
        return quant_ste(self.weight, s, self.lo, self.hi), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, sx = self.inp.codes(x)
        wq, sw = self.weight_codes()
        acc = torch.nn.functional.linear(xq, wq)
        y = acc * (sx * sw.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y if self.out is None else self.out(y)

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (our compressed-tensors layout): codes packed to int32, bf16 scales."""
        codes = torch.clamp(torch.round(self.weight / self.weight_scale), self.lo, self.hi).to(torch.int8)
        out = {"weight_packed": bitpack.ct_pack(codes, self.bits),
               "weight_scale": self.weight_scale.detach().to(torch.bfloat16),
               "weight_shape": torch.tensor(list(self.weight.shape), dtype=torch.int64),
               "input_scale": self.inp.scale.detach().reshape(1).to(torch.bfloat16)}
        if self.out is not None:
            out["output_scale"] = self.out.scale.detach().reshape(1).to(torch.bfloat16)
        return out


class _FrozenCodesMatmul(torch.autograd.Function):
    """`hq @ wq^T` for integer-valued f32 `hq` [M, K] and frozen int8 codes `wq` [N, K] on the CPU: forward through
    `torch._int_mm` (int8 x int8 -> int32: the same exact integers the f32 GEMM holds while |acc| < 2^24, and what
    the served int32 accumulator holds beyond; ~3.4x faster than the f32 GEMM for the 270M lm_head chunk [128, 640]
    x [640, 262144] on the Zen 5 VM: 0.085 vs 0.29 s), backward `grad @ wq` in f32 as F.linear's (the codes get no
    gradient)."""

    @staticmethod
    def forward(ctx, hq: torch.Tensor, w8: torch.Tensor, wf: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(wf)
        flat = hq.detach().reshape(-1, hq.shape[-1]).to(torch.int8)
        return torch._int_mm(flat, w8.t()).float().reshape(*hq.shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (wf,) = ctx.saved_tensors
        return grad @ wf, None, None


class QATTable(torch.nn.Module):
    """The tied b-bit table (one scale per vocab row), fake-quantized once per use and read by the embedding
    gather (`embed`) and by the lm_head (`head`), whose optional static int8 input / output quant is learned too."""

    def __init__(self, weight: torch.Tensor, row_scale: torch.Tensor, bits: int,
                 head_input_scale: float | None, head_output_scale: float | None, trainable: bool = True):
        super().__init__()
        self.trainable = trainable  # False: codes and row scales fixed (fake-quantized once, cached)
        self.bits = bits
        self.lo, self.hi = bitpack.code_range(bits)
        self.latent = torch.nn.Parameter(weight.detach().float().clone())
        self.register_buffer("row_scale0", row_scale.detach().float().reshape(-1, 1).clone())
        self.row_rel = torch.nn.Parameter(torch.ones_like(self.row_scale0))
        self.head_in = None if head_input_scale is None else StaticInt8(head_input_scale)
        self.head_out = None if head_output_scale is None else StaticInt8(head_output_scale)
        if not trainable:
            self.latent.requires_grad_(False)
            self.row_rel.requires_grad_(False)
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None
        self._frozen_int8: torch.Tensor | None = None  # the frozen codes as int8, for `_FrozenCodesMatmul`

    @property
    def row_scale(self) -> torch.Tensor:
        return self.row_scale0 * self.row_rel

    def _apply(self, fn, *args, **kwargs):  # `.to(device)` / `.cpu()`: the frozen cache is rebuilt where the table is
        self._frozen = self._frozen_int8 = None
        return super()._apply(fn, *args, **kwargs)

    def _codes_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integer-valued f32 codes [V, K], row scales [V, 1]); computed once when the table is frozen."""
        if not self.trainable:
            if self._frozen is None:
                with torch.no_grad():
                    s = self.row_scale
                    self._frozen = (quant_ste(self.latent, s, self.lo, self.hi), s)
            return self._frozen
        s = grad_scale(self.row_scale, lsq_gscale(self.latent.shape[1], self.hi))
        return quant_ste(self.latent, s, self.lo, self.hi), s

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the fake-quantized table (gathering before quantizing: same values, far less work)."""
        flat = ids.reshape(-1)
        if not self.trainable:
            q, s = self._codes_scale()
            return (q.index_select(0, flat) * s.index_select(0, flat)).reshape(*ids.shape, -1)
        lat = self.latent.index_select(0, flat)
        s = grad_scale(self.row_scale, lsq_gscale(self.latent.shape[1], self.hi)).index_select(0, flat)
        return (quant_ste(lat, s, self.lo, self.hi) * s).reshape(*ids.shape, -1)

    def head(self, h: torch.Tensor, tokens_per_sample: int | None = None) -> torch.Tensor:
        """With a static input scale: the integer path of `QATLinear` (exact int acc in f32, then
        `acc * (s_x * row_scale)`), i.e. the served int8-activation lm_head; else weight-only float.
        `tokens_per_sample`: for `h` a chunk of a batch's tokens, the batch's tokens per sequence (LSQ's gradient
        scale of the head's input / output scales is then the whole batch's, see `StaticInt8.codes`)."""
        wq, s = self._codes_scale()
        per = None if tokens_per_sample is None else tokens_per_sample * h.shape[-1]
        if self.head_in is not None:
            hq, sx = self.head_in.codes(h, per)
            if not self.trainable and wq.device.type == "cpu":
                if self._frozen_int8 is None:
                    self._frozen_int8 = wq.to(torch.int8)
                acc = _FrozenCodesMatmul.apply(hq, self._frozen_int8, wq)
            else:
                acc = torch.nn.functional.linear(hq, wq)
            logits = acc * (sx * s.reshape(-1))
        else:
            logits = torch.nn.functional.linear(h.float(), wq * s)
        if self.head_out is None:
            return logits
        return self.head_out(logits, None if tokens_per_sample is None else tokens_per_sample * logits.shape[-1])

    @torch.no_grad()
    def export(self) -> dict[str, torch.Tensor]:
        codes = torch.clamp(torch.round(self.latent / self.row_scale), self.lo, self.hi).to(torch.int8)
        return {"weight_packed": bitpack.ct_pack(codes, self.bits),
                "weight_scale": self.row_scale.detach().to(torch.bfloat16),
                "weight_shape": torch.tensor(list(self.latent.shape), dtype=torch.int64)}


def kv_fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The served KV numerics (`kernels.kvcache.fake_quant_kv`, in x's dtype) forward, identity backward."""
    from kernels.kvcache import fake_quant_kv

    return fake_quant_kv(x.detach(), scale, bits) + (x - x.detach())
