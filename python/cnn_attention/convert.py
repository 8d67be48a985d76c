"""``convert(model)``: run the attention blocks that torchvision and timm models already contain on
the fused operators, in place, keeping every parameter and buffer (docs/design.md, "Converting
the model zoos' blocks").

Each recognised block is replaced by a module that keeps the block's own submodules under their
own names (so the state dict keeps its keys, shapes and values, and checkpoints load before or
after conversion) and computes the same function:

- a block whose middle is the standard MLP (a 1x1 convolution, an activation among ReLU, SiLU,
  GELU and identity, a 1x1 convolution) runs as one ``channel_attention``, the convolutions'
  weights passed as views;
- any other excitation (a normalization in the MLP, ECA's 1-D convolution, one convolution,
  GC's attention-pooled and normalized transform) runs its small ``(N, C)`` middle with its own
  modules, between a pooling and one ``channel_gate``;
- CBAM's spatial half runs as ``channel_pool``, its own convolution and normalization, and
  ``soft_attention``.

torchvision and timm are optional: the blocks of a package that is not installed are simply not
looked for.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as ops

__all__ = ["convert", "recognised_blocks"]


# ---- the fused modules ----


class ConvertedExcitation(nn.Module):
    """A block whose MLP is ``fc1``, an activation, ``fc2`` (1x1 convolutions) on one
    ``channel_attention``: torchvision's ``SqueezeExcitation`` (``pool="avg"``) and CBAM's channel
    half, timm's ``ChannelAttn`` (``pool="avgmax"``: the MLP on the mean and on the max, added;
    the max sends its gradient to the first position that attains it, ``amax`` splits it among
    ties)."""

    def __init__(self, block: nn.Module, pool: str, activation: str, gate: str) -> None:
        super().__init__()
        self.fc1 = block.fc1
        self.fc2 = block.fc2
        self.pool = pool
        self.activation = activation
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        return ops.channel_attention(x, self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1),
                                     self.fc2.bias, self.pool, self.gate, self.activation)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}, activation={self.activation!r}, gate={self.gate!r}"


class ConvertedSqueezeExcite(nn.Module):
    """timm's EfficientNet / MobileNetV3 ``SqueezeExcite`` (``conv_reduce``, ``conv_expand``) on
    ``channel_attention``."""

    def __init__(self, block: nn.Module, activation: str, gate: str) -> None:
        super().__init__()
        self.conv_reduce = block.conv_reduce
        self.conv_expand = block.conv_expand
        self.activation = activation
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        return ops.channel_attention(x, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias,
                                     self.conv_expand.weight.flatten(1), self.conv_expand.bias, "avg", self.gate,
                                     self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, gate={self.gate!r}"


class ConvertedSEModule(nn.Module):
    """timm's ``SEModule`` (``fc1``, ``bn``, ``act``, ``fc2``): one ``channel_attention`` when its
    MLP is the standard one; otherwise (a normalization, the mean-and-max pooling, another
    activation) its MLP runs as it is between the pooling and ``channel_gate``."""

    def __init__(self, block: nn.Module, activation: Optional[str], gate: str) -> None:
        super().__init__()
        self.fc1 = block.fc1
        self.bn = block.bn
        self.act = block.act
        self.fc2 = block.fc2
        self.add_maxpool: bool = bool(block.add_maxpool)
        self.fused_mlp = activation is not None
        self.activation = activation if activation is not None else "identity"
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_mlp:
            return ops.channel_attention(x, self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1),
                                         self.fc2.bias, "avg", self.gate, self.activation)
        pooled = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            pooled = 0.5 * pooled + 0.5 * x.amax((2, 3), keepdim=True)
        logits = self.fc2(self.act(self.bn(self.fc1(pooled))))
        return ops.channel_gate(x, logits.flatten(1), self.gate)

    def extra_repr(self) -> str:
        middle = f"activation={self.activation!r}" if self.fused_mlp else "mlp in PyTorch"
        return f"{middle}, gate={self.gate!r}"


class ConvertedEffectiveSEModule(nn.Module):
    """timm's ``EffectiveSEModule`` (one 1x1 convolution ``fc``) on ``channel_gate``."""

    def __init__(self, block: nn.Module, gate: str) -> None:
        super().__init__()
        self.fc = block.fc
        self.add_maxpool: bool = bool(block.add_maxpool)
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            pooled = 0.5 * pooled + 0.5 * x.amax((2, 3), keepdim=True)
        return ops.channel_gate(x, self.fc(pooled).flatten(1), self.gate)

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


