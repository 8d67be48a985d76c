"""Tensors past 32-bit indexing: more than 2^31 elements (offsets past 2^31), long rows whose
float32 sums would stall, and channel numbers past float32's exact integers. Each test needs
up to 12 GiB and is skipped when the machine has less memory available."""

import pytest
import torch

from helpers import DEVICES

ops = torch.ops.cnn_attention
GiB = 1 << 30
BIG = (1 << 31) + 1  # elements: the last one's offset does not fit in an int32


def available_memory(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def need_memory(device: str, nbytes: int) -> None:
    # A margin for the process itself and the comparisons.
    if available_memory(device) < nbytes + 2 * GiB:
        pytest.skip(f"needs {(nbytes + 2 * GiB) / GiB:.0f} GiB of {device} memory")


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_channel_attention_forward_past_2_31_elements(device):
    """x of 2^31 + 1 bfloat16 positions in one row: ones with a 2 at the very end. The mean
    (a sum of 2^31 terms) and the max (at the last offset) must both be right."""
    need_memory(device, 2 * BIG * 2)
    x = torch.ones(1, 1, BIG, dtype=torch.bfloat16, device=device)
    x[0, 0, -1] = 2.0
    w = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
    y = ops.channel_attention(x, w, None, w, None, "avgmax", "sigmoid")
    mean = (BIG + 1) / BIG  # one 2 among ones
    gate = torch.sigmoid(torch.tensor(mean + 2.0, dtype=torch.float64)).item()
    ends = y[0, 0, [0, -1]].double().cpu()
    torch.testing.assert_close(ends, torch.tensor([gate, 2 * gate], dtype=torch.float64), atol=0, rtol=1e-2)
    # Every position gets the same gate: the row is one value up to its last element.
    assert bool((y[0, 0, :-1] == y[0, 0, 0]).all())


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_channel_pool_forward_and_backward_past_2_31_elements(device):
    """x (1, 2, 2^30 + 1) bfloat16: the second channel's row starts past 2^31 elements. The
    backward (x, grad and grad_x alive) runs the private op to stay within 12 GiB."""
    positions = (1 << 30) + 1
    need_memory(device, 3 * 2 * positions * 2)
    x = torch.zeros(1, 2, positions, dtype=torch.bfloat16, device=device)
    x[0, 1, -1] = 4.0  # the max of the last position is in channel 1, at offset 2^31 + 1
    x[0, 0, -2] = -2.0
    out = ops.channel_pool(x)
    assert out.shape == (1, 2, positions)
    torch.testing.assert_close(out[0, :, -2:].float().cpu(), torch.tensor([[-1.0, 2.0], [0.0, 4.0]]))
    assert not bool(out[0, :, :-2].any())
    del out
    grad = torch.zeros(1, 2, positions, dtype=torch.bfloat16, device=device)
    grad[0, 0, -1] = 2.0  # grad of the mean: 1 for each of the 2 channels
    grad[0, 1, -1] = 3.0  # grad of the max: to channel 1 only
    grad_x = ops._channel_pool_backward(grad, x)
    del grad
    torch.testing.assert_close(grad_x[0, :, -1].float().cpu(), torch.tensor([1.0, 4.0]))
    assert int(torch.count_nonzero(grad_x)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_soft_attention_past_2_31_elements(device):
    """Scores with C channels (the per-element pass) over (1, 2, 2^30 + 1) bfloat16."""
    positions = (1 << 30) + 1
    need_memory(device, 3 * 2 * positions * 2)
    x = torch.ones(1, 2, positions, dtype=torch.bfloat16, device=device)
    scores = torch.zeros(1, 2, positions, dtype=torch.bfloat16, device=device)
    scores[0, 1, -1] = 100.0  # sigmoid 1 at the last element: offset 2^31 + 1
    x[0, 1, -1] = 3.0
    y = ops.soft_attention(x, scores, "sigmoid", 1.0)
    del scores
    assert float(y[0, 1, -1]) == 3.0
    assert bool((y[0, :, :-1] == 0.5).all()) and float(y[0, 0, -1]) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_hard_attention_past_2_31_elements(device, mode):
    """x (1, 2^21, 1025) bfloat16 (2^31 + 2^21 elements) with one score map, high only at the
    last position: the mask keeps that position alone (above the threshold, or the top 1) and
    y is x there in every channel, the last channel's element at offset 2^31 + 2^21 - 1.
    (A score map of 2^30 positions would test the selection's long rows too, but the threshold
    and top-k temporaries then need more than 20 GiB.)"""
    channels, positions = 1 << 21, 1025
    need_memory(device, 2 * channels * positions * 2 + channels * positions)  # x, y, a bool temporary
    x = torch.ones(1, channels, positions, dtype=torch.bfloat16, device=device)
    x[0, -1, -1] = 3.0
    scores = torch.zeros(1, 1, positions, dtype=torch.bfloat16, device=device)
    scores[0, 0, -1] = 10.0
    y, mask = ops.hard_attention(x, scores, mode, 0.6, 1, "sigmoid", 1.0)
    del x
    assert mask[0, 0].nonzero().flatten().tolist() == [positions - 1]
    assert float(y[0, -1, -1]) == 3.0 and float(y[0, 0, -1]) == 1.0
    assert int(torch.count_nonzero(y)) == channels


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_attention_pooling_sums_long_rows(device, layout):
    """2^28 positions of ones with equal scores pool to 1: a float32 running sum of that many
    terms would stall at 2^24 per accumulator and give a fraction of it."""
    positions = 1 << 28
    channels = 2 if layout == "channels_last" else 1
    need_memory(device, 3 * channels * positions * 4)
    x = torch.ones(1, channels, positions, device=device)
    scores = torch.zeros(1, 1, positions, device=device)
    if layout == "channels_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    pooled = ops.soft_attention_pool(x, scores, 1.0)
    torch.testing.assert_close(pooled.cpu(), torch.ones(1, channels), atol=0, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_softmax_over_channel_scores_sums_long_rows(device, layout):
    """Scores with C channels (weights computed where they are used) over 2^25 positions of
    ones with equal scores: every weight is P * softmax = 1, so y = x, grad_x = grad_y and
    the scores' gradient is 0. One float32 running sum of a row would stall at 2^24 terms."""
    positions = 1 << 25
    need_memory(device, 6 * 2 * positions * 4)
    x = torch.ones(1, 2, positions, device=device)
    scores = torch.zeros(1, 2, positions, device=device)
    if layout == "channels_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        scores = scores.transpose(1, 2).contiguous().transpose(1, 2)
    y = ops.soft_attention(x, scores, "softmax", 1.0)
    assert torch.allclose(y, x, atol=0, rtol=1e-4)
    del y
    grad_x, grad_scores = ops._soft_attention_backward(x, x, scores, "softmax", 1.0)
    assert torch.allclose(grad_x, x, atol=0, rtol=1e-4)
    assert float(grad_scores.abs().max()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_channel_pool_gradient_past_float32_integer_channels(device):
    """C = 2^24 + 2 channels at one position: the max at channel 2^24 + 1, a channel number
    float32 cannot hold exactly; its gradient must reach that channel only."""
    channels = (1 << 24) + 2
    x = torch.zeros(1, channels, 1, device=device)
    x[0, -1, 0] = 1.0
    grad = torch.tensor([[[0.0], [1.0]]], device=device)
    grad_x = ops._channel_pool_backward(grad, x)
    assert torch.nonzero(grad_x).tolist() == [[0, channels - 1, 0]]
    assert float(ops.channel_pool(x)[0, 1, 0]) == 1.0

