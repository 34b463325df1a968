"""`gemma-mobile quantize`: a thin wrapper around ONE `llmcompressor.oneshot` call.

`quantize(base, recipe, out)` reads the recipe (applying `--set` overrides to its mobile modifier's options;
stages/groups llmcompressor would silently skip are an error), tokenizes the fixed Shakespeare calibration
split, and calls `oneshot(model=BASE, recipe=..., dataset=..., output_dir=OUT.tmp, ...)` with the arguments of
`oneshot_kwargs` — nothing a user could not pass to oneshot themselves. Everything a correct checkpoint needs
(the llmcompressor fixes, scale checks, re-tied lm_head, our `gemma_mobile` metadata, dropping the dense
lm_head copy) happens inside the recipe's modifiers (quantize/modifier.py, quantize/checkpoint.py). The output
directory is replaced atomically, so a failed run loses nothing.
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

from vllm_gemma_mobile.quantize.checkpoint import QuantizeError, check_scales, drop_tied_lm_head  # noqa: F401

logger = logging.getLogger(__name__)

MOBILE_MODIFIERS = ("MobileGPTQModifier", "MobileQuantizationModifier")
DEFAULT_NUM_SAMPLES = 64
DEFAULT_SEQ_LEN = 512


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


@dataclass
class Calibrated:
    """A model after oneshot: fake-quant frozen, scales checked, save hook installed; not yet saved."""

    model: torch.nn.Module
    tokenizer: Any
    base: Path


def calibration_dataset(base: Path, tokenizer, num_samples: int, seq_len: int,
                        dataset: Sequence[Sequence[int]] | None = None):
    """A `datasets.Dataset` of token ids: `dataset` if given, else the fixed Shakespeare calibration split
    tokenized with BASE's tokenizer into `num_samples` sequences of at most `seq_len` tokens (BOS first)."""
    from datasets import Dataset

    if dataset is None:
        if tokenizer is None:
            raise ValueError(f"{base} has no tokenizer: pass calibration token ids (dataset=...)")
        dataset = calibration_token_ids(tokenizer, num_samples, seq_len)
    ids = [list(map(int, s)) for s in dataset][:num_samples]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})


