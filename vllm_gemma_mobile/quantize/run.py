"""Run a mobile recipe with llmcompressor and write a standard compressed-tensors checkpoint.

`quantize(base, recipe, out)`: oneshot calibration (GPTQ / RTN weights, static activation and KV scales) on
the fixed Shakespeare calibration split, then the fix-ups llmcompressor 0.12 needs (workarounds.py), then save:
pack-quantized 2/4/8-bit weights, ONE packed embedding table serving the tied lm_head, static int8
`input_scale` / `output_scale`, per-layer `k_scale` / `v_scale`, our `gemma_mobile` config key, tokenizer.
Every saved scale is checked (finite, > 0) before anything is written; the output directory is replaced
atomically, so a failed run loses nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from vllm_gemma_mobile.quantize import workarounds

logger = logging.getLogger(__name__)

MOBILE_MODIFIERS = ("MobileGPTQModifier", "MobileQuantizationModifier")
DEFAULT_NUM_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


class QuantizeError(RuntimeError):
    """The recipe ran but produced something we must not save (e.g. an uncalibrated scale)."""


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def load_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None) -> tuple[str, dict]:
    """Read a recipe YAML, apply `overrides` to the options of its mobile modifier.

    Returns (recipe yaml, {"preset": ..., "options": ...} of that modifier)."""
    data = yaml.safe_load(Path(recipe).read_text())
    found = []
    # llmcompressor's Recipe.from_dict silently ignores stages not named `*_stage` and groups not named
    # `*_modifiers` (nothing runs, no error): read the recipe exactly the same way, and fail below instead.
    for stage_key, stage in data.items():
        if not (stage_key.endswith("_stage") and isinstance(stage, dict)):
            continue
        for group_key, group in stage.items():
            if not (group_key.endswith("_modifiers") and isinstance(group, dict)):
                continue
            for name, args in group.items():
                if name in MOBILE_MODIFIERS:
                    found.append(args)
    if len(found) != 1:
        raise ValueError(f"{recipe}: expected exactly one of {MOBILE_MODIFIERS} in a `<name>_modifiers:` group "
                         f"of a `<name>_stage:`, found {len(found)}")
    args = found[0]
    options = dict(args.get("options") or {})
    for key, value in (overrides or {}).items():
        options[key] = _parse_value(value) if isinstance(value, str) else value
    args["options"] = options
    return yaml.safe_dump(data, sort_keys=False), {"preset": args.get("preset", "gemma3"), "options": options}


def calibration_token_ids(tokenizer, num_samples: int, seq_len: int) -> list[list[int]]:
    """`num_samples` sequences of at most `seq_len` tokens (BOS first) from the fixed calibration split
    (random passages of the calibration plays, never the evaluation plays)."""
    from vllm_gemma_mobile.evaluate.data import calibration_texts

    texts = calibration_texts(n_samples=num_samples, chars_per_sample=seq_len * 6)
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[: seq_len - 1]
        out.append([tokenizer.bos_token_id] + ids)
    return out


def check_scales(model: torch.nn.Module) -> int:
    """Every quantization scale must be finite and > 0; raises QuantizeError naming the first bad tensor."""
    n = 0
    for name, param in model.named_parameters():
        if not name.endswith(("weight_scale", "input_scale", "output_scale", "k_scale", "v_scale")):
            continue
        n += 1
        t = param.detach().float()
        if not torch.isfinite(t).all() or (t <= 0).any():
            bad = t[~torch.isfinite(t) | (t <= 0)].flatten()[:4].tolist()
            raise QuantizeError(f"{name}: calibration produced an invalid scale {bad} (must be finite and > 0); "
                                "nothing was saved")
    return n


def _retie_embeddings(model) -> None:
    """llmcompressor unties lm_head from a targeted embedding; tie it back so one table is saved."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        head.weight = emb.weight
    model.config.tie_word_embeddings = True
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        text.tie_word_embeddings = True


