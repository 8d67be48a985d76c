"""The score head's 2 -> 1 channel k x k convolution (SpatialScores) with a contiguous and a
channels-last input, forward and backward, side by side: why SpatialScores copies the pooled
map to channels-last on CPU.

    python benchmarks/bench_score_conv_layout.py    # CPU, float32, (8, 2, 112, 112), 7 x 7
"""

import argparse
import time

import torch
import torch.nn.functional as F


def median_ms(times):
    times = sorted(times)
    return times[len(times) // 2] * 1e3


def measure(x, weight, bias, padding, repeat):
    forward, backward = [], []
    for step in range(repeat + 5):
        start = time.perf_counter()
        y = F.conv2d(x, weight, bias, padding=padding)
        middle = time.perf_counter()
        y.sum().backward()
        end = time.perf_counter()
        if step >= 5:  # warm-up
            forward.append(middle - start)
            backward.append(end - middle)
    return median_ms(forward), median_ms(backward)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 2, 112, 112])
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(1, args.shape[1], args.kernel_size, args.kernel_size, requires_grad=True)
    bias = torch.randn(1, requires_grad=True)
    print(f"conv2d {tuple(args.shape)} -> 1 channel, {args.kernel_size} x {args.kernel_size}, "
          f"float32, median of {args.repeat}")
    print("| memory format | forward | backward |")
    print("|---|---|---|")
    for name, layout in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        x = torch.randn(*args.shape).contiguous(memory_format=layout).requires_grad_()
        forward, backward = measure(x, weight, bias, args.kernel_size // 2, args.repeat)
        print(f"| {name} | {forward:.2f} ms | {backward:.2f} ms |")


if __name__ == "__main__":
    main()
