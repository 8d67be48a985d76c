"""Channel attention side by side, in one run: ours vs the eager modules users write (timm's
SE block and CBAM's channel branch, 1x1 convolutions) vs torch.compile of those, forward and
forward+backward. On CUDA it also reports the bandwidth floor: forward moves at least 3|x|
bytes, backward 4|x|, at the copy bandwidth measured in the same run.

    python benchmarks/bench_channel_attention.py                 # CPU, float32, (8,256,56,56)
    python benchmarks/bench_channel_attention.py --device cuda --dtype bfloat16
"""

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402


class TimmSE(nn.Module):
    """timm's SEModule: mean, 1x1 conv, ReLU, 1x1 conv, sigmoid, multiply."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        s = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class TimmCbamChannel(nn.Module):
    """timm's CBAM ChannelAttn: the same MLP on the mean and on the max, summed."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x):
        avg = self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(torch.relu(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * torch.sigmoid(avg + mx)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int, warmup: int = 3) -> float:
    return interleaved_ms({"fn": fn}, device, repeat, warmup)["fn"][0]


def interleaved_ms(fns, device: str, repeat: int, warmup: int = 3):
    """(median, min) time of each function, timed round-robin (one call of each per round)
    so that slow phases of a shared machine hit every candidate alike. The min is the
    cost without interference; the median what a typical call saw."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def measure_all(modules, x: torch.Tensor, grad: torch.Tensor, device: str, repeat: int):
    """{name: ((forward median, min), (forward+backward median, min))} in ms, side by side."""
    xg = x.detach().requires_grad_(True)

    def forward(module):
        def run():
            with torch.no_grad():
                module(x)

        return run

    def forward_backward(module):
        def run():
            # As for an activation inside a network: x's gradient is stored, not accumulated.
            xg.grad = None
            module(xg).backward(grad)

        return run

    fwd = interleaved_ms({n: forward(m) for n, m in modules.items()}, device, repeat)
    both = interleaved_ms({n: forward_backward(m) for n, m in modules.items()}, device, repeat)
    return {n: (fwd[n], both[n]) for n in modules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shape", default="8,256,56,56")
    parser.add_argument("--reduction", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
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
    print("Times in ms as median / min over the rounds; ratios > 1: ours is faster.")
    print()
    print("| pool | implementation | forward ms | fwd+bwd ms | forward: eager / this | fwd+bwd: eager / this |")
    print("|---|---|---|---|---|---|")

    def pair(a, b):
        return f"{a[0]:.3f} / {a[1]:.3f}" if b is None else f"{b[0] / a[0]:.2f}x / {b[1] / a[1]:.2f}x"

    for pool, results in rows:
        eager_name = [n for n in results if n.startswith("eager")][0]
        eager_f, eager_b = results[eager_name]
        for name, (f, b) in results.items():
            print(f"| {pool} | {name} | {pair(f, None)} | {pair(b, None)} | {pair(f, eager_f)} | {pair(b, eager_b)} |")
        if "torch.compile(eager)" in results:
            (cf, cb), (of, ob) = results["torch.compile(eager)"], results["cnn_attention"]
            print(f"| {pool} | ours vs torch.compile | | | {pair(of, cf)} | {pair(ob, cb)} |")

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
