"""Each llmcompressor / compressed-tensors workaround (vllm_gemma_mobile/quantize/workarounds.py) is needed:
these tests switch one off and show the failure it prevents, on a tiny Gemma."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_gemma_mobile.quantize.checkpoint as checkpoint
import vllm_gemma_mobile.quantize.workarounds as workarounds
from vllm_gemma_mobile.quantize.run import QuantizeError, calibrate, quantize

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
G3, G4 = RECIPES / "gemma3_mobile_ptq.yaml", RECIPES / "gemma4_e2b_mobile_ptq.yaml"


def test_granitemoe_stub_is_needed_in_this_environment():
    """Without the stub, llmcompressor's MoE registry cannot even be imported next to transformers 5.19;
    a plain `import vllm_gemma_mobile` (import hook, vllm_gemma_mobile.llmcompressor_compat) fixes it."""
    code = "import llmcompressor.modeling.moe.granitemoe"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and "GraniteMoeParallelExperts" in r.stderr
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "import vllm_gemma_mobile, vllm_gemma_mobile.llmcompressor_compat as c\n"
            "c.install(); c.install()\n"
            "import llmcompressor.modeling.moe.granitemoe as g\n"
            "from llmcompressor.modeling.moe.linear_experts import LinearExperts2D\n"
            "LinearExperts2D.get_registration(object)\n"  # the lazy import oneshot's MoE check performs
            "import sys\n"
            "assert sum(isinstance(f, c._LlmcompressorHooks) for f in sys.meta_path) == 1\n"
            "assert g.GraniteMoeLinearExperts is None\n"
            "from llmcompressor.modifiers.factory import ModifierFactory\n"
            "assert 'MobileGPTQModifier' in ModifierFactory._registered_registry\n"
            "print('OK')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
    assert r.stderr.count("registered an empty stand-in") == 1, r.stderr[-3000:]


def test_output_calibration_hook_bug(tiny_gemma3, monkeypatch):
    """Upstream's output hook quantizes with the not-yet-computed output_scale: downstream modules are
    calibrated on ~zero activations. With our observe-only hook their scales match the real activation range."""
    fixed = calibrate(tiny_gemma3, G3, num_samples=4, seq_len=32).model
    good = {n: m.input_scale.item() for n, m in fixed.named_modules() if n.endswith(("o_proj", "down_proj"))}
    monkeypatch.setattr(workarounds, "observe_only_output_calibration", contextlib.nullcontext)
    monkeypatch.setattr(workarounds, "poison_uncalibrated_scales", lambda model: 0)
    try:
        broken = calibrate(tiny_gemma3, G3, num_samples=4, seq_len=32).model
        bad = {n: m.input_scale.item() for n, m in broken.named_modules() if n in good}
        collapsed = [n for n in good if not bad[n] > good[n] / 100]
    except QuantizeError:  # an uncalibratable (NaN/0) scale is the other way the bug shows
        collapsed = list(good)
    assert collapsed, "the upstream hook no longer corrupts calibration: drop the workaround"
    assert all(0.001 < v < 10 for v in good.values())


def test_scales_outside_decoder_layers_need_finishing(tiny_gemma3, monkeypatch):
    """The sequential pipeline never computes embed_tokens.weight_scale; without the fix the poisoned (NaN)
    scale is caught before anything is saved."""
    monkeypatch.setattr(workarounds, "finish_calibration_outside_layers", lambda model: [])
    with pytest.raises(QuantizeError, match=r"embed_tokens\.weight_scale"):
        calibrate(tiny_gemma3, G3, num_samples=2, seq_len=16)


def test_gemma4_needs_per_layer_attribute_access(tiny_gemma4, monkeypatch):
    monkeypatch.setattr(workarounds, "allow_gemma4_per_layer_attributes", lambda config: None)
    with pytest.raises(Exception, match="head_dim"):
        calibrate(tiny_gemma4, G4, num_samples=2, seq_len=16)


def test_gemma4_breaks_the_sequential_pipeline(tiny_gemma4, monkeypatch):
    """Sequential fails on Gemma 4 twice over: GPTQ of the prelude's per_layer_model_projection finds no weight
    statistics, and the KV-shared layers lose `shared_kv_states` between subgraphs (KeyError). Asking for it
    explicitly is refused up front with a clear message; with that guard lifted, the failure shows."""
    with pytest.raises(ValueError, match="pipeline='sequential' cannot calibrate this model.*pipeline='basic'"):
        calibrate(tiny_gemma4, G4, num_samples=2, seq_len=16, pipeline="sequential")
    monkeypatch.setattr(workarounds, "calibration_pipelines", lambda config: ("basic", ("basic", "sequential")))
    with pytest.raises((KeyError, AssertionError), match="sliding_attention|full_attention|No statistics"):
        calibrate(tiny_gemma4, G4, num_samples=2, seq_len=16, pipeline="sequential")
    assert workarounds.calibration_pipeline(__import__("transformers").AutoConfig.from_pretrained(tiny_gemma4)) \
        == "basic"


def test_subclassed_gptq_modifier_would_skip_calibration():
    """llmcompressor infers the pipeline from the exact class name: without our choice, MobileGPTQModifier
    gets `datafree` (no calibration at all, uncalibrated scales saved by a plain oneshot)."""
    from llmcompressor.pipelines.registry import CalibrationPipeline

    from vllm_gemma_mobile.quantize.modifier import MobileGPTQModifier

    assert CalibrationPipeline._infer_pipeline([MobileGPTQModifier(preset="gemma3")]) == "datafree"
    assert workarounds._ORIGINAL_FROM_MODIFIERS is not None  # the patch is installed at import


def test_llmcompressor_saves_an_untied_lm_head_copy(tiny_gemma3, tmp_path, monkeypatch):
    """Without dropping it, the dense bf16 lm_head lands next to the packed table (2 tables on disk)."""
    from safetensors import safe_open

    drop = checkpoint.drop_tied_lm_head
    monkeypatch.setattr(checkpoint, "drop_tied_lm_head", lambda ckpt: [])
    ckpt = quantize(tiny_gemma3, G3, tmp_path / "c", num_samples=2, seq_len=16)
    with safe_open(next(ckpt.glob("*.safetensors")), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    assert drop(ckpt) == ["lm_head.weight"]
    with safe_open(next(ckpt.glob("*.safetensors")), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())
