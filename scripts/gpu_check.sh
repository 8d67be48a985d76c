#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the CUDA tests (pytest -m cuda and the
# C++ suite), run the GPU benchmarks, print a short table. Usage: bash scripts/gpu_check.sh
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
