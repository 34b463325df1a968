"""The real Gemma 3 270M through recipes/gemma3_mobile_ptq.yaml (cached, shared with `make demo`): size and
quality against the bf16 base, measured with the reference numerics (`load_reference`: the exact integer
numerics the plugin serves + per-layer KV fake quant)."""

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


# PTQ's outcome depends on the CPU's float rounding: rebuilt on one VM under three rounding regimes (defaults,
# oneDNN without AVX-512 BF16, ATen at AVX2) 50-88 % of the packed words differ from layer 1 on (GPTQ amplifies
# one-ulp differences of the calibration activations), and the figures below spread accordingly; the project's CI
# machine gave a fourth sample. Raw figures: docs/results/ptq-cross-cpu-2026-12-02/guards-1024-tokens.json.
# Each bound is the worst of those builds plus two binomial standard deviations of a 1024-token agreement
# (sqrt(p (1 - p) / 1024): 1.1 points at p = 0.15, 1.5 points at p = 0.6), or 10-20 % above the worst ppl / KL.
BF16_PPL = 27.99  # the bf16 base on these 1024 tokens (27.93 with oneDNN capped at AVX512_CORE: 2 % covers it)


def test_real_mobile_quality_vs_bf16(real_base, real_mobile):
    """Quality guard for the full format (served numerics incl. the 2-bit table and the int8/int4 KV cache, the first
    1024 held-out tokens). Recipe checkpoint rebuilt under four rounding regimes: ppl 2952 / 2684 / 2385 / CI
    < 3838, greedy agreement 17.9 / 15.5 / 17.3 / 13.2 %, KL 4.84 / 4.73 / 4.67. The 2-bit table makes the figure
    chaotic: recipe variants (without the KV search 3218, 15.1 %; static_minmax ranges 2155, 12.9 %) fall inside
    that spread, so this test does not rank them (the bf16-table test below does). It catches a pipeline that
    breaks: ppl above 1.3x the first build (3838; a 2x regression cannot pass) or agreement below 11 % (the CI
    build's 13.2 minus two binomial sigmas; the unusable checkpoint before the PTQ work had 10 %)."""
    r = evaluate(real_mobile, reference=real_base, max_tokens=1024, seq_len=512)
    ppl = r["perplexity"]
    assert abs(ppl["reference"] / BF16_PPL - 1) < 0.02, r
    assert ppl["reference"] < ppl["model"] < 1.3 * 2952, r
    assert r["greedy_agreement_pct"] > 11.0, r


def test_real_mobile_rest_of_the_format_with_a_bf16_table(real_base, real_mobile):
    """What everything but the 2-bit table costs (`evaluate(table="bf16")`: the bf16 table in both roles, every
    linear, static activation scale and the KV cache as served), first 1024 held-out tokens. Recipe checkpoint
    (static_mse ranges, `kv_ranges: attention_output`) under four rounding regimes: ppl 52.3 / 54.7 / 51.1 / CI
    < 60.1, agreement 65.1 / 60.1 / 61.5 / 60.0 %, KL 0.563 / 0.633 / 0.548 — KL is the steadiest figure. Recipe
    variants measured on the first build: without the KV search (`kv_ranges: observer`) 76.1, 52.4 %, KL 0.95;
    `activation_observer: static_minmax` 125.0, 43.8 %, 1.50. Bounds: ppl < 60.1 (1.10x the worst build), agreement
    > 57 % (60.0 minus two binomial sigmas), KL < 0.75 (1.18x the worst build) — each of the variants fails at
    least two of them."""
    r = evaluate(real_mobile, reference=real_base, max_tokens=1024, seq_len=512, table="bf16")
    ppl = r["perplexity"]
    assert r["table"] == "bf16" and r["model_info"]["table"] == "bf16 (ablation)"
    assert abs(ppl["reference"] / BF16_PPL - 1) < 0.02, r
    assert ppl["reference"] < ppl["model"] < 60.1, r
    assert r["greedy_agreement_pct"] > 57.0, r
    assert r["kl_mean"] < 0.75, r
