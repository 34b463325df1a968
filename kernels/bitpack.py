"""Integer packing of 2/4/8-bit weight codes: the ONE implementation the project uses (torch only, no vLLM).

Two on-disk layouts, both offset binary (a signed code ``q`` is stored as ``q + 2^(bits-1)``), low bits first:

* compressed-tensors ``pack-quantized`` (``ct_pack`` / ``ct_unpack``): int32 words, ``32 // bits`` codes per word
  along K (code ``k`` of a row sits in word ``k // p``, bits ``[(k % p) * bits, ...)``), the last word zero
  padded (padding fields hold 0, i.e. the raw field value, exactly as
  ``compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32`` writes it).
* Google's ``quant_method: "gemma"`` (``google_pack`` / ``google_unpack``), as transformers'
  ``integrations/gemma_quant.py`` reads it: 2-bit = uint8, four codes per byte in bits [1:0], [3:2], [5:4], [7:6]
  (``code + 2``); 4-bit = uint8, two per byte, low nibble = even index (``code + 8``); 8-bit = plain int8
  ``[N, K]``. A K that is not a multiple of the pack width is padded up to whole bytes (``ceil(K / 4)`` /
  ``ceil(K / 2)`` bytes per row, what ``QuantizedLinear`` / ``QuantizedEmbedding`` allocate); the reader keeps the
  first K codes and ignores the padding fields, which ``google_pack`` writes as 0.

Every function works along the last dimension of any-rank input and builds its temporaries on the input's device
(CPU or CUDA alike).
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}: expected one of {SUPPORTED_BITS}")
    return bits


def code_range(bits: int) -> tuple[int, int]:
    """Signed code range of ``bits``: int2 [-2, 1], int4 [-8, 7], int8 [-128, 127]."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (K last)")
    lo, hi = code_range(bits)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes out of the int{bits} range [{lo}, {hi}]")


def _fields(codes: torch.Tensor, bits: int, per: int) -> torch.Tensor:
    """Offset-binary fields ``[..., ceil(K/per), per]`` (int64), padding fields = 0."""
    k = codes.shape[-1]
    u = codes.to(torch.int64) + (1 << (bits - 1))
    pad = math.ceil(k / per) * per - k
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=0)
    return u.view(*codes.shape[:-1], -1, per)


def _split(words: torch.Tensor, bits: int, per: int, k: int) -> torch.Tensor:
    """Fields of unsigned ``words`` (int64, ``[..., W]``) -> signed int8 codes ``[..., k]``."""
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., W, per]: index = word * per + j
    codes = fields.reshape(*words.shape[:-1], -1)[..., :k] - (1 << (bits - 1))
    return codes.to(torch.int8).contiguous()


# ------------------------------------------------------------------ compressed-tensors pack-quantized (int32)

def ct_packed_width(k: int, bits: int) -> int:
    """int32 words per row: ``ceil(K / (32 // bits))``."""
    return math.ceil(k / (32 // check_bits(bits)))


def ct_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[..., K]`` -> int32 ``[..., ceil(K*bits/32)]`` (== compressed-tensors ``pack_to_int32``)."""
    check_bits(bits)
    _check_codes(codes, bits)
    per = 32 // bits
    u = _fields(codes, bits, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)  # < 2^32, disjoint fields
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)  # reinterpret as two's complement int32
    return words.to(torch.int32).contiguous()


def ct_unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 ``[..., ceil(K*bits/32)]`` (compressed-tensors ``pack_to_int32``) -> signed int8 codes ``[..., k]``."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"compressed-tensors packed weights must be int32, got {packed.dtype}")
    k = int(k)
    if packed.dim() < 1 or packed.shape[-1] != ct_packed_width(k, bits):
        raise ValueError(f"packed has shape {list(packed.shape)}: expected {ct_packed_width(k, bits)} int32 words "
                         f"per row for K={k} at {bits} bits")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    return _split(words, bits, 32 // bits, k)


# ------------------------------------------------------------------ Google quant_method "gemma" (uint8 / int8)

def google_packed_width(k: int, bits: int) -> int:
    """Bytes per row: ``ceil(K / 4)`` (2-bit), ``ceil(K / 2)`` (4-bit), ``K`` (8-bit)."""
    return math.ceil(k / (8 // check_bits(bits)))


def google_dtype(bits: int) -> torch.dtype:
    return torch.int8 if check_bits(bits) == 8 else torch.uint8


def google_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``[..., K]`` -> Google's storage: uint8 ``[..., ceil(K*bits/8)]`` for 2/4-bit (low bits first,
    code + 2^(bits-1), zero padding fields), int8 ``[..., K]`` for 8-bit."""
    check_bits(bits)
    _check_codes(codes, bits)
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    per = 8 // bits
    u = _fields(codes, bits, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    return (u << shifts).sum(dim=-1).to(torch.uint8).contiguous()


def google_unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Google's storage -> signed int8 codes ``[..., k]`` (what ``gemma_quant._unpack_int2/_unpack_int4`` return;
    8-bit: the int8 tensor itself)."""
    check_bits(bits)
    k = int(k)
    want_dtype = google_dtype(bits)
    if packed.dtype != want_dtype:
        raise ValueError(f"{bits}-bit Google weights must be {want_dtype}, got {packed.dtype}")
    if packed.dim() < 1 or packed.shape[-1] != google_packed_width(k, bits):
        raise ValueError(f"packed has shape {list(packed.shape)}: expected {google_packed_width(k, bits)} "
                         f"{want_dtype} per row for K={k} at {bits} bits")
    if bits == 8:
        return packed.contiguous()
    return _split(packed.to(torch.int64) & 0xFF, bits, 8 // bits, k)
