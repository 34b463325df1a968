"""Gemma 4 multimodal checkpoints (`Gemma4ForConditionalGeneration`, the wrapper Google ships): served as their
text model, with no flag.

Why: vLLM 0.32's `Gemma4ForConditionalGeneration` (gemma4_mm.py) imports transformers' `Gemma4Processor`, whose
image processor needs torchvision, which this CPU environment deliberately lacks (requirements/cpu.lock): the
class cannot even be imported here, and its towers under this plugin would be untested anyway. vLLM's own
`Gemma4ForCausalLM` reads the same checkpoint text-only: it dereferences `text_config`, maps
`model.language_model.` to `model.` and drops the vision / audio towers and their embedders (its
`hf_to_vllm_mapper`).

How: for every checkpoint this plugin claims (`GemmaMobileConfig.override_quantization_method`, any layout), the
architecture in vLLM's hf config is switched to the text class when the config is loaded (vLLM's `get_config`,
as imported by `vllm.config.model`, is wrapped: the one upstream hook before the architecture is resolved), with
one warning naming what is not served. The text model's quantized layers then go through exactly the code path of
a text-only checkpoint (same translation of Google's layout, same layers); the towers' tensors are never read
(google_layout.py skips what the model's mapper drops). Image / audio input is not served.
"""

from __future__ import annotations

from typing import Any

from vllm.logger import init_logger

logger = init_logger("vllm.gemma_mobile.multimodal")  # under vllm's handlers

TEXT_ARCHITECTURE = {"Gemma4ForConditionalGeneration": "Gemma4ForCausalLM"}  # multimodal wrapper -> text class
TOWER_CONFIGS = ("vision_config", "audio_config")
_MARK = "_gemma_mobile_text_only"


def text_architecture(hf_config: Any) -> str | None:
    """The text-only architecture to serve `hf_config` with, or None (not a multimodal wrapper we claim)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if len(archs) != 1 or archs[0] not in TEXT_ARCHITECTURE:
        return None
    from vllm_gemma_mobile.vllm.config import NAME, GemmaMobileConfig

    qc = getattr(hf_config, "quantization_config", None)
    if GemmaMobileConfig.override_quantization_method(qc, None, hf_config) != NAME:
        return None
    return TEXT_ARCHITECTURE[archs[0]]


def serve_text_only(model: Any, hf_config: Any) -> None:
    """Switch `hf_config` (loaded by vLLM for MODEL) to its text architecture when `text_architecture` says so."""
    arch = text_architecture(hf_config)
    if arch is None:
        return
    towers = [k.split("_")[0] for k in TOWER_CONFIGS if getattr(hf_config, k, None) is not None]
    logger.warning("gemma_mobile: %s: %s served as its text model (vLLM's %s): its towers (%s) and their embedders "
                   "are not loaded and image/audio input is not served (vLLM's multimodal Gemma 4 needs torchvision, "
                   "absent from the CPU environment)", model, hf_config.architectures[0], arch,
                   ", ".join(towers) or "none")
    hf_config.architectures = [arch]


def install() -> None:
    """Wrap the `get_config` that vLLM's `ModelConfig` calls, once per process (idempotent)."""
    import vllm.config.model as model_config

    orig = model_config.get_config
    if getattr(orig, _MARK, False):
        return

    def get_config(model, *args, **kwargs):
        hf_config = orig(model, *args, **kwargs)
        serve_text_only(model, hf_config)
        return hf_config

    setattr(get_config, _MARK, True)
    get_config.__wrapped__ = orig  # type: ignore[attr-defined]
    model_config.get_config = get_config


__all__ = ["TEXT_ARCHITECTURE", "install", "serve_text_only", "text_architecture"]
