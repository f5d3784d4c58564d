#!/usr/bin/env bash
# The one short prepared script to run on a CUDA machine (design/ARCHITECTURE.md, "Where GPU-only
# parts stand"): the CUDA-only tests, the merged path's DeepSpeed benchmark, then the engine on a
# 7B-shaped random Llama in bf16 and NF4 (benchmarks/gpu_7b_bench.py: tok/s at 64 sequences, LoRA
# overhead, KV pool, adapters per GiB). Each step has a timeout so the whole run fits a short device
# lease and a 10-minute command (defaults: 150 s + 220 s + 200 s); each runs even if one before failed. Output goes to $OUT when set (the device machine's return folder), else to
# ./gpu_check_out. Exit status: 0 only if every step passed (the bench exits 1 on an INVALID
# verdict or a failed row, see benchmarks/deepspeed_cuda_bench.py).
#
#   bash benchmarks/gpu_check.sh
#   TESTS_TIMEOUT=150 BENCH_TIMEOUT=300 BENCH_ARGS="--reps 2 --layers 8" bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

{
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not available"
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "transformers", transformers.__version__)' 2>&1
  "$PY" -c 'import deepspeed; print("deepspeed", deepspeed.__version__)' 2>&1 | tail -1
  "$PY" -c 'import bitsandbytes; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
  echo "nvcc: $(command -v nvcc || echo missing), ninja: $(command -v ninja || echo missing)"
} 2>&1 | tee "$OUT_DIR/env.txt"

echo "== 1/3: pytest -m gpu tests/gpu (timeout ${TESTS_TIMEOUT:-150}s)"
timeout --kill-after=10 "${TESTS_TIMEOUT:-150}" "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider \
  --junitxml="$OUT_DIR/pytest_gpu.xml" 2>&1 | tee "$OUT_DIR/pytest_gpu.txt"
rc_tests=${PIPESTATUS[0]}
echo "pytest exit status: $rc_tests" | tee -a "$OUT_DIR/pytest_gpu.txt"

echo "== 2/3: python -m benchmarks.deepspeed_cuda_bench ${BENCH_ARGS:-} (timeout ${BENCH_TIMEOUT:-220}s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout --kill-after=10 "${BENCH_TIMEOUT:-220}" "$PY" -m benchmarks.deepspeed_cuda_bench ${BENCH_ARGS:-} \
  --json "$OUT_DIR/deepspeed_cuda_bench.json" 2>&1 | tee "$OUT_DIR/deepspeed_cuda_bench.txt"
rc_bench=${PIPESTATUS[0]}
echo "deepspeed_cuda_bench exit status: $rc_bench" | tee -a "$OUT_DIR/deepspeed_cuda_bench.txt"

echo "== 3/3: python -m benchmarks.gpu_7b_bench (timeout ${B7_TIMEOUT:-200}s)"
timeout --kill-after=10 "${B7_TIMEOUT:-200}" "$PY" -m benchmarks.gpu_7b_bench ${B7_ARGS:-} 2>&1 | tee "$OUT_DIR/gpu_7b_bench.txt"
rc_7b=${PIPESTATUS[0]}
echo "gpu_7b_bench exit status: $rc_7b" | tee -a "$OUT_DIR/gpu_7b_bench.txt"

echo "== gpu_check done: tests $rc_tests, bench $rc_bench, 7b $rc_7b (124 = timed out); output in $OUT_DIR"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && [ "$rc_7b" -eq 0 ]
