"""Packed weight layout shared by the torch reference and the Triton kernels.

Layout ``"kgroup8"`` (K-grouped interleave, one int32 word holds ``pack = 32 // bits`` codes):

* codes ``q[n, k]`` are signed integers in ``[-2^(bits-1), 2^(bits-1) - 1]`` and are stored offset-binary
  (``q + 2^(bits-1)``, as compressed-tensors and Google do) in ``bits``-wide fields, low bits first;
* K is padded to a multiple of the group size ``GK = pack * WG`` (``WG = 8`` words per group); padded positions
  hold the code 0 (field value ``2^(bits-1)``), so they add nothing to any dot product;
* ``packed`` is int32 ``[N, Kp // pack]``, row-major: one output channel's words are contiguous (coalesced row
  loads for the GEMV, the embedding gather and the tied lm_head all read the same table);
* word ``g * WG + w`` of a row holds, in its field ``j`` (bits ``[j*bits, (j+1)*bits)``), the code of
  ``k = g * GK + j * WG + w``.

Why: a kernel that loads a tile of words and extracts field ``j`` with one shift+mask gets codes for runs of WG
*consecutive* k (one run per group), so the matching activations are loaded as contiguous 8-element vectors and
the field-``j`` sub-tile feeds one ``tl.dot`` directly (no register shuffles to re-interleave K). compressed-tensors'
``pack_to_int32`` is the special case ``WG = 1`` (``k = word * pack + j``), whose activation loads would be strided.

Conversion happens once at load time (``from_compressed_tensors``); ``unpack`` inverts it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import bitpack

SUPPORTED_BITS = (2, 4, 8)
WORDS_PER_GROUP = 8  # WG
LAYOUT_NAME = f"kgroup{WORDS_PER_GROUP}"
CHUNK_CODES = 1 << 24  # load-time conversions work on row chunks of about this many codes (bounded temporaries)


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bits={bits!r}: expected one of {SUPPORTED_BITS}")
    return bits


def pack_factor(bits: int) -> int:
    """Codes per int32 word (16 for int2, 8 for int4, 4 for int8)."""
    return 32 // _check_bits(bits)


def group_size(bits: int) -> int:
    """K granularity of the layout: ``pack_factor(bits) * WORDS_PER_GROUP`` (128 / 64 / 32)."""
    return pack_factor(bits) * WORDS_PER_GROUP


def padded_k(k: int, bits: int) -> int:
    g = group_size(bits)
    return math.ceil(k / g) * g


@dataclass
class PackedWeight:
    """A 2/4/8-bit weight ``q[N, K]`` in the ``kgroup8`` layout (see module docstring).

    ``packed``: int32 ``[N, padded_k(K) // pack_factor]``. ``codes``: optional cached int8 ``[N, K]`` copy
    (``with_codes()``), used by the CPU torch path to avoid unpacking on every call.
    """

    bits: int
    shape: tuple[int, int]
    packed: torch.Tensor
    layout: str = LAYOUT_NAME
    codes: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.layout != LAYOUT_NAME:
            raise ValueError(f"unknown layout {self.layout!r}, expected {LAYOUT_NAME!r}")
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"shape must be (N, K) with N, K > 0, got {self.shape}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n, k = self.shape
        want = (n, padded_k(k, self.bits) // pack_factor(self.bits))
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape) != want:
            raise ValueError(
                f"packed must be int32 {list(want)} for bits={self.bits}, shape={self.shape}; "
                f"got {self.packed.dtype} {list(self.packed.shape)}"
            )
        if not self.packed.is_contiguous():
            self.packed = self.packed.contiguous()

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> "PackedWeight":
        codes = None if self.codes is None else self.codes.to(device)
        return PackedWeight(self.bits, self.shape, self.packed.to(device), self.layout, codes)

    def with_codes(self, dtype: torch.dtype = torch.int8) -> "PackedWeight":
        """Cache the unpacked codes ``[N, K]`` for the torch (CPU) path, as int8 (``torch._int_mm``) or as
        bf16 (exact; for the weight-only lm_head matmul); returns self."""
        if self.codes is None or self.codes.dtype != dtype:
            self.codes = unpack(self).to(dtype)
        return self

    def nbytes(self) -> int:
        return self.packed.numel() * 4

    def narrow_rows(self, start: int, length: int) -> "PackedWeight":
        """Output channels ``[start, start + length)`` (a view of ``packed``): one shard of a fused layer."""
        if start < 0 or length <= 0 or start + length > self.n:
            raise ValueError(f"rows [{start}, {start + length}) out of [0, {self.n})")
        codes = None if self.codes is None else self.codes.narrow(0, start, length)
        return PackedWeight(self.bits, (length, self.k), self.packed.narrow(0, start, length), self.layout, codes)


def cat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stack shards along N (fused qkv / gate_up): same bits and K required."""
    if not parts:
        raise ValueError("cat_rows needs at least one PackedWeight")
    bits, k = parts[0].bits, parts[0].k
    if any(p.bits != bits or p.k != k for p in parts):
        raise ValueError(f"cat_rows: all parts need bits={bits} and K={k}, got {[(p.bits, p.k) for p in parts]}")
    packed = torch.cat([p.packed for p in parts], dim=0)
    return PackedWeight(bits, (sum(p.n for p in parts), k), packed)


def from_int(codes: torch.Tensor, bits: int) -> PackedWeight:
    """Pack signed integer codes ``[N, K]`` (any integer dtype, values in the ``bits`` grid) into ``kgroup8``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {list(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"codes out of the int{bits} range [{lo}, {hi}]")
    n, k = codes.shape
    p, wg = pack_factor(bits), WORDS_PER_GROUP
    kp = padded_k(k, bits)
    packed = torch.empty((n, kp // p), dtype=torch.int32, device=codes.device)
    rows = max(1, CHUNK_CODES // kp)  # row chunks: int64 temporaries stay ~128 MB for any table (load-time peak)
    shifts = (torch.arange(p, device=codes.device, dtype=torch.int64) * bits).view(1, 1, p, 1)
    for r0 in range(0, n, rows):
        c = codes[r0:r0 + rows]
        u = torch.full((c.shape[0], kp), 1 << (bits - 1), dtype=torch.int64, device=codes.device)  # pad = code 0
        u[:, :k] = c.to(torch.int64) + (1 << (bits - 1))
        # [rows, G, p(j), WG(w)] -> field j of word (g, w)
        words = (u.view(c.shape[0], kp // (p * wg), p, wg) << shifts).sum(dim=2)  # [rows, G, WG], < 2^32
        words = torch.where(words >= (1 << 31), words - (1 << 32), words)  # reinterpret as int32
        packed[r0:r0 + rows] = words.reshape(c.shape[0], kp // p).to(torch.int32)
    return PackedWeight(bits=bits, shape=(n, k), packed=packed)


def unpack(w: PackedWeight) -> torch.Tensor:
    """Exact inverse of ``from_int``: int8 codes ``[N, K]``."""
    n, k = w.shape
    p, wg, b = pack_factor(w.bits), WORDS_PER_GROUP, w.bits
    words = w.packed.to(torch.int64) & 0xFFFFFFFF
    words = words.view(n, -1, 1, wg)  # [N, G, 1, WG]
    shifts = (torch.arange(p, device=words.device, dtype=torch.int64) * b).view(1, 1, p, 1)
    fields = (words >> shifts) & ((1 << b) - 1)  # [N, G, p, WG]
    codes = fields.reshape(n, -1)[:, :k] - (1 << (b - 1))
    return codes.to(torch.int8).contiguous()


def ct_unpack(weight_packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """compressed-tensors ``unpack_from_int32`` (packed_dim=1): int8 codes ``[N, K]`` (delegates to
    ``kernels.bitpack.ct_unpack``, the project's one packing implementation)."""
    _check_bits(bits)
    n, k = int(shape[0]), int(shape[1])
    p = pack_factor(bits)
    want = (n, math.ceil(k / p))
    if weight_packed.dtype != torch.int32 or tuple(weight_packed.shape) != want:
        raise ValueError(
            f"weight_packed must be int32 {list(want)} for bits={bits}, shape={(n, k)}; "
            f"got {weight_packed.dtype} {list(weight_packed.shape)}"
        )
    return bitpack.ct_unpack(weight_packed, bits, k)


def from_compressed_tensors(
    weight_packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Tensor | list[int]
) -> PackedWeight:
    """Convert a compressed-tensors ``pack-quantized`` tensor (int32 ``[N, ceil(K*bits/32)]``: code + 2^(bits-1),
    low bits first, ``32 // bits`` codes per word along K, zero padded) into ``kgroup8``. ``shape`` is the
    checkpoint's ``weight_shape`` ``(N, K)``."""
    if isinstance(shape, torch.Tensor):
        shape = tuple(int(v) for v in shape.flatten().tolist())
    shape = tuple(int(v) for v in shape)
    if len(shape) != 2:
        raise ValueError(f"weight_shape must be (N, K), got {shape}")
    n, k = shape
    rows = max(1, CHUNK_CODES // padded_k(k, _check_bits(bits)))  # row chunks bound the int64 unpack temporaries
    if n <= rows:
        return from_int(ct_unpack(weight_packed, bits, shape), bits)
    ct_unpack(weight_packed[:1], bits, (1, k))  # shape / dtype checks of the whole tensor's row format
    if weight_packed.shape[0] != n:
        raise ValueError(f"weight_packed has {weight_packed.shape[0]} rows, weight_shape says {n}")
    parts = [from_int(ct_unpack(weight_packed[r0:r0 + rows], bits, (min(rows, n - r0), k)), bits).packed
             for r0 in range(0, n, rows)]
    return PackedWeight(bits=bits, shape=(n, k), packed=torch.cat(parts))


def from_float(
    weight: torch.Tensor, bits: int
) -> tuple[PackedWeight, torch.Tensor]:
    """Symmetric per-output-channel quantization (compressed-tensors rule ``scale = absmax / ((qmax-qmin)/2)``,
    round-half-even, clamp). Returns ``(PackedWeight, weight_scale f32 [N])``. For tests and benches."""
    _check_bits(bits)
    w = weight.float()
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    scale = w.abs().amax(dim=1) / ((qmax - qmin) / 2)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(w / scale[:, None]), qmin, qmax).to(torch.int8)
    return from_int(codes, bits), scale
