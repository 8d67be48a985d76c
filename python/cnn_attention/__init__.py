"""cnn-attention: channel, soft, hard and self attention for CNNs as fused PyTorch operators.

Importing the package loads the operator library, so ``torch.ops.cnn_attention.*`` is
available (to TorchScript too) as soon as ``import cnn_attention`` has run.
"""

from typing import Dict

import platform

import torch


def _check_cpu() -> None:
    # The x86-64 build uses AVX2 and FMA instructions; say so instead of dying of SIGILL.
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return
    missing = [flag for flag in ("avx2", "fma", "f16c") if flag not in flags]
    if flags and missing:
        raise ImportError(f"cnn_attention: this CPU lacks {', '.join(missing)}, which the x86-64 build requires")


_check_cpu()

from . import _C  # noqa: F401  (loads the library; its static registrations define the ops)
from . import functional
from .modules import CBAM, ChannelAttention, ChannelGate, HardAttention, SelfAttention, SoftAttention, SpatialScores
from .insert import AttentionAfter, find_stages, insert
from .convert import convert
from .maps import attention_maps

__version__ = "0.1.0"

# Submodules whose dependencies are optional (onnxscript, matplotlib): imported on first use, so
# that `cnn_attention.onnx.export(...)` works after `import cnn_attention` and importing the
# package needs neither.
_LAZY_SUBMODULES = ("onnx", "viz")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CBAM",
    "ChannelAttention",
    "ChannelGate",
    "HardAttention",
    "SelfAttention",
    "SoftAttention",
    "SpatialScores",
    "functional",
    "insert",
    "convert",
    "attention_maps",
    "find_stages",
    "AttentionAfter",
    "build_info",
    "library_path",
    "onnx",
    "viz",
    "__version__",
]


def build_info() -> Dict[str, object]:
    """What the loaded operator library was built with.

    Returns a dict with ``version``, ``torch`` (the torch it was compiled against),
    ``cuda`` (the CUDA toolkit version, or ``None`` for a CPU-only build) and
    ``cuda_archs`` (the list of architectures, empty for a CPU-only build), ``cpu_isas``
    (the x86-64 vector instruction sets the per-element CPU kernels are built for, e.g.
    ``["AVX2", "AVX512"]``) and ``cpu_isa`` (the one this process runs: the widest the CPU
    has, lowered with ATen's own kernels by ``ATEN_CPU_CAPABILITY=avx2``).
    """
    fields = dict(item.split("=", 1) for item in torch.ops.cnn_attention._build_info().split(";"))
    return {
        "version": fields["version"],
        "torch": fields["torch"],
        "cuda": fields["cuda"] or None,
        "cuda_archs": [a for a in fields["cuda_archs"].replace(",", " ").replace(";", " ").split() if a],
        "cpu_isas": fields["cpu_isas"].split(","),
        "cpu_isa": fields["cpu_isa"],
    }


def library_path() -> str:
    """Path of the operator library libcnn_attention that the package loads (the one C++ users
    link): pass it to ``torch.ops.load_library`` to get the operators without the package."""
    import os

    folder = os.path.dirname(_C.__file__)
    return next(os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.startswith("libcnn_attention.so"))
