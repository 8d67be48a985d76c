"""Draw attention maps into PNG files (matplotlib): spatial weights and hard masks as
heatmaps over the input image, channel weights as bar charts, self-attention rows as
heatmaps over the image with the query position marked.

    python -m cnn_attention.viz MODEL INPUT --out DIR [--samples 4] [--queries 0,120]

MODEL is a whole model saved with ``torch.save(model, path)`` (an eager model, so that its
attention modules can be found), INPUT a tensor saved with ``torch.save`` (N, C, H, W).
"""

import argparse
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .maps import attention_maps

__all__ = ["draw_attention_maps", "main"]


def _image(x: Tensor) -> Tensor:
    """(H, W, 3) or (H, W) in [0, 1] for imshow, from one (C, H, W) input."""
    x = x.detach().float().cpu()
    x = x - x.min()
    x = x / x.max().clamp_min(1e-12)
    if x.shape[0] == 3:
        return x.permute(1, 2, 0)
    return x.mean(0)


def _upsample(m: Tensor, size) -> Tensor:
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def draw_attention_maps(
    maps: Dict[str, Tensor], x: Tensor, out_dir: str, samples: int = 4, prefix: str = ""
) -> List[str]:
    """One PNG per attention module of `maps` (from :func:`attention_maps`), for the first
    `samples` images of `x` (N, C, H, W); returns the paths written.

    Spatial maps and masks ``(N, 1, h, w)`` are upsampled and drawn over each image; channel
    weights ``(N, C)`` become one bar chart per image; self-attention rows ``(N, heads, Q, h,
    w)`` become one heatmap per head and query over each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    count = min(samples, x.shape[0])
    size = tuple(x.shape[2:])
    if len(size) != 2:
        raise ValueError(f"draw_attention_maps: x must be (N, C, H, W) images, got {tuple(x.shape)}")
    written = []
    for name, m in maps.items():
        m = m.detach().float().cpu()
        label = name or "model"
        if m.dim() == 2:  # channel weights
            fig, axes = plt.subplots(count, 1, figsize=(8, 1.8 * count), squeeze=False)
            for i in range(count):
                axes[i, 0].bar(range(m.shape[1]), m[i].numpy(), color="tab:blue")
                axes[i, 0].set_ylabel(f"sample {i}")
            axes[-1, 0].set_xlabel("channel")
            fig.suptitle(f"{label}: channel weights")
        elif m.dim() == 4 and m.shape[1] == 1:  # spatial weights or a hard mask
            fig, axes = plt.subplots(1, count, figsize=(3 * count, 3.2), squeeze=False)
            for i in range(count):
                ax = axes[0, i]
                ax.imshow(_image(x[i]), cmap="gray")
                ax.imshow(_upsample(m[i, 0], size).numpy(), cmap="jet", alpha=0.5)
                ax.axis("off")
            fig.suptitle(f"{label}: spatial weights")
        elif m.dim() == 5:  # self-attention rows (N, heads, Q, h, w)
            heads, queries = m.shape[1], m.shape[2]
            fig, axes = plt.subplots(count, heads * queries, figsize=(3 * heads * queries, 3 * count), squeeze=False)
            for i in range(count):
                for h in range(heads):
                    for q in range(queries):
                        ax = axes[i, h * queries + q]
                        ax.imshow(_image(x[i]), cmap="gray")
                        ax.imshow(_upsample(m[i, h, q], size).numpy(), cmap="jet", alpha=0.5)
                        ax.set_title(f"head {h}, query {q}", fontsize=8)
                        ax.axis("off")
            fig.suptitle(f"{label}: self attention of the query positions")
        else:
            continue
        path = os.path.join(out_dir, f"{prefix}{label.replace('.', '_')}.png")
        fig.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnn_attention.viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a model saved with torch.save(model, path)")
    parser.add_argument("input", help="an (N, C, H, W) tensor saved with torch.save")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--queries", default=None, help="self-attention query positions, flat indices: 0,120")
    args = parser.parse_args(argv)
    model = torch.load(args.model, weights_only=False)
    if not isinstance(model, nn.Module):
        parser.error(f"{args.model} holds a {type(model).__name__}, not an nn.Module")
    x = torch.load(args.input)
    queries = None if args.queries is None else [int(q) for q in args.queries.split(",")]
    maps = attention_maps(model.eval(), x, queries)
    for path in draw_attention_maps(maps, x, args.out, args.samples):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
