"""kernels/kvcache.py: the KV numerics (vs a naive float64 formula and, bitwise, vs the evaluation reference),
int4 packing, the paged write, and paged attention over the quantized cache vs dense attention on the
dequantized K/V (prefill, chunked prefill, decode, mixed batch, sliding window, softcap, GQA). vLLM-free."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from kernels import kvcache as kvc

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import kv_chunk_steps  # noqa: E402


def _naive_codes(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """Float64 formula on the bf16 values: x / s (s rounded to bf16, quotient rounded to bf16 as the reference
    divides in bf16), round half to even, clamp."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = float(torch.tensor(scale, dtype=torch.float32).bfloat16())
    out = []
    for v in x.double().flatten().tolist():
        qf = float(torch.tensor(v / s, dtype=torch.float64).bfloat16())  # bf16 division = exact quotient rounded
        r = math.floor(qf + 0.5)
        if qf + 0.5 == r and r % 2:  # exact .5: round half to even
            r -= 1
        out.append(min(max(r, lo), hi))
    return torch.tensor(out, dtype=torch.int8).reshape(x.shape)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_matches_naive_float64(bits):
    g = torch.Generator().manual_seed(bits)
    s = 0.0371 if bits == 8 else 0.61
    x = (torch.randn(4000, generator=g) * s * 2 ** (bits - 1) * 0.7).bfloat16()
    x[:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1e4]) * float(torch.tensor(s).bfloat16())  # ties, clamp
    codes = kvc.quantize_kv(x, torch.tensor(s), bits)
    assert codes.dtype == torch.int8
    assert torch.equal(codes, _naive_codes(x, s, bits))
    sb = torch.tensor(s).bfloat16()
    assert torch.equal(kvc.dequantize_kv(codes, torch.tensor(s), torch.bfloat16), codes.bfloat16() * sb)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fake_quant_bitwise_equals_evaluation_reference(bits, dtype):
    """The evaluation's formula (inlined as it was before the delegation) and the delegate agree bit for bit."""
    from vllm_gemma_mobile.evaluate.reference import fake_quant_kv as ref_fq

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 3, 64, 32, generator=g) * 3).to(dtype)
    scale = torch.tensor([0.02731]) if bits == 8 else torch.tensor([0.3911])
    qmax = 2 ** (bits - 1) - 1
    s = scale.to(dtype)
    inline = torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s
    got = kvc.fake_quant_kv(x, scale, bits)
    assert got.dtype == dtype
    assert torch.equal(got, inline)  # bitwise up to the sign of zero (the reference keeps -0.0, codes do not)
    assert torch.equal(ref_fq(x, scale, bits), got)
    # python float scale == f32 tensor scale
    assert torch.equal(kvc.fake_quant_kv(x, float(scale), bits), got)


def test_int4_packing_layout():
    codes = torch.tensor([[-8, 7, 0, -1, 3, -4]], dtype=torch.int8)
    p = kvc.pack_int4(codes)
    # low nibble = even element, offset binary (code + 8)
    assert p.dtype == torch.uint8 and p.tolist() == [[0 | (15 << 4), 8 | (7 << 4), 11 | (4 << 4)]]
    allc = torch.arange(-8, 8, dtype=torch.int8).repeat(3)[None, :]
    assert torch.equal(kvc.unpack_int4(kvc.pack_int4(allc)), allc)
    assert kvc.code_bytes(256, 8) == 256 and kvc.code_bytes(512, 4) == 256


def _random_cache(num_blocks, h, bs, d, bits):
    return torch.randint(0, 256, (num_blocks, h, bs, 2 * kvc.code_bytes(d, bits)), dtype=torch.uint8)


@pytest.mark.parametrize("bits", [4, 8])
def test_write_kv_cache_slots(bits):
    h, d, bs = 2, 16, 4
    cache = _random_cache(6, h, bs, d, bits)
    before = cache.clone()
    k = torch.randn(5, h, d).bfloat16()
    v = torch.randn(5, h, d).bfloat16()
    slots = torch.tensor([9, 10, -1, 0, 23])  # a padding slot is skipped
    kvc.write_kv_cache(cache, k, v, slots, 0.05, 0.07, bits)
    cb = kvc.code_bytes(d, bits)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        row = cache[s // bs, :, s % bs]
        assert torch.equal(kvc.decode_kv(row[:, :cb], 0.05, bits, torch.bfloat16), kvc.fake_quant_kv(k[t], 0.05, bits))
        assert torch.equal(kvc.decode_kv(row[:, cb:], 0.07, bits, torch.bfloat16), kvc.fake_quant_kv(v[t], 0.07, bits))
    touched = torch.zeros(6, bs, dtype=torch.bool)
    for s in (9, 10, 0, 23):
        touched[s // bs, s % bs] = True
    assert torch.equal(cache.permute(0, 2, 1, 3)[~touched], before.permute(0, 2, 1, 3)[~touched])


def _sdpa(q, k, v, scale, window, softcap):
    """Independent dense reference: torch SDPA-style math in float64 on [T, H, D] (GQA by repeat)."""
    t, hq, _ = q.shape
    g = hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 5.0), (5, 3.0)])
