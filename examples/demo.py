"""The main job (`make demo`): a small CNN with ChannelAttention at a shallow and at a deep
stage, trained on CPU, scripted, saved, reloaded in a fresh Python process and run by the C++
example program; the outputs of all three are compared and reported.

The task needs channel attention to do something: each 3x32x32 image is noise plus a faint
square in one colour channel (classes 0-2) or faint stripes in all channels (class 3), so
the network must learn which channels carry the signal.

    python examples/demo.py --out out/demo [--steps 300] [--cpp-runner build/cmake/run_model]
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
import cnn_attention  # noqa: E402

CLASSES = 4


def make_data(count: int, generator: torch.Generator):
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    images = torch.randn(count, 3, 32, 32, generator=generator)
    for i, label in enumerate(labels.tolist()):
        if label < 3:
            r, c = torch.randint(0, 24, (2,), generator=generator).tolist()
            images[i, label, r : r + 8, c : c + 8] += 0.5
        else:
            images[i, :, :, ::4] += 0.3
    return images, labels


class DemoCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Shallow stage: high resolution, edges and colours.
        self.shallow = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.shallow_attention = cnn_attention.ChannelAttention(16, reduction=2, pool="avgmax")
        # Deep stage: low resolution, parts.
        self.deep = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.deep_attention = cnn_attention.ChannelAttention(64, reduction=8, pool="avg")
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shallow_attention(self.shallow(x))
        x = self.deep_attention(self.deep(x))
        return self.head(x.amax((2, 3)))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cpp-runner", default=os.path.join(ROOT, "build", "cmake", "run_model"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # tiny late-training gradients must not hit the slow path
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = make_data(4096, generator)
    test_x, test_y = make_data(1024, generator)

    model = DemoCNN()
    print(f"cnn_attention {cnn_attention.build_info()}")
    print(f"model: {sum(p.numel() for p in model.parameters())} parameters, attention at "
          f"'shallow_attention' (32x32) and 'deep_attention' (8x8)")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    model.train()
    with tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True) as bar:
        for step in bar:
            index = torch.randint(0, len(train_x), (args.batch,), generator=generator)
            loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    train_seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_x, test_y)
    print(f"trained {args.steps} steps in {train_seconds:.1f} s; test accuracy {test_accuracy:.3f} "
          f"(chance {1 / CLASSES:.2f})")

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

    # The C++ example (no Python) loads the same file.
    if not os.path.exists(args.cpp_runner):
        sys.exit(f"C++ runner {args.cpp_runner} not found: build it with `make build-cpp`")
    cpp = subprocess.run(
        [args.cpp_runner, model_path, os.path.join(args.out, "input.pt"),
         "--expect", os.path.join(args.out, "output.pt"), "--save", os.path.join(args.out, "output_cpp.pt")],
        capture_output=True, text=True,
    )
    print(cpp.stdout.strip())
    if cpp.returncode != 0:
        sys.exit(f"C++ example failed:\n{cpp.stderr}")
    cpp_diff = (torch.load(os.path.join(args.out, "output_cpp.pt")) - expected).abs().max().item()

    summary = {
        "steps": args.steps,
        "train_seconds": round(train_seconds, 2),
        "test_accuracy": round(test_accuracy, 4),
        "max_abs_diff_fresh_python": python_diff,
        "max_abs_diff_cpp": cpp_diff,
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
    ok = python_diff <= 1e-5 and cpp_diff <= 1e-5
    print(f"\n{'OK' if ok else 'MISMATCH'}: outputs in {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
