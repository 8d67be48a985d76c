"""Put attention into a CNN you already have: at its shallow stage (high resolution: edges,
textures), its deep stage (low resolution: parts, objects), every stage, inside every block
of those stages, or right after modules you name.

The stages come from one forward of an example input: the model is descended through its
containers to its own building blocks, and the blocks are grouped by the resolution of their
outputs. The README's Python API section gives the rules with three zoo models as examples."""

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .modules import CBAM, ChannelAttention, HardAttention, SelfAttention, SoftAttention

__all__ = ["insert", "find_stages", "AttentionAfter", "Stage", "Placement", "FAMILIES"]

FAMILIES = ("channel", "soft", "hard", "self", "cbam")
_WHERE = ("shallow", "deep", "all")
_DEFAULT_SIZE = 64  # spatial size of the default example input, per dim
_HOLDER = "inserted_attention"  # the attribute that holds the attention after a module
_HOLDER_BEFORE = "inserted_attention_before"  # ... before the module that consumes the output
_SLOTS = ("se", "attn", "attn_last")  # blocks' own attention slots (timm), in order of preference
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardtanh, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
)
# Residual blocks of the model zoos, by class, with the children that are not on their residual
# branch: attention goes after the last normalization of the branch, before the addition.
_RESIDUAL_BLOCKS = {
    "torchvision.models.resnet.BasicBlock": ("downsample",),
    "torchvision.models.resnet.Bottleneck": ("downsample",),
    "torchvision.models.efficientnet.MBConv": ("stochastic_depth",),
    "torchvision.models.efficientnet.FusedMBConv": ("stochastic_depth",),
    "torchvision.models.mobilenetv2.InvertedResidual": (),
    "torchvision.models.mobilenetv3.InvertedResidual": (),
    "torchvision.models.regnet.ResBottleneckBlock": ("proj",),
    "timm.models.resnet.BasicBlock": ("downsample", "se"),
    "timm.models.resnet.Bottleneck": ("downsample", "se"),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": ("se",),
    "timm.models._efficientnet_blocks.InvertedResidual": ("se",),
    "timm.models._efficientnet_blocks.EdgeResidual": ("se",),
}


class AttentionAfter(nn.Sequential):
    """The attention modules inserted after one module, applied in order to its output.

    It sits where the model's own keys stay as they were: appended to the module when that is
    a plain ``nn.Sequential``; otherwise as the module's child ``inserted_attention``, applied
    by a forward hook (TorchScript, ``torch.compile`` and ``torch.export`` run it); in a
    block's empty attention slot (``se``, ``attn``) in place of its ``nn.Identity``; or, after a
    container whose own forward loops over its children (DenseNet's dense block), as the child
    ``inserted_attention_before`` of the module that takes its output, applied by a forward
    pre-hook. Inserting again at the same place appends to it."""


class Stage(NamedTuple):
    """One resolution of the model's feature pyramid: the qualified names of its blocks in
    order, the last block's output channels, the spatial size."""

    blocks: Tuple[str, ...]
    channels: int
    spatial: Tuple[int, ...]


class Placement(NamedTuple):
    """Where insert put one module: the stage's spatial size (None when ``where`` names the
    modules), the block, the position (``"after block"``, ``"slot"`` or ``"after norm"``),
    the qualified name of the module it follows or the slot it fills, and the channels and
    spatial size of the map it sees."""

    stage: Optional[Tuple[int, ...]]
    block: str
    position: str
    target: str
    channels: int
    spatial: Tuple[int, ...]


def _apply_inserted_attention(module: nn.Module, inputs: Tuple[Tensor], output: Tensor) -> Tensor:
    return module.inserted_attention(output)


def _apply_inserted_attention_before(module: nn.Module, inputs: Tuple[Tensor]) -> Tuple[Tensor]:
    return (module.inserted_attention_before(inputs[0]),)


# --- one recorded forward -------------------------------------------------------------------


# A tensor as a module saw it: the tensor and its version counter, which in-place updates advance.
_State = Tuple[Optional[Tensor], Optional[int]]


def _state_of(value) -> _State:
    return (value, value._version) if isinstance(value, Tensor) else (None, None)


