"""vllm-gemma-mobile: Gemma "mobile quantization" (wNa8o8 + hybrid int KV) for compressed-tensors and vLLM."""

__version__ = "0.1.0"
