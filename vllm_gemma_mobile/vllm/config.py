"""`gemma_mobile` quantization config: claims gemma-mobile compressed-tensors checkpoints for this plugin.

A checkpoint is ours when its `quantization_config` says `quant_method: compressed-tensors` AND carries the
`gemma_mobile` key (docs/checkpoint-format.md); every other compressed-tensors checkpoint stays with upstream.
No CLI flag is needed: `override_quantization_method` answers "gemma_mobile" for ours.

Layers: quantized linears -> `GemmaMobileLinearMethod` (wNa8o8; also Gemma 4's ReplicatedLinear
`per_layer_input_gate` / `per_layer_projection`, the ColumnParallelLinear `per_layer_model_projection` and the
q_proj of KV-shared layers), `embed_tokens` and the tied `lm_head` -> `GemmaMobileEmbeddingMethod` (one table),
Gemma 4's `embed_tokens_per_layer` -> `GemmaMobileEmbeddingMethod(gather_only=True)` (packed rows, per-row or
group-wise scales), attention -> `GemmaMobileKVCacheMethod` (kv_cache.py: per-layer
k_scale/v_scale and the quantized int8/int4 KV cache, kv_attention.py).
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
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

from vllm_gemma_mobile.vllm.embedding import GemmaMobileEmbeddingMethod
from vllm_gemma_mobile.vllm.kv_cache import GemmaMobileKVCacheMethod, log_kv_mode
from vllm_gemma_mobile.vllm.linear import GemmaMobileLinearMethod
from vllm_gemma_mobile.vllm.validate import validate_checkpoint, validate_quant_config

logger = init_logger(__name__)

NAME = "gemma_mobile"
MARKER = "gemma_mobile"


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
            logger.info("gemma_mobile: checkpoint %s validated: linear bits %s, embedding %s-bit%s", d,
                        summary["linear"], summary["embedding"],
                        f", per-layer embedding {summary['per_layer_embedding']}-bit"
                        if summary.get("per_layer_embedding") else "")
        else:
            logger.warning("gemma_mobile: %s is not a local directory; tensor-level validation skipped "
                           "(scales are still checked after loading)", model_name)
        log_kv_mode(self.kv_layer_bits)

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

    def _embed_group(self, lm_head_prefix: str) -> dict[str, Any] | None:
        """The group of the input embedding (`...model.embed_tokens`) that a tied `...lm_head` shares."""
        embed = lm_head_prefix[: -len("lm_head")] + "model.embed_tokens"
        for g in self.groups:
            for t in g.get("targets", []):
                if re.match(t[3:], embed) if t.startswith("re:") else (embed == t or embed.endswith("." + t)):
                    return g
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, ParallelLMHead):
            from vllm.config import get_current_vllm_config

            hf = get_current_vllm_config().model_config.hf_text_config
            if getattr(hf, "tie_word_embeddings", False):
                g = self._embed_group(prefix)
                if g is None:
                    return None
                if g["weights"].get("strategy") != "channel":
                    raise ValueError(f"gemma_mobile: the embedding table tied to {prefix} must have per-row "
                                     f"(channel) scales, got strategy {g['weights'].get('strategy')!r}")
                return GemmaMobileEmbeddingMethod(g["weights"]["num_bits"], tied_lm_head=True)
            g = self._group_for(layer, prefix)
            if g is None:
                return None
            if g.get("input_activations"):
                raise ValueError(f"gemma_mobile: {prefix} has activation quantization; the lm_head is weight-only")
            return GemmaMobileEmbeddingMethod(g["weights"]["num_bits"])
        if isinstance(layer, VocabParallelEmbedding):
            g = self._group_for(layer, prefix)
            if g is None:
                return None
            w = g["weights"]
            ple = prefix.endswith("embed_tokens_per_layer")
            if w.get("strategy") == "group" and not ple:
                raise ValueError(f"gemma_mobile: {prefix}: group-wise weight scales are supported only for "
                                 "embed_tokens_per_layer")
            return GemmaMobileEmbeddingMethod(w["num_bits"], gather_only=ple,
                                              group_size=w.get("group_size") if w.get("strategy") == "group" else None)
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

