#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the CUDA tests (pytest -m cuda, including
# the large-tensor and determinism tests), compute-sanitizer over every operator, and the GPU
# benchmarks. Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS=${MAX_JOBS:-16}
PYTHON=${PYTHON:-python3}
status=0

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# The GPU machine has torch, ninja, pytest and tqdm and reaches no package registry.
CNN_ATTENTION_CUDA=1 "$PYTHON" setup.py -q build_ext --inplace || exit 1

echo "== CUDA tests"
"$PYTHON" -m pytest tests/python -q -m cuda -x || status=1
echo "== all Python tests on this machine"
"$PYTHON" -m pytest tests/python -q -x || status=1

echo "== compute-sanitizer over every operator, forward and backward"
# Without torch's caching allocator, so that memcheck sees each tensor's own bounds.
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck initcheck; do
  echo "-- $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool" --error-exitcode 1 \
    "$PYTHON" tests/sanitize/run_ops.py || status=1
done

echo "== GPU benchmarks"
for dtype in float32 bfloat16; do
  "$PYTHON" benchmarks/bench_channel_attention.py --device cuda --dtype "$dtype" --repeat 100 || status=1
  echo
done
"$PYTHON" benchmarks/bench_channel_attention.py --device cuda --dtype float32 --channels-last --repeat 100 || status=1
echo
"$PYTHON" benchmarks/bench_channel_pool.py --device cuda --dtype bfloat16 --repeat 100 || status=1
echo
for dtype in float32 bfloat16; do
  "$PYTHON" benchmarks/bench_spatial_attention.py --device cuda --dtype "$dtype" --repeat 100 || status=1
  echo
done
"$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16 --batch 8 --channels 256 --heads 4 --sizes 64 || status=1
echo
"$PYTHON" benchmarks/bench_self_attention.py --device cuda --dtype bfloat16 || status=1
echo
exit $status
