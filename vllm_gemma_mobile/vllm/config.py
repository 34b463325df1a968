"""`gemma_mobile` quantization config: claims gemma-mobile compressed-tensors checkpoints for this plugin.

A checkpoint is ours when its `quantization_config` says `quant_method: compressed-tensors` AND carries the
`gemma_mobile` key (docs/checkpoint-format.md), or is Google's own `quant_method: "gemma"` layout (translated
into the same contract at load, google_layout.py); every other compressed-tensors checkpoint stays with
upstream. No CLI flag is needed: `override_quantization_method` answers "gemma_mobile" for both.

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

from vllm_gemma_mobile.contract import CheckpointContract, check_quant_config, read_contract
from vllm_gemma_mobile.vllm.embedding import GemmaMobileEmbeddingMethod
from vllm_gemma_mobile.vllm.google_layout import is_google_dir
from vllm_gemma_mobile.vllm.kv_cache import GemmaMobileKVCacheMethod, log_kv_mode
from vllm_gemma_mobile.vllm.linear import GemmaMobileLinearMethod

logger = init_logger("vllm.gemma_mobile.config")  # under vllm's handlers, so it shows in engine logs

NAME = "gemma_mobile"
MARKER = "gemma_mobile"
GOOGLE_METHOD = "gemma"  # Google's own layout (google_layout.py)


def is_upstream_mobile_ct(qc: dict[str, Any], hf_config: Any) -> bool:
    """A compressed-tensors checkpoint WITHOUT our key that is still this format: a Gemma 3/4 model with at least
    one static int8 *output* activation group (the wNa8o8 signature; upstream vLLM serves it only as float fake
    quant and not at all on CPU) — Google's `*-qat-mobile-ct` conversions. Other compressed-tensors checkpoints
    (W4A16, W8A8, ...) stay with upstream."""
    if qc.get("quant_method") != "compressed-tensors" or MARKER in qc or hf_config is None:
        return False
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    if not str(getattr(text, "model_type", "")).startswith(("gemma3", "gemma4")):
        return False
    for g in (qc.get("config_groups") or {}).values():
        o = g.get("output_activations") if isinstance(g, dict) else None
        if o and o.get("num_bits") == 8 and not o.get("dynamic", False):
            return True
    return False


@register_quantization_config(NAME)
class GemmaMobileConfig(QuantizationConfig):
    """Gemma mobile wNa8o8 (see module docstring)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        # "ct": ours; "google": Google's `quant_method: gemma`, translated into our contract once the directory is
        # known (maybe_update_config, google_layout.py); "upstream-ct": compressed-tensors wNa8o8 without our key
        # (Google's -ct conversions, `is_upstream_mobile_ct`)
        self.layout = "google" if config.get("quant_method") == GOOGLE_METHOD else \
            "ct" if MARKER in config else "upstream-ct"
        self.source_config = config
        if self.layout == "upstream-ct":
            # no gemma_mobile key: nothing beyond compressed-tensors' own fields (no KV bits, no lm_head SRQ)
            config = {**config, MARKER: {"version": 1, "scheme": "compressed-tensors"}}
        self._tables: dict[str, torch.nn.Module] = {}  # embed_tokens prefix -> module (lm_head shares its table)
        self._warned_kv = False
        # the checkpoint's contract (contract.py), read once the directory is known (maybe_update_config)
        self.contract: CheckpointContract | None = None
        self._set_config(None if self.layout == "google" else config)

    def _set_config(self, config: dict[str, Any] | None) -> None:
        """Parse our compressed-tensors `quantization_config` (None: not known yet, Google layout)."""
        self.meta = check_quant_config(config) if config is not None else None
        self.config = config
        self.groups: list[dict[str, Any]] = list(((config or {}).get("config_groups") or {}).values())
        self.ignore: list[str] = list((config or {}).get("ignore") or [])
        self.kv_layer_bits: list[int | None] = self.meta.kv_layer_bits if self.meta else []
        self.lm_head_scales = self.meta.lm_head if self.meta else None

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
        if not isinstance(hf_quant_cfg, dict):
            return None
        method = hf_quant_cfg.get("quant_method")
        if not ((method == "compressed-tensors" and MARKER in hf_quant_cfg) or method == GOOGLE_METHOD
                or is_upstream_mobile_ct(hf_quant_cfg, hf_config)):
            return None
        if user_quant not in (None, NAME):
            return None  # the user asked for something else explicitly (e.g. upstream compressed-tensors)
        return NAME

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        d = Path(model_name)
        if self.layout == "google":
            if not is_google_dir(d):
                raise ValueError(f"gemma_mobile: {model_name}: Google-layout (quant_method 'gemma') checkpoints are "
                                 "served from a local directory (its tensors are translated at load)")
            self.contract = read_contract(d)  # translated by the converter's code; every tensor header checked
            self._set_config(self.contract.quantization_config)
            logger.info("gemma_mobile: %s: Google layout (quant_method 'gemma'), served through the "
                        "compressed-tensors contract: groups %s%s", d, sorted(self.config["config_groups"]),
                        f", lm_head SRQ {self.lm_head_scales.model_dump()}" if self.lm_head_scales else "")
            log_kv_mode(self.kv_layer_bits)
            return
        if self.layout == "upstream-ct":
            logger.warning("gemma_mobile: %s: compressed-tensors wNa8o8 Gemma checkpoint without the gemma_mobile key "
                           "(e.g. Google's *-ct conversion): it has no KV-cache scales, so the KV cache cannot be "
                           "quantized and stays in the model dtype; weights and static activations are served as "
                           "stored", model_name)
        if d.is_dir() and (d / "config.json").exists():
            self.contract = read_contract(d, self.config)
            summary = self.contract.summary()
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

    @staticmethod
    def _embed_prefix(lm_head_prefix: str) -> str:
        return lm_head_prefix[: -len("lm_head")] + "model.embed_tokens"

    def _embed_group(self, lm_head_prefix: str) -> dict[str, Any] | None:
        """The group of the input embedding (`...model.embed_tokens`) that a tied `...lm_head` shares: the same
        vLLM matching (`_group_for`) that gave the table its own method."""
        embed = self._embed_prefix(lm_head_prefix)
        return self._group_for(self._tables.get(embed, torch.nn.Module()), embed)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if self.config is None:
            raise RuntimeError("gemma_mobile: Google-layout config used before maybe_update_config translated it")
        if isinstance(layer, ParallelLMHead):
            from vllm.config import get_current_vllm_config

            hf = get_current_vllm_config().model_config.hf_text_config
            # ours: tie_word_embeddings; Google's: a separate lm_head that the converter found byte-identical to
            # the table (the translated contract has it tied), so it is served from the table too
            if getattr(hf, "tie_word_embeddings", False) or self.layout == "google":
                g = self._embed_group(prefix)
                if g is None:
                    return None
                if g["weights"].get("strategy") != "channel":
                    raise ValueError(f"gemma_mobile: the embedding table tied to {prefix} must have per-row "
                                     f"(channel) scales, got strategy {g['weights'].get('strategy')!r}")
                source = None
                if not getattr(hf, "tie_word_embeddings", False):
                    source = self._tables.get(self._embed_prefix(prefix))
                    if source is None:
                        raise ValueError(f"gemma_mobile: {prefix}: the embedding table it shares "
                                         f"({self._embed_prefix(prefix)}) was not built before it")
                return GemmaMobileEmbeddingMethod(g["weights"]["num_bits"], tied_lm_head=True,
                                                  head_scales=self.lm_head_scales, source=source)
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
            method = GemmaMobileEmbeddingMethod(
                w["num_bits"], gather_only=ple, group_size=w.get("group_size") if w.get("strategy") == "group" else None,
                head_scales=None if ple else self.lm_head_scales)
            if not ple:
                self._tables[prefix] = layer
            return method
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

