"""Writes scripted models with the operators, an input and Python's output, for the C++
tests and the C++ example to load: python make_models.py OUT_DIR [--no-aoti]"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from models import (  # noqa: E402
    TinyAllFamiliesCNN, TinyAttentionCNN, TinyInsertedCNN, TinySelfAttentionCNN, TinySpatialAttentionCNN,
)


# (file prefix, model): prefix + "model.pt" and prefix + "output.pt" are written for each.
MODELS = [("", TinyAttentionCNN), ("spatial_", TinySpatialAttentionCNN), ("self_", TinySelfAttentionCNN),
          ("inserted_", TinyInsertedCNN), ("all_", TinyAllFamiliesCNN)]


def main(out_dir: str, aoti: bool = True) -> None:
    os.makedirs(out_dir, exist_ok=True)
    x = None
    for prefix, model_class in MODELS:
        torch.manual_seed(0)
        model = model_class().eval()
        if x is None:
            x = torch.randn(2, 3, 16, 16)
            torch.save(x, os.path.join(out_dir, "input.pt"))
        with torch.no_grad():
            y = model(x)
        torch.jit.script(model).save(os.path.join(out_dir, f"{prefix}model.pt"))
        torch.save(y, os.path.join(out_dir, f"{prefix}output.pt"))
    written = [p + "model.pt" for p, _ in MODELS]
    if aoti:
        # The last model exported and compiled ahead of time (AOTInductor), for run_model.
        torch._inductor.aoti_compile_and_package(
            torch.export.export(model, (x,)), package_path=os.path.join(out_dir, "all_model.pt2"))
        written.append("all_model.pt2")
    print(f"wrote {', '.join(written)}, input.pt and the outputs to {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor package (slow to compile)")
    args = parser.parse_args()
    main(args.out_dir, aoti=not args.no_aoti)