class ConvertedEcaModule(nn.Module):
    """timm's ``EcaModule`` (a 1-D convolution across channels, ``conv``; with ``use_mlp``,
    ``act`` and ``conv2``) and ``CecaModule`` (the same with circular padding) on
    ``channel_gate``."""

    def __init__(self, block: nn.Module, gate: str, circular_padding: int) -> None:
        super().__init__()
        self.conv = block.conv
        # ECA's optional MLP mode; absent, they are identities (no state either way).
        act, conv2 = getattr(block, "act", None), getattr(block, "conv2", None)
        self.act = act if act is not None else nn.Identity()
        self.conv2 = conv2 if conv2 is not None else nn.Identity()
        self.circular_padding = circular_padding
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3)).view(x.shape[0], 1, -1)
        if self.circular_padding > 0:
            pooled = F.pad(pooled, (self.circular_padding, self.circular_padding), mode="circular")
        logits = self.conv2(self.act(self.conv(pooled)))
        return ops.channel_gate(x, logits.view(x.shape[0], -1), self.gate)

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}, circular_padding={self.circular_padding}"


class ConvertedGlobalContext(nn.Module):
    """timm's ``GlobalContext``: the context is ``soft_attention_pool`` of ``x`` with the scores of
    its ``conv_attn`` (or the mean without it), ``mlp_scale`` gates through ``channel_gate``,
    ``mlp_add`` is added."""

    def __init__(self, block: nn.Module, gate: str) -> None:
        super().__init__()
        self.conv_attn = block.conv_attn
        self.mlp_add = block.mlp_add
        self.mlp_scale = block.mlp_scale
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        if self.conv_attn is not None:
            context = ops.soft_attention_pool(x, self.conv_attn(x))
        else:
            context = x.mean((2, 3))
        context = context.view(context.shape[0], context.shape[1], 1, 1)
        if self.mlp_scale is not None:
            x = ops.channel_gate(x, self.mlp_scale(context).flatten(1), self.gate)
        if self.mlp_add is not None:
            x = x + self.mlp_add(context)
        return x

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


class ConvertedLightChannelAttn(nn.Module):
    """timm's ``LightChannelAttn``: the MLP (``fc1``, ``act``, ``fc2``) on the average of the mean
    and the max, then ``channel_gate`` (its gate is always the sigmoid)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.fc1 = block.fc1
        self.act = block.act
        self.fc2 = block.fc2

    def forward(self, x: Tensor) -> Tensor:
        pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        return ops.channel_gate(x, self.fc2(self.act(self.fc1(pooled))).flatten(1), "sigmoid")


class ConvertedSpatialAttn(nn.Module):
    """CBAM's spatial half, timm's ``SpatialAttn`` (``conv``: a convolution and its normalization
    from the mean and the max over channels to one score channel) and ``LightSpatialAttn`` (the
    same from their average): ``channel_pool``, ``conv``, then ``soft_attention`` with the sigmoid.
    The max sends its gradient to the first channel that attains it."""

    def __init__(self, block: nn.Module, average_pools: bool) -> None:
        super().__init__()
        self.conv = block.conv
        self.average_pools = average_pools

    def forward(self, x: Tensor) -> Tensor:
        pooled = ops.channel_pool(x)
        if self.average_pools:
            pooled = 0.5 * pooled.narrow(1, 0, 1) + 0.5 * pooled.narrow(1, 1, 1)
        if pooled.device.type == "cpu" and pooled.dim() == 4:
            # As SpatialScores: oneDNN's backward of a convolution to one channel is faster
            # channels-last (docs/benchmarks.md), and the pooled map is small.
            pooled = pooled.contiguous(memory_format=torch.channels_last)
        return ops.soft_attention(x, self.conv(pooled), "sigmoid", 1.0)

    def extra_repr(self) -> str:
        return "pools averaged" if self.average_pools else "pools stacked"


class ConvertedCbam(nn.Module):
    """timm's ``CbamModule`` and ``LightCbamModule``: the converted ``channel`` then ``spatial``."""

    def __init__(self, channel: nn.Module, spatial: nn.Module) -> None:
        super().__init__()
        self.channel = channel
        self.spatial = spatial

    def forward(self, x: Tensor) -> Tensor:
        return self.spatial(self.channel(x))


