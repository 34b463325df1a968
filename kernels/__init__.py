"""Triton int2/int4/int8 x int8 kernels with torch references (usable without vLLM).

Public API (see ``kernels.ops``): ``linear``, ``embedding``, ``quantize_int8``, ``check_scale_values``;
layout (``kernels.layout``): ``PackedWeight``, ``from_compressed_tensors``, ``from_int``, ``unpack``.
Triton is imported lazily, only when the Triton backend runs.
"""

from .layout import PackedWeight, cat_rows, from_compressed_tensors, from_float, from_int, unpack
from .ops import check_scale_values, embedding, linear, quantize_int8, select_backend

__all__ = [
    "PackedWeight", "cat_rows", "from_compressed_tensors", "from_float", "from_int", "unpack",
    "linear", "embedding", "quantize_int8", "check_scale_values", "select_backend",
]
