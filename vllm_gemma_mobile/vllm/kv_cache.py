"""KV cache of gemma-mobile checkpoints in vLLM: per-layer k/v scales, the quantized cache switch, start-up checks.

Default: the hybrid quantized cache of the checkpoint (`quantization_config.gemma_mobile.kv_cache.layer_bits`:
int8 for sliding layers, int4 for global ones), with the static per-tensor scales
`model.layers.i.self_attn.k_scale` / `v_scale`; the attention backend is `kv_attention.py` (CPU and CUDA: on
other platforms the cache stays in the model dtype and the start-up line says so).

Comparison switches (scales are still loaded and checked; the mode is logged at start-up):
- `GEMMA_MOBILE_KV_CACHE=bf16`: an unquantized cache in the model dtype (bf16 / f16), attended by the same
  kernels as the quantized one (`kv_attention.py`, "bits 16"), so the served model equals the evaluation
  reference with its KV fake quant off (`reference_perplexity(kv_fake_quant=False)`), as the quantized cache
  equals it with the fake quant on. CPU only (on CUDA a start-up error: use `vllm` there).
- `GEMMA_MOBILE_KV_CACHE=vllm`: vLLM's own attention backend and cache (model dtype) - what vLLM does without
  this plugin's cache; the baseline of the KV benchmark (`gemma-mobile bench --kv-compare`).
`--kv-cache-dtype` must stay `auto`: the checkpoint fixes the cache format, so e.g. `--kv-cache-dtype fp8` is a
start-up error.
"""

from __future__ import annotations

import os
import re

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod, KVCacheScaleParameter

from kernels.kvcache import UNQUANTIZED
from kernels.scales import invalid_scales

# under vLLM's logger tree so INFO lines reach vLLM's handler (a plain module logger only prints warnings)
logger = init_logger("vllm.gemma_mobile.kv_cache")

ENV = "GEMMA_MOBILE_KV_CACHE"
_MODES = {"": "quantized", "quantized": "quantized", "int": "quantized", "bf16": "bf16", "vllm": "vllm"}


def kv_cache_mode() -> str:
    """`quantized` (default), `bf16` or `vllm` (from $GEMMA_MOBILE_KV_CACHE; see the module docstring)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v not in _MODES:
        raise ValueError(f"{ENV}={v!r}: expected 'bf16' (unquantized cache, the plugin's attention), 'vllm' "
                         "(vLLM's own attention and cache) or unset (the checkpoint's quantized cache)")
    return _MODES[v]


def quantized_cache_supported() -> bool:
    """The quantized cache has a backend on CPU (C++ kernels) and CUDA (Triton kernels): `kv_attention.py`. Other
    platforms (ROCm, XPU, TPU) keep a cache in the model dtype, and the start-up line says so."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu() or current_platform.is_cuda()


def _layer_index(name: str | None) -> int:
    m = re.search(r"layers\.(\d+)\.", name or "")
    return int(m.group(1)) if m else -1


def describe_kv_mode(layer_bits: list[int | None]) -> str:
    """The start-up log line (one place, so tests and docs quote the same text)."""
    bits = [b for b in layer_bits if b]
    if not bits:
        return "gemma_mobile: checkpoint has no KV bits: KV cache in the model dtype"
    per = ", ".join(f"int{b} x {bits.count(b)} layers" for b in sorted(set(bits), reverse=True))
    mode = kv_cache_mode()
    if mode == "vllm":
        return (f"gemma_mobile: KV cache in the model dtype ({ENV}=vllm: vLLM's own attention, for comparison); "
                f"the checkpoint's quantized KV ({per}) is NOT used")
    if not quantized_cache_supported():
        return (f"gemma_mobile: KV cache in the model dtype: the quantized KV cache ({per}) runs on CPU and CUDA "
                "only in this version")
    if mode == "bf16":
        return (f"gemma_mobile: KV cache in the model dtype ({ENV}=bf16, for comparison: the plugin's attention "
                f"over an unquantized cache); the checkpoint's quantized KV ({per}) is NOT used")
    return f"gemma_mobile: quantized KV cache active: {per} (static per-tensor k/v scales from the checkpoint)"


def log_kv_mode(layer_bits: list[int | None]) -> None:
    logger.info(describe_kv_mode(layer_bits))


