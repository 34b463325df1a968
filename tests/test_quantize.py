"""Every recipe on tiny random Gemma 3 / Gemma 4 models: what lands on disk is a standard, packed
compressed-tensors checkpoint with our per-layer KV metadata, and it reloads to the same logits."""

import json
from pathlib import Path

import pytest
import torch

from vllm_gemma_mobile.quantize.run import QuantizeError, calibrate, quantize, save_mobile

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
N_SAMPLES, SEQ_LEN = 8, 64


from fixtures_ckpt import checkpoint_tensors as tensors  # noqa: E402


@pytest.fixture(scope="session")
def mobile_tiny_gemma3(tiny_gemma3, tmp_path_factory):
    return quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path_factory.mktemp("q") / "g3",
                    num_samples=N_SAMPLES, seq_len=SEQ_LEN, overrides={"mlp_2bit_layers": "[1]"})


def test_gemma3_recipe_writes_packed_checkpoint(mobile_tiny_gemma3):
    ckpt = mobile_tiny_gemma3
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["kv_cache_scheme"] is None
    assert qc["gemma_mobile"]["kv_cache"]["layer_bits"] == [8, 8, 8, 8, 8, 4]
    assert config["tie_word_embeddings"] is True
    t = tensors(ckpt)
    # one table, packed 16 x 2-bit per int32, serving the tied lm_head; no dense copies
    assert not any(k.startswith("lm_head") for k in t)
    assert "model.embed_tokens.weight" not in t
    v, h = t["model.embed_tokens.weight_shape"].tolist()
    assert t["model.embed_tokens.weight_packed"].shape == (v, h // 16)
    assert t["model.embed_tokens.weight_scale"].shape == (v, 1)
    # 4-bit attention, 2-bit MLP in layer 1, 4-bit elsewhere
    n, k = t["model.layers.0.self_attn.q_proj.weight_shape"].tolist()
    assert t["model.layers.0.self_attn.q_proj.weight_packed"].shape == (n, k // 8)
    n, k = t["model.layers.1.mlp.up_proj.weight_shape"].tolist()
    assert t["model.layers.1.mlp.up_proj.weight_packed"].shape == (n, k // 16)
    assert not any(k.endswith(".weight") and ("proj" in k) for k in t)
    for i in range(6):
        for name in ("k_scale", "v_scale"):
            assert t[f"model.layers.{i}.self_attn.{name}"].numel() == 1
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            part = "self_attn" if proj[0] in "qkvo" else "mlp"
            for s in ("input_scale", "output_scale"):
                assert t[f"model.layers.{i}.{part}.{proj}.{s}"].numel() == 1
    scales = [v.float() for k, v in t.items() if k.endswith("_scale")]
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales)
    # int4 KV of the global layer: scale ~ absmax / 7.5, int8 ones ~ absmax / 127.5 -> visibly coarser
    assert t["model.layers.5.self_attn.k_scale"] > 4 * t["model.layers.4.self_attn.k_scale"]
    assert (ckpt / "tokenizer.json").exists() or (ckpt / "tokenizer_config.json").exists()


@pytest.mark.parametrize("recipe,shared_mlp_bits,ple_bits", [
    ("gemma4_e2b_mobile_ptq.yaml", 2, 4), ("gemma4_e4b_mobile_ptq.yaml", 4, 2)])
def test_gemma4_recipes(tiny_gemma4, tmp_path, recipe, shared_mlp_bits, ple_bits):
    ckpt = quantize(tiny_gemma4, RECIPES / recipe, tmp_path / "g4", num_samples=N_SAMPLES, seq_len=SEQ_LEN)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    kv = qc["gemma_mobile"]["kv_cache"]
    assert kv["layer_bits"] == [8, 8, 4, 8, None, None] and kv["kv_sharing"] == {"4": 3, "5": 2}
    t = tensors(ckpt)
    n, k = t["model.layers.4.mlp.gate_proj.weight_shape"].tolist()
    assert n == 2 * 128  # double-wide MLP of the KV-shared layer
    assert t["model.layers.4.mlp.gate_proj.weight_packed"].shape == (n, k * shared_mlp_bits // 32)
    assert "model.layers.4.self_attn.k_scale" not in t and "model.layers.3.self_attn.k_scale" in t
    v, w = t["model.embed_tokens_per_layer.weight_shape"].tolist()
    assert t["model.embed_tokens_per_layer.weight_packed"].shape == (v, w * ple_bits // 32)
    assert t["model.embed_tokens_per_layer.weight_scale"].shape == (v, w // 16)  # one per (row, layer block)
    # float, as in Google's checkpoints (format.md): a plain weight, no scales
    assert t["model.per_layer_model_projection.weight"].dtype == torch.bfloat16
    assert not any(k.startswith("model.per_layer_model_projection.") and k != "model.per_layer_model_projection.weight"
                   for k in t)
    assert not any(k.startswith("lm_head") for k in t)
    scales = [v.float() for k, v in t.items() if k.endswith("_scale")]
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in scales)


def test_embed_bits_override(tiny_gemma3, tmp_path):
    ckpt = quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "e4", num_samples=4, seq_len=32,
                    overrides={"embed_bits": "4"})
    t = tensors(ckpt)
    v, h = t["model.embed_tokens.weight_shape"].tolist()
    assert t["model.embed_tokens.weight_packed"].shape == (v, h // 8)


def test_roundtrip_reload_gives_identical_logits(tiny_gemma3, tmp_path):
    """In-memory fake-quant model after calibration == transformers + compressed-tensors reload of the saved
    checkpoint (weights, static in/out activation quant, per-layer KV quant, tied quantized lm_head)."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from vllm_gemma_mobile.evaluate.reference import install_lm_head_srq, load_reference
    from vllm_gemma_mobile.metadata import parse_metadata

    cal = calibrate(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", num_samples=N_SAMPLES, seq_len=SEQ_LEN)
    model = cal.model.eval()
    emb = model.get_input_embeddings()
    with torch.no_grad():  # the contract's lm_head: the dequantized (tied) table + its calibrated static SRQ
        table = forward_quantize(emb, emb.weight.data, "weight", emb.quantization_scheme.weights)
        model.lm_head.weight = torch.nn.Parameter(table.clone(), requires_grad=False)
        head = parse_metadata(model.save_pretrained.gemma_mobile_metadata).lm_head
        assert head is not None and head.output_scale is not None
        install_lm_head_srq(model, head)
        ids = torch.tensor([[2, 17, 45, 301, 99, 7, 512, 33, 8, 250, 13, 77, 5, 61, 200, 42, 3, 9, 90, 11]])
        before = model(ids).logits.float()
    ckpt = save_mobile(cal, tmp_path / "rt")  # compresses the in-memory model: logits first
    reloaded, _ = load_reference(ckpt, numerics="bf16")  # the calibrated in-memory model IS the bf16 fake quant
    with torch.no_grad():
        after = reloaded(ids).logits.float()
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_failed_run_leaves_existing_output_untouched(tiny_gemma3, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "marker").write_text("previous checkpoint")
    import vllm_gemma_mobile.quantize.checkpoint as checkpoint

    def bad(model):
        raise QuantizeError("model.layers.0.mlp.up_proj.output_scale: calibration produced an invalid scale")

    monkeypatch.setattr(checkpoint, "check_scales", bad)
    with pytest.raises(QuantizeError, match="output_scale"):
        quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", out, num_samples=2, seq_len=16)
    assert (out / "marker").read_text() == "previous checkpoint"


def test_bad_recipe_inputs(tiny_gemma3, tmp_path):
    with pytest.raises(ValueError, match="3-bit is not supported"):
        quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "x", num_samples=2, seq_len=16,
                 overrides={"mlp_bits": "3"})
    ignored = tmp_path / "ignored.yaml"  # llmcompressor skips these groups / stages without a word
    for text in ("ptq_stage:\n  mods:\n    MobileGPTQModifier:\n      preset: gemma3\n",
                 "stage:\n  quant_modifiers:\n    MobileGPTQModifier:\n      preset: gemma3\n"):
        ignored.write_text(text)
        with pytest.raises(ValueError, match="_modifiers.*_stage"):
            quantize(tiny_gemma3, ignored, tmp_path / "w", num_samples=2, seq_len=16)
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage:\n  mods:\n    QuantizationModifier:\n      scheme: W4A16\n")
    with pytest.raises(ValueError, match="expected exactly one of"):
        quantize(tiny_gemma3, bad, tmp_path / "y", num_samples=2, seq_len=16)
    with pytest.raises(Exception, match="needs a Gemma 4 config"):
        quantize(tiny_gemma3, RECIPES / "gemma4_e2b_mobile_ptq.yaml", tmp_path / "z", num_samples=2, seq_len=16)
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_embedding_variant_equals_full_rerun(tiny_gemma3, mobile_tiny_gemma3, tmp_path):
    """requantize_embedding(ckpt, base, 4) == quantize(..., embed_bits=4): every tensor identical."""
    from vllm_gemma_mobile.quantize.variants import requantize_embedding

    # lm_head_scales=input: the output scale is calibrated on the table's own logits (refused by the variant)
    opts = {"mlp_2bit_layers": "[1]", "lm_head_scales": "input"}
    ckpt = quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "q2", num_samples=N_SAMPLES,
                    seq_len=SEQ_LEN, overrides=opts)
    variant = requantize_embedding(ckpt, tiny_gemma3, 4, tmp_path / "v4")
    full = quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path / "f4", num_samples=N_SAMPLES,
                    seq_len=SEQ_LEN, overrides={**opts, "embed_bits": "4"})
    a, b = tensors(variant), tensors(full)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    qa = json.loads((variant / "config.json").read_text())["quantization_config"]
    qb = json.loads((full / "config.json").read_text())["quantization_config"]
    assert qa["config_groups"] == qb["config_groups"]
    assert qa["gemma_mobile"] == qb["gemma_mobile"] and set(qa["gemma_mobile"]["lm_head"]) == {"input_scale"}


def test_rtn_modifier_recipe(tiny_gemma4, tmp_path):
    """MobileQuantizationModifier (round-to-nearest weights) from a user recipe, with options in the YAML."""
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("rtn_stage:\n  mobile_modifiers:\n    MobileQuantizationModifier:\n      preset: gemma4-e4b\n"
                      "      options:\n        embed_bits: 4\n        kv_bits: {sliding_attention: 8, full_attention: 8}\n")
    ckpt = quantize(tiny_gemma4, recipe, tmp_path / "rtn", num_samples=4, seq_len=32)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["gemma_mobile"]["kv_cache"]["layer_bits"] == [8, 8, 8, 8, None, None]
    t = tensors(ckpt)
    v, h = t["model.embed_tokens.weight_shape"].tolist()
    assert t["model.embed_tokens.weight_packed"].shape == (v, h // 8)
    assert all(torch.isfinite(x.float()).all() and (x.float() > 0).all() for k, x in t.items() if k.endswith("_scale"))


def test_lm_head_calibration_scales_are_the_served_ranges():
    """LMHeadCalibration: input_scale = bf16(absmax(h) / 127.5) (compressed-tensors' symmetric int8 rule, as for
    every other static input), output_scale = bf16(absmax(served logits) / 127.5), the logits recomputed here
    independently in f64 from the table's codes. Tolerance: the module's logits are f32 (`f32(acc) * f32(s_x *
    ws)`, <= 2 f32 ulps from f64); rounding that to bf16 can differ by at most one bf16 ulp (2^-8 relative)."""
    from compressed_tensors.quantization import QuantizationScheme

    from vllm_gemma_mobile.quantize.lm_head import LMHeadCalibration
    from vllm_gemma_mobile.scheme.spec import weight_args

    g = torch.Generator().manual_seed(0)
    vocab, k = 300, 48
    table = torch.nn.Embedding(vocab, k)
    table.weight.requires_grad_(False).data = torch.randn(vocab, k, generator=g).to(torch.bfloat16)
    ws = (table.weight.float().abs().amax(1, keepdim=True) / 1.5).to(torch.bfloat16)
    table.weight_scale = torch.nn.Parameter(ws, requires_grad=False)
    table.quantization_scheme = QuantizationScheme(targets=["re:.*"], weights=weight_args(2, "mse"))
    hs = [torch.randn(1, 37, k, generator=g).to(torch.bfloat16) * 3 for _ in range(3)]
    hs[1][0, 5, 7] = -40.0  # the range is set by one outlier, as in real final-norm outputs

    cal = LMHeadCalibration("both", "static_minmax")
    for h in hs:
        cal.hook(None, (h,), None)
    got = cal.finish(table, chunk_rows=128, chunk_tokens=16)  # several chunks on both axes

    bf = lambda v: float(torch.tensor(v, dtype=torch.float64).to(torch.bfloat16))  # noqa: E731
    h = torch.cat([x.reshape(-1, k) for x in hs]).double()
    assert got["input_scale"] == bf(40.0 / 127.5)
    s_x = got["input_scale"]
    xq = (h / s_x).round().clamp(-128, 127)
    codes = (table.weight.double() / ws.double()).round().clamp(-2, 1)
    y = (xq @ codes.t()) * s_x * ws.double().t()
    want = bf(float(y.abs().max()) / 127.5)
    assert abs(got["output_scale"] - want) <= want * 2 ** -8, (got, want)
    assert set(got) == {"input_scale", "output_scale"}


def test_recipe_calibrates_lm_head_scales(mobile_tiny_gemma3, tiny_gemma3, tmp_path):
    """The PTQ recipe writes `gemma_mobile.lm_head` (input and output static scales, bf16 values > 0), so the tied
    lm_head is served as an int8-activation GEMM; an embedding variant of such a checkpoint is refused."""
    from vllm_gemma_mobile.metadata import parse_metadata
    from vllm_gemma_mobile.quantize.variants import requantize_embedding

    qc = json.loads((mobile_tiny_gemma3 / "config.json").read_text())["quantization_config"]
    head = parse_metadata(qc["gemma_mobile"]).lm_head
    assert head is not None and head.input_scale > 0 and head.output_scale > 0
    for v in (head.input_scale, head.output_scale):
        assert float(torch.tensor(v).to(torch.bfloat16)) == v
    with pytest.raises(ValueError, match="lm_head.output_scale was calibrated"):
        requantize_embedding(mobile_tiny_gemma3, tiny_gemma3, 4, tmp_path / "v4")


def test_gptq_table_variant_lowers_the_lm_head_error(mobile_tiny_gemma3, tiny_gemma3, tmp_path):
    """`gptq_table` re-quantizes only the tied table, by GPTQ on the lm_head's input statistics: on those very
    inputs (the bf16 model's final-norm outputs, calibration split) its lm_head output error is below the recipe's
    round-to-nearest table's, every other tensor is unchanged, the lm_head keeps only its input scale, and the
    result is a valid checkpoint (the contract reader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels import bitpack
    from vllm_gemma_mobile.contract import read_contract
    from vllm_gemma_mobile.quantize.run import calibration_token_ids
    from vllm_gemma_mobile.quantize.variants import gptq_table

    out = gptq_table(mobile_tiny_gemma3, tiny_gemma3, tmp_path / "gptq", num_samples=N_SAMPLES, seq_len=SEQ_LEN)
    src, new = tensors(mobile_tiny_gemma3), tensors(out)
    emb = "model.embed_tokens"
    assert sorted(src) == sorted(new)
    assert all(torch.equal(src[k], new[k]) for k in src if not k.startswith(emb + "."))
    contract = read_contract(out)
    assert contract.lm_head.input_scale == read_contract(mobile_tiny_gemma3).lm_head.input_scale
    assert contract.lm_head.output_scale is None
    bits = contract.modules[emb].bits
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    with torch.no_grad():
        x = torch.cat([model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
                       for ids in calibration_token_ids(tok, N_SAMPLES, SEQ_LEN)])
    w = model.get_output_embeddings().weight.detach().float()

    def table(t):
        k = w.shape[1]
        return bitpack.ct_unpack(t[f"{emb}.weight_packed"], bits, k).float() * t[f"{emb}.weight_scale"].float()

    err = {name: float((x @ (table(t) - w).T).square().sum()) for name, t in (("rtn", src), ("gptq", new))}
    assert err["gptq"] < err["rtn"], err


def test_lm_head_calibration_refuses_an_invalid_input_scale():
    """Calibration inputs of the lm_head with no finite range (NaN activations, as a broken upstream output hook
    produces) give a QuantizeError naming the lm_head, not a bare scale error from the kernels later."""
    from vllm_gemma_mobile.quantize.lm_head import LMHeadCalibration

    cal = LMHeadCalibration("input", "static_minmax")
    cal.hook(None, (torch.full((1, 4, 8), float("nan"), dtype=torch.bfloat16),), None)
    with pytest.raises(QuantizeError, match=r"embed_tokens \(lm_head\) input_scale = nan"):
        cal.finish(None)
