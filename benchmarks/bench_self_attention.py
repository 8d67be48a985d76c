"""Self attention (non-local / SAGAN block) side by side, in one run: ours vs the eager block
users write vs the same block on scaled_dot_product_attention vs torch.compile of the eager
block (vs SDPA alone on CUDA), forward and forward+backward, time and peak memory, over
feature-map sizes. Every candidate holds a copy of the same weights; gamma is 0.5 so that the
attention branch counts in y = x + gamma * out.

- ours: the cnn_attention.SelfAttention module.
- eager block: 1x1 projections, q as (N*H, P, d), k as (N*H, d, P),
  `attn = softmax(bmm(q, k) * scale, -1)`, `out = bmm(v, attn^T)`, output projection, residual.
  It materialises the (N*H, P, P) matrix; skipped where that exceeds --max-matrix-gib.
- eager SDPA module: the same projections, `F.scaled_dot_product_attention` on (N, H, P, d).
  Where SDPA picks its math backend (on CPU whenever the query and value head dims differ, as
  with the default qk_reduction=8) it holds the P x P matrix too and is skipped alike.
- compile(eager block): torch.compile of the eager block (static shapes).
- raw SDPA (CUDA only): `F.scaled_dot_product_attention` alone on precomputed (N, H, P, d)
  Q, K, V: the attention core without projections, the floor ours is compared to.

Peak memory is the most memory held at once during one call beyond what was held before it,
measured in a separate, untimed call: on CUDA from the caching allocator's statistics, on CPU
from the profiler's allocation events (profiling distorts time). "QKV+out" is the size of Q,
K, V and the output, N * P * (2 * qk_dim + v_dim + C) elements: an O(P) operator's peak is a
small multiple of it; the P x P matrix grows as P^2.

    python benchmarks/bench_self_attention.py                  # CPU, float32, N=4, C=64, P=32^2..128^2
    python benchmarks/bench_self_attention.py --device cuda --dtype bfloat16
    python benchmarks/bench_self_attention.py --json out/sa.json --plot docs/self_attention_cpu.png
"""

import argparse
import contextlib
import gc
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import interleaved_ms, sync  # noqa: E402

# The candidates that hold the (N*H, P, P) attention matrix; those on SDPA also, where SDPA
# picks its math backend (on CPU where the query and value head dims differ).
MATERIALISING = ("eager block", "compile(eager block)")
SDPA = ("eager SDPA module", "raw SDPA")


