#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, the CUDA tests (pytest -m cuda, including the
# large-tensor and determinism tests), compute-sanitizer over every operator, forward and
# backward, and the GPU benchmarks. The CPU tests are CI's (make test); GPU_CHECK_ALL_TESTS=1
# runs them here too.
#
# A session's device time is short (15 minutes, a machine's start included; one command at most
# 10), so the stages run in order of importance within a budget, GPU_CHECK_BUDGET_S seconds
# (default 480): each stage is stopped at what is left of it, and one that would start with less
# than it needs is skipped and named at the end. Measured on an H200 with 16 cores: the build
# 66-77 s, the CUDA tests 84-97 s, memcheck over float32 about 30 s, the benchmarks other than
# bench_cbam about 3 minutes; racecheck, initcheck and bench_cbam on CUDA not yet timed.
#
# Where OUT is set (the device tool's folder that comes back), the whole output also goes to
# $OUT/gpu_check.log and the CUDA tests' results to $OUT/cuda_tests.xml: the tool's reply keeps
# only the output's last 12,000 characters.
# Usage: bash scripts/gpu_check.sh   (through the device tool: a timeout_s above the budget)
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-480}
if [ -n "${OUT:-}" ]; then
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  tee_pid=$!
  # The log complete before the tool collects $OUT.
  trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT
fi
status=0
started=$(date +%s)
failed=()
skipped=()

elapsed() { echo $(($(date +%s) - started)); }
joined() {
  local out="" item
  for item in "$@"; do out+="${out:+; }$item"; done
  echo "${out:-none}"
}
# run_stage NAME NEEDS CAP COMMAND...: COMMAND under a timeout of what is left of the budget (at
# most CAP seconds), or skipped where less than NEEDS seconds are left.
run_stage() {
  local name=$1 needs=$2 cap=$3
  shift 3
  local left=$((budget - $(elapsed)))
  if ((left < needs)); then
    echo "== $name: skipped, $left s of the budget left"
    skipped+=("$name")
    return 0
  fi
  local limit=$((left < cap ? left : cap))
  echo "== $name ($(elapsed) s; at most $limit s)"
  timeout "$limit" "$@"
  local rc=$?
  if ((rc == 124)); then
    echo "== $name: stopped after $limit s"
    failed+=("$name (stopped)")
    status=1
  elif ((rc != 0)); then
    failed+=("$name")
    status=1
  fi
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# The GPU machine has torch, ninja, pytest (with xdist and timeout) and reaches no package registry.
echo "== build ($(elapsed) s)"
CNN_ATTENTION_CUDA=1 "$PYTHON" setup.py -q build_ext --inplace || exit 1

# One process per core: each CUDA test is small, and a crash takes down one worker, not the run.
pytest_args=(-q -p no:cacheprovider -rfE)
if "$PYTHON" -c "import xdist, pytest_timeout" 2>/dev/null; then
  pytest_args+=(-n "$(nproc)" --timeout 300)
fi
cuda_test_args=("${pytest_args[@]}")
if [ -n "${OUT:-}" ]; then
  cuda_test_args+=(--junitxml "$OUT/cuda_tests.xml")
fi
run_stage "CUDA tests" 120 600 "$PYTHON" -m pytest tests/python -m cuda "${cuda_test_args[@]}"

# Without torch's caching allocator, so that memcheck sees each tensor's own bounds. float32
# only: every kernel is the same template for each dtype, and the sanitizer slows kernels down
# by orders of magnitude.
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
sanitize=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --error-exitcode 1 --tool)
ops=("$PYTHON" tests/sanitize/run_ops.py --dtypes float32)
run_stage "compute-sanitizer memcheck" 60 240 "${sanitize[@]}" memcheck "${ops[@]}"
# cbam's CUDA kernels first: they have never been timed.
run_stage "bench_cbam" 60 150 "$PYTHON" benchmarks/bench_cbam.py --device cuda --repeat 30 --no-compile
run_stage "compute-sanitizer racecheck" 60 150 "${sanitize[@]}" racecheck "${ops[@]}"
run_stage "bench_channel_attention float32" 45 120 \
  "$PYTHON" benchmarks/bench_channel_attention.py --device cuda --dtype float32 --repeat 50
run_stage "bench_spatial_attention float32" 45 120 \
  "$PYTHON" benchmarks/bench_spatial_attention.py --device cuda --dtype float32 --repeat 50
run_stage "bench_self_attention bfloat16, deep stage" 45 120 \
  "$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16 --batch 8 --channels 256 \
  --heads 4 --sizes 32,64
run_stage "bench_self_attention bfloat16" 45 120 \
  "$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16
run_stage "bench_channel_attention bfloat16" 45 120 \
  "$PYTHON" benchmarks/bench_channel_attention.py --device cuda --dtype bfloat16 --repeat 50
run_stage "compute-sanitizer initcheck" 60 150 "${sanitize[@]}" initcheck "${ops[@]}"
if [ "${GPU_CHECK_ALL_TESTS:-0}" = 1 ]; then
  run_stage "all Python tests on this machine" 120 600 "$PYTHON" -m pytest tests/python "${pytest_args[@]}"
fi

echo "== done ($(elapsed) s of a $budget s budget)"
echo "failed: $(joined "${failed[@]}")"
echo "skipped: $(joined "${skipped[@]}")"
exit $status
