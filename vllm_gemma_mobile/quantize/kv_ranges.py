"""`kv_ranges: attention_output`: static KV cache scales chosen by the error they cause at the attention's output.

Why: a KV observer (`static_mse`, `static_minmax`) sees K and V alone and weighs every element the same. What the
model needs is the attention output: for int4 (15 levels) the least-squared-error range of K/V is too loose on the
real Gemma 3 270M — scaling only the int4 layers' k/v scales of a static_mse build by x0.7 took the bf16-table
ablation from 76.1 to 55.2 perplexity (x0.85: 56.5, x0.55: 62.0; README "Better PTQ"). Nothing upstream searches
KV scales against the attention output (llmcompressor's KV observers are the activation observers).

Numerics. While calibrating, compressed-tensors' query / key / value hooks of each attention module that owns a
quantized KV cache hand over its post-RoPE q, k, v (the tensors the KV observer sees); the first `tokens`
calibration tokens of each layer are kept. When calibration ends, with s_k, s_v the observer's scales and for
each ratio r in RATIOS (candidate scale = r * s rounded to the scale parameter's dtype, as it is written):

    A(q, K, V) = softmax(softcap(q K^T * scaling) + causal / sliding-window mask) V      (f32, GQA by repetition)
    E(K', V')  = sum over tokens || (A(q, K', V') - A(q, K, V)) W_o^T ||^2               (W_o: the layer's o_proj)

with K' = fake_quant_kv(K, r * s_k, bits) (`kernels.kvcache`: the served cache's round-half-even / clamp, in
the calibration dtype). First r_k = argmin_r E(K'_r, V'_1), then r_v = argmin_r E(K'_{r_k}, V'_r) (so the error
never exceeds the observer's, r = 1); ties go to the ratio nearest 1. The scales become r_k * s_k, r_v * s_v in place, before the checkpoint is written. A Gemma 4
KV-shared layer reads its source's cache: the search sees only the source layer's own queries.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

CAPTURE_ATTENTION = "gemma_mobile_kv_ranges_capture"
RATIOS = tuple(round(0.25 + 0.05 * i, 2) for i in range(26))  # 0.25 .. 1.50


@dataclass
class _Captured:
    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=lambda: {"q": 0, "k": 0, "v": 0})


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int | None,
              softcap: float | None) -> torch.Tensor:
    """[Hq, T, D] q, [Hkv, T, D] k/v -> [T, Hq*D]: causal (sliding-window) attention in f32 (module docstring)."""
    hq, t, d = q.shape
    g = hq // k.shape[0]
    k = k.float().repeat_interleave(g, 0)
    v = v.float().repeat_interleave(g, 0)
    s = (q.float() @ k.transpose(1, 2)) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(t)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(0, 1).reshape(t, hq * d)


class KVRangeSearch:
    """Collects q/k/v of the KV-quantized attention modules while calibrating; `finish` rescales their k/v scales
    (module docstring)."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.captured: dict[torch.nn.Module, _Captured] = {}
        self._model: torch.nn.Module | None = None  # whose attention function `attach` replaced
        self._base = "eager"

    def attach(self, modifier, model: torch.nn.Module) -> int:
        """Capture hooks on every attention module with a `k_scale`: key / value through compressed-tensors'
        hooks (registered by `modifier.register_hook`, so llmcompressor removes them), the query through an
        attention function wrapping the model's own (compressed-tensors hooks queries only when it quantizes
        them); `finish` restores the model's attention function. Returns how many modules."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for _, m in model.named_modules():
            if hasattr(m, "k_scale") and hasattr(m, "v_scale") and hasattr(m, "o_proj"):
                self.captured[m] = _Captured()
                for kind in ("key", "value"):
                    modifier.register_hook(m, self._hook(kind[0]), kind)
        if not self.captured:
            return 0
        self._model, self._base = model, model.config._attn_implementation or "eager"

        def capture(module, query, *args, **kwargs):
            if module in self.captured:
                self._hook("q")(module, query)
            if self._base in ALL_ATTENTION_FUNCTIONS and self._base != "eager":
                return ALL_ATTENTION_FUNCTIONS[self._base](module, query, *args, **kwargs)
            return sys.modules[type(module).__module__].eager_attention_forward(module, query, *args, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, capture)
        ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[self._base])
        model.set_attn_implementation(CAPTURE_ATTENTION)
        return len(self.captured)

    def _hook(self, kind: str):
        def hook(module: torch.nn.Module, states: torch.Tensor) -> None:
            c = self.captured[module]
            if states.shape[0] != 1:
                # padded positions of a multi-sequence batch would count as keys the queries can read
                raise ValueError(f"kv_ranges: attention_output needs calibration batches of one sequence (got "
                                 f"{states.shape[0]}); use batch_size 1 (llmcompressor's default) or kv_ranges: "
                                 "observer")
            if c.tokens[kind] < self.tokens:
                x = states.detach()[0]  # [H, T, D]
                getattr(c, kind).append(x.to("cpu", copy=True))
                c.tokens[kind] += x.shape[1]
        return hook

    @torch.no_grad()
    def finish(self, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
        """Choose and set every captured layer's k/v scales; returns {module name: (r_k, r_v)}."""
        from compressed_tensors.utils import update_offload_parameter
        from tqdm.auto import tqdm

        from kernels.kvcache import fake_quant_kv

        if self._model is not None:
            self._model.set_attn_implementation(self._base)
            self._model = None
        names = {m: n for n, m in model.named_modules()}
        chosen: dict[str, tuple[float, float]] = {}
        for m, c in tqdm(self.captured.items(), desc="KV ranges (attention output)", unit="layer"):
            n = min(len(c.q), len(c.k), len(c.v))
            if n == 0:
                raise RuntimeError(f"{names[m]}: no query/key/value was captured while calibrating")
            bits = m.quantization_scheme.input_activations.num_bits
            window = getattr(m, "sliding_window", None)
            softcap = getattr(m, "attn_logit_softcapping", None) or getattr(m.config, "attn_logit_softcapping", None)
            w_o = m.o_proj.weight.float()
            ref = [attention(c.q[i], c.k[i], c.v[i], m.scaling, window, softcap) for i in range(n)]

            def err(ks: torch.Tensor | None, vs: torch.Tensor | None) -> float:
                e = 0.0
                for i in range(n):
                    k = c.k[i] if ks is None else fake_quant_kv(c.k[i], ks, bits)
                    v = c.v[i] if vs is None else fake_quant_kv(c.v[i], vs, bits)
                    d = attention(c.q[i], k, v, m.scaling, window, softcap) - ref[i]
                    e += float(((d @ w_o.T) ** 2).sum())
                return e

            def search(scale: torch.Tensor, k_side: bool, other: torch.Tensor | None) -> tuple[float, torch.Tensor]:
                best = None
                for r in sorted(RATIOS, key=lambda r: abs(r - 1.0)):  # strict < keeps the ratio nearest 1 on ties
                    s = (scale.float() * r).to(scale.dtype).float()
                    e = err(s, other) if k_side else err(other, s)
                    if best is None or e < best[0]:
                        best = (e, r, s)
                return best[1], best[2]

            s_k, s_v = m.k_scale.data.clone(), m.v_scale.data.clone()
            e0 = err(s_k.float(), s_v.float())
            r_k, k_new = search(s_k, True, s_v.float())
            r_v, v_new = search(s_v, False, k_new)
            e1 = err(k_new, v_new)
            update_offload_parameter(m, "k_scale", k_new.to(s_k.dtype).reshape(s_k.shape))
            update_offload_parameter(m, "v_scale", v_new.to(s_v.dtype).reshape(s_v.shape))
            chosen[names[m]] = (r_k, r_v)
            logger.info("%s (int%d KV): k/v scale x%.2f / x%.2f, attention output error %.4g -> %.4g over %d tokens",
                        names[m], bits, r_k, r_v, e0, e1, sum(x.shape[1] for x in c.q[:n]))
        self.captured.clear()
        return chosen
