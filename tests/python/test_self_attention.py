"""self_attention's own cases against the float64 reference of docs/design.md section 1 (head
dims, the flash setting, few and many positions), memory linear in P, determinism, NaN, bad
backward arguments, the SelfAttention module under torch.compile and TorchScript's functional
API. Every variant of the operator table (head counts, key/value strides, with and without
biases) against the reference over dtype x layout x rank, the bad calls, gradcheck and opcheck
are in test_operators.py; the model-level runtime tests (TorchScript in a fresh process,
torch.export) in test_runtimes.py."""

import itertools
import math
from typing import List

import pytest
import torch
from helpers import (
    DEVICES,
    DTYPES,
    assert_bitwise_identical_across_thread_counts,
    assert_close,
    float64_leaves,
    in_layout,
    self_attention_reference,
)
import operators
from operators import BY_NAME, Sample

from cnn_attention import SelfAttention
from cnn_attention import functional as CF

op = torch.ops.cnn_attention.self_attention
forward_op = torch.ops.cnn_attention._self_attention_forward
backward_op = torch.ops.cnn_attention._self_attention_backward

NAMES = ["x", "qkv_weight", "qkv_bias", "out_weight", "out_bias", "gamma"]
# Odd spatial sizes that neither 2 nor 3 divides: kv_stride 2 and 3 drop trailing positions.
SA_SPATIAL = [(11,), (5, 7), (5, 7, 5)]


def make_params(channels, qk_dim, v_dim, dtype, device, bias=True, gamma=0.8, scale=1.5):
    """(qkv_weight, qkv_bias, out_weight, out_bias, gamma): logits q.k / sqrt(d) of a
    standard normal x have a standard deviation of about scale**2, so the softmax is neither
    flat nor one-hot."""
    qkv_weight = scale * torch.randn(2 * qk_dim + v_dim, channels, device=device) / channels**0.5
    out_weight = torch.randn(channels, v_dim, device=device) / v_dim**0.5
    qkv_bias = 0.1 * torch.randn(2 * qk_dim + v_dim, device=device) if bias else None
    out_bias = 0.1 * torch.randn(channels, device=device) if bias else None
    params = [qkv_weight, qkv_bias, out_weight, out_bias, torch.full((1,), gamma, device=device)]
    return [None if p is None else p.to(dtype) for p in params]


