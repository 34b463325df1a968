#!/usr/bin/env bash
# One command on a CUDA machine (designed for < 6 min on one H100):
#   bash kernels/run_gpu_checks.sh            # results under $OUT (default ./out/kernels)
# 1. parity tests of every Triton op vs the torch reference, compiled for the GPU (no interpreter), ~2-3 min
#    (tests/test_kernels.py + tests/test_kvcache_triton.py, the quantized KV cache kernels: ~+40-60 s of compiles);
# 2. kernels.plugin_check: a tiny Gemma layer stack (E2B widths) driven through kernels.plugin -- exactly the tensor
#    code the vLLM plugin runs (load-time layout conversion, fused-shard linears, TP partial sums + requant,
#    embedding gather, per-layer table, int8 / weight-only lm_head) -- Triton vs torch reference on CUDA; plugin_check.json;
# 3. kernels.bench: E2B/E4B shapes x M in {1,16,256,4,64} x bits vs cuBLAS bf16 (+ gemlite if importable),
#    stops starting new cases after BENCH_BUDGET_S (default 150 s); writes kernels_bench.json;
# 4. kernels.kvcache_bench: KV write + decode attention at 2k / 8k context, batch 16, 8 q heads / 1 kv head,
#    head_dim 256 int8 and 512 int4, vs bf16 SDPA on the same data (~20-30 s, KV_BENCH_BUDGET_S=30); writes kvcache_bench.json.
# Uses $PYTHON (default python3) with a CUDA torch + triton. Exit status: non-zero if the parity tests failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}/kernels"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET GEMMA_MOBILE_BACKEND
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GEMMA_MOBILE_TEST_DEVICE=cuda
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")
PYEOF

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  # conftest.py of the repo only defines fixtures; -p no:cacheprovider: the tree may be read-only
  # pytest-xdist when present: the cases compile their kernels in parallel (most of the time is compiling)
  XD=(); "$PY" -c "import xdist" 2>/dev/null && XD=(-n 8)
  timeout "${PARITY_TIMEOUT_S:-240}" "$PY" -m pytest -q -p no:cacheprovider "${XD[@]}" tests/test_kernels.py \
      tests/test_kvcache_triton.py 2>&1 | tee "$OUT/kernels_parity.log"
  status=${PIPESTATUS[0]}
else
  echo "pytest not installed: parity is still checked per case by the bench (max_abs_diff)" | tee "$OUT/kernels_parity.log"
fi

timeout "${PLUGIN_TIMEOUT_S:-150}" "$PY" -m kernels.plugin_check --out "$OUT/plugin_check.json" \
    2>&1 | tee "$OUT/plugin_check.log"
pstatus=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT_S:-240}" "$PY" -m kernels.bench --out "$OUT/kernels_bench.json" --budget-s "${BENCH_BUDGET_S:-150}" \
    2>&1 | tee "$OUT/kernels_bench.log"
bstatus=${PIPESTATUS[0]}

timeout 60 "$PY" -m kernels.kvcache_bench --out "$OUT/kvcache_bench.json" --budget-s "${KV_BENCH_BUDGET_S:-30}" \
    2>&1 | tee "$OUT/kvcache_bench.log"
kstatus=${PIPESTATUS[0]}
echo "parity exit=$status plugin check exit=$pstatus bench exit=$bstatus kv bench exit=$kstatus; results in $OUT"
for s in $status $pstatus $bstatus $kstatus; do [ "$s" != 0 ] && exit "$s"; done
exit 0
