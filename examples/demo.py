"""The main job (`make demo`): attention where it matters, on cluttered digits.

scikit-learn's handwritten digits, enlarged and placed at random on a 64x64 canvas strewn
with fragments of other digits (examples/cluttered_digits.py; no download, fixed seeds, split
by source image). The same small CNN is trained without attention, with CBAM at its shallow
stage (64x64: where the digit is), with self attention at its deep stage (8x8: how its parts
relate) and with both, placed by cnn_attention.insert. The demo prints a table of test
accuracy, parameters and time per epoch, draws the attention maps of the model with both
over test images, then scripts the best model and checks that a fresh Python process and the
C++ example program (no Python) reproduce its outputs, as does the C++ example running the
model exported with torch.export and compiled by AOTInductor.

    python examples/demo.py --out out/demo [--epochs 3] [--cpp-runner build/cmake/run_model]
"""

import argparse
import json
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
from cluttered_digits import CLASSES, cluttered_digits, small_cnn  # noqa: E402

VARIANTS = {
    "none": "no attention",
    "shallow": "CBAM after the 64x64 stage",
    "deep": "self attention after the 8x8 stage",
    "both": "CBAM at 64x64 and self attention at 8x8",
}


def build(variant: str, example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = small_cnn()
    if variant in ("shallow", "both"):
        cnn_attention.insert(model, "cbam", "shallow", example)
    if variant in ("deep", "both"):
        cnn_attention.insert(model, "self", "deep", example)
    return model


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, name: str) -> float:
    """Seconds per epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        with tqdm(range(0, len(x), batch), desc=f"{name:>7} epoch {epoch + 1}/{epochs}", unit="batch",
                  dynamic_ncols=True, leave=False) as bar:
            for first in bar:
                index = order[first : first + batch]
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return (time.perf_counter() - start) / epochs


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(images[i : i + 256]).argmax(1) for i in range(0, len(images), 256)])
    return (predicted == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpp-runner", default=os.path.join(ROOT, "build", "cmake", "run_model"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_flush_denormal(True)  # tiny late-training gradients must not hit the slow path
    print(f"cnn_attention {cnn_attention.build_info()}")
    (train_x, train_y), (test_x, test_y) = cluttered_digits()
    print(f"cluttered digits: {len(train_x)} training and {len(test_x)} test images of 64x64, "
          f"{CLASSES} classes (chance {1 / CLASSES:.2f})")

    results, models = {}, {}
    for variant, description in VARIANTS.items():
        model = build(variant, test_x[:1])
        seconds = train(model, train_x, train_y, args.epochs, args.batch, variant)
        results[variant] = {
            "attention": description,
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds_per_epoch": round(seconds, 2),
            "test_accuracy": round(accuracy(model, test_x, test_y), 4),
        }
        models[variant] = model.eval()
        print(f"{variant:>7}: test accuracy {results[variant]['test_accuracy']:.3f}, {seconds:.1f} s per epoch")
    print()
    print(f"| model | attention | parameters | s / epoch | test accuracy ({args.epochs} epochs) |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['attention']} | {r['parameters']} | {r['seconds_per_epoch']:.1f} | "
              f"{r['test_accuracy']:.3f} |")
    print()

    # What the attention looks at: the maps of the model with both, over test images.
    maps = cnn_attention.attention_maps(models["both"], test_x[:4])
    drawn = draw_attention_maps(maps, test_x[:4], os.path.join(args.out, "maps"), samples=4)
    print("attention maps: " + ", ".join(os.path.relpath(p, args.out) for p in drawn))

    best = max(results, key=lambda v: results[v]["test_accuracy"])
    model = models[best]
    test_accuracy = results[best]["test_accuracy"]
    print(f"best: {best} ({test_accuracy:.3f}); exporting it")

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

    summary = {
        "epochs": args.epochs,
        "results": results,
        "best": best,
        "max_abs_diff_fresh_python": python_diff,
        "max_abs_diff_cpp": cpp_diff,
        "max_abs_diff_cpp_aoti": aoti_diff,
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
    ok = max(python_diff, cpp_diff) <= 1e-5 and aoti_diff <= 1e-4
    print(f"\n{'OK' if ok else 'MISMATCH'}: outputs in {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
