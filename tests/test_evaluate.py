"""Evaluation: data split, size report, the fake-quant reference (activations + per-layer KV), quality metrics.

Mobile checkpoints here are written with compressed-tensors directly (apply_quantization_config, scales set by
hand, ModelCompressor pack-quantized), plus the `gemma_mobile` key and k_scale/v_scale tensors added to the
safetensors, i.e. exactly the on-disk contract of docs/checkpoint-format.md.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vllm_gemma_mobile.contract import ContractError
from vllm_gemma_mobile.evaluate import data
from vllm_gemma_mobile.evaluate.reference import (KV_ATTN_PREFIX, fake_quant_kv, kv_fake_quant_enabled,
                                                  load_reference)
from vllm_gemma_mobile.evaluate.report import report

ACT = dict(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)


def on_kv_grid(t: torch.Tensor, scale: torch.Tensor, bits: int) -> bool:
    """t is what `fake_quant_kv` produces: a fixed point of it (the bf16 fake quant is idempotent for |n| <= 256)
    with at most 2^bits levels inside the signed `bits` range."""
    n = torch.round(t / scale.to(t.dtype))
    return bool(torch.equal(fake_quant_kv(t, scale, bits), t) and n.unique().numel() <= 2 ** bits
                and n.min() >= -(2 ** (bits - 1)) and n.max() <= 2 ** (bits - 1) - 1)


@contextmanager
def spy_attention(record: dict):
    """Record per layer_idx what attention reads, as (module, K, V): on the reference's served-kernel path the
    K/V dequantized from the cache the served write op filled (`kernels.plugin.kv_kernels`, what the kernel's
    attention reads); on the f32 fallback and with KV quant off, the K/V handed to the base sdpa function."""
    import kernels.plugin as kplugin
    from kernels.kvcache import code_bytes, decode_kv
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vllm_gemma_mobile.evaluate.reference import KV_ATTN_PREFIX

    table = ALL_ATTENTION_FUNCTIONS._global_mapping
    orig_sdpa, orig_kv, orig_kernels = table["sdpa"], table.get(KV_ATTN_PREFIX + "sdpa"), kplugin.kv_kernels
    current: list = [None]

    def as_model_dtype(t: torch.Tensor) -> torch.Tensor:
        """The f32 fallback hands sdpa f32 copies of the bf16 K/V: back to bf16, only if that is exact."""
        t = t.detach().clone()
        if t.dtype == torch.float32:
            b = t.to(torch.bfloat16)
            return b if torch.equal(b.float(), t) else t
        return t

    def spy_sdpa(module, query, key, value, attention_mask, **kw):
        record[module.layer_idx] = (module, as_model_dtype(key), as_model_dtype(value))
        return orig_sdpa(module, query, key, value, attention_mask, **kw)

    def spy_kv(module, *args, **kw):
        current[0] = module
        return orig_kv(module, *args, **kw)

    def spy_kernels(device):
        write, attend = orig_kernels(device)

        def spy_write(cache, key, value, slots, ks, vs, bits):
            write(cache, key, value, slots, ks, vs, bits)
            cb = code_bytes(key.shape[-1], bits)
            module = current[0]
            k = decode_kv(cache[..., :cb], ks, bits, key.dtype)  # [B, H, T, D]
            v = decode_kv(cache[..., cb:], vs, bits, value.dtype)
            record[module.layer_idx] = (module, k, v)

        return spy_write, attend

    table["sdpa"] = spy_sdpa
    if orig_kv is not None:
        table[KV_ATTN_PREFIX + "sdpa"] = spy_kv
    kplugin.kv_kernels = spy_kernels
    try:
        yield record
    finally:
        table["sdpa"] = orig_sdpa
        if orig_kv is not None:
            table[KV_ATTN_PREFIX + "sdpa"] = orig_kv
        kplugin.kv_kernels = orig_kernels


def make_mobile(src: Path, out: Path, *, kv_bits: dict[str, int] | None = None, kv_scale_mult: float = 1.0,
                seed: int = 0) -> Path:
    """Quantize the tiny bf16 model at `src` into a mobile checkpoint at `out` (W4A8O8 attention/MLP, 2-bit
    tied embedding; Gemma 4: 4-bit PLE table, W8A8O8 per-layer gate/projection; hybrid KV per `kv_bits`).
    KV scales are calibrated (absmax / ((qmax - qmin) / 2)) and multiplied by `kv_scale_mult`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kv_bits = kv_bits or {"sliding_attention": 8, "full_attention": 4}
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    text = model.config.get_text_config()

    def w(bits):
        return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")

    groups = {
        "w4a8o8": QuantizationScheme(targets=[r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"],
                                     weights=w(4), input_activations=QuantizationArgs(**ACT),
                                     output_activations=QuantizationArgs(**ACT), format="pack-quantized"),
        "embed_w2": QuantizationScheme(targets=[r"re:.*embed_tokens$"], weights=w(2), format="pack-quantized"),
    }
    if "gemma4" in text.model_type:
        groups["ple_w4"] = QuantizationScheme(targets=[r"re:.*embed_tokens_per_layer$"], weights=w(4),
                                              format="pack-quantized")
        groups["w8a8o8"] = QuantizationScheme(targets=[r"re:.*per_layer_(input_gate|projection)$"], weights=w(8),
                                              input_activations=QuantizationArgs(**ACT),
                                              output_activations=QuantizationArgs(**ACT), format="pack-quantized")
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=["lm_head"]))

    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    act_absmax: dict[str, list[float]] = {}
    kv_absmax: dict[int, list[float]] = {}
    hooks = []
    for n, m in quantized.items():
        m.quantization_enabled = False
        if m.quantization_scheme.input_activations is not None:
            def hook(mod, args, output, n=n):
                a = act_absmax.setdefault(n, [0.0, 0.0])
                a[0], a[1] = max(a[0], float(args[0].abs().max())), max(a[1], float(output.abs().max()))
            hooks.append(m.register_forward_hook(hook))
    torch.manual_seed(seed)
    ids = torch.cat([torch.full((4, 1), 2), torch.randint(3, text.vocab_size, (4, 47))], 1)
    record: dict = {}
    with torch.no_grad(), spy_attention(record):
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    for i, (_, k, v) in record.items():
        kv_absmax[i] = [float(k.abs().max()), float(v.abs().max())]
    with torch.no_grad():
        for n, m in quantized.items():
            m.quantization_enabled = True
            b = m.quantization_scheme.weights.num_bits
            m.weight_scale.copy_((m.weight.float().abs().amax(1, keepdim=True) / ((2 ** b - 1) / 2)))
            if n in act_absmax:
                m.input_scale.fill_(act_absmax[n][0] / 127.5)
                m.output_scale.fill_(act_absmax[n][1] / 127.5)
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)

    n_layers, types = text.num_hidden_layers, text.layer_types
    shared = getattr(text, "num_kv_shared_layers", 0) or 0
    first_shared = n_layers - shared
    sharing = {i: max(j for j in range(first_shared) if types[j] == types[i]) for i in range(first_shared, n_layers)}
    layer_bits = [None if i in sharing else kv_bits[types[i]] for i in range(n_layers)]
    f = out / "model.safetensors"
    with safe_open(str(f), "pt") as st:
        meta, tensors = st.metadata(), {k: st.get_tensor(k) for k in st.keys() if not k.startswith("lm_head")}
    for i, b in enumerate(layer_bits):
        if b is None:
            continue
        for j, kind in enumerate("kv"):
            scale = kv_absmax[i][j] / ((2 ** b - 1) / 2) * kv_scale_mult
            tensors[f"model.layers.{i}.self_attn.{kind}_scale"] = torch.tensor([scale], dtype=torch.float32)
    save_file(tensors, str(f), metadata=meta)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["gemma_mobile"] = {
        "version": 1,
        "kv_cache": {"layer_bits": layer_bits, "bits_by_layer_type": kv_bits,
                     **({"kv_sharing": {str(k): v for k, v in sharing.items()}} if sharing else {})}}
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mobile3(tiny_gemma3, tmp_path_factory) -> Path:
    return make_mobile(tiny_gemma3, tmp_path_factory.mktemp("m") / "gemma3-mobile")


