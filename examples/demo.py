"""The main job (`make demo`): attention where it matters, on cluttered digits.

scikit-learn's handwritten digits, enlarged and placed at random on a 64x64 canvas strewn
with fragments of other digits (examples/cluttered_digits.py; no download, fixed seeds, split
by source image). The same small CNN is trained without attention, with CBAM at its shallow
stage (64x64: where the digit is), with self attention at its deep stage (8x8: how its parts
relate) and with both, placed by cnn_attention.insert. Each is trained with several seeds
(the seed sets the initial weights and the order of the training images; the dataset stays
the same): after a few epochs accuracy varies from seed to seed, and a difference between
configurations means something only next to that spread. Training uses a one-cycle learning
rate (warm-up, then cosine down to almost 0) and ends by recomputing the BatchNorm statistics
over the training images, so that eval mode normalises as the final weights were trained to
expect (with running averages that trail the weights, a model can collapse in eval mode).

The demo prints a table of test accuracy over the seeds (mean, standard deviation, range),
parameters and time per epoch, draws the attention maps of a model with both over test
images, then scripts the first-seed model of the best configuration with attention and
checks that a fresh Python process and the C++ example program (no Python) reproduce its
outputs, as does the C++ example running the model exported with torch.export and compiled
by AOTInductor. Last, it converts a model of the timm zoo (ResNet-26 with timm's CBAM blocks,
random weights) with cnn_attention.convert, checks that its outputs and gradients match, and
times its training step before and after.

    python examples/demo.py --out out/demo [--epochs 2] [--seeds 3] [--cpp-runner build/cmake/run_model]
"""

import argparse
import copy
import json
import statistics
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings

import torch
from torch import nn
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cnn_attention  # noqa: E402
from cnn_attention.viz import draw_attention_maps  # noqa: E402
from cluttered_digits import CLASSES, cluttered_digits, recalibrate_batch_norm, small_cnn  # noqa: E402

VARIANTS = {
    "none": "no attention",
    "shallow": "CBAM after the 64x64 stage",
    "deep": "self attention after the 8x8 stage",
    "both": "CBAM at 64x64 and self attention at 8x8",
}


# Eval mode on training images this far below batch statistics on the same images means the
# BatchNorm statistics do not match the weights (the collapse that recalibration prevents).
COLLAPSE_GAP = 0.05
# Training images whose eval-mode accuracy is compared with batch statistics (a sample keeps
# the check cheap; the comparison needs no more).
COLLAPSE_CHECK_IMAGES = 1024


