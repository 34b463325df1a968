"""`gemma-mobile convert`: our compressed-tensors mobile checkpoint <-> Google's `quant_method: "gemma"` layout.

The oracle for Google's layout is transformers' own reader (`integrations/gemma_quant.py`,
`quantizers/quantizer_gemma.py`); the oracle for ours is compressed-tensors' packer and `load_reference`."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kernels import bitpack
from vllm_gemma_mobile.convert import ConvertError, convert

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
N_SAMPLES, SEQ_LEN = 8, 64
IDS = torch.tensor([[2, 17, 45, 301, 99, 7, 512, 33, 8, 250, 13, 77, 5, 61, 200, 42, 3, 9, 90, 11,
                     400, 12, 640, 1000, 6, 71, 300, 14, 15, 88, 123, 4, 256, 19, 511, 20, 21, 700, 22, 23]])


from fixtures_ckpt import checkpoint_tensors as tensors  # noqa: E402


def config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def ct3(tiny_gemma3, tmp_path_factory):
    from vllm_gemma_mobile.quantize.run import quantize

    # layer 1 with 2-bit MLPs: the bit map mixes 2 and 4 bits across layers
    return quantize(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", tmp_path_factory.mktemp("cv") / "ct3",
                    num_samples=N_SAMPLES, seq_len=SEQ_LEN, overrides={"mlp_2bit_layers": "[1]"})


@pytest.fixture(scope="module")
def ct4(tiny_gemma4, tmp_path_factory):
    from vllm_gemma_mobile.quantize.run import quantize

    return quantize(tiny_gemma4, RECIPES / "gemma4_e2b_mobile_ptq.yaml", tmp_path_factory.mktemp("cv") / "ct4",
                    num_samples=N_SAMPLES, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def google3(ct3, tmp_path_factory):
    return convert(ct3, tmp_path_factory.mktemp("cv") / "g3")


@pytest.fixture(scope="module")
def google4(ct4, tmp_path_factory):
    return convert(ct4, tmp_path_factory.mktemp("cv") / "g4")


# ------------------------------------------------------------------------------------------ (a) bit packing

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [72, 61, 7, 1])
def test_bitpack_matches_compressed_tensors_and_transformers(bits, k, device):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from transformers.integrations import gemma_quant

    torch.manual_seed(bits * 100 + k)
    lo, hi = bitpack.code_range(bits)
    codes = torch.randint(lo, hi + 1, (5, k), dtype=torch.int8, device=device)
    # compressed-tensors pack-quantized
    ct = bitpack.ct_pack(codes, bits)
    assert ct.device == codes.device
    assert torch.equal(ct.cpu(), pack_to_int32(codes.cpu(), bits))
    assert torch.equal(bitpack.ct_unpack(ct, bits, k).cpu(), codes.cpu())
    assert torch.equal(unpack_from_int32(ct.cpu(), bits, torch.Size((5, k))), codes.cpu())
    # Google / transformers gemma_quant: storage shape and dtype as QuantizedLinear allocates them, and its reader
    g = bitpack.google_pack(codes, bits)
    storage = gemma_quant.QuantizedLinear(k, 5, num_bits=bits).weight
    assert g.dtype == storage.dtype and g.shape == storage.shape and g.device == codes.device
    unpack = {2: gemma_quant._unpack_int2, 4: gemma_quant._unpack_int4, 8: lambda p, w: p}[bits]
    assert torch.equal(unpack(g.cpu(), k), codes.cpu())
    assert torch.equal(bitpack.google_unpack(g, bits, k).cpu(), codes.cpu())
    # the project's other entry points are delegates of the same implementation, on the same device
    from kernels.layout import ct_unpack
    from vllm_gemma_mobile.vllm import cpu_ops

    assert torch.equal(ct_unpack(ct, bits, (5, k)), codes)
    assert torch.equal(cpu_ops.unpack_codes(ct, bits, k), codes)


def test_bitpack_byte_order_and_errors():
    # 2-bit: code+2 in bits [1:0], [3:2], [5:4], [7:6]; 4-bit: code+8, low nibble = even index; padding fields 0
    assert bitpack.google_pack(torch.tensor([[-2, -1, 0, 1]]), 2).tolist() == [[0b11100100]]
    assert bitpack.google_pack(torch.tensor([[-8, 7, 0]]), 4).tolist() == [[0xF0, 0x08]]
    assert bitpack.google_pack(torch.tensor([[1]]), 2).tolist() == [[3]]
    assert bitpack.ct_pack(torch.tensor([[-8, 7]]), 4).tolist() == [[0xF0]]
    assert bitpack.ct_pack(torch.tensor([[127, 0, 0, 0]], dtype=torch.int8), 8).tolist() == [[0x808080FF - (1 << 32)]]
    with pytest.raises(ValueError, match="unsupported bits"):
        bitpack.ct_pack(torch.zeros(1, 4, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match="out of the int2 range"):
        bitpack.google_pack(torch.tensor([[2]]), 2)
    with pytest.raises(ValueError, match="must be torch.uint8"):
        bitpack.google_unpack(torch.zeros(1, 1, dtype=torch.int8), 4, 2)
    with pytest.raises(ValueError, match="expected 2 int32 words"):
        bitpack.ct_unpack(torch.zeros(1, 1, dtype=torch.int32), 2, 17)


# ------------------------------------------------------------------------------------------ (b) round trips

def _ct_meaning(ckpt: Path) -> dict:
    """What a compressed-tensors mobile config means per module (group names, observers and the scheme label
    aside): weight bits/strategy/group size, activation quant, KV metadata, tie, ignore."""
    from compressed_tensors.utils.match import is_match

    from vllm_gemma_mobile.convert import _skeleton

    cfg = config(ckpt)
    qc = cfg["quantization_config"]
    _, _, mods, _, _, _ = _skeleton(ckpt)
    per_module = {}
    for name, m in mods.items():
        hit = [g for g, s in qc["config_groups"].items() if is_match(name, m, s["targets"], qc["ignore"])]
        assert len(hit) <= 1, (name, hit)
        if hit:
            g = qc["config_groups"][hit[0]]
            w = g["weights"]
            per_module[name] = (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"],
                                g["format"], *[None if g[a] is None else (g[a]["num_bits"], g[a]["strategy"],
                                                                          g[a]["dynamic"], g[a]["symmetric"])
                                               for a in ("input_activations", "output_activations")])
    meta = {k: v for k, v in qc["gemma_mobile"].items() if k != "scheme"}
    return {"modules": per_module, "meta": meta, "ignore": qc["ignore"], "kv_scheme": qc["kv_cache_scheme"],
            "tie": cfg["tie_word_embeddings"], "rest": {k: v for k, v in cfg.items() if k != "quantization_config"}}


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_round_trips_are_bit_exact(family, ct3, ct4, google3, google4, tmp_path):
    ct, google = (ct3, google3) if family == "gemma3" else (ct4, google4)
    # ct -> google -> ct: every tensor bit-exact (scales: the recipe's bf16 widened exactly to f32), same meaning
    back = convert(google, tmp_path / "ct")
    a, b = tensors(ct), tensors(back)
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype == torch.bfloat16 and k.endswith("_scale"):
            assert b[k].dtype == torch.float32 and torch.equal(a[k].float(), b[k]), k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _ct_meaning(ct) == _ct_meaning(back)
    # google -> ct -> google: byte for byte, config identical
    again = convert(back, tmp_path / "google")
    a, b = tensors(google), tensors(again)
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert config(google) == config(again)
    # the Google side: the layout transformers reads
    g, qc = tensors(google), config(google)["quantization_config"]
    assert qc["quant_method"] == "gemma" and qc["quantize_embeddings"] is True
    assert config(google)["tie_word_embeddings"] is False
    assert torch.equal(g["lm_head.weight"], g["model.embed_tokens.embedding_quantized"])
    # the recipe's calibrated lm_head SRQ (gemma_mobile.lm_head) becomes the lm_head's own activation scales
    head = json.loads((ct / "config.json").read_text())["quantization_config"]["gemma_mobile"]["lm_head"]
    assert float(g["lm_head.input_activation_scale"]) == head["input_scale"] > 0
    assert float(g["lm_head.output_activation_scale"]) == head["output_scale"] > 0
    assert g["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert g["model.layers.0.self_attn.q_proj.input_activation_scale"].shape == ()
    assert g["model.layers.0.self_attn.k_cache_scale"].dtype == torch.float32
    assert not any(k.endswith(("weight_packed", "weight_shape", "input_scale", ".k_scale")) for k in g)
    if family == "gemma4":
        assert g["model.embed_tokens_per_layer.embedding_scale"].shape[1] == 6  # one per (row, layer block)
        assert g["model.per_layer_model_projection.weight"].dtype == torch.bfloat16  # float, as Google ships it
        assert "model.layers.0.per_layer_projection.weight" in g and \
            g["model.layers.0.per_layer_projection.weight"].dtype == torch.int8  # 8-bit: plain int8
        assert "model.layers.4.self_attn.k_cache_scale" not in g  # KV-shared layer


# ------------------------------------------------------------------------------------------ (c) interop

@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_transformers_loads_google_layout_with_reference_logits(family, ct3, ct4, google3, google4):
    """transformers' own `quant_method: gemma` loader reads what `--to google` writes, and its logits EQUAL our
    reference (compressed-tensors fake quant, `load_reference`) with KV fake quant off (transformers ignores
    k/v_cache_scale).

    Tolerance: zero, because the arithmetic is the same operation for operation (read from both code paths):
    - weights: gemma_quant dequantizes `codes.to(bf16) * weight_scale.to(bf16)`; compressed-tensors decompresses
      `codes * scale` with the checkpoint's scale loaded into a bf16 parameter: a |code| <= 128 times a bf16 scale
      is exact in f32, so both round the same exact product once to bf16;
    - SRQ: gemma_quant's `apply_srq` and compressed-tensors' `_quantize_dequantize` both compute
      `clamp(round(x / s), -128, 127) * s` in bf16 with s rounded to bf16 (the f32 scales we write round to the
      same bf16 the reference loads); clamp-then-round == round-then-clamp for integer bounds;
    - the matmul is the same `F.linear` on the same bf16 tensors;
    - lm_head: transformers' QuantizedLinear with activation scales 0 is the identity around `F.linear(h, E)`,
      E = the same dequantized bf16 table the reference's tied lm_head uses;
    - embeddings: `rows * scale` in bf16 (per row / per PLE block), times `scalar_embed_scale` (a Python float)
      where the HF model multiplies by `embed_scale.to(bf16)`: equal here because the tiny models' scales
      (sqrt 64 = 8, sqrt 16 = 4) are powers of two. For a real model (sqrt 640 = 25.30 -> bf16 25.25) the two
      differ by that rounding, and exact equality is not to be expected.
    """
    from transformers import AutoModelForCausalLM

    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled, load_reference

    ct, google = (ct3, google3) if family == "gemma3" else (ct4, google4)
    ref, _ = load_reference(ct, numerics="bf16")  # compressed-tensors fake quant == gemma_quant, op for op
    kv_fake_quant_enabled(ref, False)
    hf, info = AutoModelForCausalLM.from_pretrained(google, dtype=torch.bfloat16, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    from transformers.integrations.gemma_quant import QuantizedEmbedding, QuantizedLinear

    q = hf.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.num_bits == 4 and float(q.input_activation_scale.detach()) > 0
    assert isinstance(hf.model.embed_tokens, QuantizedEmbedding) and hf.model.embed_tokens.num_bits == 2
    assert isinstance(hf.lm_head, QuantizedLinear) and hf.lm_head.num_bits == 2
    with torch.no_grad():
        want = ref(IDS).logits.float()
        got = hf(IDS).logits.float()
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lm_head_scales_round_trip_and_match_transformers(google4, tmp_path):
    """Google's answer for the lm_head: its own static input / output scales (calibrated here at 0.7x the observed
    range, so both clip). `--to ct` keeps them as `gemma_mobile.lm_head`, `--to google` writes them back byte for
    byte, and transformers' logits EQUAL our reference with its lm_head SRQ (`install_lm_head_srq`): the same
    arithmetic as the interop test above (apply_srq and our qdq both divide, round and clamp in bf16 with the
    scale rounded to bf16). Dropping the lm_head clamps changes transformers' logits, so equality is not vacuous."""
    from transformers import AutoModelForCausalLM

    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled, load_reference

    hf = AutoModelForCausalLM.from_pretrained(google4, dtype=torch.bfloat16).eval()
    seen = {}
    h = hf.lm_head.register_forward_hook(lambda m, a, o: seen.update(x=float(a[0].abs().max()), y=float(o.abs().max())))
    with torch.no_grad():
        hf(IDS)
    h.remove()
    sx, sy = torch.tensor(0.7 * seen["x"] / 127), torch.tensor(0.7 * seen["y"] / 127)
    g = _edit(google4, tmp_path / "g", tensors_fn=lambda t: t.update({"lm_head.input_activation_scale": sx,
                                                                     "lm_head.output_activation_scale": sy}))
    ct = convert(g, tmp_path / "ct")
    assert config(ct)["quantization_config"]["gemma_mobile"]["lm_head"] == {"input_scale": float(sx),
                                                                            "output_scale": float(sy)}
    again = convert(ct, tmp_path / "g2")
    a, b = tensors(g), tensors(again)
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    ref, _ = load_reference(ct, numerics="bf16")  # compressed-tensors fake quant == gemma_quant, op for op
    kv_fake_quant_enabled(ref, False)
    assert ref.gemma_mobile_reference["lm_head_srq"] == {"input_scale": float(sx), "output_scale": float(sy)}
    oracle = AutoModelForCausalLM.from_pretrained(g, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want, got = ref(IDS).logits.float(), oracle(IDS).logits.float()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        oracle.lm_head.input_activation_scale.data.zero_()
        oracle.lm_head.output_activation_scale.data.zero_()
        assert not torch.equal(oracle(IDS).logits.float(), want)


# ------------------------------------------------------------------------------------------ (d) bad inputs

def _edit(src: Path, dst: Path, *, cfg=None, tensors_fn=None) -> Path:
    shutil.copytree(src, dst)
    if cfg is not None:
        c = config(dst)
        cfg(c)
        (dst / "config.json").write_text(json.dumps(c))
    if tensors_fn is not None:
        t = tensors(dst)
        tensors_fn(t)
        for f in dst.glob("*.safetensors"):
            f.unlink()
        save_file(t, str(dst / "model.safetensors"))
    return dst


def _set(key, value):
    def f(t):
        t[key] = value
    return f


def _flip_byte(key):
    def f(t):
        t[key] = t[key].clone()
        t[key][0, 0] ^= 1
    return f


def _add_pattern(p, bits=4):
    def f(c):
        c["quantization_config"]["module_quant_configs"][p] = {"num_bits": bits}
    return f


def _bits(p, bits):
    def f(c):
        c["quantization_config"]["module_quant_configs"][p]["num_bits"] = bits
    return f


Q = "model.layers.0.self_attn.q_proj"
GOOGLE_BAD = [
    ("zero_input_scale", dict(tensors_fn=_set(f"{Q}.input_activation_scale", torch.zeros(()))),
     rf"{Q}\.input_activation_scale = 0"),
    ("lm_head_differs", dict(tensors_fn=_flip_byte("lm_head.weight")),
     r"lm_head\.weight is not byte-identical to model\.embed_tokens\.embedding_quantized"),
    ("unknown_bits", dict(cfg=_bits(r"^model\.embed_tokens$", 3)), r"num_bits = 3"),
    ("regex_matches_nothing", dict(cfg=_add_pattern(r"^model\.no_such_module$")), r"match no quantized module"),
    ("two_patterns", dict(cfg=_add_pattern(r"mlp\.up_proj$")), r"model\.layers\.0\.mlp\.up_proj is matched by 2"),
    ("missing_kv_scale", dict(tensors_fn=lambda t: t.pop("model.layers.2.self_attn.v_cache_scale")),
     r"layers\.2\.self_attn\.v_cache_scale: missing"),
    ("unknown_tensor", dict(tensors_fn=_set("model.layers.0.mlp.rqv2_muls", torch.ones(3))),
     r"model\.layers\.0\.mlp\.rqv2_muls: not understood"),
    ("missing_weight_scale", dict(tensors_fn=lambda t: t.pop(f"{Q}.weight_scale")), rf"{Q}\.weight_scale: missing"),
    ("bad_packed_shape", dict(tensors_fn=_set(f"{Q}.weight", torch.zeros(128, 3, dtype=torch.uint8))),
     rf"{Q}\.weight: torch.uint8 \[128, 3\], expected torch.uint8 \[128, 32\]"),
]


@pytest.mark.parametrize("case,edit,match", GOOGLE_BAD, ids=[c[0] for c in GOOGLE_BAD])
def test_google_inputs_we_cannot_express_fail_clearly(case, edit, match, google3, tmp_path):
    bad = _edit(google3, tmp_path / "bad", **edit)
    with pytest.raises(ConvertError, match=match):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


CT_BAD = [
    ("kv_bits", dict(cfg=lambda c: c["quantization_config"]["gemma_mobile"]["kv_cache"].update(
        layer_bits=[8, 8, 8, 8, 8, 8])), r"gemma_mobile\.kv_cache\.layer_bits = \[8, 8, 8, 8, 8, 8\]"),
    ("untied", dict(cfg=lambda c: c.update(tie_word_embeddings=False)), r"tie_word_embeddings is false"),
    ("zero_output_scale", dict(tensors_fn=_set(f"{Q}.output_scale", torch.zeros(1))), rf"{Q}\.output_scale = 0"),
    ("extra_tensor", dict(tensors_fn=_set(f"{Q}.weight_zero_point", torch.zeros(128, 1))),
     rf"{Q}\.weight_zero_point: not part of our layout"),
    ("no_marker", dict(cfg=lambda c: c["quantization_config"].pop("gemma_mobile")), r"gemma_mobile is missing"),
]


@pytest.mark.parametrize("case,edit,match", CT_BAD, ids=[c[0] for c in CT_BAD])
def test_ct_inputs_google_cannot_express_fail_clearly(case, edit, match, ct3, tmp_path):
    bad = _edit(ct3, tmp_path / "bad", **edit)
    with pytest.raises(ConvertError, match=match):
        convert(bad, tmp_path / "out")


def test_convert_refuses_same_layout_and_existing_output(ct3, google3, tmp_path):
    with pytest.raises(ConvertError, match="already in the 'ct' layout"):
        convert(ct3, tmp_path / "x", to="ct")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(ConvertError, match="not empty"):
        convert(google3, tmp_path / "full")
    assert (tmp_path / "full" / "keep").read_text() == "x"


# ------------------------------------------------------------------------------------------ (e) CLI

def test_cli_convert_end_to_end(ct3, tmp_path, capsys):
    from vllm_gemma_mobile.cli import main

    main(["convert", str(ct3), "--out", str(tmp_path / "g")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "g")
    assert config(tmp_path / "g")["quantization_config"]["quant_method"] == "gemma"
    assert (tmp_path / "g" / "tokenizer.json").exists() or (tmp_path / "g" / "tokenizer_config.json").exists()
    main(["convert", str(tmp_path / "g"), "--out", str(tmp_path / "c"), "--to", "ct"])
    assert config(tmp_path / "c")["quantization_config"]["quant_method"] == "compressed-tensors"
    with pytest.raises(SystemExit, match="gemma-mobile convert: .*already in the 'google' layout"):
        main(["convert", str(tmp_path / "g"), "--out", str(tmp_path / "x"), "--to", "google"])