def describe_kv_cache(model: torch.nn.Module) -> list[dict]:
    """Per attention layer: impl class, bits, the attention kernel it ran (after the first forward), and the cache
    tensor vLLM bound to it (dtype, shape, bytes, bytes per token). For `LLM.apply_model` in tests and diagnostics."""
    from vllm.model_executor.layers.attention import Attention

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        kv = m.kv_cache[0] if isinstance(m.kv_cache, list) else m.kv_cache
        nbytes = kv.numel() * kv.element_size()
        tokens = kv.shape[0] * kv.shape[2] if kv.dim() == 4 else 0
        kern = getattr(m.impl, "_kv_kernels", None)  # (write, attend) the impl ran with; None before a forward
        out.append({"layer": name, "impl": type(m.impl).__name__, "bits": getattr(m, "gm_kv_bits", None),
                    "kernels": None if kern is None else f"{kern[1].__module__}.{kern[1].__name__}",
                    "dtype": str(kv.dtype), "shape": list(kv.shape), "bytes": nbytes,
                    "bytes_per_token": nbytes / tokens if tokens else None,
                    "shared_from": getattr(m, "kv_sharing_target_layer_name", None)})
    return out


class GemmaMobileKVCacheMethod(BaseKVCacheMethod):
    """Loads `self_attn.k_scale` / `v_scale`, checks them, and (quantized mode) installs the quantized cache
    backend on the layer; `layer.gm_kv` records what the layer serves."""

    def __init__(self, quant_config, bits: int | None):
        super().__init__(quant_config)
        self.bits = bits

    def _effective_bits(self, layer: torch.nn.Module) -> int | None:
        """Own bits, or for a Gemma 4 KV-shared layer the bits of the layer whose cache it reads."""
        target = getattr(layer, "kv_sharing_target_layer_name", None)
        if target is None:
            return self.bits
        j = _layer_index(target)
        lb = getattr(self.quant_config, "kv_layer_bits", [])
        return lb[j] if 0 <= j < len(lb) else None

    def create_weights(self, layer: torch.nn.Module) -> None:
        for name in ("k_scale", "v_scale"):
            p = KVCacheScaleParameter()
            p.data = p.data.to(torch.float32)  # created under the model's default dtype (bf16)
            setattr(layer, name, p)
        bits = self._effective_bits(layer)
        layer.gm_kv_bits = bits
        if bits is None:
            return
        from vllm.config import get_current_vllm_config

        user = get_current_vllm_config().cache_config.cache_dtype
        if user != "auto":
            raise ValueError(
                f"gemma_mobile: --kv-cache-dtype {user} contradicts the checkpoint, whose KV cache is int{bits} "
                f"for {getattr(layer, 'layer_name', 'this layer')} (quantization_config.gemma_mobile.kv_cache); "
                f"leave --kv-cache-dtype at auto (or set {ENV}=bf16 for an unquantized cache)")
        mode = kv_cache_mode()
        if mode != "vllm" and quantized_cache_supported():
            from vllm_gemma_mobile.vllm import kv_attention

            kv_attention.register_backends()
            kv_attention.install(layer, bits if mode == "quantized" else UNQUANTIZED)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k, v = float(layer.k_scale), float(layer.v_scale)
        bits = getattr(layer, "gm_kv_bits", self.bits)
        shared = getattr(layer, "kv_sharing_target_layer_name", None)
        if self.bits is not None:  # the layer owns a cache: its scales must be in the checkpoint
            base = re.sub(r"\.attn$", "", getattr(layer, "layer_name", "attention"))
            for kind, val in (("k", k), ("v", v)):
                if invalid_scales(val):
                    raise ValueError(f"gemma_mobile: {base}.{kind}_scale = {val}: kv bits {self.bits} need a "
                                     "finite scale > 0 (missing or invalid in the checkpoint)")
        own = self.bits is not None and shared is None
        layer.gm_kv = {"bits": bits, "k_scale": k if own else None, "v_scale": v if own else None,
                       "shared_from": shared,
                       "cache": type(layer.impl).__name__ if bits is not None else None}
        impl = layer.impl
        if own and hasattr(impl, "set_scales"):
            impl.set_scales(k, v)
        del layer.k_scale
        del layer.v_scale
        # layer._k_scale / _v_scale stay 1.0: vLLM's own (bf16) cache must not be scaled; ours reads impl scales.
