"""Workarounds for llmcompressor 0.12 / compressed-tensors 0.17 / transformers 5.19 bugs, one function each.

Each is named after what it fixes, applied only where needed, and covered by a test in
tests/test_quantize_workarounds.py that fails without it. Remove one when the upstream fix lands.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


def stub_granitemoe_import() -> None:
    """llmcompressor 0.12's MoE registry imports `GraniteMoeParallelExperts`, removed in transformers >= 5.17.

    Our environment pins transformers 5.19 (vLLM's pin wins, see requirements/cpu.lock), so `oneshot` dies in
    its MoE check on any model. The fix is an import hook installed by `import vllm_gemma_mobile`
    (`vllm_gemma_mobile.llmcompressor_compat`): the real module is tried, and only if it fails for that reason
    an empty stand-in is registered. Kept here, under its table name, as the explicit entry point."""
    from vllm_gemma_mobile import llmcompressor_compat

    llmcompressor_compat.install()


def _observe_only_output_hook(module: torch.nn.Module, _args, output: torch.Tensor) -> None:
    """Accumulate output statistics; leave the output untouched while calibrating."""
    module.output_observer(output)


@contextmanager
def observe_only_output_calibration() -> Iterator[None]:
    """Fix llmcompressor's `calibrate_output_hook` (0.11 -> 0.14, static `output_activations`).

    Upstream's hook fake-quantizes each output with `output_scale` *before* that scale is computed from the
    observer (it is still its initial value), so every module downstream of a quantized linear is calibrated on
    near-zero activations: o_proj input/output scales and k/v scales came out ~1e-7. Our modifiers register
    their calibration hooks inside this context (`_MobileSchemeMixin._initialize_hooks`), so their output
    hooks observe only; the output quantization is applied by compressed-tensors' forward once scales are
    frozen. Scoped to hook registration: other modifiers in the same process are untouched.
    """
    from compressed_tensors.utils import patch_attr
    from llmcompressor.modifiers.quantization.quantization import mixin

    with patch_attr(mixin, "calibrate_output_hook", _observe_only_output_hook):
        yield


SCALE_NAMES = ("weight_scale", "input_scale", "output_scale", "k_scale", "v_scale")


def poison_uncalibrated_scales(model: torch.nn.Module) -> int:
    """Fill every freshly initialized quantization scale with NaN.

    compressed-tensors allocates scales with `torch.empty`: a scale that calibration never reaches keeps
    whatever memory held, which can look plausible. NaN makes such a scale fail `check_scales` before save.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        for attr in SCALE_NAMES:
            p = getattr(module, attr, None)
            if isinstance(p, torch.Tensor):
                p.data.fill_(float("nan"))
                n += 1
    return n


def finish_calibration_outside_layers(model: torch.nn.Module) -> list[str]:
    """Compute the qparams llmcompressor 0.12's sequential pipeline leaves uncomputed (call before observers
    are removed).

    Its SEQUENTIAL_EPOCH_END updates qparams only for modules inside decoder layers, so (a) embedding tables
    (`embed_tokens`, Gemma 4 `embed_tokens_per_layer`) never get a `weight_scale` (NaN / garbage; GPTQ skips
    embeddings) and (b) quantized linears outside the layers never get `input_scale` / `output_scale` from
    their (populated) observers. Weights: observed with the module's own observer (the recipe's, e.g. MSE)
    only where `weight_scale` is still uncalibrated (NaN), so GPTQ'd scales are never recomputed. Activations:
    recomputed from the observers' statistics for every module (idempotent where already done).
    Returns the names of modules whose weight scales were computed here.
    """
    from llmcompressor.modifiers.quantization.calibration import observe, update_qparams

    fixed = []
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        scale = getattr(module, "weight_scale", None)
        if (scale is not None and torch.isnan(scale).any() and getattr(module, "weight_observer", None)
                is not None):
            observe(module, "weight")
            update_qparams(module, "weight")
            fixed.append(name)
        update_qparams(module, ["input", "output", "k", "v"])
    return fixed


def allow_gemma4_per_layer_attributes(config) -> None:
    """transformers 5.x raises `AmbiguousGlobalPerLayerAttributeError: 'head_dim'` when KV quantization code
    reads `config.head_dim` of Gemma 4 (sliding 256 vs global 512). Our KV scales are per tensor, so the global
    value is never used to shape anything; allow the access."""
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None)) if c is not None}.values():
        if "gemma4" in getattr(cfg, "model_type", ""):
            cfg.allow_global_per_layer_attribute_access = True


