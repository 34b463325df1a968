"""What a correct mobile checkpoint needs after calibration, run by the modifiers' own lifecycle.

`finalize(model, metadata)` (from the modifiers' `on_finalize`, i.e. inside `llmcompressor.oneshot` before it
saves): drop k/v scales of layers without their own KV cache (Gemma 4 KV-shared), check every scale
(finite, > 0; `QuantizeError` names the first bad tensor and nothing is saved), re-tie the lm_head to the
quantized embedding table, and wrap `model.save_pretrained` (already wrapped by llmcompressor for compression)
so that every save — oneshot's `output_dir`, or a later `model.save_pretrained(dir)` — also writes our
`quantization_config.gemma_mobile` key (`kv_cache_scheme: null`) and drops the dense lm_head copy that
llmcompressor writes next to the packed table.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SCALE_SUFFIXES = ("weight_scale", "input_scale", "output_scale", "k_scale", "v_scale")


class QuantizeError(RuntimeError):
    """The recipe ran but produced something we must not save (e.g. an uncalibrated scale)."""


def check_scales(model: torch.nn.Module) -> int:
    """Every quantization scale must be finite and > 0; raises QuantizeError naming the first bad tensor."""
    from kernels.scales import invalid_scales

    n = 0
    for name, param in model.named_parameters():
        if not name.endswith(SCALE_SUFFIXES):
            continue
        n += 1
        bad = invalid_scales(param.detach().float())
        if bad:
            raise QuantizeError(f"{name}: calibration produced an invalid scale {bad} (must be finite and > 0); "
                                "nothing was saved")
    return n


def retie_embeddings(model) -> None:
    """llmcompressor unties lm_head from a targeted embedding; tie it back so one table is saved."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight = emb.weight
    model.config.tie_word_embeddings = True
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = True


def drop_kv_scales_without_cache(model: torch.nn.Module, layer_bits: list[int | None]) -> None:
    """Layers without their own KV cache (Gemma 4 KV-shared) must not carry k/v scales."""
    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)\.self_attn$", name)
        if m and layer_bits[int(m.group(1))] is None:
            for attr in ("k_scale", "v_scale"):
                if hasattr(module, attr):
                    delattr(module, attr)


def finalize_config(out: Path, metadata: dict) -> None:
    """Move the KV scheme out of compressed-tensors' key (upstream vLLM rejects int KV schemes) into ours."""
    path = Path(out) / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    qc["kv_cache_scheme"] = None
    qc["gemma_mobile"] = metadata
    config.setdefault("tie_word_embeddings", True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def drop_tied_lm_head(ckpt: Path) -> list[str]:
    """Remove a saved `lm_head.*` copy from a checkpoint whose config ties it to the embedding table.

    llmcompressor unties lm_head when the embedding is quantized and saves lm_head.weight as a dense bf16
    copy (for Gemma 3 270M: 335 MB next to a 42 MB 2-bit table) even after re-tying. The tied lm_head is
    served from the quantized table, so the copy is dropped. Returns the dropped tensor names.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = Path(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    text = config.get("text_config", config)
    if not (config.get("tie_word_embeddings", True) and text.get("tie_word_embeddings", True)):
        return []
    dropped = []
    index_path = ckpt / "model.safetensors.index.json"
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys = list(f.keys())
            drop = [k for k in keys if k.startswith("lm_head.") or ".lm_head." in k]
            if not drop:
                continue
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in keys if k not in drop}
        save_file(tensors, shard, metadata=metadata)
        dropped += drop
    if dropped and index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in dropped}
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    if dropped:
        logger.info("dropped the untied lm_head copy %s (tied to the quantized embedding table)", dropped)
    return dropped


def install_save_hook(model, metadata: dict) -> None:
    """Wrap `model.save_pretrained` so each save writes a complete mobile checkpoint (see module docstring).

    Idempotent (re-wrapping replaces the metadata). A save with `save_compressed=False` would write dense
    weights, which is not the mobile format: it raises instead of writing a wrong file."""
    inner = getattr(model.save_pretrained, "_gemma_mobile_inner", model.save_pretrained)
    if not getattr(inner, "_overridden", False):
        raise QuantizeError("model.save_pretrained is not llmcompressor's compressing save; run the recipe through "
                            "llmcompressor.oneshot (it wraps save_pretrained) before saving a mobile checkpoint")

    @functools.wraps(inner)
    def save_pretrained(save_directory, *args, save_compressed: bool = True, **kwargs):
        if not save_compressed:
            raise QuantizeError("gemma-mobile checkpoints are saved packed: call save_pretrained(dir) with "
                                "save_compressed=True (the default)")
        inner(save_directory, *args, save_compressed=True, **kwargs)
        finalize_config(Path(save_directory), metadata)
        drop_tied_lm_head(Path(save_directory))

    save_pretrained._gemma_mobile_inner = inner
    save_pretrained.gemma_mobile_metadata = metadata  # what every save writes (read by tests before saving)
    save_pretrained._overridden = True
    model.save_pretrained = save_pretrained


def finalize(model: torch.nn.Module, metadata: dict) -> None:
    """Everything between calibration and save (see module docstring); raises QuantizeError on a bad scale."""
    drop_kv_scales_without_cache(model, metadata["kv_cache"]["layer_bits"])
    check_scales(model)
    retie_embeddings(model)
    install_save_hook(model, metadata)
