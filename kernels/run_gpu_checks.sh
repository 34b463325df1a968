#!/usr/bin/env bash
# One command on a CUDA machine (designed for < 7 min on one H100/H200):
#   bash kernels/run_gpu_checks.sh            # results under $OUT (default ./out/kernels)
# 0. in parallel: (1.) and a compile-only pass of the bench cases (kernels.bench --warm, WARM_JOBS processes split
#    by bits and M range) that fills Triton's disk cache -- the timed run then autotunes without compiling
#    (~2 s per config otherwise; 20 s per case in the first H200 run);
# 1. parity tests of every Triton op vs the torch reference, compiled for the GPU (no interpreter)
#    (tests/test_kernels.py + tests/test_kvcache_triton.py, the quantized KV cache kernels);
# 2. kernels.plugin_check: a tiny Gemma layer stack (E2B widths) driven through kernels.plugin -- exactly the tensor
#    code the vLLM plugin runs (load-time layout conversion, fused-shard linears, TP partial sums + requant,
#    embedding gather, per-layer table, int8 / weight-only lm_head) -- Triton vs torch reference on CUDA; plugin_check.json;
# 3. kernels.bench: E2B/E4B shapes x M in $BENCH_MS x bits vs cuBLAS bf16 (+ gemlite up to M=$GEMLITE_MAX_M if
#    importable; the tied lm_head weight-only and with an int8 input), stops starting new cases after
#    BENCH_BUDGET_S (default 200 s); writes kernels_bench.json;
# 4. kernels.kvcache_bench (RUN_KV=1, default): KV write + decode attention at 2k / 8k context, batch 16, 8 q heads /
#    1 kv head, head_dim 256 int8 and 512 int4, vs bf16 SDPA on the same data (~20-30 s); writes kvcache_bench.json.
# 5. kernels.tune (only when TUNE_CASES is set, e.g. e2b.gate_up:4:16,e4b.down:2:256): a wider config grid of the
#    GEMM and the GEMV per case, each config bitwise-checked; compiled in parallel in step 0; writes tune.json.
# 6. QAT on the GPU (RUN_QAT=1, default): tests/test_qat.py -k on_cuda (~1 min; written 2026-12-03, not yet run on a device).
# Knobs: BENCH_MS (default 1,16,256,4,64), BENCH_SHAPES, BENCH_KINDS (linear,lm_head,lm_head_a8), GEMLITE_MAX_M (16),
# WARM_JOBS (1 = on), RUN_PARITY / RUN_PLUGIN / RUN_KV / RUN_QAT (1 = on).
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

BENCH_MS="${BENCH_MS:-1,16,256,4,64}"
BENCH_ARGS=(--ms "$BENCH_MS" --gemlite-max-m "${GEMLITE_MAX_M:-16}")
[ -n "${BENCH_SHAPES:-}" ] && BENCH_ARGS+=(--shapes "$BENCH_SHAPES")
status=0 pstatus=0 bstatus=0 kstatus=0
t0=$SECONDS
warm_pids=()
if [ "${WARM_JOBS:-1}" = 1 ]; then
  mkdir -p "$OUT/warm"
  # one process per (bits, M range) for the linears, one per lm_head mode: each compiles a disjoint set of binaries
  for bits in 2 4 8; do
    for mr in 1,4 16,64 256; do
      ms=$(echo "$mr" | tr ',' '\n' | grep -xFf <(echo "$BENCH_MS" | tr ',' '\n') | paste -sd, -)
      [ -z "$ms" ] && continue
      timeout "${WARM_TIMEOUT_S:-150}" "$PY" -m kernels.bench --warm "${BENCH_ARGS[@]}" --ms "$ms" --bits "$bits" \
          --kinds linear --out "$OUT/warm/b${bits}_m${mr/,/_}.json" > "$OUT/warm/b${bits}_m${mr/,/_}.log" 2>&1 &
      warm_pids+=($!)
    done
  done
  for kind in lm_head lm_head_a8; do
    timeout "${WARM_TIMEOUT_S:-150}" "$PY" -m kernels.bench --warm "${BENCH_ARGS[@]}" --kinds "$kind" \
        --out "$OUT/warm/$kind.json" > "$OUT/warm/$kind.log" 2>&1 &
    warm_pids+=($!)
  done
