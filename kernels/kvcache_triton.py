"""Triton kernels for the static int8 / int4 paged KV cache, beside their torch reference ``kernels/kvcache.py``
(same signatures, same storage layout, same numerics; vLLM-free: only torch + triton).

- ``write_kv_cache_triton``: quantize K/V ``[T, H, D]`` and store them at ``slot_mapping`` (one program per
  (token, kv head); negative slots skipped). BITWISE equal to ``kvcache.write_kv_cache``:
  ``codes = clamp(round_half_even(x / s), qmin, qmax)`` computed as torch does it in ``x.dtype``: ``s`` cast to
  ``x.dtype`` on the host, f32 IEEE division (``div_rn``) of the exactly widened operands, rounded once to
  ``x.dtype`` (bf16: RNE with integer ops, exact under the interpreter too; f32: nothing), then round-half-even
  and clamp. f16 inputs are refused (the interpreter's f32->f16 conversion truncates, so they cannot be checked
  on CPU).
- ``paged_attention_triton``: attention of a mixed batch (decode, prefill, chunked prefill; varlen
  ``query_start_loc``), causal or not, optional sliding window and logit softcap, GQA, straight from the uint8
  pages: codes are loaded and dequantized in registers (no dequantized copy of the cache is ever made). One
  program per (query token, query head) loops over the key tiles its query can see (the window start ..
  its own position) with an online softmax in f32. Decode (few rows, long contexts): the visible keys are split
  into ``num_splits`` contiguous ranges, one program each (flash-decoding); each stores its unnormalized f32
  partial (m, l, acc) and ``_combine_kernel`` merges them with the same rescaling as the online softmax.

Numerics of the attention and where they differ from the reference:
```
k_hat = to_dtype(f32(code) * f32(to_dtype(s_k)))      bitwise the reference's dequantized K (dtype = query.dtype:
v_hat = to_dtype(f32(code) * f32(to_dtype(s_v)))      a bf16 code*scale product is exact in f32, rounded once)
s_j   = (sum_d f32(q_d) * f32(k_hat_jd)) * scale      f32; bf16*bf16 products exact, the SUM ORDER differs
                                                        (tree reduction per tile vs the BLAS dot of the reference)
s_j   = cap * tanh(s_j / cap)                         tanh(y) = sign(y)(1 - 2/(exp(2|y|)+1)) in f32: a few ulp
                                                        of ABSOLUTE error, vs torch.tanh
p_j   = exp(s_j - m)   online: m, l, acc rescaled per tile and split (reference: one softmax over the row, then
out   = (sum_j p_j v_hat_j) / l                       a f32 matmul) -> different rounding, same math
out   -> query.dtype (bf16: RNE)
```
So the kernel equals the reference up to f32 rounding (relative ~ n * 2^-24 of ``sum_j p_j |v_j|``), which only
shows in the bf16 output as at most one bf16 ulp; ``tests/test_kvcache_triton.py`` derives its tolerance from this.
The scales are cast to ``query.dtype`` / ``x.dtype`` on the device (no host sync); the kernels themselves never
synchronize (request of each query token: ``torch.searchsorted`` on the device).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from ._common import round_bf16  # raw; rebound per mode
from .kvcache import ScaleLike, _scale_as, code_bytes, qrange

__all__ = ["write_kv_cache_triton", "paged_attention_triton"]

_FLOAT_KINDS = {torch.bfloat16: 0, torch.float32: 1}


def _max_combine(a, b):
    return tl.maximum(a, b)


def _kv_write_kernel(key_ptr, value_ptr, slot_ptr, cache_ptr, ks_ptr, vs_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ch, stride_cs,
                     D, BLOCK_SIZE,
                     BITS: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, BF16: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Program (token t, kv head h): quantize K[t, h, :] and V[t, h, :] into row ``slot`` of the page."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)
    row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_cs
    CB = D if BITS == 8 else D // 2
    lim = tl.where(valid, D, 0)  # validity folded into the bound (scalar & vector masks: interpreter quirk)
    for which in tl.static_range(2):
        if which == 0:
            src = key_ptr + t.to(tl.int64) * stride_kt + h * stride_kh
            s = tl.load(ks_ptr).to(tl.float32)
            dst = row
        else:
            src = value_ptr + t.to(tl.int64) * stride_vt + h * stride_vh
            s = tl.load(vs_ptr).to(tl.float32)
            dst = row + CB
        if BITS == 8:
            offs = tl.arange(0, BLOCK_D)
            m = offs < lim
            x = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.math.div_rn(x, s)
            if BF16:
                y = round_bf16(y)
            c = _rne_clamp(y, QMIN, QMAX).to(tl.int32)
            tl.store(dst + offs, (c & 0xFF).to(tl.uint8), mask=m)
        else:
            offs = tl.arange(0, BLOCK_D // 2)
            m = 2 * offs < lim
            x0 = tl.load(src + 2 * offs, mask=m, other=0.0).to(tl.float32)
            x1 = tl.load(src + 2 * offs + 1, mask=m, other=0.0).to(tl.float32)
            y0 = tl.math.div_rn(x0, s)
            y1 = tl.math.div_rn(x1, s)
            if BF16:
                y0 = round_bf16(y0)
                y1 = round_bf16(y1)
            c0 = _rne_clamp(y0, QMIN, QMAX).to(tl.int32) + 8
            c1 = _rne_clamp(y1, QMIN, QMAX).to(tl.int32) + 8
            tl.store(dst + offs, (c0 | (c1 << 4)).to(tl.uint8), mask=m)


def _rne_clamp(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """f32 -> f32 integral clamp(round_half_even(v), QMIN, QMAX) (clamping first gives the same result: the
    bounds are integers)."""
    v = tl.minimum(tl.maximum(v, QMIN * 1.0), QMAX * 1.0)
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


def _paged_attn_kernel(q_ptr, cache_ptr, out_ptr, req_ptr, qsl_ptr, seqlen_ptr, bt_ptr, ks_ptr, vs_ptr,
                       stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs, stride_bt,
                       ws_ptr, HQ, NUM_SPLITS, D, BLOCK_SIZE, GROUP, scale, causal, window, softcap,
                       BITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BF16: tl.constexpr, SPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (query token t, query head h[, key split sp]): online-softmax attention over the keys of t's
    request that t can see, reading K/V codes from the uint8 pages and dequantizing them in registers.
    ``SPLIT`` (flash-decoding): the visible keys are cut into ``NUM_SPLITS`` contiguous ranges (whole tiles);
    each program stores its unnormalized partial (m, l, acc[D]) in f32 to ``ws`` for ``_combine_kernel``."""
    pid = tl.program_id(0)
    t = pid // HQ  # heads of one token adjacent: the programs sharing a kv head run together (L2 reuse)
    h = pid % HQ
    hk = h // GROUP
    r = tl.load(req_ptr + t)
    q0 = tl.load(qsl_ptr + r)
    q1 = tl.load(qsl_ptr + r + 1)
    seq_len = tl.load(seqlen_ptr + r)
    valid = (t >= q0) & (t < q1)  # tokens past the last request (padding) are left untouched
    pos = seq_len - (q1 - q0) + (t - q0)
    # causal / window are runtime flags (scalar work outside the key loop; fewer compiled variants)
    end = tl.where(causal != 0, pos + 1, seq_len)
    start = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
    end = tl.where(valid, end, start)  # no key tile for an invalid token
    if SPLIT:
        sp = tl.program_id(1)
        per = (end - start + NUM_SPLITS - 1) // NUM_SPLITS
        per = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = start + sp * per
        end = tl.minimum(end, start + per)
        start = tl.minimum(start, end)
    ks = tl.load(ks_ptr).to(tl.float32)
    vs = tl.load(vs_ptr).to(tl.float32)
    HALF: tl.constexpr = BLOCK_D // 2
    CB = D if BITS == 8 else D // 2
    q_row = q_ptr + t.to(tl.int64) * stride_qt + h * stride_qh
    if BITS == 8:
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_row + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        acc = tl.full((BLOCK_D,), 0.0, tl.float32)
        acc1 = acc  # unused
    else:
        offs_d = tl.arange(0, HALF)  # byte index j: elements 2j (low nibble) and 2j+1 (high nibble)
        d_mask = offs_d < CB
        q = tl.load(q_row + 2 * offs_d, mask=d_mask, other=0.0).to(tl.float32)
        q1v = tl.load(q_row + 2 * offs_d + 1, mask=d_mask, other=0.0).to(tl.float32)
        acc = tl.full((HALF,), 0.0, tl.float32)
        acc1 = tl.full((HALF,), 0.0, tl.float32)
    zero = pos.to(tl.float32) * 0.0  # f32 scalar tensors for the loop-carried softmax state
    m_i = zero - float("inf")
    l_i = zero
    bt_row = bt_ptr + r.to(tl.int64) * stride_bt
    head_base = cache_ptr + hk * stride_ch
    for j0 in range(start, end, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        j_mask = offs_j < end
        blk = tl.load(bt_row + offs_j // BLOCK_SIZE, mask=j_mask, other=0).to(tl.int64)
        rows = head_base + blk * stride_cb + (offs_j % BLOCK_SIZE).to(tl.int64) * stride_cs  # [BLOCK_N]
        tile_mask = j_mask[:, None] & d_mask[None, :]
        kp = rows[:, None] + offs_d[None, :]
        if BITS == 8:
            kc = tl.load(kp, mask=tile_mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            k = kc * ks
            if BF16:
                k = round_bf16(k)
            sc = tl.reduce(k * q[None, :], 1, tl.standard._sum_combine)
        else:
            kb = tl.load(kp, mask=tile_mask, other=0x88).to(tl.int32)
            k0 = ((kb & 15) - 8).to(tl.float32) * ks
            k1 = ((kb >> 4) - 8).to(tl.float32) * ks
            if BF16:
                k0 = round_bf16(k0)
                k1 = round_bf16(k1)
            sc = tl.reduce(k0 * q[None, :] + k1 * q1v[None, :], 1, tl.standard._sum_combine)
        sc = sc * scale
        if HAS_SOFTCAP:
            y = sc / softcap
            a = tl.abs(y)
            th = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
            sc = tl.where(y < 0, -th, th) * softcap
        sc = tl.where(j_mask, sc, -float("inf"))
        m_new = tl.maximum(m_i, tl.reduce(sc, 0, _max_combine))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new)
        l_i = l_i * alpha + tl.reduce(p, 0, tl.standard._sum_combine)
        vp = kp + CB
        if BITS == 8:
            vc = tl.load(vp, mask=tile_mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            v = vc * vs
            if BF16:
                v = round_bf16(v)
            acc = acc * alpha + tl.reduce(p[:, None] * v, 0, tl.standard._sum_combine)
        else:
            vb = tl.load(vp, mask=tile_mask, other=0x88).to(tl.int32)
            v0 = ((vb & 15) - 8).to(tl.float32) * vs
            v1 = ((vb >> 4) - 8).to(tl.float32) * vs
            if BF16:
                v0 = round_bf16(v0)
                v1 = round_bf16(v1)
            acc = acc * alpha + tl.reduce(p[:, None] * v0, 0, tl.standard._sum_combine)
            acc1 = acc1 * alpha + tl.reduce(p[:, None] * v1, 0, tl.standard._sum_combine)
        m_i = m_new
    if SPLIT:  # unnormalized partial: [m, l, acc[0..D)] per (t, h, split)
        w_row = ws_ptr + ((t.to(tl.int64) * HQ + h) * NUM_SPLITS + sp) * (D + 2)
        tl.store(w_row, m_i)
        tl.store(w_row + 1, l_i)
        if BITS == 8:
            tl.store(w_row + 2 + offs_d, acc, mask=d_mask)
        else:
            tl.store(w_row + 2 + 2 * offs_d, acc, mask=d_mask)
            tl.store(w_row + 3 + 2 * offs_d, acc1, mask=d_mask)
    else:
        # no visible key (cannot happen causally): zeros, as the reference
        inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
        o_row = out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh
        o_mask = offs_d < tl.where(valid, CB, 0)  # int8: CB == D
        if BITS == 8:
            o = acc * inv
            if BF16:
                o = round_bf16(o)
            tl.store(o_row + offs_d, o.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            o0 = acc * inv
            o1 = acc1 * inv
            if BF16:
                o0 = round_bf16(o0)
                o1 = round_bf16(o1)
            tl.store(o_row + 2 * offs_d, o0.to(out_ptr.dtype.element_ty), mask=o_mask)
            tl.store(o_row + 2 * offs_d + 1, o1.to(out_ptr.dtype.element_ty), mask=o_mask)


def _combine_kernel(ws_ptr, out_ptr, req_ptr, qsl_ptr, stride_ot, stride_oh, HQ, NUM_SPLITS, D,
                    BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (t, h): merge the split partials, ``out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s``
    (the same rescaling as the online softmax inside a split: numerator and denominator get the same factor)."""
    pid = tl.program_id(0)
    t = pid // HQ
    h = pid % HQ
    r = tl.load(req_ptr + t)
    valid = (t >= tl.load(qsl_ptr + r)) & (t < tl.load(qsl_ptr + r + 1))
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    rows = ws_ptr + ((t.to(tl.int64) * HQ + h) * NUM_SPLITS + offs_s) * (D + 2)
    m = tl.load(rows, mask=s_mask, other=-float("inf"))
    l_s = tl.load(rows + 1, mask=s_mask, other=0.0)
    m_all = tl.reduce(m, 0, _max_combine)
    m_all = tl.where(m_all == -float("inf"), 0.0, m_all)
    w = tl.where(m == -float("inf"), 0.0, tl.exp(m - m_all))  # empty split: weight 0
    l_all = tl.reduce(w * l_s, 0, tl.standard._sum_combine)
    base = ws_ptr + (t.to(tl.int64) * HQ + h) * NUM_SPLITS * (D + 2)
    o = tl.full((BLOCK_D,), 0.0, tl.float32)
    for sp in range(0, NUM_SPLITS):  # one [D] row at a time (a [S, D] tile would cost registers)
        m_s = tl.load(base + sp * (D + 2))
        w_s = tl.where(m_s == -float("inf"), 0.0, tl.exp(m_s - m_all))
        o += w_s * tl.load(base + sp * (D + 2) + 2 + offs_d, mask=offs_d < D, other=0.0)
    o = o * tl.where(l_all > 0, 1.0 / tl.where(l_all > 0, l_all, 1.0), 0.0)
    if BF16:
        o = round_bf16(o)
    o_mask = offs_d < tl.where(valid, D, 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=o_mask)


def _jit(fn, interpret_mode: bool):
    """Like ``_common.jit_kernel``, plus this module's own helpers jitted in the same mode."""
    g = dict(fn.__globals__)
    g.update(C.helpers(interpret_mode))
    g["_rne_clamp"] = triton.jit(C._rebind(_rne_clamp, g))
    g["_max_combine"] = triton.jit(C._rebind(_max_combine, g))
    return triton.jit(C._rebind(fn, g))


@functools.cache
def _build_write(interpret_mode: bool):
    return _jit(_kv_write_kernel, interpret_mode)


@functools.cache
def _build_attn(interpret_mode: bool):
    return _jit(_paged_attn_kernel, interpret_mode)


@functools.cache
def _build_combine(interpret_mode: bool):
    return _jit(_combine_kernel, interpret_mode)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(num_rows: int, device: torch.device) -> int:
    """Key splits per (token, head): enough programs for ~8 per SM (decode batches are small), at most 32;
    1 (single pass, no workspace) when the batch alone fills the GPU (prefill) and under the interpreter."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(32, (8 * sms + num_rows - 1) // num_rows)) if num_rows < 4 * sms else 1


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    if dev.type == "cpu" and not C.interpret():
        raise ValueError("Triton KV kernels on CPU tensors need TRITON_INTERPRET=1")
    for t in ts[1:]:
        if t.device != dev:
            raise ValueError(f"all tensors must be on {dev}, got {t.device}")


def _check_cache(kv_cache: torch.Tensor, head_dim: int, bits: int, num_kv_heads: int) -> int:
    """The page must be the uint8 view ``[num_blocks, H, block_size, 2 * code_bytes]``; returns code_bytes.
    A bf16 (or any other) cache is refused: these kernels read codes, never dequantized values."""
    if kv_cache.dtype != torch.uint8:
        raise ValueError(f"kv_cache must be the uint8 page of an int{bits} cache, got {kv_cache.dtype}")
    if kv_cache.dim() != 4 or kv_cache.stride(3) != 1:
        raise ValueError(f"kv_cache must be [num_blocks, num_kv_heads, block_size, C] with unit last stride, "
                         f"got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}")
    cb = code_bytes(head_dim, bits)
    if kv_cache.shape[-1] != 2 * cb:
        raise ValueError(f"kv_cache rows have {kv_cache.shape[-1]} bytes, expected {2 * cb} "
                         f"(head_dim {head_dim}, int{bits})")
    if kv_cache.shape[1] != num_kv_heads:
        raise ValueError(f"kv_cache has {kv_cache.shape[1]} kv heads, expected {num_kv_heads}")
    return cb


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv_cache_triton(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: ScaleLike, v_scale: ScaleLike, bits: int) -> None:
    """``kvcache.write_kv_cache`` in one Triton launch (bitwise the same bytes): quantize ``key``/``value``
    ``[T, H, D]`` (bf16 or f32) and store token t at ``slot_mapping[t]`` of the uint8 page
    ``[num_blocks, H, block_size, 2 * code_bytes]``; negative slots are skipped."""
    qmin, qmax = qrange(bits)
    num_tokens = slot_mapping.shape[0]
    key, value = _unit_last(key[:num_tokens]), _unit_last(value[:num_tokens])
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key/value must be [T, H, D] of one shape, got {tuple(key.shape)}, {tuple(value.shape)}")
    if key.dtype not in _FLOAT_KINDS or value.dtype != key.dtype:
        raise ValueError(f"key/value must be bf16 or f32 (one dtype), got {key.dtype}, {value.dtype}")
    t, h, d = key.shape
    if t != num_tokens:
        raise ValueError(f"{num_tokens} slots but only {t} key rows")
    _check_cache(kv_cache, d, bits, h)
    _check_device(kv_cache, key, value, slot_mapping)
    if num_tokens == 0:
        return
    ks, vs = _scale_as(k_scale, key).reshape(1), _scale_as(v_scale, value).reshape(1)
    block_d = C.next_pow2(d)
    _build_write(C.interpret())[(num_tokens, h)](
        key, value, slot_mapping, kv_cache, ks, vs,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), d, kv_cache.shape[2],
        BITS=bits, QMIN=qmin, QMAX=qmax, BF16=key.dtype == torch.bfloat16, BLOCK_D=max(block_d, 2),
        **C.launch_opts())


def _block_n(head_dim: int) -> int:
    if C.interpret():
        return 16
    return max(16, min(64, 8192 // C.next_pow2(head_dim)))


def paged_attention_triton(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                           seq_lens: torch.Tensor, block_table: torch.Tensor, k_scale: ScaleLike,
                           v_scale: ScaleLike, bits: int, scale: float, *, sliding_window: Optional[int] = None,
                           softcap: Optional[float] = None, causal: bool = True,
                           out: Optional[torch.Tensor] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """``kvcache.paged_attention`` in one Triton launch, reading the int8/int4 codes straight from the pages
    (module docstring: numerics). query ``[T, Hq, D]`` (bf16 or f32; request r owns rows
    ``query_start_loc[r]:query_start_loc[r+1]``, the last tokens of its ``seq_lens[r]``-token context, already
    written), ``block_table [R, max_blocks]``; ``Hq`` a multiple of the cache's kv heads (GQA). Query rows past
    ``query_start_loc[R]`` are left untouched in ``out``. The index tensors are moved to the query's device if
    they are elsewhere (vLLM keeps some on the host). ``num_splits`` (extra, not in the reference): key splits
    per (token, head), flash-decoding style (``None``: ``default_num_splits``; 1: single pass)."""
    qmin, qmax = qrange(bits)  # noqa: F841 - validates bits
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if query.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D], got {tuple(query.shape)}")
    if query.dtype not in _FLOAT_KINDS:
        raise ValueError(f"query must be bf16 or f32, got {query.dtype}")
    query = _unit_last(query)
    t, hq, d = query.shape
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be [num_blocks, num_kv_heads, block_size, C], got {tuple(kv_cache.shape)}")
    h = kv_cache.shape[1]
    if hq % h:
        raise ValueError(f"{hq} query heads is not a multiple of {h} kv heads")
    _check_cache(kv_cache, d, bits, h)
    dev = query.device
    _check_device(query, kv_cache)
    if out is None:
        out = torch.empty_like(query)
    view = out.view(t, hq, d) if out.dim() != 3 else out
    if view.shape != query.shape or view.stride(-1) != 1 or out.device != dev:
        raise ValueError(f"out must be [T, Hq, D] on {dev} with unit last stride, got {tuple(out.shape)}")
    r = seq_lens.shape[0]
    if t == 0 or r == 0:
        return out
    qsl = query_start_loc.to(device=dev, dtype=torch.int32)
    lens = seq_lens.to(device=dev, dtype=torch.int32)
    bt = block_table.to(device=dev, dtype=torch.int32)
    if bt.stride(-1) != 1:
        bt = bt.contiguous()
    req = torch.searchsorted(qsl[: r + 1], torch.arange(t, device=dev, dtype=torch.int32), right=True,
                             out_int32=True) - 1
    req = req.clamp_(0, r - 1)
    ks, vs = _scale_as(k_scale, query).reshape(1), _scale_as(v_scale, query).reshape(1)
    block_d = max(C.next_pow2(d), 2)
    if num_splits is None:
        num_splits = default_num_splits(t * hq, dev)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1
    ws = torch.empty(t * hq * num_splits * (d + 2) if split else 1, dtype=torch.float32, device=dev)
    _build_attn(C.interpret())[(t * hq, num_splits)](
        query, kv_cache, view, req, qsl, lens, bt, ks, vs,
        query.stride(0), query.stride(1), view.stride(0), view.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), bt.stride(0),
        ws, hq, num_splits, d, kv_cache.shape[2], hq // h, float(scale), int(bool(causal)),
        int(sliding_window or 0), float(softcap or 1.0), BITS=bits, HAS_SOFTCAP=bool(softcap),
        BF16=query.dtype == torch.bfloat16, SPLIT=split, BLOCK_N=_block_n(d), BLOCK_D=block_d,
        num_warps=4, **C.launch_opts(exact_epilogue=False))  # FMA allowed: within the derived tolerance
    if split:
        _build_combine(C.interpret())[(t * hq,)](
            ws, view, req, qsl, view.stride(0), view.stride(1), hq, num_splits, d,
            BF16=query.dtype == torch.bfloat16, BLOCK_S=C.next_pow2(num_splits), BLOCK_D=C.next_pow2(d),
            num_warps=4, **C.launch_opts(exact_epilogue=False))
    return out
