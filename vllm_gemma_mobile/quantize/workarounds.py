"""Workarounds for llmcompressor 0.12 / compressed-tensors 0.17 / transformers 5.19 bugs, one function each.

Each is named after what it fixes, applied only where needed, and covered by a test in
tests/test_quantize_workarounds.py that fails without it. Remove one when the upstream fix lands.
"""

from __future__ import annotations

import logging
import sys
import types
from contextlib import contextmanager
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


def stub_granitemoe_import() -> None:
    """llmcompressor 0.12's MoE registry imports `GraniteMoeParallelExperts`, removed in transformers >= 5.17.

    Our environment pins transformers 5.19 (vLLM's pin wins, see requirements/cpu.lock), so `oneshot` dies in
    its MoE check on any model. Gemma is not MoE: registering an empty module for
    `llmcompressor.modeling.moe.granitemoe` lets the registry import; nothing of Granite is needed.
    """
    name = "llmcompressor.modeling.moe.granitemoe"
    if name in sys.modules:
        return
    try:
        import transformers.models.granitemoe.modeling_granitemoe as g

        if hasattr(g, "GraniteMoeParallelExperts"):
            return  # an upstream that still has it needs no stub
    except ImportError:
        pass
    stub = types.ModuleType(name)
    stub.GraniteMoeLinearExperts = None  # imported for its registration side effect only
    sys.modules[name] = stub
    logger.debug("registered an empty %s (GraniteMoeParallelExperts is gone from transformers)", name)


def _observe_only_output_hook(module: torch.nn.Module, _args, output: torch.Tensor) -> None:
    """Accumulate output statistics; leave the output untouched while calibrating."""
    module.output_observer(output)


@contextmanager
def observe_only_output_calibration() -> Iterator[None]:
    """Fix llmcompressor's `calibrate_output_hook` (0.11 -> 0.14, static `output_activations`).

    Upstream's hook fake-quantizes each output with `output_scale` *before* that scale is computed from the
    observer (it is still its initial value), so every module downstream of a quantized linear is calibrated on
    near-zero activations: o_proj input/output scales and k/v scales came out ~1e-7. While calibrating we
    observe only; the output quantization is applied by compressed-tensors' forward once scales are frozen.
    """
    from llmcompressor.modifiers.quantization import calibration
    from llmcompressor.modifiers.quantization.quantization import mixin

    saved = (calibration.calibrate_output_hook, mixin.calibrate_output_hook)
    calibration.calibrate_output_hook = _observe_only_output_hook
    mixin.calibrate_output_hook = _observe_only_output_hook
    try:
        yield
    finally:
        calibration.calibrate_output_hook, mixin.calibrate_output_hook = saved


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


def calibration_pipeline(config) -> str:
    """`sequential` (layer by layer, each layer calibrated on already-quantized predecessors: better GPTQ),
    except for models with KV-shared layers (Gemma 4): llmcompressor's sequential pipeline caches each
    subgraph's inputs, so the `shared_kv_states` dict that a KV-owning layer fills for the shared layers is
    lost between subgraphs (KeyError 'sliding_attention'). Those use the `basic` pipeline (whole-model
    forwards, GPTQ on all layers at the end)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if int(getattr(text, "num_kv_shared_layers", 0) or 0) > 0:
        return "basic"
    return "sequential"