class ConvertedFusedCbam(nn.Module):
    """timm's ``CbamModule`` whose channel MLP is two 1x1 convolutions and whose score head is a
    convolution and a BatchNorm (``ConvNormAct``): one ``cbam`` while the normalization uses its
    running statistics (eval mode), folded into the convolution's weight and bias. In training
    mode the normalization needs the batch's statistics of the scores, which exist only between
    the two halves, so they run one after the other."""

    def __init__(self, channel: ConvertedExcitation, spatial: ConvertedSpatialAttn) -> None:
        super().__init__()
        self.channel = channel
        self.spatial = spatial

    def forward(self, x: Tensor) -> Tensor:
        norm = self.spatial.conv.bn
        if norm.training:
            return self.spatial(self.channel(x))
        conv = self.spatial.conv.conv
        mean, var = norm.running_mean, norm.running_var
        assert mean is not None and var is not None
        # Locals, so that TorchScript refines the optional tensors.
        norm_weight, norm_bias, conv_bias = norm.weight, norm.bias, conv.bias
        scale = torch.rsqrt(var + norm.eps)
        if norm_weight is not None:
            scale = scale * norm_weight
        shift = -mean * scale
        if norm_bias is not None:
            shift = shift + norm_bias
        if conv_bias is not None:
            shift = shift + conv_bias * scale
        channel = self.channel
        return ops.cbam(x, channel.fc1.weight.flatten(1), channel.fc1.bias, channel.fc2.weight.flatten(1),
                        channel.fc2.bias, conv.weight * scale, shift, channel.gate, channel.activation)


# ---- recognising the zoos' pieces ----

# Why a block is left as it is, or None when it converts.
_Result = Tuple[Optional[nn.Module], str]


def _class_named(module: str, name: str):
    try:
        imported = __import__(module, fromlist=[name])
    except ImportError:
        return None
    return getattr(imported, name, None)


def _is(module: nn.Module, *candidates) -> bool:
    return any(c is not None and type(module) is c for c in candidates)


def _timm_activation(name: str):
    return _class_named("timm.layers.activations", name)


def _gate_name(gate: nn.Module) -> Optional[str]:
    """The channel_gate name of a gate module that computes exactly it, or None."""
    if _is(gate, nn.Sigmoid, _timm_activation("Sigmoid")):
        return "sigmoid"
    if _is(gate, nn.Hardsigmoid):
        return "hard_sigmoid"
    # timm's in-place hard sigmoid clamps, whose gradient at exactly +-3 differs.
    if _is(gate, _timm_activation("HardSigmoid")) and not getattr(gate, "inplace", False):
        return "hard_sigmoid"
    return None


