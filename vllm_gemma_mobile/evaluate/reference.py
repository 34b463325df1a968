"""The numerical reference: a bf16 model or a mobile checkpoint in transformers + compressed-tensors fake quant.

`load_reference(model_dir)` returns `(model, tokenizer)`:

- bf16 directory: plain `from_pretrained(dtype=bfloat16)`, eval mode.
- mobile checkpoint (`quant_method: compressed-tensors` + our `gemma_mobile` key, see docs/checkpoint-format.md):
  1. compressed-tensors 0.17 via transformers with `CompressedTensorsConfig(dequantize=True)`: packed weights are
     unpacked to `W = q * weight_scale` (bf16) at load; modules end in status DECOMPRESSED, so their forward
     (`compressed_tensors.quantization.lifecycle.forward.set_forward_quantized`) skips weight QDQ but applies
     static input AND output QDQ: `y = qdq(F.linear(qdq(x, input_scale)), output_scale)` with
     `qdq(t, s) = clamp(round(t / s), -128, 127) * s` (torch.round = half-to-even). The division runs in the
     promoted dtype of `t` and `s`; the loaded scale parameters are bf16 (compressed-tensors creates them in the
     weight dtype and transformers casts the checkpoint's f32 into them), so the reference computes it in bf16.
  2. KV cache fake quant (what compressed-tensors cannot express: per-layer bits): for every attention layer,
     keys and values as cached (after k_norm and RoPE; v after v_norm for Gemma 4) become
     `clamp(round(k / k_scale), -2^(b-1), 2^(b-1)-1) * k_scale` with `b = layer_bits[i]`, computed in the
     activation dtype (bf16, scale rounded to bf16), as compressed-tensors' own KV fake quant does while
     calibrating (bit-exact round trip). It is applied where attention reads K/V (a registered attention
     function wrapping the model's own sdpa/eager one); since the quantizer is idempotent (bf16, |n| <= 256) this
     equals quantizing once at cache-write time. Gemma 4 KV-shared layers read the source layer's K/V and use
     its scales/bits. With the KV fake quant on, the attention itself is the served one: the plugin's own KV
     kernels (`kernels.plugin.kv_kernels`) over a one-page quantized cache per sequence (f32 fallback with the
     same math for padded batches, cached decoding and QAT); the server in turn runs RoPE and the residual-add
     RMSNorm with this model code's rounding (`vllm_gemma_mobile/vllm/float_ops.py`), so served and evaluated
     models are bit-identical (eager serving; README "Served vs evaluated"). With the KV fake quant switched off
     (`kv_fake_quant_enabled(model, False)`), bf16 / f16 attention on CPU runs the same kernels over the
     unquantized 16-bit page, which is what `GEMMA_MOBILE_KV_CACHE=bf16` serves.
  3. The checkpoint is read once through the contract (`vllm_gemma_mobile.contract.read_contract`, the reader the
     vLLM plugin validates with): every scale (weight/input/output/k/v) must be finite and > 0, bits, shapes and
     KV sharing must agree with the config, else `ContractError` names the tensor or field.

Workarounds (transformers 5.19 + compressed-tensors 0.17), active only inside `load_reference`:
- `_init_weights` of a packed `nn.Embedding` (no `.weight`, only `weight_packed`) raises
  "'Embedding' object has no attribute 'weight'": a placeholder `weight` marked initialized is attached for the
  duration of that one call (Gemma's own init, e.g. `embed_scale`, still runs).
- Tying lm_head to a packed embedding fails (`model.embed_tokens.weight` does not exist before decompression):
  the model is loaded untied and re-tied to the decompressed table afterwards (`tie_word_embeddings` restored).
- A non-null `kv_cache_scheme` next to `gemma_mobile` is dropped (one global bit width would be wrong for
  hybrid KV); ours is applied instead.
- Gemma 4: `config.allow_global_per_layer_attribute_access = True` (AmbiguousGlobalPerLayerAttributeError).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from kernels.kvcache import UNQUANTIZED
from kernels.scales import invalid_scales
from vllm_gemma_mobile.contract import CheckpointContract, ContractError, read_contract

logger = logging.getLogger(__name__)

KV_ATTN_PREFIX = "gemma_mobile_kv_"
_KV_ATTR = "_gemma_mobile_kv"

@dataclass(frozen=True)
class KVSpec:
    """KV fake quant of one attention layer: `bits`, per-tensor `k_scale` / `v_scale` (f32 scalars) and the
    layer that owns the cache these scales belong to (itself, or the source of a Gemma 4 KV-shared layer)."""

    bits: int
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    source_layer: int


def read_config(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def mobile_metadata(config: dict) -> dict | None:
    """`quantization_config.gemma_mobile` of a config.json dict, or None for a model without it."""
    qc = config.get("quantization_config") or {}
    return qc.get("gemma_mobile")


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """`clamp(round_half_even(x / scale), -2^(b-1), 2^(b-1)-1) * scale`, computed in `x.dtype` (bf16) exactly as
    compressed-tensors' `forward_quantize` does for k/v while calibrating, so the reloaded checkpoint reproduces
    the calibrated in-memory model bit for bit (tests/test_quantize.py round trip).

    Delegates to `kernels.kvcache.fake_quant_kv`, the one implementation the vLLM KV cache also runs."""
    from kernels.kvcache import fake_quant_kv as _impl

    return _impl(x, scale, bits)


def install_lm_head_srq(model: torch.nn.Module, head) -> None:
    """Static int8 SRQ on the lm_head's input and output (`metadata.LMHeadScales`; None = identity on that side):
    `logits = qdq(lm_head(qdq(h, s_x)), s_y)`, each qdq computed in the activation dtype like every other SRQ of
    this reference (the same function as the KV fake quant, 8 bits). Gemma's final logit softcap follows it."""
    lm = model.get_output_embeddings()
    if lm is None:
        raise ValueError("gemma_mobile.lm_head scales given but the model has no lm_head")
    if head.input_scale is not None:
        sx = torch.tensor(head.input_scale, dtype=torch.float32)
        lm.register_forward_pre_hook(lambda m, args: (fake_quant_kv(args[0], sx, 8),) + tuple(args[1:]))
    if head.output_scale is not None:
        sy = torch.tensor(head.output_scale, dtype=torch.float32)
        lm.register_forward_hook(lambda m, args, out: fake_quant_kv(out, sy, 8))


