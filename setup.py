"""Builds engine._C with CMake (CMakeLists.txt); everything else is plain setuptools (pyproject.toml).

Environment switches, read at build time:
  ENGINE_NO_CUDA=1          build only the C++ reference kernels, even when nvcc is found
  ENGINE_CUDA_ARCHS="90a;80"  GPU architectures to compile for (';' or ',' separated)
  ENGINE_BUILD_JOBS=N       parallel compile jobs (default: CPU count)
  ENGINE_CUBLAS_ROOT=DIR    where cuBLASLt's include/ and lib/ are, when neither the CUDA toolkit
                            nor torch's nvidia-cublas wheel has them
"""

import os
import subprocess
import sys
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists; setuptools only learns where it goes."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # setuptools decides where the module lands (build/lib..., or the source tree for
        # `pip install -e .`); CMake writes the library straight there.
        module_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        no_cuda = os.environ.get("ENGINE_NO_CUDA", "0") not in ("", "0")
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={module_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DENGINE_NO_CUDA={'ON' if no_cuda else 'OFF'}",
        ]
        archs = os.environ.get("ENGINE_CUDA_ARCHS")
        # -U drops a list cached by an earlier build, so an unset variable means CMake's default.
        configure.append(f"-DENGINE_CUDA_ARCHS={archs.replace(',', ';')}" if archs else "-UENGINE_CUDA_ARCHS")
        jobs = os.environ.get("ENGINE_BUILD_JOBS", str(os.cpu_count() or 1))

        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
