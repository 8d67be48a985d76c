"""channel_pool side by side, in one run: ours vs the eager composition CBAM users write
(`torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)`) vs torch.compile of it,
forward and forward+backward.

    python benchmarks/bench_channel_pool.py                  # CPU, float32, (8, 64, 112, 112)
    python benchmarks/bench_channel_pool.py --device cuda --dtype bfloat16
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402,F401
from common import block_arguments, measure_all, print_table  # noqa: E402


class EagerChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)


class OurChannelPool(nn.Module):
    def forward(self, x):
        return cnn_attention.functional.channel_pool(x)


def main() -> None:
    args = block_arguments(__doc__, "8,64,112,112").parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    rows = []
    for layout in ("contiguous", "channels_last"):
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn((shape[0], 2) + shape[2:], device=device, dtype=dtype)
        candidates = {"cnn_attention": OurChannelPool(), "eager cat(mean, amax)": EagerChannelPool()}
        if not args.no_compile:
            candidates["torch.compile(eager)"] = torch.compile(EagerChannelPool())
        rows.append((layout, measure_all(candidates, x, grad, device, args.repeat)))
    print(f"# channel_pool, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{args.dtype}, x={shape}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    print_table(rows, "layout")


if __name__ == "__main__":
    main()
