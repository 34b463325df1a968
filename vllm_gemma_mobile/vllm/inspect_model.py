"""Describe a loaded vLLM model as served by the plugin (for tests and diagnostics: `LLM.apply_model`)."""

from __future__ import annotations

from typing import Any

import torch


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """What the plugin did to `model`: table sharing, remaining float weight matrices, backends, KV scales."""
    from vllm_gemma_mobile.vllm.embedding import GemmaMobileEmbeddingMethod
    from vllm_gemma_mobile.vllm.linear import GemmaMobileLinearMethod

    inner = getattr(model, "model", model)
    emb, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    lin = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), GemmaMobileLinearMethod)]
    out: dict[str, Any] = {
        "float_2d_params": [n for n, p in model.named_parameters()
                            if p.dtype in (torch.bfloat16, torch.float16, torch.float32) and p.ndim == 2],
        "n_quant_linear": len(lin),
        "linear_backends": sorted({m.gm_backend for m in lin}),
        "linear_bits": sorted({m.quant_method.bits for m in lin}),
        "kv": [m.gm_kv for m in model.modules() if hasattr(m, "gm_kv")],
    }
    if emb is not None and isinstance(emb.quant_method, GemmaMobileEmbeddingMethod):
        src = getattr(head, "gm_source", None)
        out.update({
            "embedding_bits": emb.quant_method.bits,
            "embedding_backend": emb.gm_backend,
            "lm_head_tied_to_embedding": bool(src) and src[0] is emb,
            "lm_head_own_params": [n for n, _ in head.named_parameters(recurse=False)] if head is not None else None,
            "table_bytes": int(emb.gm_table.numel() * emb.gm_table.element_size()) if hasattr(emb, "gm_table") else None,
            "vocab_x_hidden": int(emb.num_embeddings_padded * emb.embedding_dim),
        })
    return out
