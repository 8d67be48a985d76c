"""CBAM blocks side by side, in one run, at the shapes of a ResNet's stages: our `CBAM` module
(one `cbam`), its two halves one after the other (`channel_attention`, then the score head and
`soft_attention`: what `cbam` fuses), timm's `CbamModule` after `cnn_attention.convert` (in
training mode, as here, its score head's BatchNorm keeps it on the two halves), timm's
`CbamModule` eager (the baseline of the ratios) and torch.compile of it; forward and
forward+backward, contiguous or channels_last.

Each row also gives the forward+backward time in passes over x: one pass moves |x| bytes at
the copy bandwidth measured in the same run (a copy moves 2|x|). A CBAM block cannot move
fewer than 10: the forward reads x for the channel statistics, again for the spatial
statistics of the channel-scaled map, and reads x and writes y to apply both weights; the
backward (given the channel statistics) reads grad_y and x for the spatial weights' gradient,
again for the channel weights' gradient (which needs the spatial one), and reads grad_y a
third time to write grad_x.

    python benchmarks/bench_cbam.py                        # CPU, float32, four stage shapes
    python benchmarks/bench_cbam.py --shapes 8,2048,4,4 --channels-last
"""

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import measure_all, print_table  # noqa: E402

STAGE_SHAPES = "8,256,56,56;8,256,32,32;8,1024,8,8;8,2048,4,4"


def timm_cbam(channels: int):
    from timm.layers.cbam import CbamModule

    block = CbamModule(channels)
    # timm's block has a BatchNorm on the score map; random statistics keep it from being an
    # identity that a benchmark could not tell apart from a missing layer.
    bn = block.spatial.conv.bn
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shapes", default=STAGE_SHAPES, help="x shapes separated by ';'")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of timm's block")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)

    rows, passes = [], []
    for spec in args.shapes.split(";"):
        shape = tuple(int(s) for s in spec.split(","))
        x = torch.randn(shape, device=device, dtype=dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        eager = timm_cbam(shape[1]).to(device, dtype)
        ours = cnn_attention.CBAM(shape[1]).to(device, dtype)
        candidates = {
            "cnn_attention": ours,
            "cnn_attention, two halves": nn.Sequential(ours.channel, ours.spatial),
            # convert replaces submodules, never the model it is given.
            "converted timm": cnn_attention.convert(nn.Sequential(timm_cbam(shape[1]))).to(device, dtype),
            "eager timm CbamModule": eager,
        }
        if not args.no_compile:
            candidates["torch.compile(eager)"] = torch.compile(eager)
        # The copy that sets one pass's time is timed in the same rounds as the candidates.
        results, references = measure_all(candidates, x, grad, device, args.repeat,
                                          references={"copy": lambda: x.clone()})
        rows.append((str(shape), results))
        copy_median, copy_min = references["copy"]
        passes.append((shape, (copy_median / 2, copy_min / 2),
                       {name: (both[0] / (copy_median / 2), both[1] / (copy_min / 2))
                        for name, (_, both) in results.items()}))

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# CBAM blocks, {device} ({name}), {args.dtype}{', channels_last' if args.channels_last else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print()
    print_table(rows, "x")
    print()
    print("Forward+backward in passes over x (one pass: |x| bytes at the copy bandwidth, the copy timed in the")
    print("same rounds), median / min; floor 10:")
    print()
    print("| x | one pass ms | " + " | ".join(passes[0][2]) + " |")
    print("|---|---|" + "---|" * len(passes[0][2]))
    for shape, (pass_median, pass_min), by_name in passes:
        print(f"| {shape} | {pass_median:.3f} / {pass_min:.3f} | "
              + " | ".join(f"{p[0]:.1f} / {p[1]:.1f}" for p in by_name.values()) + " |")


if __name__ == "__main__":
    main()
