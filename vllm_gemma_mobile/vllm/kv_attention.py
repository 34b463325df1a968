"""The quantized hybrid KV cache inside vLLM, on CPU and CUDA: an attention backend per cache width (int8 / int4,
and on CPU 16 = the unquantized bf16 / f16 page of the comparison switch `GEMMA_MOBILE_KV_CACHE=bf16`, served by
the same kernels so that it equals the evaluation reference without KV fake quant) whose per-layer KV spec is a
byte page (so vLLM really allocates 1 or 0.5 byte per element), which quantizes on write and attends over the
quantized blocks. Kernels: `kernels.plugin.kv_kernels(device)` chooses them once per layer (the evaluation
reference calls the same): on CPU the C++ kernels of `kernels/cpu_kv.py` (the torch reference `kernels/kvcache.py`
where the extension cannot be built or with `GEMMA_MOBILE_KV_BACKEND=torch`), on CUDA the Triton kernels of
`kernels/kvcache_triton.py` (also on CPU with `GEMMA_MOBILE_KV_BACKEND=triton` + `TRITON_INTERPRET=1`: how CI runs
the CUDA path's kernels inside a real engine). Backends: `_GemmaMobileKVBackend` (CPU, CPU_ATTN-derived) and
`_GemmaMobileKVCudaBackend` (CUDA): the same page, metadata and impl; they differ in block sizes, name and the
metadata builder's host (CPU) or device (CUDA) index tensors.

Page (one per block, vLLM's `[num_blocks, num_kv_heads, block_size, C]` uint8 view): each token row holds the
K codes then the V codes, `C = 2 * head_dim` bytes (int8) or `2 * head_dim / 2` (int4, two codes per byte,
low nibble = even element, offset binary); layout and numerics are documented in `kernels/kvcache.py`.

THE HOOK (undocumented vLLM internals, re-check on every vLLM upgrade): the CPU platform ignores attention
backend choices and always returns CPU_ATTN (and CUDA would pick its own by name), so `install()` - called from
the gemma_mobile KV method while vLLM's `Attention.__init__` runs (`_init_kv_cache_quant` -> `create_weights`) -
swaps `layer.attn_backend` and `layer.impl` of that one layer, with the backend of the current platform. Everything
later (KV spec -> `customize_spec`, attention groups keyed by backend class, `do_kv_cache_update`, `forward`) goes
through the swapped objects. Layers without KV bits keep the platform's backend. The CUDA backends are also
registered by name with `register_backend` ("GEMMA_MOBILE_KV8/KV4") so `AttentionBackendEnum` resolves them.
CUDA status: the Triton kernels are parity-tested on an H200 (kernels/README.md), and the impl + metadata that
both backends share run them inside a CPU engine under the Triton interpreter (tests/test_vllm_kv.py); vLLM's
CUDA engine itself has not run the CUDA backend (no CUDA build of vLLM was available to this project).

Gemma 4 KV-shared layers (`kv_sharing_target_layer_name`): vLLM binds the target's cache tensor to them and
skips their cache update; their impl reads that cache with the TARGET's bits and scales (looked up once from
the target layer at the first forward).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kernels import kvcache as kvc
from kernels.plugin import kv_kernels



@dataclass
class GemmaMobileKVMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R]
    block_table: torch.Tensor  # [R, max_blocks]
    slot_mapping: torch.Tensor
    causal: bool = True


class GemmaMobileKVMetadataBuilder(AttentionMetadataBuilder[GemmaMobileKVMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> GemmaMobileKVMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor):
            raise NotImplementedError("gemma_mobile KV cache: per-token dynamic causal masks are not supported")
        r = m.num_reqs
        if self.device.type == "cpu":  # the C++ kernels read the index tensors on the host
            qsl, lens = m.query_start_loc_cpu[:r + 1], m.seq_lens[:r].cpu()
        else:  # Triton reads them on the device: no host sync per step
            qsl, lens = m.query_start_loc[:r + 1], m.seq_lens[:r]
        return GemmaMobileKVMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len, query_start_loc=qsl,
            seq_lens=lens, block_table=m.block_table_tensor[:r], slot_mapping=m.slot_mapping, causal=bool(m.causal))


class GemmaMobileKVImpl(AttentionImpl):
    """Decoder self-attention over a quantized paged cache (`bits` from the backend subclass)."""

    bits: ClassVar[int]

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 **_: object) -> None:
        if alibi_slopes is not None or sinks is not None:
            raise NotImplementedError("gemma_mobile KV cache: ALiBi / attention sinks are not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"gemma_mobile KV cache: attention type {attn_type} is not supported")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window if sliding_window and sliding_window > 0 else None
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.k_scale: float | None = None  # set by GemmaMobileKVCacheMethod after loading (f32 values)
        self.v_scale: float | None = None
        self._kv_kernels: tuple | None = None  # (write, attend), chosen at the first call (`kv_kernels`)

    def set_scales(self, k_scale: float, v_scale: float) -> None:
        self.k_scale, self.v_scale = k_scale, v_scale
        self._ks = torch.tensor(k_scale, dtype=torch.float32)
        self._vs = torch.tensor(v_scale, dtype=torch.float32)

    def _scales(self, device: torch.device) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The k/v scales for the kernels on `device`: on CPU the f32 values as Python floats (the C++ kernels take
        floats: no tensor ops per call), elsewhere f32 tensors on `device` (moved once, not per call: no
        host->device copy in the step)."""
        ks, vs = self._loaded_scales()
        if device.type == "cpu":
            return self.k_scale, self.v_scale
        if ks.device != device:
            self._ks, self._vs = ks.to(device), vs.to(device)
        return self._ks, self._vs

    def _loaded_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_scale is None and self.kv_sharing_target_layer_name is not None:
            from vllm.forward_context import get_forward_context

            target = get_forward_context().no_compile_layers[self.kv_sharing_target_layer_name].impl
            if not isinstance(target, GemmaMobileKVImpl) or target.bits != self.bits:
                raise RuntimeError(f"gemma_mobile: KV-shared layer reads {self.kv_sharing_target_layer_name}, "
                                   f"whose cache is not int{self.bits}")
            self.set_scales(target.k_scale, target.v_scale)
        if self.k_scale is None:
            raise RuntimeError("gemma_mobile: quantized KV cache layer has no scales (weights not loaded?)")
        return self._ks, self._vs

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        ks, vs = self._scales(kv_cache.device)
        self._kernels(kv_cache)[0](kv_cache, key, value, slot_mapping, ks, vs, self.bits)

    def _kernels(self, kv_cache: torch.Tensor) -> tuple:
        if self._kv_kernels is None:
            self._kv_kernels = kv_kernels(kv_cache.device)
        return self._kv_kernels

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: GemmaMobileKVMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("gemma_mobile KV cache: fused output quantization is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        ks, vs = self._scales(kv_cache.device)
        n = attn_metadata.num_actual_tokens
        self._kernels(kv_cache)[1](query[:n], kv_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
               attn_metadata.block_table, ks, vs, self.bits, self.scale,
               sliding_window=self.sliding_window, softcap=self.logits_soft_cap,
               causal=attn_metadata.causal, out=output[:n])
        return output


class GemmaMobileKV8Impl(GemmaMobileKVImpl):
    bits = 8


class GemmaMobileKV4Impl(GemmaMobileKVImpl):
    bits = 4


class GemmaMobileKV16Impl(GemmaMobileKVImpl):
    """The unquantized comparison cache (`GEMMA_MOBILE_KV_CACHE=bf16`): bf16 / f16 values, the same kernels."""

    bits = kvc.UNQUANTIZED


class _KVPage:
    """What both platforms' backends share: our page (`customize_spec`), metadata builder and impl."""

    bits: ClassVar[int]
    impl_cls: ClassVar[type[GemmaMobileKVImpl]]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]
    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update, then forward

    @classmethod
    def get_impl_cls(cls) -> type[GemmaMobileKVImpl]:  # type: ignore[override]
        return cls.impl_cls

    @staticmethod
    def get_builder_cls() -> type[GemmaMobileKVMetadataBuilder]:  # type: ignore[override]
        return GemmaMobileKVMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """One byte row per (token, head): K codes then V codes; vLLM sizes pages and capacity from this."""
        content = kvc.code_bytes(spec.head_size, cls.bits) + kvc.code_bytes(spec.head_size_v, cls.bits)
        return replace(spec, dtype=torch.uint8, state_content_bytes=content)


