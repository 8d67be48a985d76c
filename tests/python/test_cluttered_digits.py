"""The demo's dataset (examples/cluttered_digits.py): fixed seeds, split by source image,
digits on 64x64 canvases with clutter; insert places attention in its CNN's stages; and
the demo's BatchNorm recalibration makes the running statistics the average of the batch
statistics."""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
import sklearn  # noqa: E402,F401  (a dev requirement: its absence fails)
from cluttered_digits import _compose, _enlarged_digits, cluttered_digits, recalibrate_batch_norm, small_cnn  # noqa: E402

import cnn_attention  # noqa: E402


def test_the_dataset_is_fixed_and_split_by_source_image():
    (train_x, train_y), (test_x, test_y) = cluttered_digits(train_copies=1, test_copies=1)
    again = cluttered_digits(train_copies=1, test_copies=1)
    assert torch.equal(train_x, again[0][0]) and torch.equal(test_y, again[1][1])
    assert train_x.shape[1:] == (1, 64, 64) and len(train_x) + len(test_x) == 1797
    assert 0 <= train_x.min() and train_x.max() <= 1
    assert set(train_y.tolist()) == set(range(10)) == set(test_y.tolist())
    # One canvas per source image in each split and 1797 in all: the splits share no source.
    # Canvases are made of their split's sources only, fragments included: from source 5
    # alone, every pixel is a value of digit 5 (or 0).
    big, labels = _enlarged_digits()
    generator = torch.Generator().manual_seed(3)
    canvases, chosen = _compose(big, labels, torch.tensor([5]), 2, 6, generator)
    assert torch.equal(chosen, labels[[5, 5]])
    allowed = torch.cat([big[5].flatten(), torch.zeros(1)])
    assert torch.isin(canvases.flatten(), allowed).all()
    bare, _ = _compose(big, labels, torch.tensor([5]), 1, 0, generator)
    assert torch.allclose(bare.sum(), big[5].sum())  # without clutter: the digit alone


def test_the_cnn_has_a_shallow_and_a_deep_stage():
    stages = cnn_attention.find_stages(small_cnn(), torch.zeros(1, 1, 64, 64))
    assert [(s.blocks[-1], s.spatial) for s in stages] == [("1", (64, 64)), ("3", (32, 32)), ("5", (16, 16)), ("7", (8, 8))]


def test_batch_norm_recalibration_averages_the_batch_statistics():
    torch.manual_seed(0)
    model = small_cnn()
    # Batches of 16, 16 and 8 whose means differ, so an exponential average (momentum 0.1) or
    # a pass that skipped a batch gives other statistics than the plain average.
    images = torch.rand(40, 1, 32, 32) + torch.arange(40.0).view(-1, 1, 1, 1) / 10
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:  # stale statistics, which recalibration must replace, not blend in
        norm.running_mean.fill_(5.0)
        norm.running_var.fill_(7.0)
        norm.num_batches_tracked.fill_(100)
    model.train()
    with_batch_statistics = copy.deepcopy(model)  # before the hooks, which it would copy
    seen = {norm: [] for norm in norms}
    head_modes = []

    def record(norm, inputs, output):
        assert norm.training  # batch statistics
        x = inputs[0].transpose(0, 1).flatten(1)  # (C, N * H * W)
        seen[norm].append((x.mean(1), x.var(1)))  # BatchNorm keeps the unbiased variance

    hooks = [norm.register_forward_hook(record) for norm in norms]
    hooks.append(model[-1].register_forward_hook(lambda head, inputs, output: head_modes.append(head.training)))
    outputs = recalibrate_batch_norm(model, images, batch=16)
    for hook in hooks:
        hook.remove()

    for norm in norms:
        assert len(seen[norm]) == 3
        means = torch.stack([mean for mean, _ in seen[norm]])
        variances = torch.stack([var for _, var in seen[norm]])
        torch.testing.assert_close(norm.running_mean, means.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_var, variances.mean(0), rtol=1e-5, atol=1e-5)
        assert norm.momentum == 0.1  # restored for further training
    assert head_modes == [False] * 3  # only BatchNorm runs in training mode during the pass
    assert model.training and all(m.training for m in model.modules())  # modes restored
    # The outputs of the pass are those of batch statistics (training mode), batch by batch.
    with torch.no_grad():
        expected = torch.cat([with_batch_statistics(images[i : i + 16]) for i in range(0, 40, 16)])
    torch.testing.assert_close(outputs, expected)
    model.eval()
    recalibrate_batch_norm(model, images, batch=16)
    assert not any(m.training for m in model.modules())