class EagerProjections(nn.Module):
    """A copy of ours' weights and the 1x1 projections around the attention core, as users
    write them with nn.Conv2d (one convolution for q, k and v, split afterwards)."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        for name in ("qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma"):
            setattr(self, name, nn.Parameter(getattr(ours, name).detach().clone()))
        self.qk_dim, self.v_dim, self.num_heads = ours.qk_dim, ours.v_dim, ours.num_heads
        self.scale = 1.0 / math.sqrt(self.qk_dim // self.num_heads)

    @staticmethod
    def conv1x1(x, weight, bias):
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        return conv(x, weight.view(weight.shape + (1,) * (x.dim() - 2)), bias)

    def qkv(self, x):
        """q, k, v as (N, qk_dim, P), (N, qk_dim, P), (N, v_dim, P)."""
        qkv = self.conv1x1(x, self.qkv_weight, self.qkv_bias).flatten(2)
        return qkv.split([self.qk_dim, self.qk_dim, self.v_dim], 1)

    def residual(self, x, heads):
        """heads: (N, v_dim, P), the heads concatenated along channels."""
        out = self.conv1x1(heads.reshape((x.shape[0], self.v_dim) + x.shape[2:]), self.out_weight, self.out_bias)
        return x + self.gamma * out


class EagerBlock(EagerProjections):
    def forward(self, x):
        n, h = x.shape[0], self.num_heads
        q, k, v = self.qkv(x)
        positions = q.shape[-1]
        q = q.reshape(n * h, self.qk_dim // h, positions).transpose(1, 2)
        k = k.reshape(n * h, self.qk_dim // h, positions)
        v = v.reshape(n * h, self.v_dim // h, positions)
        attn = torch.softmax(torch.bmm(q, k) * self.scale, -1)
        return self.residual(x, torch.bmm(v, attn.transpose(1, 2)))


class EagerSDPAModule(EagerProjections):
    def split_heads(self, t):
        """(N, H * d, P) -> (N, H, P, d), contiguous: the fused SDPA kernels take only inputs
        whose last dim has stride 1 and fall back to the math path (the P x P matrix) otherwise."""
        n, hd, positions = t.shape
        return t.reshape(n, self.num_heads, hd // self.num_heads, positions).transpose(-1, -2).contiguous()

    def forward(self, x):
        q, k, v = (self.split_heads(t) for t in self.qkv(x))
        heads = F.scaled_dot_product_attention(q, k, v)  # (N, H, P, v_dim / H); scale 1/sqrt(d)
        return self.residual(x, heads.transpose(-1, -2).reshape(x.shape[0], self.v_dim, -1))


def sdpa_backend(q, k, v) -> str:
    """The backend F.scaled_dot_product_attention picks for these inputs, with and without
    gradients ("MATH" if either is: it holds the P x P matrix)."""
    picks = set()
    for grad in (False, True):
        qkv = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        picks.add(SDPBackend(torch._fused_sdp_choice(*qkv)).name)
    return "MATH" if "MATH" in picks else "/".join(sorted(picks))


def module_calls(module, x, grad):
    """(forward, forward+backward) calls of a module, as common.measure_all times them."""
    xg = x.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        # As for an activation inside a network: x's gradient is stored, not accumulated.
        xg.grad = None
        module(xg).backward(grad)

    return forward, forward_backward, lambda: setattr(xg, "grad", None)


def sdpa_calls(q, k, v):
    qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
    with torch.no_grad():
        grad = torch.randn_like(F.scaled_dot_product_attention(q, k, v))

    def clear():
        for t in qkv:
            t.grad = None

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        clear()
        F.scaled_dot_product_attention(*qkv).backward(grad)

    return forward, forward_backward, clear


@contextlib.contextmanager
def quiet_stderr():
    """Silences the profiler's start/stop lines, which kineto writes to fd 2 from C++."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, clear, device: str) -> int:
    """Most bytes held at once during fn() beyond those held before it."""
    clear()  # a stale gradient freed inside the call would hide as much of the peak on CUDA
    gc.collect()
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    # The allocation events in time order ("[memory]", + for an allocation, - for a free;
    # frees of blocks allocated before the profile are not reported). prof.events() folds the
    # events inside an operator into its totals, so read the raw kineto events.
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def parse_size(text: str):
    return tuple(int(s) for s in text.lower().split("x")) if "x" in text.lower() else (int(text),) * 2


def default_repeat(device: str, positions: int) -> int:
    # The 2-core development machine: the eager block at 64x64 takes seconds per fwd+bwd.
    return 50 if device == "cuda" else max(2, min(20, round(20 * 1024 / positions)))