@pytest.fixture(scope="module")
def mobile4(tiny_gemma4, tmp_path_factory) -> Path:
    return make_mobile(tiny_gemma4, tmp_path_factory.mktemp("m") / "gemma4-mobile")


# ---------------------------------------------------------------------------------------------------- data
def test_split_is_fixed_and_disjoint():
    ev, cal = set(data.EVALUATION_PLAYS), set(data.calibration_plays())
    assert ev and cal and not (ev & cal) and ev | cal == set(data.all_plays()) and len(data.all_plays()) >= 30
    text = data.evaluation_text()
    assert "To be, or not to be" in text and "HAMLET:" in text
    assert not re.search(r"[_*#\\]", text), "markdown left in the plain text"
    samples = data.calibration_texts(64, 1024)
    assert samples == data.calibration_texts(64, 1024) and len(samples) == 64
    assert len({s for s in samples}) == 64
    for s in samples:  # no calibration passage appears in the evaluation text
        probe = max(s.split("\n\n"), key=len)[:200]
        assert len(probe) > 20 and probe not in text
    for p in data.EVALUATION_PLAYS:  # and no evaluation passage in the calibration pool
        assert data.play_text(p)[2000:2200] not in "\n".join(data.calibration_texts(200, 4096))


# -------------------------------------------------------------------------------------------------- report
def _bf16_params(src: Path) -> int:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)  # persistent buffers (layer_scalar) count
    return sum(t.numel() for t in {t.data_ptr(): t for t in m.state_dict().values()}.values())  # tied: once


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_report_adds_up(family, request):
    src = request.getfixturevalue(f"tiny_{family}")
    mob = request.getfixturevalue(f"mobile{family[-1]}")
    rb, rm = report(src), report(mob)
    for r in (rb, rm):
        assert sum(r["bytes"].values()) == r["tensor_bytes"]
        assert r["tensor_bytes"] + r["header_bytes"] == r["safetensors_bytes"] < r["dir_bytes"]
        json.dumps(r)
    n = _bf16_params(src)
    assert rb["parameters"]["total"] == n == rm["parameters"]["total"]  # packed weights count their logical shape
    assert rb["bytes"]["scales"] == 0 and rb["tensor_bytes"] == 2 * n
    assert rm["bytes"]["scales"] > 0 and rm["tensor_bytes"] < rb["tensor_bytes"] / 2.5
    assert rm["bits_per_parameter"]["mlp"] == 4.0 and rm["bits_per_parameter"]["attention"] < 4.1
    cfg = json.loads((src / "config.json").read_text())
    H, V = cfg["hidden_size"], cfg["vocab_size"]
    if family == "gemma3":
        assert rm["bytes"]["embeddings"] == V * H * 2 // 8  # ONE 2-bit table (no lm_head copy)
    else:  # + the PLE table [V, layers * 16] at 4 bits
        assert rm["bytes"]["embeddings"] == V * H * 2 // 8 + V * 6 * 16 * 4 // 8
        assert rb["bytes"]["embeddings"] == (V * H + V * 6 * 16) * 2
        assert rm["bytes"]["other"] < rb["bytes"]["other"]  # per-layer gate/projection are 8-bit there


