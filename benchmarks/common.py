"""Timing helpers shared by the benchmarks: round-robin timing of candidates side by side,
median and minimum per candidate, and the markdown table every benchmark prints."""

import argparse
import ctypes
import ctypes.util
import random
import statistics
import time

import torch


def keep_freed_memory() -> None:
    """Have glibc's malloc keep what the process frees (no trimming of the heap's top, blocks
    up to 32 MiB from the heap), so that a block of the size just freed is reused instead of
    mapped again. Otherwise whether a 25 MiB activation is mapped afresh, and its 6000 pages
    faulted in (about 10 ms on the development machine), in every call depends on the heap's
    layout, which differs from process to process: cbam's backward pass that writes grad_x
    at (8, 256, 56, 56) took 2 ms in some processes and 12 ms in others. Every candidate
    runs under the same setting; importing this module applies it."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    libc.mallopt(m_mmap_threshold, 32 * 2**20)


keep_freed_memory()


def block_arguments(description: str, shape: str) -> argparse.ArgumentParser:
    """The options every per-block benchmark takes: device, dtype, the shape of x (default
    `shape`), calls per candidate, and whether to leave out the torch.compile baselines."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shape", default=shape)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baselines")
    return parser


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int, warmup: int = 3) -> float:
    return interleaved_ms({"fn": fn}, device, repeat, warmup)["fn"][0]


def interleaved_ms(fns, device: str, repeat: int, warmup: int = 3):
    """(median, min) time of each function, timed round-robin (one call of each per round)
    so that slow phases of a shared machine hit every candidate alike. The min is the
    cost without interference; the median what a typical call saw.

    Each round takes the candidates in a new order (a fixed-seed shuffle): a call finds the
    caches as the call before it left them, and in a fixed order the first candidate of every
    round always followed the round's last (a large eager block, say), while the others
    followed a smaller one. At (8, 1024, 8, 8) our CBAM module's forward+backward took 0.82
    ms (minimum) first in rounds behind timm's eager block and 0.64 ms second."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def first_output(output):
    """A module's output, or the first of several (y of an operator that also returns outputs
    without a gradient, as hard_attention's mask)."""
    return output[0] if isinstance(output, tuple) else output


def measure_all(modules, x: torch.Tensor, grad: torch.Tensor, device: str, repeat: int, references=None):
    """{name: ((forward median, min), (forward+backward median, min))} in ms, side by side.
    The backward runs from the modules' first outputs (`first_output`). `references`
    ({name: function}) are timed in the forward+backward rounds as well, and returned as
    {name: (median, min)} after the modules' results."""
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
            first_output(module(xg)).backward(grad)

        return run

    fwd = interleaved_ms({n: forward(m) for n, m in modules.items()}, device, repeat)
    both = interleaved_ms({**{n: forward_backward(m) for n, m in modules.items()}, **(references or {})}, device,
                          repeat)
    results = {n: (fwd[n], both[n]) for n in modules}
    return (results, {n: both[n] for n in references}) if references is not None else results


def print_table(rows, group_label: str) -> None:
    """rows: [(group, {name: ((fwd median, min), (fwd+bwd median, min))})]; the candidate
    whose name starts with "eager" is the baseline of the ratios."""
    print("Times in ms as median / min over the rounds; ratios > 1: ours is faster.")
    print()
    print(f"| {group_label} | implementation | forward ms | fwd+bwd ms | forward: eager / this | fwd+bwd: eager / this |")
    print("|---|---|---|---|---|---|")

    def pair(a, b):
        return f"{a[0]:.3f} / {a[1]:.3f}" if b is None else f"{b[0] / a[0]:.2f}x / {b[1] / a[1]:.2f}x"

    for group, results in rows:
        eager_name = [n for n in results if n.startswith("eager")][0]
        eager_f, eager_b = results[eager_name]
        for name, (f, b) in results.items():
            print(f"| {group} | {name} | {pair(f, None)} | {pair(b, None)} | {pair(f, eager_f)} | {pair(b, eager_b)} |")
        if "torch.compile(eager)" in results:
            (cf, cb), (of, ob) = results["torch.compile(eager)"], results["cnn_attention"]
            print(f"| {group} | ours vs torch.compile | | | {pair(of, cf)} | {pair(ob, cb)} |")
