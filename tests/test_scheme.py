"""The scheme as data: presets resolve Google's bit maps from a config; bad schemes fail with clear errors."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from vllm_gemma_mobile.models.tiny import tiny_gemma3_config, tiny_gemma4_config
from vllm_gemma_mobile.scheme import MobileScheme, SchemeError, expand, kv_sharing, preset
from vllm_gemma_mobile.quantize.modifier import quantizable_module_names


def _names(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return quantizable_module_names(model)


def _bits_of(expanded, name):
    for group in expanded.config_groups.values():
        if any(re.match(t[3:], name) for t in group.targets):
            return group.weights.num_bits, group
    return None, None


def test_gemma3_preset_bits_activations_and_kv():
    cfg = tiny_gemma3_config(layers=6)
    names = _names(cfg)
    e = expand(preset("gemma3", cfg, mlp_2bit_layers=[2]), cfg, names)
    assert _bits_of(e, "model.embed_tokens")[0] == 2
    bits, g = _bits_of(e, "model.layers.0.self_attn.q_proj")
    assert bits == 4
    # wNa8o8: static per-tensor int8 on input AND output of every quantized linear
    for args in (g.input_activations, g.output_activations):
        assert (args.num_bits, args.strategy, args.dynamic, args.symmetric) == (8, "tensor", False, True)
    assert g.weights.strategy == "channel" and g.weights.symmetric and g.format == "pack-quantized"
    assert _bits_of(e, "model.layers.2.mlp.down_proj")[0] == 2
    assert _bits_of(e, "model.layers.3.mlp.down_proj")[0] == 4
    emb = _bits_of(e, "model.embed_tokens")[1]
    assert emb.input_activations is None and emb.format == "pack-quantized"
    assert e.kv_layer_bits == [8, 8, 8, 8, 8, 4]
    assert e.ignore == ["lm_head"]


def test_every_module_in_exactly_one_group():
    for cfg, name in ((tiny_gemma3_config(), "gemma3"), (tiny_gemma4_config(), "gemma4-e2b")):
        names = _names(cfg)
        e = expand(preset(name, cfg), cfg, names)
        for n in names:
            hits = [k for k, g in e.config_groups.items() if any(re.match(t[3:], n) for t in g.targets)]
            assert len(hits) <= 1, (n, hits)
        assert set(e.module_bits) == {n for n in names if _bits_of(e, n)[0] is not None}


def test_targets_tolerate_multimodal_and_vllm_prefixes():
    cfg = tiny_gemma3_config()
    e = expand(preset("gemma3", cfg), cfg, _names(cfg))
    for prefix in ("model.", "model.language_model.", "language_model.model."):
        assert _bits_of(e, prefix + "layers.1.mlp.up_proj")[0] == 4
    assert _bits_of(e, "model.embed_tokens_per_layer")[0] is None


def test_gemma4_e2b_bit_map_kv_sharing_and_ple():
    cfg = tiny_gemma4_config(layers=6, kv_shared=2)
    e = expand(preset("gemma4-e2b", cfg), cfg, _names(cfg))
    assert kv_sharing(cfg) == {4: 3, 5: 2}  # last earlier layer of the same attention type
    assert _bits_of(e, "model.layers.3.mlp.gate_proj")[0] == 4
    assert _bits_of(e, "model.layers.4.mlp.gate_proj")[0] == 2   # KV-shared, double-wide
    assert _bits_of(e, "model.layers.5.per_layer_projection")[0] == 8
    assert _bits_of(e, "model.per_layer_model_projection")[0] is None  # float, as in Google's checkpoints
    e8 = expand(preset("gemma4-e2b", cfg, model_projection_bits=8), cfg, _names(cfg))
    assert _bits_of(e8, "model.per_layer_model_projection")[0] == 8
    bits, ple = _bits_of(e, "model.embed_tokens_per_layer")
    assert bits == 4 and ple.weights.strategy == "group" and ple.weights.group_size == 16
    assert e.kv_layer_bits[4:] == [None, None]  # shared layers own no KV cache
    assert e.metadata(preset("gemma4-e2b", cfg))["kv_cache"]["kv_sharing"] == {"4": 3, "5": 2}
    e4 = expand(preset("gemma4-e4b", cfg), cfg, _names(cfg))
    assert _bits_of(e4, "model.layers.4.mlp.gate_proj")[0] == 4
    assert _bits_of(e4, "model.embed_tokens_per_layer")[0] == 2


def test_real_gemma4_e2b_layout_from_config():
    """E2B's real layer layout (35 layers, 20 KV-shared, full attention every 5th) from its config alone."""
    types = ["full_attention" if i % 5 == 4 else "sliding_attention" for i in range(35)]
    cfg = tiny_gemma4_config(layers=35, kv_shared=20)
    cfg.layer_types = types
    sharing = kv_sharing(cfg)
    assert sorted(sharing) == list(range(15, 35))
    assert {sharing[i] for i in sharing if types[i] == "sliding_attention"} == {13}
    assert {sharing[i] for i in sharing if types[i] == "full_attention"} == {14}