def test_report_kv_bytes():
    """Hand-computed: K and V, kv_heads=1, head_dim 32 (Gemma 4 full layers: 64), bits/8 bytes each."""
    import vllm_gemma_mobile.evaluate.report as rep

    from vllm_gemma_mobile.models.tiny import tiny_gemma3_config, tiny_gemma4_config

    c3 = tiny_gemma3_config().to_dict()
    c3["quantization_config"] = {"gemma_mobile": {"kv_cache": {"layer_bits": [8, 8, 8, 8, 8, 4]}}}
    kv = rep.kv_cache_report(c3)
    assert kv["groups"]["sliding_attention@int8"]["bytes_per_token"] == 5 * 2 * 32 * 1
    assert kv["groups"]["full_attention@int4"]["bytes_per_token"] == 1 * 2 * 32 * 0.5
    assert kv["bf16_bytes_per_token"] == 6 * 2 * 32 * 2
    assert kv["kv_bytes_at_context"]["4096"] == 4096 * 32 + 16 * 320  # sliding layers hold 16 tokens
    c4 = tiny_gemma4_config().to_dict()  # layers 4, 5 are KV-shared: no cache of their own
    c4["quantization_config"] = {"gemma_mobile": {"kv_cache": {"layer_bits": [8, 8, 4, 8, None, None],
                                                               "kv_sharing": {"4": 3, "5": 2}}}}
    kv = rep.kv_cache_report(c4)
    assert kv["layers_with_cache"] == [0, 1, 2, 3]
    assert kv["groups"]["full_attention@int4"]["head_dim"] == 64
    assert kv["bytes_per_token"] == 3 * 2 * 32 + 2 * 64 * 0.5
    assert kv["bf16_bytes_per_token"] == 3 * 2 * 32 * 2 + 2 * 64 * 2
    bf = rep.kv_cache_report(tiny_gemma4_config().to_dict())
    assert bf["bytes_per_token"] == bf["bf16_bytes_per_token"] == 3 * 128 + 256 and bf["ratio_vs_bf16"] == 1


