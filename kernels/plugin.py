"""The vLLM plugin's tensor work on its ``triton`` / ``torch`` / ``packed`` backends, vLLM-free (so the GPU check, which has
torch and Triton but no vLLM, runs exactly this code on CUDA tensors: ``kernels/plugin_check.py``).

``vllm_gemma_mobile/vllm/linear.py`` and ``embedding.py`` are thin adapters: they create vLLM parameters, let vLLM
load them, validate, then hand the loaded tensors to ``prepare_*`` and call the ``*_apply`` functions here.
(The ``cpu`` backend, vLLM's own oneDNN / WNA16 CPU kernels, lives in ``vllm_gemma_mobile/vllm/cpu_ops.py``.)

Numerics: those of ``kernels.reference`` / ``kernels.ops`` (docs/checkpoint-format.md), per run of fused shards
that share one static input scale (``s_x``); output scales are a scalar or one per column:
    y   = f32(sum_k q_x[m, k] * q[n, k]) * (s_x * weight_scale[n]) (+ bias[n])
    out = clamp(round_half_even(y / s_y[n]), -128, 127) * s_y[n]
Row-parallel under tensor parallelism: ``linear_partial`` returns the f32 ``y`` of this rank's K slice without
bias or requant, the caller all-reduces, ``linear_finish`` adds the bias once and requantizes the full sum.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import bitpack, cpu_packed, ops
from .layout import PackedWeight, from_compressed_tensors
from .reference import epilogue


logger = logging.getLogger(__name__)
_KV_WARNED = False


KV_ENV = "GEMMA_MOBILE_KV_BACKEND"


def kv_kernels(device: torch.device) -> tuple:
    """(write, attend) of the quantized KV cache on ``device`` - what the plugin's attention layers run and what
    the evaluation reference calls, so both compute the same attention bit for bit: Triton on CUDA; on CPU the C++
    kernels (``kernels.cpu_kv``), or the torch reference (``kernels.kvcache``, same numerics up to f32 summation
    order) when the extension cannot be built (logged once). ``GEMMA_MOBILE_KV_BACKEND=cpp|torch|triton`` forces
    one (default: ``torch`` / ``triton`` when ``GEMMA_MOBILE_BACKEND`` says so for the linears); ``triton`` on a
    CPU tensor needs ``TRITON_INTERPRET=1`` (tests: a CPU engine serving through the CUDA path's kernels)."""
    global _KV_WARNED
    forced = os.environ.get(KV_ENV, "").strip().lower()
    if forced not in ("", "cpp", "torch", "triton"):
        raise ValueError(f"{KV_ENV}={forced!r}: expected cpp, torch or triton")
    if not forced:
        forced = os.environ.get("GEMMA_MOBILE_BACKEND", "").strip().lower()
    if device.type == "cuda" or forced == "triton":
        from ._common import interpret

        if device.type != "cuda" and not interpret():
            raise RuntimeError(f"Triton KV kernels ({KV_ENV} / GEMMA_MOBILE_BACKEND=triton) on a CPU tensor need "
                               "TRITON_INTERPRET=1 (they only run on CUDA otherwise)")
        from .kvcache_triton import paged_attention_triton, write_kv_cache_triton

        return write_kv_cache_triton, paged_attention_triton
    if forced == "cpp" and device.type != "cpu":
        raise RuntimeError(f"{KV_ENV}=cpp: the C++ KV kernels run on CPU tensors only (got {device})")
    from . import cpu_kv
    from . import kvcache as kvc

    if forced != "torch":
        ok, why = cpu_packed.status()
        if ok:
            return cpu_kv.write_kv_cache, cpu_kv.paged_attention
        if forced == "cpp":
            raise RuntimeError(f"{KV_ENV}=cpp but the C++ KV kernels are unavailable: {why}")
        if not _KV_WARNED:
            logger.warning("gemma_mobile: C++ KV-cache kernels unavailable (%s); the quantized KV cache runs on the "
                           "torch reference (same numerics, slower)", why)
            _KV_WARNED = True
    return kvc.write_kv_cache, kvc.paged_attention


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; no-op elsewhere). The load-time conversions
    free large temporaries that glibc would otherwise keep mapped, so the engine's resident memory after load
    would overstate what the weights hold."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def runs(values: list[float]) -> list[tuple[int, int]]:
    """Index ranges [start, end) of consecutive equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i))
            start = i
    return out


def input_scale_groups(s_x: torch.Tensor, shards: list[int]) -> list[tuple[int, int, float]]:
    """Runs of fused shards with equal static input scales -> output columns [start, end) and that scale."""
    offsets = [0]
    for n in shards:
        offsets.append(offsets[-1] + n)
    return [(offsets[a], offsets[b], float(s_x[a])) for a, b in runs(s_x.reshape(-1).tolist())]


def output_column_scale(s_y: Optional[torch.Tensor], shards: list[int]) -> Optional[torch.Tensor]:
    """Per-shard output scales -> a 0-d scale (all equal) or one per output column (f32)."""
    if s_y is None:
        return None
    if len(shards) == 1 or bool((s_y == s_y[0]).all()):
        return s_y[0].reshape(())
    return torch.cat([s_y[i].expand(n) for i, n in enumerate(shards)])


@dataclass
class LinearState:
    """A loaded wNa8o8 linear: one packed weight per run of shards with equal input scales."""
    groups: list[tuple[int, int, float]]  # output columns [start, end) and their static input scale
    packed: list[PackedWeight]
    wscale: list[torch.Tensor]            # f32 [end - start]
    sx: list[torch.Tensor]                # f32 0-d, on the weight's device
    output_scale: Optional[torch.Tensor]  # f32 0-d or [N]; None: float output
    backend: str
    # packed backend: per group f32(s_x * weight_scale) and its [1] s_x, [N] output scales, precomputed so the
    # apply is ONE fused C++ call (kernels.cpu_packed.linear), bitwise the reference's per-call products
    fused: Optional[list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]] = None

    def nbytes(self) -> int:
        return sum(w.nbytes() for w in self.packed)


def prepare_linear(weight_packed: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                   output_scale: Optional[torch.Tensor], shards: list[int], k: int, bits: int,
                   backend: str) -> LinearState:
    """Load-time conversion of a compressed-tensors linear (int32 ``[N, ceil(K*bits/32)]``, f32 scales, one
    input / output scale per shard) to the kernels' packed layout. On CPU with the ``torch`` backend the int8
    codes are cached once (``torch._int_mm`` reads codes, not the packed words); ``packed`` (``kernels.cpu_packed``)
    and ``triton`` read the packed words in place."""
    ws = weight_scale.reshape(-1).to(torch.float32)
    # scale values are validated here, once: the apply functions skip the per-call check (torch.compile)
    ops.check_scale_values("weight_scale", ws)
    ops.check_scale_values("input_scale", input_scale)
    if output_scale is not None:
        ops.check_scale_values("output_scale", output_scale)
    groups = input_scale_groups(input_scale.to(torch.float32), shards)
    packed = [from_compressed_tensors(weight_packed[a:b].contiguous(), bits, (b - a, k)) for a, b, _ in groups]
    if backend == "torch" and weight_packed.device.type == "cpu":
        packed = [w.with_codes(torch.int8) for w in packed]
    st = LinearState(
        groups=groups, packed=packed, wscale=[ws[a:b].contiguous() for a, b, _ in groups],
        sx=[torch.tensor(sx, dtype=torch.float32, device=ws.device) for _, _, sx in groups],
        output_scale=output_column_scale(None if output_scale is None else output_scale.reshape(-1).float(),
                                         shards),
        backend=backend)
    if weight_packed.device.type == "cpu":
        release_freed_memory()
    if backend == "packed":
        osc = st.output_scale
        st.fused = [((sx.reshape(1) * wsg).contiguous(), sx.reshape(1),
                     None if osc is None else (osc.reshape(1) if osc.ndim == 0 else osc[a:b].contiguous()))
                    for (a, b, _), sx, wsg in zip(groups, st.sx, st.wscale)]
    return st


def linear_apply(st: LinearState, x2: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x2 [M, K]`` -> ``[M, N]`` in x2's dtype: the full wNa8o8 linear (input quant, GEMM, bias, requant)."""
    if st.fused is not None:  # packed: one fused call per group, no per-call Python argument handling
        outs = [cpu_packed.linear(x2, w, cs, sx, None if bias is None else bias[a:b], so, x2.dtype)
                for w, (cs, sx, so), (a, b, _) in zip(st.packed, st.fused, st.groups)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    osc = st.output_scale
    outs = []
    for i, (a, b, _) in enumerate(st.groups):
        oscale = None if osc is None else (osc if osc.ndim == 0 else osc[a:b])
        outs.append(ops.linear(x2, st.packed[i], st.wscale[i], st.sx[i], oscale, check_values=False,
                               bias=None if bias is None else bias[a:b], backend=st.backend))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return out.to(x2.dtype)


def linear_partial(st: LinearState, x2: torch.Tensor) -> torch.Tensor:
    """Row-parallel rank: f32 ``y`` of this rank's K slice (no bias, no output requant) for the all-reduce."""
    ys = [ops.linear(x2, st.packed[i], st.wscale[i], st.sx[i], None, out_dtype=torch.float32, backend=st.backend,
                     check_values=False)
          for i in range(len(st.groups))]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def linear_finish(st: LinearState, y: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype
                  ) -> torch.Tensor:
    """After the all-reduce of ``linear_partial``: bias once, static output requant of the full sum."""
    return epilogue(y, 1.0, None if bias is None else bias.to(torch.float32), st.output_scale, out_dtype)


# ------------------------------------------------------------------ quantized table: embedding + (tied) lm_head
@dataclass
class TableState:
    """A 2/4/8-bit per-row table serving the embedding gather and the (tied) lm_head from ONE packed copy."""
    packed: PackedWeight
    scale: torch.Tensor                 # f32 [V]
    head_sx: Optional[torch.Tensor]     # lm_head static input scale (f32 0-d) or None (weight-only lm_head)
    head_sy: Optional[torch.Tensor]     # lm_head static output scale or None
    backend: str

    @property
    def k(self) -> int:
        return self.packed.k


def prepare_table(weight_packed: torch.Tensor, weight_scale: torch.Tensor, bits: int, k: int, backend: str,
                  head_scales: Optional[tuple[Optional[float], Optional[float]]] = None,
                  act_dtype: torch.dtype = torch.bfloat16) -> TableState:
    """compressed-tensors int32 rows ``[V, ceil(K*bits/32)]`` + f32 per-row scales -> the packed table.
    ``head_scales`` = (input_scale, output_scale) of the lm_head this table serves (None: weight-only lm_head).
    CPU ``torch`` backend: codes cached once (int8 for the int8-activation lm_head, else exact ``act_dtype``
    integers for the weight-only one), instead of unpacking the table on every token."""
    ws = weight_scale.reshape(-1).to(torch.float32).contiguous()
    ops.check_scale_values("weight_scale", ws)  # once, at load (see prepare_linear)
    packed = from_compressed_tensors(weight_packed, bits, (ws.numel(), k))
    if backend == "torch" and weight_packed.device.type == "cpu":
        packed.with_codes(torch.int8 if head_scales is not None else act_dtype)
    sx = sy = None
    if head_scales is not None:
        hx, hy = head_scales
        sx = None if hx is None else torch.tensor(hx, dtype=torch.float32, device=ws.device)
        sy = None if hy is None else torch.tensor(hy, dtype=torch.float32, device=ws.device)
        for name, v in (("lm_head input_scale", sx), ("lm_head output_scale", sy)):
            if v is not None:
                ops.check_scale_values(name, v)
    if weight_packed.device.type == "cpu":
        release_freed_memory()
    return TableState(packed=packed, scale=ws, head_sx=sx, head_sy=sy, backend=backend)


def table_embedding(st: TableState, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``E[t] = q[t] * scale[t]`` (f32 product, cast once) -> ``[len(ids), K]`` (Gemma's normalizer not here)."""
    return ops.embedding(ids.reshape(-1), st.packed, st.scale, backend=st.backend, out_dtype=dtype,
                         check_values=False)


def table_lm_head(st: TableState, x2: torch.Tensor, quantized_head: bool) -> torch.Tensor:
    """Logits ``[M, V]`` in x2's dtype: weight-only ``x @ (q * scale)^T``, or with the lm_head's static scales
    the wNa8o8 int8-activation GEMM (``quantized_head``)."""
    sx, sy = (st.head_sx, st.head_sy) if quantized_head else (None, None)
    return ops.linear(x2, st.packed, st.scale, sx, sy, bias=None, backend=st.backend, check_values=False).to(x2.dtype)


# ------------------------------------------------------------------ gather-only table (per-layer embeddings)
@dataclass
class GatherTable:
    """Gemma 4's ``embed_tokens_per_layer``: compressed-tensors int32 rows kept PACKED as loaded; a lookup
    unpacks only the gathered rows. Scales per row or per (row, block of ``group`` columns)."""
    packed_rows: torch.Tensor   # int32 [V, ceil(K*bits/32)]
    group_scale: torch.Tensor   # f32 [V, K / group]
    bits: int
    k: int

    @property
    def group(self) -> int:
        return self.k // self.group_scale.shape[1]


def gather_embedding(gt: GatherTable, ids: torch.Tensor) -> torch.Tensor:
    """``E[t, c] = q[t, c] * group_scale[t, c // group]`` as f32 ``[len(ids), K]`` (cast once by the caller)."""
    ids = ids.reshape(-1)
    q = bitpack.ct_unpack(gt.packed_rows.index_select(0, ids), gt.bits, gt.k)
    s = gt.group_scale.index_select(0, ids)
    g = gt.group
    return (q.to(torch.float32).view(ids.numel(), gt.k // g, g) * s.unsqueeze(-1)).view(ids.numel(), gt.k)
