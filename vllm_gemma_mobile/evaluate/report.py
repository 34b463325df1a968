"""Size report of a model directory (bf16 or mobile checkpoint, Gemma 3 or Gemma 4): bytes on disk per
component, parameter counts, and KV-cache bytes per token. Reads the safetensors headers and config.json; a mobile
checkpoint also through its contract (`contract.read_contract`: validated, bits per module, KV bits per layer).

Components (by tensor name, first match wins):
- `scales`: quantization scales and metadata: `*weight_scale`, `*input_scale`, `*output_scale`, `*k_scale`,
  `*v_scale`, `*zero_point`, `*weight_shape`, `*g_idx`;
- `embeddings`: `embed_tokens` (+ Gemma 4 `embed_tokens_per_layer`, the PLE table) and any `lm_head` copy;
- `attention`: `.self_attn.` (q/k/v/o projections, q/k norms);
- `mlp`: `.mlp.`;
- `other`: everything else (layer norms, final norm, Gemma 4 per-layer gates/projections, layer scalars).
`sum(components) == tensor_bytes`; `safetensors_bytes = tensor_bytes + header_bytes` (file sizes).

Parameters are logical weights: a packed `weight_packed` counts `prod(weight_shape)`; scales are not parameters.

KV bytes per token: for each layer that owns a cache (Gemma 4 KV-shared layers own none), K and V of
`kv_heads * head_dim` values at `bits` (mobile: `gemma_mobile.kv_cache.layer_bits`, bf16: 16); full-attention
layers use `global_head_dim` / `num_global_key_value_heads` when the config has them, and Gemma 4's
`per_layer_config[i]` (`head_dim`, `num_key_value_heads`) overrides both. Static
per-tensor KV scales add no per-token bytes. Sliding layers hold at most `sliding_window` tokens, so
`kv_bytes_at_context[N] = full_bytes_per_token * N + sliding_bytes_per_token * min(N, sliding_window)`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPONENTS = ("embeddings", "attention", "mlp", "other", "scales")
_SCALE = re.compile(r"(weight_scale|input_scale|output_scale|k_scale|v_scale|zero_point|weight_shape|g_idx)$")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
CONTEXTS = (512, 4096, 32768)


def component_of(name: str) -> str:
    """The report component of a tensor name (see module docstring)."""
    if _SCALE.search(name):
        return "scales"
    if "embed_tokens" in name or name.startswith("lm_head") or ".lm_head." in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries {name: {dtype, shape, data_offsets}}, header bytes incl. the 8-byte length)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _weight_shapes(model_dir: Path, names: list[str]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if k.endswith(".weight_shape") and k in names:
                    shapes[k] = [int(v) for v in st.get_tensor(k).tolist()]
    return shapes


def kv_cache_report(config: dict) -> dict[str, Any]:
    """KV bytes per token by layer type (and bit width), vs bf16, from a config.json dict."""
    text = config.get("text_config", config)
    qc = config.get("quantization_config") or {}
    meta = (qc.get("gemma_mobile") or {}).get("kv_cache") or {}
    n_layers = text["num_hidden_layers"]
    layer_types = text.get("layer_types") or ["full_attention"] * n_layers
    shared = int(text.get("num_kv_shared_layers") or 0)
    sharing = {int(k) for k in (meta.get("kv_sharing") or {})}
    owners = [i for i in range(n_layers) if i < n_layers - shared and i not in sharing]
    bits = meta.get("layer_bits") or [16] * n_layers
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
    groups: dict[str, dict[str, Any]] = {}
    for i in owners:
        t = layer_types[i]
        b = bits[i]
        if b is None:
            raise ValueError(f"layer {i} owns a KV cache but kv_cache.layer_bits[{i}] is null")
        full = t == "full_attention"
        hd = (text.get("global_head_dim") or head_dim) if full else head_dim
        kvh = (text.get("num_global_key_value_heads") or kv_heads) if full else kv_heads
        per_layer = (text.get("per_layer_config") or {}).get(str(i)) or {}  # Gemma 4 (transformers >= 5.17)
        hd = per_layer.get("head_dim") or hd
        kvh = per_layer.get("num_key_value_heads") or kvh
        key = t if not meta else f"{t}@int{b}"
        g = groups.setdefault(key, {"layer_type": t, "bits": b, "layers": [], "kv_heads": kvh, "head_dim": hd,
                                    "bytes_per_token_per_layer": 2 * kvh * hd * b / 8,
                                    "bf16_bytes_per_token_per_layer": 2 * kvh * hd * 2})
        if (g["kv_heads"], g["head_dim"]) != (kvh, hd):
            raise ValueError(f"layer {i}: KV shape differs from other {t} layers")
        g["layers"].append(i)
    for g in groups.values():
        g["bytes_per_token"] = g["bytes_per_token_per_layer"] * len(g["layers"])
        g["bf16_bytes_per_token"] = g["bf16_bytes_per_token_per_layer"] * len(g["layers"])
    window = text.get("sliding_window")

    def at(n: int, field: str) -> float:
        return sum(g[field] * (min(n, window) if g["layer_type"] == "sliding_attention" and window else n)
                   for g in groups.values())

    total = sum(g["bytes_per_token"] for g in groups.values())
    total_bf16 = sum(g["bf16_bytes_per_token"] for g in groups.values())
    return {
        "layers_with_cache": owners,
        "groups": groups,
        "bytes_per_token": total,
        "bf16_bytes_per_token": total_bf16,
        "ratio_vs_bf16": total / total_bf16 if total_bf16 else None,
        "sliding_window": window,
        "kv_bytes_at_context": {str(n): at(n, "bytes_per_token") for n in CONTEXTS},
        "bf16_kv_bytes_at_context": {str(n): at(n, "bf16_bytes_per_token") for n in CONTEXTS},
    }


def report(model_dir: str | Path) -> dict[str, Any]:
    """Bytes per component, parameter counts and KV bytes/token of the model at `model_dir` (JSON-serializable)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    by_comp: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    params: dict[str, int] = dict.fromkeys(COMPONENTS[:-1], 0)
    tensors: dict[str, tuple[str, list[int], int]] = {}
    header_bytes = 0
    for f in files:
        header, hb = read_safetensors_header(f)
        header_bytes += hb
        for name, e in header.items():
            nbytes = e["data_offsets"][1] - e["data_offsets"][0]
            expect = math.prod(e["shape"]) * _DTYPE_BYTES.get(e["dtype"], 0)
            if _DTYPE_BYTES.get(e["dtype"]) and nbytes != expect:
                raise ValueError(f"{f.name}:{name}: {nbytes} bytes on disk, {expect} expected from its shape")
            tensors[name] = (e["dtype"], e["shape"], nbytes)
            by_comp[component_of(name)] += nbytes
    shapes = _weight_shapes(model_dir, [n for n in tensors if n.endswith(".weight_shape")])
    dtypes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for name, (dtype, shape, nbytes) in tensors.items():
        comp = component_of(name)
        dtypes[comp][dtype] += nbytes
        if comp == "scales":
            continue
        if name.endswith(".weight_packed"):
            params[comp] += math.prod(shapes[name.removesuffix("_packed") + "_shape"])
        else:
            params[comp] += math.prod(shape)
    tensor_bytes = sum(by_comp.values())
    safetensors_bytes = sum(f.stat().st_size for f in files)
    total_params = sum(params.values())
    text = config.get("text_config", config)
    qc = config.get("quantization_config")
    result = {
        "model": str(model_dir),
        "model_type": text.get("model_type", config.get("model_type")),
        "kind": "mobile" if (qc or {}).get("gemma_mobile") else ("compressed-tensors" if qc else "bf16"),
        "bytes": by_comp,
        "tensor_bytes": tensor_bytes,
        "header_bytes": header_bytes,
        "safetensors_bytes": safetensors_bytes,
        "dir_bytes": sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()),
        "bytes_by_dtype": {k: dict(v) for k, v in dtypes.items()},
        "parameters": params | {"total": total_params},
        "bits_per_parameter": {k: (8 * (by_comp[k]) / params[k] if params[k] else None) for k in params}
        | {"total_incl_scales": 8 * tensor_bytes / total_params if total_params else None},
        "bf16_bytes": 2 * total_params,
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        "kv_cache": kv_cache_report(config),
    }
    if result["kind"] == "mobile":  # bits per module and KV layers as the plugin reads them (validated)
        from vllm_gemma_mobile.contract import read_contract

        contract = read_contract(model_dir)
        result["quantized_modules"] = contract.summary()
        result["kv_cache"]["layer_bits"] = contract.kv_layer_bits
        result["kv_cache"]["kv_source_layer"] = [k.source for k in contract.kv]
    if safetensors_bytes != tensor_bytes + header_bytes:
        raise ValueError(f"{model_dir}: safetensors files hold {safetensors_bytes} bytes, headers+tensors "
                         f"{header_bytes + tensor_bytes}")
    return result
