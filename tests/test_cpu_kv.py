"""The C++ quantized KV-cache kernels (kernels/cpu_kv.cpp) against the torch reference (kernels/kvcache.py).

Write: bitwise. Attention: K/V dequantization is exact in both (the same roundings), so the two differ only by f32
summation order (dot products, softmax sum, P @ V) and libm vs torch's exp / tanh; `_bound` derives the allowed
difference per element from that arithmetic, plus one unit in the last place of the output dtype (two f32 results
within the bound can round to neighbouring bf16 values).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from kernels import cpu_kv
from kernels import kvcache as kvc

sys.path.insert(0, str(Path(__file__).parent))
from fixtures_ckpt import kv_chunk_steps  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_kv.available(), reason="C++ kernels not buildable here (no AVX2)")



@pytest.fixture(autouse=True, params=["default", "eight_lanes"])
def lane_width(request):
    """Every test on both kernel widths: the build's default (16 lanes with AVX-512 where head_dim % 16 == 0) and
    the 8-lane AVX2 code (`cpu_kv.eight_lanes`), which AVX-512 machines would otherwise never run."""
    if request.param == "eight_lanes":
        with cpu_kv.eight_lanes():
            assert cpu_kv.lanes() == 8
            yield 8
    else:
        yield cpu_kv.lanes()


def test_sixteen_lanes_exactly_where_the_build_has_avx512(lane_width, request):
    from kernels import cpu_packed

    default = request.node.callspec.params["lane_width"] == "default"
    assert lane_width == (16 if default and cpu_packed.avx512_flags() else 8)


U = 2.0 ** -24  # f32 unit roundoff
MANT = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |x| (float64)."""
    _, e = torch.frexp(x.double().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.pow(2.0, (e - 1 - MANT[dtype]).double())


def _bound(q, kd, vd, scale, window, softcap, positions):
    """Per-element bound on |cpp - ref| before the final cast, from f32 rounding only (both sides):
    scores |ds| <= gamma_D * scale * |q|.|k| (+ 4u*cap for tanh), each p_j moves by a relative <= 2 max|ds| +
    (nk + 8)u (softmax shift, exp, sum, division), the P @ V sum adds gamma_nk; each side is within that of the
    exact result, so the difference is within twice. q [nq, Hq, D]; kd/vd [nk, H, D] (dequantized); float64."""
    nq, hq, d = q.shape
    g = hq // kd.shape[1]
    k = kd.double().repeat_interleave(g, 1)
    v = vd.double().repeat_interleave(g, 1)
    s_abs = torch.einsum("qhd,khd->hqk", q.double().abs(), k.abs()) * scale
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = positions[:, None]
    j = torch.arange(k.shape[0])[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    ds = _gamma(d) * s_abs + (4 * U * softcap if softcap else 0.0)
    ds_max = ds.masked_fill(~mask, 0).amax(-1, keepdim=True)  # [h, nq, 1]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    nk = int(mask.sum(-1).max())
    pv_abs = torch.einsum("hqk,khd->qhd", p, v.abs())
    rel = (2 * ds_max + (nk + 8) * U + _gamma(nk)).permute(1, 0, 2)  # [nq, h, 1]
    return 2 * rel * pv_abs


def _scattered(lens, h, d, bits, bs, num_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(num_blocks, h, bs, 2 * kvc.code_bytes(d, bits), dtype=torch.uint8)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1
    tables = torch.zeros(len(lens), max(-(-n // bs) for n in lens) + 1, dtype=torch.long)
    nxt = 0
    for r, n in enumerate(lens):
        nb = -(-n // bs)
        tables[r, :nb] = perm[nxt:nxt + nb]
        nxt += nb
    return cache, tables


def _slots(tables, r, a, b, bs):
    pos = torch.arange(a, b)
    return tables[r, pos // bs] * bs + pos % bs


def _hat(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """The K/V values attention reads back: fake quant, or (bits 16, the unquantized page) the values themselves."""
    return x if bits == kvc.UNQUANTIZED else kvc.fake_quant_kv(x, scale, bits)


WRITE_CASES = [(b, t) for b in (4, 8) for t in (torch.bfloat16, torch.float16, torch.float32)] + \
    [(16, torch.bfloat16), (16, torch.float16)]


@pytest.mark.parametrize("bits,dtype", WRITE_CASES)
def test_write_bitwise_equals_reference(bits, dtype):
    """Random values, exact .5 ties of x/s, values far past the clamp, and a padding slot (-1)."""
    torch.manual_seed(bits)
    t, h, d, bs, s = 9, 2, 32, 4, 0.0625  # s a power of two: x / s exact, ties land exactly on .5
    x = torch.randn(t, h, d) * 0.4
    x[0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 100.0, -100.0, 0.0]) * s
    key, value = x.to(dtype), (x.flip(0) * 3).to(dtype)
    slots = torch.tensor([5, 0, 17, -1, 3, 30, 31, 8, 12])
    ref = torch.zeros(10, h, bs, 2 * kvc.code_bytes(d, bits), dtype=torch.uint8)
    got = ref.clone()
    kvc.write_kv_cache(ref, key, value, slots, s, 0.03, bits)
    cpu_kv.write_kv_cache(got, key, value, slots, s, 0.03, bits)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("bits,dtype", [(4, torch.bfloat16), (4, torch.float32), (8, torch.bfloat16),
                                        (8, torch.float32), (16, torch.bfloat16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 5.0), (5, 3.0)])
def test_paged_attention_matches_reference(bits, window, softcap, dtype):
    """Mixed batches of chunked prefill and decode over blocks scattered in a shared pool (GQA 2, 2 kv heads);
    one request's 40-token chunk spans several 64-row query tiles."""
    torch.manual_seed(bits * 10 + (window or 0))
    hq, h, d, bs = 4, 2, 32, 4
    k_scale, v_scale, scale = 0.04, 0.03, d ** -0.5
    lens = [13, 5, 61]
    chunks = [[6, 1, 4, 1, 1], [5], [3, 40, 1, 16, 1]]
    cache, tables = _scattered(lens, h, d, bits, bs, 64, seed=bits)
    q = [torch.randn(n, hq, d).to(dtype) for n in lens]
    k = [(torch.randn(n, h, d) * 2).to(dtype) for n in lens]
    v = [torch.randn(n, h, d).to(dtype) for n in lens]
    for reqs, qb, kb, vb, slots, qsl, seq, spans in kv_chunk_steps(chunks, tables, bs, q, k, v):
        cpu_kv.write_kv_cache(cache, kb, vb, slots, k_scale, v_scale, bits)
        args = (qb, cache, qsl, seq, tables[reqs], k_scale, v_scale, bits, scale)
        ref = kvc.paged_attention(*args, sliding_window=window, softcap=softcap)
        got = cpu_kv.paged_attention(*args, sliding_window=window, softcap=softcap)
        for i, (r, (a, b)) in enumerate(zip(reqs, spans)):
            kd, vd = _hat(k[r][:b], k_scale, bits), _hat(v[r][:b], v_scale, bits)
            bound = _bound(q[r][a:b], kd, vd, scale, window, softcap, torch.arange(a, b))
            g_, r_ = got[qsl[i]:qsl[i + 1]].double(), ref[qsl[i]:qsl[i + 1]].double()
            allowed = bound + _ulp(torch.maximum(g_.abs(), r_.abs()), dtype)
            assert bool(((g_ - r_).abs() <= allowed).all()), f"request {r} at {a}:{b}: max excess " \
                f"{float(((g_ - r_).abs() - allowed).max())}"


@pytest.mark.parametrize("bits,d", [(8, 256), (4, 512)])
def test_decode_gemma_head_dims(bits, d):
    """Gemma's head dims (270M / E2B sliding 256, E2B global 512), 8 query heads on 1 kv head, 16-token blocks,
    16 decoding requests of different lengths (the multi-stream decode step)."""
    torch.manual_seed(d)
    hq, h, bs = 8, 1, 16
    lens = [int(x) for x in torch.randint(1, 300, (16,))]
    cache, tables = _scattered(lens, h, d, bits, bs, sum(-(-n // bs) for n in lens) + 1, seed=d)
    ks, vs = 0.05, 0.02
    kv = [(torch.randn(n, h, d) * 3).bfloat16() for n in lens]
    for r, n in enumerate(lens):
        cpu_kv.write_kv_cache(cache, kv[r], kv[r] * 0.5, _slots(tables, r, 0, n, bs), ks, vs, bits)
    q = torch.randn(len(lens), hq, d).bfloat16()
    args = (q, cache, torch.arange(len(lens) + 1), torch.tensor(lens), tables, ks, vs, bits, d ** -0.5)
    ref = kvc.paged_attention(*args, sliding_window=128)
    got = cpu_kv.paged_attention(*args, sliding_window=128)
    for r, n in enumerate(lens):
        kd = kvc.fake_quant_kv(kv[r], ks, bits)
        vd = kvc.fake_quant_kv(kv[r] * 0.5, vs, bits)
        bound = _bound(q[r:r + 1], kd, vd, d ** -0.5, 128, None, torch.tensor([n - 1]))
        g_, r_ = got[r:r + 1].double(), ref[r:r + 1].double()
        assert bool(((g_ - r_).abs() <= bound + _ulp(torch.maximum(g_.abs(), r_.abs()), torch.bfloat16)).all())


def test_reads_only_the_window():
    """Blocks before a sliding window may be freed by vLLM (null block id, garbage): never read."""
    h, d, bs, bits, w = 1, 16, 4, 8, 5
    cache = torch.zeros(10, h, bs, 2 * d, dtype=torch.uint8)
    k = torch.randn(12, h, d).bfloat16()
    table = torch.arange(1, 4)[None]
    cpu_kv.write_kv_cache(cache, k, k, torch.arange(4, 16), 0.05, 0.05, bits)
    q = torch.randn(1, h, d).bfloat16()
    args = (q, cache, torch.tensor([0, 1]), torch.tensor([12]))
    ref = cpu_kv.paged_attention(*args, table, 0.05, 0.05, bits, 0.3, sliding_window=w)
    table2 = table.clone()
    table2[0, 0] = 0
    cache[0] = 255
    assert torch.equal(cpu_kv.paged_attention(*args, table2, 0.05, 0.05, bits, 0.3, sliding_window=w), ref)


def test_bad_input_errors():
    cache = torch.zeros(4, 1, 4, 32, dtype=torch.uint8)  # int8 rows for head_dim 16
    k = torch.randn(1, 1, 16).bfloat16()
    with pytest.raises(ValueError, match="int8 or int4"):
        cpu_kv.write_kv_cache(cache, k, k, torch.tensor([0]), 0.1, 0.1, 2)
    with pytest.raises(RuntimeError, match="expected 16"):  # int4 rows are 16 bytes, the cache has 32
        cpu_kv.write_kv_cache(cache, k, k, torch.tensor([0]), 0.1, 0.1, 4)
    q = torch.randn(1, 1, 16).bfloat16()
    with pytest.raises(RuntimeError, match="expected 16"):
        cpu_kv.paged_attention(q, cache, torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long),
                               0.1, 0.1, 4, 0.25)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu_kv.paged_attention(torch.randn(1, 1, 12).bfloat16(), torch.zeros(4, 1, 4, 24, dtype=torch.uint8),
                               torch.tensor([0, 1]), torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long),
                               0.1, 0.1, 8, 0.25)
    # the unquantized (16-bit) page holds bf16 / f16 values only
    with pytest.raises(ValueError, match="bf16 or f16"):
        kvc.write_kv_cache(torch.zeros(4, 1, 4, 64, dtype=torch.uint8), k.float(), k.float(), torch.tensor([0]),
                           1.0, 1.0, 16)
    with pytest.raises(RuntimeError, match="bf16 or f16"):
        cpu_kv.write_kv_cache(torch.zeros(4, 1, 4, 64, dtype=torch.uint8), k.float(), k.float(), torch.tensor([0]),
                              1.0, 1.0, 16)
    with pytest.raises(RuntimeError, match="bf16 or f16"):
        cpu_kv.paged_attention(q.float(), torch.zeros(4, 1, 4, 64, dtype=torch.uint8), torch.tensor([0, 1]),
                               torch.tensor([1]), torch.zeros(1, 1, dtype=torch.long), 1.0, 1.0, 16, 0.25)
    assert math.isfinite(float(cpu_kv.paged_attention(q, cache, torch.tensor([0, 1]), torch.tensor([1]),
                                                      torch.zeros(1, 1, dtype=torch.long), 0.1, 0.1, 8, 0.25)[0, 0, 0]))


def test_bound_rejects_a_one_percent_scale_error():
    """The derived bound is tight enough to catch a wrong K scale (1 %) in the read path."""
    torch.manual_seed(3)
    hq, h, d, bs, n, bits = 4, 1, 64, 8, 40, 8
    cache, tables = _scattered([n], h, d, bits, bs, 8, seed=3)
    k = (torch.randn(n, h, d) * 2).bfloat16()
    v = torch.randn(n, h, d).bfloat16()
    cpu_kv.write_kv_cache(cache, k, v, _slots(tables, 0, 0, n, bs), 0.04, 0.03, bits)
    q = torch.randn(n, hq, d).bfloat16()
    args = (q, cache, torch.tensor([0, n]), torch.tensor([n]), tables)
    ref = kvc.paged_attention(*args, 0.04, 0.03, bits, d ** -0.5)
    bad = cpu_kv.paged_attention(*args, 0.04 * 1.01, 0.03, bits, d ** -0.5)
    bound = _bound(q, kvc.fake_quant_kv(k, 0.04, bits), kvc.fake_quant_kv(v, 0.03, bits), d ** -0.5, None, None,
                   torch.arange(n))
    allowed = bound + _ulp(torch.maximum(bad.double().abs(), ref.double().abs()), torch.bfloat16)
    assert not bool(((bad.double() - ref.double()).abs() <= allowed).all())


@pytest.mark.parametrize("bits,window", [(8, 700), (4, None)])
def test_split_decode_matches_reference(bits, window):
    """One long decoding request on 4 threads: its keys are split into ranges (flash-decoding) whose partial
    softmaxes are merged; the merged output stays within the bound (the merge's rescaling adds a few u per
    weight, covered by the (n + 8) u term)."""
    torch.manual_seed(bits)
    hq, h, d, bs, n = 4, 1, 256, 16, 1500
    cache, tables = _scattered([n], h, d, bits, bs, n // bs + 2, seed=bits)
    k = (torch.randn(n, h, d) * 2).bfloat16()
    v = torch.randn(n, h, d).bfloat16()
    cpu_kv.write_kv_cache(cache, k, v, _slots(tables, 0, 0, n, bs), 0.04, 0.03, bits)
    q = torch.randn(1, hq, d).bfloat16()
    args = (q, cache, torch.tensor([0, 1]), torch.tensor([n]), tables, 0.04, 0.03, bits, d ** -0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = cpu_kv.paged_attention(*args, sliding_window=window)
    finally:
        torch.set_num_threads(threads)
    ref = kvc.paged_attention(*args, sliding_window=window)
    bound = _bound(q, kvc.fake_quant_kv(k, 0.04, bits), kvc.fake_quant_kv(v, 0.03, bits), d ** -0.5, window, None,
                   torch.tensor([n - 1]))
    allowed = bound + _ulp(torch.maximum(got.double().abs(), ref.double().abs()), torch.bfloat16)
    assert bool(((got.double() - ref.double()).abs() <= allowed).all())


DECODE_CASES = [(*c, t) for c in [(8, 4, 256, 300), (4, 8, 512, None), (8, 3, 136, None), (4, 1, 64, 50)]
                for t in (torch.bfloat16, torch.float32)] + [(16, 4, 256, 300, torch.bfloat16)]  # 16-bit page: bf16/f16


@pytest.mark.parametrize("bits,hq,d,window,dtype", DECODE_CASES)
def test_decode_path_bitwise_equals_tiled_path(bits, hq, d, window, dtype):
    """A decoding query (one position per request) runs the fused path (K/V dequantized in registers, several keys
    or column blocks per pass); a prefill's rows run the tiled path (a dequantized tile shared by the rows). Both
    keep every dot product's and every output lane's summation order, so on one thread (no split of the key
    range) the decode output equals the prefill's last row bit for bit - whatever the head count (row blocks
    of 1..8), head dim (incl. one not a multiple of 16) and window."""
    torch.manual_seed(hq * d)
    h, bs, n = 1, 16, 700
    cache, tables = _scattered([n], h, d, bits, bs, n // bs + 2, seed=d)
    k = (torch.randn(n, h, d) * 2).to(dtype)
    v = torch.randn(n, h, d).to(dtype)
    cpu_kv.write_kv_cache(cache, k, v, _slots(tables, 0, 0, n, bs), 0.04, 0.03, bits)
    q = torch.randn(n, hq, d).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiled = cpu_kv.paged_attention(q, cache, torch.tensor([0, n]), torch.tensor([n]), tables, 0.04, 0.03, bits,
                                       d ** -0.5, sliding_window=window)
        fused = cpu_kv.paged_attention(q[-1:], cache, torch.tensor([0, 1]), torch.tensor([n]), tables, 0.04, 0.03,
                                       bits, d ** -0.5, sliding_window=window)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fused.view(-1).view(torch.uint8), tiled[-1:].reshape(-1).contiguous().view(torch.uint8))


def test_kv_backend_switch(monkeypatch):
    """`kernels.plugin.kv_kernels`: C++ by default on CPU; `GEMMA_MOBILE_KV_BACKEND` picks cpp / torch / triton for
    the KV cache alone and wins over `GEMMA_MOBILE_BACKEND` (which it follows when unset); bad values and
    impossible choices are errors, never a silent substitute."""
    from kernels import kvcache_triton as kvt
    from kernels import plugin

    cpu = torch.device("cpu")
    for k in ("GEMMA_MOBILE_KV_BACKEND", "GEMMA_MOBILE_BACKEND", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)
    cpp = (cpu_kv.write_kv_cache, cpu_kv.paged_attention)
    torch_ref = (kvc.write_kv_cache, kvc.paged_attention)
    triton = (kvt.write_kv_cache_triton, kvt.paged_attention_triton)
    assert plugin.kv_kernels(cpu) == cpp
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "torch")
    assert plugin.kv_kernels(cpu) == torch_ref
    monkeypatch.setenv("GEMMA_MOBILE_KV_BACKEND", "cpp")  # the KV switch wins
    assert plugin.kv_kernels(cpu) == cpp
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "packed")
    monkeypatch.setenv("GEMMA_MOBILE_KV_BACKEND", "torch")
    assert plugin.kv_kernels(cpu) == torch_ref
    monkeypatch.setenv("GEMMA_MOBILE_KV_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        plugin.kv_kernels(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert plugin.kv_kernels(cpu) == triton
    monkeypatch.setenv("GEMMA_MOBILE_KV_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        plugin.kv_kernels(torch.device("meta"))
    monkeypatch.setenv("GEMMA_MOBILE_KV_BACKEND", "fast")
    with pytest.raises(ValueError, match="GEMMA_MOBILE_KV_BACKEND='fast'"):
        plugin.kv_kernels(cpu)