def run_size(args, ours, found, size, device, dtype):
    n, c = args.batch, args.channels
    positions = math.prod(size)
    x = torch.randn((n, c) + size, device=device, dtype=dtype)
    element = x.element_size()
    qkv_out = n * positions * (2 * ours.qk_dim + ours.v_dim + c) * element
    matrix = n * ours.num_heads * positions * positions * element
    repeat = args.repeat or default_repeat(device, positions)
    warmup = 3 if device == "cuda" or positions <= 1024 else 1
    with torch.no_grad():
        y_ours = ours(x)
        sdpa_module = found["eager SDPA module"]
        q, k, v = (sdpa_module.split_heads(t) for t in sdpa_module.qkv(x))
    grad = torch.randn_like(y_ours)
    backend = sdpa_backend(q, k, v)
    candidates = dict(found, **({"raw SDPA": None} if device == "cuda" else {}))
    calls, results = {}, {}
    for name, module in candidates.items():
        holds_matrix = name in MATERIALISING or (name in SDPA and backend == "MATH")
        if holds_matrix and matrix > args.max_matrix_gib * 2**30:
            results[name] = {"skipped": f"P x P matrix of {matrix / 2**30:.2f} GiB"}
            continue
        results[name] = {"skipped": None, "sdpa_backend": backend if name in SDPA else None}
        if module is None:
            calls[name] = sdpa_calls(q, k, v)
            continue
        with torch.no_grad():
            diff = (module(x).float() - y_ours.float()).abs().max().item() if module is not ours else 0.0
        calls[name] = module_calls(module, x, grad)
        results[name]["max_abs_diff_vs_ours"] = diff
    fwd = interleaved_ms({name: f for name, (f, _, _) in calls.items()}, device, repeat, warmup)
    both = interleaved_ms({name: b for name, (_, b, _) in calls.items()}, device, repeat, warmup)
    for name, (f, b, clear) in calls.items():
        results[name].update(forward_ms=list(fwd[name]), fwd_bwd_ms=list(both[name]),
                             peak_forward_bytes=peak_bytes(f, clear, device),
                             peak_fwd_bwd_bytes=peak_bytes(b, clear, device))
    return {"size": list(size), "positions": positions, "repeat": repeat, "qkv_out_bytes": qkv_out,
            "matrix_bytes": matrix, "sdpa_backend": backend, "candidates": results}


