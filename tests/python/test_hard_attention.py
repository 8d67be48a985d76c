"""hard_attention's own cases: scores in every layout, vector lanes and block tails, top-k
ties, NaN scores, k = P, k outside top-k mode, threshold bounds, extreme scores, empty inputs,
autocast, bad backward arguments, determinism. Every variant against the reference (y and the
mask exact, the straight-through gradients) over dtype x layout x rank, the bad calls and
opcheck are in test_operators.py, from the operator table."""

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
    hard_attention_backward_reference,
    hard_attention_reference,
    in_layout,
)
import operators
from operators import BY_NAME, Sample

from cnn_attention import functional as CF

op = torch.ops.cnn_attention.hard_attention
backward_op = torch.ops.cnn_attention._hard_attention_backward

def check_against_reference(x, scores, mode, threshold, k, estimator, temperature):
    """The call against the float64 reference, as the operator table checks it (y and the mask
    exact, the straight-through gradients): (y, mask, grad of x, grad of scores)."""
    options = {"mode": mode, "threshold": threshold, "k": k, "estimator": estimator, "temperature": temperature}
    (y, mask), grads = operators.check_against_reference(
        Sample(BY_NAME["hard_attention"], {"x": x, "scores": scores}, options))
    return y, mask, grads["x"], grads["scores"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,scores_layout", list(itertools.product(LAYOUTS, LAYOUTS)))
@pytest.mark.parametrize("score_channels", ["one", "all"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_scores_in_every_layout(device, layout, scores_layout, score_channels, mode):
    x, scores = feature_map_and_scores((2, 6, 5, 7), score_channels, torch.float32, device, layout, scores_layout)
    check_against_reference(x, scores, mode, 0.5, 4, "sigmoid", 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,spatial", [(1, (37,)), (40, (6, 5)), (130, (3, 7)), (3, (26, 45))])
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_vector_lanes_and_block_tails(device, dtype, layout, channels, spatial, score_channels):
    x, scores = feature_map_and_scores((2, channels) + spatial, score_channels, dtype, device, layout)
    check_against_reference(x, scores, "topk", 0.5, 6, "sigmoid", 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_topk_ties_go_to_the_lower_flat_index(device, layout, score_channels):
    x, _ = feature_map_and_scores((2, 4, 3, 5), score_channels, torch.float32, device, layout)
    cs = 1 if score_channels == "one" else 4
    scores = in_layout(torch.full((2, cs, 3, 5), 0.25, device=device), layout)
    y, mask = op(x, scores, "topk", 0.5, 3, "sigmoid", 1.0)
    expected = torch.zeros(2, cs, 15, device=device)
    expected[:, :, :3] = 1  # flat positions 0, 1, 2 of (3, 5): row 0, columns 0 to 2
    torch.testing.assert_close(mask, expected.reshape(2, cs, 3, 5), rtol=0, atol=0)
    torch.testing.assert_close(y, x * mask, rtol=0, atol=0)
    # Partial ties: one larger value, then ties filled from the lowest index.
    scores = torch.zeros(1, 1, 8, device=device)
    scores[0, 0, 6] = 1.0
    scores[0, 0, 2] = -1.0
    _, mask = op(torch.randn(1, 2, 8, device=device), scores, "topk", 0.5, 4, "sigmoid", 1.0)
    assert mask.flatten().tolist() == [1, 1, 0, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_nan_scores(device, dtype):
    # Top-k: a NaN score ranks as +inf (it is kept before every finite score; NaN and +inf
    # tie, lower index first). Threshold: sigmoid(NaN) > threshold is false, so a NaN
    # position is dropped.
    scores = torch.tensor([[[0.5, float("nan"), 3.0, float("inf"), float("nan"), -1.0]]], device=device, dtype=dtype)
    x = torch.randn(1, 2, 6, device=device, dtype=dtype)
    for k, kept in [(1, [0, 1, 0, 0, 0, 0]), (2, [0, 1, 0, 1, 0, 0]), (3, [0, 1, 0, 1, 1, 0]), (4, [0, 1, 1, 1, 1, 0])]:
        _, mask = op(x, scores, "topk", 0.5, k, "sigmoid", 1.0)
        assert mask.flatten().tolist() == kept, k
        torch.testing.assert_close(mask.double(), hard_attention_reference(x, scores, "topk", k=k)[1], rtol=0, atol=0)
    _, mask = op(x, scores, "threshold", 0.5, 1, "sigmoid", 1.0)
    assert mask.flatten().tolist() == [1, 0, 1, 1, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_k_equal_to_positions_keeps_everything(device, score_channels):
    x, scores = feature_map_and_scores((2, 3, 4, 5), score_channels, torch.float32, device, "contiguous")
    y, mask = op(x, scores, "topk", 0.5, 20, "identity", 1.0)
    assert (mask == 1).all()
    torch.testing.assert_close(y, x, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_bounds_zero_and_one(device):
    # sigmoid(-1e4) underflows to 0, which is not > 0; nothing is > 1.
    x = torch.randn(1, 2, 5, device=device)
    scores = torch.tensor([[[-1e4, -3.0, 0.0, 3.0, 1e4]]], device=device)
    assert op(x, scores, "threshold", 0.0, 1, "sigmoid", 1.0)[1].flatten().tolist() == [0, 1, 1, 1, 1]
    assert op(x, scores, "threshold", 1.0, 1, "sigmoid", 1.0)[1].flatten().tolist() == [0, 0, 0, 0, 0]
    # Exactly at the threshold is not above it.
    assert op(x, scores, "threshold", 0.5, 1, "sigmoid", 1.0)[1].flatten().tolist() == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["sigmoid", "identity"])
def test_straight_through_gradient_with_extreme_scores_is_finite(device, estimator):
    x = torch.randn(2, 3, 6, device=device, requires_grad=True)
    scores = (torch.tensor([1e4, -1e4, 0.0, 2.0, -2.0, 50.0], device=device).expand(2, 1, 6)).clone().requires_grad_(True)
    y, mask = op(x, scores, "threshold", 0.5, 1, estimator, 0.5)
    grad = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, [x, scores], grad)
    wx, ws = hard_attention_backward_reference(grad, x.detach(), scores.detach(), mask, estimator, 0.5)
    assert torch.isfinite(gs).all()
    torch.testing.assert_close(gx.double(), wx, rtol=0, atol=0)
    assert_close(gs, ws, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize(
    "x_shape,scores_shape",
    [((0, 3, 4, 4), (0, 1, 4, 4)), ((0, 3, 4, 4), (0, 3, 4, 4)), ((2, 3, 0, 4), (2, 1, 0, 4)),
     ((2, 3, 0), (2, 3, 0)), ((2, 0, 4, 4), (2, 1, 4, 4)), ((2, 0, 5), (2, 0, 5))],
)
def test_empty_inputs(device, mode, x_shape, scores_shape):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    scores = torch.randn(scores_shape, device=device, requires_grad=True)
    y, mask = op(x, scores, mode, 0.5, 2, "sigmoid", 1.0)
    assert y.shape == x.shape and mask.shape == scores.shape
    # With no channels, the shared mask is still computed.
    torch.testing.assert_close(mask.double(), hard_attention_reference(x.detach(), scores.detach(), mode, 0.5, 2)[1], rtol=0, atol=0)
    gx, gs = torch.autograd.grad(y.sum(), [x, scores])
    assert gx.shape == x.shape and gs.shape == scores.shape
    assert torch.count_nonzero(gs) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_autocast(device, mode):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 8, 6, 6, device=device)
    scores = torch.randn(2, 1, 6, 6, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        y, mask = CF.hard_attention(x, scores, mode, 0.5, 5)
    assert y.dtype == dtype and mask.dtype == dtype
    y_ref, mask_ref = hard_attention_reference(x.to(dtype), scores.to(dtype), mode, 0.5, 5)
    torch.testing.assert_close(mask.double(), mask_ref, rtol=0, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=0)


# ---- bad input ----

def _good(device="cpu"):
    return torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 1, 4, 5, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_k_is_ignored_in_threshold_mode(device):
    x, s = _good(device)
    y, mask = op(x, s, "threshold", 0.5, 0, "sigmoid", 1.0)
    assert y.shape == x.shape and mask.shape == s.shape


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_backward_arguments_are_rejected(device):
    x, s = _good(device)
    mask = torch.ones_like(s)

    def top_k(grad_y, mask, estimator="sigmoid", temperature=1.0):
        return backward_op(grad_y, x, s, mask, "topk", 0.5, estimator, temperature)

    with pytest.raises(RuntimeError, match=r"hard_attention: mask must be the size of scores = \(2, 1, 4, 5\), got \(2, 3, 4, 5\)"):
        top_k(x, torch.ones_like(x))
    with pytest.raises(RuntimeError, match=r"hard_attention: mask must be the size of scores = \(2, 1, 4, 5\), got \(2, 1, 4\)"):
        top_k(x, mask[..., 0])
    with pytest.raises(RuntimeError, match=r"hard_attention: mask must have the dtype of x \(Float\), got Bool"):
        top_k(x, mask > 0)
    with pytest.raises(RuntimeError, match=r"hard_attention: grad_y must be the size of x = \(2, 3, 4, 5\), got \(2, 1, 4, 5\)"):
        top_k(s, mask)
    with pytest.raises(RuntimeError, match=r'hard_attention: estimator must be one of "sigmoid", "identity", got "x"'):
        top_k(x, mask, estimator="x")
    with pytest.raises(RuntimeError, match=r"hard_attention: temperature must be finite and positive, got 0"):
        top_k(x, mask, temperature=0.0)
    with pytest.raises(RuntimeError, match=r"hard_attention: mask must be a tensor in top-k mode, got None"):
        top_k(x, None)
    with pytest.raises(RuntimeError, match=r"hard_attention: mask must be None in threshold mode"):
        backward_op(x, x, s, mask, "threshold", 0.5, "sigmoid", 1.0)
    with pytest.raises(RuntimeError, match=r"hard_attention: threshold must be finite and in \[0, 1\], got nan"):
        backward_op(x, x, s, None, "threshold", float("nan"), "sigmoid", 1.0)
    with pytest.raises(RuntimeError, match=r'hard_attention: mode must be one of "threshold", "topk", got "top"'):
        backward_op(x, x, s, mask, "top", 0.5, "sigmoid", 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("score_channels", [1, 24])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_threshold_backward_recomputes_the_forward_mask(dtype, layout, score_channels, temperature):
    """In threshold mode the backward finds the mask again from the scores instead of keeping
    the forward's: the gradient of x is grad_y times exactly the forward's mask, scores on the
    threshold included, and the mask returned stays the caller's to change."""
    x, scores = feature_map_and_scores((2, 24, 7, 9), "one" if score_channels == 1 else "all", dtype, "cpu", layout)
    threshold = 0.6
    # A third of the scores put their sigmoid on or next to the threshold, where a
    # recomputation that differed from the forward's in the last bit would flip the mask.
    on_threshold = temperature * torch.logit(torch.tensor(threshold, dtype=torch.float64))
    near = (on_threshold + 1e-7 * torch.randn(scores.shape, dtype=torch.float64)).to(dtype)
    scores = in_layout(torch.where(torch.rand(scores.shape) < 1 / 3, near, scores), layout)
    x.requires_grad_(True)
    scores.requires_grad_(True)
    y, mask = op(x, scores, "threshold", threshold, 1, "sigmoid", temperature)
    expected_mask = mask.clone()
    assert 0 < expected_mask.sum() < expected_mask.numel()
    mask.zero_()  # not saved for the backward: no version-counter error, no effect
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert torch.equal(x.grad, grad_y * expected_mask)


def test_backward_makes_no_gradient_for_the_mask():
    """The mask is not differentiable: the backward must not build a zero-filled gradient for
    it (as large as x with a score channel per channel, a pass over memory per backward)."""
    x, scores = feature_map_and_scores((2, 6, 5, 7), "all", torch.float32, "cpu", "contiguous")
    x.requires_grad_(True)
    for mode in ("threshold", "topk"):
        y, mask = op(x, scores, mode, 0.5, 3, "sigmoid", 1.0)
        grad_y = torch.ones_like(y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            y.backward(grad_y)
        fills = [e.name for e in prof.events()
                 if e.name in ("aten::zeros", "aten::zero_", "aten::fill_", "aten::zeros_like")
                 and list(mask.shape) in [list(s) for s in e.input_shapes]]
        assert fills == [], f"{mode}: {fills}"
        assert torch.equal(x.grad, mask)
        x.grad = None


def test_double_backward_is_refused():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    y, _ = op(x, s, "topk", 0.5, 4, "sigmoid", 1.0)
    gx, gs = torch.autograd.grad(y.square().sum(), [x, s], create_graph=True)
    with pytest.raises(RuntimeError, match="hard_attention: double backward is not supported"):
        (gx.sum() + gs.sum()).backward()


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    x, s = _good()
    with pytest.raises(RuntimeError, match=r"hard_attention: scores must be on the device of x \(cpu\), got cuda:0"):
        op(x, s.cuda(), "threshold", 0.5, 1, "sigmoid", 1.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("score_channels", ["one", "all"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_results_are_bitwise_identical_across_thread_counts(layout, score_channels, mode):
    x, scores = feature_map_and_scores((3, 37, 29, 31), score_channels, torch.float32, "cpu", layout)
    grad = in_layout(torch.randn(x.shape), layout)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, scores)]
        y, mask = op(*leaves, mode, 0.5, 100, "sigmoid", 0.5)
        return [y.detach(), mask, *torch.autograd.grad(y, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)
