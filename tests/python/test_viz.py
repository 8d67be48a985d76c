"""cnn_attention.viz: PNG files of every attention map, from a function and the command line."""

import os
import subprocess
import sys

import pytest
import torch
from models import TinySelfAttentionCNN, TinySpatialAttentionCNN  # noqa: F401 (pickled by name)

import cnn_attention
from cnn_attention.viz import draw_attention_maps

import matplotlib.image as matplotlib_image  # noqa: E402  (a dev requirement: its absence fails)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check_png(path):
    pixels = matplotlib_image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0.01, f"{path} is blank"


def test_every_kind_of_map_is_drawn(tmp_path):
    torch.manual_seed(0)
    model = TinySpatialAttentionCNN().eval()
    x = torch.randn(3, 3, 16, 16)
    maps = cnn_attention.attention_maps(model, x)
    self_model = TinySelfAttentionCNN().eval()
    maps.update({"self." + k: v for k, v in cnn_attention.attention_maps(self_model, x, queries=[0, 30]).items()})
    written = draw_attention_maps(maps, x, str(tmp_path), samples=2)
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(f"{k.replace('.', '_')}.png" for k in maps)
    for path in written:
        _check_png(path)


def test_images_only(tmp_path):
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) images"):
        draw_attention_maps({}, torch.randn(1, 3, 8), str(tmp_path))


def test_command_line(tmp_path):
    torch.manual_seed(0)
    model = TinySelfAttentionCNN().eval()
    torch.save(model, tmp_path / "model.pt")
    torch.save(torch.randn(2, 3, 16, 16), tmp_path / "input.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), os.path.join(ROOT, "tests", "python")]))
    out = subprocess.run(
        [sys.executable, "-m", "cnn_attention.viz", str(tmp_path / "model.pt"), str(tmp_path / "input.pt"),
         "--out", str(tmp_path / "maps"), "--samples", "2", "--queries", "0,17"],
        capture_output=True, text=True, env=env,
    )
    assert out.returncode == 0, out.stderr
    written = out.stdout.split()
    assert sorted(os.path.basename(p) for p in written) == ["deep_attention.png", "shallow_attention.png"]
    for path in written:
        _check_png(path)