def build(variant: str, example: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # initial weights, attention modules included
    model = small_cnn()
    if variant in ("shallow", "both"):
        cnn_attention.insert(model, "cbam", "shallow", example)
    if variant in ("deep", "both"):
        cnn_attention.insert(model, "self", "deep", example)
    return model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, max_lr: float,
          seed: int, name: str) -> float:
    """Adam with a one-cycle schedule, stepped per batch; returns seconds per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=max_lr)
    # Warm-up over the first 30% of the steps, then cosine annealing to max_lr / 2.5e5: the
    # last steps barely move the weights, so the recalibrated BatchNorm statistics fit them.
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=math.ceil(len(x) / batch))
    generator = torch.Generator().manual_seed(seed)  # order of the training images
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        with tqdm(range(0, len(x), batch), desc=f"{name:>12} epoch {epoch + 1}/{epochs}", unit="batch",
                  dynamic_ncols=True, leave=False) as bar:
            for first in bar:
                index = order[first : first + batch]
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return (time.perf_counter() - start) / epochs


def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return (predicted == labels).float().mean().item()


def spread(values: list) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    tensor = torch.tensor(values, dtype=torch.float64)
    std = tensor.std().item() if len(values) > 1 else 0.0
    return {"mean": round(tensor.mean().item(), 4), "std": round(std, 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "per_seed": [round(v, 4) for v in values]}


def convert_zoo_model(batch: int = 8, size: int = 128, rounds: int = 5) -> dict:
    """timm's ResNet-26 with CBAM in every block, converted: outputs and gradients against the
    eager model, and the training step's median time over interleaved rounds."""
    import timm

    torch.manual_seed(0)
    # zero_init_last=False: timm would start every residual branch, the CBAM blocks' input, at 0.
    eager = timm.create_model("resnet26", block_args=dict(attn_layer="cbam"), zero_init_last=False)
    converted = cnn_attention.convert(copy.deepcopy(eager))
    x, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(x)
        nn.functional.cross_entropy(out, labels).backward()
        return out.detach(), [p.grad for p in model.parameters()]

    out_eager, grads_eager = step(eager)
    out_converted, grads_converted = step(converted)
    # The eager model against itself on one thread: its convolutions' sums split by thread
    # count (on an AMD EPYC its gradients moved by 1.8e-3 of the largest), the noise floor of
    # the comparison.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _, grads_one_thread = step(eager)
    torch.set_num_threads(threads)
    output_diff = (out_converted - out_eager).abs().max().item() / out_eager.abs().max().item()
    # Relative to the largest gradient: a gradient that is a sum with much cancellation (a
    # BatchNorm bias) is small, and its rounding is that of its terms.
    largest = max(b.abs().max().item() for b in grads_eager)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads_converted, grads_eager)) / largest
    eager_spread = max((a - b).abs().max().item() for a, b in zip(grads_one_thread, grads_eager)) / largest
    times = {"eager": [], "converted": []}
    for _ in range(rounds):
        for name, model in (("eager", eager), ("converted", converted)):
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
    eager_ms, converted_ms = (1e3 * statistics.median(times[n]) for n in ("eager", "converted"))
    return {"model": "timm resnet26, attn_layer=cbam", "batch": batch, "size": size,
            "max_relative_output_diff": output_diff, "max_relative_gradient_diff": grad_diff,
            "eager_relative_gradient_spread": eager_spread,
            "training_step_ms_eager": round(eager_ms, 1), "training_step_ms_converted": round(converted_ms, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="training runs per configuration (seeds 0, 1, ...)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-lr", type=float, default=8e-3, help="peak of the one-cycle learning rate")
    parser.add_argument("--cpp-runner", default=os.path.join(ROOT, "build", "cmake", "run_model"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_flush_denormal(True)  # tiny late-training gradients must not hit the slow path
    print(f"cnn_attention {cnn_attention.build_info()}")
    (train_x, train_y), (test_x, test_y) = cluttered_digits()
    print(f"cluttered digits: {len(train_x)} training and {len(test_x)} test images of 64x64, "
          f"{CLASSES} classes (chance {1 / CLASSES:.2f})")

    seeds = list(range(args.seeds))
    # BatchNorm recalibration sees the training images shuffled, as training does (in dataset
    # order each batch holds a few source digits three times over). Its first images are also
    # the collapse check's, the same for every run.
    shuffled = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
    calibration_images = train_x[shuffled]
    check_images, check_labels = calibration_images[:COLLAPSE_CHECK_IMAGES], train_y[shuffled[:COLLAPSE_CHECK_IMAGES]]
    results, first_models, collapsed = {}, {}, []
    for variant, description in VARIANTS.items():
        runs = []
        for seed in seeds:
            model = build(variant, test_x[:1], seed)
            seconds = train(model, train_x, train_y, args.epochs, args.batch, args.max_lr, seed,
                            f"{variant} seed {seed}")
            with_batch_statistics = recalibrate_batch_norm(model, calibration_images, args.batch)
            run = {
                "seed": seed,
                "seconds_per_epoch": round(seconds, 2),
                "test_accuracy": round(accuracy(predict(model, test_x), test_y), 4),
                # The same training images with batch statistics (as trained) and in eval mode
                # (running statistics): far apart means eval mode has collapsed.
                "train_accuracy_batch_statistics": round(
                    accuracy(with_batch_statistics[:COLLAPSE_CHECK_IMAGES].argmax(1), check_labels), 4),
                "train_accuracy_eval": round(accuracy(predict(model, check_images), check_labels), 4),
            }
            runs.append(run)
            if run["train_accuracy_batch_statistics"] - run["train_accuracy_eval"] > COLLAPSE_GAP:
                collapsed.append(f"{variant} seed {seed}")
            if seed == seeds[0]:
                first_models[variant] = model.eval()
            print(f"{variant:>7} seed {seed}: test accuracy {run['test_accuracy']:.3f}, training images "
                  f"{run['train_accuracy_batch_statistics']:.3f} with batch statistics and "
                  f"{run['train_accuracy_eval']:.3f} in eval mode, {seconds:.1f} s per epoch")
        results[variant] = {
            "attention": description,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds_per_epoch": round(sum(r["seconds_per_epoch"] for r in runs) / len(runs), 2),
            "test_accuracy": spread([r["test_accuracy"] for r in runs]),
            "runs": runs,
        }
    print()
    print(f"Test accuracy over seeds {', '.join(map(str, seeds))} (epochs: {args.epochs}): mean ± sample standard "
          "deviation, and the range")
    print()
    print("| model | attention | parameters | s / epoch | test accuracy | min..max |")
    print("|---|---|---|---|---|---|")
    for variant, r in results.items():
        a = r["test_accuracy"]
        print(f"| {variant} | {r['attention']} | {r['parameters']} | {r['seconds_per_epoch']:.1f} | "
              f"{a['mean']:.3f} ± {a['std']:.3f} | {a['min']:.3f}..{a['max']:.3f} |")
    print()
    if collapsed:
        print(f"COLLAPSE: eval mode is more than {COLLAPSE_GAP} below batch statistics on training images "
              f"for {', '.join(collapsed)}")

    # What the attention looks at: the maps of the model with both, over test images.
    maps = cnn_attention.attention_maps(first_models["both"], test_x[:4])
    drawn = draw_attention_maps(maps, test_x[:4], os.path.join(args.out, "maps"), samples=4)
    print("attention maps: " + ", ".join(os.path.relpath(p, args.out) for p in drawn))

    # The export checks are there to run the attention operators outside eager Python, so the
    # model exported is that of the best configuration with attention, by mean over the seeds:
    # its first seed's model, not the luckiest.
    best_overall = max(results, key=lambda v: results[v]["test_accuracy"]["mean"])
    best = max((v for v in results if v != "none"), key=lambda v: results[v]["test_accuracy"]["mean"])
    model = first_models[best]
    print(f"best: {best_overall} (mean {results[best_overall]['test_accuracy']['mean']:.3f}); best with attention: "
          f"{best} (mean {results[best]['test_accuracy']['mean']:.3f}); exporting its seed {seeds[0]} model "
          f"(test accuracy {results[best]['runs'][0]['test_accuracy']:.3f})")

    # Script, save, and record an input with Python's output. (TorchScript is deprecated
    # upstream but remains the format C++ programs load without Python.)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
    model.eval()
    model_path = os.path.join(args.out, "model.pt")
    torch.jit.script(model).save(model_path)
    sample = test_x[:16]
    with torch.no_grad():
        expected = model(sample)
    torch.save(sample, os.path.join(args.out, "input.pt"))
    torch.save(expected, os.path.join(args.out, "output.pt"))

    # A fresh Python process loads the scripted model (only `import cnn_attention` needed).
    code = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'python')!r})
        import cnn_attention
        m = torch.jit.load({model_path!r})
        x = torch.load({os.path.join(args.out, 'input.pt')!r})
        y = torch.load({os.path.join(args.out, 'output.pt')!r})
        print((m(x) - y).abs().max().item())
        """
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if fresh.returncode != 0:
        sys.exit(f"fresh Python process failed:\n{fresh.stderr}")
    python_diff = float(fresh.stdout.strip().splitlines()[-1])

    # torch.export + AOTInductor: the exported program compiled ahead of time into a package
    # whose code calls our operators through the dispatcher.
    start = time.perf_counter()
    exported = torch.export.export(model, (sample,))
    package_path = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(args.out, "model.pt2"))
    print(f"torch.export + AOTInductor package in {time.perf_counter() - start:.0f} s: {package_path}")

    # The C++ example (no Python) loads both files.
    if not os.path.exists(args.cpp_runner):
        sys.exit(f"C++ runner {args.cpp_runner} not found: build it with `make build-cpp`")

    def run_cpp(path: str, tag: str, atol: float) -> float:
        saved = os.path.join(args.out, f"output_cpp_{tag}.pt")
        cpp = subprocess.run(
            [args.cpp_runner, path, os.path.join(args.out, "input.pt"),
             "--expect", os.path.join(args.out, "output.pt"), "--atol", str(atol), "--save", saved],
            capture_output=True, text=True,
        )
        print(cpp.stdout.strip())
        if cpp.returncode != 0:
            sys.exit(f"C++ example failed on {path}:\n{cpp.stderr}")
        return (torch.load(saved) - expected).abs().max().item()

    # AOTInductor fuses and reorders the surrounding layers (batch norms into convolutions),
    # so its float32 results may differ in the last bits: 1e-4 there, 1e-5 elsewhere.
    cpp_diff = run_cpp(model_path, "torchscript", 1e-5)
    aoti_diff = run_cpp(package_path, "aoti", 1e-4)

    print()
    zoo = convert_zoo_model()
    print(f"cnn_attention.convert on {zoo['model']} (batch {zoo['batch']}, {zoo['size']}x{zoo['size']}): outputs "
          f"match to {zoo['max_relative_output_diff']:.1e}, gradients to {zoo['max_relative_gradient_diff']:.1e} "
          f"(relative to the largest output and gradient; the eager model's own gradients on 1 thread and "
          f"{torch.get_num_threads()}: {zoo['eager_relative_gradient_spread']:.1e}); training step {zoo['training_step_ms_eager']:.0f} ms eager, "
          f"{zoo['training_step_ms_converted']:.0f} ms converted "
          f"({zoo['training_step_ms_eager'] / zoo['training_step_ms_converted']:.2f}x)")
    zoo_ok = zoo["max_relative_output_diff"] <= 1e-4 and zoo["max_relative_gradient_diff"] <= max(
        1e-3, 2 * zoo["eager_relative_gradient_spread"])

    summary = {
        "epochs": args.epochs,
        "seeds": seeds,
        "batch": args.batch,
        "max_lr": args.max_lr,
        "results": results,
        "collapsed": collapsed,
        "best": best_overall,
        "exported": best,
        "max_abs_diff_fresh_python": python_diff,
        "max_abs_diff_cpp": cpp_diff,
        "max_abs_diff_cpp_aoti": aoti_diff,
        "converted_zoo_model": zoo,
        "build": cnn_attention.build_info(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print("| runtime | max abs difference from the trained model |")
    print("|---|---|")
    print("| Python (eager, this process) | 0 (reference) |")
    print(f"| TorchScript, fresh Python process | {python_diff:.3g} |")
    print(f"| TorchScript, C++ example (no Python) | {cpp_diff:.3g} |")
    print(f"| torch.export + AOTInductor, C++ example (no Python) | {aoti_diff:.3g} |")
    ok = max(python_diff, cpp_diff) <= 1e-5 and aoti_diff <= 1e-4 and zoo_ok
    print(f"\n{'OK' if ok else 'MISMATCH'}: outputs in {args.out}")
    if collapsed:
        print(f"COLLAPSE in eval mode: {', '.join(collapsed)}")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
