"""Cluttered digits: where attention matters. Built from scikit-learn's bundled handwritten
digits (no download): each 8x8 digit is enlarged to 24x24 and placed at a random position on
a 64x64 canvas strewn with fragments of other digits of the same split. Fixed seeds; train
and test are split by source image, so no digit is seen in both."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CANVAS = 64
DIGIT = 24
FRAGMENT = 10
CLASSES = 10


def _enlarged_digits() -> Tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    big = F.interpolate(images[:, None], size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)[:, 0]
    return big.clamp(0, 1), torch.tensor(digits.target, dtype=torch.long)


def _compose(big: Tensor, labels: Tensor, sources: Tensor, copies: int, fragments: int,
             generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """`copies` canvases per source image: fragments of other digits of `sources` first, the
    digit on top (the brighter value wins where they overlap)."""
    chosen = sources.repeat_interleave(copies)
    canvases = torch.zeros(len(chosen), 1, CANVAS, CANVAS)

    def paste(canvas: Tensor, patch: Tensor) -> None:
        h, w = patch.shape
        r, c = torch.randint(0, CANVAS - h + 1, (2,), generator=generator).tolist()
        canvas[r : r + h, c : c + w] = torch.maximum(canvas[r : r + h, c : c + w], patch)

    for i, source in enumerate(chosen.tolist()):
        for _ in range(fragments):
            other = sources[torch.randint(0, len(sources), (1,), generator=generator)].item()
            r, c = torch.randint(0, DIGIT - FRAGMENT + 1, (2,), generator=generator).tolist()
            paste(canvases[i, 0], big[other, r : r + FRAGMENT, c : c + FRAGMENT])
        paste(canvases[i, 0], big[source])
    return canvases, labels[chosen]


def cluttered_digits(seed: int = 0, train_copies: int = 3, test_copies: int = 2, fragments: int = 8,
                     test_fraction: float = 0.2):
    """((train_x, train_y), (test_x, test_y)): (N, 1, 64, 64) images in [0, 1] and labels."""
    big, labels = _enlarged_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    test_count = int(round(test_fraction * len(labels)))
    test_sources, train_sources = order[:test_count], order[test_count:]
    train = _compose(big, labels, train_sources, train_copies, fragments, generator)
    test = _compose(big, labels, test_sources, test_copies, fragments, generator)
    return train, test


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def small_cnn() -> nn.Sequential:
    """Stages (blocks): 64x64 (0, 1), 32x32 (2, 3), 16x16 (4, 5), 8x8 (6, 7); a global pool
    and a linear head."""
    return nn.Sequential(
        conv_block(1, 16), conv_block(16, 16),
        nn.MaxPool2d(2), conv_block(16, 32),
        nn.MaxPool2d(2), conv_block(32, 64),
        nn.MaxPool2d(2), conv_block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES),
    )


def recalibrate_batch_norm(model: nn.Module, images: Tensor, batch: int) -> Tensor:
    """Recompute every BatchNorm's running statistics as the plain average of its batch
    statistics over `images` (one pass, no gradients), and return the model's outputs of that
    pass (computed with batch statistics, as in training).

    Why: the running averages (momentum 0.1) trail the weights during training, so after a
    short run eval mode can normalise with statistics of weights long gone and the model
    collapses in eval mode while classifying well with batch statistics. Only the BatchNorm
    modules are put in training mode, so nothing else changes behaviour (noise, masks); the
    model's modes and momenta are restored afterwards."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: cumulative average, every batch weighs the same
        norm.train()
    try:
        with torch.no_grad():
            outputs = torch.cat([model(images[first : first + batch]) for first in range(0, len(images), batch)])
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes.items():
            module.train(training)
    return outputs