class _GemmaMobileKVBackend(_KVPage, CPUAttentionBackend):
    """CPU: CPU_ATTN's block sizes / layout, our page, metadata and impl. `get_name` stays "CPU_ATTN": vLLM maps
    the name to its enum in places; the class (not the name) keys the attention groups."""


class _GemmaMobileKVCudaBackend(_KVPage, AttentionBackend):
    """CUDA: the Triton kernels of `kernels/kvcache_triton.py` over the same page (logical `[B, H, N, C]`, vLLM's
    LBHNC layout; the kernels take the page strides). Block sizes: any multiple of 16. bf16 / f32 models only (the
    Triton write refuses f16: its rounding cannot be checked under the interpreter); int8 / int4 only (the bf16
    comparison page is CPU-only). CUDA graphs: the metadata
    builder declares none (vLLM's default), so vLLM runs attention outside its piecewise graphs."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float32]

    @classmethod
    def get_name(cls) -> str:  # type: ignore[override]
        return f"GEMMA_MOBILE_KV{cls.bits}"  # registered by register_backends

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True


class GemmaMobileKV8Backend(_GemmaMobileKVBackend):
    bits, impl_cls = 8, GemmaMobileKV8Impl


class GemmaMobileKV4Backend(_GemmaMobileKVBackend):
    bits, impl_cls = 4, GemmaMobileKV4Impl


class GemmaMobileKV16Backend(_GemmaMobileKVBackend):
    bits, impl_cls = kvc.UNQUANTIZED, GemmaMobileKV16Impl


class GemmaMobileKV8CudaBackend(_GemmaMobileKVCudaBackend):
    bits, impl_cls = 8, GemmaMobileKV8Impl


class GemmaMobileKV4CudaBackend(_GemmaMobileKVCudaBackend):
    bits, impl_cls = 4, GemmaMobileKV4Impl


BACKENDS: dict[str, dict[int, type[_KVPage]]] = {
    "cpu": {c.bits: c for c in (GemmaMobileKV8Backend, GemmaMobileKV4Backend, GemmaMobileKV16Backend)},
    "cuda": {c.bits: c for c in (GemmaMobileKV8CudaBackend, GemmaMobileKV4CudaBackend)}}
_registered = False


def backend_for(bits: int, device_type: str) -> type:
    """The backend class serving a `bits` cache on `device_type` ("cpu" or "cuda")."""
    if device_type not in BACKENDS:
        raise ValueError(f"gemma_mobile: no quantized KV cache backend for {device_type!r} (CPU and CUDA only)")
    if bits == kvc.UNQUANTIZED and device_type != "cpu":
        raise ValueError("gemma_mobile: GEMMA_MOBILE_KV_CACHE=bf16 (the plugin's attention over an unquantized page) "
                         "is CPU-only; on CUDA compare with GEMMA_MOBILE_KV_CACHE=vllm (vLLM's own attention and cache)")
    if bits not in BACKENDS[device_type]:
        raise ValueError(f"gemma_mobile: KV cache bits {bits} not supported (int8 or int4)")
    return BACKENDS[device_type][bits]


def register_backends() -> None:
    """Name the CUDA backends in vLLM's registry (cheap, idempotent) so `AttentionBackendEnum[get_name()]`
    resolves them; the CPU ones are named "CPU_ATTN". Neither platform selects them by name: `install` is the hook."""
    global _registered
    if _registered:
        return
    from vllm.v1.attention.backends.registry import register_backend

    for cls in BACKENDS["cuda"].values():
        register_backend(cls.get_name(), f"{cls.__module__}.{cls.__qualname__}")
    _registered = True


def install(layer: torch.nn.Module, bits: int) -> None:
    """THE HOOK: make vLLM `Attention` layer `layer` use the int`bits` quantized cache (bits 16: the unquantized
    page of the bf16 comparison switch; see module docstring). Must run inside `Attention.__init__` (before vLLM
    asks the layer for its KV spec)."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    device_type = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else \
        str(current_platform.device_type)
    backend = backend_for(bits, device_type)
    dtype = get_current_vllm_config().model_config.dtype
    if bits == kvc.UNQUANTIZED and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemma_mobile: the unquantized comparison KV cache holds bf16 / f16 values; the model "
                         f"runs in {dtype} (use --dtype bfloat16, or GEMMA_MOBILE_KV_CACHE=vllm for vLLM's own)")
    if dtype not in backend.supported_dtypes:
        raise ValueError(f"gemma_mobile: the quantized KV cache on {device_type} runs {backend.supported_dtypes} "
                         f"models; this one runs in {dtype} (use --dtype bfloat16)")
    old = layer.impl
    if getattr(old, "alibi_slopes", None) is not None or getattr(old, "sinks", None) is not None:
        raise NotImplementedError(f"gemma_mobile: {layer.layer_name}: ALiBi / sinks with a quantized KV cache")
    sliding = getattr(old, "sliding_window", None)
    layer.attn_backend = backend
    layer.impl = backend.get_impl_cls()(
        old.num_heads, old.head_size, old.scale, old.num_kv_heads, None,
        sliding if sliding is not None and sliding > 0 else None, "auto",
        getattr(old, "logits_soft_cap", None) or None, getattr(old, "attn_type", AttentionType.DECODER),
        getattr(layer, "kv_sharing_target_layer_name", None))
