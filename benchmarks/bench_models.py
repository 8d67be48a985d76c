"""Whole networks with attention, side by side in one run (median and minimum of interleaved
rounds; a training step is forward, backward and an SGD step):

- ``--table zoo``: models of torchvision and timm that contain attention blocks, as they are
  (eager), after ``cnn_attention.convert``, ``torch.compile`` of the eager model, and the same
  architecture with its attention blocks replaced by identities; the attention's cost (time
  with it minus time without) and how much of it conversion removes.
- ``--table blocks``: the same models' attention blocks one by one, at the shapes the network
  gives them: each eager block against its converted module, forward and forward+backward,
  summed over the network's blocks (what conversion saves without the rest of the network).
- ``--table families``: timm's ResNet-50 without attention, with each family put in by
  ``cnn_attention.insert`` where the papers put it, and with timm's own eager SE and CBAM
  blocks in the same places; the cost over the plain network. Two reference modules in the
  same places (a copy of x, and x times its mean over positions) show what writing a new map,
  and reading x once more, cost inside the network.
- ``--table stages``: the families put in every bottleneck (ours, timm's SE and CBAM, the
  references), each module timed inside the network during inference (forward hooks; median
  per call over the rounds, by stage) and summed over the network's 16 modules: what each
  costs where its input comes from the layer before it rather than from a benchmark's cache.
  With ``--warm-parameters`` each module's parameters are read just before its timed call.
- ``--table profile``: where the time of a training step of ResNet-50 with our CBAM goes
  (torch.profiler, self CPU time per step): each of our operators, the score head's
  convolution, and the whole step; then our operators per call by input shape.

    python benchmarks/bench_models.py                       # every table, CPU, batch 8, 128x128
    python benchmarks/bench_models.py --table zoo --no-compile
    python benchmarks/bench_models.py --batch 4 --size 224 --repeat 5 --device cuda
"""

import argparse
import copy
import os
import random
import statistics
import sys
import time

import timm
import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import cnn_attention  # noqa: E402
from common import interleaved_ms, measure_all, sync  # noqa: E402
from cnn_attention.convert import recognised_blocks  # noqa: E402


def resnet50(attn_layer=None) -> nn.Module:
    return timm.create_model("resnet50", block_args=dict(attn_layer=attn_layer) if attn_layer else None)


def bottlenecks(model: nn.Module) -> list:
    """The qualified names of the residual blocks of layer1 to layer4: where timm's own SE and
    CBAM sit (``where="all"`` would also put a module after the stem)."""
    return [name for name, module in model.named_modules() if isinstance(module, timm.models.resnet.Bottleneck)]


def inserted(family, where, per_block: bool, size: int):
    """`family` and `where` as ``insert`` takes them (`where` also as a callable from the model to it)."""

    def make() -> nn.Module:
        model = resnet50()
        places = where(model) if callable(where) else where
        cnn_attention.insert(model, family, places, torch.randn(1, 3, size, size), per_block=per_block)
        return model

    return make


class Copy(nn.Module):
    """A reference, not attention: the cost of any module that writes a new map of x's size."""

    def forward(self, x):
        return x * 1.0


class MeanScale(nn.Module):
    """A reference, not attention: one pass that reads x (its mean over positions), one that
    writes x times it; no parameters."""

    def forward(self, x):
        return x * x.mean(tuple(range(2, x.dim())), keepdim=True)