def oneshot_kwargs(base: Path, recipe_path: Path, calib, pipeline: str | None = None,
                   output_dir: Path | None = None) -> dict[str, Any]:
    """The `llmcompressor.oneshot` arguments `gemma-mobile quantize` uses — nothing a user could not pass.

    `shuffle_calibration_samples=False` keeps the data order (llmcompressor's shuffle is unseeded), which makes
    runs bit-identical; the pipeline is left to the modifiers (workarounds.mobile_pipeline_choice) unless given.
    """
    kwargs: dict[str, Any] = dict(model=str(base), recipe=str(recipe_path), dataset=calib,
                                  num_calibration_samples=len(calib),
                                  max_seq_length=max(len(s) for s in calib["input_ids"]),
                                  shuffle_calibration_samples=False)
    if pipeline is not None:
        kwargs["pipeline"] = pipeline
    if output_dir is not None:
        kwargs["output_dir"] = str(output_dir)
    return kwargs


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    if (base / "tokenizer_config.json").exists() or (base / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(base)
    return None


def _run_oneshot(base: str | Path, recipe: str | Path, *, num_samples: int | None, seq_len: int | None,
                 overrides: dict[str, Any] | None, dataset: Sequence[Sequence[int]] | None, pipeline: str | None,
                 output_dir: Path | None):
    from llmcompressor import oneshot

    base = Path(base)
    recipe_yaml, _ = load_recipe(recipe, overrides)
    tokenizer = _tokenizer(base)
    calib = calibration_dataset(base, tokenizer, num_samples or DEFAULT_NUM_SAMPLES, seq_len or DEFAULT_SEQ_LEN,
                                dataset)
    logger.info("calibrating %s on %d sequences (<= %d tokens)", base, len(calib),
                max(len(s) for s in calib["input_ids"]))
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(recipe_yaml)
        model = oneshot(**oneshot_kwargs(base, recipe_path, calib, pipeline, output_dir))
    return model, tokenizer


def calibrate(base: str | Path, recipe: str | Path, *, num_samples: int | None = None, seq_len: int | None = None,
              overrides: dict[str, Any] | None = None, dataset: Sequence[Sequence[int]] | None = None,
              pipeline: str | None = None) -> Calibrated:
    """Run `recipe` (with `overrides` of its mobile modifier's options) on the HF model at `base`, in memory.

    `dataset`: calibration token-id sequences (default: the fixed Shakespeare calibration split, tokenized with
    BASE's tokenizer into `num_samples` sequences of `seq_len` tokens). `pipeline`: llmcompressor's
    calibration pipeline (default: what the modifier needs for this model).
    """
    model, tokenizer = _run_oneshot(base, recipe, num_samples=num_samples, seq_len=seq_len, overrides=overrides,
                                    dataset=dataset, pipeline=pipeline, output_dir=None)
    return Calibrated(model, tokenizer, Path(base))


def save_mobile(cal: Calibrated, out: str | Path) -> Path:
    """Save a calibrated model as a mobile checkpoint at `out` (built in OUT.tmp, then renamed)."""
    out = Path(out)
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    cal.model.save_pretrained(tmp_out)  # the modifiers' save hook: packed + gemma_mobile metadata
    if cal.tokenizer is not None:
        cal.tokenizer.save_pretrained(tmp_out)
    return _replace(tmp_out, out)


def _replace(tmp_out: Path, out: Path) -> Path:
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


# chosen by --size-budget (keep_8bit / mlp_2bit_layers would change bits behind the allocation's back)
ALLOCATED = ("embed_bits", "attention_bits_by_layer", "mlp_bits_by_layer", "keep_8bit", "mlp_2bit_layers")


def quantize(base: str | Path, recipe: str | Path, out: str | Path, *, reuse: bool = False,
             num_samples: int | None = None, seq_len: int | None = None, overrides: dict[str, Any] | None = None,
             dataset: Sequence[Sequence[int]] | None = None, pipeline: str | None = None,
             size_budget: int | str | None = None) -> Path:
    """`gemma-mobile quantize`: one `llmcompressor.oneshot(..., output_dir=...)` call (see `oneshot_kwargs`)
    with RECIPE on BASE, written to OUT; returns OUT.

    `size_budget` (bytes, or a string such as "150MB"): choose the table / attention / MLP bits first
    (`quantize/allocate.py`: measured sensitivity, exact knapsack), run the recipe with them, and write the
    allocation report to OUT/allocation.json. The allocated options cannot also be given in `overrides`.

    A failure leaves an existing OUT untouched (the run writes OUT.tmp, renamed at the end). With `reuse`, an
    OUT built from the same base, recipe, options and code (build key) is returned as is.
    """
    out = Path(out)
    budget = None
    if size_budget is not None:
        from vllm_gemma_mobile.quantize.allocate import parse_size

        budget = parse_size(size_budget)
        clash = sorted(set(overrides or {}) & set(ALLOCATED))
        if clash:
            raise ValueError(f"--size-budget chooses {clash} itself: do not also set them")
    kwargs = dict(num_samples=num_samples, seq_len=seq_len, overrides=overrides, dataset=dataset, pipeline=pipeline)
    key = build_key(base, recipe, {**kwargs, "size_budget": budget})
    if reuse and (out / BUILD_KEY).exists() and (out / BUILD_KEY).read_text() == key:
        logger.info("%s is up to date (same base, recipe, options and code): reusing it", out)
        return out
    t0 = time.time()
    allocation = None
    if budget is not None:
        from vllm_gemma_mobile.quantize.allocate import allocate

        from vllm_gemma_mobile.scheme.spec import MobileScheme

        wkw = (overrides or {}).get("weight_observer_kwargs")  # the recipe's weight quantizer, as --set gives it
        wkw = _parse_value(wkw) if isinstance(wkw, str) else wkw or \
            MobileScheme.model_fields["weight_observer_kwargs"].get_default(call_default_factory=True)
        allocation = allocate(base, budget, observer_kwargs=wkw)
        kwargs["overrides"] = {**(overrides or {}), **allocation["overrides"]}
    tmp_out = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    _run_oneshot(base, recipe, output_dir=tmp_out, **kwargs)
    if allocation is not None:
        allocation["actual_safetensors_bytes"] = sum(f.stat().st_size for f in tmp_out.glob("*.safetensors"))
        (tmp_out / "allocation.json").write_text(json.dumps(allocation, indent=1))
    out = _replace(tmp_out, out)
    (out / BUILD_KEY).write_text(key)
    logger.info("saved %s in %.0f s", out, time.time() - t0)
    return out
