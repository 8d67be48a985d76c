"""Shared test helpers: devices, layouts, tolerances and the float64 references written
from docs/design.md section 1."""

import math
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


# in_layout's layouts plus those of the property tests: a contiguous view at a storage offset
# and a stride-0 expanded view (see layout_view).
PROPERTY_LAYOUTS = LAYOUTS + ["offset", "expanded"]


def in_layout(t: Tensor, layout: str) -> Tensor:
    """The same values as `t` (N, C, *S), stored contiguous, channels-last, as a strided
    view (every other channel of a larger tensor, at an offset) or as a contiguous view at an
    odd storage offset ("offset": a slice of a larger flat buffer, misaligned for vector
    loads). Shapes that cannot tell a layout from the contiguous one (no elements, one
    channel, one position) get a tensor that may also be contiguous."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        order = [0] + list(range(2, t.dim())) + [1]
        inverse = [order.index(i) for i in range(t.dim())]
        out = t.permute(order).contiguous().permute(inverse)
        assert not out.is_contiguous() or t.shape[1] == 1 or math.prod(t.shape[2:]) <= 1 or t.numel() == 0
        return out
    if layout == "strided":
        big = torch.zeros((t.shape[0], 2 * t.shape[1] + 1) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
        big[:, 1::2] = t
        out = big[:, 1::2]
        assert not out.is_contiguous() or t.shape[0] * t.shape[1] == 1 or t.numel() == 0
        return out
    if layout == "offset":
        buffer = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
        buffer[3:] = t.flatten()
        out = buffer[3:].view(t.shape)
        assert out.is_contiguous() and out.storage_offset() == 3
        return out
    raise ValueError(layout)


def layout_view(t: Tensor, layout: str, expand_dim: int = 0) -> Tensor:
    """in_layout(t, layout) for the layouts of LAYOUTS and "offset"; for "expanded", the
    first slice of `t` along `expand_dim` broadcast back to t's shape by a stride-0 view (as
    x.expand makes from a size-1 dim). An expanded view repeats that slice, so its values are
    not t's: compute references from the returned tensor."""
    if layout != "expanded":
        return in_layout(t, layout)
    if t.shape[expand_dim] == 0:
        return t  # nothing to repeat
    out = t.narrow(expand_dim, 0, 1).expand(t.shape)
    assert out.stride(expand_dim) == 0 or t.shape[expand_dim] == 1
    return out


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
    activation: str = "relu",
) -> Tensor:
    dims = list(range(2, x.dim()))
    act = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}[activation]

    def mlp(p: Tensor) -> Tensor:
        return F.linear(act(F.linear(p, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)

    if pool == "avg":
        z = mlp(x.mean(dims))
    elif pool == "max":
        z = mlp(first_max(x, dims))
    else:
        z = mlp(x.mean(dims)) + mlp(first_max(x, dims))
    return channel_gate_reference(x, z, gate)


def channel_gate_reference(x: Tensor, logits: Tensor, gate: str = "sigmoid") -> Tensor:
    if gate == "sigmoid":
        w = torch.sigmoid(logits)
    elif gate == "hard_sigmoid":
        w = F.hardsigmoid(logits)
    else:
        w = x.shape[1] * torch.softmax(logits, dim=1)
    return x * w.reshape(w.shape + (1,) * (x.dim() - 2))


def channel_pool_reference(x: Tensor) -> Tensor:
    return torch.stack([x.mean(1), first_max(x, [1])], dim=1)


def cbam_reference(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    gate: str = "sigmoid",
    activation: str = "relu",
) -> Tensor:
    """Channel attention (avgmax), then the score convolution of the channel pool and the
    sigmoid spatial weights, one step after the other."""
    x1 = channel_attention_reference(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "avgmax", gate, activation)
    return cbam_spatial_reference(x1, conv_weight, conv_bias)


def cbam_spatial_reference(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    normalize: str = "sigmoid",
    temperature: float = 1.0,
) -> Tensor:
    """The score convolution of the channel pool, then soft attention, one step after the other."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    scores = conv(channel_pool_reference(x), conv_weight, conv_bias, padding=conv_weight.shape[-1] // 2)
    return soft_attention_reference(x, scores, normalize, temperature)


def float64_leaves(tensors: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]


def grads_of(out: Tensor, grad: Tensor, inputs: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    present = [t for t in inputs if t is not None]
    found = iter(torch.autograd.grad(out, present, grad))
    return [None if t is None else next(found) for t in inputs]


def _position_softmax(scores: Tensor, temperature: float) -> Tensor:
    """softmax(scores / T) over the P positions of each sample and score channel."""
    rows = (scores / temperature).flatten(2)
    return torch.softmax(rows, dim=-1).reshape(scores.shape)


def soft_attention_reference(x: Tensor, scores: Tensor, normalize: str = "sigmoid", temperature: float = 1.0) -> Tensor:
    if normalize == "sigmoid":
        w = torch.sigmoid(scores / temperature)
    else:
        positions = 1
        for size in x.shape[2:]:
            positions *= size
        w = positions * _position_softmax(scores, temperature)
    return x * w


def soft_attention_pool_reference(x: Tensor, scores: Tensor, temperature: float = 1.0) -> Tensor:
    return (_position_softmax(scores, temperature) * x).flatten(2).sum(-1)


def hard_attention_reference(
    x: Tensor,
    scores: Tensor,
    mode: str = "threshold",
    threshold: float = 0.5,
    k: int = 1,
    temperature: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """(y, mask) in float64. The threshold mask is computed in the operator's accumulation
    dtype (float32 for float32 and half inputs, float64 for float64): a value right at the
    threshold may fall on either side in another precision. The top-k mask keeps the k
    largest scores of each sample and score channel, ties to the lower flat index (a stable
    descending sort), NaN ranking as +inf."""
    if mode == "threshold":
        acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
        mask = (torch.sigmoid(scores.to(acc) / temperature) > threshold).double()
    else:
        rows = scores.double().flatten(2)
        rows = torch.where(torch.isnan(rows), torch.full_like(rows, float("inf")), rows)
        order = torch.sort(rows, dim=-1, descending=True, stable=True).indices[..., :k]
        mask = torch.zeros_like(rows).scatter_(-1, order, 1.0).reshape(scores.shape)
    return x.double() * mask, mask


def hard_attention_backward_reference(
    grad_y: Tensor, x: Tensor, scores: Tensor, mask: Tensor, estimator: str = "sigmoid", temperature: float = 1.0
) -> Tuple[Tensor, Tensor]:
    """The straight-through gradient of hard_attention in float64: dx = dy * mask; dscores = sum
    over the broadcast channels of dy * x * g, g = soft * (1 - soft) / T ("sigmoid") or 1
    ("identity")."""
    grad_y, x, scores, mask = grad_y.double(), x.double(), scores.double(), mask.double()
    grad_x = grad_y * mask
    product = grad_y * x
    if scores.shape[1] == 1:
        product = product.sum(1, keepdim=True)
    if estimator == "sigmoid":
        soft = torch.sigmoid(scores / temperature)
        product = product * soft * (1 - soft) / temperature
    return grad_x, product


def feature_map_and_scores(shape, score_channels: str, dtype, device, layout: str, scores_layout: Optional[str] = None):
    """x of `shape` (N, C, *S) in `layout`, and scores with one channel (`score_channels`
    "one") or C ("all") in `scores_layout` (default: that of x)."""
    x = in_layout(torch.randn(shape, device=device).to(dtype), layout)
    cs = 1 if score_channels == "one" else shape[1]
    scores = in_layout(torch.randn((shape[0], cs) + tuple(shape[2:]), device=device).to(dtype), scores_layout or layout)
    return x, scores


# Intra-op thread counts the determinism tests compare. 3 and more is where AMD's MKL splits
# a product in two dimensions and changes kernels for the edge tiles; 2 again at the end
# catches state left behind by a larger count.
THREAD_COUNTS = (1, 2, 3, 4, 2)


def assert_bitwise_identical_across_thread_counts(run, threads: Sequence[int] = THREAD_COUNTS) -> None:
    """run() returns a list of tensors; they must be equal bit for bit whatever the number of
    intra-op threads."""
    before = torch.get_num_threads()
    results = []
    try:
        for count in threads:
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def self_attention_reference(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    out_weight: Tensor,
    out_bias: Optional[Tensor],
    gamma: Tensor,
    qk_dim: int,
    num_heads: int = 1,
    kv_stride: int = 1,
    pool_dtype: Optional[torch.dtype] = None,
    stored_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """self_attention (docs/design.md section 1) in plain PyTorch, materialising the P x L attention matrix
    of every sample and head (small inputs only): qkv = qkv_weight @ x + qkv_bias per position;
    keys and values max-pooled by kv_stride (ceil_mode=False); per head softmax(q k^T /
    sqrt(qk_dim / num_heads)) v; y = x + gamma * (out_weight @ concat(heads) + out_bias).

    pool_dtype: pick the maximum of each pooling window among the keys and values rounded to
    this dtype (ties to the first position), as an operator that holds its float16 or bfloat16
    projection in that dtype does; the pooled values and their gradients stay in the dtype of
    the inputs. Without it a window whose two largest values round to nearly the same half
    value may send its gradient to another position than the operator's.

    stored_dtype: follow the operator's float16/bfloat16 contract: the projection qkv is
    rounded to this dtype, as the operator stores it (its gradient passes through the
    rounding unchanged). Everything else is float64."""
    n, spatial = x.shape[0], tuple(x.shape[2:])
    lift = (1,) * len(spatial)
    qkv = torch.einsum("oc,nc...->no...", qkv_weight, x)
    if qkv_bias is not None:
        qkv = qkv + qkv_bias.reshape((-1,) + lift)
    if stored_dtype is not None:
        qkv = qkv + (qkv.detach().to(stored_dtype).to(qkv.dtype) - qkv.detach())
    q, k, v = qkv[:, :qk_dim], qkv[:, qk_dim : 2 * qk_dim], qkv[:, 2 * qk_dim :]
    if kv_stride > 1:
        pool = _MAX_POOL[len(spatial)]
        if pool_dtype is None:
            k, v = pool(k, kv_stride, kv_stride), pool(v, kv_stride, kv_stride)
        else:
            kv = qkv[:, qk_dim:]
            _, index = pool(kv.detach().to(pool_dtype), kv_stride, kv_stride, return_indices=True)
            kv = kv.flatten(2).gather(2, index.flatten(2)).reshape(index.shape)
            k, v = kv[:, :qk_dim], kv[:, qk_dim:]
    v_dim = v.shape[1]
    qk_head, v_head = qk_dim // num_heads, v_dim // num_heads
    # (N, heads, positions, head dim)
    q = q.reshape(n, num_heads, qk_head, -1).transpose(-1, -2)
    k = k.reshape(n, num_heads, qk_head, -1).transpose(-1, -2)
    v = v.reshape(n, num_heads, v_head, -1).transpose(-1, -2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(qk_head), dim=-1)
    heads = weights @ v
    heads = heads.transpose(-1, -2).reshape((n, v_dim) + spatial)
    out = torch.einsum("cv,nv...->nc...", out_weight, heads)
    if out_bias is not None:
        out = out + out_bias.reshape((-1,) + lift)
    return x + gamma.reshape(()) * out
