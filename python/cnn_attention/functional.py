"""One function per operator. Each calls ``torch.ops.cnn_attention.<op>``, so it works in
eager mode, under ``torch.jit.script``, ``torch.compile(fullgraph=True)`` and ``torch.export``,
and is differentiable (the autograd formulas are registered in C++)."""

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "channel_attention",
    "channel_gate",
    "cbam",
    "cbam_spatial",
    "channel_pool",
    "soft_attention",
    "soft_attention_pool",
    "hard_attention",
    "self_attention",
]


def channel_attention(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    pool: str = "avg",
    gate: str = "sigmoid",
    activation: str = "relu",
) -> Tensor:
    """Channel attention (squeeze-and-excitation, CBAM's channel branch) in one operator.

    ``y = x * w`` with ``w = gate(mlp(pool(x)))`` broadcast over the spatial dims, where
    ``mlp(p) = fc2(activation(fc1(p)))``.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype, any strides
            (contiguous and channels_last are read in place).
        fc1_weight: ``(R, C)``. fc1_bias: ``(R,)`` or ``None``.
        fc2_weight: ``(C, R)``. fc2_bias: ``(C,)`` or ``None``.
        pool: ``"avg"`` (SE), ``"max"``, or ``"avgmax"`` (CBAM: ``mlp(avg) + mlp(max)``).
        gate: ``"sigmoid"`` (independent weights in (0, 1)), ``"hard_sigmoid"``
            (``relu6(z + 3) / 6`` as ``torch.nn.Hardsigmoid``, MobileNetV3's gate) or
            ``"softmax"`` (``C * softmax`` over channels: competing weights whose mean is 1).
        activation: the MLP's: ``"relu"``, ``"silu"`` (EfficientNet), ``"gelu"`` (exact,
            erf) or ``"identity"``.

    Returns:
        ``y``, shaped and laid out like ``x`` (a strided view gives a contiguous result).
        The max pool sends its gradient to the first position that attains the maximum.
    """
    return torch.ops.cnn_attention.channel_attention(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pool, gate, activation
    )


def channel_gate(x: Tensor, logits: Tensor, gate: str = "sigmoid") -> Tensor:
    """The gate of channel attention alone: ``y = x * gate(logits)``, ``logits`` ``(N, C)``
    broadcast over the spatial dims.

    The fused end of an excitation block whose middle is not ``channel_attention``'s MLP (ECA's
    1-D convolution, a normalized MLP, GC's transform): compute the ``(N, C)`` logits in
    PyTorch, then gate here. The backward reads ``x`` and the output's gradient once for both
    gradients.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype and strides.
        logits: ``(N, C)``, the dtype and device of ``x``.
        gate: ``"sigmoid"``, ``"hard_sigmoid"`` or ``"softmax"`` (``C * softmax`` over
            channels), as in ``channel_attention``.

    Returns:
        ``y``, shaped and laid out like ``x``. Gradients flow to ``x`` and ``logits``.
    """
    return torch.ops.cnn_attention.channel_gate(x, logits, gate)