def configurations(size: int):
    """(name, where the attention is, factory)."""
    return [
        ("none", "-", resnet50),
        ("x * 1 (a copy; reference)", "every bottleneck, after bn3",
         inserted(lambda channels: Copy(), bottlenecks, True, size)),
        ("x * mean (reference)", "every bottleneck, after bn3",
         inserted(lambda channels: MeanScale(), bottlenecks, True, size)),
        ("channel (ours)", "every bottleneck, after bn3", inserted("channel", bottlenecks, True, size)),
        ("SE (timm eager)", "every bottleneck, after bn3", lambda: resnet50("se")),
        ("cbam (ours)", "every bottleneck, after bn3", inserted("cbam", bottlenecks, True, size)),
        ("CBAM (timm eager)", "every bottleneck, after bn3", lambda: resnet50("cbam")),
        ("soft (ours)", "every bottleneck, after bn3", inserted("soft", bottlenecks, True, size)),
        ("hard (ours)", "layer4's bottlenecks, after bn3", inserted("hard", "deep", True, size)),
        ("self (ours)", "after layer4 (non-local block)", inserted("self", "deep", False, size)),
    ]


def zoo_models(only: str = ""):
    """(name, factory) of the models the zoo and blocks tables run, those whose names contain
    `only`."""
    models = [
        ("timm seresnet50", lambda: timm.create_model("seresnet50")),
        ("timm resnet50 + CBAM", lambda: resnet50("cbam")),
        ("timm efficientnet_b0", lambda: timm.create_model("efficientnet_b0")),
        ("timm mobilenetv3_large_100", lambda: timm.create_model("mobilenetv3_large_100")),
        ("torchvision efficientnet_b0", lambda: torchvision.models.efficientnet_b0()),
    ]
    return [(name, make) for name, make in models if only in name]


def without_attention(model: nn.Module) -> nn.Module:
    """The same network with every recognised attention block replaced by an identity."""
    blocks = tuple(recognised_blocks())
    for name, module in list(model.named_modules()):
        if isinstance(module, blocks):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return model


