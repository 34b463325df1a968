"""vllm-gemma-mobile: Gemma "mobile quantization" (wNa8o8 + hybrid int KV) for compressed-tensors and vLLM."""

from vllm_gemma_mobile import llmcompressor_compat as _llmcompressor_compat

__version__ = "0.1.0"

# Makes `llmcompressor.oneshot(model, recipe="recipes/...yaml", ...)` work in this environment: fixes an import
# that fails against our pinned transformers and registers our recipe modifiers once llmcompressor is imported.
_llmcompressor_compat.install()
