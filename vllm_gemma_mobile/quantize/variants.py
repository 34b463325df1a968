"""Cheap variants of a mobile checkpoint that equal a full recipe re-run.

`requantize_embedding(ckpt, base, bits, out)`: the same checkpoint with the embedding table (tied lm_head)
quantized to `bits` instead. A full `quantize(..., overrides={"embed_bits": bits})` run produces the same
result: while calibrating, llmcompressor disables all fake quantization, and GPTQ never touches embeddings,
so no other module's weights or scales depend on the embedding's bit width (tests/test_quantize.py checks the
equality on a tiny model) -- except the lm_head's output scale (`lm_head_scales: both`), calibrated on the table's
own logits: such a checkpoint is refused (`lm_head_scales: input` keeps the variant exact). On the real 270M this turns a ~20-minute GPTQ run into seconds.

`gptq_table(ckpt, base, out)`: the same checkpoint with the tied table re-quantized by GPTQ (llmcompressor's own
`quantize_weight`, the recipe's MSE-clipped per-row scales) against the lm_head's input statistics: the Hessian
of the final-norm hidden states of BASE (bf16 model) on the calibration split. It trades the table's plain row
error (embedding role) for the lm_head's output error; measured on the real 270M in the README (issue 9). The
lm_head keeps its input scale; its output scale, calibrated on the old table's logits, is dropped.
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


def _replace_tensors(ckpt: Path, new: dict[str, torch.Tensor]) -> None:
    """Overwrite the tensors NEW (same names, in whichever shard holds each) of the checkpoint at CKPT; the dtype of
    each stored tensor is kept."""
    left = dict(new)
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            if not left.keys() & set(f.keys()):
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        for k in left.keys() & tensors.keys():
            tensors[k] = left.pop(k).to(tensors[k].dtype).contiguous()
        save_file(tensors, shard, metadata=metadata)
    if left:
        raise KeyError(f"{ckpt}: no tensors {sorted(left)}")


def _embed_weights(ckpt: Path, config: dict) -> dict:
    """The `weights` args (a live reference into CONFIG) of the one config group of `embed_tokens`."""
    groups = config["quantization_config"]["config_groups"]
    hits = [g for g in groups.values() if any(t.endswith("embed_tokens$") for t in g["targets"])]
    if len(hits) != 1:
        raise ValueError(f"{ckpt}: expected one config group for embed_tokens, found {len(hits)}")
    return hits[0]["weights"]


def _write_variant(ckpt: Path, out: Path, config: dict, new: dict[str, torch.Tensor]) -> Path:
    """OUT = a copy of CKPT with the tensors NEW and CONFIG, written to OUT.tmp and renamed when complete. The
    copy drops CKPT's build key: a variant is not the recipe's output (`quantize(reuse=True)` must not take it)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    (tmp / ".gemma_mobile_build_key").unlink(missing_ok=True)
    _replace_tensors(tmp, new)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def weight_qparams(weight: torch.Tensor, bits: int, observer: str = "mse", observer_kwargs: dict | None = None):
    """(args, scale, zero_point): per-row symmetric `bits` scales of `weight` by llmcompressor's memoryless
    observer (`mse` / `minmax`), the scale in the weight's dtype - the recipe's round-to-nearest weight rule."""
    from llmcompressor.observers import Observer

    args = weight_args(bits, observer, observer_kwargs=observer_kwargs)
    name = {"mse": "memoryless_mse", "minmax": "memoryless_minmax"}.get(observer, observer)
    qparams = Observer.load_from_registry(name, base_name="weight", args=args)(weight).get_qparams()
    return args, qparams["scale"].to(weight.dtype), qparams["zero_point"]


def quantize_table(weight: torch.Tensor, bits: int, observer: str = "mse",
                   observer_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-row symmetric `bits` quantization of an embedding table with llmcompressor's (memoryless) observer,
    packed like compressed-tensors' pack-quantized format: weight_packed / weight_scale / weight_shape."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize

    args, scale, zero_point = weight_qparams(weight, bits, observer, observer_kwargs)
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
    w = _embed_weights(ckpt, config)
    head = (config["quantization_config"].get("gemma_mobile") or {}).get("lm_head") or {}
    if head.get("output_scale") is not None:
        # The lm_head's output range was calibrated on this table's logits; the calibration inputs are gone.
        raise ValueError(f"{ckpt}: gemma_mobile.lm_head.output_scale was calibrated on the {w['num_bits']}"
                         f"-bit table's logits and cannot be re-derived here: re-run the recipe with "
                         f"--set embed_bits={bits} (or build CKPT with --set lm_head_scales=input)")
    new = {f"{EMBED}.{k}": v for k, v in quantize_table(table, bits, observer, w.get("observer_kwargs") or {}).items()}
    w["num_bits"] = bits
    _write_variant(ckpt, out, config, new)
    logger.info("wrote %s: embedding re-quantized to %d bits", out, bits)
    return out


def gptq_table(ckpt: str | Path, base: str | Path, out: str | Path, num_samples: int = 128, seq_len: int = 512,
               dampening_frac: float = 0.01) -> Path:
    """Write OUT = CKPT with `model.embed_tokens` re-quantized by GPTQ on the lm_head's input statistics (module
    docstring); the table keeps CKPT's bit width and observer, and `gemma_mobile.lm_head` keeps only its
    input scale."""
    from llmcompressor.modifiers.gptq.gptq_quantize import accumulate_hessian, make_empty_hessian, quantize_weight
    from llmcompressor.observers import Observer
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels import bitpack
    from vllm_gemma_mobile.quantize.run import calibration_token_ids

    ckpt, base, out = Path(ckpt), Path(base), Path(out)
    config = json.loads((ckpt / "config.json").read_text())
    w = _embed_weights(ckpt, config)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    if head is None or head.weight is not model.get_input_embeddings().weight:
        raise ValueError(f"{base}: the lm_head is not tied to the embedding table")
    tokenizer = AutoTokenizer.from_pretrained(base)
    hessian, n = make_empty_hessian(head, "cpu"), 0
    with torch.no_grad():
        for ids in tqdm(calibration_token_ids(tokenizer, num_samples, seq_len), desc="lm_head input statistics"):
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state  # final-norm output
            hessian, n = accumulate_hessian(hidden, head, hessian, n)
    args = weight_args(w["num_bits"], "mse", observer_kwargs=w.get("observer_kwargs") or {})
    table = torch.nn.Module()
    table.weight = torch.nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)  # as in BASE
    table.weight_observer = Observer.load_from_registry("memoryless_mse", base_name="weight", args=args)
    table.weight_observer(table.weight)  # the recipe's per-row scales
    del model
    loss, qp = quantize_weight(table, args, hessian, percdamp=dampening_frac)
    scale = qp["weight_scale"].reshape(-1, 1)
    codes = torch.round(qp["weight"].float() / scale.float()).to(torch.int8)
    logger.info("GPTQ of the table on %d lm_head inputs: loss %.4g", n, loss)
    new = {f"{EMBED}.weight_packed": bitpack.ct_pack(codes, w["num_bits"]),  # checks the code range
           f"{EMBED}.weight_scale": scale}
    meta = config["quantization_config"]["gemma_mobile"]
    if (meta.get("lm_head") or {}).get("input_scale") is not None:
        meta["lm_head"] = {"input_scale": meta["lm_head"]["input_scale"]}
    else:
        meta.pop("lm_head", None)
    _write_variant(ckpt, out, config, new)
    logger.info("wrote %s: table re-quantized by GPTQ on the lm_head's input statistics", out)
    return out
