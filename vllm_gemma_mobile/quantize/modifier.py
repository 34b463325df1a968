"""llmcompressor modifiers that quantize a Gemma model into the mobile format.

`MobileGPTQModifier` (GPTQ weights) and `MobileQuantizationModifier` (round-to-nearest weights) take a
`MobileScheme` preset plus overrides in the recipe instead of hand-written `config_groups`: the groups are
expanded from the model's own config when the modifier initializes, so one recipe serves every size of a
family (layer counts, KV-shared layers). Activation scales are static per-tensor int8, calibrated on the
recipe's data; KV scales are calibrated per layer with the layer's bit width (int8 sliding, int4 full).

Both register with llmcompressor's ModifierFactory on import of `vllm_gemma_mobile.quantize`, so a recipe
YAML can name them like built-in modifiers.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationScheme
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from pydantic import Field, PrivateAttr

from vllm_gemma_mobile.quantize import workarounds
from vllm_gemma_mobile.scheme import Expanded, MobileScheme, expand, preset
from vllm_gemma_mobile.scheme.spec import kv_args

logger = logging.getLogger(__name__)


def quantizable_module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


class _MobileSchemeMixin:
    """Shared by both modifiers: expands the preset into config groups and sets per-layer KV bits."""

    def _setup_mobile(self, model: torch.nn.Module) -> None:
        scheme = preset(self.preset, model.config, **dict(self.options))
        expanded = expand(scheme, model.config, quantizable_module_names(model))
        self.config_groups = dict(expanded.config_groups)
        self.ignore = sorted(set(self.ignore or []) | set(expanded.ignore))
        kv_bits = [b for b in expanded.kv_layer_bits if b is not None]
        # One global KV scheme makes llmcompressor hook every attention module; per-layer bits are set after.
        self.kv_cache_scheme = kv_args(8, scheme.activation_observer) if kv_bits else None
        self._mobile_scheme = scheme
        self._mobile_expanded = expanded
        logger.info("mobile scheme %s: %s", scheme.name,
                    {k: len(g.targets) for k, g in expanded.config_groups.items()})

    def _apply_kv_layer_bits(self, model: torch.nn.Module) -> None:
        """Give each attention module the KV args of its layer (int8 sliding / int4 full; none if shared)."""
        layer_bits = self._mobile_expanded.kv_layer_bits
        for name, module in model.named_modules():
            scheme: QuantizationScheme | None = getattr(module, "quantization_scheme", None)
            m = re.search(r"layers\.(\d+)\.self_attn$", name)
            if scheme is None or m is None or scheme.weights is not None:
                continue
            bits = layer_bits[int(m.group(1))]
            if bits is None:
                raise ValueError(f"{name}: KV quantization was attached to a layer without its own KV cache")
            if bits != scheme.input_activations.num_bits:
                module.quantization_scheme = scheme.model_copy(
                    update={"input_activations": kv_args(bits, scheme.input_activations.observer)})

    # llmcompressor lifecycle hooks, shared by both modifiers (the mixin precedes their base in the MRO)
    def on_initialize(self, state, **kwargs) -> bool:
        self._setup_mobile(state.model)
        ok = super().on_initialize(state, **kwargs)
        self._apply_kv_layer_bits(state.model)
        workarounds.poison_uncalibrated_scales(state.model)
        return ok

    def on_end(self, state, event, **kwargs):
        self._finish(state.model)
        return super().on_end(state, event, **kwargs)

    def _finish(self, model: torch.nn.Module) -> None:
        fixed = workarounds.finish_calibration_outside_layers(model)
        if fixed:
            logger.info("calibrated outside the sequential layers: %s", fixed)

    @property
    def mobile_scheme(self) -> MobileScheme:
        return self._mobile_scheme

    @property
    def mobile_expanded(self) -> Expanded:
        return self._mobile_expanded


class MobileGPTQModifier(_MobileSchemeMixin, GPTQModifier):
    """GPTQ weights + static int8 in/out activations + per-layer static int KV, from a mobile preset."""

    preset: str = "gemma3"
    options: dict[str, Any] = Field(default_factory=dict)
    _mobile_scheme: Any = PrivateAttr(None)
    _mobile_expanded: Any = PrivateAttr(None)

    def compress_modules(self):
        # GPTQ's column loop is a long chain of tiny ops: OpenMP threads add only synchronization. Measured on
        # this 2-core machine (K=2048, N=640, 4-bit): 1 thread 1.8 s, 2 threads 50 s while the other core is
        # busy. Calibration forwards keep all threads.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().compress_modules()
        finally:
            torch.set_num_threads(threads)


class MobileQuantizationModifier(_MobileSchemeMixin, QuantizationModifier):
    """Round-to-nearest weights (recipe's observer) + static int8 in/out activations + static int KV."""

    preset: str = "gemma3"
    options: dict[str, Any] = Field(default_factory=dict)
    _mobile_scheme: Any = PrivateAttr(None)
    _mobile_expanded: Any = PrivateAttr(None)


for _cls in (MobileGPTQModifier, MobileQuantizationModifier):
    ModifierFactory.register(_cls.__name__, _cls)
