"""Make llmcompressor 0.12 usable in this environment from a plain `import vllm_gemma_mobile` (cheap: imports
nothing heavy; idempotent; installed by the package `__init__`).

Two import hooks (one `sys.meta_path` finder, acting only on the two module names below):

* `llmcompressor.modeling.moe.granitemoe` imports `GraniteMoeParallelExperts`, which transformers removed in
  5.17; our environment pins transformers 5.19 (vLLM's pin wins, see requirements/cpu.lock), so every
  `oneshot` dies in llmcompressor's MoE check. The real module is tried first; only if it fails for that
  reason is an empty stand-in registered (Gemma is not MoE; nothing of Granite is needed). Logged once.
* After the `llmcompressor` package finishes importing, `vllm_gemma_mobile.quantize` is imported, which
  registers our recipe modifiers (`MobileGPTQModifier`, `MobileQuantizationModifier`) with llmcompressor's
  `ModifierFactory` and its calibration-pipeline choice (see `quantize/workarounds.py`), so a recipe YAML that
  names them works with plain `llmcompressor.oneshot`. If llmcompressor was imported before this package,
  that registration happens at `install()` time instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import types

logger = logging.getLogger(__name__)

GRANITEMOE = "llmcompressor.modeling.moe.granitemoe"
LLMCOMPRESSOR = "llmcompressor"
_MISSING_SYMBOL = "GraniteMoeParallelExperts"


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, fullname: str):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if self._fullname == GRANITEMOE:
            try:
                self._loader.exec_module(module)
            except ImportError as e:
                if _MISSING_SYMBOL not in str(e):
                    raise
                # imported for its registration side effect only; Gemma has no Granite MoE blocks
                module.GraniteMoeLinearExperts = None
                logger.info("llmcompressor: %s cannot import %s (removed from transformers); registered an "
                            "empty stand-in (Gemma is not MoE)", GRANITEMOE, _MISSING_SYMBOL)
            return
        self._loader.exec_module(module)
        if self._fullname == LLMCOMPRESSOR:
            _register_modifiers()


class _LlmcompressorHooks(importlib.abc.MetaPathFinder):
    """Wraps the real loaders of the two hooked modules; every other import is left alone."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (GRANITEMOE, LLMCOMPRESSOR):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WrappedLoader(spec.loader, fullname)
        return spec


def _register_modifiers() -> None:
    import vllm_gemma_mobile.quantize  # noqa: F401  (registers the modifiers and the pipeline choice)


def install() -> None:
    """Install the import hooks once per process (see module docstring)."""
    if any(isinstance(f, _LlmcompressorHooks) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _LlmcompressorHooks())
    if LLMCOMPRESSOR in sys.modules and getattr(sys.modules[LLMCOMPRESSOR], "__spec__", None) is not None:
        _register_modifiers()
