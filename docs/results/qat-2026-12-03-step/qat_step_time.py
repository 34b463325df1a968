"""Time 270M QAT steps (the training loop's own calls) under three settings, each in a fresh process, and write JSON.

    python docs/results/qat-2026-12-03-step/qat_step_time.py BASE PTQ OUT.json [--steps 8]

Settings: `before` = the whole-batch loss (head_chunk 0) with the heap trimmed above 2 GiB (the code before
2026-12-03 evening, except that its frozen lm_head already runs through torch._int_mm); `never_trim` = the same
with the heap never trimmed; `now` = 128-token lm_head + loss chunks, never trimmed (the recipe's default).
Per step: wall seconds, minor page faults, RSS after the step.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import ctypes, json, resource, sys, time, torch
from pathlib import Path
from vllm_gemma_mobile.memory import retain_freed_memory
from vllm_gemma_mobile.qat.train import QATOptions, build_student, _sequences, _param_groups, distill_backward
from transformers import AutoModelForCausalLM, AutoTokenizer
base, ptq, chunk, trim, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
retain_freed_memory()
if trim == "2GiB":
    ctypes.CDLL(None).mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD as before 2026-12-03 evening
opts = QATOptions(train_table=False, batch=2, seq_len=256)
seqs = _sequences(AutoTokenizer.from_pretrained(base), opts, 2 * steps)
student, _ = build_student(base, ptq, opts, [torch.tensor(seqs[:2])])
teacher = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval().requires_grad_(False)
optim = torch.optim.Adam(_param_groups(student, opts), betas=(0.9, 0.95))
student.train()
rows = []
for step in range(steps):
    ids = torch.tensor(seqs[2 * step:2 * step + 2])
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    optim.zero_grad(set_to_none=True)
    loss = distill_backward(student, ids, t_logits, 1.0, chunk)
    del t_logits
    optim.step()
    rows.append({"step": step, "s": round(time.perf_counter() - t0, 2),
                 "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                 "rss_mib": int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20, "loss": round(loss, 5)})
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
print(json.dumps(rows))
"""

SETTINGS = {"before": (0, "2GiB"), "never_trim": (0, "never"), "now": (128, "never")}


def main() -> None:
    base, ptq, out = sys.argv[1:4]
    steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 8
    res = {}
    for name, (chunk, trim) in SETTINGS.items():
        print(name, file=sys.stderr, flush=True)
        p = subprocess.run([sys.executable, "-c", CHILD, base, ptq, str(chunk), trim, str(steps)],
                           capture_output=True, text=True, check=True)
        rows = json.loads(p.stdout.strip().splitlines()[-1])
        tail = sorted(r["s"] for r in rows[3:])
        res[name] = {"head_chunk": chunk, "trim": trim, "steps": rows,
                     "median_s_after_3": tail[len(tail) // 2], "max_rss_mib": max(r["rss_mib"] for r in rows)}
        print(name, res[name]["median_s_after_3"], res[name]["max_rss_mib"], file=sys.stderr, flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