# ----------------------------------------------------------------------------------------------- reference
def test_fake_quant_kv_rounding():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 100.0, -100.0, 0.26])
    got = fake_quant_kv(x, torch.tensor([1.0]), 4)
    assert got.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 7.0, -8.0, 0.0]  # half-to-even, clamp [-8, 7]
    # bf16 activations: computed in bf16 with the scale rounded to bf16 (as compressed-tensors does)
    xb, s = torch.tensor([0.30, -0.71, 9.0], dtype=torch.bfloat16), torch.tensor(0.1001)
    got = fake_quant_kv(xb, s, 8)
    sb = s.bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, torch.clamp(torch.round(xb / sb), -128, 127) * sb)


def _unpack(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """Independent unpacking of compressed-tensors pack-quantized int32 (offset binary, low bits first)."""
    per = 32 // bits
    p = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(p >> (bits * j)) & (2 ** bits - 1) for j in range(per)], -1).reshape(p.shape[0], -1)
    return (codes[:, : shape[1]] - 2 ** (bits - 1)).to(torch.float32)


def test_reload_numerics_match_contract(mobile3):
    """After reload: W = q * weight_scale exactly; linear = qdq(F.linear(qdq(x, s_in), W), s_out); tied head."""
    from safetensors import safe_open

    model, tok = load_reference(mobile3, numerics="bf16")  # this test checks compressed-tensors fake quant itself
    assert tok is not None and model.config._attn_implementation == KV_ATTN_PREFIX + "sdpa"
    info = model.gemma_mobile_reference
    assert info["kind"] == "mobile" and info["input_quantized"] == info["output_quantized"] == 6 * 7
    assert info["kv_bits"] == [8, 8, 8, 8, 8, 4]
    name = "model.layers.1.mlp.down_proj"
    with safe_open(str(mobile3 / "model.safetensors"), "pt") as st:
        q = _unpack(st.get_tensor(name + ".weight_packed"), 4, st.get_tensor(name + ".weight_shape").tolist())
        ws, s_in, s_out = (st.get_tensor(f"{name}.{k}") for k in ("weight_scale", "input_scale", "output_scale"))
        e = _unpack(st.get_tensor("model.embed_tokens.weight_packed"), 2, [-1, model.config.hidden_size])
        es = st.get_tensor("model.embed_tokens.weight_scale")
        assert not any(k.startswith("lm_head") for k in st.keys())
    assert q.abs().max() <= 8 and e.min() >= -2 and e.max() <= 1
    lin = model.get_submodule(name)
    torch.testing.assert_close(lin.weight.float(), (q * ws.float()).bfloat16().float(), rtol=0, atol=0)
    emb = model.get_input_embeddings().weight
    torch.testing.assert_close(emb.float(), (e * es.float()).bfloat16().float(), rtol=0, atol=0)
    assert model.get_output_embeddings().weight is emb
    x = torch.randn(3, 5, lin.in_features, dtype=torch.bfloat16) * 4 * float(s_in)
    si, so = s_in.bfloat16(), s_out.bfloat16()  # transformers loads the scales into bf16 parameters

    def qdq(t, s):
        return torch.clamp(torch.round(t / s), -128, 127) * s

    with torch.no_grad():
        want = qdq(torch.nn.functional.linear(qdq(x, si), lin.weight), so)
        got = lin(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(qdq(got, so), got) and torch.round(got / so).unique().numel() <= 256
    assert (got.float() - torch.nn.functional.linear(x, lin.weight).float()).abs().max() > 0  # QDQ is not a no-op


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_kv_cache_is_quantized_per_layer(family, request):
    """What attention reads is on each layer's grid (int8 sliding / int4 full); Gemma 4 shared layers use their
    source layer's scales (and read its already-quantized K/V); switching KV quant off changes the logits."""
    ckpt = request.getfixturevalue(f"mobile{family[-1]}")
    meta = json.loads((ckpt / "config.json").read_text())["quantization_config"]["gemma_mobile"]["kv_cache"]
    model, _ = load_reference(ckpt)
    ids = torch.cat([torch.tensor([[2]]), torch.randint(3, model.config.vocab_size, (1, 40))], 1)
    record: dict = {}
    with torch.no_grad(), spy_attention(record):
        on = model(ids, use_cache=False).logits
    kv_fake_quant_enabled(model, False)
    record_off: dict = {}
    with torch.no_grad(), spy_attention(record_off):
        off = model(ids, use_cache=False).logits
    kv_fake_quant_enabled(model, True)
    sharing = {int(k): v for k, v in (meta.get("kv_sharing") or {}).items()}
    assert sorted(record) == list(range(model.config.num_hidden_layers))
    for i, (module, k, v) in record.items():
        spec = module._gemma_mobile_kv
        src = sharing.get(i, i)
        assert spec.source_layer == src and spec.bits == meta["layer_bits"][src]
        for t, s in ((k, spec.k_scale), (v, spec.v_scale)):
            assert on_kv_grid(t, s, spec.bits), f"layer {i} K/V not on its int{spec.bits} grid"
    for i, (module, k, v) in record_off.items():  # the check discriminates: unquantized K/V are not on it
        assert not on_kv_grid(k, module._gemma_mobile_kv.k_scale, module._gemma_mobile_kv.bits)
    assert (on.float() - off.float()).abs().max() > 1e-3


def test_kv_quant_coarse_vs_fine(tiny_gemma3, tmp_path):
    """Coarse int4 KV (scales 16x too large: ~1 level each side) moves logits a lot; int8 with calibrated
    scales barely. (KV bits are 4 or 8 in the format: metadata.KVCacheMeta.)"""
    fine = make_mobile(tiny_gemma3, tmp_path / "fine", kv_bits={"sliding_attention": 8, "full_attention": 8})
    coarse = make_mobile(tiny_gemma3, tmp_path / "coarse", kv_bits={"sliding_attention": 4, "full_attention": 4},
                         kv_scale_mult=16.0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.tensor([[2]]), torch.randint(3, 1024, (1, 40), generator=gen)], 1)
    delta = {}
    for name, ckpt in (("fine", fine), ("coarse", coarse)):
        model, _ = load_reference(ckpt)
        with torch.no_grad():
            on = model(ids, use_cache=False).logits.float()
            kv_fake_quant_enabled(model, False)
            off = model(ids, use_cache=False).logits.float()
        delta[name] = (on - off).abs().mean().item()
    assert delta["coarse"] > 0.05 and delta["fine"] < delta["coarse"] / 10, delta


