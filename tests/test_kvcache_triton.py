"""Triton KV-cache kernels (kernels/kvcache_triton.py) vs their torch reference (kernels/kvcache.py).

On CPU the kernels run under TRITON_INTERPRET=1 (set by the `triton_env` fixture around each test only, as in
tests/test_kernels.py); with GEMMA_MOBILE_TEST_DEVICE=cuda the same tests run the compiled kernels on a GPU.

Tolerances:
- write: the cache bytes are BITWISE equal (same quantization arithmetic: division in x.dtype, RNE, clamp).
- attention: both sides read bitwise identical dequantized K/V (code * scale rounded once to the query dtype) and
  do the rest in f32 in different orders. `attention_tolerance` bounds the f32 error of EACH side against the
  exact result (standard dot-product / softmax error analysis, u = 2^-24), doubles it for the difference, and adds
  what the final rounding to the output dtype can add on top (bf16: at most one bf16 ulp, <= 2^-7 |x|). For a
  bf16 output this means "equal up to one bf16 ulp + the f32 bound"; for an f32 output it is the f32 bound
  alone. The bound is worst case (gamma_n grows like n, real rounding errors like sqrt(n)): its f32 part is
  ~1e-3 of sum_j p_j |v_j| at head_dim 64 and ~1e-2 at head_dim 256 with these test magnitudes, while observed
  differences are at most one bf16 ulp (err/tol <= 0.27 observed); a wrong nibble, mask, window or block lookup
  is far larger, and `test_attention_tolerance_catches_errors` shows it rejects a 1 % scale error.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from kernels import kvcache as kvc

DEVICE = torch.device(os.environ.get("GEMMA_MOBILE_TEST_DEVICE", "cpu"))
ON_CPU = DEVICE.type == "cpu"
U = 2.0 ** -24  # f32 unit roundoff


@pytest.fixture
def triton_env(monkeypatch):
    """Triton for this test only: interpreter on CPU, compiled kernels on CUDA."""
    pytest.importorskip("triton")
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _kt():
    from kernels import kvcache_triton

    return kvcache_triton


def _rand_cache(nb: int, h: int, bs: int, d: int, bits: int, g: torch.Generator) -> torch.Tensor:
    """Random bytes everywhere: what the kernels must not read (or must overwrite) is garbage."""
    return torch.randint(0, 256, (nb, h, bs, 2 * kvc.code_bytes(d, bits)), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------------------------------------------ write
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_write_bitwise(triton_env, bits, dtype):
    g = torch.Generator().manual_seed(bits)
    kt = _kt()
    for h, d, bs, nb in [(2, 256, 16, 6), (1, 512, 16, 3), (3, 10, 4, 5)]:
        cache = _rand_cache(nb, h, bs, d, bits, g)
        t = 9
        # K/V as slices of one fused qkv tensor (non-contiguous token stride, as vLLM passes them)
        qkv = (torch.randn(t + 2, (2 + 2 * h) * d, generator=g) * 3).to(dtype)
        key = qkv[:, 2 * d:(2 + h) * d].view(t + 2, h, d)
        value = qkv[:, (2 + h) * d:].view(t + 2, h, d)
        # exact .5 ties at a power-of-two scale and saturating values (clamp), in the first rows
        step = 0.25 if bits == 8 else 1.0
        key[0, :, : d // 2] = (torch.arange(d // 2) - d // 4).to(dtype) * (step / 2) + step / 4
        value[1] = 1e4
        value[2] = -1e4
        slots = torch.randperm(nb * bs, generator=g)[:t]
        slots[[3, 7]] = -1  # padding: skipped
        ks = torch.tensor(step if bits == 8 else 0.37)
        vs = 0.013 if bits == 8 else 0.4  # a Python float scale too
        ref = cache.clone()
        kvc.write_kv_cache(ref, key, value, slots, ks, vs, bits)
        got = cache.to(DEVICE)
        kt.write_kv_cache_triton(got, key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE), ks.to(DEVICE), vs, bits)
        assert torch.equal(got.cpu(), ref), (bits, dtype, h, d)


# -------------------------------------------------------------------------------------------------- attention
def _scenario(bits: int, h: int, hq: int, d: int, bs: int, reqs: list[tuple[int, int]], dtype, g, pad: int = 2):
    """A paged cache holding ``reqs`` = [(seq_len, num_new_queries)] (blocks scattered at random, written with
    the reference), plus the query batch ``[T + pad, Hq, D]`` (``pad`` trailing rows belong to no request)."""
    max_blocks = max((s + bs - 1) // bs for s, _ in reqs) + 1
    nb = len(reqs) * max_blocks + 3
    cache = _rand_cache(nb, h, bs, d, bits, g)
    perm = torch.randperm(nb, generator=g)
    block_table = perm[: len(reqs) * max_blocks].view(len(reqs), max_blocks).to(torch.int32)
    ks, vs = (torch.tensor(0.04), torch.tensor(0.03)) if bits == 8 else (torch.tensor(0.5), torch.tensor(0.45))
    for r, (seq_len, _) in enumerate(reqs):
        pos = torch.arange(seq_len)
        slots = block_table[r, pos // bs].long() * bs + pos % bs
        k = (torch.randn(seq_len, h, d, generator=g) * 1.5).to(dtype)
        v = (torch.randn(seq_len, h, d, generator=g) * 1.5).to(dtype)
        kvc.write_kv_cache(cache, k, v, slots, ks, vs, bits)
    qlens = [n for _, n in reqs]
    qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    t = int(qsl[-1])
    query = (torch.randn(t + pad, hq, d, generator=g) * 2).to(dtype)
    return cache, block_table, qsl, torch.tensor([s for s, _ in reqs], dtype=torch.int32), query, ks, vs


def attention_tolerance(query, cache, qsl, seq_lens, block_table, ks, vs, bits, scale, *, sliding_window=None,
                        softcap=None, causal=True) -> torch.Tensor:
    """Per-element bound on |triton - reference| (float64, shape of the real query rows).

    Both sides share the dequantized K/V bit for bit. Per query row with n visible keys, against exact math on
    those values, each side's f32 result is within B_d (below), where
    - e_s = max_j [gamma_{D+1} * scale * sum_d |q_d k_jd| + 2u|s_j| + softcap terms]  (score error: dot product,
      the scale multiply; softcap: cap * 64u for tanh + 4u|s| for the division, GPU exp/div are approximate);
    - eps = 2 e_s + 2^-20 + 4u max_j |s_j - max s|  (a score error e_s moves each normalized weight by a factor
      exp(+-2 e_s); exp and the online rescaling add ~|x|u each, the rescale factors cancel between numerator
      and denominator, 2^-20 covers the approximate exp/reciprocal of a GPU);
    - gamma_{n+2+S}: the f32 sum of the n products p_j v_jd, its normalization, and the same for sum_j p_j;
      S <= 32 more terms when the keys are split (flash-decoding partials, combined with the same rescaling).
    B_d = (2.1 eps + 2 gamma_{n+2+S}) * sum_j p_j |v_jd|; then |tri_f32 - ref_f32| <= 2 B_d, and rounding both
    to the output dtype adds < 2^-8 (|a| + |b|) for bf16, so tol = 2 B_d + 2^-7 (1.01 |ref| + 2 B_d) for a bf16
    output, 2 B_d (+1e-30) for an f32 output."""
    gam = lambda n: n * U / (1 - n * U)  # noqa: E731
    t_real = int(qsl[-1])
    hq, d = query.shape[1], query.shape[2]
    h = cache.shape[1]
    grp = hq // h
    tol = torch.zeros(t_real, hq, d, dtype=torch.float64)
    ref = kvc.paged_attention(query[:t_real], cache, qsl, seq_lens, block_table, ks, vs, bits, scale,
                              sliding_window=sliding_window, softcap=softcap, causal=causal).double()
    for r in range(len(seq_lens)):
        q0, q1, seq_len = int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])
        if q1 == q0:
            continue
        k, v = kvc.gather_kv(cache, block_table[r], 0, seq_len, ks, vs, bits, query.dtype)
        k, v = k.double(), v.double()  # [H, n, D]
        for t in range(q0, q1):
            pos = seq_len - (q1 - q0) + (t - q0)
            j = torch.arange(seq_len)
            allowed = torch.ones(seq_len, dtype=torch.bool)
            if causal:
                allowed &= j <= pos
            if sliding_window:
                allowed &= pos - j < sliding_window
            n = int(allowed.sum())
            for hh in range(hq):
                kh, vh = k[hh // grp][allowed], v[hh // grp][allowed]
                q = query[t, hh].double()
                s = (kh @ q) * scale
                es = gam(d + 1) * scale * (kh.abs() @ q.abs()) + 2 * U * s.abs()
                if softcap:
                    es = es + softcap * 64 * U + 4 * U * s.abs()
                    s = torch.tanh(s / softcap) * softcap
                p = torch.softmax(s, 0)
                eps = 2 * float(es.max()) + 2.0 ** -20 + 4 * U * float((s.max() - s).max())
                b = (2.1 * eps + 2 * gam(n + 2 + 32)) * (p @ vh.abs())
                tol[t, hh] = 2 * b
    if query.dtype == torch.bfloat16:
        tol = tol + 2.0 ** -7 * (1.01 * ref.abs() + tol)
    return tol + 1e-30


def _run_attention(bits, h, hq, d, bs, reqs, dtype, seed, num_splits=1, **kw):
    g = torch.Generator().manual_seed(seed)
    kt = _kt()
    cache, bt, qsl, lens, query, ks, vs = _scenario(bits, h, hq, d, bs, reqs, dtype, g)
    scale = d ** -0.5 * 2.0
    t_real = int(qsl[-1])
    ref = kvc.paged_attention(query[:t_real], cache, qsl, lens, bt, ks, vs, bits, scale, **kw)
    sentinel = torch.full_like(query, 7.0)
    out = sentinel.to(DEVICE)
    got = kt.paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), qsl.to(DEVICE), lens.to(DEVICE),
                                    bt.to(DEVICE), ks.to(DEVICE), vs.to(DEVICE), bits, scale, out=out,
                                    num_splits=num_splits, **kw)
    assert got is out
    got = got.cpu()
    assert torch.equal(got[t_real:], sentinel[t_real:])  # rows of no request: untouched
    tol = attention_tolerance(query, cache, qsl, lens, bt, ks, vs, bits, scale, **kw)
    err = (got[:t_real].double() - ref.double()).abs()
    worst = float((err / tol).max())
    assert bool((err <= tol).all()), f"max err/tol {worst:.3g}, max err {float(err.max()):.3g}"
    print(f"max err/tol {worst:.3g}, max err {float(err.max()):.3g}")  # informational (pytest -s)
    return worst


# mixed batch: decode deep into a context, a prefill from 0, a chunked prefill, an empty request, decode at pos 0
MIXED = [(37, 1), (10, 10), (45, 5), (9, 0), (1, 1)]
MODES = {
    "causal": {},
    "window": {"sliding_window": 8},
    "softcap": {"softcap": 3.0},
    "window_softcap": {"sliding_window": 5, "softcap": 30.0},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bits,h,hq,d", [(8, 2, 4, 256), (4, 1, 2, 512), (4, 2, 4, 256), (8, 1, 2, 512)])
def test_attention_mixed_batch(triton_env, bits, h, hq, d, mode):
    splits = 3 if mode in ("window", "softcap") else 1  # both code paths: single pass and split + combine
    _run_attention(bits, h, hq, d, 16, MIXED, torch.bfloat16, seed=bits * 1000 + d + len(mode), num_splits=splits,
                   **MODES[mode])


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("bits", [8, 4])
def test_attention_f32_tight(triton_env, bits, num_splits):
    """f32 queries: no output rounding to hide behind, the tolerance is the f32 bound alone (~1e-5 relative);
    small blocks (4 tokens) so a key tile spans several pages; GQA 3:1."""
    _run_attention(bits, 1, 3, 64, 4, [(23, 1), (10, 10), (30, 4)], torch.float32, seed=bits, num_splits=num_splits,
                   sliding_window=12 if num_splits == 1 else None)


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_non_causal(triton_env, bits):
    _run_attention(bits, 2, 2, 32, 8, [(12, 3), (20, 20)], torch.bfloat16, seed=5 + bits, causal=False)
    _run_attention(bits, 2, 2, 32, 8, [(12, 3), (20, 20)], torch.bfloat16, seed=6 + bits, causal=False,
                   sliding_window=4, num_splits=2)


def test_attention_tolerance_catches_errors(triton_env):
    """The tolerance is tight enough to catch a wrong scale (1%) and a swapped int4 nibble order."""
    g = torch.Generator().manual_seed(3)
    kt = _kt()
    cache, bt, qsl, lens, query, ks, vs = _scenario(4, 1, 2, 64, 8, [(20, 3)], torch.bfloat16, g, pad=0)
    scale = 0.25
    tol = attention_tolerance(query, cache, qsl, lens, bt, ks, vs, 4, scale)
    good = kt.paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), qsl.to(DEVICE), lens.to(DEVICE),
                                     bt.to(DEVICE), ks.to(DEVICE), vs.to(DEVICE), 4, scale).cpu()
    assert bool(((good.double() - kvc.paged_attention(query, cache, qsl, lens, bt, ks, vs, 4, scale).double()
                  ).abs() <= tol).all())
    wrong_scale = kt.paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), qsl.to(DEVICE), lens.to(DEVICE),
                                            bt.to(DEVICE), ks.to(DEVICE), (vs * 1.01).to(DEVICE), 4, scale).cpu()
    swapped = ((cache & 0xF) << 4) | (cache >> 4)
    wrong_nibbles = kt.paged_attention_triton(query.to(DEVICE), swapped.to(DEVICE), qsl.to(DEVICE),
                                              lens.to(DEVICE), bt.to(DEVICE), ks.to(DEVICE), vs.to(DEVICE), 4,
                                              scale).cpu()
    ref = kvc.paged_attention(query, cache, qsl, lens, bt, ks, vs, 4, scale).double()
    for bad in (wrong_scale, wrong_nibbles):
        assert not bool(((bad.double() - ref).abs() <= tol).all())


# ---------------------------------------------------------------------------------------------------- refusals
def test_rejects_non_uint8_cache(triton_env):
    """The kernels read int8/int4 codes from a uint8 page; a bf16 cache (a dequantized copy, or vLLM's default
    cache) is refused instead of being reinterpreted as bytes."""
    kt = _kt()
    g = torch.Generator().manual_seed(0)
    d, h = 64, 1
    q = torch.randn(2, 2, d, generator=g).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(2, h, d, generator=g).to(torch.bfloat16).to(DEVICE)
    qsl = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    bt = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    for bits in (8, 4):
        cb = kvc.code_bytes(d, bits)
        for bad in (torch.zeros(1, h, 16, cb, dtype=torch.bfloat16, device=DEVICE),  # same bytes per row
                    torch.zeros(1, h, 16, 2 * cb, dtype=torch.int8, device=DEVICE),
                    torch.zeros(1, h, 16, d, dtype=torch.float16, device=DEVICE)):
            with pytest.raises(ValueError, match="uint8"):
                kt.paged_attention_triton(q, bad, qsl, lens, bt, 0.1, 0.1, bits, 0.125)
            with pytest.raises(ValueError, match="uint8"):
                kt.write_kv_cache_triton(bad, k, k, slots, 0.1, 0.1, bits)
        good = torch.zeros(1, h, 16, 2 * cb, dtype=torch.uint8, device=DEVICE)
        with pytest.raises(ValueError, match="bytes"):
            kt.paged_attention_triton(q, good[..., :-2], qsl, lens, bt, 0.1, 0.1, bits, 0.125)
        with pytest.raises(ValueError, match="bf16 or f32"):
            kt.write_kv_cache_triton(good, k.half(), k.half(), slots, 0.1, 0.1, bits)
    with pytest.raises(ValueError, match="multiple"):
        kt.paged_attention_triton(q[:, :1].expand(2, 3, d), torch.zeros(1, 2, 16, 2 * d, dtype=torch.uint8,
                                  device=DEVICE), qsl, lens, bt, 0.1, 0.1, 8, 0.125)


# --------------------------------------------------------------------------------------------- GPU build (CPU)
@pytest.mark.skipif(not ON_CPU, reason="the GPU run executes the compiled kernels instead")
def test_compiles_for_sm90(monkeypatch):
    """Both kernels compile to sm_90 cubin with no local-memory spills in the configurations the GPU runs
    (interpreter-invisible rules: scalar/vector types, loop-carried types, masks)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.compile_check import _sass_stats

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kt = _kt()
    cases = [
        ("attn", dict(BITS=8, HAS_SOFTCAP=True, BF16=True, SPLIT=False, BLOCK_N=32, BLOCK_D=256)),
        ("attn", dict(BITS=4, HAS_SOFTCAP=False, BF16=True, SPLIT=True, BLOCK_N=16, BLOCK_D=512)),
        ("combine", dict(BF16=True, BLOCK_S=32, BLOCK_D=512)),
        ("write", dict(BITS=4, QMIN=-8, QMAX=7, BF16=True, BLOCK_D=512)),
        ("write", dict(BITS=8, QMIN=-128, QMAX=127, BF16=True, BLOCK_D=256)),
    ]
    ptr = {"q_ptr": "*bf16", "cache_ptr": "*u8", "out_ptr": "*bf16", "req_ptr": "*i32", "qsl_ptr": "*i32",
           "seqlen_ptr": "*i32", "bt_ptr": "*i32", "ks_ptr": "*bf16", "vs_ptr": "*bf16", "key_ptr": "*bf16",
           "value_ptr": "*bf16", "slot_ptr": "*i64", "scale": "fp32", "softcap": "fp32", "ws_ptr": "*fp32"}
    for which, const in cases:
        fn = {"attn": kt._build_attn, "write": kt._build_write, "combine": kt._build_combine}[which](False)
        sig = {a: ptr.get(a, "i32") for a in fn.arg_names}
        sig.update({k: "constexpr" for k in const})
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()})
        t0 = time.time()
        ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "enable_fp_fusion": which != "write"})
        stats = _sass_stats(ck.asm["cubin"])
        print(which, const, f"{time.time() - t0:.1f}s", stats)
        assert stats.get("stack", 0) == 0 and stats.get("LDL", 0) == 0, (which, const, stats)