@pytest.mark.parametrize("field,value,match", [
    ("mlp_bits", 3, "3-bit is not supported"),
    ("attention_bits", 16, "16-bit is not supported"),
    ("embed_bits", 1, "1-bit is not supported"),
    ("kv_bits", {"full_attention": 2}, "2-bit KV is not supported"),
    ("kv_bits", {"chunked_attention": 8}, "unknown layer type"),
    ("mlp_bits_by_layer", {0: 5}, r"mlp_bits_by_layer\[0\]"),
    ("attention_bits_by_layer", {1: 3}, r"attention_bits_by_layer\[1\]"),
])
def test_bad_bits_are_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):  # pydantic's ValidationError is a ValueError
        MobileScheme(**{field: value})


def test_unknown_fields_and_targets_that_match_nothing():
    cfg = tiny_gemma3_config()
    with pytest.raises(Exception, match="extra"):
        MobileScheme(mlp_bitz=4)
    with pytest.raises(SchemeError, match="match no quantized linear"):
        expand(MobileScheme(keep_8bit=[r"layers\.99\."]), cfg, _names(cfg))
    with pytest.raises(SchemeError, match="layer 40 does not exist"):
        expand(MobileScheme(mlp_bits_by_layer={40: 2}), cfg, _names(cfg))
    with pytest.raises(SchemeError, match="attention_bits_by_layer: layer 7 does not exist"):
        expand(MobileScheme(attention_bits_by_layer={7: 8}), cfg, _names(cfg))
    with pytest.raises(SchemeError, match="embed_tokens_per_layer"):
        expand(MobileScheme(ple_bits=4), cfg, _names(cfg))
    with pytest.raises(SchemeError, match="needs a Gemma 4 config"):
        preset("gemma4-e2b", cfg)
    with pytest.raises(SchemeError, match="unknown preset"):
        preset("llama", cfg)


def test_keep_8bit_raises_bits():
    cfg = tiny_gemma3_config()
    e = expand(preset("gemma3", cfg, keep_8bit=[r"layers\.0\.mlp\.down_proj$"]), cfg, _names(cfg))
    assert _bits_of(e, "model.layers.0.mlp.down_proj")[0] == 8
    assert _bits_of(e, "model.layers.1.mlp.down_proj")[0] == 4


def test_attention_bits_by_layer():
    """Per-layer attention bits (what `--size-budget` chooses): all four projections of that layer, nothing else;
    string keys from YAML / --set are accepted by the preset."""
    cfg = tiny_gemma3_config()
    e = expand(preset("gemma3", cfg, attention_bits_by_layer={"1": 8}), cfg, _names(cfg))
    for p in "qkvo":
        assert _bits_of(e, f"model.layers.1.self_attn.{p}_proj")[0] == 8
        assert _bits_of(e, f"model.layers.0.self_attn.{p}_proj")[0] == 4
    assert _bits_of(e, "model.layers.1.mlp.down_proj")[0] == 4