def _same(a: _State, b: _State) -> bool:
    """The same tensor with the same contents: one module's output handed on unchanged."""
    return a[0] is not None and a[0] is b[0] and a[1] == b[1]


class _Call:
    """A module's first call in the recorded forward: its order among the calls, its first
    positional input and its output, and how many times it ran."""

    __slots__ = ("order", "input", "output", "count")

    def __init__(self, order: int, first):
        self.order, self.count = order, 1
        self.input: _State = _state_of(first)
        self.output: _State = (None, None)


def _feature_map(output) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(channels, spatial size) of an (N, C, *S) output with 1 to 3 spatial dims and more than
    one position; None for anything else (vectors, logits, globally pooled maps)."""
    if not isinstance(output, Tensor) or not 3 <= output.dim() <= 5:
        return None
    spatial = tuple(output.shape[2:])
    return (output.shape[1], spatial) if math.prod(spatial) > 1 else None


def _default_input(model: nn.Module) -> Tensor:
    """One sample shaped for the model's first convolution, 64 positions per spatial dim."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]
            weight = module.weight
            return torch.randn((1, module.in_channels) + (_DEFAULT_SIZE,) * dims, device=weight.device, dtype=weight.dtype)
    raise ValueError("insert: the model has no convolution to infer an input from; pass example_input")


