"""Presets: the bit maps of Google's mobile checkpoints (format.md), resolved from a model's config.

* `gemma3`: any Gemma 3 size. 2-bit tied embedding, 4-bit attention and MLP, int8 KV for sliding layers and
  int4 for global ones. Gemma 3 has no KV-shared "decode-only" layers, so 2-bit MLPs are opt-in per layer
  (`mlp_2bit_layers`), and sensitive modules can be kept at 8 bits (`keep_8bit`).
* `gemma4-e2b`: embedding 2, PLE table 4 (scale per row and 256-block), MLP 4 in the first layers and 2 in the
  KV-shared double-wide layers, per-layer gate/projection 8, attention 4, `per_layer_model_projection` float.
* `gemma4-e4b`: as E2B but MLP 4 everywhere and a 2-bit PLE table.
"""

from __future__ import annotations

from typing import Any

from vllm_gemma_mobile.scheme.spec import MobileScheme, SchemeError, kv_sharing, text_config

PRESETS = ("gemma3", "gemma4-e2b", "gemma4-e4b")


def gemma3(config, *, mlp_2bit_layers: list[int] = (), **overrides: Any) -> MobileScheme:
    model_type = getattr(text_config(config), "model_type", "")
    if not model_type.startswith("gemma3"):
        raise SchemeError(f"preset gemma3 needs a Gemma 3 config, got model_type={model_type!r}")
    by_layer = {int(i): 2 for i in mlp_2bit_layers}
    by_layer.update({int(k): v for k, v in overrides.pop("mlp_bits_by_layer", {}).items()})
    if "attention_bits_by_layer" in overrides:
        overrides["attention_bits_by_layer"] = {int(k): v for k, v in overrides["attention_bits_by_layer"].items()}
    fields = dict(name="gemma3", embed_bits=2, attention_bits=4, mlp_bits=4, per_layer_bits=None)
    return MobileScheme(**{**fields, **overrides, "mlp_bits_by_layer": by_layer})


def _gemma4(config, name: str, ple_bits: int, shared_mlp_bits: int, **overrides: Any) -> MobileScheme:
    tc = text_config(config)
    if not getattr(tc, "model_type", "").startswith("gemma4"):
        raise SchemeError(f"preset {name} needs a Gemma 4 config, got model_type={tc.model_type!r}")
    shared = sorted(kv_sharing(config))
    by_layer = {i: shared_mlp_bits for i in shared}
    by_layer.update({int(k): v for k, v in overrides.pop("mlp_bits_by_layer", {}).items()})
    ple = ple_bits if getattr(tc, "hidden_size_per_layer_input", 0) else None
    fields = dict(name=name, embed_bits=2, ple_bits=ple, attention_bits=4, mlp_bits=4, per_layer_bits=8)
    return MobileScheme(**{**fields, **overrides, "mlp_bits_by_layer": by_layer})


def gemma4_e2b(config, **overrides: Any) -> MobileScheme:
    """KV-shared layers (the last `num_kv_shared_layers`, double-wide MLPs in E2B) get 2-bit MLPs."""
    return _gemma4(config, "gemma4-e2b", ple_bits=4, shared_mlp_bits=2, **overrides)


def gemma4_e4b(config, **overrides: Any) -> MobileScheme:
    return _gemma4(config, "gemma4-e4b", ple_bits=2, shared_mlp_bits=4, **overrides)


def preset(name: str, config, **overrides: Any) -> MobileScheme:
    """Build preset `name` for `config`; `overrides` are MobileScheme fields (e.g. embed_bits=4)."""
    builders = {"gemma3": gemma3, "gemma4-e2b": gemma4_e2b, "gemma4-e4b": gemma4_e4b}
    if name not in builders:
        raise SchemeError(f"unknown preset {name!r}; choose one of {PRESETS}")
    return builders[name](config, **overrides)
