"""The real Gemma 3 270M base, built from the PyPI GGUF into the shared cache (first run ~1 min, then cached)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cache_dir
from vllm_gemma_mobile.models.gemma3_base import MARKER, build_base, is_complete

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base() -> Path:
    return build_base("gemma3-270m", cache_dir() / "gemma3-270m-bf16")


@pytest.fixture(scope="module")
def loaded(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(base)


def test_layout_and_bos(base, loaded):
    from safetensors import safe_open

    model, tok = loaded
    assert tok("Hello").input_ids[0] == 2 and tok("Hello").input_ids.count(2) == 1
    assert tok("Hello", add_special_tokens=False).input_ids[0] != 2
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True and cfg["num_hidden_layers"] == 18
    gen = json.loads((base / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 2 and gen["eos_token_id"] == [1, 106] and gen["pad_token_id"] == 0
    assert not gen.get("do_sample") and "temperature" not in gen and "top_k" not in gen
    assert json.loads((base / "tokenizer_config.json").read_text())["add_bos_token"] is True
    with safe_open(str(base / "model.safetensors"), "pt") as st:
        keys = list(st.keys())
        assert "model.embed_tokens.weight" in keys and not any(k.startswith("lm_head") for k in keys)
        assert st.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 275e6


@pytest.mark.parametrize("prompt", ["The Eiffel Tower is located in the city of",
                                    "The capital of Germany is Berlin. The capital of France is"])
def test_greedy_is_coherent(loaded, prompt):
    model, tok = loaded
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_bos_matters(loaded):
    """Without BOS the model is much worse on the same text (why the BOS fix is needed)."""
    from vllm_gemma_mobile.evaluate.data import evaluation_text

    model, tok = loaded
    ids = tok(evaluation_text(3000), add_special_tokens=False, return_tensors="pt").input_ids[:, :200]
    with_bos = torch.cat([torch.tensor([[2]]), ids], 1)
    with torch.no_grad():
        nll_bos = model(with_bos, labels=with_bos).loss.item()
        nll_raw = model(ids, labels=ids).loss.item()
    assert nll_bos < 4.0 and nll_raw > nll_bos + 0.5, (nll_bos, nll_raw)


def test_second_build_is_a_cache_hit(base):
    mtime = (base / "model.safetensors").stat().st_mtime_ns
    assert build_base("gemma3-270m", base) == base  # no rebuild: the files are untouched
    assert (base / "model.safetensors").stat().st_mtime_ns == mtime and is_complete(base)


def test_incomplete_build_is_not_complete(base, tmp_path):
    (tmp_path / MARKER).write_text((base / MARKER).read_text())  # marker without the files
    assert not is_complete(tmp_path)
    assert not is_complete(tmp_path / "missing")
