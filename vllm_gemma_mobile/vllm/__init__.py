"""vLLM plugin (entry point `vllm.general_plugins: gemma_mobile`)."""


def register() -> None:
    """Register the gemma-mobile quantization config with vLLM (idempotent, cheap)."""
    from vllm_gemma_mobile.vllm import config  # noqa: F401  (registration happens at import)
