"""Load-time validation of a gemma-mobile checkpoint (docs/checkpoint-format.md).

`validate_quant_config(cfg)` checks `quantization_config` (runs in `GemmaMobileConfig.from_config`);
`validate_checkpoint(dir)` additionally reads the safetensors headers and the (small) scale tensors
(runs in `GemmaMobileConfig.maybe_update_config`, i.e. at engine start before any weight is loaded).
Every failure raises `CheckpointError` naming the config field or tensor.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

SUPPORTED_WEIGHT_BITS = (2, 4, 8)


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
    gm = cfg.get("gemma_mobile")
    if not isinstance(gm, dict):
        raise CheckpointError("quantization_config.gemma_mobile: missing marker (not a gemma-mobile checkpoint)")
    if gm.get("version") != 1:
        raise CheckpointError(f"quantization_config.gemma_mobile.version = {gm.get('version')!r}: expected 1")
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
        if w.get("strategy") != "channel":
            raise CheckpointError(f"{where}.weights.strategy = {w.get('strategy')!r}: expected 'channel'")
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
    kv = gm.get("kv_cache") or {}
    for i, b in enumerate(kv.get("layer_bits") or []):
        if b not in (None, 4, 8):
            raise CheckpointError(f"quantization_config.gemma_mobile.kv_cache.layer_bits[{i}] = {b}: "
                                  "expected 4, 8 or null")


def _is_embedding_target(targets: list[str]) -> bool:
    return any("embed_tokens" in t for t in targets)


def _match(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif name == t or name.endswith("." + t) or t == name.split(".")[-1]:
            return True
    return False


def _scalar_ok(v: float) -> bool:
    return math.isfinite(v) and v > 0


def expected_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, int]] | None:
    """(N, K) per module-name suffix for Gemma 3 text configs; None for other architectures."""
    hf = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
    if hf.get("model_type") not in ("gemma3_text",):
        return None
    h, i = hf["hidden_size"], hf["intermediate_size"]
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (i, h),
            "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (hf["vocab_size"], h)}


def validate_checkpoint(model_dir: str | Path, cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full check of a local checkpoint directory; returns a small summary (counts per bit width)."""
    import torch
    from safetensors import safe_open

    model_dir = Path(model_dir)
    hf = json.loads((model_dir / "config.json").read_text())
    if cfg is None:
        cfg = hf["quantization_config"]
    want = expected_shapes(hf)
    validate_quant_config(cfg)
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
                    and mod.endswith(("proj", "embed_tokens")):
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
        exp = want.get(mod.rsplit(".", 1)[-1]) if want else None
        if exp is not None and tuple(shape) != exp:
            raise CheckpointError(f"{mod}.weight_shape = {shape}: the model config (config.json) implies "
                                  f"{list(exp)}")
        dt, pshape, _ = headers[f"{mod}.weight_packed"]
        if dt != "I32" or pshape != [n, -(-k * bits // 32)]:
            raise CheckpointError(f"{mod}.weight_packed: {dt} {pshape}, expected I32 {[n, -(-k * bits // 32)]} "
                                  f"for {bits}-bit weight_shape {shape}")
        sdt, sshape, _ = headers[f"{mod}.weight_scale"]
        if sshape not in ([n, 1], [n]):
            raise CheckpointError(f"{mod}.weight_scale: shape {sshape}, expected [{n}, 1] (per output channel)")
        ws = load(f"{mod}.weight_scale").float()
        if not torch.isfinite(ws).all():
            raise CheckpointError(f"{mod}.weight_scale: contains NaN/inf")
        if (ws <= 0).any():
            i = int((ws.reshape(-1) <= 0).nonzero()[0])
            raise CheckpointError(f"{mod}.weight_scale[{i}] = {float(ws.reshape(-1)[i])}: must be > 0")
        is_embed = mod.endswith("embed_tokens")
        if is_embed:
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
            if not _scalar_ok(float(t[0])):
                raise CheckpointError(f"{tname} = {float(t[0])}: static scales must be finite and > 0")
    kv = (cfg.get("gemma_mobile") or {}).get("kv_cache") or {}
    for i, b in enumerate(kv.get("layer_bits") or []):
        if b is None:
            continue
        for s in ("k_scale", "v_scale"):
            tname = f"model.layers.{i}.self_attn.{s}"
            if tname not in headers:
                raise CheckpointError(f"{tname}: missing (gemma_mobile.kv_cache.layer_bits[{i}] = {b})")
            v = float(load(tname).float().reshape(-1)[0])
            if not _scalar_ok(v):
                raise CheckpointError(f"{tname} = {v}: KV scales must be finite and > 0")
    return summary
