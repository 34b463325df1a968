"""kernels/: layout, torch reference, Triton kernels (under TRITON_INTERPRET=1 on CPU, natively on CUDA), dispatch.

Tolerances (stated once, used below):
- integer path (input_scale given): Triton == torch reference BITWISE, every output dtype (bf16 rounding is RNE in
  both); reference vs a float64 textbook formula: identical except where a value sits within f32 rounding of a .5
  boundary of an int8 grid -> at most one grid step, on <= 1% of the elements (observed: 0).
- weight-only float path (lm_head): |triton - reference| <= 2^-7 * (|x| @ |q|^T) * weight_scale + 1e-6 for bf16 x
  (the CPU reference rounds the bf16 matmul before the scale), 1e-5 * ... for f32 x.

Triton runs on CPU through the interpreter: the kernels are jitted lazily at launch for the mode the env var
selects then (kernels/_common.py), so the `triton_env` fixture sets TRITON_INTERPRET=1 only around these tests and
other test modules in the same process are unaffected. On a CUDA machine (GEMMA_MOBILE_TEST_DEVICE=cuda) the same
tests run the compiled kernels.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from kernels import PackedWeight, from_compressed_tensors, from_int, linear, embedding, quantize_int8, unpack
from kernels import layout as L
from kernels import reference as R
from kernels import ops

DEVICE = torch.device(os.environ.get("GEMMA_MOBILE_TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"
GPU_CFG = None if ON_CPU else {}  # on a GPU: one fixed config per call, no autotuning (bench covers autotune)


@pytest.fixture
def triton_env(monkeypatch):
    """Triton backend for this test only: interpreter on CPU, compiled kernels on CUDA."""
    pytest.importorskip("triton")
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("GEMMA_MOBILE_BACKEND", raising=False)
    yield


def rand_codes(n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    lo = -(1 << (bits - 1))
    return torch.randint(lo, -lo, (n, k), dtype=torch.int8, generator=gen)


# --------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_roundtrip_vs_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    pack_to_int32, unpack_from_int32 = helpers.pack_to_int32, helpers.unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    for n, k in [(1, 1), (3, 7), (5, 31), (4, 130), (2, 640), (3, 1000)]:
        codes = rand_codes(n, k, bits, g)
        ct = pack_to_int32(codes, bits)
        assert ct.shape == (n, math.ceil(k * bits / 32))
        assert torch.equal(L.ct_unpack(ct, bits, (n, k)), unpack_from_int32(ct, bits, torch.Size((n, k))))
        w = from_compressed_tensors(ct, bits, torch.tensor([n, k]))
        assert w.shape == (n, k) and w.bits == bits and w.layout == "kgroup8"
        assert torch.equal(unpack(w), codes)
        assert torch.equal(from_int(codes, bits).packed, w.packed)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_bit_positions(bits):
    """The documented map, checked element by element: field j of word g*8+w holds k = g*GK + j*8 + w,
    offset-binary, low bits first; padded fields decode to code 0."""
    g = torch.Generator().manual_seed(10 + bits)
    n, k = 3, 45
    codes = rand_codes(n, k, bits, g)
    w = from_int(codes, bits)
    p, wg = 32 // bits, 8
    gk = p * wg
    words = w.packed.to(torch.int64) & 0xFFFFFFFF
    for row in range(n):
        for word in range(w.packed.shape[1]):
            for j in range(p):
                kk = (word // wg) * gk + j * wg + (word % wg)
                field = int(words[row, word] >> (j * bits)) & ((1 << bits) - 1)
                want = int(codes[row, kk]) if kk < k else 0
                assert field - (1 << (bits - 1)) == want


def test_layout_fused_shards():
    """cat_rows / narrow_rows: a fused gate_up built from shards computes exactly the shards' outputs, each with
    its own static output scale through one per-column output_scale vector."""
    from kernels import cat_rows

    g = torch.Generator().manual_seed(77)
    c1, c2 = rand_codes(12, 50, 4, g), rand_codes(20, 50, 4, g)
    w1, w2 = from_int(c1, 4), from_int(c2, 4)
    fused = cat_rows([w1, w2])
    assert torch.equal(unpack(fused), torch.cat([c1, c2])) and torch.equal(unpack(fused.narrow_rows(12, 20)), c2)
    ws1, ws2 = torch.rand(12, generator=g) * 0.02 + 1e-3, torch.rand(20, generator=g) * 0.02 + 1e-3
    x = torch.randn(3, 50, generator=g).bfloat16()
    y = linear(x, fused, torch.cat([ws1, ws2]), 0.05, torch.cat([torch.full((12,), 0.03), torch.full((20,), 0.07)]))
    assert torch.equal(y[:, :12], linear(x, w1, ws1, 0.05, 0.03))
    assert torch.equal(y[:, 12:], linear(x, w2, ws2, 0.05, 0.07))
    with pytest.raises(ValueError, match="cat_rows"):
        cat_rows([w1, from_int(rand_codes(2, 50, 2, g), 2)])
    with pytest.raises(ValueError, match="out of"):
        fused.narrow_rows(30, 5)


def test_layout_errors():
    codes = torch.zeros(2, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="unsupported bits"):
        from_int(codes, 3)
    with pytest.raises(ValueError, match="range"):
        from_int(torch.full((2, 8), 2, dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="integer"):
        from_int(torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="2-D"):
        from_int(torch.zeros(8, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="packed must be int32"):
        PackedWeight(4, (2, 8), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight_packed must be int32"):
        from_compressed_tensors(torch.zeros(2, 2, dtype=torch.int32), 4, (2, 8))  # needs [2, 1]
    with pytest.raises(ValueError, match="unsupported bits"):
        from_compressed_tensors(torch.zeros(2, 1, dtype=torch.int32), 5, (2, 8))


# ------------------------------------------------------------------------------------------------ reference
def test_quantize_int8_rounding():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, 1e6, -1e6, 0.49999997, 3.0])
    want = torch.tensor([0, 2, 2, 0, -2, -2, 126, 127, -128, 127, -128, 0, 3], dtype=torch.int8)
    assert torch.equal(quantize_int8(x, 1.0), want)
    assert torch.equal(quantize_int8(x * 0.25, torch.tensor([0.25])), want)  # exact power-of-2 scaling
    assert torch.equal(quantize_int8(x.bfloat16()[:11], 1.0), want[:11])


def _grid_steps(a: torch.Tensor, b: torch.Tensor, so: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) / so.double()).abs()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_matches_float64_formula(bits):
    g = torch.Generator().manual_seed(100 + bits)
    n, k, m = 48, 200, 9
    codes = rand_codes(n, k, bits, g)
    w = from_int(codes, bits)
    ws = torch.rand(n, generator=g) * 0.05 + 1e-3
    x = torch.randn(m, k, generator=g) * 2
    bias = torch.randn(n, generator=g)
    si = 0.03
    acc_scale = (x.abs().clamp(max=127 * si) @ (codes.abs().double().float() * ws[:, None]).t()).abs().max()
    for so in (torch.tensor([0.05]), torch.rand(n, generator=g) * 0.1 + 0.01, None):
        y = R.linear(x, w, ws, si, so, bias=bias, out_dtype=torch.float32)
        y64 = R.naive_linear_f64(x, codes, ws, si, so, bias)
        if so is None:
            assert torch.allclose(y.double(), y64, rtol=1e-5, atol=1e-5 * float(acc_scale))
        else:
            steps = _grid_steps(y, y64, so)
            assert steps.max() <= 1 + 1e-6 and (steps > 1e-4).float().mean() <= 0.01
    # weight-only: float formula, f32 accumulation
    y = R.linear(x, w, ws, None, None, out_dtype=torch.float32)
    y64 = R.naive_linear_f64(x, codes, ws, None, None)
    bound = 1e-5 * (x.abs().double() @ (codes.abs().double() * ws.double()[:, None]).t()) + 1e-6
    assert ((y.double() - y64).abs() <= bound).all()


def test_reference_int8_chaining_and_shapes():
    g = torch.Generator().manual_seed(7)
    w1 = from_int(rand_codes(24, 40, 4, g), 4)
    w2 = from_int(rand_codes(16, 24, 2, g), 2)
    ws1, ws2 = torch.rand(24, generator=g) * 0.1 + 0.01, torch.rand(16, generator=g) * 0.1 + 0.01
    x = torch.randn(2, 3, 40, generator=g).bfloat16()
    h8 = R.linear(x, w1, ws1, 0.02, 0.04, int8_out=True)
    assert h8.dtype == torch.int8 and h8.shape == (2, 3, 24)
    hf = R.linear(x, w1, ws1, 0.02, 0.04)
    assert torch.equal(hf, (h8.float() * 0.04).bfloat16())
    y_chain = R.linear(h8, w2, ws2, 0.04, 0.1)
    y_float = R.linear(hf, w2, ws2, 0.04, 0.1)  # hf is exactly on the 0.04 grid up to bf16 rounding
    assert y_chain.shape == (2, 3, 16) and y_chain.dtype == torch.bfloat16
    assert _grid_steps(y_chain, y_float, torch.tensor(0.1)).max() <= 1


def test_embedding_reference():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 4, 8):
        codes = rand_codes(50, 37, bits, g)
        w = from_int(codes, bits)
        ws = torch.rand(50, generator=g) + 0.1
        ids = torch.tensor([[0, 49, 3], [3, 3, 17]])
        e = R.embedding(ids, w, ws, out_dtype=torch.float32)
        assert e.shape == (2, 3, 37)
        assert torch.equal(e, codes[ids].float() * ws[ids][..., None])
        assert torch.equal(R.embedding(ids, w.with_codes(), ws, out_dtype=torch.float32), e)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_value_errors():
    g = torch.Generator().manual_seed(5)
    w = from_int(rand_codes(6, 20, 4, g), 4)
    ws = torch.ones(6)
    x = torch.randn(2, 20)
    ok = dict(input_scale=0.1, output_scale=0.1)
    cases = [
        (dict(x=torch.randn(2, 21)), "K=20"),
        (dict(weight_scale=torch.ones(5)), "weight_scale must have 6"),
        (dict(input_scale=torch.tensor([0.1, 0.2])), "input_scale must have 1"),
        (dict(output_scale=torch.ones(2)), "output_scale must have 1 or 6"),
        (dict(input_scale=0.0), "finite and > 0"),
        (dict(input_scale=float("nan")), "finite and > 0"),
        (dict(output_scale=torch.tensor([-1.0])), "finite and > 0"),
        (dict(weight_scale=torch.tensor([1, 1, 1, float("inf"), 1, 1.0])), "finite and > 0"),
        (dict(output_scale=None, int8_out=True), "int8_out=True needs"),
        (dict(x=torch.zeros(2, 20, dtype=torch.int8), input_scale=None), "int8 x needs"),
        (dict(x=torch.zeros(2, 20, dtype=torch.int32)), "x must be float32"),
        (dict(bias=torch.ones(7)), "bias must have N=6"),
        (dict(backend="cuda"), "unknown backend"),
        (dict(w=torch.zeros(6, 20)), "PackedWeight"),
    ]
    for over, msg in cases:
        args = dict(x=x, w=w, weight_scale=ws, **ok)
        args.update(over)
        with pytest.raises(ValueError, match=msg):
            linear(**args)
    # validation is cached per scale tensor, but an in-place change invalidates the cache
    so = torch.tensor([0.1])
    linear(x, w, ws, 0.1, so)
    so.zero_()
    with pytest.raises(ValueError, match="output_scale must be finite and > 0"):
        linear(x, w, ws, 0.1, so)
    with pytest.raises(ValueError, match="ids out of range"):
        embedding(torch.tensor([6]), w, ws)
    with pytest.raises(ValueError, match="ids must be int"):
        embedding(torch.tensor([1.0]), w, ws)
    with pytest.raises(ValueError, match="finite and > 0"):
        embedding(torch.tensor([1]), w, torch.zeros(6))


def test_scale_rule_rejects_nan_inf_zero_negative():
    """kernels.scales is the one rule (finite and > 0) every checker imports."""
    from kernels.scales import invalid_scale_mask, invalid_scales

    bad = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -2.0 ** -100]
    for v in bad:
        assert invalid_scales(v) and invalid_scales(torch.tensor(v)), v
        with pytest.raises(ValueError, match="x_scale must be finite and > 0"):
            R.check_scale_values("x_scale", v)
    for v in (2.0 ** -100, 0.5, 3e38, 1):
        assert invalid_scales(v) == [] and invalid_scales(torch.tensor(float(v))) == []
    s = torch.tensor([1.0, *bad, 2.0])
    assert invalid_scale_mask(s).tolist() == [False] + [True] * len(bad) + [False]
    got = invalid_scales(s)  # the first 4 offending values, in order
    assert len(got) == 4 and math.isnan(got[0]) and got[1:] == [math.inf, -math.inf, 0.0]
    assert invalid_scales(s, limit=99)[4:] == [0.0, -1.0, -2.0 ** -100]  # -0.0 == 0.0
    assert invalid_scales(torch.empty(0)) == []  # empty: nothing invalid (callers needing a scale check numel)
    # allow_zero (Google's activation scales: 0 = identity) admits only 0 / -0.0 in addition
    assert invalid_scales(0.0, allow_zero=True) == invalid_scales(torch.tensor(-0.0), allow_zero=True) == []
    for v in (math.nan, math.inf, -math.inf, -1.0):
        assert invalid_scales(v, allow_zero=True) and invalid_scales(torch.tensor(v), allow_zero=True), v


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("GEMMA_MOBILE_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.select_backend(torch.device("cpu")) == "torch"
    assert ops.select_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "torch")
    assert ops.select_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.select_backend(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.select_backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.select_backend(torch.device("cpu"))


def test_kernels_jitted_per_mode_at_launch(monkeypatch):
    """Importing kernels decides nothing; the mode is read when a kernel is first launched."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    from kernels import _common as C, gemv

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert C.interpret() and isinstance(gemv._build(True), InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = gemv._build(False)
    assert isinstance(compiled, triton.runtime.Autotuner) and not isinstance(compiled.fn, InterpretedFunction)


def test_compiled_kernels_see_constexpr_parameters():
    """Compiled mode (a real GPU): every parameter annotated `tl.constexpr` in the source is a constexpr of the
    jitted kernel. `_common._rebind` once dropped the annotations; the interpreter and triton 3.9 did not care,
    but triton 3.6 (the H200 image) then passed BLOCK_M & co. as runtime ints and no kernel compiled."""
    triton = pytest.importorskip("triton")
    import inspect

    import importlib

    from kernels import gemm, gemv, kvcache_triton as KT

    E = importlib.import_module("kernels.embedding")  # `kernels.embedding` the name is the op

    built = [(gemm._build_quant(False), gemm.quant_kernel), (gemm._build(False, True), gemm.gemm_kernel),
             (gemm._build(False, False), gemm.gemm_kernel), (gemv._build(False), gemv.gemv_kernel),
             (gemv._build_pack(False), gemv.pack_x_kernel), (E._build(False), E.embedding_kernel),
             (KT._build_write(False), KT._kv_write_kernel), (KT._build_attn(False), KT._paged_attn_kernel),
             (KT._build_combine(False), KT._combine_kernel)]
    for k, source in built:
        fn = k.fn if isinstance(k, triton.runtime.Autotuner) else k
        want = {n for n, p in inspect.signature(source).parameters.items() if "constexpr" in str(p.annotation)}
        got = {p.name for p in fn.params if p.is_constexpr}
        assert want and got == want, (fn.fn.__name__, want ^ got)


# ------------------------------------------------------------------------------------------ Triton vs torch
# (bits, M, N, K, kernel, config, x dtype, variants). kernel None = ops' auto dispatch (gemv M<=4, gemm above,
# gemm without split-K build above M=64). Variants: "so" scalar out scale + bias -> bf16, "col" per-column out
# scale -> f32, "i8" int8 out, "raw" no out scale, "x8" int8 input, "wo" weight-only (float tolerance).
CASES = [
    (2, 1, 37, 300, None, None, torch.bfloat16, ("so", "wo")),
    (4, 1, 40, 257, "gemv", {"SPLIT_K": 3}, torch.bfloat16, ("col", "i8")),
    (8, 3, 21, 100, None, None, torch.float32, ("so", "x8", "wo")),
    (2, 4, 33, 129, "gemv", {"SPLIT_K": 2, "BLOCK_N": 32, "BLOCK_KW": 8}, torch.bfloat16, ("raw", "col")),
    (4, 3, 26, 150, "gemv", {"PREPACK": False}, torch.bfloat16, ("so", "x8")),  # x quantized+packed in-kernel
    (8, 1, 19, 90, "gemv", {"PREPACK": False, "SPLIT_K": 2}, torch.float32, ("i8",)),
    (2, 2, 21, 70, "gemv", {"PREPACK": False}, torch.bfloat16, ("col",)),
    (4, 2, 20, 64, "gemm", None, torch.bfloat16, ("so", "wo")),
    (4, 2, 30, 200, "gemv", None, torch.bfloat16, ("wo", "x8")),
    (2, 16, 19, 200, None, None, torch.bfloat16, ("col", "i8")),
    (4, 17, 35, 333, "gemm", {"SPLIT_K": 3}, torch.bfloat16, ("so", "x8")),
    (8, 40, 24, 120, "gemm", {"SPLIT_K": 2, "BLOCK_M": 32}, torch.float32, ("col", "raw")),
    (4, 70, 17, 96, None, None, torch.bfloat16, ("so", "wo")),
    (2, 130, 20, 48, None, {"BLOCK_M": 32, "BLOCK_N": 32}, torch.bfloat16, ("i8",)),
    (8, 300, 9, 40, None, {"BLOCK_M": 64, "BLOCK_N": 16}, torch.bfloat16, ("col", "wo")),
    (4, 8, 24, 100, "gemm", None, torch.float16, ("wo", "so")),  # f16 x: the bf16/f16 tensor-core dot branch
]


def _inputs(bits, m, n, k, xdtype, seed, scales="normal"):
    g = torch.Generator().manual_seed(seed)
    codes = rand_codes(n, k, bits, g)
    w = from_int(codes, bits)
    ws = torch.rand(n, generator=g) * 0.02 + 0.002
    x = (torch.randn(m, k, generator=g) * 1.5).to(xdtype)
    bias = torch.randn(n, generator=g).bfloat16()
    si, so = torch.tensor([0.02]), torch.tensor([0.03])
    so_col = torch.rand(n, generator=g) * 0.05 + 0.005
    if scales == "tiny":
        si, ws, so, so_col = torch.tensor([1e-6]), ws * 1e-4, torch.tensor([1e-9]), so_col * 1e-8
    elif scales == "large":
        si, ws, so, so_col = torch.tensor([30.0]), ws * 1e3, torch.tensor([1e5]), so_col * 1e6
    return codes, w, ws, x, bias, si, so, so_col


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def _check_variant(var, x, w, codes, ws, bias, si, so, so_col, kernel, config):
    dev = DEVICE
    wd = w.to(dev)
    x, ws, bias, si, so, so_col = _to(dev, x, ws, bias, si, so, so_col)
    kw = dict(kernel=kernel, config=GPU_CFG if config is None else config)
    if var == "wo":
        y = linear(x, wd, ws, None, None, backend="triton", out_dtype=torch.float32, **kw)
        yr = R.linear(x.cpu(), w, ws.cpu(), None, None, out_dtype=torch.float32)
        bound = (2 ** -7 if x.dtype != torch.float32 else 1e-5) * (
            x.float().abs().cpu() @ codes.abs().float().t()) * ws.cpu() + 1e-6
        assert ((y.cpu() - yr).abs() <= bound).all(), "weight-only path outside its float tolerance"
        return
    args = {
        "so": dict(input_scale=si, output_scale=so, bias=bias),
        "col": dict(input_scale=si, output_scale=so_col, out_dtype=torch.float32),
        "i8": dict(input_scale=si, output_scale=so_col, int8_out=True),
        "raw": dict(input_scale=si, output_scale=None, bias=bias, out_dtype=torch.float32),
        "x8": dict(input_scale=si, output_scale=so),
    }[var]
    if var == "x8":
        x = R.quantize_int8(x, si)
    y = linear(x, wd, ws, backend="triton", **args, **kw)
    yr = R.linear(x.cpu(), w, ws.cpu(), **{a: (v.cpu() if isinstance(v, torch.Tensor) else v) for a, v in args.items()})
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert torch.equal(y.cpu(), yr), f"{var}: Triton differs from the reference (max {(y.cpu().double() - yr.double()).abs().max()})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-M{c[1]}-N{c[2]}-K{c[3]}-{c[4] or 'auto'}"
                         f"-sk{(c[5] or {}).get('SPLIT_K', 1)}")
