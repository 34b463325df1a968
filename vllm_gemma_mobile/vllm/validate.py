"""Load-time validation of a gemma-mobile checkpoint (docs/checkpoint-format.md).

`validate_quant_config(cfg)` checks `quantization_config` (runs in `GemmaMobileConfig.from_config`);
`validate_checkpoint(dir)` additionally reads the safetensors headers and the (small) scale tensors
(runs in `GemmaMobileConfig.maybe_update_config`, i.e. at engine start before any weight is loaded).
Every failure raises `CheckpointError` naming the config field or tensor.

Weight strategies: `channel` (one scale per output row) everywhere; `group` (one scale per row and block of
`group_size` columns) only for Gemma 4's per-layer-embedding table `embed_tokens_per_layer`, which is only
gathered (never a matmul operand or lm_head). Shapes are checked against the model config for Gemma 3 and
Gemma 4 (sliding vs global head dims, double-wide MLPs in KV-shared layers, PLE table width =
num_hidden_layers * hidden_size_per_layer_input), and for Gemma 4 the KV metadata against its KV sharing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from kernels import bitpack

SUPPORTED_WEIGHT_BITS = bitpack.SUPPORTED_BITS


class CheckpointError(ValueError):
    """A gemma-mobile checkpoint that the plugin refuses to serve."""


def _args(group: dict, key: str) -> dict | None:
    a = group.get(key)
    return a if a else None


def validate_quant_config(cfg: dict[str, Any]) -> None:
    """Config-level checks: supported bits/types/strategies, static int8 activations, format, marker."""
    if cfg.get("quant_method") != "compressed-tensors":
        raise CheckpointError(f"quantization_config.quant_method = {cfg.get('quant_method')!r}: expected "
                              "'compressed-tensors'")
    from vllm_gemma_mobile.metadata import MetadataError, parse_metadata

    try:
        parse_metadata(cfg.get("gemma_mobile"))
    except MetadataError as e:
        raise CheckpointError(str(e)) from None
    if cfg.get("kv_cache_scheme"):
        raise CheckpointError("quantization_config.kv_cache_scheme must be null in a gemma-mobile checkpoint "
                              "(per-layer KV bits live in quantization_config.gemma_mobile.kv_cache)")
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise CheckpointError("quantization_config.config_groups: empty")
    for name, g in groups.items():
        where = f"quantization_config.config_groups.{name}"
        w = _args(g, "weights")
        if w is None:
            raise CheckpointError(f"{where}.weights: missing (activation-only groups are not supported)")
        if w.get("num_bits") not in SUPPORTED_WEIGHT_BITS:
            raise CheckpointError(f"{where}.weights.num_bits = {w.get('num_bits')}: supported {SUPPORTED_WEIGHT_BITS}")
        if w.get("type", "int") != "int":
            raise CheckpointError(f"{where}.weights.type = {w.get('type')!r}: expected 'int'")
        if not w.get("symmetric", True):
            raise CheckpointError(f"{where}.weights.symmetric = false: only symmetric weights are supported")
        targets = list(g.get("targets") or [])
        if w.get("strategy") == "group":
            if not targets or not all(_is_ple_target(t) for t in targets):
                raise CheckpointError(f"{where}.weights.strategy = 'group': supported only for the per-layer "
                                      f"embedding table (embed_tokens_per_layer), but the group targets {targets}")
            gs = w.get("group_size")
            if not isinstance(gs, int) or gs <= 0:
                raise CheckpointError(f"{where}.weights.group_size = {gs!r}: expected a positive integer")
            if _args(g, "input_activations") or _args(g, "output_activations"):
                raise CheckpointError(f"{where}: embedding tables are weight-only (no activation quantization)")
        elif w.get("strategy") != "channel":
            raise CheckpointError(f"{where}.weights.strategy = {w.get('strategy')!r}: expected 'channel' "
                                  "('group' only for embed_tokens_per_layer)")
        if w.get("dynamic"):
            raise CheckpointError(f"{where}.weights.dynamic = {w.get('dynamic')!r}: expected false")
        fmt = g.get("format") or cfg.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"{where}.format = {fmt!r}: expected 'pack-quantized'")
        acts = [k for k in ("input_activations", "output_activations") if _args(g, k) is not None]
        if acts and acts != ["input_activations", "output_activations"] and acts != ["input_activations"]:
            raise CheckpointError(f"{where}: output_activations without input_activations is not supported")
        for key in acts:
            a = g[key]
            if a.get("dynamic", False) is not False:
                raise CheckpointError(f"{where}.{key}.dynamic = {a.get('dynamic')!r}: only static "
                                      "(calibrated) activation scales are supported")
            if a.get("num_bits") != 8 or a.get("type", "int") != "int" or not a.get("symmetric", True):
                raise CheckpointError(f"{where}.{key}: expected symmetric int 8-bit, got "
                                      f"num_bits={a.get('num_bits')} type={a.get('type')} "
                                      f"symmetric={a.get('symmetric')}")
            if a.get("strategy") != "tensor":
                raise CheckpointError(f"{where}.{key}.strategy = {a.get('strategy')!r}: expected 'tensor'")


def _is_ple_target(target: str) -> bool:
    return "embed_tokens_per_layer" in target


EMBEDDINGS = ("embed_tokens", "embed_tokens_per_layer")


def _match(name: str, targets: list[str]) -> bool:
    """compressed-tensors' own name rule (`re:` regex match or exact name), as its loader and our converter apply
    it; class-name targets need the module and cannot match a tensor name."""
    from compressed_tensors.utils.match import match_name

    return any(match_name(name, t) for t in targets)


_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.|model\.)")


def text_module_name(mod: str) -> str:
    """Checkpoint module name relative to the text model: `model.layers.3.mlp.up_proj` -> `layers.3.mlp.up_proj`
    (also for the multimodal `model.language_model.` prefix)."""
    return _TEXT_PREFIX.sub("", mod, count=1)


def _text_config(hf: dict[str, Any]) -> dict[str, Any]:
    return hf.get("text_config", hf) if hf.get("model_type") in ("gemma3", "gemma4") else hf


def gemma4_kv_sharing(text: dict[str, Any]) -> dict[int, int]:
    """KV-shared layer -> layer whose cache it reads (last earlier non-shared layer of the same type), as
    vLLM's Gemma4Attention and transformers build it."""
    from vllm_gemma_mobile.evaluate.reference import default_kv_sharing

    return default_kv_sharing(text)


