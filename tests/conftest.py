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


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def real_base() -> Path:
    """The real google/gemma-3-270m (bf16, from the PyPI GGUF), built once per machine."""
    from vllm_gemma_mobile.models.gemma3_base import build_base

    return build_base("gemma3-270m", cache_dir() / "gemma3-270m-bf16")


@pytest.fixture(scope="session")
def real_mobile(real_base) -> Path:
    """The real 270M through recipes/gemma3_mobile_ptq.yaml (recipe defaults), the same checkpoint `make demo`
    serves; rebuilt only when the base, recipe or quantize code changes."""
    from vllm_gemma_mobile.quantize.run import quantize

    return quantize(real_base, REPO / "recipes" / "gemma3_mobile_ptq.yaml", cache_dir() / "gemma3-270m-mobile",
                    reuse=True)
