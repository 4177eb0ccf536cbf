#!/usr/bin/env bash
# The batched CUDA path on one GPU, in one run (issue 9 items 6 and 8; prepared, not yet run):
#   1. every `gpu` test (tests/worker/inference): float32 batched = reference, bf16 varlen +
#      CUDA graphs batched = alone where margins are clear, the varlen self-check, OOM
#      recovery, Phi-3.5's LongRoPE recompute on CUDA;
#   2. decode step time at batch 1, 4, 8, 16 on the full-size config (random weights),
#      next to the bandwidth floor;
#   3. describe-like tasks/s (one image at 16 crops, 200 new tokens) at concurrency
#      1, 8, 16, 32 and the floor;
#   4. host work against device time (issue 20): bench_host_overhead.py on the real GPU
#      at batch 1, 8, 16, 32, next to the same load on the simulated device of that GPU
#      (H200, else H100 figures): prediction and measurement side by side.
#   5. image reuse (issue 22): four questions about one image through the real queue, with
#      the image cache and without (bench_image_reuse.py, tiny checkpoint on CUDA; GPU
#      runs only: its two worker start-ups would lengthen DRY_RUN).
# Writes $OUT/{gpu-tests.txt,engine.json,batching.json,host-overhead-{gpu,sim}.json,
# image-reuse.txt}.
#
#   bash benchmarks/gpu_batching.sh [OUT]             # one NVIDIA GPU, at most 7.5 minutes
#                                                     # (each step has its own time limit:
#                                                     # a step that overruns is cut and
#                                                     # reported, the later ones still run)
#   DRY_RUN=1 bash benchmarks/gpu_batching.sh [OUT]   # the same steps, tiny, on the CPU
#                                                     # (part of `make test`)
#   COMPILE=0 ...                                     # skip torch.compile (faster warmup)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-batching-out}
PY=${PYTHON:-python}
mkdir -p "$OUT"
compile_flag=--compile
[ "${COMPILE:-1}" = 0 ] && compile_flag=--no-compile
status=0
# Per-step limits (seconds): 430 in all, so the script ends within 7.5 minutes.
step() {
  local limit=$1 name=$2
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  local code=$?
  [ "$code" = 124 ] && echo "gpu_batching: step $name cut at ${limit}s" | tee -a "$OUT/cut.txt"
  return "$code"
}
if [ "${DRY_RUN:-0}" = 1 ]; then
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/worker/inference -rA \
    | tee "$OUT/gpu-tests.txt" || status=1
  "$PY" benchmarks/bench_engine.py --config small --device cpu --batch-sizes 1,4 \
    --decode-tokens 8 --repeats 1 --skip-preprocess --json "$OUT/engine.json" || status=1
  "$PY" benchmarks/bench_batching.py --gpu --config small --device cpu --levels 1,2 \
    --tasks 4 --new-tokens 8 --no-compile --json "$OUT/batching.json" || status=1
  "$PY" benchmarks/bench_host_overhead.py --device cpu --config small --batches 1,2 \
    --new-tokens 8 --warmup 0.5 --seconds 1 --no-compile --json "$OUT/host-overhead-gpu.json" \
    || status=1
  "$PY" benchmarks/bench_host_overhead.py --batches 1,4 --warmup 0.5 --seconds 1 \
    --json "$OUT/host-overhead-sim.json" || status=1
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  step 90 gpu-tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/worker/inference -rA \
    | tee "$OUT/gpu-tests.txt" || status=1
  step 70 engine "$PY" benchmarks/bench_engine.py --batch-sizes 1,4,8,16 --decode-tokens 64 \
    "$compile_flag" --json "$OUT/engine.json" || status=1
  step 110 batching "$PY" benchmarks/bench_batching.py --gpu --levels 1,8,16 --tasks 32 \
    --new-tokens 200 "$compile_flag" --json "$OUT/batching.json" || status=1
  step 70 host-gpu "$PY" benchmarks/bench_host_overhead.py --device cuda --batches 1,8,16,32 \
    --warmup 2 --seconds 4 "$compile_flag" --json "$OUT/host-overhead-gpu.json" || status=1
  model=h100
  grep -qi h200 "$OUT/gpu.txt" && model=h200
  step 30 host-sim "$PY" benchmarks/bench_host_overhead.py --device-model "$model" \
    --batches 1,8,16,32 --warmup 1 --seconds 4 --json "$OUT/host-overhead-sim.json" || status=1
  step 60 image-reuse "$PY" benchmarks/bench_image_reuse.py --device cuda --rounds 5 \
    | tee "$OUT/image-reuse.txt" || status=1
fi
echo "gpu_batching: results in $OUT (status $status)"
exit $status
