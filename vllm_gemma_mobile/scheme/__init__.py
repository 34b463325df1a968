"""The mobile format as data: MobileScheme, presets, expansion into compressed-tensors groups, validation."""

from vllm_gemma_mobile.scheme.presets import PRESETS, preset
from vllm_gemma_mobile.scheme.spec import (SUPPORTED_BITS, Expanded, MobileScheme, SchemeError, expand,
                                           kv_sharing, layer_types)

__all__ = ["PRESETS", "SUPPORTED_BITS", "Expanded", "MobileScheme", "SchemeError", "expand", "kv_sharing",
           "layer_types", "preset"]
