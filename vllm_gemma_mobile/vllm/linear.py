"""Linear method for wNa8o8 layers: 2/4/8-bit symmetric per-channel weights, static int8 input AND output.

Numerics (docs/checkpoint-format.md), per shard of a fused layer with its own `s_x`, `s_y`:
    x_q = clamp(round_half_even(x / s_x), -128, 127)                       int8
    acc = x_q @ q^T                                                        int32, exact
    y   = acc * (s_x * weight_scale[n]) (+ bias)                           float32
    out = clamp(round_half_even(y / s_y), -128, 127) * s_y                 float32 -> activation dtype
CPU backend, where float rounding can differ from that (and from the bf16 reference, which also rounds x/s_x,
the matmul and y/s_y in bf16): x/s_x is computed as x * (1/s_x) in f32 by vLLM's static_scaled_int8_quant,
and y/s_y as acc * s_x * (weight_scale[n] / s_y) in oneDNN's f32 epilogue (1/s_y folded into the per-channel
scale). The integer part is exact; the f32 quotients differ by at most a few ulp, which changes a rounded
int8 value only when the quotient lies within ~1e-7 relative of a .5 boundary.
Fused layers (qkv_proj, gate_up_proj) keep one input/output scale per shard (`PerTensorScaleParameter`).
Shards whose input scales are equal share one int8 quantization of x and one GEMM; otherwise each run of
equal-scale shards gets its own quantization and GEMM. Output scales become a per-column vector.

Backends (chosen once per layer in `process_weights_after_loading`, see `backend()`):
  packed   `kernels.cpu_packed` (AVX2 C++ reading the 2/4/8-bit codes in place: weights stay as small in memory
           as on disk; int32-exact, so bitwise the contract numerics) — default on x86 CPUs with AVX2.
  cpu      vLLM's oneDNN int8 GEMM (int8 codes prepacked by oneDNN, 1 byte/weight; no float weight copy) —
           CPU default only where `packed` cannot be built and vLLM's kernels are exact (AVX-512 VNNI / AMX).
  triton / torch   `kernels.plugin` (vLLM-free: load-time layout conversion, apply, TP partial sums + requant)
           over `kernels.ops.linear` on the packed weight (`kernels.layout.PackedWeight`) — default
           "triton" on CUDA; "torch" (exact reference ops, int8 codes cached) is the last CPU fallback.
  `GEMMA_MOBILE_BACKEND=packed|cpu|triton|torch` forces one (CI: triton with TRITON_INTERPRET=1).
  `packed` also goes through `kernels.plugin` (same state objects as torch, without cached codes).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

from kernels import bitpack, cpu_packed
from kernels import plugin as kplugin
from kernels.scales import invalid_scale_mask, invalid_scales
from vllm_gemma_mobile.vllm import cpu_ops

logger = init_logger("vllm.gemma_mobile.linear")  # under vllm's handlers, so it shows in engine logs

BACKENDS = ("packed", "cpu", "triton", "torch")


_WARNED_FALLBACK = False


def backend(device: torch.device | None = None) -> str:
    """`GEMMA_MOBILE_BACKEND` if set, else "triton" on CUDA; on CPU "packed" (`kernels.cpu_packed`, AVX2) where it
    builds, else "cpu" (vLLM's oneDNN int8 / WNA16 kernels) where they exist and are exact, else "torch"
    (`kernels.reference`: `torch._int_mm`, the same contract numerics, much slower; logged once)."""
    global _WARNED_FALLBACK
    forced = os.environ.get("GEMMA_MOBILE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"GEMMA_MOBILE_BACKEND={forced!r}: expected one of {BACKENDS}")
        return forced
    if device is not None and device.type == "cuda":
        return "triton"
    if device is None or device.type == "cpu":
        packed_ok, packed_why = cpu_packed.status()
        if packed_ok:
            return "packed"
        ok, why = cpu_ops.cpu_kernels_status()
        if not _WARNED_FALLBACK:
            logger.warning("gemma_mobile: packed CPU kernels unavailable (%s)%s", packed_why,
                           "; using vLLM's oneDNN int8 kernels (int8 codes in memory)" if ok else
                           f"; {why}; using the exact torch reference ops (torch._int_mm int8 GEMMs, int8 weight "
                           "codes in memory; the tied lm_head table as exact bf16 codes): same numerics, slower")
            _WARNED_FALLBACK = True
        return "cpu" if ok else "torch"
    return "triton"


@register_weight_loader_v2_supported_method
class GemmaMobileLinearMethod(LinearMethodBase):
    """wNa8o8 linear (see module docstring). `bits` in {2, 4, 8}."""

    def __init__(self, bits: int, has_output_scale: bool = True):
        if bits not in bitpack.SUPPORTED_BITS:
            raise ValueError(f"gemma_mobile linear: unsupported weight bits {bits}")
        self.bits = bits
        self.pack_factor = 32 // bits
        self.has_output_scale = has_output_scale

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        weight_loader = extra_weight_attrs["weight_loader"]
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        if k % self.pack_factor and input_size != input_size_per_partition:
            raise ValueError(f"gemma_mobile: row-parallel partition K={k} is not a multiple of the "
                             f"{self.bits}-bit pack factor {self.pack_factor}")
        layer.gm_k = k
        layer.gm_shards = list(output_partition_sizes)
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=self.pack_factor,
            weight_loader=weight_loader,
            data=torch.empty(n, -(-k * self.bits // 32), dtype=torch.int32)))
        # float32 so that f32 checkpoint scales are not rounded to bf16 on load
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
            output_dim=0, weight_loader=weight_loader, data=torch.empty(n, 1, dtype=torch.float32)))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            data=torch.zeros(2, dtype=torch.int64), weight_loader=weight_loader))
        names = ["input_scale"] + (["output_scale"] if self.has_output_scale else [])
        for name in names:
            # one slot per shard; NaN marks "not loaded" so that a missing scale fails loudly
            layer.register_parameter(name, PerTensorScaleParameter(
                data=torch.full((len(output_partition_sizes),), float("nan"), dtype=torch.float32),
                weight_loader=weight_loader))

    # ------------------------------------------------------------------ load-time conversion
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        prefix = getattr(layer, "prefix", None) or layer.__class__.__name__
        k, shards = layer.gm_k, layer.gm_shards
        s_x = layer.input_scale.data.clone()
        s_y = layer.output_scale.data.clone() if self.has_output_scale else None
        for name, s in (("input_scale", s_x), ("output_scale", s_y)):
            if s is None:
                continue
            bad = invalid_scale_mask(s)
            if bad.any():
                i = int(bad.nonzero()[0])
                raise ValueError(f"gemma_mobile: {prefix}.{name}[shard {i}] = {float(s[i])} (missing, zero, "
                                 "negative or non-finite); static activation scales must be positive")
        ws = layer.weight_scale.data.reshape(-1).to(torch.float32)
        if invalid_scales(ws):
            raise ValueError(f"gemma_mobile: {prefix}.weight_scale has zero/negative/non-finite entries")
        self.backend = backend(layer.weight_packed.device)
        layer.gm_backend = self.backend
        # Row-parallel under TP: the output requantization must see the all-reduced sum, so this method
        # reduces the float32 partial sums itself and the layer must not reduce again.
        layer.gm_allreduce = bool(getattr(layer, "tp_size", 1) > 1 and getattr(layer, "input_is_parallel", False)
                                  and getattr(layer, "reduce_results", False) and s_y is not None)
        if layer.gm_allreduce:
            layer.reduce_results = False
        if self.backend == "cpu":
            col_scale = kplugin.output_column_scale(s_y, shards)
            layer.gm_groups = kplugin.input_scale_groups(s_x, shards)
            layer.gm_output_scale = col_scale
            codes = cpu_ops.unpack_codes(layer.weight_packed.data, self.bits, k)
            # fold 1/s_y into the GEMM's per-channel scales: the epilogue yields y / s_y directly
            inv = None if col_scale is None else (1.0 / col_scale.expand(sum(shards)))
            eff = ws if inv is None else ws * inv
            layer.gm_inv_out = inv
            layer.gm_gemms = [cpu_ops.OneDNNInt8GEMM(codes[a:b], eff[a:b], sx) for a, b, sx in layer.gm_groups]
            del codes
        else:
            # the tensor work of the triton / torch backends is vLLM-free (kernels.plugin), run by the GPU check
            layer.gm_state = kplugin.prepare_linear(layer.weight_packed.data, ws, s_x, s_y, shards, k, self.bits,
                                                    self.backend)
        # the original packed tensor is no longer needed (cpu: oneDNN holds the int8 codes; other backends
        # hold PackedWeight objects built from it)
        for name in ("weight_packed", "weight_scale", "weight_shape", "input_scale", "output_scale"):
            if hasattr(layer, name):
                delattr(layer, name)

    # ------------------------------------------------------------------ forward
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.gm_backend == "cpu":
            ys = []
            for gemm in layer.gm_gemms:
                ys.append(gemm(gemm.quantize_input(x2)))
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
            if layer.gm_allreduce:
                from vllm.distributed import tensor_model_parallel_all_reduce

                y = tensor_model_parallel_all_reduce(y)
                bias = getattr(layer, "bias", None) if not layer.skip_bias_add else None  # every rank, once
            if layer.gm_output_scale is not None:
                if bias is not None:
                    y += bias.to(torch.float32) * layer.gm_inv_out
                out = cpu_ops.requant_scaled_int8(y, layer.gm_output_scale, x.dtype)
            else:
                if bias is not None:
                    y += bias.to(torch.float32)
                out = y.to(x.dtype)
        elif layer.gm_allreduce:
            # row-parallel under TP: f32 partial sums (no output requant), all-reduced, then bias and the
            # static output requant once on the full sum
            from vllm.distributed import tensor_model_parallel_all_reduce

            y = tensor_model_parallel_all_reduce(kplugin.linear_partial(layer.gm_state, x2))
            bias = getattr(layer, "bias", None) if not layer.skip_bias_add else None  # every rank, once
            out = kplugin.linear_finish(layer.gm_state, y, bias, x.dtype)
        else:
            out = kplugin.linear_apply(layer.gm_state, x2, bias)
        return out.reshape(*shape[:-1], out.shape[-1])
