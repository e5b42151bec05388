"""Build of stiefel_kernels: metadata in pyproject.toml; this file builds the native extension.

The extension ``stiefel_kernels._C`` (csrc/) is compiled by CMake + Ninja (CMakeLists.txt)
against the torch of the *running* environment, so install torch first and build without
isolation (an isolated build env would bring its own, different torch):

    pip install torch==2.13.0
    pip install --no-build-isolation .          # or -e . ; or: python setup.py build_ext --inplace

Environment:
    STIEFEL_KERNELS_SKIP_NATIVE=1   do not build the extension (the package then uses the
                                    torch.linalg fallback and warns at import)
    STIEFEL_KERNELS_WITH_CUDA=0/1   force the CUDA part off/on (default: auto, see CMakeLists.txt)
    MAX_JOBS=N                      parallel compile jobs (default: number of CPUs)
    CMAKE_ARGS="..."                extra arguments for the CMake configure step
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_NATIVE = os.environ.get("STIEFEL_KERNELS_SKIP_NATIVE", "") == "1"


class CMakeExtension(Extension):
    """An extension whose build is delegated to CMake (no sources for setuptools to compile)."""

    def __init__(self, name: str, sourcedir: str = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.path.abspath(sourcedir)


def _find_tool(name: str) -> str | None:
    """``name`` from the running environment's bin dir, a pip-installed wheel, or PATH."""
    here = shutil.which(name, path=os.path.dirname(sys.executable))
    if here:
        return here
    try:  # the `cmake` / `ninja` PyPI packages
        mod = __import__(name)
        bindir = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
        if bindir and shutil.which(name, path=bindir):
            return shutil.which(name, path=bindir)
    except Exception:
        pass
    return shutil.which(name)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        try:
            import torch
            import torch.utils
        except ImportError as exc:
            raise RuntimeError(
                "building stiefel_kernels._C needs torch in the running environment: "
                "`pip install torch` first, then `pip install --no-build-isolation .`"
            ) from exc
        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("building stiefel_kernels._C needs CMake >= 3.18 "
                               "(`pip install cmake ninja`, or your system's package)")
        ninja = _find_tool("ninja")

        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(ext_path)
        ext_suffix = os.path.basename(ext_path)[len(ext.name.rsplit(".", 1)[-1]):]
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        # CMake caches what it found (torch's libraries, Python): start afresh when the build
        # tree was configured for another interpreter or torch.
        key = f"{sys.executable}\n{os.path.dirname(torch.__file__)}\n{torch.__version__}\n"
        stamp = os.path.join(build_dir, "stiefel_build_key.txt")
        if os.path.isdir(build_dir) and (not os.path.exists(stamp) or open(stamp).read() != key):
            shutil.rmtree(build_dir)
        os.makedirs(build_dir, exist_ok=True)
        os.makedirs(out_dir, exist_ok=True)

        cfg = "Debug" if self.debug else "Release"
        with_cuda = {"0": "OFF", "1": "ON"}.get(os.environ.get("STIEFEL_KERNELS_WITH_CUDA", ""), "AUTO")
        args = [
            cmake, "-S", ext.sourcedir, "-B", build_dir,
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DSTIEFEL_OUTPUT_DIR={out_dir}",
            f"-DSTIEFEL_EXT_SUFFIX={ext_suffix}",
            f"-DSTIEFEL_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DSTIEFEL_WITH_CUDA={with_cuda}",
        ]
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if ninja and not os.path.exists(cache):  # the generator of an existing tree can't change
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(args, check=True)
        with open(stamp, "w") as f:
            f.write(key)
        subprocess.run([cmake, "--build", build_dir, "--config", cfg, "-j", jobs], check=True)
        if not os.path.exists(ext_path):
            raise RuntimeError(f"CMake finished but {ext_path} was not produced")


setup(
    ext_modules=[] if SKIP_NATIVE else [CMakeExtension("stiefel_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
