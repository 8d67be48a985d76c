"""Channel attention side by side, in one run: ours vs the eager modules users write (timm's
SE block and CBAM's channel branch, 1x1 convolutions) vs torch.compile of those, forward and
forward+backward. On CUDA it also reports the bandwidth floor: forward moves at least 3|x|
bytes, backward 4|x|, at the copy bandwidth measured in the same run.

    python benchmarks/bench_channel_attention.py                 # CPU, float32, (8,256,56,56)
    python benchmarks/bench_channel_attention.py --device cuda --dtype bfloat16
"""

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import block_arguments, measure_all, median_ms, print_table  # noqa: E402


class TimmSE(nn.Module):
    """timm's SEModule: mean, 1x1 conv, ReLU, 1x1 conv, sigmoid, multiply."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class TimmCbamChannel(TimmSE):
    """timm's CBAM ChannelAttn: the same MLP on the mean and on the max, summed."""

    def forward(self, x):
        avg = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(torch.relu(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


def main() -> None:
    parser = block_arguments(__doc__, "8,256,56,56")
    parser.add_argument("--reduction", type=int, default=16)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    device, dtype = args.device, getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    channels = shape[1]
    hidden = max(channels // args.reduction, 8)
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, dtype=dtype)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)

    rows = []
    for pool, eager_cls in (("avg", TimmSE), ("avgmax", TimmCbamChannel)):
        ours = cnn_attention.ChannelAttention(channels, reduction=args.reduction, pool=pool).to(device, dtype)
        eager = eager_cls(channels, hidden).to(device, dtype)
        candidates = {"cnn_attention": ours, "eager " + eager_cls.__name__: eager}
        if not args.no_compile:
            candidates["torch.compile(eager)"] = torch.compile(eager)
        results = measure_all(candidates, x, grad, device, args.repeat)
        rows.append((pool, results))

    print(f"# channel attention, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{args.dtype}, x={shape}{' channels_last' if args.channels_last else ''}, R={hidden}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    print_table(rows, "pool")

    if device == "cuda":
        nbytes = x.numel() * x.element_size()
        copy_ms = median_ms(lambda: x.clone(), device, args.repeat)
        bandwidth = 2 * nbytes / (copy_ms * 1e-3)
        (of, _), (ob, _) = rows[-1][1]["cnn_attention"]  # medians
        floor_f = 3 * nbytes / bandwidth * 1e3
        floor_b = 4 * nbytes / bandwidth * 1e3
        print()
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; avgmax forward {of:.3f} ms = {of / floor_f:.2f}x "
              f"its 3|x| floor ({floor_f:.3f} ms); backward (fwd+bwd - fwd) {ob - of:.3f} ms = "
              f"{(ob - of) / floor_b:.2f}x its 4|x| floor ({floor_b:.3f} ms)")


if __name__ == "__main__":
    main()
