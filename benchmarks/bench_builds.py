"""Two builds of cnn_attention side by side: the same operator calls timed in one process per
build, the builds alternating round after round (each first in every other round), so that
what a change costs (or saves) is measured under the same conditions. Each round runs every
case of one build in a fresh child process and keeps the minimum over its calls; the table
gives, per case, the median over the rounds of those minimums and the ratio new / old (> 1:
the new build is slower).

    python benchmarks/bench_builds.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 3] [--repeat 10] [--only TEXT]

A checkout is a source tree whose extension is built in place (`make build`, or
`python setup.py build_ext --inplace`); git worktree gives one for an older commit.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

# name -> the call, written against `ops = torch.ops.cnn_attention` (or a module of the
# build's `cnn_attention`) and inputs made in the child; float32, 2 intra-op threads.
CASES = {
    "channel_attention avgmax (8,256,56,56) fwd+bwd": ("channel", (8, 256, 56, 56), 16, "avgmax"),
    "channel_attention avg (32,2048,7,7) fwd+bwd": ("channel", (32, 2048, 7, 7), 16, "avg"),
    "channel_attention avg (32,2048,7,7) fwd": ("channel_fwd", (32, 2048, 7, 7), 16, "avg"),
    "channel_attention avg (8,2048,4,4) fwd": ("channel_fwd", (8, 2048, 4, 4), 16, "avg"),
    "channel_attention avg (8,2048,4,4) fwd+bwd": ("channel", (8, 2048, 4, 4), 16, "avg"),
    "cbam (8,256,56,56) fwd": ("cbam_fwd", (8, 256, 56, 56)),
    "cbam (8,256,56,56) fwd+bwd": ("cbam", (8, 256, 56, 56)),
    "cbam channels_last (8,256,56,56) fwd+bwd": ("cbam_last", (8, 256, 56, 56)),
    "cbam (8,2048,4,4) fwd+bwd": ("cbam", (8, 2048, 4, 4)),
    "cbam channels_last (8,256,56,56) fwd": ("cbam_last_fwd", (8, 256, 56, 56)),
    "cbam (8,256,32,32) fwd": ("cbam_fwd", (8, 256, 32, 32)),
    "cbam (8,512,16,16) fwd": ("cbam_fwd", (8, 512, 16, 16)),
    "cbam (8,1024,8,8) fwd": ("cbam_fwd", (8, 1024, 8, 8)),
    "cbam (8,2048,4,4) fwd": ("cbam_fwd", (8, 2048, 4, 4)),
    "channel_pool (8,256,56,56) fwd+bwd": ("channel_pool", (8, 256, 56, 56)),
    "channel_pool channels_last (8,256,56,56) fwd+bwd": ("channel_pool_last", (8, 256, 56, 56)),
    "SoftAttention module (8,64,112,112) fwd": ("soft_module_fwd", (8, 64, 112, 112)),
    "SoftAttention module (8,64,112,112) fwd+bwd": ("soft_module", (8, 64, 112, 112)),
    "SoftAttention module channels_last (8,64,112,112) fwd+bwd": ("soft_module_last", (8, 64, 112, 112)),
    "SoftAttention module softmax (8,64,112,112) fwd+bwd": ("soft_module_softmax", (8, 64, 112, 112)),
    "soft_attention sigmoid (8,64,112,112) fwd+bwd": ("sigmoid", (8, 64, 112, 112)),
    "soft_attention softmax (8,64,112,112) fwd+bwd": ("softmax", (8, 64, 112, 112)),
    "soft_attention_pool (8,64,112,112) fwd": ("pool_fwd", (8, 64, 112, 112)),
    "soft_attention_pool (8,64,112,112) fwd+bwd": ("pool", (8, 64, 112, 112)),
    "soft_attention softmax C scores (8,64,112,112) fwd+bwd": ("softmax_c", (8, 64, 112, 112)),
    "soft_attention_pool C scores (8,64,112,112) fwd": ("pool_c_fwd", (8, 64, 112, 112)),
    "soft_attention_pool C scores (8,64,112,112) fwd+bwd": ("pool_c", (8, 64, 112, 112)),
    "self_attention qk 8 v 64 (4,64,8,8) fwd+bwd": ("self", (4, 64, 8, 8), 8),
    "self_attention qk 8 v 64 (4,64,16,16) fwd": ("self_fwd", (4, 64, 16, 16), 8),
    "self_attention qk 8 v 64 (4,64,16,16) fwd+bwd": ("self", (4, 64, 16, 16), 8),
    "self_attention qk 8 v 64 (4,64,32,32) fwd": ("self_fwd", (4, 64, 32, 32), 8),
    "self_attention qk 8 v 64 (4,64,32,32) fwd+bwd": ("self", (4, 64, 32, 32), 8),
    "self_attention qk 8 v 64 (4,64,64,64) fwd+bwd": ("self", (4, 64, 64, 64), 8),
    "self_attention qk 8 v 64 (1,64,64,64) fwd": ("self_fwd", (1, 64, 64, 64), 8),
    "self_attention qk 8 v 64 (1,64,32,32) fwd+bwd": ("self", (1, 64, 32, 32), 8),
    "self_attention qk 8 v 64 (1,64,64,64) fwd+bwd": ("self", (1, 64, 64, 64), 8),
    "self_attention qk 8 v 64 (2,64,32,32) fwd+bwd": ("self", (2, 64, 32, 32), 8),
    "self_attention qk 8 v 64 channels_last (1,64,64,64) fwd+bwd": ("self_last", (1, 64, 64, 64), 8),
    "self_attention qk 64 v 64 (4,64,32,32) fwd": ("self_fwd", (4, 64, 32, 32), 64),
    "self_attention qk 64 v 64 (4,64,32,32) fwd+bwd": ("self", (4, 64, 32, 32), 64),
    "self_attention qk 256 v 2048 (8,2048,4,4) fwd": ("self_fwd", (8, 2048, 4, 4), 256),
    "self_attention qk 256 v 2048 (8,2048,4,4) fwd+bwd": ("self", (8, 2048, 4, 4), 256),
    "self_attention qk 256 v 2048 (8,2048,7,7) fwd": ("self_fwd", (8, 2048, 7, 7), 256),
    "self_attention qk 256 v 2048 (8,2048,7,7) fwd+bwd": ("self", (8, 2048, 7, 7), 256),
}

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import cnn_attention  # noqa: F401
sys.path.insert(0, sys.argv[4])
import common  # noqa: E402,F401  (importing it keeps freed memory: see keep_freed_memory)
ops = torch.ops.cnn_attention
torch.set_num_threads(2)
cases, repeat = json.loads(sys.argv[2]), int(sys.argv[3])


def call(kind, shape, *extra):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    n, c = shape[:2]
    if kind in ("channel", "channel_fwd"):
        hidden = max(c // extra[0], 8)
        params = [torch.randn(hidden, c) / c**0.5, torch.zeros(hidden), torch.randn(c, hidden) / hidden**0.5,
                  torch.zeros(c)]
        params = [p.requires_grad_(True) for p in params]
        run = lambda: ops.channel_attention(x, *params, extra[1], "sigmoid")
    elif kind.startswith("cbam"):
        if "last" in kind:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        hidden = max(c // 16, 8)
        params = [torch.randn(hidden, c) / c**0.5, torch.zeros(hidden), torch.randn(c, hidden) / hidden**0.5,
                  torch.zeros(c), torch.randn(1, 2, 7, 7) / 7, torch.zeros(1)]
        params = [p.requires_grad_(True) for p in params]
        run = lambda: ops.cbam(x, *params)
    elif kind.startswith("channel_pool"):
        if kind.endswith("last"):
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        run = lambda: ops.channel_pool(x)
    elif kind.startswith("soft_module"):
        # The module as users put it in a network (its operators differ between builds).
        if "last" in kind:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        module = cnn_attention.SoftAttention(7, normalize="softmax" if "softmax" in kind else "sigmoid")
        run = lambda: module(x)
    elif kind.split("_")[0] in ("softmax", "sigmoid", "pool"):
        # "_c": a score channel per channel of x.
        normalize = kind.split("_")[0]
        scores = torch.randn((n, c if "_c" in kind else 1) + tuple(shape[2:]), requires_grad=True)
        run = (lambda: ops.soft_attention(x, scores, normalize, 1.0)) if normalize != "pool" else (
            lambda: ops.soft_attention_pool(x, scores, 1.0))
    else:
        if kind.endswith("last"):
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        qk, v = extra[0], c
        params = [torch.randn(2 * qk + v, c) / c**0.5, torch.zeros(2 * qk + v), torch.randn(c, v) / v**0.5,
                  torch.zeros(c), torch.full((1,), 0.5)]
        params = [p.requires_grad_(True) for p in params]
        run = lambda: ops.self_attention(x, *params, qk, 1, 1)
    if kind.endswith("fwd"):
        def step():
            with torch.no_grad():
                run()
    else:
        grad = torch.randn(run().shape)
        def step():
            run().backward(grad)
    step()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        best = min(best, (time.perf_counter() - start) * 1e3)
    return best


print(json.dumps({name: call(*spec) for name, spec in cases.items()}))
"""


def run_build(root: str, cases: dict, repeat: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, os.path.join(root, "python"), json.dumps(cases), str(repeat),
                          os.path.dirname(os.path.abspath(__file__))],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--only", default="", help="the cases whose name contains this text")
    args = parser.parse_args()
    cases = {name: spec for name, spec in CASES.items() if args.only in name}
    results = {"old": [], "new": []}
    for round_index in range(args.rounds):
        # Which build runs first alternates, so that neither always runs in the same position
        # (a build against itself gave up to 1.24x with a fixed order on a noisy 2-core host).
        order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
        for which in order:
            results[which].append(run_build(getattr(args, which), cases, args.repeat))
    print("| case | old ms | new ms | new / old |")
    print("|---|---|---|---|")
    for name in cases:
        old = statistics.median(r[name] for r in results["old"])
        new = statistics.median(r[name] for r in results["new"])
        print(f"| {name} | {old:.2f} | {new:.2f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
