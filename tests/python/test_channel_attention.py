"""channel_attention's own cases: vector lanes and block tails, identities, empty inputs, ties,
poisoned outputs, precision, the module, autocast, bad backward arguments, determinism. Every
variant against the float64 reference over dtype x layout x rank, the bad calls, gradcheck and
opcheck are in test_operators.py, from the operator table."""

from pathlib import Path

import pytest
import torch
from helpers import (
    DEVICES,
    assert_bitwise_identical_across_thread_counts,
    DTYPES,
    LAYOUTS,
    assert_close,
    channel_attention_reference,
    in_layout,
)
from operators import BY_NAME, Sample, check_against_reference

import cnn_attention

op = torch.ops.cnn_attention.channel_attention

def make_params(channels, hidden, dtype, device, bias=True):
    w1 = torch.randn(hidden, channels, dtype=dtype, device=device) / channels**0.5
    w2 = torch.randn(channels, hidden, dtype=dtype, device=device) / hidden**0.5
    b1 = torch.randn(hidden, dtype=dtype, device=device) * 0.1 if bias else None
    b2 = torch.randn(channels, dtype=dtype, device=device) * 0.1 if bias else None
    return w1, b1, w2, b2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [40, 70, 130])
@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_channels_last_vector_lanes_and_block_tails(device, dtype, channels, pool):
    # Channels-last kernels vectorize over channels in blocks: these counts give full
    # vectors, partial blocks and scalar tails for every dtype's vector width.
    x = in_layout(torch.randn(2, channels, 5, 3, device=device).to(dtype), "channels_last")
    w1, b1, w2, b2 = make_params(channels, 8, dtype, device)
    tensors = {"x": x, "fc1_weight": w1, "fc1_bias": b1, "fc2_weight": w2, "fc2_bias": b2}
    options = {"pool": pool, "gate": "sigmoid", "activation": "relu"}
    check_against_reference(Sample(BY_NAME["channel_attention"], tensors, options))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 4, 8, 9, 16, 17, 24, 33])
@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_mlp_products_of_every_width(dtype, batch, pool):
    # The MLP's products are as wide as the samples times the pooled branches: widths below
    # one vector, between vectors and past whole tiles, whose last columns the CPU product
    # reads from rows padded to whole vectors.
    x = torch.randn(batch, 96, 3, 2).to(dtype)
    w1, b1, w2, b2 = make_params(96, 40, dtype, "cpu")
    tensors = {"x": x, "fc1_weight": w1, "fc1_bias": b1, "fc2_weight": w2, "fc2_bias": b2}
    options = {"pool": pool, "gate": "sigmoid", "activation": "relu"}
    check_against_reference(Sample(BY_NAME["channel_attention"], tensors, options))


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_gate_of_uniform_logits_is_identity(device):
    # Zero weights and biases give equal logits: C * softmax = 1 for every channel.
    x = torch.randn(2, 7, 4, 4, device=device)
    w1, w2 = torch.zeros(3, 7, device=device), torch.zeros(7, 3, device=device)
    y = op(x, w1, torch.zeros(3, device=device), w2, torch.zeros(7, device=device), "avg", "softmax")
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 4, 0, 5), (2, 4, 0)])
def test_empty_inputs_give_empty_results_and_zero_parameter_gradients(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(4, 2, torch.float32, device)]
    y = op(x, *params, "avgmax", "sigmoid")
    assert y.shape == x.shape
    grads = torch.autograd.grad(y.sum(), [x, *params])
    assert grads[0].shape == x.shape
    for g, p in zip(grads[1:], params):
        assert g.shape == p.shape and torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels", [2, 20])
def test_ties_send_max_gradient_to_first_position(device, layout, channels):
    # Every position holds the same value: the whole max gradient lands on position 0.
    x = in_layout(torch.ones(1, channels, 3, 3, device=device, dtype=torch.float64), layout).requires_grad_(True)
    w1, b1, w2, b2 = make_params(channels, 2, torch.float64, device)
    y = op(x, w1, b1, w2, b2, "max", "sigmoid")
    (gx,) = torch.autograd.grad(y.sum(), [x])
    x2 = x.detach().clone().requires_grad_(True)
    y2 = channel_attention_reference(x2, w1, b1, w2, b2, "max", "sigmoid")
    (gx2,) = torch.autograd.grad(y2.sum(), [x2])
    torch.testing.assert_close(gx, gx2)


