"""The wNa8o8 mobile scheme as data, and its expansion into compressed-tensors config groups.

A `MobileScheme` says how many bits each kind of weight gets (per layer where needed) and how the KV cache is
quantized per layer type. `expand(scheme, config)` turns it, for one model config, into

* compressed-tensors `QuantizationScheme`s, one config group per (bits, kind): weights `num_bits` int
  symmetric per output channel (`strategy="channel"`), static per-tensor int8 `input_activations` and
  `output_activations` for every quantized linear, weights-only groups for embedding tables; every group has
  `format="pack-quantized"` (without it compressed-tensors stores groups with activations unpacked in int8 and
  silently leaves Gemma's `*ScaledWordEmbedding` dense);
* the `gemma_mobile` metadata key (per-layer KV bits, KV sharing) that compressed-tensors cannot express.

Targets are explicit per module (regexes over layer indices), so groups never overlap and a target that
matches nothing is an error, not a silent no-op.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kernels import bitpack
from vllm_gemma_mobile.metadata import FORMAT_VERSION, KV_BITS  # the gemma_mobile key's own constants

SUPPORTED_BITS = bitpack.SUPPORTED_BITS  # the one list of weight bit widths (kernels/bitpack.py)
LayerType = Literal["sliding_attention", "full_attention"]


class SchemeError(ValueError):
    """A scheme or checkpoint config that cannot be served faithfully."""


def _check_bits(value: int | None, what: str) -> int | None:
    if value is not None and value not in SUPPORTED_BITS:
        raise SchemeError(f"{what}: {value}-bit is not supported (supported: {SUPPORTED_BITS})")
    return value


class MobileScheme(BaseModel):
    """Bit widths of a Gemma mobile checkpoint. Layer indices refer to decoder layers."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    embed_bits: int | None = Field(2, description="embed_tokens (tied lm_head); None keeps it bf16")
    ple_bits: int | None = Field(None, description="Gemma 4 per-layer embedding table embed_tokens_per_layer")
    ple_group_size: int | None = Field(None, description="PLE table: one scale per (row, block of this many "
                                       "columns); default hidden_size_per_layer_input (256: one per layer)")
    attention_bits: int = 4
    mlp_bits: int = 4
    mlp_bits_by_layer: dict[int, int] = Field(default_factory=dict, description="per-layer MLP overrides")
    attention_bits_by_layer: dict[int, int] = Field(default_factory=dict,
                                                    description="per-layer attention (q/k/v/o) overrides")
    per_layer_bits: int | None = Field(8, description="Gemma 4 per_layer_input_gate / per_layer_projection")
    model_projection_bits: int | None = Field(None, description="Gemma 4 per_layer_model_projection; None keeps it "
                                                                "float, as Google's checkpoints do (format.md)")
    keep_8bit: list[str] = Field(default_factory=list, description="module-name regexes raised to 8-bit")
    kv_bits: dict[str, int | None] = Field(
        default_factory=lambda: {"sliding_attention": 8, "full_attention": 4},
        description="KV cache bits per layer type (HF config layer_types); None keeps that type in bf16")
    weight_observer: str = "mse"
    weight_observer_kwargs: dict[str, float] = Field(
        default_factory=lambda: {"maxshrink": 0.8},
        description="llmcompressor MSE observer: search clipping ranges down to (1 - maxshrink) x absmax. Its "
                    "default 0.2 is far too narrow for 2-bit: Gemma 3 270M's 2-bit embedding table had 0.74 "
                    "relative error with 0.2 and 0.49 with 0.8 (4-bit: 0.254 -> 0.243)")
    activation_observer: str = Field(
        "static_minmax", description="observer of every static activation scale (linear inputs and outputs) and "
                                     "of the KV cache scales: static_minmax (running range) or static_mse (the "
                                     "least squared error over all calibration values, quantize/observers.py)")
    lm_head_observer: str = Field(
        "static_minmax", description="observer of the tied lm_head's static input / output scales; min/max by "
                                     "default: an MSE range clips the few large logits that decide the next token")
    kv_ranges: Literal["observer", "attention_output"] = Field(
        "observer", description="KV cache scales: the activation observer's, or those scaled by the ratio (0.25..1.50)"
                                " with the least error at each attention layer's output (quantize/kv_ranges.py)")
    kv_range_tokens: int = Field(2048, gt=0, description="calibration tokens per layer the kv_ranges search uses")
    lm_head_scales: Literal["both", "input", "none"] | None = Field(
        None, description="static int8 SRQ of the tied lm_head, calibrated by the recipe (quantize/lm_head.py): "
                          "both = input and output (Google's layout), input = int8 activations with float logits, "
                          "none = weight-only lm_head. Default: both if the table is quantized, else none")

    @field_validator("embed_bits", "ple_bits", "attention_bits", "mlp_bits", "per_layer_bits", "model_projection_bits")
    @classmethod
    def _bits(cls, v, info):
        return _check_bits(v, info.field_name)

    @model_validator(mode="after")
    def _lm_head(self) -> "MobileScheme":
        if self.lm_head_scales is None:
            self.lm_head_scales = "both" if self.embed_bits is not None else "none"
        elif self.lm_head_scales != "none" and self.embed_bits is None:
            raise SchemeError(f"lm_head_scales={self.lm_head_scales!r} needs a quantized table (embed_bits is null: "
                              "the lm_head stays bf16)")
        return self

    @field_validator("mlp_bits_by_layer", "attention_bits_by_layer")
    @classmethod
    def _layer_bits(cls, v: dict[int, int], info):
        for layer, bits in v.items():
            _check_bits(bits, f"{info.field_name}[{layer}]")
        return v

    @field_validator("kv_bits")
    @classmethod
    def _kv(cls, v: dict[str, int | None]):
        for layer_type, bits in v.items():
            if layer_type not in ("sliding_attention", "full_attention"):
                raise SchemeError(f"kv_bits: unknown layer type {layer_type!r} "
                                  "(expected sliding_attention / full_attention)")
            if bits is not None and bits not in KV_BITS:
                raise SchemeError(f"kv_bits[{layer_type}]: {bits}-bit KV is not supported (supported: 4, 8)")
        return v


