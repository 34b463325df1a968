"""`kv_ranges: attention_output` (quantize/kv_ranges.py): KV scales chosen by the attention-output error."""

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from kernels.kvcache import fake_quant_kv
from vllm_gemma_mobile.quantize.kv_ranges import RATIOS, KVRangeSearch, _Captured, attention

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def test_attention_equals_sdpa_with_the_same_mask():
    """The search's f32 attention is plain causal (sliding-window) GQA attention: equal to torch's SDPA on the
    same mask up to f32 summation order (|softmax(s) v| <= max|v|, ~1e-6 relative rounding per op)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, 24, 16, generator=g) for h in (4, 2, 2))
    for window in (None, 5):
        i = torch.arange(24)
        mask = i[None, :] <= i[:, None]
        if window:
            mask &= (i[:, None] - i[None, :]) < window
        want = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), attn_mask=mask, scale=0.3)
        got = attention(q, k, v, 0.3, window, None)
        torch.testing.assert_close(got, want.transpose(0, 1).reshape(24, 64), rtol=0, atol=1e-5)


class _Attn(torch.nn.Module):
    """The attributes of an HF attention module the search reads, with int4 KV args."""

    def __init__(self, d: int, k_scale: float, v_scale: float):
        super().__init__()
        self.o_proj = torch.nn.Linear(2 * d, 8, bias=False)
        self.k_scale = torch.nn.Parameter(torch.tensor([k_scale], dtype=torch.bfloat16), requires_grad=False)
        self.v_scale = torch.nn.Parameter(torch.tensor([v_scale], dtype=torch.bfloat16), requires_grad=False)
        self.scaling, self.sliding_window, self.config = 1.0, None, type("C", (), {})()
        self.quantization_scheme = QuantizationScheme(
            targets=["x"], input_activations=QuantizationArgs(num_bits=4, type="int", strategy="tensor"))


def test_search_clips_a_key_channel_the_queries_never_read():
    """K has an outlier channel (12x the others) that every query multiplies by 0: the observer's absmax-like range wastes the
    15 int4 levels on it; the attention-output search must shrink the k scale (ratio < 1), lower the error, and
    leave the checkpoint's scale equal to ratio x observer scale in bf16."""
    torch.manual_seed(0)
    d, t = 16, 64
    q = torch.randn(2, t, d)
    q[:, :, 0] = 0.0
    k = torch.randn(1, t, d) * 0.5
    k[:, :, 0] = 6.0
    v = torch.randn(1, t, d)
    k_obs = float(k.abs().max()) / 7.5                          # min/max-like scale: 40 / (7 + 1/2)
    v_obs = float(v.abs().max()) / 7.5
    m = _Attn(d, k_obs, v_obs)
    s = KVRangeSearch(tokens=t)
    s.captured[m] = _Captured(q=[q.bfloat16()], k=[k.bfloat16()], v=[v.bfloat16()])

    def err(ks, vs):  # vs None: V unquantized (the K side alone)
        vq = v.bfloat16() if vs is None else fake_quant_kv(v.bfloat16(), vs, 4)
        out = attention(q.bfloat16(), fake_quant_kv(k.bfloat16(), ks, 4), vq, 1.0, None, None)
        ref = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1.0, None, None)
        return float((((out - ref) @ m.o_proj.weight.detach().float().T) ** 2).sum())

    before, k_before = err(m.k_scale.float(), m.v_scale.float()), err(m.k_scale.float(), None)
    (r_k, r_v), = s.finish(m).values()
    assert r_k < 0.5 and r_k in RATIOS and r_v in RATIOS
    assert float(m.k_scale) == float((torch.tensor(k_obs, dtype=torch.bfloat16).float() * r_k).bfloat16())
    assert err(m.k_scale.float(), m.v_scale.float()) < before
    # measured 0.083x (ratio 0.25): one int4 step of 6/7.5 rounds the used 0.5-wide channels to 0 or +-1
    assert err(m.k_scale.float(), None) < 0.2 * k_before


def test_recipe_rescales_kv_scales_and_restores_attention(tiny_gemma3):
    """The recipe option end to end on a tiny Gemma 3: every layer's k/v scale is (ratio in RATIOS) x the scale the
    same calibration gives without the search (bf16-rounded), and the model's attention function is restored."""
    from vllm_gemma_mobile.quantize.run import calibrate

    def scales(mode):
        cal = calibrate(tiny_gemma3, RECIPES / "gemma3_mobile_ptq.yaml", num_samples=4, seq_len=32,
                        overrides={"kv_ranges": mode})
        assert cal.model.config._attn_implementation != "gemma_mobile_kv_ranges_capture"
        return {n: (m.k_scale.float(), m.v_scale.float()) for n, m in cal.model.named_modules()
                if hasattr(m, "k_scale")}

    base, searched = scales("observer"), scales("attention_output")
    assert base.keys() == searched.keys() and len(base) == 6
    for n in base:
        for b, s in zip(base[n], searched[n]):
            assert any(torch.equal(s, (b * r).bfloat16().float()) for r in RATIOS), (n, b, s)


def test_bad_option():
    from vllm_gemma_mobile.scheme.spec import MobileScheme

    with pytest.raises(ValueError, match="kv_ranges"):
        MobileScheme(kv_ranges="percentile")
    with pytest.raises(ValueError, match="kv_range_tokens"):
        MobileScheme(kv_range_tokens=0)


def test_multi_sequence_batches_are_refused():
    """A batch of two sequences may be padded, and padded positions would be counted as keys: the capture refuses
    it with a message naming the fix instead of searching on them."""
    m = torch.nn.Module()
    s = KVRangeSearch(tokens=64)
    s.captured[m] = _Captured()
    with pytest.raises(ValueError, match="batches of one sequence.*batch_size 1"):
        s._hook("k")(m, torch.zeros(2, 1, 8, 4))
    s._hook("k")(m, torch.zeros(1, 1, 8, 4))
    assert s.captured[m].tokens["k"] == 8 and s.captured[m].k[0].shape == (1, 8, 4)