def cbam(
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
    """CBAM in one operator: channel attention, then spatial attention on its result.

    ``x1 = channel_attention(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, "avgmax", gate,
    activation)``, ``scores = conv(channel_pool(x1), conv_weight, conv_bias)`` (same padding),
    ``y = soft_attention(x1, scores, "sigmoid")``, computed without writing ``x1``: the forward
    reads ``x`` three times and writes ``y`` once; the backward reads ``x`` and the output's
    gradient about three times each and writes ``x``'s gradient once.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype and strides.
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate, activation: as in
            ``channel_attention``.
        conv_weight: ``(1, 2, k, ..., k)``, one odd ``k`` per spatial dim (input channel 0 is
            the mean over channels, 1 the max). conv_bias: ``(1,)`` or ``None``.

    Returns:
        ``y``, shaped and laid out like ``x``. Both maxima send their gradient to the first
        position (channel max: the first channel) that attains them.
    """
    return torch.ops.cnn_attention.cbam(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, conv_bias, gate, activation
    )


def cbam_spatial(
    x: Tensor,
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    normalize: str = "sigmoid",
    temperature: float = 1.0,
) -> Tensor:
    """CBAM's spatial attention in one operator (what ``SoftAttention`` computes).

    ``scores = conv(channel_pool(x), conv_weight, conv_bias)`` (same padding), ``y =
    soft_attention(x, scores, normalize, temperature)``, computed without writing the pooled
    map's or the scores' gradients as x-sized maps: the forward reads ``x`` twice and writes
    ``y`` once; the backward reads ``x`` once and the output's gradient twice and writes ``x``'s
    gradient once.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype and strides.
        conv_weight: ``(1, 2, k, ..., k)``, one odd ``k`` per spatial dim (input channel 0 is
            the mean over channels, 1 the max). conv_bias: ``(1,)`` or ``None``.
        normalize, temperature: as in ``soft_attention``.

    Returns:
        ``y``, shaped and laid out like ``x``. Gradients flow to ``x``, ``conv_weight`` and
        ``conv_bias``; the channel max sends its gradient to the first channel that attains it.
    """
    return torch.ops.cnn_attention.cbam_spatial(x, conv_weight, conv_bias, normalize, temperature)


def channel_pool(x: Tensor) -> Tensor:
    """Mean and max over channels in one read: ``(N, C, *S) -> (N, 2, *S)``.

    Channel 0 is the mean, channel 1 the max (CBAM's spatial-attention input). The max
    sends its gradient to the first channel that attains it.
    """
    return torch.ops.cnn_attention.channel_pool(x)


def soft_attention(
    x: Tensor, scores: Tensor, normalize: str = "sigmoid", temperature: float = 1.0
) -> Tensor:
    """Soft spatial attention: weight every position, keep them all.

    ``y = x * w`` with ``w = sigmoid(scores / T)`` (``normalize="sigmoid"``: each position
    its own weight in (0, 1)) or ``w = P * softmax(scores / T)`` over the ``P`` positions of
    each sample and score channel (``"softmax"``: positions compete; the mean weight is 1).

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims; any floating dtype and strides.
        scores: ``(N, 1, *S)`` (one map shared by all channels, never expanded in memory)
            or ``(N, C, *S)``; the dtype and device of ``x``.
        normalize: ``"sigmoid"`` or ``"softmax"``.
        temperature: ``T > 0``.

    Returns:
        ``y``, shaped and laid out like ``x``. Gradients flow to ``x`` and ``scores``.
    """
    return torch.ops.cnn_attention.soft_attention(x, scores, normalize, temperature)


def soft_attention_pool(x: Tensor, scores: Tensor, temperature: float = 1.0) -> Tensor:
    """Attention pooling: ``(N, C, *S) -> (N, C)``, the sum over positions of
    ``softmax(scores / T) * x`` (softmax over the positions of each sample and score channel).

    ``scores`` is ``(N, 1, *S)`` or ``(N, C, *S)``. Differentiable in ``x`` and ``scores``.
    """
    return torch.ops.cnn_attention.soft_attention_pool(x, scores, temperature)


def hard_attention(
    x: Tensor,
    scores: Tensor,
    mode: str = "threshold",
    threshold: float = 0.5,
    k: int = 1,
    estimator: str = "sigmoid",
    temperature: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """Hard spatial attention: keep some positions, drop the rest.

    ``soft = sigmoid(scores / T)``; ``mode="threshold"`` keeps the positions where
    ``soft > threshold``; ``mode="topk"`` keeps the ``k`` largest scores of each sample and
    score channel (exact; ties go to the lower flat index; a NaN score ranks as ``+inf``).

    Returns ``(y, mask)``: ``y = x * mask`` and the 0/1 ``mask`` (shaped like ``scores``, in
    the dtype of ``x``, no gradient). Training uses a straight-through gradient:
    ``grad_x = grad_y * mask`` and ``grad_scores = sum over broadcast channels of
    grad_y * x * g`` with ``g = soft * (1 - soft) / T`` (``estimator="sigmoid"``) or
    ``g = 1`` (``"identity"``).

    Args:
        x: ``(N, C, *S)``. scores: ``(N, 1, *S)`` or ``(N, C, *S)``.
        threshold: in ``[0, 1]`` (threshold mode). k: in ``[1, P]`` (top-k mode).
        temperature: ``T > 0``.
    """
    return torch.ops.cnn_attention.hard_attention(
        x, scores, mode, threshold, k, estimator, temperature
    )


def self_attention(
    x: Tensor,
    qkv_weight: Tensor,
    qkv_bias: Optional[Tensor],
    out_weight: Tensor,
    out_bias: Optional[Tensor],
    gamma: Tensor,
    qk_dim: int,
    num_heads: int = 1,
    kv_stride: int = 1,
) -> Tensor:
    """Self attention over the positions of a feature map (a non-local / SAGAN block).

    Every position is a token. One projection gives queries, keys and values:
    ``qkv = qkv_weight @ x + qkv_bias`` per position (rows ``[0, qk_dim)`` queries,
    ``[qk_dim, 2 qk_dim)`` keys, the remaining ``v_dim`` rows values). With ``kv_stride > 1``
    keys and values are max-pooled (kernel = stride = ``kv_stride`` on every spatial dim,
    trailing positions that fill no window dropped). Heads split ``qk_dim`` and ``v_dim``
    evenly; each computes ``softmax(q k^T / sqrt(qk_dim / num_heads)) v``. Returns
    ``y = x + gamma * (out_weight @ heads + out_bias)``, laid out like ``x``.

    Memory is linear in the number of positions P: the P x P matrix is never built.

    Args:
        x: ``(N, C, *S)`` with 1 to 3 spatial dims.
        qkv_weight: ``(2 * qk_dim + v_dim, C)``. qkv_bias: ``(2 * qk_dim + v_dim,)`` or None.
        out_weight: ``(C, v_dim)``. out_bias: ``(C,)`` or None. gamma: one element.
        qk_dim: query and key features; ``num_heads`` must divide ``qk_dim`` and ``v_dim``.
        kv_stride: in ``[1, smallest spatial size]``.
    """
    return torch.ops.cnn_attention.self_attention(
        x, qkv_weight, qkv_bias, out_weight, out_bias, gamma, qk_dim, num_heads, kv_stride
    )