def weight_args(bits: int, observer: str, strategy: str = "channel", group_size: int | None = None,
                observer_kwargs: dict | None = None) -> QuantizationArgs:
    """Symmetric int weights, one scale per output channel (or per group along K)."""
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy, group_size=group_size,
                            dynamic=False, observer=observer, observer_kwargs=dict(observer_kwargs or {}))


def activation_args(observer: str) -> QuantizationArgs:
    """Static (calibrated, frozen) per-tensor symmetric int8."""
    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False,
                            observer=observer)


def kv_args(bits: int, observer: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="tensor", dynamic=False,
                            observer=observer)


@dataclass
class Expanded:
    """A scheme resolved for one model config."""

    config_groups: dict[str, QuantizationScheme]
    ignore: list[str]
    module_bits: dict[str, int]                     # HF module name -> weight bits
    kv_layer_bits: list[int | None]                 # per decoder layer; None: no own KV (shared) or bf16
    kv_sharing: dict[int, int] = field(default_factory=dict)

    def metadata(self, scheme: MobileScheme) -> dict:
        """The `quantization_config.gemma_mobile` key of a checkpoint."""
        by_type = {k: v for k, v in scheme.kv_bits.items()}
        return {
            "version": FORMAT_VERSION,
            "scheme": scheme.name,
            "kv_cache": {
                "layer_bits": self.kv_layer_bits,
                "bits_by_layer_type": by_type,
                "symmetric": True,
                "strategy": "tensor",
                "kv_sharing": {str(k): v for k, v in self.kv_sharing.items()},
            },
        }


