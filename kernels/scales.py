"""The one rule for quantization scale values, used by every checker (kernels, plugin, validation, conversion,
calibration, QAT, evaluation).

A scale is valid iff it is finite and > 0: NaN, +inf, -inf, 0, -0.0 and negatives are invalid (0 means
"uncalibrated" in our checkpoints). ``allow_zero=True`` also admits 0 and -0.0, for Google's layout, where an
activation scale of 0 means identity. An empty tensor has no invalid element; callers that need a scale check
``numel`` themselves. Python floats (and ints) are checked with ``math``, without tensor ops (per-call paths).
"""

from __future__ import annotations

import math

import torch


def invalid_scale_mask(s: torch.Tensor, *, allow_zero: bool = False) -> torch.Tensor:
    """Bool tensor shaped like ``s``: True where an element breaks the rule."""
    return ~(torch.isfinite(s) & ((s >= 0) if allow_zero else (s > 0)))


def invalid_scales(s: torch.Tensor | float, limit: int = 4, *, allow_zero: bool = False) -> list[float]:
    """The first ``limit`` values of ``s`` (flattened order) that break the rule; ``[]`` = all valid (also for
    an empty tensor). Syncs once on CUDA: call at load time."""
    if isinstance(s, torch.Tensor):
        bad = invalid_scale_mask(s, allow_zero=allow_zero)
        return s[bad].flatten()[:limit].tolist() if bool(bad.any()) else []
    v = float(s)
    return [] if math.isfinite(v) and (v >= 0 if allow_zero else v > 0) else [v]
