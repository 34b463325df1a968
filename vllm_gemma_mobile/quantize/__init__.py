"""Producing mobile checkpoints: llmcompressor modifiers, recipe runner, upstream workarounds.

Importing this package registers `MobileGPTQModifier` / `MobileQuantizationModifier` with llmcompressor (so a
recipe YAML can name them in a plain `llmcompressor.oneshot` call) and the calibration-pipeline choice they need.
"""

from vllm_gemma_mobile.quantize import modifier as _modifier  # noqa: F401  (registration at import)