def served_embedding_rows(contract: CheckpointContract, name: str) -> torch.Tensor:
    """The f32 rows `q * s` of the quantized embedding table `name` (one scale per row, or per row and group for a
    per-layer table): what the plugin's gather returns before rounding to the activation dtype."""
    from kernels.layout import from_compressed_tensors

    spec = contract.modules[name]
    pw = from_compressed_tensors(contract.load(f"{name}.weight_packed"), spec.bits, list(spec.shape)).with_codes(torch.int8)
    return _embedding_rows(pw, contract.load(f"{name}.weight_scale").float().reshape(-1))


def _embedding_rows(pw, ws: torch.Tensor) -> torch.Tensor:
    g = ws.numel() // pw.n
    return (pw.codes.float().view(pw.n, g, -1) * ws.view(pw.n, g, 1)).view(pw.n, pw.k)


def install_served_numerics(model: torch.nn.Module, contract: CheckpointContract) -> dict[str, int]:
    """Replace the fake quant of every quantized module by the contract's exact numerics, i.e. what the vLLM plugin
    serves (`kernels.reference`, the plugin's torch backend, bit for bit on CPU):
    - wNa8o8 linears: `kernels.reference.linear` on the checkpoint's packed codes with its f32 scales (x / s_x in
      f32 IEEE division, round-half-even, exact int32 products, f32 epilogue, output SRQ in f32) instead of
      compressed-tensors' bf16 QDQ around a bf16 `F.linear`;
    - the tied lm_head (weight-only, or with `gemma_mobile.lm_head` SRQ): the same op over the table's codes;
    - embedding tables: rows `bf16(q * s)` from the f32 product (compressed-tensors rounds s to bf16 first).
    Returns counts. KV fake quant is unchanged (already the one implementation in kernels/kvcache.py)."""
    from kernels import reference as kref
    from kernels.layout import from_compressed_tensors

    head = contract.lm_head
    counts = {"served_linears": 0, "served_embeddings": 0}

    def packed(spec, codes_dtype=torch.int8):
        pw = from_compressed_tensors(contract.load(f"{spec.name}.weight_packed"), spec.bits, list(spec.shape))
        return (pw if codes_dtype is None else pw.with_codes(codes_dtype)), \
            contract.load(f"{spec.name}.weight_scale").float().reshape(-1).contiguous()

    def scale(v: float | None):
        return None if v is None else torch.tensor(v, dtype=torch.float32)  # f32 scale: exact as a double

    emb = model.get_input_embeddings()
    for name, m in model.named_modules():
        spec = contract.modules.get(name)
        if spec is None or getattr(m, "quantization_scheme", None) is None:
            continue
        pw, ws = packed(spec)
        if isinstance(m, torch.nn.Embedding):
            m.weight.data = _embedding_rows(pw, ws).to(m.weight.dtype)  # = served_embedding_rows, unpacked once
            counts["served_embeddings"] += 1
            if m is emb and model.get_output_embeddings() is not None \
                    and model.get_output_embeddings().weight is m.weight:
                sx = scale(head.input_scale if head is not None else None)
                sy = scale(head.output_scale if head is not None else None)
                if sx is None:
                    pw, _ = packed(spec, None)
                lm = model.get_output_embeddings()
                lm.forward = lambda x, pw=pw, ws=ws, sx=sx, sy=sy: kref.linear(x, pw, ws, sx, sy)
            continue
        sx, sy = scale(spec.input_scale), scale(spec.output_scale)
        bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
        m.forward = lambda x, pw=pw, ws=ws, sx=sx, sy=sy, b=bias: kref.linear(x, pw, ws, sx, sy, b)
        counts["served_linears"] += 1
    missing = sorted(set(contract.modules) - {n for n, _ in model.named_modules()})
    if missing:
        raise ContractError(f"{missing[0]}: quantized in the checkpoint but no such module in the model "
                            f"({len(missing)} in all)")
    return counts