def test_paged_attention_matches_dense(bits, window, softcap):
    """Three requests in one mixed batch, each processed in chunks (prefill chunk, then more chunks / decode),
    blocks scattered in a shared pool; every output row equals dense causal attention on the dequantized K/V."""
    torch.manual_seed(bits * 100 + (window or 0))
    hq, h, d, bs = 4, 2, 16, 4  # GQA 2
    k_scale, v_scale = 0.04, 0.03
    lens = [13, 5, 22]
    chunks = [[6, 1, 4, 1, 1], [5], [3, 9, 1, 8, 1]]  # chunked prefill + decode steps per request
    num_blocks = 40
    cache = torch.zeros(num_blocks, h, bs, 2 * kvc.code_bytes(d, bits), dtype=torch.uint8)
    perm = torch.randperm(num_blocks - 1) + 1
    tables = torch.zeros(3, 8, dtype=torch.long)
    nxt = 0
    for r, n in enumerate(lens):
        nb = -(-n // bs)
        tables[r, :nb] = perm[nxt:nxt + nb]
        nxt += nb
    q = [torch.randn(n, hq, d).bfloat16() for n in lens]
    k = [torch.randn(n, h, d).bfloat16() * 2 for n in lens]
    v = [torch.randn(n, h, d).bfloat16() for n in lens]
    got = [torch.empty(n, hq, d, dtype=torch.bfloat16) for n in lens]
    scale = d ** -0.5
    for reqs, qb, kb, vb, slots, qsl, seq, spans in kv_chunk_steps(chunks, tables, bs, q, k, v):
        kvc.write_kv_cache(cache, kb, vb, slots, k_scale, v_scale, bits)
        out = kvc.paged_attention(qb, cache, qsl, seq, tables[reqs], k_scale, v_scale, bits, scale,
                                  sliding_window=window, softcap=softcap)
        for i, (r, (a0, b0)) in enumerate(zip(reqs, spans)):
            got[r][a0:b0] = out[qsl[i]:qsl[i + 1]]
    for r in range(3):
        kd, vd = kvc.fake_quant_kv(k[r], k_scale, bits), kvc.fake_quant_kv(v[r], v_scale, bits)
        ref = _sdpa(q[r], kd, vd, scale, window, softcap)
        torch.testing.assert_close(got[r].double(), ref, atol=2e-2, rtol=2e-2)
        # and the in-module dense attention (same f32 math) is closer still
        dense = kvc.dense_attention(q[r], kd, vd, scale, sliding_window=window, softcap=softcap)
        torch.testing.assert_close(got[r].float(), dense.float(), atol=1e-2, rtol=1e-2)


def test_paged_attention_reads_only_the_window():
    """A sliding-window request never touches blocks before its window (vLLM frees them: null block ids)."""
    h, d, bs, bits, w = 1, 8, 4, 8, 5
    cache = torch.zeros(10, h, bs, 2 * d, dtype=torch.uint8)
    k = torch.randn(12, h, d).bfloat16()
    table = torch.arange(1, 4)[None].repeat(1, 1)  # blocks 1..3 hold positions 0..11
    kvc.write_kv_cache(cache, k, k, torch.arange(4, 16), 0.05, 0.05, bits)
    q = torch.randn(1, h, d).bfloat16()
    ref = kvc.paged_attention(q, cache, torch.tensor([0, 1]), torch.tensor([12]), table, 0.05, 0.05, bits, 0.3,
                              sliding_window=w)
    table2 = table.clone()
    table2[0, 0] = 0  # positions 0..3 freed (block 0 is garbage) - position 11 sees 7..11 only
    cache[0] = 255
    got = kvc.paged_attention(q, cache, torch.tensor([0, 1]), torch.tensor([12]), table2, 0.05, 0.05, bits, 0.3,
                              sliding_window=w)
    assert torch.equal(got, ref)
