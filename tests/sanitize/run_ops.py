"""Every operator of the operator table (tests/shared/operators.py), every variant, forward and
backward, over a few dtypes, layouts and shapes (odd sizes, one position, both self-attention
CUDA paths): the workload that scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, initcheck). Small on purpose: the sanitizer slows kernels down by orders of
magnitude.

    python tests/sanitize/run_ops.py [--device cuda|cpu]
"""

import argparse
import os
import sys

import torch

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(TESTS, "..", "python"), os.path.join(TESTS, "python"), os.path.join(TESTS, "shared")]

import cnn_attention  # noqa: E402,F401
from operators import all_samples  # noqa: E402

SHAPES = [(2, 5, 7, 9), (1, 3, 1, 1), (3, 16, 12, 10), (2, 4, 33)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16,float64",
                        help="comma-separated; fewer dtypes for a shorter run")
    args = parser.parse_args()
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    generator = torch.Generator().manual_seed(0)
    calls = 0
    for dtype in dtypes:
        for layout in ["contiguous", "channels_last"]:
            for shape in SHAPES:
                for sample in all_samples(shape, dtype, args.device, layout, generator):
                    leaves = sample.leaves()
                    out = sample.output(sample.call(leaves))
                    torch.autograd.grad(out, sample.inputs_to_differentiate(leaves), torch.randn_like(out))
                    calls += 1
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"run_ops: {calls} operator calls (forward and backward) on {args.device}")


if __name__ == "__main__":
    main()
