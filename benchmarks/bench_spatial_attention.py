"""Soft and hard spatial attention side by side, in one run: ours vs the eager composition
users write vs torch.compile of it, forward and forward+backward (gradients of x and of the
score parameters).

- soft: the SoftAttention module (CBAM's spatial branch) vs
  `torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)`, conv, sigmoid, multiply.
- softmax: soft_attention(normalize="softmax") vs `x * P * softmax(scores over positions)`.
- hard: hard_attention(mode="topk", k = P / 4) vs the eager straight-through composition
  (`topk` + `scatter` for the mask, `mask - soft.detach() + soft`, multiply). Both return
  (y, mask), the operator's outputs: with C score channels the mask is as large as x, and a
  composition returning y alone would never write it.
- pool: soft_attention_pool vs `(x * softmax(scores over positions)).sum(positions)`.
- sigmoid, threshold (not in the default set): soft_attention(normalize="sigmoid") vs
  `x * sigmoid(scores)`, hard_attention(mode="threshold") vs its straight-through composition
  (both returning (y, mask), as for hard); with --channel-scores these take the per-element
  path.

    python benchmarks/bench_spatial_attention.py                  # CPU, float32, (8, 64, 112, 112)
    python benchmarks/bench_spatial_attention.py --device cuda --dtype bfloat16
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import block_arguments, first_output, measure_all, median_ms, print_table  # noqa: E402

# Bytes an operator must move, in units of |x|: (forward, backward). soft_attention and
# hard_attention read x and write y, then read grad_y and x and write grad_x;
# soft_attention_pool reads x, then reads x and writes grad_x. The score maps are C times
# smaller and left out.
FLOORS = {"softmax": (2, 3), "hard": (2, 3), "pool": (1, 2)}


class EagerSoftAttention(nn.Module):
    """CBAM's spatial branch as users write it, with the score head of `ours`."""

    def __init__(self, ours: cnn_attention.SoftAttention) -> None:
        super().__init__()
        self.scores = ours.scores

    def forward(self, x):
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(F.conv2d(pooled, self.scores.weight, self.scores.bias, padding=self.scores.padding))


class WithScores(nn.Module):
    """An operator on x and a learned score map (N, 1, *S)."""

    def __init__(self, fn, scores: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.scores = nn.Parameter(scores)

    def forward(self, x):
        return self.fn(x, self.scores)


def eager_softmax(x, scores):
    positions = scores[0].numel()
    return x * (positions * torch.softmax(scores.flatten(2), -1)).view_as(scores)


def eager_hard_topk(k):
    def run(x, scores):
        soft = torch.sigmoid(scores)
        index = scores.flatten(2).topk(k, -1).indices
        mask = torch.zeros_like(soft.flatten(2)).scatter_(-1, index, 1.0).view_as(soft)
        return x * (mask - soft.detach() + soft), mask

    return run


def eager_hard_threshold(x, scores):
    soft = torch.sigmoid(scores)
    mask = (soft > 0.5).to(x.dtype)
    return x * (mask - soft.detach() + soft), mask


def eager_pool(x, scores):
    return (x.flatten(2) * torch.softmax(scores.flatten(2), -1)).sum(-1)


def candidates_for(op, shape, device, dtype, compile_eager, score_channels, layout):
    positions = 1
    for size in shape[2:]:
        positions *= size
    scores = torch.randn((shape[0], score_channels) + shape[2:], device=device, dtype=dtype)
    if layout == "channels_last":
        # As a score head (a convolution) of a channels-last map gives them; a single score
        # channel is the same array in either layout.
        scores = scores.contiguous(memory_format=torch.channels_last)
    if op == "soft":
        ours = cnn_attention.SoftAttention(7).to(device, dtype)
        eager = EagerSoftAttention(ours)
    elif op == "sigmoid":
        ours = WithScores(cnn_attention.functional.soft_attention, scores)
        eager = WithScores(lambda x, s: x * torch.sigmoid(s), scores.clone())
    elif op == "threshold":
        ours = WithScores(cnn_attention.functional.hard_attention, scores)
        eager = WithScores(eager_hard_threshold, scores.clone())
    elif op == "softmax":
        ours = WithScores(lambda x, s: cnn_attention.functional.soft_attention(x, s, "softmax"), scores)
        eager = WithScores(eager_softmax, scores.clone())
    elif op == "hard":
        k = positions // 4
        ours = WithScores(lambda x, s: cnn_attention.functional.hard_attention(x, s, "topk", k=k), scores)
        eager = WithScores(eager_hard_topk(k), scores.clone())
    else:
        ours = WithScores(cnn_attention.functional.soft_attention_pool, scores)
        eager = WithScores(eager_pool, scores.clone())
    found = {"cnn_attention": ours, "eager": eager}
    if compile_eager:
        found["torch.compile(eager)"] = torch.compile(eager)
    return found


def main() -> None:
    parser = block_arguments(__doc__, "8,64,112,112")
    parser.add_argument("--ops", default="soft,softmax,hard,pool")
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--channel-scores", action="store_true",
                        help="scores with C channels (N, C, *S) instead of one (not for 'soft')")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.manual_seed(0)
    # Every operator's eager composition runs through WithScores.forward: one code object
    # that torch.compile specialises per wrapped function and grad mode, more often than the
    # default recompile limit allows (past it, it would silently run eager).
    torch._dynamo.config.recompile_limit = 64
    print(f"# spatial attention, {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
          f"{args.dtype}, x={shape}, scores with {'C channels' if args.channel_scores else 'one channel'}, "
          f"torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print()
    rows, floors = [], []
    for op in args.ops.split(","):
        for layout in args.layouts.split(","):
            x = torch.randn(shape, device=device, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            found = candidates_for(op, shape, device, dtype, not args.no_compile,
                                   shape[1] if args.channel_scores else 1, layout)
            with torch.no_grad():
                grad = torch.randn_like(first_output(found["cnn_attention"](x)))
            results = measure_all(found, x, grad, device, args.repeat)
            rows.append((f"{op}, {layout}", results))
            if device == "cuda" and op in FLOORS:
                floors.append((op, layout, results["cnn_attention"], x.numel() * x.element_size()))
    print_table(rows, "operator, layout")
    if floors:
        x = torch.randn(shape, device=device, dtype=dtype)
        nbytes = x.numel() * x.element_size()
        bandwidth = 2 * nbytes / (median_ms(lambda: x.clone(), device, args.repeat) * 1e-3)
        print()
        print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; ours against the bytes-moved floor (medians):")
        for op, layout, ((fwd, _), (both, _)), size in floors:
            floor_f, floor_b = (FLOORS[op][i] * size / bandwidth * 1e3 for i in range(2))
            print(f"- {op}, {layout}: forward {fwd:.3f} ms = {fwd / floor_f:.2f}x its {FLOORS[op][0]}|x| floor; "
                  f"backward (fwd+bwd - fwd) {both - fwd:.3f} ms = {(both - fwd) / floor_b:.2f}x its "
                  f"{FLOORS[op][1]}|x| floor")


if __name__ == "__main__":
    main()