def check_against_reference(x, params, qk_dim, num_heads, kv_stride, scale=1.0):
    """The forward and the gradients of x and every parameter against the float64 reference, as
    the operator table checks them (its tolerance model is in operators._self_attention_compare)."""
    tensors = {"x": x, **dict(zip(NAMES[1:], params))}
    options = {"qk_dim": qk_dim, "num_heads": num_heads, "kv_stride": kv_stride}
    return operators.check_against_reference(Sample(BY_NAME["self_attention"], tensors, options), scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial", SA_SPATIAL)
@pytest.mark.parametrize(
    "channels,qk_dim,v_dim,num_heads",
    [
        (6, 4, 4, 2),  # equal head dims
        (6, 6, 6, 3),
        (16, 2, 16, 1),  # SelfAttention(16)'s defaults: qk_reduction=8, v_reduction=1
        (16, 2, 16, 2),  # a query/key head dim of 1
        (8, 8, 4, 4),  # query/key heads wider than value heads
        (5, 3, 9, 3),
    ],
)
@pytest.mark.parametrize("kv_stride", [1, 2])
def test_head_dims_match_reference(device, dtype, spatial, channels, qk_dim, v_dim, num_heads, kv_stride):
    x = torch.randn((2, channels) + spatial, device=device, dtype=dtype)
    check_against_reference(x, make_params(channels, qk_dim, v_dim, dtype, device), qk_dim, num_heads, kv_stride)


FEW = [
    ((5,), 5),  # one key for every query
    ((3, 7), 3),  # one row of two keys
    ((7, 2), 2),  # a stride equal to a spatial size
    ((2, 3, 4), 2),
    ((1, 9, 9), 1),
    ((4, 1, 6), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("flash", [True, False], ids=["flash_enabled", "flash_disabled"])
def test_equal_head_dims_whatever_the_flash_setting(dtype, layout, kv_stride, flash):
    # Query/key heads as wide as value heads, which ATen's CPU flash kernel would take: the
    # operator runs its own kernel whatever torch.backends.cuda.enable_flash_sdp says (ATen's
    # calls BLAS, whose results change with the thread count), forward and backward against
    # the reference.
    x = in_layout(torch.randn(2, 8, 9, 10).to(dtype), layout)
    params = make_params(8, 8, 8, dtype, "cpu")
    enabled = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(flash)
    try:
        check_against_reference(x, params, 8, 2, kv_stride)
    finally:
        torch.backends.cuda.enable_flash_sdp(enabled)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "spatial,kv_stride,layout",
    # One position (its channels-last layout is the contiguous one), then each case in both layouts.
    [((1,), 1, "contiguous")] + [(s, k, layout) for s, k in FEW for layout in ("contiguous", "channels_last")],
)
def test_few_positions_and_keys(device, dtype, spatial, kv_stride, layout):
    x = in_layout(torch.randn((2, 6) + spatial, device=device, dtype=dtype), layout)
    check_against_reference(x, make_params(6, 2, 4, dtype, device), 2, 2, kv_stride)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,shape,layout,num_heads,kv_stride,scale",
    [
        (torch.float64, (1, 8, 2003), "contiguous", 2, 1, 1.0),
        (torch.float64, (1, 8, 2003), "channels_last", 1, 3, 1.0),
        (torch.float64, (2, 8, 45, 45), "contiguous", 2, 2, 1.0),
        (torch.float32, (1, 8, 2003), "strided", 2, 1, 2.0),
        (torch.float32, (1, 8, 45, 45), "channels_last", 1, 1, 2.0),
        (torch.float32, (2, 8, 13, 13, 13), "channels_last", 2, 2, 2.0),
        (torch.bfloat16, (1, 8, 2003), "contiguous", 2, 1, 2.0),
        (torch.float16, (1, 8, 45, 45), "channels_last", 2, 2, 2.0),
    ],
)
def test_many_positions_match_reference(device, dtype, shape, layout, num_heads, kv_stride, scale):
    # P around 2000 (2003 is prime): many blocks of queries and keys, with partial blocks
    # at the end whatever the block size; the softmax runs over up to 2003 keys.
    x = in_layout(torch.randn(shape, device=device).to(dtype), layout)
    check_against_reference(x, make_params(8, 4, 8, dtype, device), 4, num_heads, kv_stride, scale=scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,num_heads", [(torch.float32, 1), (torch.float64, 2)])
def test_deep_stage_shapes_match_reference(dtype, num_heads, layout):
    # Many channels at few positions, as after a ResNet's last stage: the products run over
    # sums deeper than 512 (1040 channels, 1040 value rows) on operands larger than the L2
    # cache, in depth blocks (a first, a middle and a last) with the running sums stored between
    # them and b's panels copied tile by tile, and the samples' tokens are stacked into one
    # matrix (fewer than the weights).
    x = in_layout(torch.randn(8, 1040, 4, 4), layout).to(dtype)
    check_against_reference(x, make_params(1040, 130, 1040, dtype, "cpu"), 130, num_heads, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_values_at_many_keys_match_reference(dtype):
    # 2048 keys of 520 query-key and value columns: more than the CPU backward's first pass
    # transposes once per task (2^20 values), so it transposes them a key block at a time for
    # every block of query rows.
    x = torch.randn(1, 512, 2048).to(dtype)
    check_against_reference(x, make_params(512, 8, 512, dtype, "cpu"), 8, 1, 1)


def test_private_forward_returns_the_saved_tensors():
    x = torch.randn(2, 6, 5, 7)
    params = make_params(6, 4, 6, torch.float32, "cpu")
    y, attn, lse, projection = forward_op(x, *params, 4, 2, 2)
    assert torch.equal(y, op(x, *params, 4, 2, 2))
    assert attn.shape == (2, 35, 6) and attn.dtype == torch.float32
    assert lse.shape == (2, 2, 35) and lse.dtype == torch.float32
    assert projection.shape == (0,), "the projection is returned only when asked for"
    _, _, lse_half, _ = forward_op(x.bfloat16(), *[p.bfloat16() for p in params], 4, 2, 2)
    assert lse_half.dtype == torch.float32, "the log-sum-exp is kept in the accumulation dtype"
    # keep_projection: x W_qkv^T + b_qkv as (N, P, 2 * qk_dim + v_dim) tokens, the same bits as
    # the result computed without it.
    y_kept, _, lse_kept, projection = forward_op(x, *params, 4, 2, 2, True)
    assert torch.equal(y_kept, y) and torch.equal(lse_kept, lse)
    assert projection.shape == (2, 35, 14) and projection.is_contiguous()
    tokens = x.flatten(2).transpose(1, 2).double()
    expected = tokens @ params[0].double().t() + params[1].double()
    torch.testing.assert_close(projection.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,kv_stride",
    [((0, 6, 5, 7), 1), ((0, 6, 5, 7), 2), ((0, 6, 11), 3), ((2, 6, 0, 5), 1), ((2, 6, 0), 1), ((2, 6, 4, 0, 3), 2)],
)
def test_empty_inputs_give_empty_results_and_zero_parameter_gradients(device, shape, kv_stride):
    x = torch.randn(shape, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(6, 2, 4, torch.float32, device)]
    y = op(x, *params, 2, 2, kv_stride)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y.sum(), [x, *params])
    assert grads[0].shape == x.shape
    for name, g, p in zip(NAMES[1:], grads[1:], params):
        assert g.shape == p.shape and torch.count_nonzero(g) == 0, name


@pytest.mark.parametrize("shape,qk_dim,v_dim,num_heads,dtype",
                         [((2, 0, 5), 2, 4, 1, torch.float32), ((2, 0, 2, 2), 6, 3, 3, torch.float64)])
def test_no_channels(shape, qk_dim, v_dim, num_heads, dtype):
    # C = 0: queries, keys and values come from the biases alone, but there is nothing to
    # add them to. The backward takes T's way (no channels to sum), whose kernels form the
    # heads' output gradient from grad_y's empty tokens (storage without an address).
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    rows = 2 * qk_dim + v_dim
    params = [torch.randn(rows, 0), torch.randn(rows), torch.randn(0, v_dim), torch.randn(0), torch.ones(1)]
    params = [p.to(dtype).requires_grad_(True) for p in params]
    y = op(x, *params, qk_dim, num_heads, 1)
    assert y.shape == shape
    grads = torch.autograd.grad(y, [x, *params], torch.empty(shape, dtype=dtype))
    for g, t in zip(grads, [x, *params]):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_zero_gamma_is_the_identity_and_still_learns_gamma(device):
    # SAGAN starts with gamma = 0: the block is the identity, and only gamma gets a gradient.
    x = torch.randn(2, 8, 6, 5, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(8, 2, 8, torch.float32, device, gamma=0.0)]
    y = op(x, *params, 2, 1, 2)
    assert torch.equal(y, x)
    grad = torch.randn_like(y)
    gx, gqkv_w, gqkv_b, gout_w, gout_b, ggamma = torch.autograd.grad(y, [x, *params], grad)
    torch.testing.assert_close(gx, grad, rtol=0, atol=0)
    for g in (gqkv_w, gqkv_b, gout_w, gout_b):
        assert torch.count_nonzero(g) == 0
    x64 = x.detach().double()
    weights = [p.detach().double() for p in params[:4]]
    out = self_attention_reference(x64, *weights, torch.ones(1, dtype=torch.float64), 2, 1, 2) - x64
    assert_close(ggamma, (grad.double() * out).sum().reshape(1), torch.float32, scale=4.0)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_stay_finite(device):
    # The softmax subtracts the running row maximum: logits of about +-1000 would overflow
    # exp otherwise.
    x = torch.randn(2, 6, 9, 7, device=device)
    params = make_params(6, 2, 6, torch.float32, device)
    params[0][:4] *= 20  # queries and keys; head dim 1
    leaves = [p.requires_grad_(True) for p in [x, *params]]
    y = op(*leaves, 2, 2, 1)
    expected = self_attention_reference(*float64_leaves(leaves), 2, 2, 1)
    assert torch.isfinite(y).all()
    # float32 rounds such logits to about 1e-4: the weights agree to that.
    assert_close(y, expected, torch.float32, scale=10.0)
    for g in torch.autograd.grad(y.sum(), leaves):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_propagates(device, layout):
    # A NaN at a position that is a key reaches every query of its sample; the other
    # sample is untouched.
    x = torch.randn(2, 6, 11, device=device)
    x[0, 2, 4] = float("nan")
    x = in_layout(x, layout)
    params = make_params(6, 2, 4, torch.float32, device)
    for kv_stride in (1, 2):
        y = op(x, *params, 2, 1, kv_stride)
        assert torch.isnan(y[0]).all(), kv_stride
        expected = self_attention_reference(x[1:].double(), *[p.double() for p in params], 2, 1, kv_stride)
        assert_close(y[1], expected[0], torch.float32)
    # Position 10 fills no window of stride 2 (ceil_mode=False): a NaN there is no key,
    # only its own query and output are NaN.
    x = torch.randn(2, 6, 11, device=device)
    x[0, 3, 10] = float("nan")
    x = in_layout(x, layout)
    y = op(x, *params, 2, 1, 2)
    assert torch.isnan(y[0, :, 10]).all()
    assert torch.isfinite(y[0, :, :10]).all() and torch.isfinite(y[1]).all()
    expected = self_attention_reference(x.double(), *[p.double() for p in params], 2, 1, 2)
    assert_close(y[..., :10], expected[..., :10], torch.float32)
    # A NaN gamma poisons everything.
    y = op(x[1:], *params[:4], torch.full((1,), float("nan"), device=device), 2, 1, 1)
    assert torch.isnan(y).all()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 16, 7, 9, device=device)
    params = make_params(16, 4, 8, torch.float32, device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = CF.self_attention(x, *params, 4, 2, 2)
        y64 = CF.self_attention(x.double(), *[p.double() for p in params], 4, 2, 2)
    assert y.dtype == dtype
    assert y64.dtype == torch.float64, "autocast leaves float64 alone"
    expected = self_attention_reference(
        x.to(dtype).double(), *[p.to(dtype).double() for p in params], 4, 2, 2, pool_dtype=dtype
    )
    assert_close(y, expected, dtype, scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_module_trains_float32_parameters(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    m = SelfAttention(16, num_heads=2, qk_reduction=4, kv_stride=2, gamma_init=0.5).to(device)
    x = torch.randn(2, 16, 8, 8, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = m(x)
    assert y.dtype == dtype and y.shape == x.shape
    y.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


# ---- determinism and memory ----

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("num_heads,kv_stride", [(1, 1), (2, 2)])
@pytest.mark.parametrize("channels,qk_dim", [(16, 4), (16, 16), (40, 10), (72, 18)])
@pytest.mark.parametrize("size", [40, 20, 16, 6])
def test_results_are_bitwise_identical_across_thread_counts(layout, num_heads, kv_stride, channels, qk_dim, size):
    # P = 1600 positions: several blocks of queries and keys for the threads to share. At most
    # 256 keys (P = 256 and 36, and P = 400 with keys pooled by 2), the backward takes blocks of
    # query rows against all keys, and their key and value gradients are summed over the blocks
    # in waves of one block per thread: one wave at 2 threads at P = 256 with one head, several
    # at P = 400, a block a wave at 1 thread.
    # Channel and head widths that are not multiples of 16 (40, 72; heads of 5 and 9) are
    # where a BLAS changes kernels between thread counts.
    x = in_layout(torch.randn(2, channels, size, size), layout)
    params = make_params(channels, qk_dim, channels, torch.float32, "cpu")
    grad = in_layout(torch.randn(x.shape), layout)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, *params]]
        assert leaves[0].stride() == x.stride()
        y = op(*leaves, qk_dim, num_heads, kv_stride)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deep_stage_results_are_bitwise_identical_across_thread_counts(layout):
    # 1040 channels at 5 x 5: blocked products, whose tasks grow with fewer threads (up to
    # 256 rows by 384 columns while there are 4 tasks a thread), so each thread count splits
    # them differently.
    x = in_layout(torch.randn(2, 1040, 5, 5), layout)
    params = make_params(1040, 130, 1040, torch.float32, "cpu")
    grad = in_layout(torch.randn(x.shape), layout)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, *params]]
        y = op(*leaves, 130, 1, 1)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,spatial,num_heads",
                         [(256, (2, 2), 1), (64, (1, 1), 1), (32, (12, 12), 1), (1040, (5, 5), 2)])
