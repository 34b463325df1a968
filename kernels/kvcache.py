"""The quantized KV cache, vLLM-free: ONE implementation of the KV numerics (the evaluation reference delegates
to it) and a torch reference of the paged cache (write through ``slot_mapping``, attention over the blocks of
each request). On CPU this is the production path of the vLLM plugin; on GPU it is the reference for Triton.

Numerics (docs/checkpoint-format.md), per layer with ``bits`` b in {4, 8} and per-tensor scales s_k, s_v:
```
codes = clamp(round_half_even(x / s), -2^(b-1), 2^(b-1)-1)   computed in x.dtype (bf16), s cast to x.dtype
x_hat = codes * s                                             computed in the attention dtype (bf16)
```
exactly what compressed-tensors' fake quant does on k/v while calibrating (and what ``gemma-mobile eval``
computes), so a served model sees the same K/V values as the evaluation.

Storage (one byte tensor per layer, vLLM's ``[num_blocks, num_kv_heads, block_size, C]`` page view):
each (block, head, token) row holds ``C = 2 * code_bytes(head_dim, bits)`` bytes, the K codes then the V codes.
- int8: one int8 code per element (stored as its uint8 bit pattern).
- int4: two codes per uint8, offset binary (``code + 8`` in 0..15); the LOW nibble is the even element
  along head_dim (element 2j), the HIGH nibble the odd one (2j+1) - the same convention as the weights.
- ``bits=16`` (``UNQUANTIZED``, the bf16 comparison cache): the bf16 / f16 values themselves (2 bytes each, scales
  unused), so the served bf16 cache and the reference without KV fake quant run the same attention (CPU only).

Slots: ``slot = block_id * block_size + offset``; a negative slot (padding) is skipped on write.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

ScaleLike = Union[torch.Tensor, float]

__all__ = [
    "qrange", "code_bytes", "quantize_kv", "dequantize_kv", "fake_quant_kv", "pack_int4", "unpack_int4",
    "encode_kv", "decode_kv", "write_kv_cache", "paged_attention", "gather_kv", "dense_attention",
    "kv_bytes_per_token", "UNQUANTIZED",
]


def qrange(bits: int) -> tuple[int, int]:
    if bits not in (2, 4, 8):
        raise ValueError(f"KV bits must be 2, 4 or 8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


UNQUANTIZED = 16  # "bits" of the unquantized page: the K/V values themselves in the 16-bit activation dtype


def code_bytes(head_dim: int, bits: int) -> int:
    """Bytes one head of one token takes for K (or V) in the cache: int8 or int4 codes, or (``bits=16``, the
    unquantized comparison cache) the bf16 / f16 values themselves."""
    if bits not in (4, 8, UNQUANTIZED):
        raise ValueError(f"the KV cache stores int8 or int4 codes (or 16-bit values), got int{bits}")
    if bits == 4 and head_dim % 2:
        raise ValueError(f"int4 KV needs an even head_dim, got {head_dim}")
    return {8: head_dim, 4: head_dim // 2, UNQUANTIZED: 2 * head_dim}[bits]


def _check_16bit(dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the unquantized (16-bit) KV page holds bf16 or f16 values, got {dtype}")


def _scale_as(scale: ScaleLike, like: torch.Tensor) -> torch.Tensor:
    """The scale cast to ``like``'s dtype directly from float32 (a Python float is an f32 value here)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32)
    return scale.to(device=like.device, dtype=like.dtype)


def quantize_kv(x: torch.Tensor, scale: ScaleLike, bits: int) -> torch.Tensor:
    """Integer codes (int8 tensor, same shape) of ``x``: ``clamp(round_half_even(x / s), qmin, qmax)``,
    divided and rounded in ``x.dtype`` with ``s`` cast to that dtype (the evaluation reference's numerics)."""
    lo, hi = qrange(bits)
    s = _scale_as(scale, x)
    return torch.clamp(torch.round(x / s), lo, hi).to(torch.int8)


def dequantize_kv(codes: torch.Tensor, scale: ScaleLike, dtype: torch.dtype) -> torch.Tensor:
    """``codes * s`` computed in ``dtype`` (``s`` cast to ``dtype``)."""
    c = codes.to(dtype)
    return c * _scale_as(scale, c)


