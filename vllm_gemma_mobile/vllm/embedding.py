"""Quantized embedding table that also serves the tied lm_head, from ONE copy in memory.

Numerics (docs/checkpoint-format.md):
    embedding:  E[t, :] = q[t, :] * weight_scale[t]   (float32 product, cast once to the activation dtype)
                Gemma's sqrt(hidden_size) normalizer is applied by vLLM's Gemma3Model.embed_input_ids, not here.
    lm_head:    logits = h @ (q * weight_scale)^T      weight-only, h in the activation dtype, float logits, or
                with `gemma_mobile.lm_head` scales (Google's layout has them) the wNa8o8 numerics of linear.py:
                logits = SRQ(SRQ(h, s_x) @ (q * weight_scale)^T, s_y) (int8 x int-b GEMM, exact int32, f32
                epilogue; a null scale = identity on that side).
CPU backend: the codes live in cpu_gemm_wna16's blocked uint4b8 layout (2-bit codes in 4-bit containers,
4 bits/weight; 8-bit tables are rejected on this backend); `cpu_ops.gather_rows` reads embedding rows from it.
The lm_head multiplies by bf16 copies of the scales (see cpu_ops docstring); the embedding uses the f32 ones.
Other backends hold a `kernels.layout.PackedWeight` and call `kernels.ops.embedding` / `kernels.ops.linear`.

Gather-only tables (`gather_only=True`: Gemma 4's per-layer-embedding table `embed_tokens_per_layer`, which is
never a matmul operand): the compressed-tensors int32 rows stay PACKED in memory as loaded
(`[V, ceil(K*bits/32)]`, 2/4/8-bit); a lookup gathers the packed rows of the requested ids and unpacks only
those (`cpu_ops.unpack_codes`). Scales are per row (`channel`) or per row and block of `group_size` columns
(`group`, `[V, K/group_size]`): `E[t, k] = q[t, k] * weight_scale[t, k // group_size]` (float32 product, cast
once to the activation dtype — the reference's dequantized bf16 table holds the same values).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.parameter import BasevLLMParameter, ChannelQuantScaleParameter, PackedvLLMParameter

from kernels import bitpack
from kernels import plugin as kplugin
from kernels.scales import invalid_scale_mask
from vllm_gemma_mobile.vllm import cpu_ops
from vllm_gemma_mobile.vllm.linear import backend

logger = init_logger("vllm.gemma_mobile.embedding")  # under vllm's handlers, so it shows in engine logs


class GemmaMobileEmbeddingMethod(QuantizeMethodBase):
    """Weight-only 2/4/8-bit per-row table for `VocabParallelEmbedding` and (tied) `ParallelLMHead`."""

    def __init__(self, bits: int, tied_lm_head: bool = False, group_size: int | None = None,
                 gather_only: bool = False, head_scales: Any = None, source: torch.nn.Module | None = None):
        if bits not in bitpack.SUPPORTED_BITS:
            raise ValueError(f"gemma_mobile embedding: unsupported weight bits {bits}")
        if group_size is not None and not gather_only:
            raise ValueError("gemma_mobile embedding: group-wise scales are supported only for gather-only "
                             "tables (embed_tokens_per_layer), not for a table that may serve as lm_head")
        if gather_only and tied_lm_head:
            raise ValueError("gemma_mobile embedding: a gather-only table cannot be a tied lm_head")
        self.bits = bits
        self.pack_factor = 32 // bits
        self.tied_lm_head = tied_lm_head
        self.group_size = group_size
        self.gather_only = gather_only
        # metadata.LMHeadScales of the lm_head this table serves (None: weight-only lm_head). Given to the table
        # AND to the tied lm_head: the table prepares the int8 GEMM operand at load, the lm_head runs it.
        self.head_scales = head_scales
        self.source = source  # Google layout: the embedding module whose table this (untied) lm_head shares

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        layer.gm_k = input_size_per_partition
        if self.tied_lm_head:
            if self.source is not None:
                self.tie_weights(layer, self.source)
            return  # tie_weights() points this lm_head at the embedding's table; nothing to allocate
        weight_loader = extra_weight_attrs["weight_loader"]
        v, k = sum(output_partition_sizes), input_size_per_partition
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=self.pack_factor,
            weight_loader=weight_loader, data=torch.zeros(v, -(-k * self.bits // 32), dtype=torch.int32)))
        if self.group_size is not None and k % self.group_size:
            raise ValueError(f"gemma_mobile: {getattr(layer, 'prefix', 'embedding')}: group_size {self.group_size} "
                             f"does not divide the embedding width {k}")
        n_groups = 1 if self.group_size is None else k // self.group_size
        layer.register_parameter("weight_scale", ChannelQuantScaleParameter(
            output_dim=0, weight_loader=weight_loader, data=torch.zeros(v, n_groups, dtype=torch.float32)))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            data=torch.zeros(2, dtype=torch.int64), weight_loader=weight_loader))

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        if not isinstance(embed_tokens.quant_method, GemmaMobileEmbeddingMethod):
            raise ValueError("gemma_mobile: tied lm_head needs a gemma_mobile-quantized embed_tokens, got "
                             f"{type(embed_tokens.quant_method).__name__}")
        if embed_tokens.quant_method.gather_only:
            raise ValueError("gemma_mobile: the tied lm_head cannot use a gather-only (group-wise) table")
        # a plain list, so the embedding module is not registered twice as a submodule
        layer.gm_source = [embed_tokens]
        return layer

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "gm_source", None) is not None or self.tied_lm_head:
            return  # tied lm_head: uses the embedding's processed table
        k = layer.gm_k
        if self.gather_only:
            return self._process_gather_only(layer)
        ws = layer.weight_scale.data.reshape(-1).to(torch.float32)
        org_v = int(getattr(layer, "org_vocab_size", ws.numel()))
        live = ws[:org_v]
        bad = invalid_scale_mask(live)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"gemma_mobile: {getattr(layer, 'prefix', 'embedding')}.weight_scale[{i}] = "
                             f"{float(live[i])}; scales must be positive and finite")
        layer.gm_backend = backend(layer.weight_packed.device)
        if layer.gm_backend == "cpu":
            codes = cpu_ops.unpack_codes(layer.weight_packed.data, self.bits, k)
            if self.bits > 4:
                raise ValueError("gemma_mobile: the CPU backend serves 2/4-bit embedding tables (4-bit "
                                 f"cpu_gemm_wna16 containers); this checkpoint has {self.bits}-bit")
            n_rows, k_cols = codes.shape
            if n_rows % 32 or k_cols % 32:
                raise ValueError(f"gemma_mobile: the CPU lm_head kernel (cpu_gemm_wna16) needs vocab and hidden "
                                 f"sizes that are multiples of 32, got {n_rows} x {k_cols}; set "
                                 "GEMMA_MOBILE_BACKEND=torch to use the (slow) torch reference ops instead")
            layer.gm_table = cpu_ops.to_wna16_table(codes)
            layer.gm_scale_f32 = ws.contiguous()
            layer.gm_scale_row = ws.to(layer.params_dtype).view(1, -1).contiguous()
            layer.gm_isa = cpu_ops.wna16_isa(layer.gm_scale_row.dtype)
            if self.head_scales is not None:
                layer.gm_head_gemm = self._cpu_head_gemm(codes, ws)
                hs = self.head_scales
                layer.gm_head_sy = torch.tensor(hs.output_scale, dtype=torch.float32) \
                    if hs.output_scale is not None else None
            del codes
        else:
            # vLLM-free tensor work (kernels.plugin), run on CUDA tensors by the GPU check
            hs = self.head_scales
            layer.gm_state = kplugin.prepare_table(
                layer.weight_packed.data, ws, self.bits, k, layer.gm_backend,
                head_scales=None if hs is None else (hs.input_scale, hs.output_scale), act_dtype=layer.params_dtype)
        for name in ("weight_packed", "weight_scale", "weight_shape"):
            delattr(layer, name)

    def _cpu_head_gemm(self, codes: torch.Tensor, ws: torch.Tensor):
        """oneDNN int8 GEMM for the lm_head with a static input scale (1/s_y folded into the per-row scales,
        as in linear.py); its int8 codes are a second copy of the table (1 byte/weight) next to the gather table."""
        hs = self.head_scales
        if hs.input_scale is None:
            raise ValueError("gemma_mobile: an lm_head with an output scale but no input scale has no int8 GEMM on "
                             "the cpu backend; set GEMMA_MOBILE_BACKEND=torch")
        eff = ws if hs.output_scale is None else ws * (1.0 / torch.tensor(hs.output_scale, dtype=torch.float32))
        return cpu_ops.OneDNNInt8GEMM(codes, eff, hs.input_scale)

    def _process_gather_only(self, layer: torch.nn.Module) -> None:
        """Keep the packed int32 rows as loaded; check scales and the stored shape."""
        prefix = getattr(layer, "prefix", "embedding")
        k = layer.gm_k
        ws = layer.weight_scale.data.to(torch.float32)
        org_v = int(getattr(layer, "org_vocab_size", ws.shape[0]))
        shape = layer.weight_shape.data.tolist()
        if shape != [org_v, k]:
            raise ValueError(f"gemma_mobile: {prefix}.weight_shape = {shape}, the model implies [{org_v}, {k}]")
        live = ws[:org_v]
        bad = invalid_scale_mask(live)
        if bad.any():
            r, c = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"gemma_mobile: {prefix}.weight_scale[{r}, {c}] = {float(live[r, c])}; scales must be "
                             "positive and finite")
        layer.gm_backend = "gather"
        # int32 [V, ceil(K*bits/32)] as on disk, f32 [V, groups]; lookups in kernels.plugin.gather_embedding
        layer.gm_state = kplugin.GatherTable(layer.weight_packed.data.contiguous(), ws.contiguous(), self.bits, k)
        for name in ("weight_packed", "weight_scale", "weight_shape"):
            delattr(layer, name)

    @staticmethod
    def _src(layer: torch.nn.Module) -> torch.nn.Module:
        src = getattr(layer, "gm_source", None)
        return src[0] if src is not None else layer

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        src = self._src(layer)
        ids = input_.reshape(-1)
        dtype = layer.params_dtype
        if self.gather_only:
            out = kplugin.gather_embedding(src.gm_state, ids).to(dtype)
        elif src.gm_backend == "cpu":
            q = cpu_ops.gather_rows(src.gm_table, ids, src.gm_k)
            out = (q.to(torch.float32) * src.gm_scale_f32[ids].unsqueeze(1)).to(dtype)
        else:
            out = kplugin.table_embedding(src.gm_state, ids, dtype)
        return out.reshape(*input_.shape, src.gm_k)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gather_only:
            raise RuntimeError(f"gemma_mobile: {getattr(layer, 'prefix', 'embedding')} is a gather-only table "
                               "(embed_tokens_per_layer) and cannot be used as a matmul / lm_head")
        src = self._src(layer)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        head = self.head_scales is not None
        if head and getattr(src, "gm_head_gemm", None) is None and (
                getattr(src, "gm_state", None) is None or (src.gm_state.head_sx is None and src.gm_state.head_sy is None)):
            raise RuntimeError(f"gemma_mobile: {getattr(layer, 'prefix', 'lm_head')}: the table was prepared without "
                               "the lm_head's activation scales")
        if src.gm_backend == "cpu" and head:
            gemm = src.gm_head_gemm
            y = gemm(gemm.quantize_input(x2))
            out = y.to(x.dtype) if src.gm_head_sy is None else \
                cpu_ops.requant_scaled_int8(y, src.gm_head_sy, x.dtype)
        elif src.gm_backend == "cpu":
            out = cpu_ops.wna16_matmul(x2.contiguous(), src.gm_table, src.gm_scale_row, src.gm_isa)
        else:
            out = kplugin.table_lm_head(src.gm_state, x2, head)
        if bias is not None:
            out = out + bias
        return out.reshape(*shape[:-1], out.shape[-1])