def test_triton_linear_matches_reference(case, triton_env):
    bits, m, n, k, kernel, config, xdtype, variants = case
    if not ON_CPU and config is None:
        config = {}  # GPU: one fixed config per test (autotuning is exercised by kernels.bench, with parity)
    if config is not None and "PREPACK" in config:
        assert kernel == "gemv", "PREPACK is a gemv option"
        config = dict(config, SPLIT_K=config.get("SPLIT_K", 1))  # keep a fixed config (no autotuning) on GPUs
    codes, w, ws, x, bias, si, so, so_col = _inputs(bits, m, n, k, xdtype, seed=hash(case[:4]) % 1000)
    for var in variants:
        _check_variant(var, x, w, codes, ws, bias, si, so, so_col, kernel, config)


@pytest.mark.parametrize("scales", ["tiny", "large"])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_triton_extreme_scales(scales, kernel, triton_env):
    codes, w, ws, x, bias, si, so, so_col = _inputs(4, 3, 18, 70, torch.bfloat16, seed=11, scales=scales)
    for var in ("so", "col"):
        _check_variant(var, x, w, codes, ws, bias, si, so, so_col, kernel, None)
    # the extremes really are extreme: saturated (tiny) / all-zero (large) int8 activations
    xq = R.quantize_int8(x, si)
    assert (xq.int().abs() >= 127).float().mean() > 0.9 if scales == "tiny" else (xq == 0).all()


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_triton_round_half_even_ties(kernel, triton_env):
    """Inputs on .5 boundaries of the input grid and outputs on .5 boundaries of the output grid (power-of-2
    scales, so every division is exact): the expected codes come from integer arithmetic, not from a float path."""
    g = torch.Generator().manual_seed(21)
    n, k, m = 20, 64, 3
    codes = rand_codes(n, k, 2, g)
    w = from_int(codes, 2)
    xi = torch.randint(-60, 60, (m, k), generator=g)
    tie = torch.rand(m, k, generator=g) < 0.5
    x = (xi.float() + 0.5 * tie) * 0.25  # half of the elements are ties at input_scale 0.25
    xq_want = torch.where(tie & (xi % 2 != 0), xi + 1, xi)  # round half to even of xi + 0.5
    xq = R.quantize_int8(x, 0.25)
    assert torch.equal(xq.long(), xq_want)
    acc = xq_want @ codes.long().t()
    # y = acc * 0.25 * 1.0; output scale 0.5 -> y / so = acc / 2: a tie whenever acc is odd
    half = acc.div(2, rounding_mode="floor")
    q_want = torch.where((acc % 2 != 0) & (half % 2 != 0), half + 1, half).clamp(-128, 127)
    assert (acc % 2 != 0).float().mean() > 0.2
    ws = torch.ones(n)
    y = linear(x.to(DEVICE), w.to(DEVICE), ws.to(DEVICE), 0.25, 0.5, backend="triton", int8_out=True, kernel=kernel,
               config=GPU_CFG)
    assert torch.equal(y.cpu().long(), q_want)
    assert torch.equal(R.linear(x, w, ws, 0.25, 0.5, int8_out=True).long(), q_want)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_triton_fp16_output(kernel, triton_env):
    """f16 output: RNE on the GPU (exact match); the interpreter's f32->f16 conversion truncates, so on CPU the
    bound is one f16 ulp (2^-10 relative). bf16/f32 outputs are exact on both (tested above)."""
    codes, w, ws, x, bias, si, so, so_col = _inputs(4, 3, 20, 80, torch.float16, seed=13)
    x, wd, ws_d, si_d, so_d = _to(DEVICE, x, w.to(DEVICE), ws, si, so_col)
    y = linear(x, wd, ws_d, si_d, so_d, backend="triton", kernel=kernel, config=GPU_CFG)
    yr = R.linear(x.cpu(), w, ws, si, so_col)
    assert y.dtype == yr.dtype == torch.float16
    if ON_CPU:
        assert ((y.cpu().float() - yr.float()).abs() <= yr.float().abs() * 2 ** -10).all()
    else:
        assert torch.equal(y.cpu(), yr)