@pytest.mark.parametrize("device", DEVICES)
def test_poisoned_output_memory_is_fully_overwritten(device):
    # Free a NaN-filled block first: on CUDA the caching allocator hands it to the output,
    # so any element the kernel failed to write would surface as NaN. (On CPU the block
    # usually goes back to the OS; there this is a plain reference comparison.)
    for layout in LAYOUTS:
        x = in_layout(torch.randn(3, 16, 9, 13, device=device), layout)
        params = make_params(16, 4, torch.float32, device)
        junk = torch.full((3 * 16 * 9 * 13 * 4,), float("nan"), device=device)
        del junk
        y = op(x, *params, "avgmax", "sigmoid")
        assert torch.isfinite(y).all()
        expected = channel_attention_reference(x.double(), *[p.double() for p in params], "avgmax")
        assert_close(y, expected, torch.float32)


def test_float16_and_bfloat16_accumulate_in_float32():
    # A sum of 4096 float16 values of 1 + small noise would drift visibly in float16.
    x = (1 + 1e-3 * torch.randn(1, 4, 64, 64)).half()
    w1, b1, w2, b2 = make_params(4, 2, torch.float32, "cpu")
    y = op(x, w1.half(), b1.half(), w2.half(), b2.half(), "avg", "sigmoid")
    expected = channel_attention_reference(x.double(), w1.half().double(), b1.half().double(),
                                           w2.half().double(), b2.half().double(), "avg")
    assert_close(y, expected, torch.float16)


@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_functional_and_reference(device):
    m = cnn_attention.ChannelAttention(32, reduction=4, pool="avgmax", gate="softmax").to(device)
    assert m.hidden == 8 and m.fc1_weight.shape == (8, 32) and m.fc2_weight.shape == (32, 8)
    assert "pool='avgmax'" in repr(m)
    x = torch.randn(2, 32, 6, 6, device=device)
    expected = channel_attention_reference(
        x.double(), m.fc1_weight.double(), m.fc1_bias.double(), m.fc2_weight.double(), m.fc2_bias.double(),
        "avgmax", "softmax",
    )
    assert_close(m(x), expected, torch.float32)
    assert cnn_attention.ChannelAttention(4).hidden == 8  # min_hidden bounds R from below


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match=r"ChannelAttention: pool must be one of 'avg', 'max', 'avgmax', got 'mean'"):
        cnn_attention.ChannelAttention(8, pool="mean")
    with pytest.raises(ValueError, match=r"ChannelAttention: gate must be one of 'sigmoid', 'softmax', 'hard_sigmoid', got 'relu'"):
        cnn_attention.ChannelAttention(8, gate="relu")
    with pytest.raises(ValueError, match=r"ChannelAttention: channels must be an integer >= 1, got 0"):
        cnn_attention.ChannelAttention(0)


BAD_MODULE_OPTIONS = [
    (dict(channels=8, reduction=0), r"ChannelAttention: reduction must be an integer >= 1, got 0"),
    (dict(channels=8, min_hidden=-1), r"ChannelAttention: min_hidden must be an integer >= 1, got -1"),
    # Integer options take integers only: not floats (even integral ones), not bools.
    (dict(channels=8.0), r"ChannelAttention: channels must be an integer >= 1, got 8.0"),
    (dict(channels=True), r"ChannelAttention: channels must be an integer >= 1, got True"),
    (dict(channels="8"), r"ChannelAttention: channels must be an integer >= 1, got '8'"),
    (dict(channels=6, min_hidden=float("nan")), r"ChannelAttention: min_hidden must be an integer >= 1, got nan"),
    (dict(channels=8, reduction=1, min_hidden=1.5), r"ChannelAttention: min_hidden must be an integer >= 1, got 1.5"),
    (dict(channels=1, reduction=float("inf")), r"ChannelAttention: reduction must be an integer >= 1, got inf"),
    (dict(channels=8, pool=None), r"ChannelAttention: pool must be one of 'avg', 'max', 'avgmax', got None"),
]


@pytest.mark.parametrize("options,message", BAD_MODULE_OPTIONS, ids=[str(i) for i in range(len(BAD_MODULE_OPTIONS))])
def test_module_rejects_bad_option_values(options, message):
    with pytest.raises(ValueError, match=message):
        cnn_attention.ChannelAttention(**options)


def test_module_takes_integer_scalars():
    m = cnn_attention.ChannelAttention(torch.tensor(16), reduction=torch.tensor(4), min_hidden=torch.tensor(2))
    assert (m.channels, m.hidden) == (16, 4) and type(m.channels) is int and type(m.hidden) is int


