"""Builds the package's compiled part through CMake (CMakeLists.txt), the one build of the kernels:
the operator library libcnn_attention, which C++ users link too, and the extension module
cnn_attention._C that links it. Both files go into the package; each source compiles once.

Environment:
  CNN_ATTENTION_CUDA=0      build the CPU kernels only, even where CUDA is available
  CNN_ATTENTION_CUDA=1      require the CUDA kernels (fail if torch or nvcc lack CUDA)
  TORCH_CUDA_ARCH_LIST      architectures of the CUDA kernels; CMakeLists.txt defaults to "9.0"
  MAX_JOBS                  parallel compile jobs (ninja)
  DEBUG=1                   a Debug build (-O0 -g)
  CNN_ATTENTION_BUILD_DIR   the CMake build tree (default: under setuptools' build_temp); the
                            Makefile uses build/cmake, where the C++ tests and example are built
                            from the same objects
"""

import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

import torch.utils
from torch.utils.cpp_extension import CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))
# The version is CMakeLists.txt's (the library reports it in build_info()).
VERSION = re.search(r"project\(CNNAttention VERSION ([0-9.]+)", open(os.path.join(ROOT, "CMakeLists.txt")).read()).group(1)


def cmake_cuda_setting() -> str:
    setting = os.environ.get("CNN_ATTENTION_CUDA", "")
    return {"0": "OFF", "1": "ON"}.get(setting, "AUTO")


def tool(name: str) -> str:
    """A build tool, first from this interpreter's environment (a virtual environment that is
    not activated has cmake and ninja there), then from PATH."""
    here = os.path.dirname(sys.executable)
    found = shutil.which(name, path=here + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise RuntimeError(f"cnn_attention: the build needs {name} (pip install {name})")
    return found


def configure_arguments() -> list:
    arguments = [
        "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
        f"-DCMAKE_BUILD_TYPE={'Debug' if os.environ.get('DEBUG', '0') == '1' else 'Release'}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DCNN_ATTENTION_CUDA={cmake_cuda_setting()}",
        "-DCNN_ATTENTION_PYTHON=ON",
    ]
    ccache = shutil.which("ccache")
    if ccache:
        arguments.append(f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if torch.version.cuda and nvcc and os.path.exists(nvcc):
        arguments.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if ccache:
            arguments.append(f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}")
    return arguments


def replace_file(source: str, target: str) -> None:
    """Copy `source` to `target` through a new file renamed into place: a process that has the
    old library mapped keeps its own copy."""
    partial = target + ".partial"
    shutil.copy(source, partial)
    os.replace(partial, target)


class CMakeExtension(Extension):
    """The extension module, built by CMake with the library it links."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildWithCMake(build_ext):
    def run(self) -> None:
        self._libraries = []  # the library files put beside the module in build_lib
        super().run()

    def build_extension(self, ext: Extension) -> None:
        tree = os.path.abspath(os.environ.get("CNN_ATTENTION_BUILD_DIR") or os.path.join(self.build_temp, "cmake"))
        # Configure once per set of arguments (CMakeLists.txt reads TORCH_CUDA_ARCH_LIST at
        # configure time); later builds only run ninja, which reconfigures by itself when a
        # CMakeLists.txt or a globbed folder changes.
        arguments = configure_arguments()
        configuration = arguments + [f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"]
        stamp = os.path.join(tree, "setup_configuration.json")
        if not os.path.exists(os.path.join(tree, "build.ninja")) or not os.path.exists(stamp) or (
            json.load(open(stamp)) != configuration
        ):
            subprocess.check_call([tool("cmake"), "-S", ROOT, "-B", tree] + arguments)
            with open(stamp, "w") as f:
                json.dump(configuration, f)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([tool("cmake"), "--build", tree, "--target", "cnn_attention_python", "-j", jobs])

        module = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(module), exist_ok=True)
        built_module, built_library = open(os.path.join(tree, "python_package_files.txt")).read().split()
        library = os.path.join(os.path.dirname(module), os.path.basename(built_library))
        replace_file(built_module, module)
        replace_file(built_library, library)  # the soname link's target, under the soname
        self._libraries.append(library)

    def copy_extensions_to_source(self) -> None:
        # In place (--inplace, editable installs) the library goes beside the module too.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext, library in zip(self.extensions, self._libraries):
            inplace_module, _ = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(library, os.path.join(os.path.dirname(inplace_module), os.path.basename(library)))

    def get_outputs(self):
        return super().get_outputs() + ([] if self.inplace else getattr(self, "_libraries", []))


setup(
    name="cnn-attention",
    version=VERSION,
    description="Channel, soft, hard and self attention for CNNs as fused PyTorch operators",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("cnn_attention._C")],
    cmdclass={"build_ext": BuildWithCMake},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
)