def use_float_table(model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Ablation (`evaluate(..., table="bf16")`): give `model` (a `load_reference` mobile model) the bf16 table of
    `base` (the bf16 reference) in both roles: the embedding gathers its rows and the tied lm_head is a plain
    `F.linear` on them, without static int8 scales. Everything else keeps its served numerics."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    w = base.get_input_embeddings().weight
    if w.shape != emb.weight.shape:
        raise ValueError(f"table shapes differ: {tuple(w.shape)} vs {tuple(emb.weight.shape)}")
    emb.weight.data = w.detach().to(emb.weight.dtype).clone()
    if head is not None:
        head.forward = lambda x, w=emb.weight: torch.nn.functional.linear(x, w.to(x.dtype))
    model.gemma_mobile_reference["table"] = "bf16 (ablation)"


def _check_scale(name: str, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        raise ContractError(f"{name}: missing (the checkpoint must carry it; see docs/checkpoint-format.md)")
    f = t.detach().float()
    bad = invalid_scales(f) if f.numel() else "empty"
    if bad:
        raise ContractError(f"{name}: invalid scale {bad} (must be finite and > 0)")
    return f


def kv_specs(contract: CheckpointContract) -> dict[int, KVSpec]:
    """Per-layer `KVSpec` from the contract's KV layers (bits and static k/v scales; a KV-shared Gemma 4 layer gets
    its source layer's spec). Raises `ContractError` if the checkpoint carries no KV bits."""
    if not contract.kv or contract.kv[0].bits is None:
        raise ContractError(f"{contract.path}: quantization_config.gemma_mobile.kv_cache.layer_bits is missing")
    return {k.layer: KVSpec(k.bits, torch.tensor(k.k_scale, dtype=torch.float32),
                            torch.tensor(k.v_scale, dtype=torch.float32), k.source) for k in contract.kv}


def _kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
    """Attention function registered as `gemma_mobile_kv_<base>`: the served quantized KV cache's attention, else
    KV fake quant then the base function.

    With the KV fake quant on and no gradient needed, the attention runs through the very kernels the plugin
    serves with (`kernels.plugin.kv_kernels`: K/V quantized into a one-block-per-sequence page by the same write
    op, paged attention over the codes), so reference and server agree bit for bit (the C++ kernel's order of
    summation depends only on each row's keys, not on vLLM's blocks or chunks). That needs a plain causal (and
    sliding-window) mask over the sequence's own keys; any other mask (padding), a KV cache from earlier calls, a
    QAT straight-through quantizer or a gradient takes the f32 path: fake-quantized K/V, the base function on f32
    inputs, output rounded once to the query dtype - the same math up to summation order. (The base function in bf16 - CPU SDPA rounds P to bf16 before P.V -
    differed from the server by ~1 % per attention output, which the static int8 requantization downstream
    amplified to a 2.3x perplexity gap on single windows of the real 270M.)"""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    spec: KVSpec | None = getattr(module, _KV_ATTR, None)
    out_dtype = query.dtype
    served = getattr(module, _KV_ATTR + "_served", True)
    if spec is None and served and query.device.type == "cpu" and getattr(module, _KV_ATTR + "_off", None) is not None \
            and _served_kernels_apply(query, key, attention_mask, kwargs, (torch.bfloat16, torch.float16)):
        # KV fake quant off: the served bf16 comparison cache's attention (`GEMMA_MOBILE_KV_CACHE=bf16`: the same
        # kernels over the unquantized 16-bit page), so served == evaluated holds without KV quantization too
        return _served_attention(query, key, value, _UNQUANTIZED_SPEC, kwargs), None
    if spec is not None and not served:
        # numerics="bf16": compressed-tensors' calibration-time semantics (fake quant, the base function in the
        # model dtype), which a calibrated in-memory model reproduces bit for bit
        key = fake_quant_kv(key, spec.k_scale, spec.bits)
        value = fake_quant_kv(value, spec.v_scale, spec.bits)
    elif spec is not None:
        fq = getattr(module, _KV_ATTR + "_fn", fake_quant_kv)
        if fq is fake_quant_kv and _served_kernels_apply(query, key, attention_mask, kwargs,
                                                         (torch.bfloat16, torch.float32)):
            return _served_attention(query, key, value, spec, kwargs), None
        key = fq(key, spec.k_scale, spec.bits).float()
        value = fq(value, spec.v_scale, spec.bits).float()
        query = query.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    base = module.config._attn_implementation.removeprefix(KV_ATTN_PREFIX)
    if base in ALL_ATTENTION_FUNCTIONS and base != "eager":
        fn = ALL_ATTENTION_FUNCTIONS[base]
    else:  # the model's own eager function (Gemma's has softcapping)
        fn = sys.modules[type(module).__module__].eager_attention_forward
    out, weights = fn(module, query, key, value, attention_mask, **kwargs)
    return out.to(out_dtype), weights


def _served_kernels_apply(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, kwargs: dict,
                          dtypes: tuple) -> bool:
    """Whether `_served_attention` can compute this call: no gradient, a supported dtype, the sequence's own keys
    (no cache from earlier calls) under a plain causal / sliding-window mask."""
    return not (torch.is_grad_enabled() and query.requires_grad) and query.dtype in dtypes \
        and key.shape[2] == query.shape[2] \
        and _plain_causal(mask, query.shape[0], query.shape[2], kwargs.get("sliding_window"))


def _plain_causal(mask: torch.Tensor | None, b: int, t: int, window: int | None) -> bool:
    """Whether `mask` (transformers' attention mask for `b` sequences of `t` tokens: None, bool or additive) is
    exactly causal (within `window` keys), i.e. no padding, so the served kernels' own masking is the same."""
    if mask is None:
        return True
    if mask.dim() != 4 or mask.shape[-2:] != (t, t):
        return False
    i = torch.arange(t, device=mask.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= (i[:, None] - i[None, :]) < window
    got = mask if mask.dtype == torch.bool else mask == 0
    return bool((got == allowed).all())


def _served_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: KVSpec,
                      kwargs: dict) -> torch.Tensor:
    """[B, Hq, T, D] query and [B, Hkv, T, D] raw K/V -> [B, T, Hq, D]: each sequence's K/V written into its own
    page of a quantized cache and attended by the served kernels (causal from position 0)."""
    from kernels.kvcache import code_bytes
    from kernels.plugin import kv_kernels

    b, hq, t, d = query.shape
    hk = key.shape[1]
    write, attend = kv_kernels(query.device)
    cache = torch.empty(b, hk, t, 2 * code_bytes(d, spec.bits), dtype=torch.uint8, device=query.device)
    flat = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)  # noqa: E731  [B*T, H, D]
    write(cache, flat(key), flat(value), torch.arange(b * t, device=query.device), spec.k_scale, spec.v_scale,
          spec.bits)
    out = attend(flat(query).contiguous(), cache, torch.arange(0, (b + 1) * t, t, device=query.device),
                 torch.full((b,), t, device=query.device), torch.arange(b, device=query.device)[:, None],
                 spec.k_scale, spec.v_scale, spec.bits, kwargs.get("scaling") or d ** -0.5,
                 sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"), causal=True)
    return out.reshape(b, t, hq, d)


_UNQUANTIZED_SPEC = KVSpec(UNQUANTIZED, torch.tensor(1.0), torch.tensor(1.0), -1)  # the 16-bit page: no scales


def _attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if "attention" in type(m).__name__.lower() and hasattr(m, "q_proj") and hasattr(m, "layer_idx")]


def install_kv_fake_quant(model: torch.nn.Module, specs: dict[int, KVSpec], fake_quant=None,
                          served_attention: bool = True) -> int:
    """Attach `specs` to the attention modules and switch the model to the KV-quantizing attention function.
    `fake_quant(x, scale, bits)` replaces `fake_quant_kv` (QAT: the same values with a straight-through gradient).
    `served_attention`: the served attention (the plugin's KV kernels, or f32 where they cannot run; see
    `_kv_attention`); False = fake quant then the model's own attention in its dtype (`numerics="bf16"`).

    Every attention layer must have a spec. Returns the number of attention modules that got one.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = _attention_modules(model)
    if not attn:
        raise RuntimeError(f"no attention modules found in {type(model).__name__}")
    for name, m in attn:
        if m.layer_idx not in specs:
            raise ValueError(f"{name}: layer {m.layer_idx} has no KV bits/scales")
        setattr(m, _KV_ATTR, specs[m.layer_idx])
        setattr(m, _KV_ATTR + "_served", served_attention)
        if fake_quant is not None:
            setattr(m, _KV_ATTR + "_fn", fake_quant)
    base = model.config._attn_implementation or "sdpa"
    base = base.removeprefix(KV_ATTN_PREFIX)
    impl = KV_ATTN_PREFIX + base
    ALL_ATTENTION_FUNCTIONS.register(impl, _kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(impl, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(impl)
    if not all(m.config._attn_implementation == impl for _, m in attn):
        raise RuntimeError(f"could not switch the attention implementation to {impl}")
    return len(attn)


def kv_fake_quant_enabled(model: torch.nn.Module, enabled: bool = True) -> None:
    """Switch KV fake quant on/off on a model prepared by `load_reference` (for tests and ablations)."""
    for _, m in _attention_modules(model):
        spec = getattr(m, _KV_ATTR, None) or getattr(m, _KV_ATTR + "_off", None)
        if spec is None:
            continue
        setattr(m, _KV_ATTR if enabled else _KV_ATTR + "_off", spec)
        with contextlib.suppress(AttributeError):
            delattr(m, _KV_ATTR + "_off" if enabled else _KV_ATTR)


@contextlib.contextmanager
def _packed_embedding_init_fix() -> Iterator[None]:
    """transformers 5.19 `_init_weights` on a packed `nn.Embedding` (compressed-tensors removed `.weight`)
    raises AttributeError; give it a placeholder weight flagged `_is_hf_initialized` (so the init is a no-op)
    for that call only, so the model's other inits (e.g. Gemma's `embed_scale` buffer) still run."""
    from transformers import PreTrainedModel

    orig = PreTrainedModel._initialize_weights

    def patched(self, module, *args, **kwargs):
        if isinstance(module, torch.nn.Embedding) and "weight" not in module._parameters \
                and hasattr(module, "weight_packed"):
            placeholder = torch.nn.Parameter(torch.empty(0, device=module.weight_packed.device), requires_grad=False)
            placeholder._is_hf_initialized = True
            module.weight = placeholder
            try:
                return orig(self, module, *args, **kwargs)
            finally:
                del module.weight
        return orig(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = patched
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = orig


def _text_configs(config) -> list:
    out = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text is not None and text is not config:
        out.append(text)
    return out


def _check_activation_quant(model: torch.nn.Module) -> dict[str, int]:
    """Verify the compressed-tensors state after load: every quantized module is DECOMPRESSED, has a dense
    weight, valid scales, and (if it has activation schemes) the QDQ forward wrapper. Returns counts."""
    from compressed_tensors.quantization import QuantizationStatus

    counts = {"quantized_modules": 0, "input_quantized": 0, "output_quantized": 0}
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None:
            continue
        counts["quantized_modules"] += 1
        if getattr(m, "quantization_status", None) != QuantizationStatus.DECOMPRESSED:
            raise RuntimeError(f"{name}: quantization status {m.quantization_status}, expected decompressed")
        if "weight" not in m._parameters:
            raise RuntimeError(f"{name}: weight was not decompressed")
        for base, args in (("weight", scheme.weights), ("input", scheme.input_activations),
                           ("output", scheme.output_activations)):
            if args is None:
                continue
            if base != "weight" and args.dynamic:
                raise ValueError(f"{name}: dynamic {base} activations are not the mobile format (static only)")
            _check_scale(f"{name}.{base}_scale", getattr(m, f"{base}_scale", None))
            if base != "weight":
                counts[f"{base}_quantized"] += 1
        fwd = getattr(m.__dict__.get("forward"), "__func__", None)  # set_forward_quantized binds an instance forward
        if (scheme.input_activations or scheme.output_activations) and \
                getattr(getattr(fwd, "__code__", None), "co_name", "") != "quantized_forward":
            raise RuntimeError(f"{name}: compressed-tensors' quantized forward is not installed")
    return counts


def load_reference(model_dir: str | Path, device: str | torch.device = "cpu", numerics: str = "served"):
    """Load `model_dir` (bf16 or mobile checkpoint) as the fake-quant reference; returns `(model, tokenizer)`.

    `numerics`: "served" (default) = the contract's exact integer numerics that the vLLM plugin runs
    (`install_served_numerics`) and its attention over the quantized KV cache, so evaluated == served; "bf16" =
    compressed-tensors' own fake quant in bf16 with the model's own attention after the KV fake quant,
    which equals transformers' `gemma_quant` reader of Google's layout bit for bit (tests/test_convert.py).

    `model.gemma_mobile_reference` holds a summary (kind, quantized module counts, KV bits per layer).
    The tokenizer is None if the directory has none.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    qc = raw.get("quantization_config")
    meta = mobile_metadata(raw)
    summary: dict[str, Any] = {"path": str(model_dir), "kind": "bf16"}
    contract = read_contract(model_dir) if meta is not None else None  # fail fast, before the model is built
    if qc is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    elif qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{model_dir}: unsupported quant_method {qc.get('quant_method')!r}")
    else:
        from transformers import CompressedTensorsConfig

        summary["kind"] = "mobile" if meta else "compressed-tensors"
        config = AutoConfig.from_pretrained(model_dir)
        qcfg = dict(config.quantization_config) if isinstance(config.quantization_config, dict) else qc
        if meta and qcfg.get("kv_cache_scheme") is not None:
            logger.warning("%s: ignoring kv_cache_scheme (one global width); using gemma_mobile per-layer KV bits",
                           model_dir)
            qcfg["kv_cache_scheme"] = None
        config.quantization_config = qcfg
        tie = [bool(getattr(c, "tie_word_embeddings", False)) for c in _text_configs(config)]
        for c in _text_configs(config):
            c.tie_word_embeddings = False  # re-tied below, after decompression
            if "gemma4" in getattr(c, "model_type", ""):
                c.allow_global_per_layer_attribute_access = True
        with _packed_embedding_init_fix(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, config=config, dtype=torch.bfloat16,
                quantization_config=CompressedTensorsConfig(dequantize=True))
        for c, t in zip(_text_configs(model.config), tie):
            c.tie_word_embeddings = t
        if any(tie) and model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
            logger.debug("re-tied lm_head to the decompressed embedding table")
        summary.update(_check_activation_quant(model))
    model.eval().to(device)
    if contract is not None:
        if numerics not in ("served", "bf16"):
            raise ValueError(f"numerics={numerics!r}: expected 'served' or 'bf16'")
        head = contract.lm_head
        if head is not None:
            summary["lm_head_srq"] = head.model_dump()
        if numerics == "served":
            summary.update(install_served_numerics(model, contract))
        elif head is not None:
            install_lm_head_srq(model, head)
        summary["numerics"] = numerics
        specs = kv_specs(contract)
        install_kv_fake_quant(model, specs, served_attention=numerics == "served")
        n = model.config.get_text_config().num_hidden_layers
        summary["kv_bits"] = [specs[i].bits if i in specs else None for i in range(n)]
        summary["kv_source_layer"] = [specs[i].source_layer if i in specs else None for i in range(n)]
    model.gemma_mobile_reference = summary
    logger.info("loaded %s reference %s: %s", summary["kind"], model_dir,
                {k: v for k, v in summary.items() if k not in ("path", "kind")})
    tokenizer = None
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer

