"""llmcompressor modifiers that quantize a Gemma model into the mobile format.

`MobileGPTQModifier` (GPTQ weights) and `MobileQuantizationModifier` (round-to-nearest weights) take a
`MobileScheme` preset plus overrides in the recipe instead of hand-written `config_groups`: the groups are
expanded from the model's own config when the modifier initializes, so one recipe serves every size of a
family (layer counts, KV-shared layers). Activation scales are static per-tensor int8, calibrated on the
recipe's data; KV scales are calibrated per layer with the layer's bit width (int8 sliding, int4 full).

Everything a correct checkpoint needs is carried by the modifiers' own lifecycle, so a plain
`llmcompressor.oneshot(model, recipe="recipes/...yaml", dataset=..., output_dir=...)` writes the same checkpoint
as `gemma-mobile quantize` (which is a thin wrapper around that call):

* initialize: Gemma 4 per-layer attribute access, scheme expansion, per-layer KV bits, NaN-poisoned scales,
  the calibration pipeline this model needs (`mobile_pipelines`, read by llmcompressor's patched pipeline
  choice, see workarounds.mobile_pipeline_choice);
* calibration: output hooks observe only (workarounds.observe_only_output_calibration);
* calibration: a forward hook on the lm_head collects its inputs (`lm_head_scales`, quantize/lm_head.py);
* calibration: with `kv_ranges: attention_output`, query / key / value hooks keep q, k, v of the first calibration
  tokens of every KV-quantized layer (quantize/kv_ranges.py);
* end: scales of modules outside the sequential layers (workarounds.finish_calibration_outside_layers), then
  the tied lm_head's static input / output scales on the now-quantized table (`gemma_mobile.lm_head`), then the
  KV scales rescaled by the attention-output search (`kv_ranges`);
* finalize: checkpoint.finalize — KV scales only where a layer owns a cache, every scale checked, lm_head
  re-tied, and a save hook that writes our `gemma_mobile` metadata and drops the dense lm_head copy.

Both register with llmcompressor's ModifierFactory on import of `vllm_gemma_mobile.quantize` (which a plain
`import vllm_gemma_mobile` triggers as soon as llmcompressor is imported), so a recipe YAML can name them like
built-in modifiers.
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
from pydantic import BaseModel, Field, PrivateAttr

from vllm_gemma_mobile.quantize import checkpoint, observers, workarounds  # noqa: F401 (observers: static_mse)
from vllm_gemma_mobile.quantize.kv_ranges import KVRangeSearch
from vllm_gemma_mobile.quantize.lm_head import LMHeadCalibration
from vllm_gemma_mobile.scheme import Expanded, MobileScheme, expand, preset
from vllm_gemma_mobile.scheme.spec import kv_args

logger = logging.getLogger(__name__)


def quantizable_module_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


class _MobileSchemeMixin(BaseModel):
    """Shared by both modifiers: the recipe fields (`preset`, `options`) and state; expands the preset into config
    groups and sets per-layer KV bits. A pydantic model itself, so that its fields and private attributes are
    inherited by both llmcompressor modifiers (a plain mixin's would not be)."""

    preset: str = "gemma3"
    options: dict[str, Any] = Field(default_factory=dict)
    _mobile_scheme: Any = PrivateAttr(None)
    _mobile_expanded: Any = PrivateAttr(None)
    _mobile_pipelines: Any = PrivateAttr(None)
    _lm_head_calibration: Any = PrivateAttr(None)
    _lm_head_scales: Any = PrivateAttr(None)
    _kv_range_search: Any = PrivateAttr(None)
    _kv_ranges: Any = PrivateAttr(None)

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
        workarounds.allow_gemma4_per_layer_attributes(state.model.config)
        self._setup_mobile(state.model)
        self._mobile_pipelines = workarounds.calibration_pipelines(state.model.config)
        ok = super().on_initialize(state, **kwargs)
        self._apply_kv_layer_bits(state.model)
        workarounds.poison_uncalibrated_scales(state.model)
        return ok

    def on_start(self, state, event, **kwargs):
        super().on_start(state, event, **kwargs)
        mode = self._mobile_scheme.lm_head_scales
        self._lm_head_calibration = None
        if mode != "none":
            head = state.model.get_output_embeddings()
            if head is None:
                raise ValueError(f"lm_head_scales={mode!r}: the model has no lm_head")
            self._lm_head_calibration = LMHeadCalibration(mode, self._mobile_scheme.lm_head_observer)
            self.register_hook(head, self._lm_head_calibration.hook, "forward")
        self._kv_range_search = None
        if self._mobile_scheme.kv_ranges == "attention_output" and self.kv_cache_scheme is not None:
            self._kv_range_search = KVRangeSearch(self._mobile_scheme.kv_range_tokens)
            n = self._kv_range_search.attach(self, state.model)
            logger.info("kv_ranges=attention_output: capturing q/k/v of %d attention layers", n)

    def _initialize_hooks(self, module: torch.nn.Module):
        with workarounds.observe_only_output_calibration():
            return super()._initialize_hooks(module)

    def on_end(self, state, event, **kwargs):
        self._finish(state.model)
        return super().on_end(state, event, **kwargs)

    def on_finalize(self, state, **kwargs) -> bool:
        ok = super().on_finalize(state, **kwargs)
        checkpoint.finalize(state.model, self.mobile_metadata)
        return ok

    def _finish(self, model: torch.nn.Module) -> None:
        fixed = workarounds.finish_calibration_outside_layers(model)
        if fixed:
            logger.info("calibrated outside the sequential layers: %s", fixed)
        if self._lm_head_calibration is not None:  # needs the table's weight_scale, computed just above
            table = model.get_input_embeddings()
            name = next(n for n, m in model.named_modules() if m is table)
            self._lm_head_scales = self._lm_head_calibration.finish(table, name)
            self._lm_head_calibration = None
        if self._kv_range_search is not None:
            self._kv_ranges = self._kv_range_search.finish(model)
            self._kv_range_search = None

    @property
    def mobile_pipelines(self) -> tuple[str, tuple[str, ...]] | None:
        """(preferred, allowed) calibration pipelines for the model this modifier initialized on."""
        return self._mobile_pipelines

    @property
    def mobile_metadata(self) -> dict:
        """The checkpoint's `quantization_config.gemma_mobile` key (with the calibrated lm_head scales)."""
        meta = self._mobile_expanded.metadata(self._mobile_scheme)
        if self._lm_head_scales:
            meta["lm_head"] = dict(self._lm_head_scales)
        return meta

    @property
    def mobile_scheme(self) -> MobileScheme:
        return self._mobile_scheme

    @property
    def mobile_expanded(self) -> Expanded:
        return self._mobile_expanded


class MobileGPTQModifier(_MobileSchemeMixin, GPTQModifier):
    """GPTQ weights + static int8 in/out activations + per-layer static int KV, from a mobile preset."""

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


for _cls in (MobileGPTQModifier, MobileQuantizationModifier):
    ModifierFactory.register(_cls.__name__, _cls)
workarounds.mobile_pipeline_choice()
