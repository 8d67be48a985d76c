#!/usr/bin/env bash
# One call on the GPU machine, sized to fit one device command of 10 minutes (on an H200 with
# 16 cores the build took 66-77 s, the CUDA tests 84-97 s, memcheck over float32 about 30 s and
# these benchmarks without bench_cbam's about 3 minutes; racecheck, initcheck and bench_cbam not
# yet timed): build with CUDA, the CUDA tests (pytest -m cuda, including the large-tensor and
# determinism tests), compute-sanitizer over every operator, forward and backward, and the GPU
# benchmarks. The CPU tests are CI's (make test); GPU_CHECK_ALL_TESTS=1 runs them here too.
# Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PYTHON=${PYTHON:-python3}
status=0
started=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - started )) s)"; }

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# The GPU machine has torch, ninja, pytest (with xdist and timeout) and reaches no package registry.
stage "build"
CNN_ATTENTION_CUDA=1 "$PYTHON" setup.py -q build_ext --inplace || exit 1

# One process per core: each CUDA test is small, and a crash takes down one worker, not the run.
parallel=()
if "$PYTHON" -c "import xdist, pytest_timeout" 2>/dev/null; then
  parallel=(-n "$(nproc)" --timeout 300)
fi
stage "CUDA tests"
"$PYTHON" -m pytest tests/python -q -m cuda -p no:cacheprovider -rfE "${parallel[@]}" || status=1
if [ "${GPU_CHECK_ALL_TESTS:-0}" = 1 ]; then
  stage "all Python tests on this machine"
  "$PYTHON" -m pytest tests/python -q -p no:cacheprovider "${parallel[@]}" || status=1
fi

# Without torch's caching allocator, so that memcheck sees each tensor's own bounds. float32
# only: every kernel is the same template for each dtype, and the sanitizer slows kernels down
# by orders of magnitude (memcheck over float32 took about 30 s on an H200).
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck initcheck; do
  stage "compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    "$PYTHON" tests/sanitize/run_ops.py --dtypes float32 || status=1
done

stage "GPU benchmarks"
for dtype in float32 bfloat16; do
  "$PYTHON" benchmarks/bench_channel_attention.py --device cuda --dtype "$dtype" --repeat 50 || status=1
  echo
done
"$PYTHON" benchmarks/bench_spatial_attention.py --device cuda --dtype float32 --repeat 50 || status=1
echo
"$PYTHON" benchmarks/bench_cbam.py --device cuda --repeat 30 --no-compile || status=1
echo
"$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16 --batch 8 --channels 256 --heads 4 --sizes 32,64 || status=1
echo
"$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16 || status=1
stage "done"
exit $status
