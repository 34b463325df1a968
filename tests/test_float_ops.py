"""The float ops around the quantized ones are served with the evaluation reference's rounding
(`vllm_gemma_mobile/vllm/float_ops.py`): vLLM's RoPE and residual-add RMSNorm modules, as the plugin patches them,
are bit-identical to transformers' Gemma 3 functions on the same bf16 inputs.

Exact comparisons: both sides are deterministic elementwise/row ops with the same operation order once patched.
Unpatched, this machine's vLLM differs (RoPE truncates f32 -> bf16, the fused norm normalizes the unrounded f32
sum): the test shows that too where the difference is a property of vLLM's math rather than of the CPU (the
fused norm); the RoPE kernel's rounding depends on the ISA, so only the patched equality is asserted for it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def vllm_ctx():
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def _hf_gemma3():
    import transformers.models.gemma3.modeling_gemma3 as g
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=640, head_dim=256, num_attention_heads=4, num_key_value_heads=1,
                           rope_parameters={"full_attention": {"rope_theta": 1e6, "rope_type": "linear",
                                                               "factor": 8.0},
                                            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}})
    return g, cfg


@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_rope_bitwise_transformers(vllm_ctx, layer_type):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from vllm_gemma_mobile.vllm import float_ops

    g, cfg = _hf_gemma3()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds its modules under the model dtype
    try:
        rope = get_rope(256, max_position=4096, rope_parameters=cfg.rope_parameters[layer_type], is_neox_style=True)
    finally:
        torch.set_default_dtype(old)
    holder = torch.nn.ModuleDict({"rotary_emb": rope})
    assert float_ops.apply(holder) == {"rotary": 1, "rms_norm": 0}
    assert float_ops.describe(holder)["rotary"] == 1

    n = 300
    pos = torch.cat([torch.arange(n - 4), torch.tensor([1000, 2047, 3000, 4095])])  # large angles too
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(n, 4, 256, generator=gen) * 8).bfloat16()
    k = (torch.randn(n, 1, 256, generator=gen) * 8).bfloat16()
    qv, kv = rope(pos, q.reshape(n, -1).clone(), k.reshape(n, -1).clone())
    cos, sin = g.Gemma3RotaryEmbedding(cfg)(q, pos[None], layer_type=layer_type)
    qh, kh = g.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    assert torch.equal(qv.reshape(n, 4, 256), qh[0].transpose(0, 1))
    assert torch.equal(kv.reshape(n, 1, 256), kh[0].transpose(0, 1))


def test_residual_norm_bitwise_transformers(vllm_ctx):
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm

    from vllm_gemma_mobile.vllm import float_ops

    g, cfg = _hf_gemma3()
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(640, generator=gen) * 0.5).bfloat16()
    vn = GemmaRMSNorm(640, eps=cfg.rms_norm_eps).to(torch.bfloat16)
    vn.weight.data.copy_(w)
    hn = g.Gemma3RMSNorm(640, eps=cfg.rms_norm_eps).to(torch.bfloat16)
    hn.weight.data.copy_(w)
    # residual stream and branch of very different magnitudes: the sum's bf16 rounding matters
    x = (torch.randn(64, 640, generator=gen) * 3).bfloat16()
    r = (torch.randn(64, 640, generator=gen) * 300).bfloat16()
    with torch.no_grad():
        fused_out, fused_sum = vn(x, r)                    # vLLM's own fused op: normalizes the f32 sum
        hf_sum = r + x                                      # Gemma3DecoderLayer: hidden = residual + hidden
        hf_out = hn(hf_sum)
        assert torch.equal(fused_sum, hf_sum)
        assert not torch.equal(fused_out, hf_out), "vLLM's fused norm already rounds like transformers"
        holder = torch.nn.ModuleDict({"norm": vn})
        assert float_ops.apply(holder) == {"rotary": 0, "rms_norm": 1}
        assert float_ops.apply(holder) == {"rotary": 0, "rms_norm": 0}  # idempotent
        out, s = vn(x, r)
        assert torch.equal(s, hf_sum) and torch.equal(out, hf_out)
        assert torch.equal(vn(x), hn(x))                    # no residual: the unfused norm, unchanged


def test_mode_switch(monkeypatch):
    from vllm_gemma_mobile.vllm import float_ops

    assert float_ops.mode() == "reference"
    monkeypatch.setenv(float_ops.ENV, "vllm")
    assert float_ops.mode() == "vllm"
    monkeypatch.setenv(float_ops.ENV, "fast")
    with pytest.raises(ValueError, match="GEMMA_MOBILE_FLOAT_OPS"):
        float_ops.mode()
