"""Recipes through llmcompressor's own API: a plain `llmcompressor.oneshot(model, recipe="recipes/...yaml",
dataset=..., output_dir=...)` after `import vllm_gemma_mobile` writes the same checkpoint, tensor for tensor, as
`gemma-mobile quantize`, and the plugin serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_gemma_mobile.quantize.run import quantize

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
N_SAMPLES, SEQ_LEN = 6, 48

# What a user writes: the project is imported for its side effects only (import fix + modifier registration).
PLAIN_ONESHOT = """
import json, sys
import vllm_gemma_mobile  # noqa: F401
from datasets import Dataset
from llmcompressor import oneshot

ids = json.load(open(sys.argv[1]))
ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
oneshot(model=sys.argv[2], recipe=sys.argv[3], dataset=ds, num_calibration_samples=len(ids),
        max_seq_length=max(len(s) for s in ids), shuffle_calibration_samples=False, output_dir=sys.argv[4])
print("PLAIN-ONESHOT-DONE")
"""


from fixtures_ckpt import checkpoint_tensors as _tensors  # noqa: E402


def _calibration_ids(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(3, vocab, (SEQ_LEN - 1 - 3 * i,), generator=g).tolist() for i in range(N_SAMPLES)]


def _plain_oneshot(base: Path, recipe: Path, ids: list[list[int]], out: Path) -> None:
    data = out.parent / (out.name + "_ids.json")
    data.write_text(json.dumps(ids))
    r = subprocess.run([sys.executable, "-c", PLAIN_ONESHOT, str(data), str(base), str(recipe), str(out)],
                       capture_output=True, text=True, timeout=1200, cwd=out.parent,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and "PLAIN-ONESHOT-DONE" in r.stdout, r.stderr[-5000:]


@pytest.fixture(scope="module", params=["gemma3", "gemma4"])
def both(request, tiny_gemma3, tiny_gemma4, tmp_path_factory):
    base, recipe = ((tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml") if request.param == "gemma3"
                    else (tiny_gemma4, RECIPES / "gemma4_e2b_mobile_ptq.yaml"))
    d = tmp_path_factory.mktemp(f"oneshot_{request.param}")
    ids = _calibration_ids(1024)
    _plain_oneshot(base, recipe, ids, d / "plain")
    cli = quantize(base, recipe, d / "cli", dataset=ids, num_samples=N_SAMPLES)
    return request.param, d / "plain", cli


def test_plain_oneshot_equals_gemma_mobile_quantize(both):
    family, plain, cli = both
    a, b = _tensors(plain), _tensors(cli)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    qa = json.loads((plain / "config.json").read_text())["quantization_config"]
    qb = json.loads((cli / "config.json").read_text())["quantization_config"]
    assert qa == qb
    # what the modifiers' lifecycle must have done for a correct checkpoint, not the runner:
    assert qa["kv_cache_scheme"] is None and qa["gemma_mobile"]["version"] == 1
    assert not any(k.startswith("lm_head") for k in a)  # dense lm_head copy dropped, table tied
    scales = [v.float() for k, v in a.items() if k.endswith("_scale")]
    assert scales and all(torch.isfinite(s).all() and (s > 0).all() for s in scales)
    assert json.loads((plain / "config.json").read_text())["tie_word_embeddings"] is True
    if family == "gemma4":
        assert qa["gemma_mobile"]["kv_cache"]["kv_sharing"] == {"4": 3, "5": 2}
        assert "model.layers.4.self_attn.k_scale" not in a  # KV-shared layers own no KV scales


def test_plain_oneshot_refuses_an_uncompressed_save(tiny_gemma3, tmp_path):
    """`save_compressed=False` would write dense weights: not the mobile format, so the save hook refuses."""
    from vllm_gemma_mobile.quantize.checkpoint import QuantizeError
    from vllm_gemma_mobile.quantize.run import calibrate

    cal = calibrate(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", num_samples=2, seq_len=16)
    with pytest.raises(QuantizeError, match="save_compressed=True"):
        cal.model.save_pretrained(tmp_path / "dense", save_compressed=False)


def test_plugin_serves_the_plain_oneshot_checkpoint(both):
    """The plain-oneshot checkpoint loads in vLLM through the plugin and generates."""
    _, plain, _ = both
    code = ("from vllm import LLM, SamplingParams\n"
            f"llm = LLM({str(plain)!r}, enforce_eager=True, max_model_len=128, dtype='bfloat16')\n"
            "assert llm.llm_engine.model_config.quantization == 'gemma_mobile'\n"
            "o = llm.generate(['To be, or not to be'], SamplingParams(temperature=0, max_tokens=8, "
            "ignore_eos=True))\n"
            "assert len(o[0].outputs[0].token_ids) == 8\n"
            "print('SERVED')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert r.returncode == 0 and "SERVED" in r.stdout, r.stderr[-5000:]
