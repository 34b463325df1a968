"""Random-weight Gemma 4 E2B / E4B checkpoints (`vllm_gemma_mobile.models.synthetic`, `gemma-mobile synth`).

Scaled down (7-8 layers, hidden 64, vocab 512) with the real structure (full attention every 5th / 6th layer,
KV-shared layers, double-wide MLPs in E2B, PLE), each layout is read back by code that did not write it:
the bit map through compressed-tensors' matching / `convert.google_module_bits`, the ct layout through the
plugin's load-time validation and `gemma-mobile convert` (whose Google output must equal our Google layout tensor
for tensor), the Google layout through transformers' own `quant_method: gemma` loader. The real-size configs are
checked for their shapes and parameter counts without writing anything.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from fixtures_ckpt import checkpoint_tensors as tensors
from kernels import bitpack
from vllm_gemma_mobile.models.synthetic import bit_map, synthetic_config, tensor_specs, write_synthetic

SCALE_DOWN = {
    "e2b": dict(num_hidden_layers=7, hidden_size=64, intermediate_size=128, num_kv_shared_layers=2, vocab_size=512,
                head_dim=32, global_head_dim=64, hidden_size_per_layer_input=16, sliding_window=16,
                max_position_embeddings=4096),
    "e4b": dict(num_hidden_layers=8, hidden_size=64, intermediate_size=96, num_kv_shared_layers=2, vocab_size=512,
                head_dim=32, global_head_dim=64, hidden_size_per_layer_input=16, sliding_window=16,
                max_position_embeddings=4096),
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    cache: dict = {}

    def get(kind: str, layout: str) -> Path:
        if (kind, layout) not in cache:
            cache[kind, layout] = write_synthetic(kind, root / f"{kind}-{layout}", layout, seed=1,
                                                  scale_down=SCALE_DOWN[kind], progress=False)
        return cache[kind, layout]
    return get


def format_md_bits(kind: str, config) -> dict[str, int]:
    """format.md's "Bit map of the real checkpoints", spelled out independently of the presets."""
    n = config.num_hidden_layers
    first_shared = n - config.num_kv_shared_layers
    out = {"model.embed_tokens": 2, "model.embed_tokens_per_layer": 4 if kind == "e2b" else 2}
    for i in range(n):
        p = f"model.layers.{i}."
        for m in ("q_proj", "o_proj") + (("k_proj", "v_proj") if i < first_shared else ()):
            out[p + "self_attn." + m] = 4
        for m in ("gate_proj", "up_proj", "down_proj"):
            out[p + "mlp." + m] = 2 if kind == "e2b" and i >= first_shared else 4
        out[p + "per_layer_input_gate"] = out[p + "per_layer_projection"] = 8
    return out  # per_layer_model_projection: float


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_bit_map_is_googles_and_the_presets(kind, synth):
    from compressed_tensors.utils.match import is_match

    from vllm_gemma_mobile.convert import _skeleton, google_module_bits

    config = synthetic_config(kind, SCALE_DOWN[kind])
    want = format_md_bits(kind, config)
    preset_bits, _, _ = bit_map(kind, config)
    assert preset_bits == want

    ct = synth(kind, "ct")
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    _, _, mods, _, _, _ = _skeleton(ct)
    t = tensors(ct)
    got = {}
    for name in sorted(k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed")):
        groups = [g for g in qc["config_groups"].values() if is_match(name, mods[name], g["targets"], qc["ignore"])]
        assert len(groups) == 1, name
        got[name] = groups[0]["weights"]["num_bits"]
        n, k = t[f"{name}.weight_shape"].tolist()
        codes = bitpack.ct_unpack(t[f"{name}.weight_packed"], got[name], k)
        lo, hi = bitpack.code_range(got[name])
        assert codes.shape == (n, k) and int(codes.min()) == lo and int(codes.max()) == hi  # uniform on the grid
    assert got == want
    assert t["model.per_layer_model_projection.weight"].dtype == torch.bfloat16
    kv = qc["gemma_mobile"]["kv_cache"]
    shared = range(config.num_hidden_layers - config.num_kv_shared_layers, config.num_hidden_layers)
    assert kv["layer_bits"] == [None if i in shared else {"sliding_attention": 8, "full_attention": 4}[lt]
                                for i, lt in enumerate(config.layer_types)]
    for i in range(config.num_hidden_layers):
        has = f"model.layers.{i}.self_attn.k_scale" in t and f"model.layers.{i}.self_attn.v_scale" in t
        assert has == (i not in shared)

    google = synth(kind, "google")
    gqc = json.loads((google / "config.json").read_text())["quantization_config"]
    _, model, gmods, _, _, _ = _skeleton(google)
    gbits, dense = google_module_bits(gqc, gmods, model)
    assert gbits == {**want, "lm_head": 2} and dense == ["model.per_layer_model_projection"]


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_ct_layout_passes_the_plugins_validation_and_converts_to_our_google_layout(kind, synth, tmp_path):
    from vllm_gemma_mobile.convert import convert
    from vllm_gemma_mobile.contract import read_contract

    ct, google = synth(kind, "ct"), synth(kind, "google")
    summary = read_contract(ct).summary()
    assert summary["embedding"] == 2 and summary["per_layer_embedding"] == (4 if kind == "e2b" else 2)
    converted = convert(ct, tmp_path / "g")
    a, b = tensors(converted), tensors(google)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (converted, google))
    assert ca["quantization_config"] == cb["quantization_config"]


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_one_contract_from_both_layouts(kind, synth):
    """`contract.read_contract` reads our layout and Google's (through the converter) into the SAME per-module and
    per-layer description; both agree with format.md's bit map (spelled out independently above), with the stored
    scale tensors, and with the KV sharing the model config implies (KV-shared layers read their source's cache)."""
    from vllm_gemma_mobile.contract import read_contract

    ct, google = read_contract(synth(kind, "ct")), read_contract(synth(kind, "google"))
    assert (ct.layout, google.layout) == ("ct", "google")
    assert ct.modules == google.modules and ct.kv == google.kv
    assert ct.lm_head == google.lm_head and ct.lm_head.input_scale and ct.lm_head.output_scale  # Google's lm_head SRQ
    config = synthetic_config(kind, SCALE_DOWN[kind])
    assert {n: m.bits for n, m in ct.modules.items()} == format_md_bits(kind, config)
    t = tensors(synth(kind, "ct"))
    for name, m in ct.modules.items():
        assert m.shape == tuple(t[f"{name}.weight_shape"].tolist()), name
        assert m.role == ("per_layer_embedding" if name.endswith("per_layer") else
                          "embedding" if name.endswith("embed_tokens") else "linear"), name
        assert (m.strategy == "group") == (m.role == "per_layer_embedding"), name
        if m.role == "linear":
            assert m.input_scale == float(t[f"{name}.input_scale"]) and m.output_scale == float(t[f"{name}.output_scale"])
    n, shared = config.num_hidden_layers, config.num_kv_shared_layers
    types = config.layer_types
    for kv in ct.kv:
        i = kv.layer
        if i < n - shared:
            assert kv.source == i and kv.k_scale == float(t[f"model.layers.{i}.self_attn.k_scale"])
        else:  # the last earlier non-shared layer of the same attention type
            assert kv.source == max(j for j in range(n - shared) if types[j] == types[i])
            assert kv.k_scale == ct.kv[kv.source].k_scale and kv.v_scale == ct.kv[kv.source].v_scale
        assert kv.bits == (4 if types[i] == "full_attention" else 8)


