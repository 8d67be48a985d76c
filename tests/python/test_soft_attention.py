"""soft_attention's own cases: scores in every layout, vector lanes and block tails, empty
inputs, extreme scores, identities, autocast, bad backward arguments, determinism, poisoned
outputs, strided inputs. Every variant against the float64 reference over dtype x layout x
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
    in_layout,
    soft_attention_pool_reference,
    soft_attention_reference,
)
import operators
from operators import BY_NAME, Sample

from cnn_attention import functional as CF

op = torch.ops.cnn_attention.soft_attention
backward_op = torch.ops.cnn_attention._soft_attention_backward

NORMALIZE = ["sigmoid", "softmax"]


def check_against_reference(x, scores, normalize, temperature):
    """The call against the float64 reference, as the operator table checks it: (y, grad of x,
    grad of scores)."""
    sample = Sample(BY_NAME["soft_attention"], {"x": x, "scores": scores},
                    {"normalize": normalize, "temperature": temperature})
    y, grads = operators.check_against_reference(sample)
    return y, grads["x"], grads["scores"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,scores_layout", list(itertools.product(LAYOUTS, LAYOUTS)))
@pytest.mark.parametrize("score_channels", ["one", "all"])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_scores_in_every_layout(device, layout, scores_layout, score_channels, normalize):
    x, scores = feature_map_and_scores((2, 6, 5, 7), score_channels, torch.float32, device, layout, scores_layout)
    y, _, _ = check_against_reference(x, scores, normalize, 0.5)
    if layout == "channels_last":
        assert y.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,spatial", [(1, (37,)), (40, (6, 5)), (130, (3, 7)), (300, (2, 3)), (3, (26, 45))])
@pytest.mark.parametrize("score_channels", ["one", "all"])
def test_vector_lanes_and_block_tails(device, dtype, layout, channels, spatial, score_channels):
    # The sweeps vectorize over the inner dim and block the outer one (512 positions, 256
    # channels): these sizes give full vectors, partial blocks and scalar tails.
    x, scores = feature_map_and_scores((2, channels) + spatial, score_channels, dtype, device, layout)
    check_against_reference(x, scores, "softmax", 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize(
    "x_shape,scores_shape",
    [((0, 3, 4, 4), (0, 1, 4, 4)), ((0, 3, 4, 4), (0, 3, 4, 4)), ((2, 3, 0, 4), (2, 1, 0, 4)),
     ((2, 3, 0), (2, 3, 0)), ((2, 0, 4, 4), (2, 1, 4, 4)), ((2, 0, 5), (2, 0, 5))],
)
def test_empty_inputs(device, normalize, x_shape, scores_shape):
    x = torch.randn(x_shape, device=device, requires_grad=True)
    scores = torch.randn(scores_shape, device=device, requires_grad=True)
    y = op(x, scores, normalize, 1.0)
    assert y.shape == x.shape
    gx, gs = torch.autograd.grad(y.sum(), [x, scores])
    assert gx.shape == x.shape and gs.shape == scores.shape
    # With no channels, a shared score map still exists and has a zero gradient.
    assert torch.count_nonzero(gs) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_channels", ["one", "all"])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_extreme_scores_stay_finite(device, score_channels, normalize):
    # The softmax subtracts the row maximum: exp(1e4) would overflow otherwise.
    x, scores = feature_map_and_scores((2, 3, 4, 5), score_channels, torch.float32, device, "contiguous")
    scores = scores.sign() * 1e4
    scores[:, :, 0, 0] = 1e4
    scores[:, :, 1, 1] = -1e4
    scores[:, :, 2, 2] = 0.0
    y, gx, gs = check_against_reference(x, scores, normalize, 0.5)
    for t in (y, gx, gs):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_softmax_over_channel_scores_with_rows_partly_infinite(device, layout):
    """Scores with C channels take the weights-on-the-fly path, which channels last sums each
    row in runs of positions (16384 / C of them) and combines the runs: a run whose scores are
    all -inf adds nothing, a row all -inf gives NaN weights, a NaN or +inf score NaN, as the
    float64 softmax does. 64 channels over 32 x 32 positions: 4 runs of 256."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 32, 32, generator=generator, dtype=torch.float64)
    scores = torch.randn(2, 64, 32, 32, generator=generator, dtype=torch.float64)
    flat = scores.view(2, 64, -1)
    flat[0, 3, :256] = -float("inf")  # the first run
    flat[0, 4, 300:900] = -float("inf")  # parts of three runs
    flat[0, 5, :] = -float("inf")  # the whole row
    flat[1, 6, 700] = float("nan")
    flat[1, 7, 10] = float("inf")
    x32 = in_layout(x.float(), layout).requires_grad_(True)
    s32 = in_layout(scores.float(), layout).requires_grad_(True)
    x64, s64 = x.clone().requires_grad_(True), scores.clone().requires_grad_(True)
    y = op(x32, s32, "softmax", 0.7)
    expected = soft_attention_reference(x64, s64, "softmax", 0.7)
    grad = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(y, [x32, s32], in_layout(grad.float(), layout))
    want = torch.autograd.grad(expected, [x64, s64], grad)
    for actual, reference in zip((y, *got), (expected, *want)):
        actual = actual.double()
        assert torch.equal(actual.isnan(), reference.isnan())
        finite = reference.isfinite()
        assert finite[0, 3].all() and finite[0, 4].all() and not finite[0, 5].any()
        assert_close(actual[finite], reference[finite], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_softmax_scores_are_the_identity(device):
    x = torch.randn(2, 4, 6, 5, device=device)
    torch.testing.assert_close(op(x, torch.full((2, 1, 6, 5), 3.0, device=device), "softmax", 0.3), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_autocast(device, normalize):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 8, 6, 6, device=device)
    scores = torch.randn(2, 1, 6, 6, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = CF.soft_attention(x, scores, normalize, 0.5)
        y64 = CF.soft_attention(x.double(), scores.double(), normalize, 0.5)
    assert y.dtype == dtype
    assert y64.dtype == torch.float64, "autocast leaves float64 alone"
    assert_close(y, soft_attention_reference(x.to(dtype).double(), scores.to(dtype).double(), normalize, 0.5), dtype)


# ---- bad input: every message names the operator, the argument and what was expected ----

def _good(device="cpu"):
    return torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 1, 4, 5, device=device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_backward_arguments_are_rejected(device):
    x, s = _good(device)
    with pytest.raises(RuntimeError, match=r"soft_attention: grad_y must be the size of x = \(2, 3, 4, 5\), got \(2, 3, 4\)"):
        backward_op(x[..., 0], x, s, "sigmoid", 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention: grad_y must have the dtype of x \(Float\), got Double"):
        backward_op(x.double(), x, s, "sigmoid", 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention: scores must be \(N, 1, \*S\) or \(N, C, \*S\)"):
        backward_op(x, x, s[:1], "sigmoid", 1.0)
    with pytest.raises(RuntimeError, match=r'soft_attention: normalize must be one of "sigmoid", "softmax", got "max"'):
        backward_op(x, x, s, "max", 1.0)
    with pytest.raises(RuntimeError, match=r"soft_attention: temperature must be finite and positive, got -1"):
        backward_op(x, x, s, "sigmoid", -1.0)


@pytest.mark.parametrize("normalize", NORMALIZE)
def test_double_backward_is_refused(normalize):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    y = op(x, s, normalize, 1.0)
    gx, gs = torch.autograd.grad(y.square().sum(), [x, s], create_graph=True)
    with pytest.raises(RuntimeError, match="soft_attention: double backward is not supported"):
        (gx.sum() + gs.sum()).backward()


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    x, s = _good()
    with pytest.raises(RuntimeError, match=r"soft_attention: scores must be on the device of x \(cpu\), got cuda:0"):
        op(x, s.cuda(), "sigmoid", 1.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("score_channels", ["one", "all"])
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_results_are_bitwise_identical_across_thread_counts(layout, score_channels, normalize):
    x, scores = feature_map_and_scores((3, 37, 29, 31), score_channels, torch.float32, "cpu", layout)
    grad = in_layout(torch.randn(x.shape), layout)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, scores)]
        assert leaves[0].stride() == x.stride()
        y = op(*leaves, normalize, 0.5)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score_channels", [1, 16])
def test_poisoned_output_memory_is_fully_overwritten(device, score_channels):
    # Free a NaN-filled block first: on CUDA the caching allocator hands it to the outputs,
    # so any element a kernel failed to write would surface as NaN (on CPU this is a plain
    # reference comparison). Covers every output of the three spatial operators.
    for layout in LAYOUTS:
        x = in_layout(torch.randn(3, 16, 9, 13, device=device), layout).requires_grad_(True)
        scores = torch.randn(3, score_channels, 9, 13, device=device, requires_grad=True)
        junk = torch.full((3 * 16 * 9 * 13 * 8,), float("nan"), device=device)
        del junk
        outputs = [
            CF.soft_attention(x, scores, "softmax", 0.5),
            CF.soft_attention_pool(x, scores),
            CF.hard_attention(x, scores, "topk", k=20)[0],
        ]
        x64, s64 = x.detach().double().requires_grad_(True), scores.detach().double().requires_grad_(True)
        expected = [
            soft_attention_reference(x64, s64, "softmax", 0.5),
            soft_attention_pool_reference(x64, s64),
        ]
        for out, ref in zip(outputs[:2], expected):
            assert torch.isfinite(out).all()
            assert_close(out, ref, torch.float32)
            grads = torch.autograd.grad(out, [x, scores], torch.ones_like(out))
            ref_grads = torch.autograd.grad(ref, [x64, s64], torch.ones_like(ref))
            for g, r in zip(grads, ref_grads):
                assert torch.isfinite(g).all()
                assert_close(g, r, torch.float32)
        grads = torch.autograd.grad(outputs[2], [x, scores], torch.ones_like(outputs[2]))
        assert all(torch.isfinite(g).all() for g in grads)


def _copies_of(shape, fn):
    """The copies of a tensor shaped `shape` that `fn` makes (ATen copy_/clone/contiguous)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
            and list(shape) in [list(s) for s in e.input_shapes]]


def _strided_views(x):
    """Views of x's values whose rows are contiguous but whose row starts are strided: a
    channel slice of a contiguous tensor, of a channels-last tensor, and a batch expanded
    from one sample (stride 0)."""
    n, c = x.shape[:2]
    wide = torch.randn((n, c + 3) + x.shape[2:])
    wide[:, 1:c + 1] = x
    wide_last = wide.contiguous(memory_format=torch.channels_last)
    return {
        "channel slice": wide[:, 1:c + 1],
        "channels_last channel slice": wide_last[:, 1:c + 1],
        "expanded batch": x[:1].expand_as(x),
    }


@pytest.mark.parametrize("score_channels", [1, 6])
def test_strided_inputs_are_read_in_place(score_channels):
    # By design, any strides; the CPU kernels read inputs whose rows are contiguous without a
    # copy (the output comes back dense), and give the reference's values.
    base = torch.randn(3, 6, 5, 7)
    scores = torch.randn(3, score_channels, 5, 7)
    for name, x in _strided_views(base).items():
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last), name
        grad_y = _strided_views(torch.randn_like(base))[name]
        grad_out = torch.randn(3, 6)
        calls = {
            "soft_attention": lambda: CF.soft_attention(x, scores, "softmax", 0.5),
            "soft_attention_pool": lambda: CF.soft_attention_pool(x, scores),
            "hard_attention": lambda: CF.hard_attention(x, scores, "topk", k=9),
            "_soft_attention_backward": lambda: torch.ops.cnn_attention._soft_attention_backward(
                grad_y, x, scores, "sigmoid", 1.0),
            "_soft_attention_pool_backward": lambda: torch.ops.cnn_attention._soft_attention_pool_backward(
                grad_out, x, scores, 1.0),
            "_hard_attention_backward": lambda: torch.ops.cnn_attention._hard_attention_backward(
                grad_y, x, scores, None, "threshold", 0.5, "sigmoid", 1.0),
        }
        # With one score channel no other operand is shaped like x, so any copy of that shape
        # would be a copy of x or grad_y.
        for op_name, call in calls.items():
            if score_channels == 1:
                assert _copies_of(x.shape, call) == [], f"{op_name} copied the {name} input"
        xd, sd = x.detach().double(), scores.double()
        assert_close(calls["soft_attention"](), soft_attention_reference(xd, sd, "softmax", 0.5), torch.float32)
        assert_close(calls["soft_attention_pool"](), soft_attention_pool_reference(xd, sd), torch.float32)
        gx, gs = calls["_soft_attention_backward"]()
        x64, s64 = xd.clone().requires_grad_(True), sd.clone().requires_grad_(True)
        ref = soft_attention_reference(x64, s64, "sigmoid", 1.0)
        rgx, rgs = torch.autograd.grad(ref, [x64, s64], grad_y.double())
        assert_close(gx, rgx, torch.float32)
        assert_close(gs, rgs, torch.float32)