@pytest.mark.parametrize("x", [None, [1.0], 2.0], ids=["None", "list", "float"])
def test_module_non_tensor_input_raises_type_error(x):
    m = cnn_attention.ChannelAttention(4)
    with pytest.raises(TypeError, match=rf"^ChannelAttention: x must be a Tensor, got {type(x).__name__}$"):
        m(x)
    torch.jit.script(m)  # the check is not compiled


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_lower_precision_and_trains_float32_parameters(device):
    m = cnn_attention.ChannelAttention(16, pool="avgmax").to(device)
    x = torch.randn(2, 16, 8, 8, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=dtype):
        y = m(x)
    assert y.dtype == dtype
    expected = channel_attention_reference(
        x.to(dtype).double(), *[p.to(dtype).double() for p in (m.fc1_weight, m.fc1_bias, m.fc2_weight, m.fc2_bias)],
        "avgmax",
    )
    assert_close(y, expected, dtype)
    y.float().sum().backward()
    assert m.fc1_weight.grad is not None and m.fc1_weight.grad.dtype == torch.float32


# ---- bad input: every message names the operator, the argument and what was expected ----

def _good(device="cpu", dtype=torch.float32):
    x = torch.randn(2, 8, 5, 5, device=device, dtype=dtype)
    return [x, *make_params(8, 4, dtype, device)]


def test_bad_backward_grad_is_rejected():
    args = _good()
    with pytest.raises(RuntimeError, match=r"channel_attention: grad_y must be the size of x = \(2, 8, 5, 5\), got \(2, 8, 5\)"):
        torch.ops.cnn_attention._channel_attention_backward(torch.randn(2, 8, 5), *args, "avg", "sigmoid")
    with pytest.raises(RuntimeError, match=r"channel_attention: grad_y must have the dtype of x \(Float\), got Double"):
        torch.ops.cnn_attention._channel_attention_backward(args[0].double(), *args, "avg", "sigmoid")


def test_double_backward_is_refused():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_(True) for p in make_params(8, 4, torch.float64, "cpu")]
    y = op(x, *params, "avg", "sigmoid")
    (gx,) = torch.autograd.grad(y.sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="channel_attention: double backward is not supported"):
        gx.sum().backward()


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    x, w1, b1, w2, b2 = _good()
    with pytest.raises(RuntimeError, match=r"channel_attention: fc1_weight must be on the device of x \(cpu\), got cuda:0"):
        op(x, w1.cuda(), b1, w2, b2, "avg", "sigmoid")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels,hidden", [(40, 8), (72, 5), (24, 9)])
def test_results_are_bitwise_identical_across_runs_and_thread_counts(layout, channels, hidden):
    # Channel and hidden widths that are not multiples of 16: where a BLAS changes kernels.
    x = in_layout(torch.randn(4, channels, 33, 17), layout)
    params = make_params(channels, hidden, torch.float32, "cpu")
    grad = torch.randn(4, channels, 33, 17)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in [x, *params]]
        assert leaves[0].stride() == x.stride()
        y = op(*leaves, "avgmax", "softmax")
        return [y.detach(), *torch.autograd.grad(y, leaves, grad)]

    assert_bitwise_identical_across_thread_counts(run)


DATA = Path(__file__).resolve().parents[1] / "data"


def test_a_model_saved_before_the_activation_argument_loads_and_runs():
    """Two ChannelAttention modules scripted and saved when the operator's schema ended at
    `gate`: the file loads (the new `activation` takes its default, "relu") and gives the
    outputs saved with it."""
    model = torch.jit.load(str(DATA / "channel_attention_before_activation.pt"))
    io = torch.load(DATA / "channel_attention_before_activation_io.pt")
    torch.testing.assert_close(model(io["x"]), io["y"])


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "identity"])
@pytest.mark.parametrize("gate", ["sigmoid", "hard_sigmoid", "softmax"])
def test_module_activation_and_gate(activation, gate):
    m = cnn_attention.ChannelAttention(16, reduction=4, gate=gate, activation=activation)
    assert f"activation={activation!r}" in repr(m) and f"gate={gate!r}" in repr(m)
    x = torch.randn(2, 16, 5, 5)
    expected = channel_attention_reference(
        x.double(), m.fc1_weight.double(), m.fc1_bias.double(), m.fc2_weight.double(), m.fc2_bias.double(),
        "avg", gate, activation)
    assert_close(m(x), expected, torch.float32)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x))
