"""Writes scripted models with the operators, an input and Python's output, for the C++
tests and the C++ example to load: python make_models.py OUT_DIR"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from models import TinyAllFamiliesCNN, TinyAttentionCNN, TinySelfAttentionCNN, TinySpatialAttentionCNN  # noqa: E402


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = TinyAttentionCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
    torch.jit.script(model).save(os.path.join(out_dir, "model.pt"))
    torch.save(x, os.path.join(out_dir, "input.pt"))
    torch.save(y, os.path.join(out_dir, "output.pt"))
    torch.manual_seed(0)
    spatial = TinySpatialAttentionCNN().eval()
    with torch.no_grad():
        spatial_y = spatial(x)
    torch.jit.script(spatial).save(os.path.join(out_dir, "spatial_model.pt"))
    torch.save(spatial_y, os.path.join(out_dir, "spatial_output.pt"))
    torch.manual_seed(0)
    self_model = TinySelfAttentionCNN().eval()
    with torch.no_grad():
        self_y = self_model(x)
    torch.jit.script(self_model).save(os.path.join(out_dir, "self_model.pt"))
    torch.save(self_y, os.path.join(out_dir, "self_output.pt"))
    torch.manual_seed(0)
    all_model = TinyAllFamiliesCNN().eval()
    with torch.no_grad():
        all_y = all_model(x)
    torch.jit.script(all_model).save(os.path.join(out_dir, "all_model.pt"))
    torch.save(all_y, os.path.join(out_dir, "all_output.pt"))
    # The same model exported and compiled ahead of time (AOTInductor), for run_model.
    torch._inductor.aoti_compile_and_package(
        torch.export.export(all_model, (x,)), package_path=os.path.join(out_dir, "all_model.pt2"))
    print(f"wrote model.pt, spatial_model.pt, self_model.pt, all_model.pt(2), input.pt and their outputs to {out_dir}")


if __name__ == "__main__":
    main(sys.argv[1])
