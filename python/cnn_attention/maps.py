"""attention_maps: every attention module's weights from one forward, to see what the
attention does."""

import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import CBAM, ChannelAttention, HardAttention, SelfAttention, SoftAttention

__all__ = ["attention_maps"]


_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu, "identity": lambda t: t}


def _channel_weights(module: ChannelAttention, x: Tensor) -> Tensor:
    """(N, C): the gate of channel_attention (docs/design.md section 1), from the module's input."""
    dims = list(range(2, x.dim()))
    act = _ACTIVATIONS[module.activation]

    def mlp(p: Tensor) -> Tensor:
        return F.linear(act(F.linear(p, module.fc1_weight, module.fc1_bias)), module.fc2_weight, module.fc2_bias)

    if module.pool == "avg":
        z = mlp(x.mean(dims))
    elif module.pool == "max":
        z = mlp(x.amax(dims))
    else:
        z = mlp(x.mean(dims)) + mlp(x.amax(dims))
    if module.gate == "sigmoid":
        return torch.sigmoid(z)
    if module.gate == "hard_sigmoid":
        return F.hardsigmoid(z)
    return x.shape[1] * torch.softmax(z, dim=1)


def _cbam_maps(module: CBAM, x: Tensor, name: str, maps: Dict[str, Tensor]) -> None:
    """CBAM's two maps under its halves' names: the channel weights from x, the spatial weights
    from the channel-weighted map (one operator computes both; neither half runs on its own)."""
    prefix = name + "." if name else ""
    channel = _channel_weights(module.channel, x)
    maps[prefix + "channel"] = channel
    maps[prefix + "spatial"] = _soft_weights(module.spatial, x * channel.view(channel.shape + (1,) * (x.dim() - 2)))


def _soft_weights(module: SoftAttention, x: Tensor) -> Tensor:
    """(N, 1, *S): sigmoid(scores / T), or P * softmax over the positions."""
    scores = module.scores(x) / module.temperature
    if module.normalize == "sigmoid":
        return torch.sigmoid(scores)
    positions = scores[0, 0].numel()
    return positions * torch.softmax(scores.flatten(2), dim=-1).view_as(scores)


def _self_attention_rows(module: SelfAttention, x: Tensor, queries: Optional[Sequence[int]]) -> Tensor:
    """(N, H, Q, *S'): the attention of the query positions `queries` (flat indices; default:
    the centre) over every key position (after kv_stride pooling), computed for those rows
    only: Q x Pk values, never the P x P matrix."""
    n, spatial = x.shape[0], tuple(x.shape[2:])
    positions = math.prod(spatial)
    if queries is None:
        centre = 0
        for size in spatial:
            centre = centre * size + size // 2
        rows = [centre]
    else:
        rows = list(queries)
    for row in rows:
        if not 0 <= row < positions:
            raise ValueError(f"attention_maps: query position {row} is outside [0, {positions})")
    qk, heads = module.qk_dim, module.num_heads
    lift = (1,) * len(spatial)
    qkv = torch.einsum("oc,nc...->no...", module.qkv_weight, x) + module.qkv_bias.reshape((-1,) + lift)
    q = qkv[:, :qk].flatten(2)[:, :, rows]  # (N, qk, Q)
    keys = qkv[:, qk : 2 * qk]
    if module.kv_stride > 1:
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(spatial)]
        keys = pool(keys, module.kv_stride, module.kv_stride)
    key_spatial = tuple(keys.shape[2:])
    head_dim = qk // heads
    q = q.reshape(n, heads, head_dim, len(rows)).transpose(-1, -2)  # (N, H, Q, d)
    k = keys.flatten(2).reshape(n, heads, head_dim, -1)  # (N, H, d, Pk)
    weights = torch.softmax(q @ k / math.sqrt(head_dim), dim=-1)
    return weights.reshape((n, heads, len(rows)) + key_spatial)


def attention_maps(model: nn.Module, x: Tensor, queries: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
    """Every attention module's weights from one forward of `x`, by qualified module name:

    - ``ChannelAttention`` (also CBAM's, under ``<cbam>.channel``): channel weights ``(N, C)``;
    - ``SoftAttention`` (also CBAM's, under ``<cbam>.spatial``): spatial weights ``(N, 1, *S)``;
    - ``HardAttention``: its 0/1 mask ``(N, 1, *S)``;
    - ``SelfAttention``: the attention of chosen query positions over the key positions,
      ``(N, heads, Q, *S')`` (``S'`` after ``kv_stride`` pooling), computed for those rows only.
      ``queries``: flat position indices (default: the centre position).

    Runs under ``torch.no_grad()`` in the model's current mode (use ``model.eval()`` for
    inference maps: ``HardAttention`` adds noise in training when asked to).
    """
    maps: Dict[str, Tensor] = {}
    handles = []
    # HardAttention keeps its mask in eval mode only when asked to.
    keep_mask = {m: m.keep_mask for m in model.modules() if isinstance(m, HardAttention)}
    for name, module in model.named_modules():
        if isinstance(module, CBAM):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: _cbam_maps(m, inputs[0], name, maps)))
        elif isinstance(module, ChannelAttention):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: maps.__setitem__(name, _channel_weights(m, inputs[0]))))
        elif isinstance(module, SoftAttention):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: maps.__setitem__(name, _soft_weights(m, inputs[0]))))
        elif isinstance(module, HardAttention):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: maps.__setitem__(name, m.last_mask)))
        elif isinstance(module, SelfAttention):
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: maps.__setitem__(name, _self_attention_rows(m, inputs[0], queries))))
    try:
        for module in keep_mask:
            module.keep_mask = True
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, keep in keep_mask.items():
            module.keep_mask = keep
    return maps
