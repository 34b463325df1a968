"""vLLM plugin (entry point `vllm.general_plugins: gemma_mobile`)."""


def register() -> None:
    """Register the gemma-mobile quantization config with vLLM, the Google-layout weight translation
    (google_layout.py) and text-only serving of Gemma 4 multimodal checkpoints (multimodal.py); idempotent, cheap,
    runs in every vLLM process."""
    from vllm_gemma_mobile.vllm import config  # noqa: F401  (registration happens at import)
    from vllm_gemma_mobile.vllm import google_layout, multimodal

    google_layout.install()
    multimodal.install()
