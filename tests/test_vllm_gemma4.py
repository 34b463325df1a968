"""The plugin serves our own Gemma 4 recipe output (recipes/gemma4_e2b_mobile_ptq.yaml on the tiny random
Gemma 4 of `models.tiny`: sliding + global layers with different head dims, KV-shared layers with double-wide
2-bit MLPs, a 4-bit per-layer-embedding table with one scale per (row, layer block), 8-bit PLE linears, a
2-bit tied embedding / lm_head with final logit softcapping).

Reference: `evaluate.reference.load_reference` (transformers + compressed-tensors fake quant) with the KV fake
quant switched off, because the engine here serves the model-dtype KV cache (`GEMMA_MOBILE_KV_CACHE=bf16`).

Tolerance (derived, not guessed): the reference rounds every SRQ step (x / s_x, the matmul, y / s_y) in bf16,
the plugin computes the integer part exactly with an f32 epilogue. Neither is "the" exact result, so the test
measures, on the very token sequences vLLM produced, how far the reference moves when the same reference runs
in float32 (`model.float()`: SRQ and everything else in f32) — the bf16-vs-f32 spread — and requires
* greedy tokens equal to the bf16 reference's teacher-forced argmax, except bf16 near-ties (`compare_greedy`),
  with chosen-token log-prob differences below the largest spread seen at any position;
* the mean |log-prob difference| (prompt_logprobs + generated tokens) against the bf16 reference at most 1.5x the
  mean spread. Measured on this model: 0.147 vs a spread of 0.136 (1.08x); a random tiny model has flat,
  chaotic logits, so single positions differ by up to ~2 nats on BOTH comparisons and no per-position bound
  would be honest. What the mean bound catches (measured on the reference): swapping two layer blocks of the
  PLE table 0.91 (6.7x), the quantized KV cache served against this KV-off reference 0.26 (1.9x).
Prompts are longer than the model's sliding window (16 tokens), so sliding, global and KV-shared layers all
contribute.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import compare_greedy, teacher_forced  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model inspection below

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gemma4_e2b_mobile_ptq.yaml"
PROMPTS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog, and then it",
    "Once upon a time there was a small model that learned to speak in two bits. One day it",
    "To be, or not to be, that is the question. Shall I compare thee to a summer's day? Thou",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(",
    "Water boils at one hundred degrees at sea level, but on a high mountain the water boils at",
]
N_TOKENS = 32
MEAN_SPREAD_FACTOR = 1.5


@pytest.fixture(scope="module")
def mobile_g4(tiny_gemma4, tmp_path_factory) -> Path:
    from vllm_gemma_mobile.quantize.run import quantize

    return quantize(tiny_gemma4, RECIPE, tmp_path_factory.mktemp("g4serve") / "mobile", num_samples=8, seq_len=64)


@pytest.fixture(scope="module")
def llm(mobile_g4):
    from vllm import LLM

    with pytest.MonkeyPatch.context() as mp:  # the engine's worker processes inherit this at start
        mp.setenv("GEMMA_MOBILE_KV_CACHE", "bf16")
        engine = LLM(str(mobile_g4), enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
    yield engine
    del engine


def test_engine_serves_gemma4_recipe_output(llm, mobile_g4):
    assert llm.llm_engine.model_config.quantization == "gemma_mobile"

    from vllm_gemma_mobile.vllm.inspect_model import describe

    info = llm.apply_model(describe)[0]
    cfg = json.loads((mobile_g4 / "config.json").read_text())
    v, layers, ple_dim = cfg["vocab_size_per_layer_input"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    assert info["embedding_bits"] == 2 and info["lm_head_tied_to_embedding"] and info["lm_head_own_params"] == []
    ple = info["per_layer_embedding"]
    # the PLE table stays packed: compressed-tensors' int32 rows, 4 bits per weight, one scale per (row, layer)
    assert ple["gather_only"] and ple["bits"] == 4 and ple["group_size"] == ple_dim
    assert ple["packed_dtype"] == "torch.int32" and ple["packed_bytes"] * 2 == v * layers * ple_dim
    assert ple["scale_shape"] == [v, layers]
    # the one float matrix: per_layer_model_projection, left float as in Google's checkpoints (format.md)
    assert [n.rsplit(".", 2)[-2] for n in info["float_2d_params"]] == ["per_layer_model_projection"]
    # 4 layers with qkv, o, gate_up, down + 2 KV-shared layers with q, o, gate_up, down; PLE gate + projection
    # in every layer
    assert info["n_quant_linear"] == 4 * 4 + 2 * 4 + 2 * layers
    assert info["linear_bits"] == [2, 4, 8]
    kv = info["kv"]
    assert [k["bits"] for k in kv[:4]] == [8, 8, 4, 8] and all(k["k_scale"] > 0 for k in kv[:4])
    from vllm_gemma_mobile.vllm.float_ops import describe as float_ops

    fo = llm.apply_model(float_ops)[0]  # RoPE / norms with the reference's rounding (vllm/float_ops.py)
    assert fo["rotary_total"] >= 1 and fo["rotary"] == fo["rotary_total"], fo
    assert fo["rms_norm_total"] > 0 and fo["rms_norm"] == fo["rms_norm_total"], fo
    assert all(k["k_scale"] is None for k in kv[4:])  # KV-shared: no scales of their own


def test_greedy_and_logprobs_match_reference(llm, mobile_g4):
    from vllm import SamplingParams

    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled, load_reference

    window = json.loads((mobile_g4 / "config.json").read_text())["sliding_window"]
    sp = SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    outs = llm.generate(PROMPTS, sp)
    cases, served, seqs = [], [], []
    for o in outs:
        prompt, toks = list(o.prompt_token_ids), list(o.outputs[0].token_ids)
        assert len(prompt) > window and len(toks) == N_TOKENS
        lps = [d[t].logprob for t, d in zip(toks, o.outputs[0].logprobs)]
        cases.append((prompt, toks, lps))
        served.append([d[t].logprob for t, d in zip(prompt[1:], o.prompt_logprobs[1:])] + lps)
        seqs.append(prompt + toks)

    ref, _ = load_reference(mobile_g4)
    kv_fake_quant_enabled(ref, False)
    ref_bf16 = teacher_forced(ref, seqs)
    ref_f32 = teacher_forced(ref.float(), seqs)
    ref.to(torch.bfloat16)
    spread = [abs(a - b) for xs, ys in zip(ref_bf16, ref_f32) for a, b in zip(xs, ys)]
    diff = [abs(a - b) for xs, ys in zip(served, ref_bf16) for a, b in zip(xs, ys)]

    greedy = compare_greedy(ref, cases, max_lp_diff=max(spread))
    mean_diff, mean_spread = statistics.mean(diff), statistics.mean(spread)
    print({"greedy": greedy, "positions": len(diff), "mean_diff": round(mean_diff, 4),
           "mean_spread": round(mean_spread, 4), "max_diff": round(max(diff), 4), "max_spread": round(max(spread), 4)})
    assert mean_diff <= MEAN_SPREAD_FACTOR * mean_spread, (mean_diff, mean_spread)


# ------------------------------------------------------------------ load-time validation of Gemma 4 checkpoints


def _edit(src: Path, dst: Path, tensors=None, config=None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        (f,) = dst.glob("*.safetensors")
        t = load_file(str(f))
        tensors(t)
        save_file(t, str(f), metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _ple_groups(t):
    t["model.embed_tokens_per_layer.weight_scale"] = t["model.embed_tokens_per_layer.weight_scale"][:, :-1].contiguous()


def _narrow_mlp(t):
    t["model.layers.4.mlp.gate_proj.weight_shape"][0] = 128  # KV-shared layer: double-wide (256) expected


def _shared_k_scale(t):
    t["model.layers.4.self_attn.k_scale"] = t["model.layers.3.self_attn.k_scale"].clone()


def _group_embed(q):
    g = next(g for g in q["config_groups"].values() if any(x.endswith("embed_tokens$") for x in g["targets"]))
    g["weights"].update(strategy="group", group_size=16)


def _shared_bits(q):
    q["gemma_mobile"]["kv_cache"]["layer_bits"][4] = 8


BAD = {
    "ple_scale_groups": ({"tensors": _ple_groups},
                         "model.embed_tokens_per_layer.weight_scale: shape [1024, 5], expected [1024, 6]"),
    "double_wide_mlp": ({"tensors": _narrow_mlp},
                        "model.layers.4.mlp.gate_proj.weight_shape = [128, 64]: the model config (config.json) "
                        "implies [256, 64]"),
    "kv_shared_own_scale": ({"tensors": _shared_k_scale}, "model.layers.4.self_attn.k_scale: layer 4 is KV-shared"),
    "group_strategy_on_tied_table": ({"config": _group_embed}, ".weights.strategy = 'group': supported only for"),
    "kv_shared_bits": ({"config": _shared_bits}, "kv_cache.layer_bits[4] = 8: layer 4 is KV-shared"),
}


def test_recipe_output_validates(mobile_g4):
    from vllm_gemma_mobile.contract import read_contract

    s = read_contract(mobile_g4).summary()
    assert s["embedding"] == 2 and s["per_layer_embedding"] == 4 and set(s["linear"]) == {2, 4, 8}


@pytest.mark.parametrize("case", sorted(BAD))
def test_corrupted_gemma4_checkpoint_fails_naming_the_tensor(mobile_g4, tmp_path, case):
    from vllm_gemma_mobile.contract import ContractError, read_contract

    edits, msg = BAD[case]
    bad = _edit(mobile_g4, tmp_path / case, **edits)
    with pytest.raises(ContractError) as e:
        read_contract(bad).summary()
    assert msg in str(e.value), str(e.value)


QUANTIZED_KV_CHILD = """
import json, sys
from vllm import LLM, SamplingParams
from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache
llm = LLM(sys.argv[1], enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
prompts = json.loads(sys.argv[2])
outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1))
cases = [(p, list(o.outputs[0].token_ids), [d[t].logprob for t, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
         for p, o in zip(prompts, outs)]
print("RESULT" + json.dumps({"cases": cases, "kv": llm.apply_model(describe_kv_cache)[0]}))
"""


def test_quantized_kv_cache_with_kv_shared_layers(mobile_g4):
    """The same checkpoint with the quantized KV cache (the default): KV-owning layers get uint8 caches (int8
    sliding, packed int4 global), the KV-shared layers read their target layer's cache, and greedy tokens match
    the reference WITH its KV fake quant (shared layers use their source layer's scales there too), up to bf16
    near-ties (compare_greedy, the Gemma 3 engine tests' bound)."""
    import os
    import subprocess
    import sys

    from vllm_gemma_mobile.evaluate.reference import load_reference
    from vllm_gemma_mobile.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    prompts = [tok(p).input_ids[:60] for p in PROMPTS[:4]]
    env = {k: v for k, v in os.environ.items() if k != "GEMMA_MOBILE_KV_CACHE"}
    r = subprocess.run([sys.executable, "-c", QUANTIZED_KV_CHILD, str(mobile_g4), json.dumps(prompts)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "quantized KV cache active: int8 x 3 layers, int4 x 1 layers" in r.stdout + r.stderr, r.stdout[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1].splitlines()[0])
    kv = res["kv"]
    assert [k["dtype"] for k in kv] == ["torch.uint8"] * 6, kv
    assert [k["shared_from"] for k in kv[:4]] == [None] * 4
    assert [k["shared_from"].split(".layers.")[1].split(".")[0] for k in kv[4:]] == ["3", "2"], kv
    ref, _ = load_reference(mobile_g4)  # KV fake quant on
    print(compare_greedy(ref, [tuple(c) for c in res["cases"]], max_lp_diff=0.35))