def _activation_name(act: nn.Module) -> Optional[str]:
    """The channel_attention name of an MLP activation module, or None."""
    if _is(act, nn.ReLU):
        return "relu"
    if _is(act, nn.SiLU, _timm_activation("Swish")):
        return "silu"
    if _is(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if _is(act, _timm_activation("GELU")):
        return "gelu"
    if _is(act, nn.Identity):
        return "identity"
    return None


def _pointwise(conv: nn.Module) -> bool:
    """A 1x1 Conv2d that is a linear map of the channels."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)


def _no_gate(gate: nn.Module) -> str:
    return f"gate {type(gate).__name__} is not a sigmoid or an exact hard sigmoid"


def _no_activation(act: nn.Module) -> str:
    return f"activation {type(act).__name__} is not relu, silu, gelu or identity"


def _excitation(gate: nn.Module, fc1: nn.Module, fc2: nn.Module, act: nn.Module) -> Tuple[str, Optional[str], str]:
    """(gate name, activation name or None, why the block cannot convert or ""): a block whose
    MLP is fc1, act, fc2 and whose gate is `gate`."""
    gate_name = _gate_name(gate)
    if gate_name is None:
        return "", None, _no_gate(gate)
    if not (_pointwise(fc1) and _pointwise(fc2)):
        return gate_name, None, "its MLP is not two 1x1 convolutions"
    return gate_name, _activation_name(act), ""


def _torchvision_squeeze_excitation(block: nn.Module) -> _Result:
    gate, activation, reason = _excitation(block.scale_activation, block.fc1, block.fc2, block.activation)
    if reason:
        return None, reason
    if type(block.avgpool) is not nn.AdaptiveAvgPool2d or block.avgpool.output_size not in (1, (1, 1)):
        return None, "its pooling is not a global average"
    if activation is None:
        return None, _no_activation(block.activation)
    return ConvertedExcitation(block, "avg", activation, gate), f"channel_attention ({activation}, {gate})"


def _timm_squeeze_excite(block: nn.Module) -> _Result:
    gate, activation, reason = _excitation(block.gate, block.conv_reduce, block.conv_expand, block.act1)
    if reason:
        return None, reason
    if activation is None:
        return None, _no_activation(block.act1)
    return ConvertedSqueezeExcite(block, activation, gate), f"channel_attention ({activation}, {gate})"


def _timm_se_module(block: nn.Module) -> _Result:
    gate, activation, reason = _excitation(block.gate, block.fc1, block.fc2, block.act)
    if reason:
        return None, reason
    if type(block.bn) is not nn.Identity or block.add_maxpool:
        activation = None
    converted = ConvertedSEModule(block, activation, gate)
    if activation is None:
        return converted, f"mean, its MLP, channel_gate ({gate})"
    return converted, f"channel_attention ({activation}, {gate})"


def _timm_effective_se(block: nn.Module) -> _Result:
    gate = _gate_name(block.gate)
    if gate is None:
        return None, _no_gate(block.gate)
    return ConvertedEffectiveSEModule(block, gate), f"mean, fc, channel_gate ({gate})"


def _timm_eca(block: nn.Module) -> _Result:
    gate = _gate_name(block.gate)
    if gate is None:
        return None, _no_gate(block.gate)
    return ConvertedEcaModule(block, gate, 0), f"mean, conv1d, channel_gate ({gate})"


def _timm_ceca(block: nn.Module) -> _Result:
    gate = _gate_name(block.gate)
    if gate is None:
        return None, _no_gate(block.gate)
    return ConvertedEcaModule(block, gate, int(block.padding)), f"mean, circular conv1d, channel_gate ({gate})"


def _timm_global_context(block: nn.Module) -> _Result:
    gate = _gate_name(block.gate)
    if gate is None and block.mlp_scale is not None:
        return None, _no_gate(block.gate)
    pooling = "soft_attention_pool" if block.conv_attn is not None else "mean"
    return ConvertedGlobalContext(block, gate or "sigmoid"), f"{pooling}, its MLPs, channel_gate"


def _timm_cbam(block: nn.Module, light: bool) -> _Result:
    channel, spatial = block.channel, block.spatial
    if light:
        if not (_pointwise(channel.fc1) and _pointwise(channel.fc2)):
            return None, "its MLP is not two 1x1 convolutions"
        converted_channel: nn.Module = ConvertedLightChannelAttn(channel)
        what = "mean and max, its MLP, channel_gate (sigmoid)"
    else:
        gate, activation, reason = _excitation(channel.gate, channel.fc1, channel.fc2, channel.act)
        if reason:
            return None, reason
        if activation is None:
            return None, _no_activation(channel.act)
        converted_channel = ConvertedExcitation(channel, "avgmax", activation, gate)
        what = f"channel_attention (avgmax, {activation}, {gate})"
    if _gate_name(spatial.gate) != "sigmoid":
        return None, f"spatial gate {type(spatial.gate).__name__} is not a sigmoid"
    converted_spatial = ConvertedSpatialAttn(spatial, average_pools=light)
    if not light and _foldable_score_head(spatial.conv):
        return (ConvertedFusedCbam(converted_channel, converted_spatial),
                f"cbam in eval mode (its BatchNorm folded); in training {what}; channel_pool, its conv, "
                "soft_attention (sigmoid)")
    converted = ConvertedCbam(converted_channel, converted_spatial)
    return converted, f"{what}; channel_pool, its conv, soft_attention (sigmoid)"


def _foldable_score_head(head: nn.Module) -> bool:
    """Whether a CBAM score head is a same-padded 2 -> 1 convolution, then a BatchNorm with
    running statistics and nothing after it (timm's ``ConvNormAct(2, 1, k, apply_act=False)``)."""
    conv, norm = getattr(head, "conv", None), getattr(head, "bn", None)
    if type(conv) is not nn.Conv2d or not isinstance(norm, nn.BatchNorm2d) or getattr(head, "aa", None) is not None:
        return False
    k = conv.weight.shape[-1]
    if (tuple(conv.weight.shape) != (1, 2, k, k) or k % 2 == 0 or conv.stride != (1, 1)
            or conv.padding != (k // 2, k // 2) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding_mode != "zeros"):
        return False
    after = [getattr(norm, name, None) for name in ("drop", "act")]
    return norm.track_running_stats and all(m is None or isinstance(m, nn.Identity) for m in after)


def recognised_blocks() -> Dict[type, Callable[[nn.Module], _Result]]:
    """The zoos' block classes that are installed, each with its converter."""
    found: Dict[type, Callable[[nn.Module], _Result]] = {}

    def add(module: str, name: str, converter: Callable[[nn.Module], _Result]) -> None:
        cls = _class_named(module, name)
        if cls is not None:
            found[cls] = converter

    add("torchvision.ops.misc", "SqueezeExcitation", _torchvision_squeeze_excitation)
    add("timm.layers.squeeze_excite", "SEModule", _timm_se_module)
    add("timm.layers.squeeze_excite", "EffectiveSEModule", _timm_effective_se)
    add("timm.layers.eca", "EcaModule", _timm_eca)
    add("timm.layers.eca", "CecaModule", _timm_ceca)
    add("timm.layers.global_context", "GlobalContext", _timm_global_context)
    add("timm.layers.cbam", "CbamModule", lambda block: _timm_cbam(block, light=False))
    add("timm.layers.cbam", "LightCbamModule", lambda block: _timm_cbam(block, light=True))
    add("timm.models._efficientnet_blocks", "SqueezeExcite", _timm_squeeze_excite)
    return found


def convert(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Replaces, in place, every attention block of ``model`` that torchvision or timm defines and
    that the fused operators compute exactly, and returns ``model``.

    Recognised: torchvision ``SqueezeExcitation``; timm ``SEModule``, ``EffectiveSEModule``,
    ``EcaModule``, ``CecaModule``, ``SqueezeExcite`` (EfficientNet, MobileNetV3),
    ``CbamModule``, ``LightCbamModule``, ``GlobalContext``. The converted modules keep the
    blocks' submodules under their own names, so ``model.state_dict()`` keeps its keys, shapes
    and values; outputs and gradients equal the original's to rounding (a max pooling sends its
    gradient to the first maximum where ``amax`` splits it among ties). A block whose gate or
    activation the operators do not compute exactly is left as it is.

    Args:
        model: any ``nn.Module``; ``model`` itself is never replaced, only its submodules.
        verbose: print each block converted (and to what) or left (and why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    converters = recognised_blocks()
    report: List[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = prefix + name
            converter = converters.get(type(child))
            if converter is None:
                visit(child, path + ".")
                continue
            converted, why = converter(child)
            if converted is None:
                report.append(f"left {path} ({type(child).__name__}): {why}")
                visit(child, path + ".")
                continue
            converted.train(child.training)
            setattr(parent, name, converted)
            report.append(f"converted {path} ({type(child).__name__}): {why}")

    visit(model, "")
    if verbose:
        converted_count = sum(line.startswith("converted") for line in report)
        print(f"cnn_attention.convert: {converted_count} block(s) converted, "
              f"{len(report) - converted_count} left")
        for line in report:
            print("  " + line)
    return model
