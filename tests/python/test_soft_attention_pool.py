"""soft_attention_pool's own cases: scores in every layout, vector lanes and block tails,
uniform scores, strided output gradients, empty inputs, extreme scores, autocast, bad backward
arguments, determinism. Every variant against the float64 reference over dtype x layout x
rank, the bad calls, gradcheck and opcheck are in test_operators.py, from the operator table."""

import itertools

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    LAYOUTS,
    assert_bitwise_identical_across_thread_counts,
    assert_close,
    feature_map_and_scores,
    float64_leaves,
    grads_of,
    soft_attention_pool_reference,
)
import operators
from operators import BY_NAME, Sample

from cnn_attention import functional as CF

op = torch.ops.cnn_attention.soft_attention_pool
backward_op = torch.ops.cnn_attention._soft_attention_pool_backward



def check_against_reference(x, scores, temperature):
    """The call against the float64 reference, as the operator table checks it: (pooled, grad
    of x, grad of scores)."""
    sample = Sample(BY_NAME["soft_attention_pool"], {"x": x, "scores": scores}, {"temperature": temperature})
    out, grads = operators.check_against_reference(sample)
    return out, grads["x"], grads["scores"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,scores_layout", list(itertools.product(LAYOUTS, LAYOUTS)))
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_scores_in_every_layout(device, layout, scores_layout, score_channels):
    x, scores = feature_map_and_scores((2, 6, 5, 7), score_channels, torch.float32, device, layout, scores_layout)
    check_against_reference(x, scores, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,spatial", [(1, (37,)), (40, (6, 5)), (130, (3, 7)), (300, (2, 3)), (3, (26, 45))])
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_vector_lanes_and_block_tails(device, dtype, layout, channels, spatial, score_channels):
    # Vectorized over the inner dim, blocked over 256 channels (channels last) and 512
    # positions (shared scores): full vectors, partial blocks and scalar tails.
    x, scores = feature_map_and_scores((2, channels) + spatial, score_channels, dtype, device, layout)
    check_against_reference(x, scores, 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_scores_give_the_mean(device):
    x = torch.randn(2, 5, 4, 6, device=device, dtype=torch.float64)
    torch.testing.assert_close(op(x, torch.full((2, 1, 4, 6), -2.0, device=device, dtype=torch.float64), 0.3), x.mean((2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_contiguous_grad_out(device, layout):
    # out.sum() sends an expanded (stride 0) gradient; a transposed one has swapped strides.
    x, scores = feature_map_and_scores((3, 4, 5, 6), "one", torch.float64, device, layout)
    for grad in (torch.ones(1, 1, device=device, dtype=torch.float64).expand(3, 4),
                 torch.randn(4, 3, device=device, dtype=torch.float64).t()):
        actual = backward_op(grad, x, scores, 0.7)
        expected = backward_op(grad.contiguous(), x, scores, 0.7)
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)
        ref_inputs = float64_leaves([x, scores])
        wanted = grads_of(soft_attention_pool_reference(*ref_inputs, 0.7), grad, ref_inputs)
        assert_close(actual[0], wanted[0], torch.float64)
        assert_close(actual[1], wanted[1], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "x_shape,scores_shape",
    [((0, 3, 4, 4), (0, 1, 4, 4)), ((0, 3, 4, 4), (0, 3, 4, 4)), ((2, 3, 0, 4), (2, 1, 0, 4)),
     ((2, 3, 0), (2, 3, 0)), ((2, 0, 4, 4), (2, 1, 4, 4)), ((2, 0, 5), (2, 0, 5))],
)
def test_empty_inputs(device, x_shape, scores_shape):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    scores = torch.randn(scores_shape, device=device, requires_grad=True)
    out = op(x, scores, 1.0)
    assert out.shape == x_shape[:2]
    # A sum over no positions is zero.
    assert torch.count_nonzero(out) == 0
    gx, gs = torch.autograd.grad(out.sum(), [x, scores])
    assert gx.shape == x.shape and gs.shape == scores.shape
    assert torch.count_nonzero(gs) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_extreme_scores_stay_finite(device, score_channels):
    x, scores = feature_map_and_scores((2, 3, 4, 5), score_channels, torch.float32, device, "contiguous")
    scores = scores.sign() * 1e4
    scores[:, :, 0, 0] = 1e4
    scores[:, :, 1, 1] = -1e4
    out, gx, gs = check_against_reference(x, scores, 0.5)
    for t in (out, gx, gs):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 8, 6, 6, device=device)
    scores = torch.randn(2, 1, 6, 6, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        out = CF.soft_attention_pool(x, scores, 0.5)
    assert out.dtype == dtype
    assert_close(out, soft_attention_pool_reference(x.to(dtype).double(), scores.to(dtype).double(), 0.5), dtype)


# ---- bad input ----

def _good(device="cpu"):
    return torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 1, 4, 5, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_backward_arguments_are_rejected(device):
    x, s = _good(device)
    with pytest.raises(RuntimeError, match=r"soft_attention_pool: grad_out must be \(N, C\) = \(2, 3\), got \(2, 3, 4, 5\)"):
        backward_op(x, x, s, 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention_pool: grad_out must be \(N, C\) = \(2, 3\), got \(3, 2\)"):
        backward_op(torch.zeros(3, 2, device=device), x, s, 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention_pool: grad_out must have the dtype of x \(Float\), got Half"):
        backward_op(torch.zeros(2, 3, device=device, dtype=torch.half), x, s, 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention_pool: scores must be \(N, 1, \*S\) or \(N, C, \*S\)"):
        backward_op(torch.zeros(2, 3, device=device), x, s[:, :, :2], 1.0)


def test_double_backward_is_refused():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    out = op(x, s, 1.0)
    gx, gs = torch.autograd.grad(out.square().sum(), [x, s], create_graph=True)
    with pytest.raises(RuntimeError, match="soft_attention_pool: double backward is not supported"):
        (gx.sum() + gs.sum()).backward()


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    x, s = _good()
    with pytest.raises(RuntimeError, match=r"soft_attention_pool: scores must be on the device of x \(cpu\), got cuda:0"):
        op(x, s.cuda(), 1.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_results_are_bitwise_identical_across_thread_counts(layout, score_channels):
    x, scores = feature_map_and_scores((3, 37, 29, 31), score_channels, torch.float32, "cpu", layout)
    grad = torch.randn(3, 37)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, scores)]
        out = op(*leaves, 0.5)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)