def print_size(entry) -> None:
    size = "x".join(map(str, entry["size"]))
    qkv_out = entry["qkv_out_bytes"]
    print(f"## P = {size} = {entry['positions']}, repeat {entry['repeat']}; "
          f"QKV+out = {qkv_out / 2**20:.2f} MiB; the P x P matrix would be {entry['matrix_bytes'] / 2**20:.0f} MiB")
    print()
    print("| candidate | forward ms | fwd+bwd ms | forward: this / ours | fwd+bwd: this / ours "
          "| peak MiB fwd / fwd+bwd | peak / (QKV+out) fwd / fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    results = entry["candidates"]
    base = results.get("ours", {})

    def ratio(r, key):
        if base.get(key) is None:
            return ""
        return f"{r[key][0] / base[key][0]:.2f}x / {r[key][1] / base[key][1]:.2f}x"

    for name, r in results.items():
        if r["skipped"]:
            print(f"| {name} | skipped ({r['skipped']}) | | | | | |")
            continue
        pf, pb = r["peak_forward_bytes"], r["peak_fwd_bwd_bytes"]
        print(f"| {name} | {r['forward_ms'][0]:.3f} / {r['forward_ms'][1]:.3f} "
              f"| {r['fwd_bwd_ms'][0]:.3f} / {r['fwd_bwd_ms'][1]:.3f} | {ratio(r, 'forward_ms')} "
              f"| {ratio(r, 'fwd_bwd_ms')} | {pf / 2**20:.2f} / {pb / 2**20:.2f} "
              f"| {pf / qkv_out:.2f}x / {pb / qkv_out:.2f}x |")
    diffs = [f"{name} {r['max_abs_diff_vs_ours']:.2e}" for name, r in results.items()
             if not r["skipped"] and r.get("max_abs_diff_vs_ours") is not None and name != "ours"]
    print()
    if diffs:
        print(f"max |y - y_ours| (forward): {', '.join(diffs)}.")
    holds = " (it holds the P x P matrix)" if entry["sdpa_backend"] == "MATH" else ""
    print(f"SDPA picks {entry['sdpa_backend']}{holds}.")
    print()


def plot(report, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    entries = report["sizes"]
    names = list(dict.fromkeys(name for e in entries for name in e["candidates"]))
    for index, name in enumerate(names):
        color = f"C{index}"
        points = [(e["positions"], e["candidates"][name]) for e in entries
                  if name in e["candidates"] and not e["candidates"][name]["skipped"]]
        if not points:
            continue
        ps = [p for p, _ in points]
        time_ax.plot(ps, [r["fwd_bwd_ms"][1] for _, r in points], "o-", color=color, label=f"{name}, fwd+bwd")
        time_ax.plot(ps, [r["forward_ms"][1] for _, r in points], "s--", color=color, label=f"{name}, forward")
        mem_ax.plot(ps, [r["peak_fwd_bwd_bytes"] / 2**20 for _, r in points], "o-", color=color,
                    label=f"{name}, fwd+bwd")
        mem_ax.plot(ps, [max(r["peak_forward_bytes"], 1) / 2**20 for _, r in points], "s--", color=color,
                    label=f"{name}, forward")
    ps = [e["positions"] for e in entries]
    mem_ax.plot(ps, [e["qkv_out_bytes"] / 2**20 for e in entries], "k:", label="QKV+out")
    labels = ["x".join(map(str, e["size"])) for e in entries]
    for ax, ylabel in ((time_ax, "ms, min over the rounds"), (mem_ax, "peak MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ps, labels)
        ax.minorticks_off()
        ax.set_xlabel("P (feature map)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    time_ax.set_title("time")
    mem_ax.set_title("peak memory beyond the inputs")
    mem_ax.legend(fontsize=7, loc="upper left")
    c = report["config"]
    fig.suptitle(f"self attention, {c['device']} {c['dtype']}, N={c['batch']}, C={c['channels']}, "
                 f"heads {c['heads']}, qk_dim {c['qk_dim']}, v_dim {c['v_dim']}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--sizes", default="32,64,128", help="feature maps, S (S x S) or HxW, comma-separated")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds per size (default: 50 on CUDA; 20 at 32x32, 5 at 64x64, 2 at 128x128 on CPU)")
    parser.add_argument("--max-matrix-gib", type=float, default=3.0,
                        help="skip the materialising candidates where the P x P matrix exceeds this")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="write every result to this file")
    parser.add_argument("--plot", help="draw time and peak memory vs P to this PNG (matplotlib)")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    # One compiled block serves every size and grad mode, each a recompilation (static shapes:
    # automatic dynamic shapes would make the later sizes run generic code).
    torch._dynamo.config.recompile_limit = 64
    ours = cnn_attention.SelfAttention(args.channels, num_heads=args.heads).to(device, dtype)
    with torch.no_grad():
        ours.gamma.fill_(0.5)
    found = {"ours": ours, "eager block": EagerBlock(ours), "eager SDPA module": EagerSDPAModule(ours)}
    if not args.no_compile:
        found["compile(eager block)"] = torch.compile(found["eager block"], dynamic=False)
    config = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "CPU",
              "dtype": args.dtype, "batch": args.batch, "channels": args.channels, "heads": args.heads,
              "qk_dim": ours.qk_dim, "v_dim": ours.v_dim, "kv_stride": ours.kv_stride, "gamma": 0.5,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"# self attention, {device} ({config['device_name']}), {args.dtype}, N={args.batch}, C={args.channels}, "
          f"heads {args.heads}, qk_dim {ours.qk_dim}, v_dim {ours.v_dim}, kv_stride {ours.kv_stride}, gamma 0.5, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    print("Times in ms as median / min over the rounds; this / ours > 1: ours is faster. Peak: the most memory "
          "held at once during one call beyond what was held before it (forward under no_grad; fwd+bwd with "
          "x's gradient stored and the parameter gradients accumulated).")
    print()
    report = {"config": config, "sizes": []}
    for text in args.sizes.split(","):
        entry = run_size(args, ours, found, parse_size(text), device, dtype)
        report["sizes"].append(entry)
        print_size(entry)
        sys.stdout.flush()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"json: {args.json}")
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
