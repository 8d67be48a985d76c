"""Shared test helpers: devices, layouts, tolerances and the float64 references written
from DESIGN.md section 2."""

from typing import List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
SPATIAL = [(11,), (5, 7), (3, 4, 5), (17, 19)]

# (atol, rtol) of a result in `dtype` against the float64 reference.
TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def in_layout(t: Tensor, layout: str) -> Tensor:
    """The same values as `t` (N, C, *S), stored contiguous, channels-last or as a strided
    view (every other channel of a larger tensor, at an offset)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        order = [0] + list(range(2, t.dim())) + [1]
        inverse = [order.index(i) for i in range(t.dim())]
        out = t.permute(order).contiguous().permute(inverse)
        assert not out.is_contiguous() or t.shape[1] == 1
        return out
    if layout == "strided":
        big = torch.zeros((t.shape[0], 2 * t.shape[1] + 1) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
        big[:, 1::2] = t
        out = big[:, 1::2]
        assert not out.is_contiguous()
        return out
    raise ValueError(layout)


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def first_max(x: Tensor, dims: Sequence[int]) -> Tensor:
    """Max over `dims` whose gradient goes to the first (lowest flat index) maximum, as the
    operators define it (torch.amax would split it among ties)."""
    moved = x.movedim(tuple(dims), tuple(range(x.dim() - len(dims), x.dim())))
    flat = moved.flatten(x.dim() - len(dims))
    index = flat.argmax(-1, keepdim=True)  # torch.argmax returns the first maximum
    return flat.gather(-1, index).squeeze(-1)


def channel_attention_reference(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    pool: str = "avg",
    gate: str = "sigmoid",
) -> Tensor:
    dims = list(range(2, x.dim()))

    def mlp(p: Tensor) -> Tensor:
        return F.linear(F.relu(F.linear(p, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)

    if pool == "avg":
        z = mlp(x.mean(dims))
    elif pool == "max":
        z = mlp(first_max(x, dims))
    else:
        z = mlp(x.mean(dims)) + mlp(first_max(x, dims))
    w = torch.sigmoid(z) if gate == "sigmoid" else x.shape[1] * torch.softmax(z, dim=1)
    return x * w.reshape(w.shape + (1,) * len(dims))


def channel_pool_reference(x: Tensor) -> Tensor:
    return torch.stack([x.mean(1), first_max(x, [1])], dim=1)


def float64_leaves(tensors: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def grads_of(out: Tensor, grad: Tensor, inputs: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    present = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(out, present, grad))
    return [None if t is None else next(found) for t in inputs]
