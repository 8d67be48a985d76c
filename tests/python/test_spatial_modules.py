"""SpatialScores, SoftAttention, HardAttention and CBAM: each against its functional
composition, their options and errors, every runtime (TorchScript in a fresh process,
torch.compile, torch.export), and hard attention learning where to look."""

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import bad_calls
from helpers import (
    DEVICES,
    assert_bitwise_identical_across_thread_counts,
    assert_close,
    channel_attention_reference,
    channel_pool_reference,
    hard_attention_reference,
    in_layout,
    soft_attention_reference,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cnn_attention import CBAM, HardAttention, SoftAttention, SpatialScores
from cnn_attention import functional as CF

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {1: (2, 6, 13), 2: (2, 6, 7, 9), 3: (2, 6, 3, 4, 5)}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def scores_of(head: SpatialScores, x: torch.Tensor) -> torch.Tensor:
    """The score head as a composition of the functional API and torch's convolution (on
    CPU the head convolves channels-last, which rounds differently in the last bit)."""
    pooled = CF.channel_pool(x)
    if x.device.type == "cpu" and head.spatial_dims > 1:
        pooled = pooled.contiguous(memory_format=torch.channels_last if head.spatial_dims == 2 else torch.channels_last_3d)
    return CONV[head.spatial_dims](pooled, head.weight, head.bias, padding=head.kernel_size // 2)


def scores_reference(head: SpatialScores, x: torch.Tensor) -> torch.Tensor:
    """The same in float64 from the plain-PyTorch references."""
    return CONV[head.spatial_dims](
        channel_pool_reference(x.double()), head.weight.double(), head.bias.double(), padding=head.kernel_size // 2
    )


# ---- each module is its functional composition ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_spatial_scores_is_conv_of_channel_pool(device, spatial_dims, kernel_size):
    head = SpatialScores(kernel_size, spatial_dims).to(device)
    assert head.weight.shape == (1, 2) + (kernel_size,) * spatial_dims and head.bias.shape == (1,)
    x = torch.randn(SHAPES[spatial_dims], device=device)
    s = head(x)
    assert s.shape == (x.shape[0], 1) + x.shape[2:]
    torch.testing.assert_close(s, scores_of(head, x), rtol=0, atol=0)
    assert_close(s, scores_reference(head, x), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("normalize,temperature", [("sigmoid", 1.0), ("softmax", 0.5)])
def test_soft_attention_is_its_composition(device, spatial_dims, normalize, temperature):
    m = SoftAttention(kernel_size=3, normalize=normalize, temperature=temperature, spatial_dims=spatial_dims).to(device)
    x = torch.randn(SHAPES[spatial_dims], device=device, requires_grad=True)
    y = m(x)
    # One operator for the branch, with the module's parameters and options.
    fused = CF.cbam_spatial(x, m.scores.weight, m.scores.bias, normalize, temperature)
    torch.testing.assert_close(y, fused, rtol=0, atol=0)
    expected = CF.soft_attention(x, scores_of(m.scores, x), normalize, temperature)
    torch.testing.assert_close(y, expected)
    x64 = x.detach().double().requires_grad_()
    params64 = [x64] + [p.detach().double().requires_grad_() for p in (m.scores.weight, m.scores.bias)]
    scores64 = CONV[spatial_dims](channel_pool_reference(x64), params64[1], params64[2], padding=1)
    expected64 = soft_attention_reference(x64, scores64, normalize, temperature)
    assert_close(y, expected64, torch.float32)
    # Gradients reach the input and the score convolution, as through the composition.
    grad = torch.randn_like(y)
    params = [x, m.scores.weight, m.scores.bias]
    *grads64, grad_scores64 = torch.autograd.grad(expected64, params64 + [scores64], grad.double())
    got = torch.autograd.grad(y, params, grad)
    for a, b in zip(got[:2], grads64[:2]):
        assert_close(a, b, torch.float32)
    if normalize == "softmax":
        # A shift of every score changes no softmax weight, so the bias's gradient is a sum of
        # terms that cancel (0 in float64): its float32 value is the rounding of terms whose
        # magnitudes add up to |d loss / d scores|_1 (about 400 here, one float32 ulp of which is
        # 5e-5), not of a value near 1e-5.
        atol = 2 * torch.finfo(torch.float32).eps * float(grad_scores64.abs().sum())
        torch.testing.assert_close(got[2].double(), grads64[2], atol=atol, rtol=0)
    else:
        assert_close(got[2], grads64[2], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize(
    "options,k",
    [
        (dict(mode="threshold", threshold=0.45), None),
        (dict(mode="threshold", threshold=0.6, estimator="identity", temperature=0.5), None),
        (dict(mode="topk", k=5), 5),
        (dict(mode="topk", keep_ratio=0.1, temperature=2.0), "ratio"),
    ],
)
def test_hard_attention_is_its_composition(device, spatial_dims, options, k):
    m = HardAttention(kernel_size=3, spatial_dims=spatial_dims, **options).to(device)
    assert m.last_mask is None and m.kept_fraction is None
    x = torch.randn(SHAPES[spatial_dims], device=device, requires_grad=True)
    positions = math.prod(x.shape[2:])
    if k == "ratio":
        k = math.ceil(0.1 * positions)
    assert m.positions_kept(positions) == (k or 1)
    y = m(x)
    scores = scores_of(m.scores, x)
    expected, mask = CF.hard_attention(
        x, scores, m.mode, m.threshold, k or 1, m.estimator, m.temperature
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(m.last_mask, mask, rtol=0, atol=0)
    assert m.last_mask.shape == (x.shape[0], 1) + x.shape[2:]
    assert m.kept_fraction == pytest.approx(mask.float().mean().item())
    if k is not None:
        assert (m.last_mask.flatten(1).sum(1) == k).all()
        assert m.kept_fraction == pytest.approx(k / positions)
    _, mask_ref = hard_attention_reference(x.detach(), scores.detach(), m.mode, m.threshold, k or 1, m.temperature)
    torch.testing.assert_close(mask.double(), mask_ref, rtol=0, atol=0)
    grad = torch.randn_like(y)
    params = [x, m.scores.weight, m.scores.bias]
    for a, b in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b)


def test_keep_ratio_picks_k_from_the_input_at_hand():
    m = HardAttention(kernel_size=3, mode="topk", keep_ratio=0.25)
    for size, k in [((4, 4), 4), ((5, 5), 7), ((1, 1), 1), ((3, 7), 6)]:
        m(torch.randn((2, 3) + size))
        assert m.positions_kept(size[0] * size[1]) == k
        assert (m.last_mask.flatten(1).sum(1) == k).all()
    assert HardAttention(mode="topk", keep_ratio=1.0).positions_kept(10) == 10


def test_hard_attention_keeps_its_mask_in_training_or_when_asked():
    x = torch.randn(2, 4, 8, 8)
    m = HardAttention(kernel_size=3, mode="topk", k=5)
    m(x)
    assert m.last_mask is not None and m.kept_fraction == pytest.approx(5 / 64)
    # Switching modes clears it; an eval forward then writes no module state.
    m.eval()
    assert m.last_mask is None
    m(x)
    assert m.last_mask is None and m.kept_fraction is None
    m.keep_mask = True
    m(x)
    assert (m.last_mask.flatten(1).sum(1) == 5).all()
    m.eval()  # no change of mode: the mask stays
    assert m.last_mask is not None
    m.train()
    assert m.last_mask is None
    assert "keep_mask=True" in repr(m) and "keep_mask" not in repr(HardAttention())
    # TorchScript follows the same rule.
    scripted = torch.jit.script(HardAttention(kernel_size=3, mode="topk", k=5).eval())
    scripted(x)
    assert scripted.last_mask is None
    scripted.train()
    scripted(x)
    assert (scripted.last_mask.flatten(1).sum(1) == 5).all()


def test_hard_attention_noise_only_in_training():
    torch.manual_seed(1)
    noisy = HardAttention(kernel_size=3, mode="threshold", noise=1.0, keep_mask=True)
    clean = HardAttention(kernel_size=3, mode="threshold", noise=0.0, keep_mask=True)
    clean.load_state_dict(noisy.state_dict())
    x = torch.randn(2, 4, 8, 8)
    # Training: the logistic noise moves the mask from one call to the next.
    first, second = noisy(x), noisy(x)
    assert not torch.equal(first, second)
    assert not torch.equal(first, clean(x))
    # Without noise, training is deterministic.
    assert torch.equal(clean(x), clean(x))
    # Eval: no noise at all; the same output as the noise-free module, every call.
    noisy.eval()
    clean.eval()
    out = noisy(x)
    assert torch.equal(out, noisy(x))
    assert torch.equal(out, clean(x))
    assert torch.equal(noisy.last_mask, clean.last_mask)
    # Top-k with noise still keeps exactly k positions.
    m = HardAttention(kernel_size=3, mode="topk", k=9, noise=2.0)
    m(x)
    assert (m.last_mask.flatten(1).sum(1) == 9).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_cbam_is_channel_attention_then_soft_attention(device, spatial_dims):
    m = CBAM(6, reduction=2, min_hidden=2, kernel_size=3, spatial_dims=spatial_dims).to(device)
    assert m.channel.hidden == 3 and m.channel.pool == "avgmax" and m.spatial.normalize == "sigmoid"
    x = torch.randn(SHAPES[spatial_dims], device=device, requires_grad=True)
    y = m(x)
    c, s = m.channel, m.spatial.scores
    fused = CF.cbam(x, c.fc1_weight, c.fc1_bias, c.fc2_weight, c.fc2_bias, s.weight, s.bias)
    torch.testing.assert_close(y, fused, rtol=0, atol=0)
    # The two-step path (channel_attention, then the score head and soft_attention) rounds
    # the channel-weighted map once more: equal to float32 rounding.
    after_channel = CF.channel_attention(x, c.fc1_weight, c.fc1_bias, c.fc2_weight, c.fc2_bias, "avgmax", "sigmoid")
    expected = CF.soft_attention(after_channel, scores_of(s, after_channel), "sigmoid", 1.0)
    torch.testing.assert_close(y, expected)
    x64 = x.detach().double()
    ref = channel_attention_reference(
        x64, c.fc1_weight.double(), c.fc1_bias.double(), c.fc2_weight.double(), c.fc2_bias.double(), "avgmax"
    )
    ref = soft_attention_reference(ref, scores_reference(s, ref))
    assert_close(y, ref, torch.float32, scale=4.0)
    params = [x, *m.parameters()]
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b)


def _cbam_forward_call(x_dtype=torch.float32):
    call = bad_calls.cbam_call()
    call = {k: v.to(x_dtype) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    return list(call.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cbam_saves_the_channel_statistics_of_x(dtype):
    args = _cbam_forward_call(dtype)
    x = args[0]
    x[1, 3, 2, 4] = 50.0  # a channel whose max is at a known position
    x[0, 5] = 1.0  # a channel of equal values: the first position is the max's
    y, stats, argmax = torch.ops.cnn_attention._cbam_forward(*args)
    assert torch.equal(y, torch.ops.cnn_attention.cbam(*args))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats.dtype == acc and stats.shape == (2, 2, 8) and argmax.dtype == torch.int64
    flat = x.to(acc).flatten(2)
    torch.testing.assert_close(stats[0], flat.mean(2))
    assert torch.equal(stats[1], flat.amax(2))
    assert argmax[1, 3] == 2 * 5 + 4 and argmax[0, 5] == 0
    assert torch.equal(argmax, flat.argmax(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spatial", [(4, 4), (7, 7), (8, 8), (5, 13), (16, 16)])
def test_cbam_channel_argmax_is_the_first_maximum(dtype, spatial):
    """Each channel's saved argmax is the first position of its maximum (of its first NaN where
    it has one), wherever that lies in the row: rows of 16, 49, 64, 65 and 256 positions (one
    mask over the row up to 64, a branch per vector beyond), with the maximum at the start, in
    a later vector, in the last one, in the tail past the vectors, repeated at later
    positions, and rows with NaN."""
    args = _cbam_forward_call(dtype)
    positions = spatial[0] * spatial[1]
    generator = torch.Generator().manual_seed(positions)
    flat = torch.randn(2, 8, positions, generator=generator)
    for channel, first in enumerate([0, 9, positions - 1, positions // 2, 17 % positions]):
        flat[0, channel, first] = 10.0
        flat[0, channel, first + 1:] = torch.where(torch.arange(positions - first - 1) % 3 == 0, 10.0,
                                                   flat[0, channel, first + 1:])
    flat[1, 0, positions - 1] = float("nan")
    flat[1, 1, 3] = float("nan")
    flat[1, 1, positions - 2] = float("nan")
    flat[1, 2] = 10.0  # a row of equal values
    x = flat.to(dtype).view((2, 8) + spatial)
    args[0] = x
    args[5] = torch.randn(1, 2, 3, 3, generator=generator).to(dtype)
    _, _, argmax = torch.ops.cnn_attention._cbam_forward(*args)
    values = x.flatten(2).double()
    first_nan = torch.isnan(values).int().argmax(2)
    expected = torch.where(torch.isnan(values).any(2), first_nan, values.nan_to_num(-math.inf).argmax(2))
    assert torch.equal(argmax, expected)
    assert argmax[0, 0] == 0 and argmax[0, 2] == positions - 1 and argmax[1, 1] == 3 and argmax[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positions", [1, 3, 4, 5, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 49, 63, 64, 65])
def test_cbam_channel_statistics_of_short_rows_are_each_rows_own(dtype, positions):
    """Rows of up to two rounds of the sweep's chains (64 floats, 32 doubles) take their mean
    and maximum a group of rows (a vector's lanes) at a time, transposed; every row's statistics
    are the bits that row gives alone (one channel of one sample: no group), with and without
    whole rounds, whole vectors and positions past them, on both sides of the limit, with NaN
    and infinities."""
    generator = torch.Generator().manual_seed(positions)
    x = torch.randn(3, 12, positions, generator=generator, dtype=dtype) * 10
    x[0, 1, positions // 2] = float("nan")
    x[1, 2, 0] = float("inf")
    x[2, 3] = float("-inf")
    x[2, 4, -1] = float("-inf")

    def stats_of(x):
        channels = x.shape[1]
        weights = [torch.randn(2, channels, dtype=dtype), torch.zeros(2, dtype=dtype),
                   torch.randn(channels, 2, dtype=dtype), torch.zeros(channels, dtype=dtype),
                   torch.randn(1, 2, 3, dtype=dtype), None]
        return torch.ops.cnn_attention._cbam_forward(x, *weights, "sigmoid", "relu")[1:]

    stats, argmax = stats_of(x)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            alone, alone_argmax = stats_of(x[n:n + 1, c:c + 1])
            torch.testing.assert_close(stats[:, n, c], alone[:, 0, 0], rtol=0, atol=0, equal_nan=True)
            assert argmax[n, c] == alone_argmax[0, 0]


class _RecordOperators(TorchDispatchMode):
    """The names of our operators dispatched below autograd while the mode is on."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "cnn_attention" in str(func):
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_cbam_without_a_backward_finds_no_argmax_for_one(device):
    """Where no backward will run (no_grad, inference_mode, or nothing requires a gradient)
    the Autograd kernel calls the forward alone, which finds no per-channel argmax; with a
    backward to come it calls _cbam_forward, which saves the statistics. y is the same bits."""
    m = CBAM(8, reduction=2, min_hidden=2).to(device)
    x = torch.randn(2, 8, 5, 7, device=device)
    with _RecordOperators() as recorded:
        trained = m(x)
    assert recorded.names == ["cnn_attention._cbam_forward.default"]
    frozen = CBAM(8, reduction=2, min_hidden=2).to(device).requires_grad_(False)
    frozen.load_state_dict(m.state_dict())
    for context, module in [(torch.no_grad, m), (torch.inference_mode, m), (contextlib.nullcontext, frozen)]:
        with context(), _RecordOperators() as recorded:
            y = module(x)
        assert recorded.names == ["cnn_attention.cbam.default"], context
        assert not y.requires_grad and torch.equal(y, trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 24, 9, 11), (3, 10, 37), (3, 6, 3, 5, 7)], ids=str)
def test_cbam_forward_by_sample_is_the_forward_over_the_batch(shape, layout, dtype):
    """The CPU forward's spatial half (cbam, cbam_spatial with the sigmoid) runs one task per
    sample where every thread gets a sample (1 to 3 threads here) and each step over the batch
    where not (4 threads): the same bits, with and without a temperature."""
    generator = torch.Generator().manual_seed(7)
    channels, k = shape[1], 3
    x = in_layout(torch.randn(shape, generator=generator).to(dtype), layout)
    params = [(torch.randn(size, generator=generator) * 0.3).to(dtype) for size in [
        (channels // 2, channels), (channels // 2,), (channels, channels // 2), (channels,),
        (1, 2) + (k,) * (len(shape) - 2), (1,)]]

    def run():
        with torch.no_grad():
            return [CF.cbam(x, *params), CF.cbam_spatial(x, params[4], params[5], "sigmoid", 1.0),
                    CF.cbam_spatial(x, params[4], params[5], "sigmoid", 0.7)]

    assert_bitwise_identical_across_thread_counts(run, threads=(1, 2, 3, 4))


def _gradients_on(device, op, x, params, grad):
    inputs = [t.detach().to(device).requires_grad_() for t in [x, *params]]
    y = op(*inputs)
    return [y.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(y, inputs, grad.to(device)))]


# Many channels (the CUDA pooling's channel slices and warps hold several each) and maps long
# enough for the CUDA reductions to split their rows.
CUDA_CBAM_SHAPES = [(3, 70, 9, 13), (2, 40, 64, 80), (2, 37, 11)]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CUDA_CBAM_SHAPES, ids=str)
def test_cbam_on_cuda_is_the_cpu_result(shape, layout):
    """cbam's CUDA passes (the pooling of x * w over the channels, the position terms of the
    backward's reduction and apply) against the CPU's, in float64, forward and every gradient."""
    generator = torch.Generator().manual_seed(5)
    channels, k = shape[1], 5
    x = in_layout(torch.randn(shape, generator=generator, dtype=torch.float64), layout)
    params = [torch.randn(size, generator=generator, dtype=torch.float64) * scale for size, scale in [
        ((channels // 4, channels), channels ** -0.5), ((channels // 4,), 0.1),
        ((channels, channels // 4), (channels // 4) ** -0.5), ((channels,), 0.1),
        ((1, 2) + (k,) * (len(shape) - 2), 0.2), ((1,), 0.1)]]
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    on_cpu, on_cuda = (_gradients_on(device, CF.cbam, x, params, grad) for device in ("cpu", "cuda"))
    for name, a, b in zip(["y", "x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "conv_weight",
                           "conv_bias"], on_cuda, on_cpu):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", CUDA_CBAM_SHAPES, ids=str)
def test_cbam_spatial_on_cuda_sends_tied_maxima_to_the_first_channel(shape, layout, dtype):
    """Small integers tie across the channels at most positions; the max's gradient must go to
    the first of them on CUDA as on the CPU (a later one would differ by a whole term)."""
    generator = torch.Generator().manual_seed(6)
    x = in_layout(torch.randint(-3, 4, shape, generator=generator).to(dtype), layout)
    weight = (torch.randn((1, 2) + (3,) * (len(shape) - 2), generator=generator) * 0.2).to(dtype)
    bias = torch.randn(1, generator=generator).to(dtype)
    grad = torch.randn(shape, generator=generator).to(dtype)
    for normalize, temperature in [("sigmoid", 1.0), ("softmax", 0.7)]:
        def op(x, weight, bias):
            return CF.cbam_spatial(x, weight, bias, normalize, temperature)

        on_cpu, on_cuda = (_gradients_on(device, op, x, [weight, bias], grad) for device in ("cpu", "cuda"))
        tolerance = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        for name, a, b in zip(["y", "x", "conv_weight", "conv_bias"], on_cuda, on_cpu):
            torch.testing.assert_close(a.double(), b.double(), rtol=tolerance, atol=tolerance / 10,
                                       msg=f"{normalize}: {name}")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_cbam_backward_checks_what_the_forward_saved(device):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _cbam_forward_call()]
    y, stats, argmax = torch.ops.cnn_attention._cbam_forward(*args)
    tensors, options = args[:-2], args[-2:]

    def backward(stats, argmax):
        return torch.ops.cnn_attention._cbam_backward(y, *tensors, stats, argmax, *options)

    bad = [
        ((stats[:, :1], argmax), r"cbam: channel_stats must be \(2, N, C\) = \(2, 2, 8\), got \(2, 1, 8\)"),
        ((stats.double(), argmax), r"cbam: channel_stats must be Float on .*, got Double on"),
        ((stats, argmax[..., :7]), r"cbam: channel_argmax must be \(N, C\) = \(2, 8\), got \(2, 7\)"),
        ((stats, argmax.int()), r"cbam: channel_argmax must be Long on .*, got Int on"),
    ]
    if device == "cpu":  # values are read where the kernels index with them
        bad += [((stats, argmax.clone().fill_(25)), r"cbam: channel_argmax must hold positions in \[0, 25\), got values in \[25, 25\]"),
                ((stats, argmax - 1), r"cbam: channel_argmax must hold positions in \[0, 25\), got values in \[-1, ")]
    for (s, a), message in bad:
        with pytest.raises(RuntimeError, match=message):
            backward(s, a)
    backward(stats, argmax)


def test_defaults_and_repr():
    assert CBAM(64).channel.hidden == 8 and CBAM(64).spatial.scores.kernel_size == 7
    soft = SoftAttention()
    assert soft.normalize == "sigmoid" and soft.temperature == 1.0 and soft.scores.spatial_dims == 2
    hard = HardAttention()
    assert (hard.mode, hard.threshold, hard.k, hard.keep_ratio, hard.estimator, hard.temperature, hard.noise) == (
        "threshold", 0.5, 1, None, "sigmoid", 1.0, 0.0
    )
    assert "normalize='sigmoid'" in repr(soft) and "kernel_size=7" in repr(soft)
    assert "keep_ratio=0.5" in repr(HardAttention(mode="topk", keep_ratio=0.5))


# ---- bad options ----

BAD_OPTIONS = [
    (lambda: SoftAttention(kernel_size=4), r"SoftAttention: kernel_size must be odd and positive, got 4"),
    (lambda: SoftAttention(kernel_size=0), r"SoftAttention: kernel_size must be odd and positive, got 0"),
    (lambda: SoftAttention(spatial_dims=4), r"SoftAttention: spatial_dims must be 1, 2 or 3, got 4"),
    (lambda: SoftAttention(spatial_dims=0), r"SoftAttention: spatial_dims must be 1, 2 or 3, got 0"),
    (lambda: SoftAttention(normalize="relu"), r"SoftAttention: normalize must be one of 'sigmoid', 'softmax', got 'relu'"),
    (lambda: SoftAttention(temperature=0.0), r"SoftAttention: temperature must be finite and positive, got 0.0"),
    (lambda: SoftAttention(temperature=float("nan")), r"SoftAttention: temperature must be finite and positive, got nan"),
    (lambda: HardAttention(kernel_size=6), r"HardAttention: kernel_size must be odd and positive, got 6"),
    (lambda: HardAttention(spatial_dims=4), r"HardAttention: spatial_dims must be 1, 2 or 3, got 4"),
    (lambda: HardAttention(mode="sample"), r"HardAttention: mode must be one of 'threshold', 'topk', got 'sample'"),
    (lambda: HardAttention(estimator="gumbel"), r"HardAttention: estimator must be one of 'sigmoid', 'identity', got 'gumbel'"),
    (lambda: HardAttention(keep_ratio=0.5), r"HardAttention: keep_ratio needs mode='topk', got mode='threshold'"),
    (lambda: HardAttention(mode="topk", keep_ratio=0.0), r"HardAttention: keep_ratio must be in \(0, 1\], got 0.0"),
    (lambda: HardAttention(mode="topk", keep_ratio=1.5), r"HardAttention: keep_ratio must be in \(0, 1\], got 1.5"),
    (lambda: HardAttention(temperature=0.0), r"HardAttention: temperature must be finite and positive, got 0.0"),
    (lambda: HardAttention(temperature=-1.0), r"HardAttention: temperature must be finite and positive, got -1.0"),
    (lambda: HardAttention(noise=-0.1), r"HardAttention: noise must be finite and >= 0, got -0.1"),
    (lambda: HardAttention(noise=float("inf")), r"HardAttention: noise must be finite and >= 0, got inf"),
    (lambda: HardAttention(threshold=1.5), r"HardAttention: threshold must be finite and in \[0, 1\], got 1.5"),
    (lambda: HardAttention(mode="topk", k=0), r"HardAttention: k must be an integer >= 1, got 0"),
    (lambda: SpatialScores(kernel_size=2), r"SpatialScores: kernel_size must be odd and positive, got 2"),
    (lambda: SpatialScores(spatial_dims=4), r"SpatialScores: spatial_dims must be 1, 2 or 3, got 4"),
    (lambda: CBAM(0), r"ChannelAttention: channels must be an integer >= 1, got 0"),
    # CBAM's spatial branch is a SoftAttention, which names itself.
    (lambda: CBAM(8, kernel_size=8), r"SoftAttention: kernel_size must be odd and positive, got 8"),
    (lambda: CBAM(8, spatial_dims=4), r"SoftAttention: spatial_dims must be 1, 2 or 3, got 4"),
    # Integer options take integers only (not bools, not floats, not even integral ones) and
    # float options real numbers.
    (lambda: SpatialScores(kernel_size=float("inf")), r"SpatialScores: kernel_size must be an integer, got inf"),
    (lambda: SpatialScores(kernel_size=3.0), r"SpatialScores: kernel_size must be an integer, got 3.0"),
    (lambda: SpatialScores(spatial_dims=True), r"SpatialScores: spatial_dims must be an integer, got True"),
    (lambda: SoftAttention(spatial_dims=2.0), r"SoftAttention: spatial_dims must be an integer, got 2.0"),
    (lambda: SoftAttention(kernel_size="7"), r"SoftAttention: kernel_size must be an integer, got '7'"),
    (lambda: SoftAttention(temperature="1"), r"SoftAttention: temperature must be finite and positive, got '1'"),
    (lambda: SoftAttention(temperature=True), r"SoftAttention: temperature must be finite and positive, got True"),
    (lambda: SoftAttention(temperature=10**400), r"SoftAttention: temperature must be finite and positive, got 1000"),
    (lambda: HardAttention(spatial_dims=float("nan")), r"HardAttention: spatial_dims must be an integer, got nan"),
    (lambda: HardAttention(mode="topk", k=2.0), r"HardAttention: k must be an integer >= 1, got 2.0"),
    (lambda: HardAttention(mode="topk", k=True), r"HardAttention: k must be an integer >= 1, got True"),
    (lambda: HardAttention(threshold=float("nan")), r"HardAttention: threshold must be finite and in \[0, 1\], got nan"),
    (lambda: HardAttention(threshold=None), r"HardAttention: threshold must be finite and in \[0, 1\], got None"),
    (lambda: HardAttention(mode="topk", keep_ratio="all"), r"HardAttention: keep_ratio must be in \(0, 1\], got 'all'"),
    (lambda: HardAttention(mode="topk", keep_ratio=float("nan")), r"HardAttention: keep_ratio must be in \(0, 1\], got nan"),
    (lambda: HardAttention(noise=float("nan")), r"HardAttention: noise must be finite and >= 0, got nan"),
    (lambda: HardAttention(noise="0"), r"HardAttention: noise must be finite and >= 0, got '0'"),
    (lambda: CBAM(8.0), r"ChannelAttention: channels must be an integer >= 1, got 8.0"),
    (lambda: CBAM(8, reduction=float("inf")), r"ChannelAttention: reduction must be an integer >= 1, got inf"),
    (lambda: CBAM(8, kernel_size=7.0), r"SoftAttention: kernel_size must be an integer, got 7.0"),
    # A long value is shortened in the message.
    (lambda: HardAttention(noise=2**2000), r"HardAttention: noise must be finite and >= 0, got \d{57}\.\.\.$"),
    (lambda: SoftAttention(normalize="s" * 1000), r"SoftAttention: normalize must be one of 'sigmoid', 'softmax', got 's{56}\.\.\.$"),
]


@pytest.mark.parametrize("make,message", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_bad_options_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


MODULE_FACTORIES = [
    (lambda dims: SpatialScores(3, dims), "SpatialScores"),
    (lambda dims: SoftAttention(3, spatial_dims=dims), "SoftAttention"),
    (lambda dims: HardAttention(3, spatial_dims=dims), "HardAttention"),
    (lambda dims: CBAM(4, kernel_size=3, spatial_dims=dims), "CBAM"),
]


def test_integer_scalars_are_integers():
    head = SpatialScores(torch.tensor(3), torch.tensor(1))
    assert (head.kernel_size, head.spatial_dims) == (3, 1) and type(head.kernel_size) is int
    hard = HardAttention(mode="topk", k=torch.tensor(2), threshold=1, temperature=2, noise=0)
    assert type(hard.k) is int and hard.k == 2 and hard.threshold == 1.0 and type(hard.temperature) is float


@pytest.mark.parametrize("make,name", MODULE_FACTORIES, ids=["SpatialScores", "SoftAttention", "HardAttention", "CBAM"])
def test_wrong_input_rank_raises_value_error(make, name):
    module = make(2)
    with pytest.raises(ValueError, match=rf"{name}: x must be \(N, C, \*S\) with 2 spatial dims \(spatial_dims\), got 3 dims"):
        module(torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match=rf"{name}: x must be \(N, C, \*S\) with 2 spatial dims \(spatial_dims\), got 5 dims"):
        module(torch.randn(2, 4, 3, 3, 3))
    with pytest.raises(ValueError, match=rf"{name}: x must be \(N, C, \*S\) with 3 spatial dims \(spatial_dims\), got 4 dims"):
        make(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("make,name", MODULE_FACTORIES, ids=["SpatialScores", "SoftAttention", "HardAttention", "CBAM"])
@pytest.mark.parametrize("x", [None, [1.0, 2.0], 3.0, "x"], ids=["None", "list", "float", "str"])
def test_non_tensor_input_raises_type_error_naming_the_module(make, name, x):
    with pytest.raises(TypeError, match=rf"^{name}: x must be a Tensor, got {type(x).__name__}$"):
        make(2)(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spatial", [(0,), (0, 3), (3, 0), (2, 0, 3)])
@pytest.mark.parametrize(
    "make",
    [
        lambda dims: SpatialScores(3, dims),
        lambda dims: SoftAttention(3, normalize="softmax", spatial_dims=dims),
        lambda dims: HardAttention(1, spatial_dims=dims),
        lambda dims: HardAttention(3, mode="topk", k=2, spatial_dims=dims, noise=1.0),
        lambda dims: HardAttention(3, mode="topk", keep_ratio=0.5, spatial_dims=dims),
        lambda dims: CBAM(4, kernel_size=3, spatial_dims=dims),
    ],
    ids=["SpatialScores", "SoftAttention", "HardAttention", "HardAttention-topk", "HardAttention-ratio", "CBAM"],
)
def test_no_positions_give_empty_results_and_gradients(device, spatial, make):
    m = make(len(spatial)).to(device)
    x = torch.randn((2, 4) + spatial, device=device, requires_grad=True)
    y = m(x)
    channels = 1 if isinstance(m, SpatialScores) else 4
    assert y.shape == (2, channels) + spatial and y.dtype == x.dtype and y.device == x.device
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or (p.grad == 0).all() for p in m.parameters())
    if isinstance(m, HardAttention):
        assert m.last_mask.shape == (2, 1) + spatial
    # The same scripted.
    assert torch.jit.script(m)(x.detach()).shape == y.shape


@pytest.mark.parametrize(
    "make,name",
    MODULE_FACTORIES[:3] + [(lambda dims: CBAM(2, min_hidden=2, kernel_size=3, spatial_dims=dims), "CBAM")],
    ids=["SpatialScores", "SoftAttention", "HardAttention", "CBAM"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_input_dtype_other_than_the_parameters_raises_value_error(make, name, dtype):
    x = torch.randn(1, 2, 4, 4, dtype=dtype)
    message = (rf"^{name}: x has dtype {dtype} but the module's parameters are torch.float32; "
               rf"convert x or the module \(module.to\({dtype}\)\)$")
    with pytest.raises(ValueError, match=message):
        make(2)(x)
    # The module converted takes x; so does an autocast region, where the convolution casts
    # all but float64 inputs.
    assert make(2).to(dtype)(x).dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if dtype == torch.float64:
            with pytest.raises(ValueError, match=message):
                make(2)(x)
        else:
            make(2)(x)


@pytest.mark.parametrize("make,name", MODULE_FACTORIES, ids=["SpatialScores", "SoftAttention", "HardAttention", "CBAM"])
@pytest.mark.parametrize("spatial", [(4, 4), (4, 0)], ids=["positions", "no-positions"])
def test_input_on_another_device_than_the_parameters_raises_value_error(make, name, spatial):
    m = make(2)
    x = torch.randn((1, 4) + spatial, device="meta")
    if isinstance(m, CBAM):
        # Either half's parameters on another device than x.
        spatial_moved = make(2)
        spatial_moved.spatial.to("meta")
        with pytest.raises(ValueError, match=r"^CBAM: x is on device meta but the module's parameters are on cpu"):
            spatial_moved(x)
        m.channel.to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: x is on device meta but the module's parameters are on cpu; "
                                         r"move x or the module \(module.to\('meta'\)\)$"):
        m(x)
    expected = (1, 1) + spatial if isinstance(m, SpatialScores) else x.shape
    assert m.to("meta")(x).shape == expected


def test_input_dtype_check_in_torchscript():
    # TorchScript's only autocast query is CUDA's: on the CPU only float64, which autocast
    # never casts, is checked; other mismatches meet the operator's own error.
    m = torch.jit.script(SoftAttention(3))
    with pytest.raises(Exception, match=r"SoftAttention: x has dtype torch.float64 but the module's parameters are torch.float32"):
        m(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(Exception, match=r"cbam_spatial: conv_weight must have the dtype of x \(BFloat16\)"):
        m(torch.randn(1, 2, 4, 4, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(1, 2, 4, 4)).dtype == torch.bfloat16


@pytest.mark.cuda
def test_input_dtype_check_on_cuda_scripted():
    m = torch.jit.script(SoftAttention(3).cuda())
    with pytest.raises(Exception, match=r"SoftAttention: x has dtype torch.float64 but the module's parameters are torch.float32"):
        m(torch.randn(1, 2, 4, 4, dtype=torch.float64, device="cuda"))
    with torch.autocast("cuda", dtype=torch.float16):
        assert m(torch.randn(1, 2, 4, 4, device="cuda")).dtype == torch.float16


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 8, 6, 6, device=device)
    modules = [SoftAttention(3, normalize="softmax"), HardAttention(3, mode="topk", k=4), CBAM(8, kernel_size=3)]
    for m in modules:
        m.to(device)
        with torch.autocast(device_type=device, dtype=dtype):
            y = m(x)
        assert y.dtype == dtype and y.shape == x.shape
        y.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


# ---- runtimes ----

class SpatialCNN(nn.Module):
    """A small CNN with every spatial module, at a high- and a low-resolution stage."""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.soft = SoftAttention(kernel_size=5, normalize="softmax", temperature=0.5)
        self.hard = HardAttention(kernel_size=3, mode="topk", keep_ratio=0.25, keep_mask=True)
        self.down = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU())
        self.cbam = CBAM(2 * channels, reduction=4, kernel_size=3)
        self.gate = HardAttention(kernel_size=3, mode="threshold", threshold=0.4, estimator="identity")
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hard(self.soft(self.stem(x)))
        x = self.gate(self.cbam(self.down(x)))
        return self.head(x.mean((2, 3)))


def _model_and_input():
    return SpatialCNN().eval(), torch.randn(2, 3, 16, 16)


def test_torchscript_save_and_load_in_a_fresh_process(tmp_path):
    model, x = _model_and_input()
    expected = model(x)
    scripted = torch.jit.script(model)
    out = scripted(x)
    assert torch.equal(out, expected)
    assert torch.equal(scripted.hard.last_mask, model.hard.last_mask)
    # The scripted module trains too (the straight-through gradient is in C++).
    scripted.train()
    scripted(x).sum().backward()
    assert scripted.hard.scores.weight.grad is not None and scripted.soft.scores.weight.grad is not None
    scripted.eval()
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    torch.save({"x": x, "y": expected.detach(), "mask": model.hard.last_mask}, tmp_path / "io.pt")
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'python')!r})
        import cnn_attention
        m = torch.jit.load({str(path)!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        assert torch.equal(m(io["x"]), io["y"])
        assert torch.equal(m.hard.last_mask, io["mask"])
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_scripted_functional_api():
    x, s = torch.randn(2, 4, 5, 5), torch.randn(2, 1, 5, 5)
    soft = torch.jit.script(CF.soft_attention)
    assert torch.equal(soft(x, s, "softmax", 0.5), CF.soft_attention(x, s, "softmax", 0.5))
    pool = torch.jit.script(CF.soft_attention_pool)
    assert torch.equal(pool(x, s, 2.0), CF.soft_attention_pool(x, s, 2.0))
    hard = torch.jit.script(CF.hard_attention)
    for a, b in zip(hard(x, s, "topk", 0.5, 3, "identity", 1.0), CF.hard_attention(x, s, "topk", k=3, estimator="identity")):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    model, x = _model_and_input()
    compiled = torch.compile(model, fullgraph=True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out1 = compiled(x1)
    mask1 = model.hard.last_mask  # the compiled module keeps its mask too
    out2 = model(x2)
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-5)
    assert mask1 is not None and mask1 is not model.hard.last_mask
    torch.testing.assert_close(mask1, model.hard.last_mask, rtol=0, atol=0)
    out1.sum().backward()
    # Parameter gradients too: through the straight-through estimator and the score heads.
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for a, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_torch_export(tmp_path):
    model, x = _model_and_input()
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    for op in ("cbam_spatial", "hard_attention", "cbam", "channel_pool"):
        assert f"cnn_attention.{op}.default" in targets, op
    torch.testing.assert_close(exported.module()(x), model(x))
    path = tmp_path / "model.pt2"
    torch.export.save(exported, str(path))
    torch.testing.assert_close(torch.export.load(str(path)).module()(x), model(x))
    # Strict export traces with dynamo, which keeps HardAttention's attribute assignment.
    strict = torch.export.export(model, (x,), strict=True)
    torch.testing.assert_close(strict.module()(x), model(x))


def test_torch_export_with_dynamic_batch():
    model, x = _model_and_input()
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        xn = torch.randn(n, 3, 16, 16)
        torch.testing.assert_close(exported.module()(xn), model(xn))


# ---- hard attention learns where to look ----

SIZE, PATCH = 16, 4


def _patch_data(n: int, gen: torch.Generator):
    """1-channel SIZE x SIZE noise images; a PATCH x PATCH patch at a random place is bright
    (+2) for class 1 and dark (-2) for class 0. Returns images, labels, patch indicator."""
    x = torch.randn(n, 1, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.randint(0, SIZE - PATCH + 1, (n,), generator=gen)
    cols = torch.randint(0, SIZE - PATCH + 1, (n,), generator=gen)
    inside = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        inside[i, 0, rows[i] : rows[i] + PATCH, cols[i] : cols[i] + PATCH] = 1
    return x + inside * (4.0 * labels - 2.0).view(n, 1, 1, 1), labels, inside


class _PatchClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        # Keep 16 of 256 positions: exactly as many as the patch has.
        self.attention = HardAttention(
            kernel_size=5, mode="topk", keep_ratio=PATCH * PATCH / SIZE**2, estimator="sigmoid", keep_mask=True
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(self.stem(x)).sum((2, 3)) / (PATCH * PATCH))


def _evaluate(model, x, labels, inside):
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
        mask = model.attention.last_mask
        assert mask.flatten(1).sum(1).eq(16).all()
        on_patch = ((mask * inside).sum() / mask.sum()).item()
    model.train()
    return accuracy, on_patch


def test_hard_attention_learns_to_keep_the_informative_region():
    # The label lives in one small patch; everything else is noise. Only a mask on the
    # patch lets the pooled features separate the classes, and the straight-through
    # gradient is the only signal that moves the mask.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = _PatchClassifier()
    test_x, test_labels, test_inside = _patch_data(512, torch.Generator().manual_seed(1234))
    accuracy, on_patch = _evaluate(model, test_x, test_labels, test_inside)
    assert on_patch < 0.25, "the untrained mask should not already sit on the patch"
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x, labels, _ = _patch_data(64, gen)
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy, on_patch = _evaluate(model, test_x, test_labels, test_inside)
    chance = PATCH * PATCH / SIZE**2
    assert on_patch > 0.5, f"kept positions on the patch: {on_patch:.3f} (chance {chance})"
    assert accuracy > 0.9, f"held-out accuracy {accuracy:.3f}"