def test_scales_are_plausible(synth):
    t = tensors(synth("e2b", "ct"))
    w = "model.layers.0.mlp.up_proj"
    codes = bitpack.ct_unpack(t[f"{w}.weight_packed"], 4, 64).float()
    rms = float((codes * t[f"{w}.weight_scale"]).pow(2).mean().sqrt())
    assert 0.015 < rms < 0.027
    assert 0.015 < float(t[f"{w}.input_scale"]) < 0.032  # unit RMS -> ~42 of 127 codes
    ple = t["model.embed_tokens_per_layer.weight_scale"]
    assert ple.shape == (512, 7) and ple.dtype == torch.float32
    assert 0.2 < float(t["model.layers.4.self_attn.k_scale"]) < 0.6  # int4 global layer
    assert 0.015 < float(t["model.layers.3.self_attn.k_scale"]) < 0.032  # int8 sliding layer


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_transformers_loads_google_layout_and_bf16_twin(kind, synth):
    """transformers' own reader (`integrations/gemma_quant.py`) is the independent oracle of the Google layout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gemma_quant import QuantizedEmbedding, QuantizedLinear

    ids = torch.tensor([[2, 17, 45, 301, 99, 7, 300, 33, 8, 250, 13, 77, 5, 61, 200, 42, 3, 9, 90, 11, 400, 12]])
    for layout in ("google", "bf16"):
        d = synth(kind, layout)
        hf, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        assert type(hf).__name__ == "Gemma4ForCausalLM"
        if layout == "google":
            assert isinstance(hf.model.embed_tokens_per_layer, QuantizedEmbedding)
            mlp = hf.model.layers[-1].mlp.up_proj
            assert isinstance(mlp, QuantizedLinear) and mlp.num_bits == (2 if kind == "e2b" else 4)
            assert mlp.out_features == (128 * 2 if kind == "e2b" else 96)  # double-wide in E2B only
        with torch.no_grad():
            logits = hf(ids).logits.float()
        assert logits.shape == (1, ids.shape[1], 512) and torch.isfinite(logits).all() and logits.std() > 0
        assert len(AutoTokenizer.from_pretrained(d)) == 512


@pytest.mark.parametrize("kind", ["e2b", "e4b"])
def test_real_size_shapes_and_parameter_counts(kind):
    """The real configs (gemma.md's table), not written: shapes and sizes of every tensor the writer would make."""
    config = synthetic_config(kind)
    n_layers, hidden = (35, 1536) if kind == "e2b" else (42, 2560)
    first_shared = n_layers - (20 if kind == "e2b" else 18)
    full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert full == (list(range(4, 35, 5)) if kind == "e2b" else list(range(5, 42, 6)))
    assert config.model_type == "gemma4_text" and config.architectures == ["Gemma4ForCausalLM"]
    assert config.vocab_size == 262144 and config.final_logit_softcapping == 30.0 and config.sliding_window == 512
    assert config.tie_word_embeddings

    bf16 = {s.name: s for s in tensor_specs(kind, config, "bf16")[0]}
    assert bf16["model.embed_tokens_per_layer.weight"].shape == (262144, n_layers * 256)
    assert bf16["model.per_layer_model_projection.weight"].shape == (n_layers * 256, hidden)
    wide = 12288 if kind == "e2b" else 10240
    assert bf16[f"model.layers.{n_layers - 1}.mlp.gate_proj.weight"].shape == (wide, hidden)
    assert bf16["model.layers.0.mlp.gate_proj.weight"].shape == ((6144 if kind == "e2b" else 10240), hidden)
    kvh = 1 if kind == "e2b" else 2
    assert bf16[f"model.layers.{full[0]}.self_attn.k_proj.weight"].shape == (512 * kvh, hidden)
    assert bf16["model.layers.0.self_attn.k_proj.weight"].shape == (256 * kvh, hidden)
    assert bf16[f"model.layers.{full[0]}.self_attn.q_proj.weight"].shape == (8 * 512, hidden)
    assert f"model.layers.{first_shared}.self_attn.k_proj.weight" not in bf16
    assert "lm_head.weight" not in bf16
    params = sum(math.prod(s.shape) for s in bf16.values())
    # E2B: 4.63 B text parameters = 0.40 B embedding + 2.35 B PLE table + 1.88 B rest ("2B effective")
    want = {"e2b": (4.60e9, 4.66e9), "e4b": (7.4e9, 8.0e9)}[kind]
    assert want[0] < params < want[1], params

    ct = {s.name: s for s in tensor_specs(kind, config, "ct")[0]}
    ple_bits = 4 if kind == "e2b" else 2
    assert ct["model.embed_tokens_per_layer.weight_packed"].shape == (262144, n_layers * 256 * ple_bits // 32)
    assert ct["model.embed_tokens_per_layer.weight_scale"].shape == (262144, n_layers)
    assert ct["model.embed_tokens.weight_packed"].shape == (262144, hidden * 2 // 32)
    mlp_bits = 2 if kind == "e2b" else 4
    assert ct[f"model.layers.{n_layers - 1}.mlp.down_proj.weight_packed"].shape == (hidden, wide * mlp_bits // 32)
    assert sum(1 for k in ct if re.search(r"self_attn\.[kv]_scale$", k)) == 2 * first_shared
    size = sum(s.nbytes for s in ct.values())
    assert (1.9e9 < size < 2.1e9) if kind == "e2b" else (2.5e9 < size < 3.5e9), size


def test_cli_synth_refuses_unknown_and_writes(tmp_path, capsys, monkeypatch):
    from vllm_gemma_mobile import cli

    with pytest.raises(SystemExit):
        cli.main(["synth", "e9b", "--out", str(tmp_path / "x")])
    calls = {}
    monkeypatch.setattr("vllm_gemma_mobile.models.synthetic.write_synthetic",
                        lambda kind, out, layout, seed, force: calls.update(kind=kind, out=out, layout=layout,
                                                                             seed=seed, force=force) or out)
    cli.main(["synth", "e4b", "--out", str(tmp_path / "y"), "--layout", "google", "--seed", "3"])
    assert calls == {"kind": "e4b", "out": str(tmp_path / "y"), "layout": "google", "seed": 3, "force": False}
    assert capsys.readouterr().out.strip() == str(tmp_path / "y")
