"""Every operator forward and backward over a few dtypes, layouts and shapes (odd sizes, one
position, both self-attention CUDA paths): the workload that scripts/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, initcheck). Small on purpose: the sanitizer slows
kernels down by orders of magnitude.

    python tests/sanitize/run_ops.py [--device cuda|cpu]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

import cnn_attention  # noqa: E402,F401

ops = torch.ops.cnn_attention
SHAPES = [(2, 5, 7, 9), (1, 3, 1, 1), (3, 16, 12, 10), (2, 4, 33)]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def backward(out: torch.Tensor, inputs) -> None:
    torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], torch.randn_like(out))


def leaf(shape, device, dtype, layout="contiguous") -> torch.Tensor:
    return in_layout(torch.randn(shape, device=device, dtype=dtype), layout).requires_grad_(True)


def run_spatial_and_channel_ops(shape, device, dtype, layout) -> int:
    n, c, spatial = shape[0], shape[1], shape[2:]
    x = leaf(shape, device, dtype, layout)
    calls = 0
    hidden = max(1, c // 2)
    weights = [leaf((hidden, c), device, dtype), leaf((hidden,), device, dtype),
               leaf((c, hidden), device, dtype), leaf((c,), device, dtype)]
    for pool in ["avg", "max", "avgmax"]:
        for gate in ["sigmoid", "softmax"]:
            backward(ops.channel_attention(x, *weights, pool, gate), [x] + weights)
            calls += 1
    backward(ops.channel_pool(x), [x])
    positions = 1
    for size in spatial:
        positions *= size
    for score_channels in [1, c]:
        scores = leaf((n, score_channels) + tuple(spatial), device, dtype, layout)
        for normalize in ["sigmoid", "softmax"]:
            backward(ops.soft_attention(x, scores, normalize, 0.7), [x, scores])
        backward(ops.soft_attention_pool(x, scores, 1.3), [x, scores])
        for mode in ["threshold", "topk"]:
            for estimator in ["sigmoid", "identity"]:
                y, _ = ops.hard_attention(x, scores, mode, 0.5, max(1, positions // 3), estimator, 1.0)
                backward(y, [x, scores])
        calls += 8
    return calls + 1


def run_self_attention(shape, device, dtype, layout) -> int:
    c = shape[1]
    calls = 0
    x = leaf(shape, device, dtype, layout)
    # (qk_dim, v_dim, heads): head widths divisible by 8 take torch's memory-efficient
    # kernel on CUDA, the others (and float64) our fallback kernel.
    for qk, v, heads in [(16, 16, 2), (2, c, 1), (4, 6, 2)]:
        if heads > min(qk, v) or qk % heads or v % heads:
            continue
        params = [leaf((2 * qk + v, c), device, dtype), leaf((2 * qk + v,), device, dtype),
                  leaf((c, v), device, dtype), leaf((c,), device, dtype), leaf((1,), device, dtype)]
        for kv_stride in [1, 2]:
            if kv_stride > min(shape[2:]):
                continue
            backward(ops.self_attention(x, *params, qk, heads, kv_stride), [x] + params)
            calls += 1
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    calls = 0
    for dtype in [torch.float32, torch.bfloat16, torch.float64]:
        for layout in ["contiguous", "channels_last"]:
            for shape in SHAPES:
                calls += run_spatial_and_channel_ops(shape, args.device, dtype, layout)
                calls += run_self_attention(shape, args.device, dtype, layout)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"run_ops: {calls} operator calls (forward and backward) on {args.device}")


if __name__ == "__main__":
    main()
