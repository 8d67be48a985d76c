"""Whole networks with attention, side by side in one run: timm's ResNet-50 without attention,
with each family put in by cnn_attention.insert where the papers put it, and with timm's own
eager SE and CBAM blocks in the same places; a training step (forward, backward, SGD step) and
inference, median and minimum of interleaved rounds, and the cost over the plain network.

    python benchmarks/bench_models.py                       # CPU, batch 8, 128x128
    python benchmarks/bench_models.py --batch 4 --size 224 --repeat 5
"""

import argparse
import os
import sys

import timm
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import interleaved_ms  # noqa: E402


def resnet50(attn_layer=None) -> nn.Module:
    return timm.create_model("resnet50", block_args=dict(attn_layer=attn_layer) if attn_layer else None)


def inserted(family: str, where: str, per_block: bool, size: int):
    def make() -> nn.Module:
        model = resnet50()
        cnn_attention.insert(model, family, where, torch.randn(1, 3, size, size), per_block=per_block)
        return model

    return make


def configurations(size: int):
    """(name, where the attention is, factory)."""
    return [
        ("none", "-", resnet50),
        ("channel (ours)", "every bottleneck, after bn3", inserted("channel", "all", True, size)),
        ("SE (timm eager)", "every bottleneck, after bn3", lambda: resnet50("se")),
        ("cbam (ours)", "every bottleneck, after bn3", inserted("cbam", "all", True, size)),
        ("CBAM (timm eager)", "every bottleneck, after bn3", lambda: resnet50("cbam")),
        ("soft (ours)", "every bottleneck, after bn3", inserted("soft", "all", True, size)),
        ("hard (ours)", "layer4's bottlenecks, after bn3", inserted("hard", "deep", True, size)),
        ("self (ours)", "after layer4 (non-local block)", inserted("self", "deep", False, size)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))
    models, training, inference, places = {}, {}, {}, {}
    for name, where, make in configurations(args.size):
        model = make()
        models[name], places[name] = model, where
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), labels).backward()
            optimizer.step()

        def infer(model=model):
            model.eval()
            with torch.no_grad():
                model(x)

        training[name], inference[name] = step, infer
    train_ms = interleaved_ms(training, "cpu", args.repeat, warmup=2)
    infer_ms = interleaved_ms(inference, "cpu", args.repeat, warmup=2)
    print(f"timm resnet50, batch {args.batch}, {args.size}x{args.size}, float32, CPU threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; median / min of {args.repeat} interleaved rounds")
    print()
    print("| attention | where | parameters | training step ms | over none | inference ms | over none |")
    print("|---|---|---|---|---|---|---|")
    base_train, base_infer = train_ms["none"][0], infer_ms["none"][0]
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        (tm, tmin), (im, imin) = train_ms[name], infer_ms[name]
        print(f"| {name} | {places[name]} | {params / 1e6:.2f} M | {tm:.0f} / {tmin:.0f} | "
              f"{100 * (tm / base_train - 1):+.1f}% | {im:.0f} / {imin:.0f} | {100 * (im / base_infer - 1):+.1f}% |")


if __name__ == "__main__":
    main()
