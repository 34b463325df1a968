"""`kernels.cpu_packed`: the AVX2 kernels that read the packed kgroup8 codes in place (the plugin's default CPU
backend, ``packed``). Integer products are exact, so the int8-activation path must equal the reference bitwise;
the weight-only path is checked against an f64 product with its derived f32 summation bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kernels import cpu_packed, layout, ops, plugin, reference

OK, WHY = cpu_packed.status()
pytestmark = pytest.mark.skipif(not OK, reason=f"packed CPU kernels: {WHY}")

SHAPES = [(1, 8, 32), (3, 13, 200), (1, 1536, 1536), (17, 64, 640), (5, 7, 12288), (2, 9, 257)]


def _codes(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    return torch.randint(lo, hi, (n, k), dtype=torch.int8, generator=g)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int_mm_exact(bits, m, n, k):
    """Exact int32 dot products for every bit width, K not a multiple of the group, N not a multiple of the
    4-row tile, M > 16 (the loop over activation rows)."""
    q = _codes(n, k, bits, m * 1000 + n + k)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(k))
    assert torch.equal(cpu_packed.int_mm(x, layout.from_int(q, bits)), (x.long() @ q.long().t()).int())


def _expected_isa() -> str:
    flags = cpu_packed.avx512_flags()
    if os.environ.get(cpu_packed.AMX_ENV, "1") != "0" and "-mamx-int8" in flags:
        return "amx-int8"
    return "avx512-vnni" if flags else "avx2"


def test_avx512_path_where_the_cpu_has_it(monkeypatch):
    """M > 1 runs the 512-bit vpdpbusd tile exactly where the build machine has AVX-512 F / BW / VNNI, and AMX-INT8
    tiles (M >= 12) where it also has AMX (the exactness tests here then cover that; on an AVX2-only machine, or
    built with GEMMA_MOBILE_AVX512=0, they cover maddubs / madd)."""
    assert cpu_packed.isa() == _expected_isa()
    monkeypatch.delenv("GEMMA_MOBILE_AVX512", raising=False)  # the flag rule itself, whatever this run was built with
    assert cpu_packed.avx512_flags({"avx2", "avx512f", "avx512bw", "avx512_vnni"}) == \
        ["-mavx512f", "-mavx512bw", "-mavx512vnni"]
    assert cpu_packed.avx512_flags({"avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"}) == \
        ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mamx-tile", "-mamx-int8"]
    assert cpu_packed.avx512_flags({"avx2", "avx512f", "avx512bw", "amx_tile", "amx_int8"}) == []  # no VNNI: AVX2
    assert cpu_packed.avx512_flags({"avx2", "avx512f", "avx512bw"}) == []  # no VNNI: the AVX2 path


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_amx_and_512_bit_paths_equal_the_exact_product(bits):
    """Both M > 1 integer paths of an AMX build, switched in one process, give the exact int32 product: M around the
    AMX threshold (11 / 12) and its 16-row blocks (16, 17, 31, 33: one, two, a pair plus one), N around its 32-row
    strips (1, 31, 45), K with an unpaired last group (200, 257) and over several 16-step chunks (5000: accumulators
    parked between chunks). Where the build has no AMX, `set_amx(True)` must say so and the 512-bit / AVX2 path is
    checked alone."""
    paths = [False]
    if cpu_packed.set_amx(True):
        paths.append(True)
    else:
        assert "-mamx-int8" not in cpu_packed.avx512_flags()
    try:
        for m, n, k in [(11, 45, 200), (12, 31, 257), (16, 1, 640), (17, 45, 5000), (31, 64, 96), (33, 33, 1536)]:
            q = _codes(n, k, bits, m + n + k)
            x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(m * k))
            exact = (x.long() @ q.long().t()).int()
            for on in paths:
                cpu_packed.set_amx(on)
                assert cpu_packed.isa() == ("amx-int8" if on else _expected_isa().replace("amx-int8", "avx512-vnni"))
                assert torch.equal(cpu_packed.int_mm(x, layout.from_int(q, bits)), exact), (m, n, k, on)
    finally:
        cpu_packed.set_amx(os.environ.get(cpu_packed.AMX_ENV, "1") != "0")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_prefetch_distance_changes_no_result(bits):
    """The software prefetch of the M == 1 and M > 1 (512-bit) loops (`set_prefetch`, default 4 tiles) only reads
    ahead: with it off, at the default and far beyond a thread's range (64 tiles = 256 rows), the integer product
    stays exact (M = 1, 4, 16) and the weight-only float product bitwise the same, for N below, at and past a tile /
    a prefetch window (1, 4, 17, 1000)."""
    default = cpu_packed.set_prefetch(4)
    assert torch.ops.gemma_mobile.packed_prefetch(-1) == 4
    try:
        for n, k in [(1, 640), (4, 200), (17, 257), (1000, 640)]:
            q = _codes(n, k, bits, n + k)
            w = layout.from_int(q, bits)
            x = torch.randint(-128, 128, (16, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
            xf = torch.randn(1, k, generator=torch.Generator().manual_seed(k))
            exact = (x.long() @ q.long().t()).int()
            floats = []
            for pd in (0, 4, 64):
                assert cpu_packed.set_prefetch(pd) == pd
                for m in (1, 4, 16):
                    assert torch.equal(cpu_packed.int_mm(x[:m], w), exact[:m]), (n, k, pd, m)
                floats.append(cpu_packed.float_mm(xf, w))
            assert all(torch.equal(f, floats[0]) for f in floats), (n, k)
        with pytest.raises(ValueError, match="prefetch"):
            cpu_packed.set_prefetch(-1)
    finally:
        cpu_packed.set_prefetch(default)


def test_malformed_prefetch_switch_is_an_error_not_a_fallback():
    """GEMMA_MOBILE_PREFETCH_TILES=abc must raise at load (a swallowed error would make the plugin fall back to a
    slower backend and only log it)."""
    import subprocess
    import sys

    code = "from kernels import cpu_packed; cpu_packed.status()"
    env = dict(os.environ, GEMMA_MOBILE_PREFETCH_TILES="abc")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode != 0 and "GEMMA_MOBILE_PREFETCH_TILES='abc'" in r.stderr


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_mm_extremes_do_not_saturate(bits):
    """|x| = 128 against the most negative / positive codes over a long K: any int16 saturation in the
    maddubs / madd chain (or a wrong offset correction) shows up here."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    # up to K = 65536, the largest allowed: the AVX-512 path sums the unsigned codes (8-bit: u = q + 128 <= 255)
    # before the offset correction, |sum u x| <= 255 * 128 * 65536 = 2139095040 < 2^31 (what the K limit is for)
    for k in (4096, 65536):
        q = torch.tensor([[lo] * k, [hi] * k, [lo, hi] * (k // 2), [0] * k, [hi] * k], dtype=torch.int8)
        for xv in (-128, 127):
            x = torch.full((16, k), xv, dtype=torch.int8)
            # the M == 1 kernel, the M > 1 ones (6: a full and a partial 4-row tile; 16: AMX where the build has it)
            for m in (1, 2, 6, 16):
                assert torch.equal(cpu_packed.int_mm(x[:m], layout.from_int(q, bits)),
                                   (x[:m].long() @ q.long().t()).int()), (k, xv, m)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m,n,k", SHAPES[:4])
def test_float_mm_within_summation_bound(bits, m, n, k):
    """f32 FMA accumulation: |y - exact| <= K * 2^-24 * sum|x q| (products are exact in f32)."""
    q = _codes(n, k, bits, n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = cpu_packed.float_mm(x, layout.from_int(q, bits)).double()
    exact = x.double() @ q.double().t()
    bound = k * 2.0 ** -24 * (x.double().abs() @ q.double().abs().t())
    assert bool(((y - exact).abs() <= bound).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_linear_equals_reference_bitwise(bits):
    """ops.linear(backend="packed") == the reference (torch._int_mm) bitwise: input quant, per-column output
    scales, bias, int8 output."""
    n, k = 96, 320
    w, ws = layout.from_float(torch.randn(n, k), bits)
    x = torch.randn(5, k, dtype=torch.bfloat16) * 3
    so = torch.rand(n) * 0.05 + 0.01
    bias = torch.randn(n)
    for kw in ({}, {"output_scale": so, "bias": bias}, {"output_scale": so, "int8_out": True}):
        ref = ops.linear(x, w, ws, 0.02, backend="torch", **kw)
        got = ops.linear(x, w, ws, 0.02, backend="packed", **kw)
        assert torch.equal(got, ref), kw


def test_plugin_state_keeps_no_codes_and_matches_torch_backend():
    """kernels.plugin on the packed backend keeps only the packed words (no int8 / bf16 copies), and its
    linear / table outputs equal the torch backend's (weight-only lm_head: within the f32-vs-bf16 GEMM bound)."""
    from kernels import bitpack

    n, k, v = 64, 128, 512
    q = _codes(n, k, 4, 1)
    wp = bitpack.ct_pack(q, 4)
    ws = torch.rand(n) * 0.01 + 0.001
    sx, sy = torch.tensor([0.02, 0.02]), torch.tensor([0.05, 0.03])
    st_p = plugin.prepare_linear(wp, ws, sx, sy, [32, 32], k, 4, "packed")
    st_t = plugin.prepare_linear(wp, ws, sx, sy, [32, 32], k, 4, "torch")
    assert all(w.codes is None for w in st_p.packed) and all(w.codes is not None for w in st_t.packed)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert torch.equal(plugin.linear_apply(st_p, x), plugin.linear_apply(st_t, x))

    tq = _codes(v, k, 2, 2)
    tws = torch.rand(v) * 0.01 + 0.001
    tp = plugin.prepare_table(bitpack.ct_pack(tq, 2), tws, 2, k, "packed", head_scales=(0.03, 0.2))
    tt = plugin.prepare_table(bitpack.ct_pack(tq, 2), tws, 2, k, "torch", head_scales=(0.03, 0.2))
    assert tp.packed.codes is None
    ids = torch.tensor([0, 5, 511, 5])
    assert torch.equal(plugin.table_embedding(tp, ids, torch.bfloat16), plugin.table_embedding(tt, ids, torch.bfloat16))
    assert torch.equal(plugin.table_lm_head(tp, x, True), plugin.table_lm_head(tt, x, True))
    # weight-only lm_head: packed accumulates x*q in f32 (bound above); the torch backend's bf16 GEMM rounds its
    # output to bf16 (2^-8 relative) before the f32 scale, and the result is cast to bf16 (2^-8 relative): the
    # two agree within 2 bf16 ulps of |y| plus the f32 summation bound.
    yp = plugin.table_lm_head(tp, x, False).float()
    yt = plugin.table_lm_head(tt, x, False).float()
    exact_abs = (x.double().abs() @ tq.double().abs().t()).float() * tws
    assert bool(((yp - yt).abs() <= 2 * 2 ** -8 * yt.abs() + k * 2 ** -24 * exact_abs + 1e-30).all())


def test_ops_trace_under_torch_compile():
    """vLLM compiles the CPU model: the ops need shape functions (register_fake) to be traced, not to break."""
    w, ws = layout.from_float(torch.randn(48, 64), 4)

    def f(x):
        return reference.linear(x, w, ws, 0.05, 0.1, check_values=False, packed_cpu=True)

    x = torch.randn(2, 64, dtype=torch.bfloat16)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


def test_bad_arguments_are_refused():
    w = layout.from_int(_codes(8, 64, 4, 0), 4)
    with pytest.raises(RuntimeError, match="bits must be 2, 4 or 8"):
        torch.ops.gemma_mobile.packed_int_mm(torch.zeros(1, 64, dtype=torch.int8), w.packed, 3, 64)
    with pytest.raises(RuntimeError, match="words per row"):
        torch.ops.gemma_mobile.packed_int_mm(torch.zeros(1, 200, dtype=torch.int8), w.packed, 4, 200)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.gemma_mobile.packed_int_mm(torch.zeros(1, 64), w.packed, 4, 64)
    with pytest.raises(ValueError, match="CPU tensors only"):
        ops.select_backend(torch.device("cuda"), "packed")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m", [1, 11, 37])  # 37: AMX blocks of 16 + a partial one where built
def test_fused_linear_rounds_ties_like_reference(dtype, m):
    """Power-of-two scales make x / s_x and y / s_y land exactly on .5 ties: the fused C++ epilogue must round
    half to even and clamp exactly like the torch reference (any FMA contraction or round-half-away shows)."""
    n, k, bits = 40, 96, 4
    q = _codes(n, k, bits, 5)
    w = layout.from_int(q, bits)
    ws = torch.full((n,), 2.0 ** -6)
    g = torch.Generator().manual_seed(m)
    x = ((torch.randint(-300, 300, (m, k), generator=g).float() + 0.5) * 2.0 ** -4).to(dtype)
    bias = torch.randint(-8, 8, (n,), generator=g).float() * 2.0 ** -5
    for kw in ({"output_scale": torch.tensor(2.0 ** -3), "bias": bias}, {"output_scale": torch.full((n,), 2.0 ** -2)},
               {"output_scale": torch.tensor(2.0 ** -3), "int8_out": True}, {}):
        ref = ops.linear(x, w, ws, 2.0 ** -4, backend="torch", **kw)
        got = ops.linear(x, w, ws, 2.0 ** -4, backend="packed", **kw)
        assert torch.equal(got, ref), kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_input_quantization_read_in_x_dtype(dtype):
    """The fused linear quantizes x straight from its dtype (no f32 copy): 16-lane body and scalar tail (M*K = 3*100
    is not a multiple of 16), .5 ties, values past the int8 clamp, subnormal-sized values and a non-contiguous x
    must all give the reference's codes exactly."""
    n, k, m, bits = 24, 100, 3, 4
    w = layout.from_int(_codes(n, k, bits, 7), bits)
    ws = torch.full((n,), 2.0 ** -6)
    g = torch.Generator().manual_seed(3)
    x = (torch.randint(-300, 300, (m, k), generator=g).float() + 0.5) * 2.0 ** -4  # x / s_x: exact .5 ties
    x[0, :5] = torch.tensor([1e4, -1e4, 2.0 ** -20, -(2.0 ** -20), 0.0])  # clamps and values that round to 0
    x[2, -3:] = torch.tensor([9.03125, -8.96875, -8.03125])  # in the scalar tail: 144.5 (clamp), -143.5, -128.5
    x = x.to(dtype)
    xt = x.t().contiguous().t()  # the same values, column-major
    assert not xt.is_contiguous()
    for xi in (x, xt):
        for kw in ({"output_scale": torch.tensor(2.0 ** -3)}, {}):
            ref = ops.linear(xi, w, ws, 2.0 ** -4, backend="torch", **kw)
            got = ops.linear(xi, w, ws, 2.0 ** -4, backend="packed", **kw)
            assert torch.equal(got, ref), (xi.is_contiguous(), kw)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_load_conversion_in_row_chunks_equals_whole(monkeypatch, bits):
    """from_compressed_tensors / from_int convert big tables in row chunks (bounded load-time memory): the result
    must not depend on the chunking (uneven last chunk included)."""
    from kernels import bitpack

    q = _codes(301, 200, bits, 9)
    whole = layout.from_compressed_tensors(bitpack.ct_pack(q, bits), bits, (301, 200))
    monkeypatch.setattr(layout, "CHUNK_CODES", 1000)  # ~3-7 rows per chunk
    chunked = layout.from_compressed_tensors(bitpack.ct_pack(q, bits), bits, (301, 200))
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(layout.unpack(chunked), q)
    with pytest.raises(ValueError, match="rows"):
        layout.from_compressed_tensors(bitpack.ct_pack(q, bits), bits, (300, 200))
