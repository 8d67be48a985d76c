"""One function per operator. Each calls ``torch.ops.cnn_attention.<op>``, so it works in
eager mode, under ``torch.jit.script``, ``torch.compile(fullgraph=True)`` and ``torch.export``,
and is differentiable (the autograd formulas are registered in C++)."""

from typing import Optional

import torch
from torch import Tensor

__all__ = ["channel_attention", "channel_pool"]


def channel_attention(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    pool: str = "avg",
    gate: str = "sigmoid",
) -> Tensor:
    """Channel attention (squeeze-and-excitation, CBAM's channel branch) in one operator.

    ``y = x * w`` with ``w = gate(mlp(pool(x)))`` broadcast over the spatial dims, where
    ``mlp(p) = fc2(relu(fc1(p)))``.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype, any strides
            (contiguous and channels_last are read in place).
        fc1_weight: ``(R, C)``. fc1_bias: ``(R,)`` or ``None``.
        fc2_weight: ``(C, R)``. fc2_bias: ``(C,)`` or ``None``.
        pool: ``"avg"`` (SE), ``"max"``, or ``"avgmax"`` (CBAM: ``mlp(avg) + mlp(max)``).
        gate: ``"sigmoid"`` (independent weights in (0, 1)) or ``"softmax"``
            (``C * softmax`` over channels: competing weights whose mean is 1).

    Returns:
        ``y``, shaped and laid out like ``x`` (a strided view gives a contiguous result).
        The max pool sends its gradient to the first position that attains the maximum.
    """
    return torch.ops.cnn_attention.channel_attention(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate
    )


def channel_pool(x: Tensor) -> Tensor:
    """Mean and max over channels in one read: ``(N, C, *S) -> (N, 2, *S)``.

    Channel 0 is the mean, channel 1 the max (CBAM's spatial-attention input). The max
    sends its gradient to the first channel that attains it.
    """
    return torch.ops.cnn_attention.channel_pool(x)
