"""Non-finite values: NaN and infinities in any input propagate as in the eager composition
(the float64 references of helpers.py), forward and backward, element for element; rows of
scores that are all NaN give the defined results the README states."""

import math
import zlib

import pytest
import torch

from helpers import (
    DEVICES,
    channel_attention_reference,
    channel_pool_reference,
    float64_leaves,
    grads_of,
    hard_attention_backward_reference,
    hard_attention_reference,
    self_attention_reference,
    soft_attention_pool_reference,
    soft_attention_reference,
)

ops = torch.ops.cnn_attention
VALUES = [float("nan"), float("inf"), -float("inf")]
DTYPES = [torch.float64, torch.float32]


def poisoned(shape, value: float, count: int, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Random values with `count` elements at random places set to `value`."""
    t = torch.randn(shape, generator=generator, dtype=torch.float64)
    if t.numel():
        where = torch.randperm(t.numel(), generator=generator)[:count]
        t.view(-1)[where] = value
    return t.to(device=device, dtype=dtype)


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal NaN, +inf and -inf positions, and close finite values."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual == math.inf, expected == math.inf), f"{what}: +inf positions differ"
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{what}: -inf positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5, msg=what)


def assert_nonfinite_where_reference_is(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Non-finite exactly where the reference is, close elsewhere; an infinity may stand for
    the reference's NaN (a sum of +inf and -inf terms that the operator never forms)."""
    actual, expected = actual.double(), expected.double()
    assert torch.equal(actual.isfinite(), expected.isfinite()), f"{what}: non-finite positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-4, atol=1e-5, msg=what)


def check_forward_and_backward(op, reference, inputs, differentiable, what: str, factored=()) -> None:
    """op(*inputs) against reference(*float64 copies), and the gradients of the inputs at
    `differentiable` (indices), NaN/inf positions included; for those in `factored`, see
    assert_nonfinite_where_reference_is."""
    leaves = [t.detach().clone().requires_grad_(i in differentiable) if t is not None else None
              for i, t in enumerate(inputs)]
    ref_leaves = float64_leaves(inputs)
    out, expected = op(*leaves), reference(*ref_leaves)
    assert_same_values(out, expected, f"{what}: forward")
    grad = torch.randn(out.shape, dtype=torch.float64).to(out)
    got = grads_of(out, grad, [leaves[i] for i in differentiable])
    want = grads_of(expected, grad.double(), [ref_leaves[i] for i in differentiable])
    for index, a, b in zip(differentiable, got, want):
        check = assert_nonfinite_where_reference_is if index in factored else assert_same_values
        check(a, b, f"{what}: gradient of input {index}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
@pytest.mark.parametrize("target", ["x", "fc1_weight"])
def test_channel_attention(device, dtype, value, pool, gate, target):
    # A seed that is the same in every process (str hashes are salted per process).
    g = torch.Generator().manual_seed(zlib.crc32(f"{pool} {gate} {target} {value}".encode()))
    shape = {"x": (3, 6, 5, 7), "fc1_weight": (3, 6), "fc1_bias": (3,), "fc2_weight": (6, 3), "fc2_bias": (6,)}
    inputs = {name: poisoned(s, value, 2 if name == target else 0, device, dtype, g) for name, s in shape.items()}
    check_forward_and_backward(
        lambda *a: ops.channel_attention(*a, pool, gate),
        lambda *a: channel_attention_reference(*a, pool, gate),
        list(inputs.values()), [0, 1, 2, 3, 4], f"channel_attention {pool} {gate} {value} in {target}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
def test_channel_pool(device, dtype, value):
    g = torch.Generator().manual_seed(1)
    # Several poisoned elements, some sharing a position: max and mean over channels meet
    # NaN and infinities of both signs together.
    x = poisoned((2, 5, 6, 7), value, 12, device, dtype, g)
    x[0, 1:3, 2, 2] = torch.tensor([math.inf, -math.inf], dtype=dtype)
    check_forward_and_backward(ops.channel_pool, channel_pool_reference, [x], [0], f"channel_pool {value}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("normalize", ["sigmoid", "softmax"])
@pytest.mark.parametrize("score_channels", [1, 4])
@pytest.mark.parametrize("target", ["x", "scores"])
def test_soft_attention(device, dtype, value, normalize, score_channels, target):
    g = torch.Generator().manual_seed(2)
    x = poisoned((3, 4, 5, 6), value, 2 if target == "x" else 0, device, dtype, g)
    scores = poisoned((3, score_channels, 5, 6), value, 2 if target == "scores" else 0, device, dtype, g)
    check_forward_and_backward(
        lambda *a: ops.soft_attention(*a, normalize, 0.7),
        lambda *a: soft_attention_reference(*a, normalize, 0.7),
        [x, scores], [0, 1], f"soft_attention {normalize} {value} in {target}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("score_channels", [1, 4])
@pytest.mark.parametrize("target", ["x", "scores"])
def test_soft_attention_pool(device, dtype, value, score_channels, target):
    g = torch.Generator().manual_seed(3)
    x = poisoned((3, 4, 5, 6), value, 2 if target == "x" else 0, device, dtype, g)
    scores = poisoned((3, score_channels, 5, 6), value, 2 if target == "scores" else 0, device, dtype, g)
    check_forward_and_backward(
        lambda *a: ops.soft_attention_pool(*a, 1.5),
        lambda *a: soft_attention_pool_reference(*a, 1.5),
        [x, scores], [0, 1], f"soft_attention_pool {value} in {target}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("estimator", ["sigmoid", "identity"])
@pytest.mark.parametrize("target", ["x", "scores"])
def test_hard_attention(device, dtype, value, mode, estimator, target):
    g = torch.Generator().manual_seed(4)
    x = poisoned((3, 4, 5, 6), value, 6 if target == "x" else 0, device, dtype, g)
    scores = poisoned((3, 1, 5, 6), value, 6 if target == "scores" else 0, device, dtype, g)
    x.requires_grad_(True)
    scores.requires_grad_(True)
    y, mask = ops.hard_attention(x, scores, mode, 0.5, 7, estimator, 1.0)
    y_ref, mask_ref = hard_attention_reference(x.detach(), scores.detach(), mode, 0.5, 7)
    what = f"hard_attention {mode} {value} in {target}"
    assert torch.equal(mask.double(), mask_ref), f"{what}: mask"
    # A NaN or infinite x at a dropped position gives NaN, as x * 0 does.
    assert_same_values(y, y_ref, f"{what}: forward")
    grad_y = torch.randn(y.shape, dtype=torch.float64).to(y)
    grad_x, grad_scores = torch.autograd.grad(y, [x, scores], grad_y)
    want_x, want_scores = hard_attention_backward_reference(grad_y, x.detach(), scores.detach(), mask_ref, estimator)
    assert_same_values(grad_x, want_x, f"{what}: gradient of x")
    assert_same_values(grad_scores, want_scores, f"{what}: gradient of scores")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("target", ["x", "qkv_weight", "query_rows", "gamma"])
def test_self_attention(device, dtype, value, kv_stride, target):
    g = torch.Generator().manual_seed(5)
    c, qk, v = 6, 4, 6
    shapes = {"x": (2, c, 5, 7), "qkv_weight": (2 * qk + v, c), "qkv_bias": (2 * qk + v,),
              "out_weight": (c, v), "out_bias": (c,), "gamma": (1,)}
    # One poisoned element: it reaches every row of its sample through the keys (or every
    # position through gamma or the weights), as in the eager composition.
    inputs = {name: poisoned(s, value, 1 if name == target else 0, device, dtype, g) for name, s in shapes.items()}
    if target == "query_rows":
        # Only the scores are non-finite (values finite): the softmax itself must give NaN.
        inputs["qkv_weight"][1, 2] = value
    # An infinite gamma: the operator takes gamma out of the sums over positions that give the
    # out_weight and out_bias gradients (gamma * sum(grad_y * heads)), so where eager's
    # sum(gamma * grad_y * heads) meets +inf and -inf terms (NaN) it gives an infinity.
    factored = (3, 4) if target == "gamma" and math.isinf(value) else ()
    check_forward_and_backward(
        lambda *a: ops.self_attention(*a, qk, 2, kv_stride),
        lambda *a: self_attention_reference(*a, qk, 2, kv_stride),
        list(inputs.values()), [0, 1, 2, 3, 4, 5], f"self_attention {value} in {target}", factored)


@pytest.mark.parametrize("device", DEVICES)
def test_all_nan_score_rows(device):
    """A sample whose scores are all NaN: softmax weights are NaN (as torch.softmax gives),
    top-k keeps the first k positions (NaN ranks as +inf, ties to the lower index), threshold
    keeps none; the other samples are untouched."""
    x = torch.randn(2, 3, 4, 5, device=device)
    scores = torch.randn(2, 1, 4, 5, device=device)
    scores[1] = float("nan")
    for normalize in ["softmax", "sigmoid"]:
        y = ops.soft_attention(x, scores, normalize, 1.0)
        assert y[1].isnan().all()
        torch.testing.assert_close(y[0], soft_attention_reference(x, scores, normalize)[0])
    pooled = ops.soft_attention_pool(x, scores, 1.0)
    assert pooled[1].isnan().all() and pooled[0].isfinite().all()
    y, mask = ops.hard_attention(x, scores, "topk", 0.5, 6, "sigmoid", 1.0)
    assert torch.equal(mask[1].flatten(), (torch.arange(20, device=device) < 6).float())
    assert torch.equal(y[1], x[1] * mask[1])
    y, mask = ops.hard_attention(x, scores, "threshold", 0.5, 1, "sigmoid", 1.0)
    assert not mask[1].any() and torch.equal(y[1], torch.zeros_like(y[1]))
    # Channel attention's softmax gate over all-NaN logits (a NaN MLP weight): NaN weights.
    w1, w2 = torch.randn(2, 3, device=device), torch.full((3, 2), float("nan"), device=device)
    assert ops.channel_attention(x, w1, None, w2, None, "avg", "softmax").isnan().all()
