"""The float ops around the quantized ones, served with transformers' rounding (what `gemma-mobile eval` computes).

Why: a wNa8o8 model requantizes every linear's input and output to int8 with static scales, so a one-ulp bf16
difference upstream flips int8 codes downstream and grows layer by layer. On the real Gemma 3 270M PTQ checkpoint
three of vLLM's float ops differed from transformers' Gemma 3 (the evaluation reference, the model's reference
implementation), and single 512-token windows served at up to 2.3x the reference's perplexity:

- RoPE: vLLM's CPU kernel (`_C.rotary_embedding`) computes `x1*cos - x2*sin` in f32 and converts to bf16 by
  truncation on this AVX2 machine; transformers rounds each product and the sum to bf16 (round-to-nearest-even).
  vLLM's own `forward_native` is transformers' formula bit for bit, so rotary modules run it.
- Residual add + RMSNorm: vLLM's fused `(x, residual) -> (norm(x + residual), x + residual)` normalizes the f32
  sum, transformers normalizes the bf16-rounded sum (`hidden = residual + hidden` in the model's dtype). The norm
  modules add first in the activation dtype, then run their own unfused `forward_native` (equal to
  transformers' Gemma norm, tested).
- GeGLU is already `F.gelu(gate, approximate="tanh") * up` in the model dtype on x86 (vLLM's `forward_native`).

Exact in eager mode (`--enforce-eager`, what `gemma-mobile eval`'s served check runs); compiled, Inductor's fused
kernels round differently (see `_emulate_eager_rounding_when_compiled`).

`apply(model)` patches the modules' dispatched forward (`CustomOp._forward_method`) of one loaded model - only
models whose checkpoint uses the gemma_mobile quantization; other models served in the same process keep vLLM's
kernels. `GEMMA_MOBILE_FLOAT_OPS=vllm` keeps vLLM's kernels for a gemma_mobile model too (faster on some
platforms; served numerics then differ from the evaluation's, the start-up log says so).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.gemma_mobile.float_ops")

_MARK = "_gemma_mobile_float_ops"
ENV = "GEMMA_MOBILE_FLOAT_OPS"


def mode() -> str:
    """"reference" (default: transformers' rounding) or "vllm" (vLLM's own kernels)."""
    m = os.environ.get(ENV, "reference")
    if m not in ("reference", "vllm"):
        raise ValueError(f"{ENV}={m!r}: expected 'reference' or 'vllm'")
    return m


def add_then_norm(norm: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """`(x, residual=None)` forward with transformers' rounding: `s = x + residual` in the activation dtype (one
    rounding, as `residual + hidden_states` in the model), then the unfused norm of `s`; returns `(norm(s), s)`
    like vLLM's fused op, or `norm(x)` without a residual."""

    def forward(x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return norm(x)
        s = x + residual
        return norm(s), s

    return forward


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Switch the rotary and RMSNorm modules of `model` to transformers' rounding (see module docstring).
    Returns the number of modules patched per kind; idempotent."""
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    counts = {"rotary": 0, "rms_norm": 0}
    for m in model.modules():
        if getattr(m, _MARK, False):
            continue
        if isinstance(m, RotaryEmbedding):
            m._forward_method = m.forward_native
            counts["rotary"] += 1
        elif isinstance(m, (GemmaRMSNorm, RMSNorm)):
            native = m.forward_native
            m._forward_method = add_then_norm(lambda x, native=native: native(x))
            counts["rms_norm"] += 1
        else:
            continue
        setattr(m, _MARK, True)
    return counts


def describe(model: torch.nn.Module) -> dict[str, int]:
    """How many rotary / norm modules run transformers' rounding (tests: the switch is in effect)."""
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    out = {"rotary": 0, "rotary_total": 0, "rms_norm": 0, "rms_norm_total": 0}
    for m in model.modules():
        kind = "rotary" if isinstance(m, RotaryEmbedding) else \
            "rms_norm" if isinstance(m, (GemmaRMSNorm, RMSNorm)) else None
        if kind:
            out[kind + "_total"] += 1
            out[kind] += int(getattr(m, _MARK, False))
    return out


def _emulate_eager_rounding_when_compiled() -> None:
    """Compiled serving (vLLM's default; `--enforce-eager` is the exact mode): ask Inductor to round fused bf16
    intermediates as eager PyTorch does (`emulate_precision_casts`; set in this worker process before vLLM
    compiles the model). Measured on the real 270M, one 512-token window: reference NLL 7.7974, eager serving
    7.7974 (bit-identical), compiled 7.5241 without this flag and 7.7566 with it - closer, not exact (Inductor's
    own tanh / rsqrt / reductions remain)."""
    import torch._inductor.config as inductor_config

    inductor_config.emulate_precision_casts = True


def _is_gemma_mobile(model_config) -> bool:
    return (getattr(model_config, "quantization", None) or "") == "gemma_mobile"


def install() -> None:
    """Wrap `DefaultModelLoader.load_weights` once per process (idempotent): after a gemma_mobile model's weights
    are loaded, `apply` its float ops (unless GEMMA_MOBILE_FLOAT_OPS=vllm)."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    orig = DefaultModelLoader.load_weights
    if getattr(orig, _MARK, False):
        return

    def load_weights(self, model, model_config):
        out = orig(self, model, model_config)
        if _is_gemma_mobile(model_config):
            if mode() == "vllm":
                logger.warning("gemma_mobile: %s=vllm: RoPE and residual-add RMSNorm run vLLM's kernels, whose "
                               "rounding differs from the evaluation reference (served != evaluated)", ENV)
            else:
                logger.info("gemma_mobile: float ops with the evaluation reference's rounding: %s", apply(model))
                _emulate_eager_rounding_when_compiled()
        return out

    setattr(load_weights, _MARK, True)
    load_weights.__wrapped__ = orig  # type: ignore[attr-defined]
    DefaultModelLoader.load_weights = load_weights


__all__ = ["ENV", "add_then_norm", "apply", "describe", "install", "mode"]