def test_kv_quant_applies_to_the_cache(mobile4):
    """Incremental decoding through the transformers cache: at every step, the K/V that attention reads (the
    whole cache) are on each layer's grid, sliding, full and KV-shared layers alike; and the logits track the
    KV-quantized full forward more closely than the unquantized one."""
    model, _ = load_reference(mobile4)
    gen = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.tensor([[2]]), torch.randint(3, 1024, (1, 23), generator=gen)], 1)

    def incremental(check: bool) -> torch.Tensor:
        out = model(ids[:, :12], use_cache=True)
        steps, cache = [out.logits.float()], out.past_key_values
        for t in range(12, ids.shape[1]):
            record: dict = {}
            with spy_attention(record):
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits.float())
            if check:
                assert sorted(record) == list(range(model.config.num_hidden_layers))
                for i, (module, k, v) in record.items():
                    spec = module._gemma_mobile_kv
                    if module.sliding_window is None:  # full attention reads the whole cache
                        assert k.shape[-2] == t + 1
                    assert on_kv_grid(k, spec.k_scale, spec.bits) and on_kv_grid(v, spec.v_scale, spec.bits), (t, i)
        return torch.cat(steps, 1)

    with torch.no_grad():
        full_on = model(ids, use_cache=False).logits.float()
        inc_on = incremental(check=True)
        kv_fake_quant_enabled(model, False)
        full_off = model(ids, use_cache=False).logits.float()
    kv_fake_quant_enabled(model, True)
    assert (inc_on - full_on).abs().mean() < 0.6 * (inc_on - full_off).abs().mean()


def _rewrite(ckpt: Path, out: Path, fn) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(ckpt, out)
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        meta, t = st.metadata(), {k: st.get_tensor(k) for k in st.keys()}
    fn(t)
    save_file(t, str(out / "model.safetensors"), metadata=meta)
    return out