def _gemma4_layer_dims(model_dir: Path | None, hf: dict[str, Any]) -> list[tuple[int, int]]:
    """(head_dim, num_kv_heads) per layer, from transformers' `per_layer_config` (what vLLM's gemma4.py reads;
    sliding layers `head_dim`, global ones `global_head_dim` / `num_global_key_value_heads`)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir) if model_dir is not None else AutoConfig.for_model(**hf)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return [(int(cfg.per_layer_config[i].head_dim), int(cfg.per_layer_config[i].num_key_value_heads))
            for i in range(cfg.num_hidden_layers)]


def expected_shapes(hf: dict[str, Any], model_dir: str | Path | None = None) -> dict[str, tuple[int, int]] | None:
    """(N, K) per module name relative to the text model (`text_module_name`), for Gemma 3 and Gemma 4 text
    configs; None for other architectures (no shape check)."""
    text = _text_config(hf)
    mt = text.get("model_type")
    if mt not in ("gemma3_text", "gemma4_text"):
        return None
    h, inter, n_layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    out: dict[str, tuple[int, int]] = {"embed_tokens": (text["vocab_size"], h)}
    if mt == "gemma3_text":
        dims = [(text["head_dim"], text["num_key_value_heads"])] * n_layers
        first_shared, wide, k_eq_v = n_layers, False, False
    else:
        if text.get("enable_moe_block") or text.get("num_experts"):
            raise CheckpointError("config.json: Gemma 4 MoE (num_experts / enable_moe_block) is not supported "
                                  "by the gemma_mobile plugin")
        dims = _gemma4_layer_dims(Path(model_dir) if model_dir else None, hf)
        first_shared = n_layers - int(text.get("num_kv_shared_layers") or 0)
        wide = bool(text.get("use_double_wide_mlp"))
        k_eq_v = bool(text.get("attention_k_eq_v"))
        ple = int(text.get("hidden_size_per_layer_input") or 0)
        if ple:
            out["embed_tokens_per_layer"] = (text.get("vocab_size_per_layer_input") or text["vocab_size"],
                                             n_layers * ple)
            out["per_layer_model_projection"] = (n_layers * ple, h)
    types = text.get("layer_types") or ["full_attention"] * n_layers
    for i, (hd, kvh) in enumerate(dims):
        p = f"layers.{i}."
        out[p + "self_attn.q_proj"] = (heads * hd, h)
        out[p + "self_attn.o_proj"] = (h, heads * hd)
        if i < first_shared:  # KV-shared layers have no k/v projections (vLLM drops them)
            out[p + "self_attn.k_proj"] = (kvh * hd, h)
            if not (k_eq_v and types[i] == "full_attention"):
                out[p + "self_attn.v_proj"] = (kvh * hd, h)
        li = inter * (2 if wide and 0 < first_shared <= i else 1)
        out[p + "mlp.gate_proj"] = (li, h)
        out[p + "mlp.up_proj"] = (li, h)
        out[p + "mlp.down_proj"] = (h, li)
        if mt == "gemma4_text" and ple:
            out[p + "per_layer_input_gate"] = (ple, h)
            out[p + "per_layer_projection"] = (h, ple)
    return out


def validate_checkpoint(model_dir: str | Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full check of a local checkpoint directory; returns a small summary (counts per bit width)."""
    import torch
    from safetensors import safe_open

    from kernels.scales import invalid_scale_mask, invalid_scales

    model_dir = Path(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    if cfg is None:
        cfg = hf["quantization_config"]
    validate_quant_config(cfg)
    want = expected_shapes(hf, model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    headers: dict[str, tuple[str, list[int], Path]] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                headers[k] = (sl.get_dtype(), list(sl.get_shape()), f)

    def load(name: str) -> "torch.Tensor":
        with safe_open(str(headers[name][2]), "pt") as fh:
            return fh.get_tensor(name)

    groups = list((cfg.get("config_groups") or {}).values())
    ignore = cfg.get("ignore") or []
    modules = sorted({k.rsplit(".", 1)[0] for k in headers if k.endswith(".weight_packed")})
    plain = {k.rsplit(".", 1)[0] for k in headers if k.endswith(".weight")}
    summary: dict[str, Any] = {"linear": {}, "embedding": None}
    for g in groups:
        for mod in sorted(plain):
            if mod not in modules and _match(mod, g.get("targets", [])) and not _match(mod, ignore) \
                    and mod.endswith(("proj", "gate") + EMBEDDINGS):
                raise CheckpointError(f"{mod}.weight: module is targeted by a quantization group but stored "
                                      "unpacked (expected weight_packed / weight_scale / weight_shape)")
    for mod in modules:
        group = next((g for g in groups if _match(mod, g.get("targets", []))), None)
        if group is None:
            raise CheckpointError(f"{mod}.weight_packed: no quantization_config.config_groups entry targets it")
        bits = group["weights"]["num_bits"]
        for suffix in ("weight_scale", "weight_shape"):
            if f"{mod}.{suffix}" not in headers:
                raise CheckpointError(f"{mod}.{suffix}: missing tensor")
        shape = load(f"{mod}.weight_shape").tolist()
        if len(shape) != 2:
            raise CheckpointError(f"{mod}.weight_shape = {shape}: expected (N, K)")
        n, k = shape
        exp = want.get(text_module_name(mod)) if want else None
        if want is not None and exp is None and text_module_name(mod).startswith("layers."):
            raise CheckpointError(f"{mod}.weight_packed: the model config (config.json) has no such module "
                                  "(e.g. k/v projections of a KV-shared Gemma 4 layer)")
        if exp is not None and tuple(shape) != exp:
            raise CheckpointError(f"{mod}.weight_shape = {shape}: the model config (config.json) implies "
                                  f"{list(exp)}")
        dt, pshape, _ = headers[f"{mod}.weight_packed"]
        if dt != "I32" or pshape != [n, -(-k * bits // 32)]:
            raise CheckpointError(f"{mod}.weight_packed: {dt} {pshape}, expected I32 {[n, -(-k * bits // 32)]} "
                                  f"for {bits}-bit weight_shape {shape}")
        sdt, sshape, _ = headers[f"{mod}.weight_scale"]
        w = group["weights"]
        if w.get("strategy") == "group":
            if not mod.endswith("embed_tokens_per_layer"):
                raise CheckpointError(f"{mod}: group-wise weight scales are supported only for "
                                      "embed_tokens_per_layer")
            gs = w["group_size"]
            if k % gs:
                raise CheckpointError(f"{mod}.weight_scale: group_size {gs} does not divide the row width {k}")
            if sshape != [n, k // gs]:
                raise CheckpointError(f"{mod}.weight_scale: shape {sshape}, expected [{n}, {k // gs}] (one scale "
                                      f"per row and block of group_size={gs})")
        elif sshape not in ([n, 1], [n]):
            raise CheckpointError(f"{mod}.weight_scale: shape {sshape}, expected [{n}, 1] (per output channel)")
        ws = load(f"{mod}.weight_scale").float().reshape(-1)
        bad = invalid_scale_mask(ws)
        if bad.any():
            i = int(bad.nonzero()[0])
            if not math.isfinite(float(ws[i])):
                raise CheckpointError(f"{mod}.weight_scale: contains NaN/inf")
            raise CheckpointError(f"{mod}.weight_scale[{i}] = {float(ws[i])}: must be > 0")
        if mod.endswith(EMBEDDINGS):
            if mod.endswith("embed_tokens_per_layer"):
                summary["per_layer_embedding"] = bits
            else:
                summary["embedding"] = bits
            if _args(group, "input_activations"):
                raise CheckpointError(f"{mod}: embedding group has input_activations (embeddings are weight-only)")
            continue
        summary["linear"][bits] = summary["linear"].get(bits, 0) + 1
        for key, scale in (("input_activations", "input_scale"), ("output_activations", "output_scale")):
            if _args(group, key) is None:
                if key == "input_activations":
                    raise CheckpointError(f"{mod}: its group has no input_activations; gemma-mobile linears are "
                                          "wNa8o8 (static int8 input and output)")
                continue
            tname = f"{mod}.{scale}"
            if tname not in headers:
                raise CheckpointError(f"{tname}: missing tensor (static {key} declared by its group)")
            t = load(tname).float().reshape(-1)
            if t.numel() != 1:
                raise CheckpointError(f"{tname}: shape {headers[tname][1]}, expected a per-tensor scale [1]")
            if invalid_scales(float(t[0])):
                raise CheckpointError(f"{tname} = {float(t[0])}: static scales must be finite and > 0")
    kv = (cfg.get("gemma_mobile") or {}).get("kv_cache") or {}
    layer_bits = kv.get("layer_bits")
    text = _text_config(hf)
    sharing = gemma4_kv_sharing(text) if text.get("model_type") == "gemma4_text" else {}
    if layer_bits is not None:
        n_layers = text.get("num_hidden_layers")
        if n_layers is not None and len(layer_bits) != n_layers:
            raise CheckpointError(f"quantization_config.gemma_mobile.kv_cache.layer_bits: {len(layer_bits)} entries "
                                  f"for {n_layers} decoder layers")
        if kv.get("kv_sharing") is not None:
            declared = {int(a): int(b) for a, b in kv["kv_sharing"].items()}
            if declared != sharing:
                raise CheckpointError(f"quantization_config.gemma_mobile.kv_cache.kv_sharing = {kv['kv_sharing']}: "
                                      f"the model config implies {sharing}")
        quantized_kv = any(b is not None for b in layer_bits)
        for i, b in enumerate(layer_bits):
            if i in sharing and b is not None:
                raise CheckpointError(f"quantization_config.gemma_mobile.kv_cache.layer_bits[{i}] = {b}: layer {i} "
                                      f"is KV-shared (reads layer {sharing[i]}'s cache); expected null")
            if i not in sharing and b is None and quantized_kv:
                raise CheckpointError(f"quantization_config.gemma_mobile.kv_cache.layer_bits[{i}] = null: layer {i} "
                                      "owns a KV cache")
    by_text_name = {text_module_name(k): k for k in headers}  # `layers.i...` -> its name in this checkpoint
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in headers) else "model."
    for i, src in sharing.items():
        for s in ("k_scale", "v_scale"):
            if (tname := by_text_name.get(f"layers.{i}.self_attn.{s}")) is not None:
                raise CheckpointError(f"{tname}: layer {i} is KV-shared (reads layer {src}'s cache and scales); "
                                      "it must not carry KV scales of its own")
    for i, b in enumerate(layer_bits or []):
        if b is None:
            continue
        for s in ("k_scale", "v_scale"):
            tname = by_text_name.get(f"layers.{i}.self_attn.{s}")
            if tname is None:
                raise CheckpointError(f"{prefix}layers.{i}.self_attn.{s}: missing "
                                      f"(gemma_mobile.kv_cache.layer_bits[{i}] = {b})")
            v = float(load(tname).float().reshape(-1)[0])
            if invalid_scales(v):
                raise CheckpointError(f"{tname} = {v}: KV scales must be finite and > 0")
    return summary