def test_a_sample_gets_the_same_bits_alone_or_in_a_batch(layout, channels, spatial, num_heads):
    """y and grad_x of each sample, bit for bit, whether it comes alone or in a batch of 4. With
    256, 64 or 1040 channels and 4, 1 or 25 positions the batch's tokens are fewer than the
    weights, so the products stack the samples into one matrix (copying a channels-first map's
    tokens, and writing the results back); alone, and with 32 channels at 12 x 12, each sample
    is its own product. At 1040 channels the batch's products are blocked (depth blocks of 512,
    b packed panel by panel) where a sample's alone run in one pass, 25 columns wide (a masked
    last vector); two heads give a sample alone the attention backward's blocks of a batch
    (one block of query rows per head and sample from 2 blocks a call on). Every element is the
    same sum either way."""
    x = in_layout(torch.randn((4, channels) + spatial), layout)
    params = make_params(channels, channels // 8, channels, torch.float32, "cpu")
    grad = in_layout(torch.randn(x.shape), layout)

    def run(first, count):
        leaves = [x[first:first + count].clone().requires_grad_(True), *params]
        y = op(*leaves, channels // 8, num_heads, 1)
        return y.detach(), torch.autograd.grad(y, leaves[0], grad[first:first + count])[0]

    y, grad_x = run(0, 4)
    alone = [run(n, 1) for n in range(4)]
    assert torch.equal(y, torch.cat([a[0] for a in alone]))
    assert torch.equal(grad_x, torch.cat([a[1] for a in alone]))


@pytest.mark.parametrize("channels,spatial,num_heads,kv_stride",
                         [(2048, (4, 4), 1, 1), (256, (7, 7), 2, 1), (96, (5, 5), 1, 1), (64, (6, 6), 1, 2),
                          (32, (12, 12), 1, 1), (32, (16, 16), 2, 2)])
def test_both_layouts_give_the_same_bits(channels, spatial, num_heads, kv_stride):
    """y and every gradient, bit for bit, whether x comes channels first or channels last. With
    few tokens for their channels (the first four cases) a channels-first batch's products take
    the samples side by side as (C, N * P) columns and transpose the (R, N * P) result, where
    channels-last tokens are rows already; with more tokens each sample is its own product,
    reading its tokens in place with either layout's strides. Every element is the same sum."""
    x = torch.randn((4, channels) + spatial)
    params = make_params(channels, channels // 8, channels, torch.float32, "cpu")
    grad = torch.randn(x.shape)

    def run(layout):
        leaves = [in_layout(x.clone(), layout).requires_grad_(True), *[p.clone().requires_grad_(True) for p in params]]
        y = op(*leaves, channels // 8, num_heads, kv_stride)
        return [y.detach().contiguous(), *[g.contiguous() for g in torch.autograd.grad(y, leaves, in_layout(grad, layout))]]

    for first, last in zip(run("contiguous"), run("channels_last")):
        assert torch.equal(first, last)


def _feature_map_copies(x, fn):
    """The copies (ATen copy_/clone/contiguous/_to_copy) `fn` makes of a feature map shaped
    like x (as many elements, as many dims): layout conversions. (A product that adds grad_y
    into grad_x through BLAS's beta = 1 first copies it into the (N * P, C) result: a read of
    grad_y in place, which has two dims.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    copies = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
    return [e.name for e in prof.events() if e.name in copies
            and any(len(s) == x.dim() and torch.Size(s).numel() == x.numel() for s in e.input_shapes)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kv_stride", [1, 2])
def test_feature_maps_are_read_in_place(layout, kv_stride):
    # By design, the projection is one matrix product over positions with no NCHW copies for
    # channels_last input; the backward reads grad_y in place too. C = 12 differs from every
    # other width (qk_dim 2, v_dim 6, 2 * qk_dim + v_dim = 10), so a copy of N * C * P
    # elements could only be a copy of x or grad_y.
    x = in_layout(torch.randn(2, 12, 9, 10), layout)
    params = make_params(12, 2, 6, torch.float32, "cpu")
    grad_y = in_layout(torch.randn(x.shape), layout)
    _, _, lse, _ = forward_op(x, *params, 2, 2, kv_stride)
    assert _feature_map_copies(x, lambda: forward_op(x, *params, 2, 2, kv_stride)) == []
    assert _feature_map_copies(x, lambda: backward_op(grad_y, x, *params, lse, 2, 2, kv_stride)) == []
    # The check sees copies: a strided x is copied once, into the layout the kernels read.
    strided = in_layout(x, "strided")
    assert _feature_map_copies(x, lambda: forward_op(strided, *params, 2, 2, kv_stride)) != []


def _cpu_memory_records(fn) -> List[int]:
    """The byte counts of every CPU allocation (> 0) and free (< 0) while fn() runs, in time
    order. (The "[memory]" entries of prof.events() hold only the records no operator claimed;
    the raw records are in the Kineto results.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    return [e.nbytes() for e in sorted(records, key=lambda e: e.start_ns())]


def _peak_cpu_bytes(fn) -> int:
    """Peak of the CPU memory allocated while fn() runs, above what was allocated before."""
    return max(itertools.accumulate(_cpu_memory_records(fn), initial=0))


def _peak_cpu_bytes_on_threads(fn, threads: int = 2) -> int:
    """_peak_cpu_bytes at `threads` intra-op threads: the backward runs waves of partial sums, up
    to one per thread, where they do not fit the memory of grad_x."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _peak_cpu_bytes(fn)
    finally:
        torch.set_num_threads(before)


def _held_cpu_bytes(fn) -> int:
    """The CPU memory fn() allocated and did not free."""
    return sum(_cpu_memory_records(fn))


def _memory_case(device):
    m = SelfAttention(64).to(device)  # qk_dim = 8, v_dim = 64
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = torch.randn(1, 64, 64, 64, device=device, requires_grad=True)  # P = 4096
    matrix = 4096 * 4096 * 4  # one P x P float32 matrix: 64 MiB

    def ours():
        m(x).sum().backward()

    def eager():
        # The composition a user would write: bmm, softmax, bmm, materialising P x P.
        params = [x, m.qkv_weight, m.qkv_bias, m.out_weight, m.out_bias, m.gamma]
        self_attention_reference(*params, m.qk_dim, m.num_heads, m.kv_stride).sum().backward()

    return ours, eager, matrix


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_keeps_only_the_softmax_statistics(layout):
    """What the forward leaves allocated for the backward beyond y where x has many tokens for its
    channels (2 N P = 480 > C = 64): lse, one float per position and head (the backward
    recomputes the projection and the heads)."""
    m = SelfAttention(64, num_heads=2)
    x = in_layout(torch.randn(2, 64, 12, 10), layout).requires_grad_(True)
    outputs = []
    held = _held_cpu_bytes(lambda: outputs.append(m(x)))
    lse_bytes = 2 * 2 * 12 * 10 * 4
    assert held == outputs[0].nbytes + lse_bytes


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch,size", [(1, 16), (1, 64), (4, 32)])
def test_forward_peak_is_the_projection_and_the_heads(layout, batch, size):
    """The forward's peak, counted in values: the projection (P R) and the heads (P v) with lse
    (P), before the projection is freed and y written. y's product from the heads of a
    channels-first map takes the transposed form, whose out^T is formed a tile at a time in each
    task's own buffer; it packed the heads' transpose instead (P v more: 1.34x |Q| + |K| + |V| +
    |out| at one sample, where now 1.01x)."""
    channels, qk_dim, positions = 64, 8, batch * size * size
    m = SelfAttention(channels)
    x = in_layout(torch.randn(batch, channels, size, size), layout).requires_grad_(True)
    counted = positions * (2 * qk_dim + channels) + positions * channels + positions
    peak = _peak_cpu_bytes_on_threads(lambda: m(x))
    assert peak <= 1.01 * counted * 4, f"peak {peak / 4 / counted:.3f}x the counted values"


SELF_ATTENTION = BY_NAME["self_attention"]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,kv_stride", [((2, 16, 2, 2), 1), ((2, 64, 3, 3), 3), ((3, 64, 5), 2)])
def test_few_tokens_keep_the_projection_for_the_backward(layout, shape, kv_stride):
    """Where x has few tokens for its channels, 2 N P <= C (a deep stage; 2 N P = C in the first
    case), the forward also leaves the projection (N, P, 2 * qk_dim + v_dim) allocated for the
    backward, which reads it instead of computing it again; under no_grad, or where nothing
    requires a gradient, it leaves only y."""
    channels, n, p = shape[1], shape[0], math.prod(shape[2:])
    m = SelfAttention(channels, num_heads=2, kv_stride=kv_stride)  # qk_dim = C / 8, v_dim = C
    x = in_layout(torch.randn(shape), layout)
    lse_bytes = n * 2 * p * 4
    projection_bytes = n * p * (2 * m.qk_dim + channels) * 4

    def held_beyond_y():
        outputs = []
        held = _held_cpu_bytes(lambda: outputs.append(m(x)))
        return held - outputs[0].nbytes

    assert held_beyond_y() == lse_bytes + projection_bytes
    with torch.no_grad():
        assert held_beyond_y() == 0
    m.requires_grad_(False)
    assert held_beyond_y() == 0
    x.requires_grad_(True)
    assert held_beyond_y() == lse_bytes + projection_bytes


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spatial", [(4, 5), (12, 12), (15, 20)], ids=str)
def test_the_backward_reads_the_kept_projection(spatial, dtype, kv_stride, layout):
    """Given the forward's projection, the backward gives the bits it gives computing it again
    (at any shape: the private operator takes a projection wherever it is passed one), and it
    does read it: another projection gives other gradients. Computing it again, the CPU backward
    writes the projection's gradient over it (kv_stride 1; the heads' way, as with these widths,
    v = 6 next to C = 12): where a (sample, head) is one task of the attention's backward (20
    positions), that task reads its q, k and v before it writes their gradients; with two
    blocks of queries (144) or keys past one block (300) the kernel copies them first. The kept
    projection is autograd's saved tensor and is never written."""
    x = in_layout(torch.randn((2, 12) + spatial, dtype=dtype), layout)
    params = make_params(12, 2, 6, dtype, "cpu")
    grad = in_layout(torch.randn(x.shape, dtype=dtype), layout)
    _, _, lse, projection = forward_op(x, *params, 2, 2, kv_stride, True)
    saved = projection.clone()
    kept = backward_op(grad, x, *params, lse, 2, 2, kv_stride, projection)
    assert torch.equal(projection, saved)
    recomputed = backward_op(grad, x, *params, lse, 2, 2, kv_stride)
    for a, b in zip(kept, recomputed):
        assert torch.equal(a, b)
    other = backward_op(grad, x, *params, lse, 2, 2, kv_stride, 1.5 * projection)
    assert not torch.equal(other[0], kept[0]) and not torch.equal(other[1], kept[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "channels,qk_dim,spatial",
    [(64, 8, (33, 31)), (65, 8, (20, 21)), (16, 2, (9, 10)), (32, 2, (80,)), (24, 3, (4, 5, 6))],
    ids=str,
)
def test_one_sample_with_values_in_grad_x(channels, qk_dim, spatial, dtype, layout):
    """One sample whose values are as wide as its tokens (v = C) and more positions than
    channels (T's way; odd P, odd C, 1-D and 3-D maps): recomputing the projection, the backward
    writes the values, and then their gradient, into grad_x's memory, keeps q's and k's columns
    apart, and writes grad_x over the value gradient in tiles of tokens (channels first:
    token-major, then transposed in place, grad_y added as it goes): it holds less than given
    the forward's projection, whose gradient is a tensor of its own. Both give the same bits (the
    products are split by rows or columns of their results, never within a sum, and the kernels
    are lent the same workspace), and those match the float64 reference."""
    x = in_layout(torch.randn((1, channels) + spatial, dtype=dtype), layout)
    params = make_params(channels, qk_dim, channels, dtype, "cpu")
    grad = in_layout(torch.randn(x.shape, dtype=dtype), layout)
    _, _, lse, projection = forward_op(x, *params, qk_dim, 1, 1, True)
    kept, recomputed = [], []
    kept_peak = _peak_cpu_bytes_on_threads(
        lambda: kept.extend(backward_op(grad, x, *params, lse, qk_dim, 1, 1, projection)))
    recomputed_peak = _peak_cpu_bytes_on_threads(
        lambda: recomputed.extend(backward_op(grad, x, *params, lse, qk_dim, 1, 1)))
    assert recomputed_peak < kept_peak
    assert recomputed[0].stride() == kept[0].stride()
    for name, a, b in zip(NAMES, kept, recomputed):
        assert torch.equal(a, b), name
    check_against_reference(x, params, qk_dim, 1, 1)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_sample_with_values_in_grad_x_across_thread_counts(layout):
    """The one-sample backward that keeps its values in grad_x's memory (1023 positions: several
    groups of query blocks and of key blocks, and of tiles of tokens) gives the same bits for 1
    to 4 intra-op threads: its workspace, which sets G's groups, depends on the shape alone."""
    m = SelfAttention(64, gamma_init=0.5)
    x = in_layout(torch.randn(1, 64, 33, 31), layout)
    grad = in_layout(torch.randn(x.shape), layout)

    def run():
        leaf = x.clone().requires_grad_(True)
        y = m(leaf)
        return [y.detach(), *torch.autograd.grad(y, [leaf, *m.parameters()], grad)]

    assert_bitwise_identical_across_thread_counts(run)


@pytest.mark.parametrize("spatial", [(1, 1), (2, 2)])
def test_few_tokens_backward_leaves_grad_y_as_it_was(spatial):
    """With few tokens, the backward of a channels-first map adds grad_x's sum into its own
    token-major copy of grad_y, never into grad_y (whose tokens at 1 x 1 already are
    token-major)."""
    m = SelfAttention(64, gamma_init=0.5)  # gamma = 0 would make the sum added zero
    x = torch.randn((4, 64) + spatial, requires_grad=True)
    grad = torch.randn(x.shape)
    before = grad.clone()
    m(x).backward(grad)
    assert torch.equal(grad, before)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", SELF_ATTENTION.variants, ids=lambda v: v["id"])
def test_few_tokens_match_reference(variant, dtype, layout):
    """Every variant of the operator table (heads, pooled keys and values, biases or none) where
    the forward keeps the projection for the backward: 2 N P = 36 <= C = 64."""
    generator = torch.Generator().manual_seed(len(variant["id"]))
    operators.check_against_reference(SELF_ATTENTION.sample((2, 64, 3, 3), variant, dtype, "cpu", layout, generator))


@pytest.mark.parametrize("variant", [v for v in SELF_ATTENTION.variants if v["kv_stride"] <= 2], ids=lambda v: v["id"])
def test_few_tokens_gradcheck(variant):
    # 2 N P = C = 16: the boundary of the kept projection.
    sample = SELF_ATTENTION.sample((2, 16, 2, 2), variant, torch.float64, "cpu", "contiguous", torch.Generator().manual_seed(5))
    leaves = sample.leaves()
    names = [name for name in SELF_ATTENTION.differentiable if leaves[name] is not None]

    def call(*tensors):
        return sample.output(sample.call({**leaves, **dict(zip(names, tensors))}))

    assert torch.autograd.gradcheck(call, [leaves[name] for name in names])


@pytest.mark.slow
def test_torch_compile_of_few_and_many_tokens_gives_the_eager_results():
    """torch.compile (fullgraph, dynamic shapes) of the module where the forward keeps the
    projection (2 N P = 36 <= 64) and, with the same compiled module, where it does not
    (2 N P = 288): the same ops run, so the same bits as eager."""
    m = SelfAttention(64, num_heads=2, gamma_init=0.5)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for shape in [(2, 64, 3, 3), (4, 64, 6, 6)]:
        x = torch.randn(shape)
        grad = torch.randn(shape)
        results = []
        for module in (m, compiled):
            leaf = x.clone().requires_grad_(True)
            y = module(leaf)
            results.append([y.detach(), *torch.autograd.grad(y, [leaf, *m.parameters()], grad)])
        for eager, got in zip(*results):
            assert torch.equal(eager, got)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch,size", [(4, 8), (4, 16), (4, 32), (4, 64), (2, 16), (2, 32), (2, 64), (1, 16), (1, 32), (1, 64)])
def test_forward_backward_peak_is_at_most_one_and_a_half_inputs(layout, batch, size):
    """Forward+backward of the default module on (N, 64, S, S), P >= 64, at 2 threads: the
    backward recomputes the projection a sample at a time (also where a sample has fewer than
    1024 positions: 2.97x at P = 256 when a chunk took 1024 positions), so its peak is at most
    1.5x |Q| + |K| + |V| + |out| (1.80x and 1.95x when the heads were saved and every group of
    query blocks had a buffer of partial key gradients). Counted: y and grad_x for the batch (64
    + 64 values per position), one sample's temporaries, the weight gradients summed so far.
    Where P > C (T = p^T grad_y gives the output projection's and the values' gradients), a
    sample's temporaries are its recomputed projection, which its gradient overwrites (80 values
    per position), and nothing else as large as its tokens outside its part of grad_x; where the
    sample is the batch, its values live in grad_x's memory and the projection's q and k columns
    apart (64 values per position with the kernels' partial sums; see
    test_one_sample_backward_holds_its_queries_and_keys_and_little_more): one sample of 4096
    positions is 1.35x, of 1024 1.37x, of 256 1.45x (1.47x, 1.51x and 1.71x with the projection
    whole; 1.60x at 256 while q's and k's columns and the kernels' partial sums stayed until
    grad_x was written; 2.57x while the heads' gradient, T and the projection's gradient were
    tensors of their own; 1.67x while q's and k's gradients and the partial key gradients
    were). At P = 64 (see
    test_small_map_backward_holds_one_sample_of_temporaries) the heads are recomputed, the
    projection's gradient is written over the projection, and each sample's parts of the
    weights' gradients are added into their sums as they are formed."""
    m = SelfAttention(64)  # qk_dim = 8, v_dim = 64
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = in_layout(torch.randn(batch, 64, size, size), layout).requires_grad_(True)
    grad = in_layout(torch.randn(x.shape), layout)
    qkv_out = batch * size * size * (8 + 8 + 64 + 64) * 4  # bytes

    def forward_backward():
        m(x).backward(grad)

    peak = _peak_cpu_bytes_on_threads(forward_backward)
    assert peak <= 1.5 * qkv_out, f"peak {peak / qkv_out:.2f}x |Q| + |K| + |V| + |out|"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_small_map_backward_holds_one_sample_of_temporaries(layout):
    """(4, 64, 8, 8), 64 positions: the weights' gradients are 0.25x |Q| + |K| + |V| + |out|
    and y and grad_x 0.89x, which leaves 1.5x little room for a sample's temporaries. What the
    peak may hold, counted in values: y and grad_x (2 N P C), lse (N P) and grad_y's channel
    sums (C), the weight-sized sums (G, C v, and the projection's weight and bias gradients,
    R C + R), one sample's recomputed projection, whose gradient the attention's backward
    writes over it (P R), and one more temporary of P v = P C values: the heads' output
    gradient, or the sample's tokens packed for its projection, whose transposed form (out^T
    formed a tile at a time, no copy) now copies fewer values than packing the weight's
    transpose (R C, which the peak held while out^T counted as a copy). 1.54x when the
    projection's gradient was a tensor of its own and each sample's part of a weight gradient
    was formed apart and then added; a sample's queries are one block (split in two for two
    threads, they added a partial sum of the key and value gradients, 1.66x)."""
    batch, channels, size, qk_dim = 4, 64, 8, 8
    positions, rows = size * size, 2 * qk_dim + channels
    m = SelfAttention(channels)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = in_layout(torch.randn(batch, channels, size, size), layout).requires_grad_(True)
    grad = in_layout(torch.randn(x.shape), layout)
    counted = (2 * batch * positions * channels + batch * positions + channels
               + channels * channels + rows * channels + rows
               + positions * rows + positions * channels)
    peak = _peak_cpu_bytes_on_threads(lambda: m(x).backward(grad))
    assert peak <= 1.01 * counted * 4, f"peak {peak / 4 / counted:.3f}x the counted values"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [16, 32, 64])
def test_one_sample_backward_holds_its_queries_and_keys_and_little_more(layout, size):
    """One sample, (1, 64, S, S), P > C: the batch is one chunk, so the backward's temporaries
    are the whole call's. What the peak may hold, counted in values: y and grad_x (2 P C), lse
    (P) and grad_y's channel sums (C), G (C v), and the most of what the backward's steps hold
    beside them. While its kernels run: q's and k's gradients, the recomputed q's and k's
    columns (4 qk P) and the kernels' partial sums (max(4 qk P, 2 C v): four partial key
    gradients or two of G's). Once they have run, the columns and partial sums gone: q's and
    k's gradients (2 qk P), the projection's weight and bias gradients with the bias gradient's
    two parts (R C + 2 R), and a tile of a quarter of the projection's gradient (R P / 4),
    copied out before grad_x is written over the value gradient; channels first, then the
    in-place transposition's scratch (about half the map) in place of q's and k's gradients and
    the tile. Nothing else: the values, then their gradient, live in grad_x's memory; the heads'
    output gradient is formed a block of queries at a time inside the kernel that gives q's and
    k's gradients; T = p^T grad_y is formed a block of keys at a time, each block giving its
    part of G and its value gradient, written over v; and the weight gradient's product over one
    sample's positions has no partial sums. 1.35x |Q| + |K| + |V| + |out| at P = 4096, 1.37x at
    P = 1024, 1.45x at P = 256 (y and grad_x alone are 0.89x); 1.36x, 1.40x and 1.60x while the
    columns and partial sums stayed until grad_x was written (a side tensor that held all of
    it); with the whole projection (P R) held instead it was 1.47x at P = 4096 and 1.51x at
    P = 1024, 1.67x with q's and k's gradients and two partial key gradients (2 P qk each) as
    tensors of their own, 2.57x with the heads' gradient, T or the projection's gradient (64 or
    80 values per position) as well."""
    channels, qk_dim, positions = 64, 8, size * size
    rows = 2 * qk_dim + channels
    m = SelfAttention(channels)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = in_layout(torch.randn(1, channels, size, size), layout).requires_grad_(True)
    grad = in_layout(torch.randn(x.shape), layout)
    kernels = 4 * qk_dim * positions + max(4 * qk_dim * positions, 2 * channels * channels)
    weights = rows * channels + 2 * rows
    tiles = 2 * qk_dim * positions + weights + rows * -(-positions // 4)
    transposition = weights + (positions + 1) // 2 * channels
    counted = (2 * positions * channels + positions + channels + channels * channels
               + max(kernels, tiles, transposition))
    peak = _peak_cpu_bytes_on_threads(lambda: m(x).backward(grad))
    assert peak <= 1.01 * counted * 4, f"peak {peak / 4 / counted:.3f}x the counted values"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_one_sample_backward_holds_as_much_with_more_threads(layout):
    """One sample of 1024 positions at 2 and at 8 intra-op threads: the backward's partial sums
    (the key gradients of a wave of query groups, G's per group of key blocks) live in a
    workspace whose size the shape sets (four partial key gradients or two of G's: as many as
    fit run side by side), and one sample's weight gradient is one product with no partials, so
    the peak does not grow with the threads (2.01x at 8 threads against 1.67x at 2 when each
    thread of a wave had a partial key gradient of its own and each chunk of 1024 positions a
    weight-sized partial)."""
    m = SelfAttention(64)
    with torch.no_grad():
        m.gamma.fill_(0.5)
    x = in_layout(torch.randn(1, 64, 32, 32), layout).requires_grad_(True)
    grad = in_layout(torch.randn(x.shape), layout)
    peaks = [_peak_cpu_bytes_on_threads(lambda: m(x).backward(grad), threads) for threads in (2, 8)]
    assert peaks[1] <= peaks[0], f"peak at 8 threads {peaks[1] / peaks[0]:.3f}x the peak at 2"


def test_deep_stage_backward_holds_little_beyond_the_weight_gradients():
    """A non-local block at ResNet-50's last stage, (8, 2048, 4, 4): 128 tokens against 9.4 M
    weights, so the weights' gradients (36 MiB) are most of what forward+backward must hold.
    The weight-gradient sums stack the samples' rows into one product and the batch is one
    chunk, so the peak stays within 1.6x the weights (1.54x measured: the two gradients,
    grad_out's product with the heads, 16 MiB, and the projection the forward kept, 1.25 MiB);
    it was 3.2x with a weight-sized partial per sample and a chunk of two samples, 5.6x with a
    chunk of the whole batch."""
    m = SelfAttention(2048)
    x = torch.randn(8, 2048, 4, 4, requires_grad=True)
    grad = torch.randn(x.shape)
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    peak = _peak_cpu_bytes(lambda: m(x).backward(grad))
    assert peak <= 1.6 * weight_bytes, f"peak {peak / weight_bytes:.2f}x the weights"


@pytest.mark.slow
def test_memory_is_linear_in_positions():
    ours, eager, matrix = _memory_case("cpu")
    # The measurement sees the P x P matrix of the eager composition...
    assert _peak_cpu_bytes(eager) >= matrix
    # ... and the operator never builds one, forward or backward.
    peak = _peak_cpu_bytes(ours)
    assert peak < matrix / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_cuda_memory_is_linear_in_positions():
    ours, eager, matrix = _memory_case("cuda")

    def peak_cuda_bytes(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    ours()  # warm up (cuBLAS workspaces)
    assert peak_cuda_bytes(eager) >= matrix
    peak = peak_cuda_bytes(ours)
    assert peak < matrix / 4, f"peak {peak / 2**20:.1f} MiB"


# ---- bad input: every message names the operator, the argument and what was expected ----

def _good(device="cpu"):
    # C = 8, qk_dim = 4, v_dim = 8 (qkv_weight has 16 rows), S = (4, 5).
    return [torch.randn(2, 8, 4, 5, device=device), *make_params(8, 4, 8, torch.float32, device)]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_backward_arguments_are_rejected(device):
    x, *params = [a.to(device) for a in _good()]
    _, _, lse, projection = forward_op(x, *params, 4, 2, 1, True)
    with pytest.raises(RuntimeError, match=r"self_attention: projection must be \(N, P, 2 \* qk_dim \+ v_dim\) = \(2, 20, 16\), got \(2, 20, 15\)"):
        backward_op(x, x, *params, lse, 4, 2, 1, projection[..., 1:])
    with pytest.raises(RuntimeError, match=r"self_attention: projection must have the dtype of x \(Float\), got Double"):
        backward_op(x, x, *params, lse, 4, 2, 1, projection.double())
    with pytest.raises(RuntimeError, match=r"self_attention: grad_y must be the size of x = \(2, 8, 4, 5\), got \(2, 8, 4\)"):
        backward_op(x[..., 0], x, *params, lse, 4, 2, 1)
    with pytest.raises(RuntimeError, match=r"self_attention: grad_y must have the dtype of x \(Float\), got Double"):
        backward_op(x.double(), x, *params, lse, 4, 2, 1)
    with pytest.raises(RuntimeError, match=r"self_attention: lse must be \(N, num_heads, P\) = \(2, 2, 20\), got \(2, 1, 20\)"):
        backward_op(x, x, *params, lse[:, :1], 4, 2, 1)
    with pytest.raises(RuntimeError, match=r"self_attention: lse must be Float on .*, got Double"):
        backward_op(x, x, *params, lse.double(), 4, 2, 1)
    with pytest.raises(RuntimeError, match=r"self_attention: num_heads must divide"):
        backward_op(x, x, *params, lse, 4, 3, 1)
    # A huge (expanded) x with a mismatched saved lse: the sizes are compared without
    # allocating what x would need (4 TiB).
    huge = x[:1, :, :1, :1].expand(1, 8, 2**20, 2**20)
    with pytest.raises(RuntimeError, match=r"self_attention: lse must be \(N, num_heads, P\) = \(1, 2, 1099511627776\)"):
        backward_op(huge, huge, *params, lse, 4, 2, 1)


def test_double_backward_is_refused():
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(6, 2, 4, torch.float64, "cpu")]
    y = op(x, *params, 2, 1, 1)
    (gx,) = torch.autograd.grad(y.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="self_attention: double backward is not supported"):
        gx.sum().backward()


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    x, *params = _good()
    with pytest.raises(RuntimeError, match=r"self_attention: qkv_weight must be on the device of x \(cpu\), got cuda:0"):
        op(x, params[0].cuda(), *params[1:], 4, 2, 1)
    with pytest.raises(RuntimeError, match=r"self_attention: gamma must be on the device of x \(cuda:0\), got cpu"):
        op(x.cuda(), *[p.cuda() for p in params[:4]], params[4], 4, 2, 1)


# ---- the SelfAttention module ----

def _functional(m: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    return CF.self_attention(x, m.qkv_weight, m.qkv_bias, m.out_weight, m.out_bias, m.gamma,
                             m.qk_dim, m.num_heads, m.kv_stride)


@pytest.mark.parametrize(
    "options,qk_dim,v_dim",
    [
        (dict(channels=64), 8, 64),
        (dict(channels=64, num_heads=4, qk_reduction=4, v_reduction=2), 16, 32),
        (dict(channels=16, num_heads=2, qk_reduction=4, kv_stride=2, gamma_init=0.5), 4, 16),
        (dict(channels=8), 1, 8),
        # qk_dim and v_dim are at least num_heads.
        (dict(channels=8, num_heads=4, v_reduction=4), 4, 4),
    ],
)
def test_module_parameters_and_attributes(options, qk_dim, v_dim):
    m = SelfAttention(**options)
    channels = options["channels"]
    assert m.channels == channels and m.qk_dim == qk_dim and m.v_dim == v_dim
    assert m.num_heads == options.get("num_heads", 1) and m.kv_stride == options.get("kv_stride", 1)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "qkv_weight": (2 * qk_dim + v_dim, channels),
        "qkv_bias": (2 * qk_dim + v_dim,),
        "out_weight": (channels, v_dim),
        "out_bias": (channels,),
        "gamma": (1,),
    }
    assert m.gamma.item() == options.get("gamma_init", 0.0)
    assert f"SelfAttention({channels}, num_heads={m.num_heads}, qk_dim={qk_dim}, v_dim={v_dim}" in repr(m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 16, 13), (2, 16, 7, 9), (1, 16, 3, 4, 5)])
def test_module_is_its_functional_call_and_matches_reference(device, shape):
    m = SelfAttention(16, num_heads=2, qk_reduction=4, v_reduction=2, kv_stride=2, gamma_init=0.5).to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = m(x)
    expected = _functional(m, x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    params = [x, *m.parameters()]
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = self_attention_reference(x.detach().double(), *[p.detach().double() for p in m.parameters()],
                                   m.qk_dim, m.num_heads, m.kv_stride)
    assert_close(y, ref, torch.float32)


def test_module_starts_as_the_identity():
    m = SelfAttention(16)
    x = torch.randn(2, 16, 6, 6)
    assert torch.equal(m(x), x)
    m.gamma.data.fill_(1.0)
    assert not torch.equal(m(x), x)


BAD_OPTIONS = [
    (dict(channels=0), r"SelfAttention: channels must be an integer >= 1, got 0"),
    (dict(channels=16, num_heads=0), r"SelfAttention: num_heads must be an integer >= 1, got 0"),
    (dict(channels=16, qk_reduction=0), r"SelfAttention: qk_reduction must be an integer >= 1, got 0"),
    (dict(channels=16, v_reduction=-1), r"SelfAttention: v_reduction must be an integer >= 1, got -1"),
    (dict(channels=16, kv_stride=0), r"SelfAttention: kv_stride must be an integer >= 1, got 0"),
    # Integer options take integers only: not floats (even integral ones), not bools.
    (dict(channels=8, qk_reduction=2.0), r"SelfAttention: qk_reduction must be an integer >= 1, got 2.0"),
    (dict(channels=6, v_reduction=float("inf")), r"SelfAttention: v_reduction must be an integer >= 1, got inf"),
    (dict(channels=16.0), r"SelfAttention: channels must be an integer >= 1, got 16.0"),
    (dict(channels=16, num_heads=True), r"SelfAttention: num_heads must be an integer >= 1, got True"),
    (dict(channels=16, kv_stride=float("nan")), r"SelfAttention: kv_stride must be an integer >= 1, got nan"),
    # qk_dim = max(16 // 8, 3) = 3, v_dim = 16.
    (dict(channels=16, num_heads=3), r"SelfAttention: num_heads = 3 must divide qk_dim = 3 \(channels // qk_reduction\) "
                                     r"and v_dim = 16 \(channels // v_reduction\)"),
    (dict(channels=16, gamma_init=float("nan")), r"SelfAttention: gamma_init must be finite and representable in float32, got nan"),
    # gamma is a float32 parameter.
    (dict(channels=8, gamma_init=1e300), r"SelfAttention: gamma_init must be finite and representable in float32, got 1e\+300"),
    (dict(channels=8, gamma_init=-1e39), r"SelfAttention: gamma_init must be finite and representable in float32, got -1e\+39"),
    (dict(channels=8, gamma_init="0"), r"SelfAttention: gamma_init must be finite and representable in float32, got '0'"),
    (dict(channels=8, gamma_init=None), r"SelfAttention: gamma_init must be finite and representable in float32, got None"),
]


@pytest.mark.parametrize("options,message", BAD_OPTIONS, ids=[str(i) for i in range(len(BAD_OPTIONS))])
def test_module_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        SelfAttention(**options)


def test_module_takes_integer_scalars_and_real_gamma_init():
    m = SelfAttention(torch.tensor(8), num_heads=torch.tensor(2), qk_reduction=torch.tensor(2), gamma_init=1)
    assert (m.channels, m.num_heads, m.qk_dim) == (8, 2, 4) and type(m.qk_dim) is int
    assert m.gamma.item() == 1.0 and type(m.gamma_init) is float
    assert SelfAttention(8, gamma_init=3e38).gamma.item() == pytest.approx(3e38)


@pytest.mark.parametrize("x", [None, [1.0], 2.0], ids=["None", "list", "float"])
def test_module_non_tensor_input_raises_type_error(x):
    m = SelfAttention(4)
    with pytest.raises(TypeError, match=rf"^SelfAttention: x must be a Tensor, got {type(x).__name__}$"):
        m(x)
    torch.jit.script(m)  # the check is not compiled


# ---- runtimes ----

def _module_and_input():
    m = SelfAttention(16, num_heads=2, qk_reduction=4, kv_stride=2, gamma_init=0.5).eval()
    return m, torch.randn(2, 16, 9, 11)


def test_scripted_functional_api():
    fn = torch.jit.script(CF.self_attention)
    x = torch.randn(2, 6, 5, 7)
    params = make_params(6, 4, 6, torch.float32, "cpu")
    assert torch.equal(fn(x, *params, 4, 2, 2), CF.self_attention(x, *params, 4, 2, 2))
    no_bias = [params[0], None, params[2], None, params[4]]
    assert torch.equal(fn(x, *no_bias, 4, 1, 1), CF.self_attention(x, *no_bias, 4))


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_and_backward():
    m, x = _module_and_input()
    compiled = torch.compile(m, fullgraph=True)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    out1 = compiled(x1)
    out2 = m(x2)
    torch.testing.assert_close(out1, out2, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out1)
    out1.backward(grad)
    compiled_grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for a, p in zip(compiled_grads, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_matches_cpu(dtype):
    m, x = _module_and_input()
    x = x.requires_grad_(True)
    expected = m(x)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *m.parameters()], grad)
    mc = SelfAttention(16, num_heads=2, qk_reduction=4, kv_stride=2, gamma_init=0.5).cuda()
    mc.load_state_dict(m.state_dict())
    xc = x.detach().cuda().to(dtype).requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = mc(xc)
    grads = torch.autograd.grad(y, [xc, *mc.parameters()], grad.cuda().to(y.dtype))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.float().cpu(), expected, **tol)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a.float().cpu(), b, **{k: 4 * v for k, v in tol.items()})
