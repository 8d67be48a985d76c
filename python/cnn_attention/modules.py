"""Attention modules. Each is a scriptable ``nn.Module`` over ``torch.ops.cnn_attention``."""

import math

import torch
from torch import Tensor, nn

__all__ = ["ChannelAttention"]

_POOLS = ("avg", "max", "avgmax")
_GATES = ("sigmoid", "softmax")


def _check_choice(module: str, name: str, value: str, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"{module}: {name} must be one of {', '.join(map(repr, accepted))}, got {value!r}")


class ChannelAttention(nn.Module):
    """Channel attention: squeeze-and-excitation (``pool="avg"``) or CBAM's channel branch
    (``pool="avgmax"``), fused into one operator.

    Pools each channel over the spatial dims, runs a two-layer MLP with ``R`` hidden units,
    gates the result and scales the channels: ``y = x * gate(fc2(relu(fc1(pool(x)))))``.

    Args:
        channels: ``C``, the number of input channels.
        reduction: ``R = max(channels // reduction, min_hidden)``.
        min_hidden: lower bound of ``R``.
        pool: ``"avg"``, ``"max"`` or ``"avgmax"``.
        gate: ``"sigmoid"`` or ``"softmax"`` (``C * softmax``, so uniform weights are the identity).

    Shape: ``(N, C, *S) -> (N, C, *S)`` for 1 to 3 spatial dims.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 8,
        pool: str = "avg",
        gate: str = "sigmoid",
    ) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or min_hidden < 1:
            raise ValueError(
                "ChannelAttention: channels, reduction and min_hidden must be >= 1, got "
                f"{channels}, {reduction}, {min_hidden}"
            )
        _check_choice("ChannelAttention", "pool", pool, _POOLS)
        _check_choice("ChannelAttention", "gate", gate, _GATES)
        self.channels = channels
        self.hidden = max(channels // reduction, min_hidden)
        self.pool = pool
        self.gate = gate
        self.fc1_weight = nn.Parameter(torch.empty(self.hidden, channels))
        self.fc1_bias = nn.Parameter(torch.empty(self.hidden))
        self.fc2_weight = nn.Parameter(torch.empty(channels, self.hidden))
        self.fc2_bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As nn.Linear / a 1x1 nn.Conv2d initialise, so swapping in this module for timm's
        # SE block starts from the same distribution.
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.cnn_attention.channel_attention(
            x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.pool, self.gate
        )

    def extra_repr(self) -> str:
        return f"{self.channels}, hidden={self.hidden}, pool={self.pool!r}, gate={self.gate!r}"
