"""The real Gemma 3 270M through recipes/gemma3_mobile_ptq.yaml (cached, shared with `make demo`): size and
quality against the bf16 base, measured with the reference numerics (transformers + compressed-tensors fake
quant + per-layer KV fake quant)."""

import json

import pytest

from vllm_gemma_mobile.evaluate.quality import evaluate
from vllm_gemma_mobile.evaluate.report import report

pytestmark = pytest.mark.slow


def test_real_mobile_checkpoint_layout_and_size(real_base, real_mobile):
    cfg = json.loads((real_mobile / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    bits = qc["gemma_mobile"]["kv_cache"]["layer_bits"]
    types = cfg["layer_types"]
    assert len(bits) == 18 and all(b == (4 if t == "full_attention" else 8) for b, t in zip(bits, types))
    mobile, bf16 = report(real_mobile), report(real_base)
    ratio = bf16["safetensors_bytes"] / mobile["safetensors_bytes"]
    assert ratio >= 5.0, f"mobile checkpoint only {ratio:.2f}x smaller than bf16"
    # the 2-bit table dominates no more: 262144 x 640 x 2 bits = 41.9 MB (+ one scale per row)
    assert mobile["bytes"]["embeddings"] < 45e6


def test_real_mobile_quality_vs_bf16(real_base, real_mobile):
    """A guard against broken pipelines, not a quality target: PTQ of this 270M into the full mobile format is
    heavily degraded (README "Results": 8192 tokens, ppl 47.6 bf16 -> 4531 mobile, 10% greedy agreement;
    the per-component ablation shows static int8 activations and int4 KV do most of the damage, the 4-bit
    weights almost none). A broken scale or clipping path is far worse: the 2-bit table with llmcompressor's
    default MSE search range gave ppl 1.3e5 (2% agreement), garbage scales give ~vocab size."""
    r = evaluate(real_mobile, reference=real_base, max_tokens=1024, seq_len=512)
    ppl = r["perplexity"]
    assert 10 < ppl["reference"] < 100, r
    assert ppl["reference"] < ppl["model"] < 30_000, r
    assert r["greedy_agreement_pct"] > 3, r
