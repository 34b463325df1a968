"""Cheap variants of a mobile checkpoint that equal a full recipe re-run.

`requantize_embedding(ckpt, base, bits, out)`: the same checkpoint with the embedding table (tied lm_head)
quantized to `bits` instead. A full `quantize(..., overrides={"embed_bits": bits})` run produces the same
result: while calibrating, llmcompressor disables all fake quantization, and GPTQ never touches embeddings,
so no other module's weights or scales depend on the embedding's bit width (tests/test_quantize.py checks the
equality on a tiny model) -- except the lm_head's output scale (`lm_head_scales: both`), calibrated on the table's
own logits: such a checkpoint is refused (`lm_head_scales: input` keeps the variant exact). On the real 270M this turns a ~20-minute GPTQ run into seconds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_gemma_mobile.scheme.spec import _check_bits, weight_args

logger = logging.getLogger(__name__)
EMBED = "model.embed_tokens"


def _find(ckpt: Path, key: str) -> tuple[Path, torch.Tensor]:
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if key in f.keys():
                return shard, f.get_tensor(key)
    raise KeyError(f"{ckpt}: no tensor {key}")


def quantize_table(weight: torch.Tensor, bits: int, observer: str = "mse",
                   observer_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-row symmetric `bits` quantization of an embedding table with llmcompressor's (memoryless) observer,
    packed like compressed-tensors' pack-quantized format: weight_packed / weight_scale / weight_shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from llmcompressor.observers import Observer

    args = weight_args(bits, observer, observer_kwargs=observer_kwargs)
    name = {"mse": "memoryless_mse", "minmax": "memoryless_minmax"}.get(observer, observer)
    qparams = Observer.load_from_registry(name, base_name="weight", args=args)(weight).get_qparams()
    scale, zero_point = qparams["scale"].to(weight.dtype), qparams["zero_point"]
    q = quantize(weight, scale, zero_point, args, dtype=torch.int8)
    return {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale,
            "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def requantize_embedding(ckpt: str | Path, base: str | Path, bits: int, out: str | Path,
                         observer: str = "mse") -> Path:
    """Write OUT = CKPT with `model.embed_tokens` re-quantized to `bits` from BASE's bf16 table."""
    _check_bits(bits, "embed_bits")
    ckpt, base, out = Path(ckpt), Path(base), Path(out)
    _, table = _find(base, f"{EMBED}.weight")
    config = json.loads((ckpt / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    hits = [g for g in groups.values() if any(t.endswith("embed_tokens$") for t in g["targets"])]
    if len(hits) != 1:
        raise ValueError(f"{ckpt}: expected one config group for embed_tokens, found {len(hits)}")
    head = (config["quantization_config"].get("gemma_mobile") or {}).get("lm_head") or {}
    if head.get("output_scale") is not None:
        # The lm_head's output range was calibrated on this table's logits; the calibration inputs are gone.
        raise ValueError(f"{ckpt}: gemma_mobile.lm_head.output_scale was calibrated on the {hits[0]['weights']['num_bits']}"
                         f"-bit table's logits and cannot be re-derived here: re-run the recipe with "
                         f"--set embed_bits={bits} (or build CKPT with --set lm_head_scales=input)")
    kwargs = hits[0]["weights"].get("observer_kwargs") or {}
    new = {f"{EMBED}.{k}": v for k, v in quantize_table(table, bits, observer, kwargs).items()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    shard, _ = _find(tmp, f"{EMBED}.weight_packed")
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    tensors.update(new)
    save_file(tensors, shard, metadata=metadata)
    hits[0]["weights"]["num_bits"] = bits
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("wrote %s: embedding re-quantized to %d bits", out, bits)
    return out