def test_bad_scales_fail_loudly(mobile3, tmp_path):
    missing = _rewrite(mobile3, tmp_path / "a", lambda t: t.pop("model.layers.2.self_attn.k_scale"))
    with pytest.raises(ContractError, match=r"model\.layers\.2\.self_attn\.k_scale: missing"):
        load_reference(missing)
    zero = _rewrite(mobile3, tmp_path / "b", lambda t: t["model.layers.5.self_attn.v_scale"].zero_())
    with pytest.raises(ContractError, match=r"model\.layers\.5\.self_attn\.v_scale = 0\.0: KV scales must be finite and > 0"):
        load_reference(zero)
    nan = _rewrite(mobile3, tmp_path / "c", lambda t: t["model.layers.0.mlp.up_proj.input_scale"].fill_(math.nan))
    with pytest.raises(ContractError, match=r"model\.layers\.0\.mlp\.up_proj\.input_scale = nan: static scales"):
        load_reference(nan)


# ------------------------------------------------------------------------------------------------- quality
def test_evaluate_self_and_mobile(tiny_gemma3, mobile3):
    from vllm_gemma_mobile.evaluate.quality import evaluate

    text = data.evaluation_text(20000)
    same = evaluate(tiny_gemma3, tiny_gemma3, text=text, max_tokens=300, seq_len=64)
    json.dumps(same)
    assert same["tokens"] == 300 and same["windows"] == math.ceil(300 / 63)
    assert same["kl_mean"] < 1e-6 and same["greedy_agreement_pct"] == 100.0
    assert same["perplexity"]["model"] == same["perplexity"]["reference"] > 1
    mob = evaluate(mobile3, tiny_gemma3, text=text, max_tokens=300, seq_len=64)
    assert mob["perplexity"]["reference"] == same["perplexity"]["reference"]
    assert mob["kl_mean"] > 1e-3 and 50 < mob["greedy_agreement_pct"] <= 100
    assert math.isfinite(mob["perplexity"]["model"]) and mob["perplexity"]["model"] != mob["perplexity"]["reference"]
    assert mob["model_info"]["kind"] == "mobile" and mob["model_info"]["kv_bits"] == [8, 8, 8, 8, 8, 4]


def test_float_table_ablation_puts_the_bf16_table_in_both_roles(tiny_gemma3, mobile3):
    """`use_float_table` (evaluate(table="bf16")): the embedding gathers the bf16 base rows (times Gemma's
    normalizer, as in the base) and the lm_head computes exactly `F.linear(h, W_base)` on whatever reaches it;
    the linears keep their served numerics (the logits still differ from the base's)."""
    from vllm_gemma_mobile.evaluate.reference import load_reference, use_float_table

    base, _ = load_reference(tiny_gemma3)
    mob, _ = load_reference(mobile3)
    ids = torch.tensor([[2, 17, 99, 5, 300, 41]])
    use_float_table(mob, base)
    assert torch.equal(mob.get_input_embeddings()(ids), base.get_input_embeddings()(ids))
    h = torch.randn(1, 6, base.config.hidden_size).to(torch.bfloat16)
    w = base.get_input_embeddings().weight
    assert torch.equal(mob.get_output_embeddings()(h), torch.nn.functional.linear(h, w))
    assert mob.gemma_mobile_reference["table"] == "bf16 (ablation)"
    assert not torch.equal(mob(ids).logits, base(ids).logits)


def test_project_quantize_output_is_a_valid_reference(tiny_gemma3, tmp_path):
    """The project's own pipeline (quantize/run.py: llmcompressor GPTQ + static scales) -> load_reference with
    activation and per-layer KV fake quant -> report and evaluate."""
    from vllm_gemma_mobile.evaluate.quality import evaluate
    from vllm_gemma_mobile.quantize.run import quantize

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "gemma3_mobile_ptq.yaml"
    ckpt = quantize(tiny_gemma3, recipe, tmp_path / "q", num_samples=8, seq_len=64)
    model, _ = load_reference(ckpt)
    info = model.gemma_mobile_reference
    assert info["kind"] == "mobile" and info["kv_bits"] == [8, 8, 8, 8, 8, 4] and info["input_quantized"] == 42
    del model
    r = report(ckpt)
    assert sum(r["bytes"].values()) == r["tensor_bytes"] and r["bits_per_parameter"]["embeddings"] == 2.0
    res = evaluate(ckpt, tiny_gemma3, text=data.evaluation_text(20000), max_tokens=126, seq_len=64)
    assert res["tokens"] == 126 and res["kl_mean"] > 0 and math.isfinite(res["perplexity"]["model"])
