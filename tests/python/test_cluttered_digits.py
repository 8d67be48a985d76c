"""The demo's dataset (examples/cluttered_digits.py): fixed seeds, split by source image,
digits on 64x64 canvases with clutter; and insert places attention in its CNN's stages."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
pytest.importorskip("sklearn")
from cluttered_digits import _compose, _enlarged_digits, cluttered_digits, small_cnn  # noqa: E402

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
