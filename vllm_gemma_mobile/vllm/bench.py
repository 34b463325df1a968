"""Decode tokens/s and TTFT of a mobile checkpoint vs its bf16 baseline, in one run, same settings.

Each model runs in its own child process (one engine alive at a time, memory returned between them) with
identical engine arguments (`extra`, vLLM CLI syntax) and CPU environment (both cores computing:
VLLM_CPU_OMP_THREADS_BIND=0-<n-1>, VLLM_CPU_NUM_OF_RESERVED_CPU=0 unless already set).

Per stream count S (S distinct prompts submitted together, greedy, ignore_eos):
  ttft_s        wall time of the batch generating 1 token (prefill + first token), best of `reps`
  total_s       wall time of the batch generating `tokens` tokens, best of `reps`
  decode_tok_s  S * (tokens - 1) / (total_s - ttft_s)       (steady-state decode rate)
  tok_s         S * tokens / total_s                        (end-to-end output rate)

Per model also: `memory_after_load` / `memory_at_end`, VmRSS/VmHWM (bytes, /proc/<pid>/status) of the child and
every descendant (vLLM's EngineCore process holds the weights; `weights_holder` names the largest VmRSS), and
`load_log`, vLLM's own "Loading weights took" / "Model loading took" lines. GEMMA_MOBILE_BENCH_LOG_DIR=DIR
also keeps each child's full stdout/stderr there (<model dir name>.log).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The best way to learn programming is",
    "In the beginning of the nineteenth century", "My favourite recipe for soup", "The theory of relativity says",
    "Here is a short poem about the sea:", "The history of the Roman empire", "To make a good cup of tea, you",
    "The most important invention of the", "A list of things to pack for a trip:", "The weather today is",
    "Dear friend, I am writing to tell you", "The quick brown fox", "Scientists recently discovered that",
    "The main character of the novel",
]


def cpu_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a CPU engine using every core (no reserved core), modest KV cache."""
    env = dict(os.environ if env is None else env)
    n = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "loadavg_at_start": list(os.getloadavg())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        info["amx"] = "amx_int8" in flags
    except OSError:
        pass
    try:
        import torch
        import vllm

        info["torch"], info["vllm"] = torch.__version__, vllm.__version__
    except Exception:
        pass
    return info


def proc_tree_memory(root: int | None = None) -> dict[str, Any]:
    """VmRSS/VmHWM (bytes) of process `root` (default: this one) and all its descendants, from /proc."""
    root = os.getpid() if root is None else root
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += [c for c, pp in parent.items() if pp == pid]
    procs = []
    for pid in tree:
        try:
            st = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        kb = lambda k: int(st[k].split()[0]) * 1024 if k in st else None  # noqa: E731
        procs.append({"pid": pid, "name": st.get("Name", "").strip(), "VmRSS": kb("VmRSS"), "VmHWM": kb("VmHWM"),
                      "RssAnon": kb("RssAnon"), "RssFile": kb("RssFile")})
    holder = max(procs, key=lambda q: q["VmRSS"] or 0) if procs else None
    return {"procs": procs, "weights_holder": holder}


def _child(model: str, streams: list[int], tokens: int, reps: int, extra: list[str], out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, *extra])
    eargs = EngineArgs.from_cli_args(args)
    t0 = time.perf_counter()
    llm = LLM(**{k: getattr(eargs, k) for k in vars(eargs)})
    startup = time.perf_counter() - t0
    quant = llm.llm_engine.model_config.quantization
    res: dict[str, Any] = {"model": model, "quantization": quant, "startup_s": round(startup, 1),
                           "memory_after_load": proc_tree_memory(), "streams": {}}
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(PROMPTS[:2], warm, use_tqdm=False)
    for s in streams:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s)]
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        full = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        llm.generate(prompts, full, use_tqdm=False)  # warm this batch shape
        ttft, total = [], []
        for _ in range(reps):
            t = time.perf_counter()
            llm.generate(prompts, one, use_tqdm=False)
            ttft.append(time.perf_counter() - t)
            t = time.perf_counter()
            outs = llm.generate(prompts, full, use_tqdm=False)
            total.append(time.perf_counter() - t)
            assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        tt, tot = min(ttft), min(total)
        res["streams"][str(s)] = {
            "ttft_s": round(tt, 4), "total_s": round(tot, 4),
            "decode_tok_s": round(s * (tokens - 1) / max(tot - tt, 1e-9), 2),
            "tok_s": round(s * tokens / tot, 2),
            "text0": outs[0].outputs[0].text[:80],
        }
    res["memory_at_end"] = proc_tree_memory()
    Path(out).write_text(json.dumps(res))


def run_one(model: str, streams: list[int], tokens: int, reps: int, extra: list[str],
            env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as td:
        out = str(Path(td) / "r.json")
        cmd = [sys.executable, "-m", "vllm_gemma_mobile.vllm.bench", "--child", model, out, str(tokens), str(reps),
               ",".join(map(str, streams)), "--", *extra]
        p = subprocess.run(cmd, env=cpu_env(env), timeout=timeout, capture_output=True, text=True)
        if os.environ.get("GEMMA_MOBILE_BENCH_LOG_DIR"):
            log = Path(os.environ["GEMMA_MOBILE_BENCH_LOG_DIR"]) / f"{Path(model).name}.log"
            log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
        if p.returncode != 0 or not Path(out).exists():
            raise RuntimeError(f"bench child for {model} failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
        res = json.loads(Path(out).read_text())
        res["load_log"] = [ln.strip() for ln in (p.stdout + p.stderr).splitlines()
                           if "Loading weights took" in ln or "Model loading took" in ln]
        return res


def bench(model: str, baseline: str, streams: list[int] = (1, 16), tokens: int = 64, out: str | None = None,
          extra: list[str] = (), reps: int = 2) -> dict[str, Any]:
    """Run `baseline` then `model` with identical settings; returns (and optionally writes) the JSON."""
    streams, extra = list(streams), list(extra)
    if not any(a.startswith("--max-model-len") for a in extra):
        extra += ["--max-model-len", "1024"]
    result: dict[str, Any] = {"machine": machine(), "settings": {
        "streams": streams, "tokens": tokens, "reps": reps, "engine_args": extra,
        "env": {k: v for k, v in cpu_env().items() if k.startswith(("VLLM_CPU", "OMP", "GEMMA_MOBILE"))}}}
    result["baseline"] = run_one(baseline, streams, tokens, reps, extra)
    result["mobile"] = run_one(model, streams, tokens, reps, extra)
    result["speedup"] = {
        s: {"decode": round(result["mobile"]["streams"][str(s)]["decode_tok_s"]
                            / result["baseline"]["streams"][str(s)]["decode_tok_s"], 3),
            "ttft": round(result["baseline"]["streams"][str(s)]["ttft_s"]
                          / result["mobile"]["streams"][str(s)]["ttft_s"], 3)}
        for s in streams}
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, out, tokens, reps, streams = sys.argv[2:7]
        extra = sys.argv[8:] if len(sys.argv) > 7 and sys.argv[7] == "--" else []
        _child(model, [int(s) for s in streams.split(",")], int(tokens), int(reps), extra, out)
    else:
        print("use: gemma-mobile bench MODEL --baseline BASE [--streams 1 16] [--tokens 64] [vllm args]")