def _finalize_config(out: Path, metadata: dict) -> None:
    """Move the KV scheme out of compressed-tensors' key (upstream vLLM rejects int KV schemes) into ours."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    qc = config["quantization_config"]
    qc["kv_cache_scheme"] = None
    qc["gemma_mobile"] = metadata
    config.setdefault("tie_word_embeddings", True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class Calibrated:
    """A model after oneshot: fake-quant frozen, scales checked; not yet saved."""

    model: torch.nn.Module
    tokenizer: Any
    metadata: dict
    base: Path


def calibrate(base: str | Path, recipe: str | Path, *, num_samples: int | None = None, seq_len: int | None = None,
              overrides: dict[str, Any] | None = None, dataset: Sequence[Sequence[int]] | None = None,
              pipeline: str | None = None) -> Calibrated:
    """Run `recipe` (with `overrides` of its mobile modifier's options) on the HF model at `base`.

    `dataset`: calibration token-id sequences (default: the fixed Shakespeare calibration split, tokenized with
    BASE's tokenizer into `num_samples` sequences of `seq_len` tokens).
    """
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_gemma_mobile.quantize.modifier import quantizable_module_names  # also registers the modifiers
    from vllm_gemma_mobile.scheme import expand, preset

    workarounds.stub_granitemoe_import()
    base = Path(base)
    num_samples = num_samples or DEFAULT_NUM_SAMPLES
    seq_len = seq_len or DEFAULT_SEQ_LEN
    recipe_yaml, mobile_args = load_recipe(recipe, overrides)

    tokenizer = None
    if (base / "tokenizer_config.json").exists() or (base / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(base)
    if dataset is None:
        if tokenizer is None:
            raise ValueError(f"{base} has no tokenizer: pass calibration token ids (dataset=...)")
        dataset = calibration_token_ids(tokenizer, num_samples, seq_len)
    ids = [list(map(int, s)) for s in dataset][:num_samples]
    calib = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    workarounds.allow_gemma4_per_layer_attributes(model.config)
    # The same expansion the modifier performs at initialize: validates the options before calibrating and
    # gives the checkpoint's metadata (per-layer KV bits) without reaching into llmcompressor's session.
    scheme = preset(mobile_args["preset"], model.config, **mobile_args["options"])
    metadata = expand(scheme, model.config, quantizable_module_names(model)).metadata(scheme)
    pipeline = pipeline or workarounds.calibration_pipeline(model.config)
    logger.info("calibrating %s on %d sequences (<= %d tokens), pipeline=%s", base, len(ids), seq_len, pipeline)
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(recipe_yaml)
        with workarounds.observe_only_output_calibration():
            model = oneshot(model=model, processor=tokenizer, recipe=str(recipe_path), dataset=calib,
                            num_calibration_samples=len(ids), max_seq_length=max(len(s) for s in ids),
                            pipeline=pipeline, shuffle_calibration_samples=False)
    _drop_kv_scales_without_cache(model, metadata["kv_cache"]["layer_bits"])
    check_scales(model)
    _retie_embeddings(model)
    return Calibrated(model, tokenizer, metadata, base)


def save_mobile(cal: Calibrated, out: str | Path) -> Path:
    """Save a calibrated model as a mobile checkpoint at `out` (built in OUT.tmp, then renamed)."""
    out = Path(out)
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    cal.model.save_pretrained(tmp_out, save_compressed=True)
    if cal.tokenizer is not None:
        cal.tokenizer.save_pretrained(tmp_out)
    gen = cal.base / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, tmp_out / "generation_config.json")
    _finalize_config(tmp_out, cal.metadata)
    drop_tied_lm_head(tmp_out)
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)
    return out


BUILD_KEY = ".gemma_mobile_build_key"


def build_key(base: str | Path, recipe: str | Path, kwargs: dict) -> str:
    """What a checkpoint was built from: base model files, recipe text, options, and our quantize/scheme code."""
    import hashlib

    h = hashlib.sha256()
    base = Path(base)
    for f in sorted(base.glob("*.json")) + sorted(base.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
    h.update(Path(recipe).read_bytes())
    options = {k: v for k, v in kwargs.items() if k != "dataset" and v not in (None, {}, [])}  # CLI == API
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    pkg = Path(__file__).resolve().parents[1]
    for f in sorted(pkg.glob("quantize/*.py")) + sorted(pkg.glob("scheme/*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def quantize(base: str | Path, recipe: str | Path, out: str | Path, *, reuse: bool = False, **kwargs) -> Path:
    """`gemma-mobile quantize`: calibrate BASE with RECIPE and save the mobile checkpoint at OUT; returns OUT.

    Keyword arguments are those of `calibrate`. A failure leaves an existing OUT untouched. With `reuse`, an
    OUT built from the same base, recipe, options and code (build key) is returned as is.
    """
    out = Path(out)
    key = build_key(base, recipe, kwargs)
    if reuse and (out / BUILD_KEY).exists() and (out / BUILD_KEY).read_text() == key:
        logger.info("%s is up to date (same base, recipe, options and code): reusing it", out)
        return out
    t0 = time.time()
    cal = calibrate(base, recipe, **kwargs)
    out = save_mobile(cal, out)
    (out / BUILD_KEY).write_text(key)
    logger.info("saved %s in %.0f s", out, time.time() - t0)
    return out


def drop_tied_lm_head(ckpt: Path) -> list[str]:
    """Remove a saved `lm_head.*` copy from a checkpoint whose config ties it to the embedding table.

    llmcompressor unties lm_head when the embedding is quantized and saves lm_head.weight as a dense bf16
    copy (for Gemma 3 270M: 335 MB next to a 42 MB 2-bit table) even after re-tying. The tied lm_head is
    served from the quantized table, so the copy is dropped. Returns the dropped tensor names.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

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


def _drop_kv_scales_without_cache(model: torch.nn.Module, layer_bits: list[int | None]) -> None:
    """Layers without their own KV cache (Gemma 4 KV-shared) must not carry k/v scales."""
    import re

    for name, module in model.named_modules():
        m = re.search(r"layers\.(\d+)\.self_attn$", name)
        if m and layer_bits[int(m.group(1))] is None:
            for attr in ("k_scale", "v_scale"):
                if hasattr(module, attr):
                    delattr(module, attr)