def test_triton_splitk_workspace_self_cleans(triton_env):
    from kernels import _common as C

    codes, w, ws, x, bias, si, so, so_col = _inputs(4, 2, 24, 200, torch.bfloat16, seed=5)
    x, wd, ws_d, si_d, so_d = _to(DEVICE, x, w.to(DEVICE), ws, si, so_col)
    outs = [linear(x, wd, ws_d, si_d, so_d, backend="triton", kernel=kern, config={"SPLIT_K": 3},
                   out_dtype=torch.float32) for kern in ("gemv", "gemv", "gemm")]
    yr = R.linear(x.cpu(), w, ws, si, so_col, out_dtype=torch.float32)
    for y in outs:
        assert torch.equal(y.cpu(), yr)
    work, cnt = C._WORKSPACES[(x.device.type, x.device.index)]
    assert int(work.abs().sum()) == 0 and int(cnt.abs().sum()) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_embedding_matches_reference(bits, triton_env):
    g = torch.Generator().manual_seed(30 + bits)
    v, k = 300, 130
    codes = rand_codes(v, k, bits, g)
    w = from_int(codes, bits)
    ws = torch.rand(v, generator=g) * 0.1 + 1e-3
    ids = torch.tensor([[0, 299, 5, 5], [17, 1, 255, 0]])
    for dt in (torch.bfloat16, torch.float32):
        e = embedding(ids.to(DEVICE), w.to(DEVICE), ws.to(DEVICE), backend="triton", out_dtype=dt)
        assert e.dtype == dt and e.shape == (2, 4, k)
        assert torch.equal(e.cpu(), R.embedding(ids, w, ws, out_dtype=dt))
    import kernels

    assert kernels.embedding is embedding  # the kernel submodule did not shadow the public function


