"""`gemma_mobile` quantization config: claims gemma-mobile compressed-tensors checkpoints for this plugin.

A checkpoint is ours when its `quantization_config` says `quant_method: compressed-tensors` AND carries the
`gemma_mobile` key (docs/checkpoint-format.md); every other compressed-tensors checkpoint stays with upstream.
No CLI flag is needed: `override_quantization_method` answers "gemma_mobile" for ours.

Layers: quantized linears -> `GemmaMobileLinearMethod` (wNa8o8), `embed_tokens` and the tied `lm_head` ->
`GemmaMobileEmbeddingMethod` (one table), attention -> `GemmaMobileKVCacheMethod` (loads and keeps the
per-layer k_scale/v_scale; the KV cache itself stays unquantized in this version — a warning says so).
This class deliberately has NO attribute named `kv_cache_scheme`: vLLM's Attention would switch the cache
to fp8 on its own if it saw one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod, KVCacheScaleParameter
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from vllm_gemma_mobile.vllm.embedding import GemmaMobileEmbeddingMethod
from vllm_gemma_mobile.vllm.linear import GemmaMobileLinearMethod
from vllm_gemma_mobile.vllm.validate import validate_checkpoint, validate_quant_config

logger = init_logger(__name__)

NAME = "gemma_mobile"
MARKER = "gemma_mobile"


class GemmaMobileKVCacheMethod(BaseKVCacheMethod):
    """Loads `self_attn.k_scale` / `v_scale` and keeps them (`layer.gm_kv`); the cache stays unquantized."""

    def __init__(self, quant_config: "GemmaMobileConfig", bits: int | None):
        super().__init__(quant_config)
        self.bits = bits

    def create_weights(self, layer: torch.nn.Module) -> None:
        for name in ("k_scale", "v_scale"):
            p = KVCacheScaleParameter()
            p.data = p.data.to(torch.float32)  # created under the model's default dtype (bf16)
            setattr(layer, name, p)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k, v = float(layer.k_scale), float(layer.v_scale)
        if self.bits is not None and not (k > 0 and v > 0):
            raise ValueError(f"gemma_mobile: {getattr(layer, 'layer_name', 'attention')} has "
                             f"kv bits {self.bits} but k_scale={k}, v_scale={v} (missing or invalid)")
        layer.gm_kv = {"bits": self.bits, "k_scale": k if k > 0 else None, "v_scale": v if v > 0 else None}
        del layer.k_scale
        del layer.v_scale
        # layer._k_scale / _v_scale stay 1.0: the cache is bf16 and must not be scaled.


@register_quantization_config(NAME)
class GemmaMobileConfig(QuantizationConfig):
    """Gemma mobile wNa8o8 (see module docstring)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        validate_quant_config(config)
        self.config = config
        self.groups: list[dict[str, Any]] = list((config.get("config_groups") or {}).values())
        self.ignore: list[str] = list(config.get("ignore") or [])
        gm = config[MARKER]
        self.kv_layer_bits: list[int | None] = list((gm.get("kv_cache") or {}).get("layer_bits") or [])
        self._warned_kv = False

    # -- registry API
    @classmethod
    def get_name(cls) -> str:
        return NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GemmaMobileConfig":
        return cls(config)

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg: dict[str, Any], user_quant: str | None,
                                     hf_config: Any = None) -> str | None:
        if not isinstance(hf_quant_cfg, dict) or MARKER not in hf_quant_cfg:
            return None
        if hf_quant_cfg.get("quant_method") != "compressed-tensors":
            return None
        if user_quant not in (None, NAME):
            return None  # the user asked for something else explicitly (e.g. upstream compressed-tensors)
        return NAME

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        d = Path(model_name)
        if d.is_dir() and (d / "config.json").exists():
            summary = validate_checkpoint(d, self.config)
            logger.info("gemma_mobile: checkpoint %s validated: linear bits %s, embedding %s-bit", d,
                        summary["linear"], summary["embedding"])
        else:
            logger.warning("gemma_mobile: %s is not a local directory; tensor-level validation skipped "
                           "(scales are still checked after loading)", model_name)
        if any(b is not None for b in self.kv_layer_bits):
            logger.warning("gemma_mobile: KV-cache quantization is NOT active yet: per-layer k/v scales "
                           "(int%s) are loaded and kept, but the KV cache stays in the model dtype.",
                           "/int".join(str(b) for b in sorted({b for b in self.kv_layer_bits if b})))

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        def m(t: str) -> str | None:
            return hf_to_vllm_mapper._map_name(t) if "." in t and not t.startswith("re:") else t

        for g in self.groups:
            g["targets"] = [x for t in g.get("targets", []) if (x := m(t)) is not None]
        self.ignore = [x for t in self.ignore if (x := m(t)) is not None]

    # -- per-layer dispatch
    def _group_for(self, layer: torch.nn.Module, prefix: str) -> dict[str, Any] | None:
        mapping = getattr(self, "packed_modules_mapping", {}) or {}
        if should_ignore_layer(prefix, ignore=self.ignore, fused_mapping=mapping):
            return None
        for g in self.groups:
            if find_matched_target(prefix, layer, g.get("targets", []), mapping) is not None:
                return g
        return None

    def _embed_group(self) -> dict[str, Any] | None:
        return next((g for g in self.groups if any("embed_tokens" in t for t in g.get("targets", []))), None)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            from vllm.config import get_current_vllm_config

            hf = get_current_vllm_config().model_config.hf_text_config
            if getattr(hf, "tie_word_embeddings", False):
                g = self._embed_group()
                if g is None:
                    return None
                return GemmaMobileEmbeddingMethod(g["weights"]["num_bits"], tied_lm_head=True)
            g = self._group_for(layer, prefix)
            if g is None:
                return None
            if g.get("input_activations"):
                raise ValueError(f"gemma_mobile: {prefix} has activation quantization; the lm_head is weight-only")
            return GemmaMobileEmbeddingMethod(g["weights"]["num_bits"])
        if isinstance(layer, VocabParallelEmbedding):
            g = self._group_for(layer, prefix)
            return None if g is None else GemmaMobileEmbeddingMethod(g["weights"]["num_bits"])
        if isinstance(layer, LinearBase):
            g = self._group_for(layer, prefix)
            if g is None:
                return UnquantizedLinearMethod()
            if not g.get("input_activations"):
                raise ValueError(f"gemma_mobile: {prefix} is weight-only; linears must be wNa8o8 "
                                 "(static int8 input and output scales)")
            return GemmaMobileLinearMethod(g["weights"]["num_bits"],
                                           has_output_scale=bool(g.get("output_activations")))
        if isinstance(layer, Attention):
            mm = re.search(r"layers\.(\d+)\.", prefix)
            i = int(mm.group(1)) if mm else -1
            bits = self.kv_layer_bits[i] if 0 <= i < len(self.kv_layer_bits) else None
            return GemmaMobileKVCacheMethod(self, bits)
        return None