def calibration_pipelines(config) -> tuple[str, tuple[str, ...]]:
    """(preferred, allowed) llmcompressor calibration pipelines for a model config.

    `sequential` (layer by layer, each layer calibrated on already-quantized predecessors: better GPTQ) is
    preferred; `basic` (whole-model forwards, GPTQ of every layer at the end) also gives a valid checkpoint.
    Models with KV-shared layers (Gemma 4) allow only `basic`: llmcompressor's sequential pipeline caches each
    subgraph's inputs, so the `shared_kv_states` dict that a KV-owning layer fills for the shared layers is lost
    between subgraphs (KeyError 'sliding_attention'), and GPTQ of the prelude's per_layer_model_projection
    finds no statistics."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if int(getattr(text, "num_kv_shared_layers", 0) or 0) > 0:
        return "basic", ("basic",)
    return "sequential", ("sequential", "basic")


def calibration_pipeline(config) -> str:
    """The preferred pipeline of `calibration_pipelines`."""
    return calibration_pipelines(config)[0]


_ORIGINAL_FROM_MODIFIERS = None


def mobile_pipeline_choice() -> None:
    """Make llmcompressor pick the calibration pipeline our modifiers need (idempotent).

    llmcompressor 0.12 infers the pipeline from the modifier's *exact class name* (`"GPTQModifier"` ->
    sequential); any subclass, such as `MobileGPTQModifier`, is inferred `datafree`: a plain
    `oneshot(model, recipe, dataset)` would then skip calibration entirely and save uncalibrated scales. With
    this patch `CalibrationPipeline.from_modifiers` asks our modifiers (`mobile_pipelines`, set when they
    initialize on the model, which llmcompressor does before choosing the pipeline): no user choice or
    `independent` (oneshot's default) -> the preferred one; a user choice outside the allowed set -> a clear
    ValueError instead of a failure deep inside calibration. Other modifiers keep upstream's inference.
    """
    global _ORIGINAL_FROM_MODIFIERS
    from compressed_tensors.registry import standardize_lookup_name
    from llmcompressor.pipelines.registry import CalibrationPipeline

    if _ORIGINAL_FROM_MODIFIERS is not None:
        return
    original = CalibrationPipeline.from_modifiers.__func__
    _ORIGINAL_FROM_MODIFIERS = original

    def from_modifiers(cls, modifiers, user: str | None = None):
        ours = [m for m in modifiers if getattr(m, "mobile_pipelines", None)]
        std = standardize_lookup_name(user) if user else None
        if not ours or std == standardize_lookup_name("independent"):
            return original(cls, modifiers, user=user)
        preferred, allowed = ours[0].mobile_pipelines
        if std is None:
            return cls.load_from_registry(preferred)
        if std not in {standardize_lookup_name(a) for a in allowed}:
            why = (" (KV-shared layers lose their shared_kv_states between llmcompressor's sequential subgraphs)"
                   if preferred == "basic" else "")
            raise ValueError(f"{type(ours[0]).__name__}: pipeline={user!r} cannot calibrate this model{why}; use "
                             f"oneshot(..., pipeline={preferred!r}) or leave the default (allowed: {list(allowed)})")
        return cls.load_from_registry(user)

    CalibrationPipeline.from_modifiers = classmethod(from_modifiers)
    logger.debug("llmcompressor calibration pipeline choice patched for the gemma-mobile modifiers")