def timed_pair(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    """(training step, inference) closures of `model`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    return step, infer


def zoo_table(args, x, labels):
    print(f"### Converted zoo models: batch {args.batch}, {args.size}x{args.size}, {x.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median / min of {args.repeat} interleaved rounds")
    print()
    print("| model | phase | no attention ms | eager ms | converted ms | torch.compile(eager) ms | attention cost eager "
          "| cost converted | cost removed | converted / eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, make in zoo_models(args.models):
        torch.manual_seed(0)
        eager = make().to(args.device)
        variants = {
            "none": without_attention(copy.deepcopy(eager)),
            "eager": eager,
            "converted": cnn_attention.convert(copy.deepcopy(eager)),
        }
        compile_note = "skipped (--no-compile)"
        if not args.no_compile:
            compiled = torch.compile(copy.deepcopy(eager))
            start = time.perf_counter()
            for fn in timed_pair(compiled, x, labels):
                fn()  # compiles the training and the inference graphs once
            compile_note = f"compiled in {time.perf_counter() - start:.0f} s"
            variants["compile"] = compiled
        pairs = {key: timed_pair(model, x, labels) for key, model in variants.items()}
        for phase, index in (("training step", 0), ("inference", 1)):
            ms = interleaved_ms({key: pair[index] for key, pair in pairs.items()}, args.device, args.repeat, warmup=2)
            none, eager_ms, converted = ms["none"][0], ms["eager"][0], ms["converted"][0]
            cost_eager, cost_converted = eager_ms - none, converted - none
            removed = f"{100 * (1 - cost_converted / cost_eager):.0f}%" if cost_eager > 0 else "n/a"
            compiled_ms = f"{ms['compile'][0]:.0f} / {ms['compile'][1]:.0f}" if "compile" in ms else "-"

            def both(key):
                return f"{ms[key][0]:.0f} / {ms[key][1]:.0f}"

            print(f"| {name} | {phase} | {both('none')} | {both('eager')} | {both('converted')} | {compiled_ms} | "
                  f"{cost_eager:+.0f} ms ({100 * cost_eager / none:+.1f}%) | {cost_converted:+.0f} ms "
                  f"({100 * cost_converted / none:+.1f}%) | {removed} | {eager_ms / converted:.2f}x |")
        print(f"<!-- {name}: torch.compile {compile_note} -->")
    print()


def blocks_table(args, x, labels):
    print(f"### Converted blocks at their shapes in the network: batch {args.batch}, {args.size}x{args.size}, "
          f"{x.dtype}, {args.device}, {torch.get_num_threads()} threads; sums over each model's blocks of the "
          f"median of {args.repeat} interleaved rounds")
    print()
    print("| model | blocks | forward eager ms | forward converted ms | fwd+bwd eager ms | fwd+bwd converted ms |")
    print("|---|---|---|---|---|---|")
    for name, make in zoo_models(args.models):
        torch.manual_seed(0)
        model = make().to(args.device).eval()
        inputs = []
        blocks = tuple(recognised_blocks())
        hooks = [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0].detach())))
                 for m in model.modules() if isinstance(m, blocks)]
        with torch.no_grad():
            model(x)
        for hook in hooks:
            hook.remove()
        totals = {"eager": [0.0, 0.0], "converted": [0.0, 0.0]}
        for block, block_input in inputs:
            candidates = {"eager": block, "converted": cnn_attention.convert(nn.Sequential(copy.deepcopy(block)))[0]}
            times = measure_all(candidates, block_input, torch.randn_like(block_input), args.device, args.repeat)
            for key, (forward, forward_backward) in times.items():
                totals[key][0] += forward[0]
                totals[key][1] += forward_backward[0]
        print(f"| {name} | {len(inputs)} | {totals['eager'][0]:.1f} | {totals['converted'][0]:.1f} | "
              f"{totals['eager'][1]:.1f} | {totals['converted'][1]:.1f} |")
    print()


def families_table(args, x, labels):
    models, training, inference, places = {}, {}, {}, {}
    for name, where, make in configurations(args.size):
        model = make().to(args.device)
        models[name], places[name] = model, where
        training[name], inference[name] = timed_pair(model, x, labels)
    train_ms = interleaved_ms(training, args.device, args.repeat, warmup=2)
    infer_ms = interleaved_ms(inference, args.device, args.repeat, warmup=2)
    print(f"### Every family in timm resnet50: batch {args.batch}, {args.size}x{args.size}, float32, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; median / min of {args.repeat} interleaved rounds")
    print()
    print("| attention | where | parameters | training step ms | over none (median / min) | inference ms | "
          "over none (median / min) |")
    print("|---|---|---|---|---|---|---|")
    (base_train, base_train_min), (base_infer, base_infer_min) = train_ms["none"], infer_ms["none"]
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        (tm, tmin), (im, imin) = train_ms[name], infer_ms[name]
        print(f"| {name} | {places[name]} | {params / 1e6:.2f} M | {tm:.0f} / {tmin:.0f} | "
              f"{100 * (tm / base_train - 1):+.1f}% / {100 * (tmin / base_train_min - 1):+.1f}% | "
              f"{im:.0f} / {imin:.0f} | {100 * (im / base_infer - 1):+.1f}% / {100 * (imin / base_infer_min - 1):+.1f}% |")
    print()


# The classes of the modules that the families table puts in every bottleneck.
BOTTLENECK_MODULES = ("ChannelAttention", "CBAM", "SoftAttention", "SEModule", "CbamModule", "Copy", "MeanScale")


def stages_table(args, x, labels):
    models, calls = {}, {}
    for name, where, make in configurations(args.size):
        if not where.startswith("every bottleneck"):
            continue
        torch.manual_seed(0)
        model = make().to(args.device).eval()
        times = calls[name] = {}

        def start(module, inputs):
            if args.warm_parameters:
                for parameter in module.parameters():
                    parameter.sum()
            sync(args.device)
            module.started = time.perf_counter()

        def stop(module, inputs, output, times=times):
            sync(args.device)
            times.setdefault(inputs[0].shape[1], []).append((time.perf_counter() - module.started) * 1e3)

        for module in model.modules():
            if type(module).__name__ in BOTTLENECK_MODULES:
                module.register_forward_pre_hook(start)
                module.register_forward_hook(stop)
        models[name] = model
    order = list(models)
    shuffle = random.Random(0).shuffle
    with torch.no_grad():
        for round_index in range(args.repeat + 2):
            if round_index == 2:  # the first two rounds warm up
                for times in calls.values():
                    times.clear()
            shuffle(order)
            for name in order:
                models[name](x)
    stages = sorted(next(iter(calls.values())))
    print(f"### The modules in every bottleneck of timm resnet50, timed inside the network during inference: batch "
          f"{args.batch}, {args.size}x{args.size}, float32, {args.device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; median ms per call over {args.repeat} interleaved rounds, by the stage's channels, "
          f"and their sum over the network's modules"
          + ("; each module's parameters read just before its call, outside the timed part" if args.warm_parameters
             else ""))
    print()
    print("| module | " + " | ".join(f"C = {c} ({len(calls[order[0]][c]) // args.repeat} calls)" for c in stages)
          + " | all modules per inference |")
    print("|---|" + "---|" * (len(stages) + 1))
    for name, times in calls.items():
        medians = {c: statistics.median(times[c]) for c in stages}
        total = sum(medians[c] * len(times[c]) / args.repeat for c in stages)
        print(f"| {name} | " + " | ".join(f"{medians[c]:.3f}" for c in stages) + f" | {total:.2f} |")
    print()


def is_score_head_convolution(event) -> bool:
    """A convolution event of the score head: one of its inputs is a (1, 2, k, ...) weight."""
    return "convolution" in event.key and any(len(shape) >= 3 and shape[:2] == [1, 2] for shape in event.input_shapes)


def profile_table(args, x, labels):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = inserted("cbam", bottlenecks, True, args.size)().to(args.device)
    step, _ = timed_pair(model, x, labels)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.repeat):
            step()
    groups, calls = {}, []
    total = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3 / args.repeat
        total += ms
        if event.key.startswith("cnn_attention::"):
            group = event.key
            calls.append((event.key, tuple(event.input_shapes[0]), event.count // args.repeat,
                          event.self_cpu_time_total / 1e3 / event.count))
        elif is_score_head_convolution(event):
            group = "score head convolution (" + event.key + ")"
        else:
            continue
        groups[group] = groups.get(group, 0.0) + ms
    print(f"### Where a training step of timm resnet50 with our CBAM in every bottleneck goes: batch {args.batch}, "
          f"{args.size}x{args.size}, float32, {args.device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; torch.profiler self CPU time, mean per step of {args.repeat} steps")
    print()
    print("| operator | ms per step | share of the step |")
    print("|---|---|---|")
    for group, ms in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"| {group} | {ms:.1f} | {100 * ms / total:.1f}% |")
    attention = sum(groups.values())
    print(f"| all of the above | {attention:.1f} | {100 * attention / total:.1f}% |")
    print(f"| the whole step | {total:.1f} | 100% |")
    print()
    print("Our operators per call, by the shape of their first input:")
    print()
    print("| operator | first input | calls per step | ms per call |")
    print("|---|---|---|---|")
    for key, shape, count, ms in sorted(calls):
        print(f"| {key} | {shape} | {count} | {ms:.3f} |")
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["zoo", "blocks", "families", "stages", "profile", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the eager models")
    parser.add_argument("--models", default="", help="only the zoo models whose names contain this text")
    parser.add_argument("--warm-parameters", action="store_true",
                        help="stages table: read each module's parameters just before its timed call (what the "
                             "parameters' trip from memory costs inside the network is the difference)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    labels = torch.randint(0, 1000, (args.batch,), device=args.device)
    if args.table in ("zoo", "all"):
        zoo_table(args, x, labels)
    if args.table in ("blocks", "all"):
        blocks_table(args, x, labels)
    if args.table in ("families", "all"):
        families_table(args, x, labels)
    if args.table in ("stages", "all"):
        stages_table(args, x, labels)
    if args.table in ("profile", "all"):
        profile_table(args, x, labels)


if __name__ == "__main__":
    main()
