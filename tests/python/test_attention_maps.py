"""cnn_attention.attention_maps: every attention module's weights from
one forward, checked against what the modules do with them."""

import math

import pytest
import torch
from torch import nn

import cnn_attention


class EveryFamily(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.se = cnn_attention.ChannelAttention(8, reduction=2, gate="softmax")
        self.cbam = cnn_attention.CBAM(8, reduction=2, kernel_size=3)
        self.soft = cnn_attention.SoftAttention(kernel_size=3, normalize="softmax", temperature=0.5)
        self.hard = cnn_attention.HardAttention(kernel_size=3, mode="topk", keep_ratio=0.25)
        self.self_attention = cnn_attention.SelfAttention(8, num_heads=2, qk_reduction=2, kv_stride=2, gamma_init=0.5)

    def forward(self, x):
        return self.self_attention(self.hard(self.soft(self.cbam(self.se(self.stem(x))))))


def _inputs_of(model, x):
    """The input of every submodule in one forward."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
               for name, m in model.named_modules() if name]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_maps_of_every_family_match_what_the_modules_apply():
    torch.manual_seed(0)
    model = EveryFamily().eval()
    x = torch.randn(2, 3, 9, 10)
    maps = cnn_attention.attention_maps(model, x, queries=[0, 45, 89])
    assert set(maps) == {"se", "cbam.channel", "cbam.spatial", "soft", "hard", "self_attention"}
    io = _inputs_of(model, x)
    inp, out = io["se"]
    assert maps["se"].shape == (2, 8)
    torch.testing.assert_close(out, inp * maps["se"][:, :, None, None])
    assert maps["se"].sum(1).allclose(torch.full((2,), 8.0))  # C * softmax
    # CBAM is one operator: its output is its input times both maps.
    inp, out = io["cbam"]
    assert maps["cbam.channel"].shape == (2, 8) and maps["cbam.spatial"].shape == (2, 1, 9, 10)
    torch.testing.assert_close(out, inp * maps["cbam.channel"][:, :, None, None] * maps["cbam.spatial"])
    inp, out = io["soft"]
    assert maps["soft"].shape == (2, 1, 9, 10)
    torch.testing.assert_close(out, inp * maps["soft"])
    inp, out = io["hard"]
    assert maps["hard"].shape == (2, 1, 9, 10) and maps["hard"].sum() == 2 * math.ceil(0.25 * 90)
    assert torch.equal(out, inp * maps["hard"])


def test_self_attention_rows_match_the_full_matrix():
    torch.manual_seed(0)
    module = cnn_attention.SelfAttention(8, num_heads=2, qk_reduction=2, kv_stride=2, gamma_init=0.5).double()
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    maps = cnn_attention.attention_maps(module, x, queries=[3, 50])
    rows = maps[""]
    assert rows.shape == (2, 2, 2, 4, 5)  # (N, heads, queries, 9 // 2, 10 // 2)
    # The full P x Pk matrix, written from the contract.
    qkv = torch.einsum("oc,nchw->nohw", module.qkv_weight, x) + module.qkv_bias[:, None, None]
    q = qkv[:, :4].flatten(2).reshape(2, 2, 2, 90).transpose(-1, -2)
    k = torch.nn.functional.max_pool2d(qkv[:, 4:8], 2, 2).flatten(2).reshape(2, 2, 2, 20)
    full = torch.softmax(q @ k / math.sqrt(2), dim=-1)  # (N, H, P, Pk)
    torch.testing.assert_close(rows.flatten(3), full[:, :, [3, 50]])
    torch.testing.assert_close(rows.sum((-1, -2)), torch.ones(2, 2, 2, dtype=torch.float64))


def test_default_query_is_the_centre_and_bad_queries_are_refused():
    # The centre of 5 x 5 is (2, 2), flat index 12.
    module = cnn_attention.SelfAttention(8)
    x = torch.randn(1, 8, 5, 5)
    default = cnn_attention.attention_maps(module, x)[""]
    assert default.shape == (1, 1, 1, 5, 5)
    torch.testing.assert_close(default, cnn_attention.attention_maps(module, x, queries=[2 * 5 + 2])[""])
    with pytest.raises(ValueError, match=r"query position 25 is outside \[0, 25\)"):
        cnn_attention.attention_maps(module, x, queries=[25])


def test_maps_after_insert_and_no_hooks_left():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    cnn_attention.insert(model, "cbam", "all", torch.randn(1, 3, 16, 16))
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}
    maps = cnn_attention.attention_maps(model, torch.randn(2, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "1.inserted_attention.0.channel": (2, 8), "1.inserted_attention.0.spatial": (2, 1, 16, 16),
        "2.inserted_attention.0.channel": (2, 8), "2.inserted_attention.0.spatial": (2, 1, 8, 8),
    }
    # Only insert's own hooks (which apply the attention) remain.
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks
