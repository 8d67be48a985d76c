"""Attention modules. Each is a scriptable ``nn.Module`` over ``cnn_attention.functional``, the one
place that calls the operators."""

import math
import numbers
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as ops

__all__ = ["ChannelAttention", "ChannelGate", "SpatialScores", "SoftAttention", "HardAttention", "SelfAttention", "CBAM"]

_POOLS = ("avg", "max", "avgmax")
_GATES = ("sigmoid", "softmax", "hard_sigmoid")
_ACTIVATIONS = ("relu", "silu", "gelu", "identity")
_NORMALIZE = ("sigmoid", "softmax")
_HARD_MODES = ("threshold", "topk")
_ESTIMATORS = ("sigmoid", "identity")


def _shown(value: Any) -> str:
    """``repr(value)``, shortened for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_choice(module: str, name: str, value: str, accepted) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{module}: {name} must be one of {', '.join(map(repr, accepted))}, got {_shown(value)}")


def _check_int(module: str, name: str, value: Any, low: Optional[int] = 1) -> int:
    """``value`` as an ``int``: a Python int or an integer scalar (``operator.index``), not a
    bool nor a float, even an integral one; at least ``low`` unless that is ``None``."""
    index: Optional[int] = None
    if not isinstance(value, bool):
        try:
            index = operator.index(value)
        except TypeError:
            pass
    if index is None or (low is not None and index < low):
        what = "an integer" if low is None else f"an integer >= {low}"
        raise ValueError(f"{module}: {name} must be {what}, got {_shown(value)}")
    return index


def _check_float(module: str, name: str, value: Any, accept: Callable[[float], bool], what: str) -> float:
    """``value`` as a ``float``: a real number (not a bool) that ``accept`` takes, or a
    ValueError saying it must be ``what``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except (OverflowError, TypeError, ValueError):
            number = math.nan
        if accept(number):
            return number
    raise ValueError(f"{module}: {name} must be {what}, got {_shown(value)}")


def _check_input(module: str, x: Any) -> None:
    # Eager / torch.compile only: TorchScript's ``x: Tensor`` already guarantees a tensor.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: x must be a Tensor, got {type(x).__name__}")


def _dtype_name(dtype: torch.dtype) -> str:
    # TorchScript's str(dtype) is the dtype's number; the floating dtypes are all x can have.
    if torch.jit.is_scripting():
        if dtype == torch.float32:
            return "torch.float32"
        if dtype == torch.float64:
            return "torch.float64"
        if dtype == torch.float16:
            return "torch.float16"
        if dtype == torch.bfloat16:
            return "torch.bfloat16"
    return str(dtype)


def _check_parameter(module: str, x: Tensor, weight: Tensor) -> None:
    """That x is on the device of the module's parameter ``weight`` and has its dtype, for the
    fused operators that take both (under autocast they cast all but float64 inputs themselves)."""
    if x.device != weight.device:
        raise ValueError(
            module + ": x is on device " + str(x.device) + " but the module's parameters are on "
            + str(weight.device) + "; move x or the module (module.to('" + str(x.device) + "'))"
        )
    if x.dtype != weight.dtype and (
        x.dtype == torch.float64 or weight.dtype == torch.float64 or not _autocast_enabled(x.device.type)
    ):
        x_dtype = _dtype_name(x.dtype)
        raise ValueError(
            module + ": x has dtype " + x_dtype + " but the module's parameters are "
            + _dtype_name(weight.dtype) + "; convert x or the module (module.to(" + x_dtype + "))"
        )


def _autocast_enabled(device_type: str) -> bool:
    if torch.jit.is_scripting():
        # TorchScript's autocast queries have crashed the process while autocast was on
        # (torch.is_autocast_cpu_enabled() under CPU autocast in torch 2.15; a scripted module
        # asking torch.is_autocast_enabled() under CUDA autocast in torch 2.11, which runs
        # without the query): assume autocast may be on, which leaves a dtype mismatch to the
        # operator's or torch's convolution's own check.
        return True
    else:
        return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class ChannelAttention(nn.Module):
    """Channel attention: squeeze-and-excitation (``pool="avg"``) or CBAM's channel branch
    (``pool="avgmax"``), fused into one operator.

    Pools each channel over the spatial dims, runs a two-layer MLP with ``R`` hidden units,
    gates the result and scales the channels: ``y = x * gate(fc2(activation(fc1(pool(x)))))``.

    Args:
        channels: ``C``, the number of input channels.
        reduction: ``R = max(channels // reduction, min_hidden)``.
        min_hidden: lower bound of ``R``.
        pool: ``"avg"``, ``"max"`` or ``"avgmax"``.
        gate: ``"sigmoid"``, ``"hard_sigmoid"`` (``relu6(z + 3) / 6``) or ``"softmax"``
            (``C * softmax``, so uniform weights are the identity).
        activation: the MLP's: ``"relu"``, ``"silu"``, ``"gelu"`` or ``"identity"``.

    Shape: ``(N, C, *S) -> (N, C, *S)`` for 1 to 3 spatial dims.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 8,
        pool: str = "avg",
        gate: str = "sigmoid",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels = _check_int("ChannelAttention", "channels", channels)
        reduction = _check_int("ChannelAttention", "reduction", reduction)
        min_hidden = _check_int("ChannelAttention", "min_hidden", min_hidden)
        _check_choice("ChannelAttention", "pool", pool, _POOLS)
        _check_choice("ChannelAttention", "gate", gate, _GATES)
        _check_choice("ChannelAttention", "activation", activation, _ACTIVATIONS)
        self.channels = channels
        self.hidden = max(channels // reduction, min_hidden)
        self.pool = pool
        self.gate = gate
        self.activation = activation
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
        if not torch.jit.is_scripting():
            _check_input("ChannelAttention", x)
        return ops.channel_attention(
            x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.pool, self.gate,
            self.activation,
        )

    def extra_repr(self) -> str:
        return (f"{self.channels}, hidden={self.hidden}, pool={self.pool!r}, gate={self.gate!r}, "
                f"activation={self.activation!r}")


class ChannelGate(nn.Module):
    """The gate of channel attention alone: ``y = x * gate(logits)`` with ``logits`` ``(N, C)``
    broadcast over the spatial dims; no parameters.

    The fused end of an excitation block whose ``(N, C)`` middle is computed elsewhere (ECA's
    1-D convolution, a normalized MLP, GC's transform); ``cnn_attention.convert`` builds its
    blocks on it.

    Args:
        gate: ``"sigmoid"``, ``"hard_sigmoid"`` or ``"softmax"`` (``C * softmax``).

    Shape: ``x`` ``(N, C, *S)``, ``logits`` ``(N, C)`` -> ``(N, C, *S)``.
    """

    def __init__(self, gate: str = "sigmoid") -> None:
        super().__init__()
        _check_choice("ChannelGate", "gate", gate, _GATES)
        self.gate = gate

    def forward(self, x: Tensor, logits: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_input("ChannelGate", x)
        return ops.channel_gate(x, logits, self.gate)

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


def _check_temperature(module: str, temperature: float) -> float:
    return _check_float(
        module, "temperature", temperature, lambda t: math.isfinite(t) and t > 0, "finite and positive"
    )


class SpatialScores(nn.Module):
    """CBAM's score head: ``conv(channel_pool(x))``, one convolution from the 2 pooled
    channels (mean and max over channels) to 1 score channel, ``kernel_size`` wide with same
    padding, in ``spatial_dims`` (1 to 3) dimensions. ``(N, C, *S) -> (N, 1, *S)``.
    """

    def __init__(self, kernel_size: int = 7, spatial_dims: int = 2, owner: str = "SpatialScores") -> None:
        super().__init__()
        kernel_size = _check_int(owner, "kernel_size", kernel_size, low=None)
        spatial_dims = _check_int(owner, "spatial_dims", spatial_dims, low=None)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{owner}: kernel_size must be odd and positive, got {kernel_size}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"{owner}: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        self.kernel_size = kernel_size
        self.spatial_dims = spatial_dims
        self.padding = kernel_size // 2
        self.owner = owner
        self.weight = nn.Parameter(torch.empty((1, 2) + (kernel_size,) * spatial_dims))
        self.bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def check_rank(self, x: Tensor) -> None:
        """That x is a tensor (N, C, *S) with ``spatial_dims`` spatial dims."""
        if not torch.jit.is_scripting():
            _check_input(self.owner, x)
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                self.owner + ": x must be (N, C, *S) with " + str(self.spatial_dims)
                + " spatial dims (spatial_dims), got " + str(x.dim()) + " dims"
            )

    def reset_parameters(self) -> None:
        # As nn.Conv2d initialises.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(2 * self.kernel_size**self.spatial_dims)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        self.check_rank(x)
        pooled = ops.channel_pool(x)
        if x.device != self.weight.device:
            raise ValueError(
                self.owner + ": x is on device " + str(x.device) + " but the module's parameters are on "
                + str(self.weight.device) + "; move x or the module (module.to('" + str(x.device) + "'))"
            )
        # After channel_pool, which rejects what no dtype conversion would fix. Under autocast
        # the convolution casts its inputs itself, all but float64 ones.
        weight_dtype = self.weight.dtype
        if pooled.dtype != weight_dtype and (
            pooled.dtype == torch.float64 or weight_dtype == torch.float64 or not _autocast_enabled(x.device.type)
        ):
            x_dtype = _dtype_name(x.dtype)
            raise ValueError(
                self.owner + ": x has dtype " + x_dtype + " but the module's parameters are "
                + _dtype_name(weight_dtype) + "; convert x or the module (module.to(" + x_dtype + "))"
            )
        for size in x.shape[2:]:
            if size == 0:
                # No positions: the same-padding convolution of an empty map is an error to
                # torch, yet the scores are simply empty. Computed from pooled and the
                # parameters so that a backward gives them (empty, zero) gradients.
                weight = self.weight.sum().to(pooled.dtype)
                return pooled.narrow(1, 0, 1) * weight + self.bias.to(pooled.dtype)
        if self.spatial_dims == 1:
            return F.conv1d(pooled, self.weight, self.bias, padding=self.padding)
        # oneDNN's backward of a 2 -> 1 channel convolution is several times faster
        # channels-last, and its forward no slower (docs/benchmarks.md); the pooled map is
        # C / 2 times smaller than x, so the copy is cheap.
        cpu = pooled.device.type == "cpu"
        if self.spatial_dims == 2:
            if cpu:
                pooled = pooled.contiguous(memory_format=torch.channels_last)
            return F.conv2d(pooled, self.weight, self.bias, padding=self.padding)
        if cpu:
            pooled = pooled.contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(pooled, self.weight, self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, spatial_dims={self.spatial_dims}"


class SoftAttention(nn.Module):
    """Soft spatial attention (CBAM's spatial branch): ``y = x * w`` with one weight per
    position from ``scores = conv(channel_pool(x))``.

    Args:
        kernel_size: odd width of the score convolution.
        normalize: ``"sigmoid"`` (weights in (0, 1)) or ``"softmax"`` (``P * softmax`` over
            the positions: they compete, the mean weight is 1).
        temperature: ``T > 0``; the weights use ``scores / T``.
        spatial_dims: 1, 2 or 3, the spatial rank of the inputs.

    Shape: ``(N, C, *S) -> (N, C, *S)``.
    """

    def __init__(
        self,
        kernel_size: int = 7,
        normalize: str = "sigmoid",
        temperature: float = 1.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        _check_choice("SoftAttention", "normalize", normalize, _NORMALIZE)
        temperature = _check_temperature("SoftAttention", temperature)
        self.scores = SpatialScores(kernel_size, spatial_dims, "SoftAttention")
        self.normalize = normalize
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        # One operator for the whole branch: the score head's pooling and convolution and the
        # weighting, with one gradient of x (module ``scores`` computes the scores alone).
        scores = self.scores
        scores.check_rank(x)
        _check_parameter("SoftAttention", x, scores.weight)
        return ops.cbam_spatial(x, scores.weight, scores.bias, self.normalize, self.temperature)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize!r}, temperature={self.temperature}"


class HardAttention(nn.Module):
    """Hard spatial attention: a 0/1 mask over positions from ``scores =
    conv(channel_pool(x))``; ``y = x * mask``. Trained with a straight-through gradient
    (see ``functional.hard_attention``).

    Args:
        kernel_size: odd width of the score convolution.
        mode: ``"threshold"`` (keep ``sigmoid(scores / T) > threshold``) or ``"topk"`` (keep
            the ``k`` best positions of each sample).
        threshold: in ``[0, 1]``.
        k: positions kept in top-k mode, or
        keep_ratio: in ``(0, 1]``: keep ``k = ceil(keep_ratio * P)`` positions of the input at
            hand (implies ``mode="topk"``).
        estimator: ``"sigmoid"`` or ``"identity"`` (the straight-through gradient).
        temperature: ``T > 0``.
        noise: scale of the logistic noise added to the scores in training (the binary
            concrete relaxation: the mask explores); ``0`` turns it off; never applied in eval.
        spatial_dims: 1, 2 or 3.

        keep_mask: keep the mask in eval mode too (it is always kept in training).

    After a forward in training mode (or any forward when ``keep_mask``), ``last_mask`` holds
    the mask ``(N, 1, *S)`` and ``kept_fraction`` the fraction of positions kept; switching
    between training and eval clears it. An eval-mode forward without ``keep_mask`` writes no
    module state, so one module (eager, scripted or in C++) can serve many threads at once.
    Shape: ``(N, C, *S) -> (N, C, *S)``.
    """

    last_mask: Optional[Tensor]
    # A Python convenience; scripted modules expose last_mask.
    __jit_unused_properties__ = ["kept_fraction"]

    def __init__(
        self,
        kernel_size: int = 7,
        mode: str = "threshold",
        threshold: float = 0.5,
        k: int = 1,
        keep_ratio: Optional[float] = None,
        estimator: str = "sigmoid",
        temperature: float = 1.0,
        noise: float = 0.0,
        spatial_dims: int = 2,
        keep_mask: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("HardAttention", "mode", mode, _HARD_MODES)
        _check_choice("HardAttention", "estimator", estimator, _ESTIMATORS)
        temperature = _check_temperature("HardAttention", temperature)
        threshold = _check_float(
            "HardAttention", "threshold", threshold, lambda t: 0.0 <= t <= 1.0, "finite and in [0, 1]"
        )
        if keep_ratio is not None:
            if mode != "topk":
                raise ValueError(f"HardAttention: keep_ratio needs mode='topk', got mode={mode!r}")
            keep_ratio = _check_float("HardAttention", "keep_ratio", keep_ratio, lambda r: 0.0 < r <= 1.0, "in (0, 1]")
        k = _check_int("HardAttention", "k", k)
        noise = _check_float("HardAttention", "noise", noise, lambda t: math.isfinite(t) and t >= 0, "finite and >= 0")
        self.scores = SpatialScores(kernel_size, spatial_dims, "HardAttention")
        self.mode = mode
        self.threshold = threshold
        self.k = k
        self.keep_ratio = keep_ratio
        self.estimator = estimator
        self.temperature = temperature
        self.noise = noise
        self.keep_mask = bool(keep_mask)
        self.last_mask = None

    def positions_kept(self, positions: int) -> int:
        """``k`` for an input with ``positions`` positions."""
        ratio = self.keep_ratio
        if ratio is None:
            return self.k
        return max(1, min(positions, int(math.ceil(ratio * positions))))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.scores(x)
        if self.training and self.noise > 0:
            # Logistic noise log(u) - log(1 - u): sigmoid(scores + noise) is a binary concrete
            # sample, so training sees masks near the decision boundary flip.
            u = torch.rand_like(scores).clamp_(1e-6, 1.0 - 1e-6)
            scores = scores + self.noise * (torch.log(u) - torch.log1p(-u))
        positions = 1
        for size in x.shape[2:]:
            positions *= size
        y, mask = ops.hard_attention(
            x,
            scores,
            self.mode,
            self.threshold,
            self.positions_kept(positions),
            self.estimator,
            self.temperature,
        )
        # Writing last_mask in every forward would make concurrent eval forwards of one module
        # (a C++ service's threads) race on the attribute.
        if self.training or self.keep_mask:
            self._keep(mask)
        return y

    def train(self, mode: bool = True) -> "HardAttention":
        # A mask from the other mode would be mistaken for one of the next forward.
        if mode != self.training:
            self.last_mask = None
        return super().train(mode)

    def _keep(self, mask: Tensor) -> None:
        # torch.export (non-strict) forbids assigning module attributes while tracing; eager,
        # TorchScript and torch.compile keep the mask. (torch 2.11 reports is_exporting() under
        # torch.compile too, hence the test for dynamo.)
        if torch.jit.is_scripting():
            self.last_mask = mask
        elif torch.compiler.is_dynamo_compiling() or not torch.compiler.is_exporting():
            self.last_mask = mask

    @property
    def kept_fraction(self) -> Optional[float]:
        """Fraction of positions the last forward kept (``None`` before the first)."""
        mask = self.last_mask
        if mask is None:
            return None
        return float(mask.float().mean().item())

    def extra_repr(self) -> str:
        kept = f"keep_ratio={self.keep_ratio}" if self.keep_ratio is not None else f"k={self.k}"
        return (
            f"mode={self.mode!r}, threshold={self.threshold}, {kept}, "
            f"estimator={self.estimator!r}, temperature={self.temperature}, noise={self.noise}"
            + (", keep_mask=True" if self.keep_mask else "")
        )


class SelfAttention(nn.Module):
    """Self attention over the positions of a feature map: a non-local / SAGAN block with
    multi-head attention whose memory is linear in the number of positions, so it fits at
    shallow, high-resolution layers too.

    ``y = x + gamma * out_proj(attention(q, k, v))`` with ``q, k, v`` from one 1x1 projection
    of ``x``; see :func:`cnn_attention.functional.self_attention`.

    Args:
        channels: ``C``, the number of input channels.
        num_heads: attention heads; must divide ``qk_dim`` and ``v_dim``.
        qk_reduction: ``qk_dim = max(channels // qk_reduction, num_heads)`` query and key
            features (SAGAN's C/8).
        v_reduction: ``v_dim = max(channels // v_reduction, num_heads)`` value features.
        kv_stride: keys and values max-pooled by this stride on every spatial dim (non-local
            sub-sampling: ``kv_stride ** d`` times fewer keys).
        gamma_init: initial residual weight; 0 (the default, as SAGAN) starts as the identity.

    Shape: ``(N, C, *S) -> (N, C, *S)`` for 1 to 3 spatial dims.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        qk_reduction: int = 8,
        v_reduction: int = 1,
        kv_stride: int = 1,
        gamma_init: float = 0.0,
    ) -> None:
        super().__init__()
        channels = _check_int("SelfAttention", "channels", channels)
        num_heads = _check_int("SelfAttention", "num_heads", num_heads)
        qk_reduction = _check_int("SelfAttention", "qk_reduction", qk_reduction)
        v_reduction = _check_int("SelfAttention", "v_reduction", v_reduction)
        kv_stride = _check_int("SelfAttention", "kv_stride", kv_stride)
        qk_dim = max(channels // qk_reduction, num_heads)
        v_dim = max(channels // v_reduction, num_heads)
        if qk_dim % num_heads or v_dim % num_heads:
            raise ValueError(
                f"SelfAttention: num_heads = {num_heads} must divide qk_dim = {qk_dim} "
                f"(channels // qk_reduction) and v_dim = {v_dim} (channels // v_reduction)"
            )
        # gamma is a float32 parameter (until the module is converted).
        gamma_init = _check_float(
            "SelfAttention", "gamma_init", gamma_init,
            lambda g: math.isfinite(g) and abs(g) <= torch.finfo(torch.float32).max,
            "finite and representable in float32",
        )
        self.channels = channels
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.kv_stride = kv_stride
        self.gamma_init = gamma_init
        self.qkv_weight = nn.Parameter(torch.empty(2 * qk_dim + v_dim, channels))
        self.qkv_bias = nn.Parameter(torch.empty(2 * qk_dim + v_dim))
        self.out_weight = nn.Parameter(torch.empty(channels, v_dim))
        self.out_bias = nn.Parameter(torch.empty(channels))
        self.gamma = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the 1x1 convolutions of a non-local block initialise.
        for weight, bias in ((self.qkv_weight, self.qkv_bias), (self.out_weight, self.out_bias)):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(bias, -bound, bound)
        nn.init.constant_(self.gamma, self.gamma_init)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_input("SelfAttention", x)
        return ops.self_attention(
            x,
            self.qkv_weight,
            self.qkv_bias,
            self.out_weight,
            self.out_bias,
            self.gamma,
            self.qk_dim,
            self.num_heads,
            self.kv_stride,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, num_heads={self.num_heads}, qk_dim={self.qk_dim}, "
            f"v_dim={self.v_dim}, kv_stride={self.kv_stride}"
        )


class CBAM(nn.Module):
    """CBAM: channel attention (``pool="avgmax"``), then soft spatial attention, run as one
    operator (``functional.cbam``) that never writes the channel-weighted map. Its parameters
    live in the two halves, ``channel`` (a ``ChannelAttention``) and ``spatial`` (a
    ``SoftAttention``).

    Args:
        channels: ``C``. reduction, min_hidden: of the channel MLP (see ``ChannelAttention``).
        kernel_size: odd width of the spatial score convolution.
        spatial_dims: 1, 2 or 3.

    Shape: ``(N, C, *S) -> (N, C, *S)``.
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        min_hidden: int = 8,
        kernel_size: int = 7,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, min_hidden, pool="avgmax")
        self.spatial = SoftAttention(kernel_size, spatial_dims=spatial_dims)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            _check_input("CBAM", x)
        channel, scores = self.channel, self.spatial.scores
        if x.dim() != scores.spatial_dims + 2:
            raise ValueError(
                "CBAM: x must be (N, C, *S) with " + str(scores.spatial_dims)
                + " spatial dims (spatial_dims), got " + str(x.dim()) + " dims"
            )
        for weight in (channel.fc1_weight, scores.weight):
            _check_parameter("CBAM", x, weight)
        return ops.cbam(
            x, channel.fc1_weight, channel.fc1_bias, channel.fc2_weight, channel.fc2_bias,
            scores.weight, scores.bias, channel.gate, channel.activation,
        )
