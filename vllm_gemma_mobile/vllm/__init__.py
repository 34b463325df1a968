"""vLLM plugin (entry point `vllm.general_plugins: gemma_mobile`)."""


def register() -> None:
    """Register the gemma-mobile quantization config with vLLM, the Google-layout weight translation
    (google_layout.py), text-only serving of Gemma 4 multimodal checkpoints (multimodal.py) and the reference
    rounding of the float ops of gemma_mobile models (float_ops.py); idempotent, cheap, runs in every vLLM
    process."""
    from vllm_gemma_mobile.vllm import config  # noqa: F401  (registration happens at import)
    from vllm_gemma_mobile.vllm import float_ops, google_layout, multimodal

    google_layout.install()
    multimodal.install()
    float_ops.install()
