"""Shared fixtures. Built models are cached under GEMMA_MOBILE_CACHE (default ~/.cache/vllm-gemma-mobile)
so the real Gemma 3 270M base and its mobile checkpoint are built once per machine, not once per run."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cache_dir() -> Path:
    d = Path(os.environ.get("GEMMA_MOBILE_CACHE", Path.home() / ".cache" / "vllm-gemma-mobile"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    from vllm_gemma_mobile.models.tiny import build_tiny

    return build_tiny("gemma3", tmp_path_factory.mktemp("tiny") / "gemma3")


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    from vllm_gemma_mobile.models.tiny import build_tiny

    return build_tiny("gemma4", tmp_path_factory.mktemp("tiny") / "gemma4")
