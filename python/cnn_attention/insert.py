"""Put attention into a CNN you already have: at its shallow stage (high resolution: edges,
textures), its deep stage (low resolution: parts, objects), every stage, or right after
modules you name."""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .modules import CBAM, ChannelAttention, HardAttention, SelfAttention, SoftAttention

__all__ = ["insert", "find_stages", "AttentionAfter", "Stage", "FAMILIES"]

FAMILIES = ("channel", "soft", "hard", "self", "cbam")
_WHERE = ("shallow", "deep", "all")
_DEFAULT_SIZE = 64  # spatial size of the default example input, per dim


class AttentionAfter(nn.Sequential):
    """A block followed by the attention modules inserted after it: ``(block, attention,
    ...)``. Inserting again after the same block appends to it."""


class Stage(NamedTuple):
    """A maximal run of consecutive top-level blocks whose outputs are feature maps of one
    spatial size: the blocks' names, the last block's output channels, the spatial size."""

    blocks: Tuple[str, ...]
    channels: int
    spatial: Tuple[int, ...]


def _feature_map(output) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(channels, spatial size) of an (N, C, *S) output with 1 to 3 spatial dims and more than
    one position; None for anything else (vectors, logits, globally pooled maps)."""
    if not isinstance(output, Tensor) or not 3 <= output.dim() <= 5:
        return None
    spatial = tuple(output.shape[2:])
    positions = 1
    for size in spatial:
        positions *= size
    return (output.shape[1], spatial) if positions > 1 else None


def _default_input(model: nn.Module) -> Tensor:
    """One sample shaped for the model's first convolution, 64 positions per spatial dim."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]
            weight = module.weight
            return torch.randn((1, module.in_channels) + (_DEFAULT_SIZE,) * dims, device=weight.device, dtype=weight.dtype)
    raise ValueError("insert: the model has no convolution to infer an input from; pass example_input")


def _run_recording(model: nn.Module, example_input, names: Sequence[str]) -> Dict[str, object]:
    """The outputs of the modules `names` in one forward of example_input (eval mode, no
    gradients; the model's mode is restored)."""
    outputs: Dict[str, object] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def record(_module, _inputs, output, name=name):
            outputs.setdefault(name, output)

        handles.append(module.register_forward_hook(record))
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
    return outputs


def find_stages(model: nn.Module, example_input=None) -> List[Stage]:
    """The model's stages, from its own feature maps in one forward of `example_input`
    (default: one sample for the first convolution, 64 positions per spatial dim): maximal
    runs of consecutive top-level blocks whose outputs are feature maps of one spatial size.
    A map of one position (after global pooling) is no stage."""
    return _stages_and_outputs(model, example_input)[0]


def _stages_and_outputs(model: nn.Module, example_input) -> Tuple[List[Stage], Dict[str, object]]:
    if example_input is None:
        example_input = _default_input(model)
    names = [name for name, _ in model.named_children()]
    outputs = _run_recording(model, example_input, names)
    stages: List[Stage] = []
    run: List[str] = []
    run_map: Optional[Tuple[int, Tuple[int, ...]]] = None
    for name in names:
        found = _feature_map(outputs.get(name))
        if found is not None and run and run_map is not None and found[1] == run_map[1]:
            run.append(name)
            run_map = found
            continue
        if run and run_map is not None:
            stages.append(Stage(tuple(run), run_map[0], run_map[1]))
        run, run_map = ([name], found) if found is not None else ([], None)
    if run and run_map is not None:
        stages.append(Stage(tuple(run), run_map[0], run_map[1]))
    return stages, outputs


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


def _targets(model: nn.Module, where, example_input) -> List[Tuple[str, int, int, Tensor]]:
    """(qualified name, output channels, spatial dims, output) of every module to insert
    after."""
    if isinstance(where, str):
        if where not in _WHERE:
            raise ValueError(f"insert: where must be one of {', '.join(map(repr, _WHERE))} or a list of module names, got {where!r}")
        stages, outputs = _stages_and_outputs(model, example_input)
        if not stages:
            raise ValueError("insert: the model produces no feature map with more than one position at its top level")
        if where == "shallow":
            # The highest resolution; the first such stage on a tie.
            chosen = [max(stages, key=lambda s: _positions(s.spatial))]
        elif where == "deep":
            lowest = min(_positions(s.spatial) for s in stages)
            chosen = [[s for s in stages if _positions(s.spatial) == lowest][-1]]
        else:
            chosen = stages
        return [(s.blocks[-1], s.channels, len(s.spatial), outputs[s.blocks[-1]]) for s in chosen]
    if isinstance(where, (list, tuple)) and all(isinstance(n, str) for n in where):
        modules = dict(model.named_modules())
        for name in where:
            if name == "" or name not in modules:
                raise ValueError(f"insert: the model has no module named {name!r}")
        if example_input is None:
            example_input = _default_input(model)
        outputs = _run_recording(model, example_input, list(where))
        targets = []
        for name in where:
            found = _feature_map(outputs.get(name))
            if found is None:
                raise ValueError(
                    f"insert: module {name!r} does not produce a feature map (N, C, *S) with more than one position"
                    + ("" if name in outputs else " (it did not run in the forward of example_input)")
                )
            targets.append((name, found[0], len(found[1]), outputs[name]))
        return targets
    raise TypeError(f"insert: where must be 'shallow', 'deep', 'all' or a list of module names, got {type(where).__name__}")


def _positions(spatial: Tuple[int, ...]) -> int:
    count = 1
    for size in spatial:
        count *= size
    return count


def insert(model: nn.Module, attention: Union[str, Callable[[int], nn.Module]], where="deep", example_input=None) -> nn.Module:
    """Insert attention into `model` (in place) and return it.

    Args:
        model: any ``nn.Module`` CNN: a plain ``nn.Sequential``, a model with named stages
            (ResNet-like ``layer1``..``layer4``), or one this function already changed.
        attention: ``"channel"`` (``ChannelAttention``), ``"soft"`` (``SoftAttention``),
            ``"hard"`` (``HardAttention``, top-k keeping half the positions), ``"self"``
            (``SelfAttention``, starting as the identity), ``"cbam"`` (``CBAM``), or a callable
            ``channels -> nn.Module``.
        where: ``"shallow"`` (after the last block of the highest-resolution stage),
            ``"deep"`` (of the lowest-resolution stage), ``"all"`` (after every stage), or a
            list of qualified module names (right after each, with its output channels).
        example_input: what the model takes, for one forward that finds the stages (default:
            one sample for the first convolution, 64 positions per spatial dim).

    The block ``name`` becomes ``AttentionAfter(block, attention)`` (``name.0`` is the block,
    ``name.1`` the attention); the new modules take the device and dtype of the block's output. The result
    scripts, compiles and exports. On any error the model is left unchanged.
    """
    make = _factory(attention)
    targets = _targets(model, where, example_input)
    # Build every module first, so that a failing factory leaves the model unchanged.
    built = []
    for name, channels, dims, output in targets:
        dtype = output.dtype if output.is_floating_point() else None
        module = make(channels, dims).to(device=output.device, dtype=dtype)
        built.append((name, module))
    for name, module in built:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        block = getattr(parent, child_name)
        if isinstance(block, AttentionAfter):
            block.append(module)
        else:
            setattr(parent, child_name, AttentionAfter(block, module))
    return model
