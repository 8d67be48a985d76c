"""channel_pool's own cases: ties, empty inputs, autocast, determinism. The operator against
the float64 reference over channels x dtype x layout x rank, the bad calls, gradcheck and
opcheck are in test_operators.py, from the operator table."""

import pytest
import torch
from helpers import (
    DEVICES,
    assert_bitwise_identical_across_thread_counts,
    assert_close,
    channel_pool_reference,
    in_layout,
)

op = torch.ops.cnn_attention.channel_pool


@pytest.mark.parametrize("device", DEVICES)
def test_ties_send_max_gradient_to_first_channel(device):
    x = torch.zeros(1, 4, 3, device=device, dtype=torch.float64, requires_grad=True)
    y = op(x)
    grad = torch.zeros_like(y)
    grad[:, 1] = 1.0  # gradient of the max only
    (gx,) = torch.autograd.grad(y, [x], grad)
    expected = torch.zeros_like(gx)
    expected[:, 0] = 1.0
    torch.testing.assert_close(gx, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_empty_inputs(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = op(x)
    assert y.shape == (shape[0], 2) + shape[2:]
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert gx.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    x = torch.randn(2, 16, 8, 8, device=device)
    with torch.autocast(device_type=device, dtype=dtype):
        y = op(x)
    assert y.dtype == dtype
    assert_close(y, channel_pool_reference(x.to(dtype).double()), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_are_bitwise_identical_across_thread_counts(layout):
    x = in_layout(torch.randn(3, 37, 29, 31), layout)
    grad = torch.randn(3, 2, 29, 31)

    def run():
        leaf = x.detach().clone().requires_grad_(True)
        y = op(leaf)
        return [y.detach(), torch.autograd.grad(y, [leaf], grad)[0]]

    assert_bitwise_identical_across_thread_counts(run)