fi

if [ -n "${TUNE_CASES:-}" ]; then
  mkdir -p "$OUT/warm"
  for i in $(seq 0 $((${TUNE_JOBS:-8} - 1))); do
    timeout "${WARM_TIMEOUT_S:-150}" "$PY" -m kernels.tune --warm --cases "$TUNE_CASES" --part "$i/${TUNE_JOBS:-8}" \
        --out "$OUT/warm/tune$i.json" > "$OUT/warm/tune$i.log" 2>&1 &
    warm_pids+=($!)
  done
fi

if [ "${RUN_PARITY:-1}" = 1 ]; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    # conftest.py of the repo only defines fixtures; -p no:cacheprovider: the tree may be read-only
    # pytest-xdist when present: the cases compile their kernels in parallel (most of the time is compiling)
    XD=(); "$PY" -c "import xdist" 2>/dev/null && XD=(-n 4)
    timeout "${PARITY_TIMEOUT_S:-240}" "$PY" -m pytest -q -p no:cacheprovider "${XD[@]}" tests/test_kernels.py \
        tests/test_kvcache_triton.py 2>&1 | tee "$OUT/kernels_parity.log" | tail -15
    status=${PIPESTATUS[0]}
  else
    echo "pytest not installed: parity is still checked per case by the bench (max_abs_diff)" | tee "$OUT/kernels_parity.log"
  fi
  echo "parity done at $((SECONDS - t0)) s"
fi
for p in "${warm_pids[@]}"; do wait "$p"; done
[ "${#warm_pids[@]}" -gt 0 ] && { echo "warm-up done at $((SECONDS - t0)) s:"; tail -qn1 "$OUT"/warm/*.log; }

if [ "${RUN_PLUGIN:-1}" = 1 ]; then
  timeout "${PLUGIN_TIMEOUT_S:-150}" "$PY" -m kernels.plugin_check --out "$OUT/plugin_check.json" \
      2>&1 | tee "$OUT/plugin_check.log" | tail -25
  pstatus=${PIPESTATUS[0]}
  echo "plugin check done at $((SECONDS - t0)) s"
fi

timeout "${BENCH_TIMEOUT_S:-300}" "$PY" -m kernels.bench --out "$OUT/kernels_bench.json" "${BENCH_ARGS[@]}" \
    --budget-s "${BENCH_BUDGET_S:-200}" > "$OUT/kernels_bench.log" 2>&1
bstatus=$?
sed -n '/^shape /,$p' "$OUT/kernels_bench.log"; tail -3 "$OUT/kernels_bench.log"
echo "bench done at $((SECONDS - t0)) s"

if [ -n "${TUNE_CASES:-}" ]; then
  timeout "${TUNE_TIMEOUT_S:-200}" "$PY" -m kernels.tune --cases "$TUNE_CASES" --out "$OUT/tune.json" 2>&1 \
      | tee "$OUT/tune.log" | tail -40
  echo "tune done at $((SECONDS - t0)) s"
fi

if [ "${RUN_KV:-1}" = 1 ]; then
  timeout 60 "$PY" -m kernels.kvcache_bench --out "$OUT/kvcache_bench.json" --budget-s "${KV_BENCH_BUDGET_S:-30}" \
      2>&1 | tee "$OUT/kvcache_bench.log" | tail -12
  kstatus=${PIPESTATUS[0]}
fi
qstatus=0
if [ "${RUN_QAT:-1}" = 1 ] && "$PY" -c "import pytest" 2>/dev/null; then
  # QAT on the GPU (`device: auto`): a tiny Gemma 3 trained 12 steps on CUDA, loss falls, same export as the CPU's
  timeout "${QAT_TIMEOUT_S:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/test_qat.py -k on_cuda 2>&1 \
      | tee "$OUT/qat_cuda.log" | tail -5
  qstatus=${PIPESTATUS[0]}
fi
echo "parity exit=$status plugin check exit=$pstatus bench exit=$bstatus kv bench exit=$kstatus qat exit=$qstatus; results in $OUT"
for s in $status $pstatus $bstatus $kstatus $qstatus; do [ "$s" != 0 ] && exit "$s"; done
exit 0