def test_cpu_default_path_is_reference(monkeypatch):
    monkeypatch.delenv("GEMMA_MOBILE_BACKEND", raising=False)
    codes, w, ws, x, bias, si, so, so_col = _inputs(2, 5, 30, 90, torch.bfloat16, seed=9)
    y = linear(x, w.with_codes(), ws, si, so_col, bias=bias)
    assert torch.equal(y, R.linear(x, w, ws, si, so_col, bias=bias))
    y = linear(x, w.with_codes(torch.bfloat16), ws, None, None)  # lm_head style cache
    assert torch.equal(y, R.linear(x, w, ws, None, None))


def test_bench_smoke(tmp_path, triton_env):
    from kernels import bench

    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--out", str(out)])
    rep = json.loads(out.read_text())
    assert rep["results"] and all(r["max_abs_diff"] == 0 for r in rep["results"] if r["kind"] == "linear")


def test_bench_cases_under_the_interpreter(triton_env, monkeypatch):
    """The GPU bench's case code (int8 and weight-only lm_head rows, the --warm compile-only pass) runs under the
    interpreter, so a slip in it cannot waste a lent device's few minutes. Timings are stubbed (no CUDA)."""
    from kernels import bench

    monkeypatch.setenv("GEMMA_MOBILE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # also on a GPU machine (GEMMA_MOBILE_TEST_DEVICE=cuda)
    fake_timer = lambda fn: (fn(), (1.0, "stub"))[1]  # noqa: E731
    for kind, m in (("lm_head_a8", 2), ("lm_head", 1), ("linear", 8)):
        row = bench.run_case("tiny", 72, 24, 2, m, fake_timer, kind, {"enabled": False}, device="cpu")
        assert row["max_abs_diff"] == 0 or (kind == "lm_head" and row["max_rel_diff"] < 2 ** -7), row
        assert row["kind"] == kind and row["speedup_vs_bf16"] == 1.0
        warm = bench.run_case("tiny", 72, 24, 2, m, fake_timer, kind, {"enabled": False}, warm=True,
                              device="cpu")
        assert "ours_us" not in warm
    assert bench.target_for("lm_head_a8", 1, 2) == 5.0


def test_tune_sweep_under_the_interpreter(triton_env, monkeypatch, tmp_path):
    """kernels.tune (the GPU config sweep) runs its configs through ops.linear and checks each bitwise."""
    from kernels import tune

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert {c["BLOCK_M"] for c in tune.gemm_grid(16)} == {16} and tune.gemv_grid(256) == []
    assert tune.parse_cases("e2b.down:2:16") == [("e2b.down", 6144, 1536, 2, 16)]
    rep = tune.run([("tiny", 72, 24, 2, 16)], str(tmp_path / "t.json"), False, (0, 16), device="cpu",
                   bench=lambda fn: (fn(), (1.0, "stub"))[1])
    assert {r["kernel"] for r in rep["results"]} == {"gemm", "gemv"}
    assert all(r.get("max_abs_diff") == 0 for r in rep["results"]), rep["results"]


def test_kernels_compile_for_sm90():
    """Representative variants of every kernel compile to sm_90 cubin (GPU-only rules the interpreter does not
    check: int8 tl.dot tile sizes, scalar branches, atomics, register allocation) -- no GPU needed."""
    pytest.importorskip("triton")
    from kernels import compile_check

    try:
        from triton.backends.nvidia import compiler as nv

        assert os.path.exists(os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no bundled ptxas: {e!r}")
    rows = compile_check.main([])
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    def one(prefix: str) -> dict:
        hits = [r for r in rows if r["name"].startswith(prefix)]
        assert hits, prefix
        return hits[0]

    assert one("gemm b2 int x8").get("IGMMA", 1) > 0  # large-M int8 dot lowers to Hopper wgmma (int8)
    assert one("gemm b2 int ").get("IMMA", 1) > 0  # small-M int8 dot: mma.sync
    for name in ("gemv b2 int packed", "gemv b2 int "):  # GEMV integer path: dp4a (4 int8 MACs per instruction)
        assert one(name).get("IDP", 1) > 0
    assert all(r.get("stack", 0) <= 64 for r in rows), "unexpected register spills"
