"""Serving Google's own layout (`quant_method: "gemma"`) with no flag: `vllm serve DIR` / `vllm.LLM(DIR)`.

How: the plugin translates the checkpoint into our compressed-tensors contract with the SAME code that
`gemma-mobile convert --to ct` runs (`convert.google_to_ct`), so a Google directory and its converted twin
are served from identical tensors by construction:
- config: `GemmaMobileConfig.maybe_update_config` reads the directory's contract (`contract.read_contract`,
  which translates through the converter) and replaces Google's regex bit map by the translated
  `config_groups` + `gemma_mobile` metadata (bits per module, `modules_to_not_convert`, per-row and
  per-(row, block) embedding scales, the lm_head's own activation scales, KV bits implied by the layer types);
- tensors: vLLM's `DefaultModelLoader.get_all_weights` is wrapped (the one upstream hook here: vLLM 0.32 has no
  quantization-config hook on the weight stream) so that, for a Google directory, it yields the translated
  tensors (`weight` uint8 -> `weight_packed` int32 + `weight_shape`, `*_activation_scale` -> `input_scale` /
  `output_scale`, `embedding_quantized` / `embedding_scale`, `k_cache_scale` / `v_cache_scale` -> `k_scale` /
  `v_scale`); tensors the model's own `hf_to_vllm_mapper` drops (the towers of a `Gemma4ForConditionalGeneration`
  checkpoint, served as its text model: multimodal.py) are skipped unread; every other checkpoint goes through
  vLLM's loader untouched.
- lm_head: Google stores it beside a byte-identical `embed_tokens` (checked by the converter; anything else is a
  load error) with `tie_word_embeddings: false`; the plugin serves it from the embedding's table (ONE copy in
  memory) with the lm_head's own static input / output scales (`config.GemmaMobileConfig.get_quant_method`).
Anything the converter cannot express faithfully (unknown bits, a regex matching nothing or a module twice, a
missing or bad scale, a packed shape that disagrees with the config, calibrated SRQ = 0 on a linear) fails at
start with `ConvertError` naming the tensor or pattern.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator
import logging

import torch

logger = logging.getLogger("vllm.gemma_mobile.google_layout")  # under vllm's handlers

_MARK = "_gemma_mobile_google_layout"


def is_google_dir(path: str | Path) -> bool:
    """True for a local directory whose config.json says `quant_method: "gemma"`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "gemma"


def translated_weights(path: str | Path, keep: Callable[[str], bool] | None = None
                       ) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the Google directory PATH in our layout (HF names), as `gemma-mobile convert` writes them;
    names for which `keep` is false (what the served model drops, e.g. a multimodal checkpoint's towers when its
    text model is served, multimodal.py) are never read."""
    from vllm_gemma_mobile.convert import Deferred, google_to_ct

    _, tensors = google_to_ct(Path(path), lazy=True)
    skipped = sorted(n for n in tensors if keep is not None and not keep(n))
    for name in skipped:
        tensors.pop(name)
    logger.info("gemma_mobile: %s: Google layout translated to the compressed-tensors contract (%d tensors, "
                "repacked one at a time while loading)%s", path, len(tensors),
                f"; {len(skipped)} tensors not part of the served model skipped, unread "
                f"({', '.join(sorted({'.'.join(n.split('.')[:2]) for n in skipped}))})" if skipped else "")
    for name in sorted(tensors):
        v = tensors.pop(name)
        yield name, (v() if isinstance(v, Deferred) else v)


def install() -> None:
    """Wrap `DefaultModelLoader.get_all_weights` once per process (idempotent)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    orig = DefaultModelLoader.get_all_weights
    if getattr(orig, _MARK, False):
        return

    def get_all_weights(self, model_config, model):
        if is_google_dir(model_config.model):
            import time

            # vLLM's own iterator starts this clock (its "Loading weights took" log line reads it)
            if getattr(self, "counter_before_loading_weights", 0.0) == 0.0:
                self.counter_before_loading_weights = time.perf_counter()
            mapper = getattr(model, "hf_to_vllm_mapper", None)  # vLLM's own rule for what the model drops
            yield from translated_weights(model_config.model,
                                          None if mapper is None else lambda n: mapper.map_name(n) is not None)
            return
        yield from orig(self, model_config, model)

    setattr(get_all_weights, _MARK, True)
    get_all_weights.__wrapped__ = orig  # type: ignore[attr-defined]
    DefaultModelLoader.get_all_weights = get_all_weights


__all__ = ["install", "is_google_dir", "translated_weights"]