def _record(model: nn.Module, example_input) -> Dict[nn.Module, _Call]:
    """Every module's first call in one forward of example_input (eval mode, no gradients; the
    model's mode is restored). The recorded tensors are kept alive, so that no two of them
    share an id."""
    calls: Dict[nn.Module, _Call] = {}
    handles = []

    def before(module, inputs):
        if module in calls:
            calls[module].count += 1
        else:
            calls[module] = _Call(len(calls), inputs[0] if inputs else None)

    def after(module, _inputs, output):
        call = calls[module]
        if call.count == 1 and call.output[0] is None:
            call.output = _state_of(output)

    # The input as the module receives it, before any pre-hook (inserted attention) changes it;
    # the output after every hook.
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before, prepend=True))
        handles.append(module.register_forward_hook(after))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    except Exception as error:
        raise ValueError(f"insert: the model failed on example_input: {type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


# --- the model's structure, read from the recorded forward -----------------------------------


class _Structure:
    """Answers, from one recorded forward, which modules are containers to descend into, which
    are building blocks, and what each one outputs."""

    def __init__(self, model: nn.Module, calls: Dict[nn.Module, _Call]):
        self.model, self.calls = model, calls
        self._weighted: Dict[nn.Module, int] = {}

    def children(self, module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
        """Named children, inserted attention left out, with the members of a ModuleList or
        ModuleDict that is not called itself (its owner calls them) in its place."""
        found = []
        for name, child in module.named_children():
            if isinstance(child, AttentionAfter):  # inserted attention: not the model's own
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and child not in self.calls:
                found.extend(self.children(child, f"{prefix}{name}."))
            else:
                found.append((prefix + name, child))
        return found

    def called_children(self, module: nn.Module) -> List[Tuple[str, nn.Module]]:
        called = [(name, child) for name, child in self.children(module) if child in self.calls]
        return sorted(called, key=lambda item: self.calls[item[1]].order)

    def output_map(self, module: nn.Module):
        call = self.calls.get(module)
        return _feature_map(call.output[0]) if call is not None else None

    def is_chain(self, module: nn.Module) -> bool:
        """Its children run once each, in order, each on the previous one's output (the first
        on the module's input), and the module returns the last feature map among them; what
        runs after the last feature map (a classifier head) is free."""
        call = self.calls.get(module)
        children = self.called_children(module)
        if call is None or call.count != 1 or not children:
            return False
        if any(self.calls[child].count != 1 for _, child in children):
            return False
        last_map = max((i for i, (_, child) in enumerate(children) if self.output_map(child)), default=-1)
        handed_on = call.input
        for _, child in children[: last_map + 1]:
            if not _same(self.calls[child].input, handed_on):
                return False
            handed_on = self.calls[child].output
        return self.output_map(module) is None or (last_map >= 0 and _same(call.output, handed_on))

    def descendants(self, module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
        """The module and every module below it, inserted attention left out, with their
        qualified names under `prefix`."""
        found = [(prefix, module)]
        for name, child in self.children(module):
            found.extend(self.descendants(child, f"{prefix}.{name}" if prefix else name))
        return found

    def contains(self, module: nn.Module, kinds) -> bool:
        return any(isinstance(m, kinds) for _, m in self.descendants(module))

    def has_parameters(self, module: nn.Module) -> bool:
        return any(any(True for _ in m.parameters(recurse=False)) for _, m in self.descendants(module))

    def has_own_flow(self, module: nn.Module) -> bool:
        """Has children and is no chain of them: a residual block, a dense block, a gate."""
        return bool(self.children(module)) and not self.is_chain(module)

    def weighted_layers(self, module: nn.Module) -> int:
        """Convolutions and linear layers in the module, inserted attention left out."""
        if module not in self._weighted:
            own = 1 if isinstance(module, _WEIGHTED) else 0
            self._weighted[module] = own + sum(self.weighted_layers(child) for _, child in self.children(module))
        return self._weighted[module]

    def is_block(self, module: nn.Module) -> bool:
        """A building block: two or more weighted layers (residual blocks, inverted residuals,
        dense blocks), or one with a data flow of its own (not a chain of its children). A
        convolution with its normalization and activation, a pooling or a transition is a
        layer."""
        weighted = self.weighted_layers(module)
        return weighted >= 2 or (weighted == 1 and self.has_own_flow(module))

    def opens(self, module: nn.Module) -> bool:
        """Whether to descend into the module: a chain that is a plain ``nn.Sequential``
        holding modules with children or two or more weighted layers (a stage, VGG's
        features; not a convolution with its norm and activation), or a chain of blocks with
        their own data flow, or of containers of them (timm's ConvNeXtStage, RegStage)."""
        if not self.is_chain(module):
            return False
        children = [child for _, child in self.called_children(module)]
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            return any(self.children(child) for child in children) or self.weighted_layers(module) >= 2
        return all(self.has_own_flow(child) for child in children) or any(
            isinstance(child, nn.Sequential) and self.called_children(child)
            and all(self.has_own_flow(grandchild) for _, grandchild in self.called_children(child))
            for child in children
        )

    def units(self) -> List[Tuple[str, nn.Module]]:
        """The model as a sequence of the blocks and layers it runs, in call order: the root
        and every container found by `opens` replaced by their children."""
        found: List[Tuple[str, nn.Module]] = []

        def visit(qualified: str, module: nn.Module, root: bool):
            if root or self.opens(module):
                for name, child in self.called_children(module):
                    visit(f"{qualified}.{name}" if qualified else name, child, False)
            else:
                found.append((qualified, module))

        # The root is descended even when it is no chain: its children in call order.
        visit("", self.model, True)
        return found

    def stage_ends(self, layers: List[Tuple[str, nn.Module]]) -> List[str]:
        """The blocks of a resolution that has only layers (a stem alone at its resolution,
        VGG): each activation ends one, and so does the last layer with parameters (a
        convolution, a norm) after the last activation; poolings alone are one block, the
        pooling that made the resolution."""
        ends = [name for name, module in layers if self.contains(module, _ACTIVATIONS)]
        last_activation = max((i for i, (name, _) in enumerate(layers) if name in ends), default=-1)
        after = [name for name, module in layers[last_activation + 1:] if self.has_parameters(module)]
        ends += after[-1:]
        return ends or [layers[0][0]]


def find_stages(model: nn.Module, example_input=None) -> List[Stage]:
    """The model's stages: one per resolution of its feature pyramid, from high to low, found
    in one forward of `example_input` (default: one sample for the first convolution, 64
    positions per spatial dim).

    The model is descended through its containers (``nn.Sequential``, ``nn.ModuleList``,
    ``nn.ModuleDict``, and modules whose children run one after the other) down to its own
    building blocks; consecutive blocks whose outputs have one spatial size form a stage. Layers
    beside blocks at a resolution (a stem's convolution, a max pool, a head's 1x1 convolution)
    belong to no stage; a resolution that only layers reach (a stem alone at stride 2, VGG)
    is a stage of layers. A map of one position (after global pooling) is no stage, and
    neither is a resolution that is not lower than the one before it."""
    if example_input is None:
        example_input = _default_input(model)
    return _find_stages(_Structure(model, _record(model, example_input)))


def _find_stages(structure: _Structure) -> List[Stage]:
    groups: List[Tuple[Tuple[int, ...], List[Tuple[str, nn.Module]]]] = []
    for name, module in structure.units():
        found = structure.output_map(module)
        if found is None:
            continue
        if groups and groups[-1][0] == found[1]:
            groups[-1][1].append((name, module))
        elif not groups or math.prod(found[1]) < math.prod(groups[-1][0]):
            groups.append((found[1], [(name, module)]))
        # A resolution not lower than the last one (an upsampling head) is no stage.
    stages = []
    for spatial, members in groups:
        blocks = [name for name, module in members if structure.is_block(module)] or structure.stage_ends(members)
        channels = structure.output_map(dict(members)[blocks[-1]])[0]
        stages.append(Stage(tuple(blocks), channels, spatial))
    return stages


# --- where each module goes -------------------------------------------------------------------


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _place_in_block(structure: _Structure, name: str, block: nn.Module, stage) -> Tuple[Placement, Tensor]:
    """The block's empty attention slot; else, for a residual block of the zoos, after the last
    normalization of its residual branch; else after the block. A place is taken only when
    the recorded forward ran it once on a feature map."""
    for slot in _SLOTS:
        module = getattr(block, slot, None)
        if isinstance(module, (nn.Identity, AttentionAfter)) and _runs_once_on_a_map(structure, module):
            return _placement(structure, stage, name, "slot", f"{name}.{slot}", module)
    off_branch = _RESIDUAL_BLOCKS.get(_class_path(block))
    if off_branch is not None:
        norms = [
            (qualified, module)
            for child_name, child in structure.children(block) if child_name not in off_branch
            for qualified, module in structure.descendants(child, f"{name}.{child_name}")
            if isinstance(module, _NORMS) and module in structure.calls
        ]
        if norms:
            target, module = max(norms, key=lambda item: structure.calls[item[1]].order)
            if _runs_once_on_a_map(structure, module):
                return _placement(structure, stage, name, "after norm", target, module)
    return _place_after(structure, name, block, stage)


def _runs_once_on_a_map(structure: _Structure, module: nn.Module) -> bool:
    return structure.output_map(module) is not None and structure.calls[module].count == 1


def _placement(structure: _Structure, stage, block: str, position: str, target: str, module: nn.Module) -> Tuple[Placement, Tensor]:
    """The placement and the map its module will see (for its device and dtype)."""
    output = structure.calls[module].output[0]
    channels, spatial = _feature_map(output)
    return Placement(stage, block, position, target, channels, spatial), output


def _place_after(structure: _Structure, name: str, module: nn.Module, stage) -> Tuple[Placement, Tensor]:
    if structure.output_map(module) is None:
        raise ValueError(
            f"insert: module {name!r} does not produce a feature map (N, C, *S) with more than one position"
            + ("" if module in structure.calls else " (it did not run in the forward of example_input)")
        )
    if structure.calls[module].count != 1:
        raise ValueError(
            f"insert: module {name!r} runs {structure.calls[module].count} times in one forward; "
            "attention after it would run after each"
        )
    return _placement(structure, stage, name, "after block", name, module)


def _placements(model: nn.Module, where, example_input, per_block: bool) -> Tuple[List[Tuple[Placement, Tensor]], _Structure]:
    if isinstance(where, str):
        if where not in _WHERE:
            raise ValueError(f"insert: where must be one of {', '.join(map(repr, _WHERE))} or a list of module names, got {where!r}")
    elif not (isinstance(where, (list, tuple)) and all(isinstance(n, str) for n in where)):
        raise TypeError(f"insert: where must be 'shallow', 'deep', 'all' or a list of module names, got {type(where).__name__}")
    modules = dict(model.named_modules())
    if not isinstance(where, str):
        for name in where:
            if name == "" or name not in modules:
                raise ValueError(f"insert: the model has no module named {name!r}")
    structure = _Structure(model, _record(model, example_input))
    if isinstance(where, str):
        stages = _find_stages(structure)
        if not stages:
            raise ValueError("insert: the model produces no feature map with more than one position")
        chosen = {"shallow": stages[:1], "deep": stages[-1:], "all": stages}[where]
        blocks = [(s.spatial, name) for s in chosen for name in (s.blocks if per_block else s.blocks[-1:])]
    else:
        blocks = [(None, name) for name in where]
    place = _place_in_block if per_block else _place_after
    return [place(structure, name, modules[name], stage) for stage, name in blocks], structure


# --- changing the model ---------------------------------------------------------------------


def _factory(attention) -> Callable[[int, int], nn.Module]:
    """(channels, spatial dims) -> a new attention module."""
    if isinstance(attention, str):
        makers = {
            "channel": lambda c, d: ChannelAttention(c),
            "soft": lambda c, d: SoftAttention(spatial_dims=d),
            "hard": lambda c, d: HardAttention(mode="topk", keep_ratio=0.5, spatial_dims=d),
            "self": lambda c, d: SelfAttention(c),
            "cbam": lambda c, d: CBAM(c, spatial_dims=d),
        }
        if attention not in makers:
            raise ValueError(
                f"insert: attention must be one of {', '.join(map(repr, FAMILIES))} or a callable "
                f"channels -> nn.Module, got {attention!r}"
            )
        return makers[attention]
    if callable(attention):

        def make(channels: int, _dims: int) -> nn.Module:
            module = attention(channels)
            if not isinstance(module, nn.Module):
                raise TypeError(f"insert: attention({channels}) returned {type(module).__name__}, not an nn.Module")
            return module

        return make
    raise TypeError(f"insert: attention must be a family name or a callable channels -> nn.Module, got {type(attention).__name__}")


def _iterates_its_children(module: nn.Module) -> bool:
    """A container with a forward of its own (DenseNet's _DenseBlock): a child added to it would
    join the loop over its children."""
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and not (
        isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    )


def _consumer(structure: _Structure, module: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The first module, in call order, that takes `module`'s output unchanged as its input and
    can hold a child: where attention after a container that iterates its children goes, as a
    forward pre-hook."""
    output = structure.calls[module].output
    found = [
        (name, other) for name, other in structure.model.named_modules()
        if other in structure.calls and structure.calls[other].count == 1
        and _same(structure.calls[other].input, output)
        and not isinstance(other, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
    ]
    return min(found, key=lambda item: structure.calls[item[1]].order, default=None)


def _hold(target: nn.Module, name: str, attribute: str, module: nn.Module, hook) -> Callable[[], None]:
    """Appends `module` to target's AttentionAfter `attribute`, creating it with its hook."""
    holder = getattr(target, attribute, None)
    if isinstance(holder, AttentionAfter):
        holder.append(module)
        return lambda: holder.__delitem__(len(holder) - 1)
    if hasattr(target, attribute):
        raise ValueError(f"insert: module {name!r} already has an attribute {attribute!r}")
    setattr(target, attribute, AttentionAfter(module))
    register = target.register_forward_hook if attribute == _HOLDER else target.register_forward_pre_hook
    handle = register(hook)

    def undo():
        handle.remove()
        delattr(target, attribute)

    return undo


def _attach(model: nn.Module, structure: _Structure, placement: Placement, module: nn.Module) -> Callable[[], None]:
    """Puts `module` at `placement` and returns what undoes it."""
    target = model.get_submodule(placement.target)
    if placement.position == "slot" and not isinstance(target, AttentionAfter):
        parent_name, _, slot = placement.target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, slot, AttentionAfter(module))
        return lambda: setattr(parent, slot, target)
    if isinstance(target, AttentionAfter):
        target.append(module)
        return lambda: target.__delitem__(len(target) - 1)
    if isinstance(target, nn.Sequential) and type(target).forward is nn.Sequential.forward:
        if len(target) and isinstance(target[-1], AttentionAfter):
            holder = target[-1]
            holder.append(module)
            return lambda: holder.__delitem__(len(holder) - 1)
        target.append(AttentionAfter(module))
        return lambda: target.__delitem__(len(target) - 1)
    if _iterates_its_children(target):
        consumer = _consumer(structure, target)
        if consumer is None:
            raise ValueError(
                f"insert: module {placement.target!r} iterates its children and no module takes its output "
                "unchanged, so attention after it has no place"
            )
        return _hold(consumer[1], consumer[0], _HOLDER_BEFORE, module, _apply_inserted_attention_before)
    return _hold(target, placement.target, _HOLDER, module, _apply_inserted_attention)


def _verify(model: nn.Module, example_input, inserted: List[Tuple[Placement, nn.Module]]):
    """One more forward: every inserted module runs once, on the map its placement saw."""
    calls = _record(model, example_input)
    for placement, module in inserted:
        call = calls.get(module)
        seen = _feature_map(call.input[0]) if call is not None else None
        if call is None or call.count != 1 or seen != (placement.channels, placement.spatial):
            raise ValueError(
                f"insert: the module placed at {placement.target!r} ({placement.position}) did not run once on a "
                f"({placement.channels}, {placement.spatial}) map in the forward of example_input"
            )


def _report(placements: List[Placement]) -> str:
    rows = [("stage", "block", "position", "at", "channels", "spatial")]
    for p in placements:
        stage = "x".join(map(str, p.stage)) if p.stage is not None else "-"
        rows.append((stage, p.block, p.position, p.target, str(p.channels), "x".join(map(str, p.spatial))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def insert(
    model: nn.Module,
    attention: Union[str, Callable[[int], nn.Module]],
    where: Union[str, Sequence[str]] = "deep",
    example_input=None,
    per_block: bool = False,
    verbose: bool = False,
) -> nn.Module:
    """Insert attention into `model` (in place) and return it.

    Args:
        model: any ``nn.Module`` CNN: a torchvision or timm model, a plain ``nn.Sequential``,
            or one this function already changed.
        attention: ``"channel"`` (``ChannelAttention``), ``"soft"`` (``SoftAttention``),
            ``"hard"`` (``HardAttention``, top-k keeping half the positions), ``"self"``
            (``SelfAttention``, starting as the identity), ``"cbam"`` (``CBAM``), or a callable
            ``channels -> nn.Module``.
        where: ``"shallow"`` (after the last block of the highest-resolution stage of
            ``find_stages``), ``"deep"`` (of the lowest-resolution stage), ``"all"`` (of every
            stage), or a list of qualified module names, nested ones included.
        example_input: what the model takes, for one forward that finds the stages and checks
            every placement (default: one sample for the first convolution, 64 positions per
            spatial dim).
        per_block: put a module into every block of the chosen stages (with a list of names:
            into each named block) instead of after the stage: in the block's empty attention
            slot (timm's ``se``/``attn`` holding ``nn.Identity``); for the zoos' residual blocks
            (torchvision and timm BasicBlock/Bottleneck, torchvision MBConv/FusedMBConv,
            InvertedResidual, ResBottleneckBlock, timm's EfficientNet blocks) after the last
            normalization of the residual branch, before the addition; otherwise after the
            block.
        verbose: print a table of where each module went (stage, block, position, the module
            it follows or the slot it fills, channels, spatial size).

    Every module sees an ``(N, C, *S)`` map and is built for its ``C`` (and spatial dims), with
    the device and dtype of that map. The model's own state dict keys do not change; only the
    new modules' keys are added (under ``<module>.inserted_attention``, ``<sequential>.<n>`` or
    ``<block>.<slot>``). The result scripts, compiles and exports. On any error the model is
    left unchanged.
    """
    make = _factory(attention)
    if example_input is None:
        example_input = _default_input(model)
    placements, structure = _placements(model, where, example_input, per_block)
    # Build every module first, so that a failing factory leaves the model unchanged.
    built = []
    for placement, like in placements:
        module = make(placement.channels, len(placement.spatial))
        built.append((placement, module.to(device=like.device, dtype=like.dtype if like.is_floating_point() else None)))
    undo = []
    try:
        for placement, module in built:
            undo.append(_attach(model, structure, placement, module))
        _verify(model, example_input, built)
    except Exception:
        for step in reversed(undo):
            step()
        raise
    if verbose:
        print(_report([placement for placement, _ in built]))
    return model
