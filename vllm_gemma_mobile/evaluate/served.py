"""Perplexity as SERVED: the same windows and statistics as `evaluate.quality.evaluate`, computed by vLLM (the
plugin, its KV cache included) from prompt log-probabilities.

`served_perplexity(model_dir, ...)` tokenizes the text exactly like `evaluate` (no special tokens, windows of
`seq_len - 1` tokens with `<bos>` prepended, at most `max_tokens` scored) and asks vLLM for
`prompt_logprobs=0`, i.e. log p(token_i | tokens_<i) of every prompt token as the served model computes it;
NLL = mean over every text token of a window. Runs vLLM in a child process (one engine alive at a time);
`kv_cache="bf16"` / `"vllm"` sets GEMMA_MOBILE_KV_CACHE for it (the plugin's attention over an unquantized
cache, = the reference with KV fake quant off / vLLM's own attention; vllm/kv_cache.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def windows_for(model_dir: str | Path, text: str | Path | None, max_tokens: int, seq_len: int) -> list[list[int]]:
    """The token windows `evaluate` scores (same tokenizer, text and protocol)."""
    from transformers import AutoTokenizer

    from vllm_gemma_mobile.evaluate.quality import _resolve_text, make_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    body, _ = _resolve_text(text)
    ids = tok(body[: max_tokens * 16 + 1024], add_special_tokens=False).input_ids
    return make_windows(ids, int(tok.bos_token_id), max_tokens, seq_len)


def reference_perplexity(model_dir: str | Path, windows: list[list[int]], kv_fake_quant: bool = True,
                         numerics: str = "served") -> dict:
    """The same statistic from the evaluation reference (`load_reference` with `numerics`: "served" = the exact
    integer numerics the plugin runs, "bf16" = compressed-tensors' fake quant; with or without its KV fake
    quant) on the same windows."""
    import torch

    from vllm_gemma_mobile.evaluate.reference import kv_fake_quant_enabled, load_reference

    model, _ = load_reference(model_dir, numerics=numerics)
    kv_fake_quant_enabled(model, kv_fake_quant)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            lp = torch.log_softmax(model(x, use_cache=False).logits[0, :-1].float(), dim=-1)
            nll -= float(lp.gather(1, x[0, 1:, None]).sum())
            n += len(w) - 1
    return {"perplexity": math.exp(nll / n), "nll": nll / n, "tokens": n, "kv_fake_quant": kv_fake_quant,
            "numerics": numerics}


def _child(model: str, windows_file: str, out: str, max_model_len: int) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = json.loads(Path(windows_file).read_text())
    llm = LLM(model, enforce_eager=True, max_model_len=max_model_len, dtype="bfloat16", seed=0)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll, n = 0.0, 0
    for w, o in zip(windows, outs):
        for pos in range(1, len(w)):
            nll -= o.prompt_logprobs[pos][w[pos]].logprob
            n += 1
    Path(out).write_text(json.dumps({"nll_sum": nll, "tokens": n, "kv": llm.llm_engine.model_config.quantization}))


def served_perplexity(model_dir: str | Path, text: str | Path | None = None, max_tokens: int = 8192,
                      seq_len: int = 512, kv_cache: str = "quantized", timeout: float = 3600) -> dict[str, Any]:
    """{"perplexity", "nll", "tokens", "kv_cache"} of `model_dir` served by vLLM (see module docstring)."""
    if kv_cache not in ("quantized", "bf16", "vllm"):
        raise ValueError(f"kv_cache={kv_cache!r}: expected 'quantized', 'bf16' or 'vllm'")
    windows = windows_for(model_dir, text, max_tokens, seq_len)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               GEMMA_MOBILE_KV_CACHE="" if kv_cache == "quantized" else kv_cache)
    with tempfile.TemporaryDirectory() as td:
        wf, of = Path(td) / "windows.json", Path(td) / "out.json"
        wf.write_text(json.dumps(windows))
        p = subprocess.run([sys.executable, "-m", "vllm_gemma_mobile.evaluate.served", str(model_dir), str(wf),
                            str(of), str(seq_len + 8)], env=env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not of.exists():
            raise RuntimeError(f"served perplexity of {model_dir} failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
        r = json.loads(of.read_text())
    nll = r["nll_sum"] / r["tokens"]
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": r["tokens"], "windows": len(windows),
            "kv_cache": kv_cache}


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