def fake_quant_kv(x: torch.Tensor, scale: ScaleLike, bits: int) -> torch.Tensor:
    """``dequantize_kv(quantize_kv(x))`` in ``x.dtype``: the K/V values attention sees."""
    return dequantize_kv(quantize_kv(x, scale, bits), scale, x.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[..., D]`` (values -8..7) -> uint8 ``[..., D/2]``: low nibble = element 2j, high = 2j+1,
    each stored offset binary (code + 8)."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., D/2]`` -> int8 codes ``[..., D]`` (inverse of ``pack_int4``)."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def encode_kv(x: torch.Tensor, scale: ScaleLike, bits: int) -> torch.Tensor:
    """``x [..., D]`` -> stored bytes (uint8 ``[..., code_bytes(D, bits)]``; bits 16: x's own bytes)."""
    if bits == UNQUANTIZED:
        _check_16bit(x.dtype)
        return x.contiguous().view(torch.uint8)
    codes = quantize_kv(x, scale, bits)
    return codes.view(torch.uint8) if bits == 8 else pack_int4(codes)


def decode_kv(stored: torch.Tensor, scale: ScaleLike, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Stored bytes ``[..., code_bytes]`` -> dequantized values ``[..., D]`` in ``dtype`` (bits 16: the stored
    values, which are in ``dtype``)."""
    if bits == UNQUANTIZED:
        _check_16bit(dtype)
        return stored.contiguous().view(dtype)
    codes = stored.view(torch.int8) if bits == 8 else unpack_int4(stored)
    return dequantize_kv(codes, scale, dtype)


def write_kv_cache(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: ScaleLike, v_scale: ScaleLike, bits: int) -> None:
    """Quantize ``key``/``value`` ``[T, H, D]`` and store token t at ``slot_mapping[t]`` of ``kv_cache``
    (uint8 ``[num_blocks, H, block_size, 2 * code_bytes]``). Negative slots (padding) are skipped."""
    num_tokens = slot_mapping.shape[0]
    key, value = key[:num_tokens], value[:num_tokens]
    cb = code_bytes(key.shape[-1], bits)
    if kv_cache.shape[-1] != 2 * cb:
        raise ValueError(f"kv_cache rows have {kv_cache.shape[-1]} bytes, expected {2 * cb} "
                         f"(head_dim {key.shape[-1]}, int{bits})")
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    block_size = kv_cache.shape[2]
    blk, off = slots // block_size, slots % block_size
    cache = kv_cache.view(torch.uint8)
    row = torch.cat((encode_kv(key, k_scale, bits), encode_kv(value, v_scale, bits)), dim=-1)  # [T, H, 2cb]
    cache[blk, :, off] = row


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, start: int, end: int, k_scale: ScaleLike,
              v_scale: ScaleLike, bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V ``[H, end - start, D]`` of token positions ``start:end`` of one request whose block
    table row is ``block_ids``; only the blocks covering ``[start, end)`` are read."""
    block_size = kv_cache.shape[2]
    b0, b1 = start // block_size, (end + block_size - 1) // block_size
    rows = kv_cache.view(torch.uint8)[block_ids[b0:b1].long()]       # [nb, H, bs, 2cb]
    rows = rows.permute(1, 0, 2, 3).flatten(1, 2)                  # [H, nb*bs, 2cb]
    rows = rows[:, start - b0 * block_size:end - b0 * block_size]
    cb = rows.shape[-1] // 2
    return (decode_kv(rows[..., :cb], k_scale, bits, dtype), decode_kv(rows[..., cb:], v_scale, bits, dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
            scale: float, causal: bool, sliding_window: Optional[int], softcap: Optional[float]) -> torch.Tensor:
    """q ``[Hq, nq, D]``, k/v ``[H, nk, D]`` (GQA: query head h reads kv head h // (Hq/H)); f32 math."""
    hq, nq, d = q.shape
    h = k.shape[0]
    g = hq // h
    qf = q.float().reshape(h, g * nq, d)
    s = torch.matmul(qf, k.float().transpose(-1, -2)) * scale       # [H, g*nq, nk]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    diff = q_pos[:, None] - k_pos[None, :]                          # [nq, nk]
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if sliding_window:
        allowed &= diff < sliding_window
    s = s.reshape(h, g, nq, -1).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                    # a fully masked row gives zeros
    out = torch.matmul(p.reshape(h, g * nq, -1), v.float())          # [H, g*nq, D]
    return out.reshape(hq, nq, -1)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_table: torch.Tensor, k_scale: ScaleLike, v_scale: ScaleLike,
                    bits: int, scale: float, *, sliding_window: Optional[int] = None,
                    softcap: Optional[float] = None, causal: bool = True,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a mixed batch (prefill, chunked prefill and decode requests alike) over the quantized
    paged cache. The new tokens must already be written (``write_kv_cache``).

    query ``[T, Hq, D]`` (request r owns rows ``query_start_loc[r]:query_start_loc[r+1]``, the LAST tokens of
    its ``seq_lens[r]``-token context), ``block_table [R, max_blocks]``. Per request only the blocks the
    queries can see are read (a sliding-window layer starts at the window of its first query) and
    dequantized into a temporary; no dequantized copy of the cache is kept. Scores, softcap
    (``cap * tanh(s / cap)``), window mask (key j visible from position i iff ``0 <= i - j < window``) and
    softmax in f32; output in ``query.dtype``.
    """
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    if out is None:
        out = torch.empty_like(query)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q0, q1 = qsl[r], qsl[r + 1]
        nq = q1 - q0
        if nq == 0:
            continue
        first_pos = seq_len - nq
        start = 0
        if sliding_window is not None and causal:
            start = max(0, first_pos - sliding_window + 1)
        k, v = gather_kv(kv_cache, block_table[r], start, seq_len, k_scale, v_scale, bits, query.dtype)
        q_pos = torch.arange(first_pos, seq_len, device=query.device)
        k_pos = torch.arange(start, seq_len, device=query.device)
        o = _attend(query[q0:q1].transpose(0, 1), k, v, q_pos, k_pos, scale, causal, sliding_window, softcap)
        out[q0:q1] = o.transpose(0, 1).to(out.dtype)
    return out


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, *,
                    sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Causal attention of one sequence ``[T, H*, D]`` starting at position 0 (f32 math), for tests."""
    t = query.shape[0]
    pos = torch.arange(t, device=query.device)
    return _attend(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), pos, pos, scale, True,
                   sliding_window, softcap).transpose(0, 1)


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, bits: Optional[int]) -> float:
    """Cache bytes one token takes in one layer (K and V); ``bits=None`` = bf16 (as ``bits=16``)."""
    if bits is None:
        bits = UNQUANTIZED
    return 2 * num_kv_heads * code_bytes(head_dim, bits)

