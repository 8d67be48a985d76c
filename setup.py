"""Builds cnn_attention._C from csrc/ with torch.utils.cpp_extension and ninja.

Environment:
  CNN_ATTENTION_CUDA=0      build the CPU kernels only, even where CUDA is available
  CNN_ATTENTION_CUDA=1      require the CUDA kernels (fail if torch or nvcc lack CUDA)
  TORCH_CUDA_ARCH_LIST      architectures of the CUDA kernels; defaults to "9.0" when it is
                            unset and no GPU is visible (torch's own default then fails)
  MAX_JOBS                  parallel compile jobs (ninja)
  DEBUG=1                   -O0 -g
"""

import glob
import os
import platform
import re
import subprocess

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "9.0"
# On x86-64 the CPU kernels use at::vec's AVX2 code (8 floats per instruction, FMA);
# the generic build of at::vec runs them several times slower. cnn_attention checks for
# AVX2 and FMA at import and refuses older CPUs with a clear error.
CPU_FLAGS = (
    ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if platform.machine() in ("x86_64", "AMD64")
    else []
)


def want_cuda() -> bool:
    setting = os.environ.get("CNN_ATTENTION_CUDA", "")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if setting == "0":
        return False
    if setting == "1" and not available:
        raise RuntimeError(
            "CNN_ATTENTION_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME unset)"
        )
    return available


def nvcc_version() -> str:
    out = subprocess.check_output([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def sources(patterns):
    found = []
    for pattern in patterns:
        found += sorted(glob.glob(os.path.join("csrc", pattern), recursive=True))
    return found


def extension():
    use_cuda = want_cuda()
    debug = os.environ.get("DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS ask for -g, which only makes a release build slower to compile.
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without the flag it runs on one
    # thread. The runtime is torch's own libgomp.so.1, already loaded by torch.
    cxx_opt = opt + ([] if debug else ["-g0"]) + ["-Wno-unknown-pragmas", "-fopenmp"] + CPU_FLAGS
    defines = [f'-DCNN_ATTENTION_VERSION="{VERSION}"', "-DCNN_ATTENTION_BUILD_LIBRARY"]
    # The C++ modules (csrc/modules) are for C++ users; Python has its own.
    srcs = sources(["build_info.cpp", "ops/**/*.cpp", "python/*.cpp"])
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected")
        defines += [
            "-DCNN_ATTENTION_WITH_CUDA",
            f'-DCNN_ATTENTION_CUDA_VERSION="{nvcc_version()}"',
            f'-DCNN_ATTENTION_CUDA_ARCHS="{archs}"',
        ]
        return CUDAExtension(
            "cnn_attention._C",
            srcs + sources(["ops/cuda/*.cu"]),
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": cxx_opt + defines,
                "nvcc": opt + defines + ["--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    return CppExtension(
        "cnn_attention._C", srcs, extra_compile_args={"cxx": cxx_opt + defines}, extra_link_args=["-fopenmp"]
    )


setup(
    name="cnn-attention",
    version=VERSION,
    description="Channel, soft, hard and self attention for CNNs as fused PyTorch operators",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