def text_config(config):
    """The text config of a (possibly multimodal) Gemma config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_types(config) -> list[str]:
    tc = text_config(config)
    types = getattr(tc, "layer_types", None)
    if not types:
        raise SchemeError("config.layer_types is missing: cannot tell sliding from full attention layers")
    return list(types)


def kv_sharing(config) -> dict[int, int]:
    """Gemma 4 KV-shared layers -> the last non-shared layer of the same attention type (whose KV they read)."""
    tc = text_config(config)
    n_shared = int(getattr(tc, "num_kv_shared_layers", 0) or 0)
    types = layer_types(config)
    n = len(types)
    first_shared = n - n_shared
    sharing: dict[int, int] = {}
    for i in range(first_shared, n):
        src = max((j for j in range(first_shared) if types[j] == types[i]), default=None)
        if src is None:
            raise SchemeError(f"layer {i} is KV-shared but no earlier {types[i]} layer owns a KV cache")
        sharing[i] = src
    return sharing


def _layers_regex(layers: list[int]) -> str:
    return "(" + "|".join(str(i) for i in sorted(layers)) + ")"


def _module_kind(name: str) -> tuple[str, int | None] | None:
    """Classify an HF module name of a Gemma 3/4 text model (prefix-tolerant)."""
    m = re.search(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|per_layer_input_gate|"
                  r"per_layer_projection)$", name)
    if m:
        part = m.group(2)
        kind = "attention" if part.startswith("self_attn") else "mlp" if part.startswith("mlp") else "per_layer"
        return kind, int(m.group(1))
    if name.endswith("per_layer_model_projection"):
        return "model_projection", None
    if re.search(r"(^|\.)embed_tokens_per_layer$", name):
        return "ple", None
    if re.search(r"(^|\.)embed_tokens$", name):
        return "embed", None
    return None


def expand(scheme: MobileScheme, config, module_names: list[str]) -> Expanded:
    """Resolve `scheme` for a model with this `config` whose modules are `module_names` (linear + embedding).

    Raises SchemeError for per-layer overrides or keep_8bit patterns that match no module.
    """
    types = layer_types(config)
    n_layers = len(types)
    for field_name in ("mlp_bits_by_layer", "attention_bits_by_layer"):
        for layer in getattr(scheme, field_name):
            if not 0 <= layer < n_layers:
                raise SchemeError(f"{field_name}: layer {layer} does not exist (model has {n_layers} layers)")
    keep = [re.compile(p) for p in scheme.keep_8bit]
    keep_hits = {p.pattern: 0 for p in keep}

    module_bits: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for name in module_names:
        kl = _module_kind(name)
        if kl is None:
            continue
        kind, layer = kl
        if kind == "attention":
            bits = scheme.attention_bits_by_layer.get(layer, scheme.attention_bits)
        elif kind == "mlp":
            bits = scheme.mlp_bits_by_layer.get(layer, scheme.mlp_bits)
        elif kind == "per_layer":
            bits = scheme.per_layer_bits
        elif kind == "model_projection":
            bits = scheme.model_projection_bits
        elif kind == "embed":
            bits = scheme.embed_bits
        else:
            bits = scheme.ple_bits
        if bits is None:
            continue
        for p in keep:
            if p.search(name) and kind not in ("embed", "ple"):
                keep_hits[p.pattern] += 1
                bits = 8
        module_bits[name] = bits
        kinds[name] = kind
    missing = [p for p, hits in keep_hits.items() if hits == 0]
    if missing:
        raise SchemeError(f"keep_8bit patterns match no quantized linear: {missing}")
    if scheme.embed_bits is not None and "embed" not in kinds.values():
        raise SchemeError("embed_bits is set but the model has no embed_tokens module")
    if scheme.ple_bits is not None and "ple" not in kinds.values():
        raise SchemeError("ple_bits is set but the model has no embed_tokens_per_layer module "
                          "(per-layer embeddings are Gemma 4 only)")

    groups: dict[str, QuantizationScheme] = {}
    by_group: dict[str, list[str]] = {}
    for name, bits in module_bits.items():
        kind = kinds[name]
        key = f"embed_w{bits}" if kind == "embed" else f"ple_w{bits}" if kind == "ple" else f"w{bits}a8o8"
        by_group.setdefault(key, []).append(name)
    def wargs(bits: int) -> QuantizationArgs:
        return weight_args(bits, scheme.weight_observer, observer_kwargs=scheme.weight_observer_kwargs)

    for key, names in sorted(by_group.items()):
        targets = _targets(names)
        bits = module_bits[names[0]]
        if key.startswith("embed"):
            groups[key] = QuantizationScheme(targets=targets, weights=wargs(bits), format="pack-quantized")
        elif key.startswith("ple"):
            groups[key] = QuantizationScheme(
                targets=targets, format="pack-quantized",
                weights=weight_args(bits, scheme.weight_observer, "group", _ple_group_size(scheme, config),
                                    scheme.weight_observer_kwargs))
        else:
            groups[key] = QuantizationScheme(
                targets=targets, weights=wargs(bits),
                input_activations=activation_args(scheme.activation_observer),
                output_activations=activation_args(scheme.activation_observer), format="pack-quantized")

    sharing = kv_sharing(config)
    kv_layer_bits = [None if i in sharing else scheme.kv_bits.get(t) for i, t in enumerate(types)]
    ignore = ["lm_head"]  # tied: lm_head is served from the quantized embed_tokens table
    return Expanded(groups, ignore, module_bits, kv_layer_bits, sharing)


def _ple_group_size(scheme: MobileScheme, config) -> int:
    tc = text_config(config)
    width = int(tc.num_hidden_layers) * int(tc.hidden_size_per_layer_input)
    group = scheme.ple_group_size or int(tc.hidden_size_per_layer_input)
    if width % group:
        raise SchemeError(f"ple_group_size={group} does not divide the per-layer embedding width {width}")
    return group


def _targets(names: list[str]) -> list[str]:
    """Prefix-tolerant regex targets for exactly these modules: one regex per (module suffix, layer set).

    `model.layers.3.mlp.gate_proj` and `model.language_model.layers.3.mlp.gate_proj` (HF multimodal) and vLLM's
    `language_model.model.layers.3...` all match `re:.*layers\\.(3)\\.mlp\\.gate_proj$`.
    """
    by_suffix: dict[str, list[int]] = {}
    other: set[str] = set()
    for n in names:
        m = re.search(r"layers\.(\d+)\.(.*)$", n)
        if m:
            by_suffix.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            other.add(n.rsplit(".", 1)[-1])
    out = [r"re:.*layers\." + _layers_regex(v) + r"\." + re.escape(suffix) + "$"
           for suffix, v in sorted(by_suffix.items())]
    out += [r"re:(.*\.)?" + re.escape(o) + "$" for o in sorted(other)]
    return out
