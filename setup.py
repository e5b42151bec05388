"""Build of stiefel_kernels: metadata in pyproject.toml; this file builds the native extension.

The extension ``stiefel_kernels._C`` (csrc/) is compiled by ``torch.utils.cpp_extension`` against
the torch of the *running* environment, so install torch first and build without isolation (an
isolated build env would bring its own, different torch):

    pip install torch==2.13.0
    pip install --no-build-isolation .          # or -e . ; or: python setup.py build_ext --inplace

What the build needs: torch (its wheel ships the pybind11 headers), a C++20 compiler with OpenMP
and, for the CUDA kernels, nvcc of the CUDA major version torch was built with. Nothing else:
Ninja is used when it is installed (parallel, incremental), otherwise setuptools compiles the
sources one after the other; CMake is not used (CMakeLists.txt is only the nvcc compile check of
tests/test_cuda_build.py). A machine without a package registry and a preinstalled CUDA torch
builds with `pip install --no-build-isolation --no-deps -e .`.

CUDA kernels (csrc/cuda/) are built when torch is a CUDA build and nvcc is found: the toolkit
of $CUDA_HOME or $CUDA_PATH, else of the nvcc on PATH, else torch.utils.cpp_extension's guess.

Environment:
    STIEFEL_KERNELS_SKIP_NATIVE=1   do not build the extension (the package then uses the
                                    torch.linalg fallback and warns at import)
    STIEFEL_KERNELS_WITH_CUDA=0/1   force the CUDA kernels off/on (default: auto, as above). =1
                                    with a CPU-only torch compiles them anyway (a build check; the
                                    module then needs libcudart at import)
    TORCH_CUDA_ARCH_LIST            GPU architectures (default here: "8.0;9.0+PTX", i.e. SASS for
                                    sm_80 and sm_90, PTX for newer GPUs; "native": the visible
                                    GPUs)
    CUDA_HOME                       the CUDA toolkit whose nvcc compiles the kernels
    MAX_JOBS=N                      parallel compile jobs with Ninja (default: number of CPUs)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_NATIVE = os.environ.get("STIEFEL_KERNELS_SKIP_NATIVE", "") == "1"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # the compile check's CMAKE_CUDA_ARCHITECTURES "80;90"

CPU_SOURCES = ["csrc/module.cpp", "csrc/op_checks.cpp", "csrc/ops_cpu.cpp", "csrc/fused_step_cpu.cpp",
               "csrc/small_bmm_cpu.cpp", "csrc/cayley_step_cpu.cpp"]


def _log(msg: str) -> None:
    print(f"stiefel_kernels: {msg}", file=sys.stderr)


def _cuda_sources() -> list[str]:
    found = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    found += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME or $CUDA_PATH, else the one of the nvcc on PATH.

    The nvcc on PATH may be a wrapper script outside the toolkit (cpp_extension would then take
    its parent directory, which has no CUDA headers or libraries): ask nvcc where it lives.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=120)
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.normpath(line[len("#$ TOP="):].strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return home


def _use_ninja_if_installed() -> None:
    """cpp_extension looks for `ninja` on PATH only: add this environment's or the ninja wheel's."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package

        dirs.append(ninja.BIN_DIR)
    except Exception:
        pass
    for d in dirs:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _cuda_toolkit(torch, cpp_extension, sources: list[str]) -> str | None:
    """The CUDA toolkit to build csrc/cuda with, or None for a CPU-only module."""
    want = os.environ.get("STIEFEL_KERNELS_WITH_CUDA", "").strip().lower()
    forced = want in ("1", "on", "true", "yes")
    if want in ("0", "off", "false", "no"):
        return None
    home = None
    if torch.version.cuda is None and not forced:
        why = "torch is a CPU-only build"
    elif not sources:
        why = "there are no sources in csrc/cuda"
    else:
        home = _cuda_home() or cpp_extension.CUDA_HOME
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
        why = "nvcc was not found (put it on PATH or set CUDA_HOME to the CUDA toolkit)"
    if forced:
        raise RuntimeError(f"STIEFEL_KERNELS_WITH_CUDA=1 but {why}")
    warning = "" if torch.version.cuda is None else "WARNING: "
    _log(f"{warning}building the CPU kernels only ({why})")
    return None


def _elf_helper():
    """stiefel_kernels/_elf.py, loaded by its path (importing the package would load torch and
    the old extension)."""
    spec = importlib.util.spec_from_file_location(
        "_stiefel_kernels_elf", os.path.join(ROOT, "stiefel_kernels", "_elf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_ext_class(cpp_extension):
    """torch's BuildExtension, made to link the shared C++ runtime.

    A compiler driver that finds only a static libstdc++ (seen on the lent GPU machines: CXX is a
    wrapper, ``exec g++-real -B/opt/gcc/... "$@"``) links the C++ runtime into the extension; the
    first error the extension raises then crashes the process (stiefel_kernels/_elf.py says
    why). Such a driver is told to link ``libstdc++.so.6``, and a module that still carries its
    own runtime fails the build."""

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self):
            cxx = list(getattr(self.compiler, "compiler_cxx", None) or [])
            if not sys.platform.startswith("linux") or not cxx:  # ELF checks only
                return super().build_extensions()
            elf = _elf_helper()
            os.makedirs(self.build_temp, exist_ok=True)
            if elf.driver_links_cxx_runtime_statically(cxx, self.build_temp):
                _log(f"{cxx[0]} links libstdc++ statically into shared objects: linking "
                     "stiefel_kernels._C against libstdc++.so.6 instead")
                for ext in self.extensions:
                    ext.extra_link_args = [*(ext.extra_link_args or []), "-l:libstdc++.so.6"]
                # an up-to-date module from an earlier build (linked without the flag) would be
                # kept as it is: link again (without ninja this recompiles too)
                self.force = True
            super().build_extensions()
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path) and elf.links_cxx_runtime_statically(path):
                    raise RuntimeError(
                        f"{path} links the C++ runtime statically: an error raised inside it "
                        "would crash the process. Build with a C++ compiler that links "
                        "libstdc++.so.6 (e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc), and no "
                        "-static-libstdc++ in LDFLAGS.")

    return BuildExtension


def _native_build():
    """(ext_modules, cmdclass) for stiefel_kernels._C."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        # Metadata and sdists need no torch; building the extension does.
        error = exc

        class NeedsTorch(build_ext):
            def run(self):
                raise RuntimeError(
                    "building stiefel_kernels._C needs torch in the running environment: "
                    "`pip install torch` first, then `pip install --no-build-isolation .` "
                    "(or set STIEFEL_KERNELS_SKIP_NATIVE=1 to install without the extension)"
                ) from error

        ext = Extension("stiefel_kernels._C", CPU_SOURCES + _cuda_sources())
        return [ext], {"build_ext": NeedsTorch}

    _use_ninja_if_installed()
    cuda_sources = _cuda_sources()
    cuda_home = _cuda_toolkit(torch, cpp_extension, cuda_sources)
    with_cuda = cuda_home is not None

    # As the earlier CMake build: C++20 with every torch (torch 2.11's cpp_extension defaults to
    # C++17, 2.13's to C++20), Release (-O3, NDEBUG), OpenMP (at::parallel_for is an inline
    # OpenMP loop in torch's headers; -fopenmp also links libgomp, the runtime torch loads),
    # hidden symbols.
    if sys.platform == "win32":  # untested
        cxx = ["/std:c++20", "/O2", "/DNDEBUG", "/openmp"]
        link = []
    else:
        # -fno-math-errno (as torch's own build): lets std::sqrt vectorize (fused_step_cpu.cpp)
        cxx = ["-std=c++20", "-O3", "-DNDEBUG", "-fopenmp", "-Wall", "-Wno-unused-parameter",
               "-fvisibility=hidden", "-fno-math-errno"]
        link = ["-fopenmp"]
    nvcc = ["-std=c++20", "-O3", "-DNDEBUG"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("STIEFEL_WITH_CUDA", "1" if with_cuda else "0")],
        extra_link_args=link,
    )
    if with_cuda:
        # cpp_extension found its CUDA_HOME at import (None with a CPU-only torch): use ours.
        cpp_extension.CUDA_HOME = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # cpp_extension's own default is the visible GPUs' architectures, and fails on a
            # machine without a GPU: a fixed list builds the same module everywhere.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        _log(f"building the CPU and CUDA kernels (torch CUDA {torch.version.cuda}, "
             f"nvcc of {cuda_home}, "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = cpp_extension.CUDAExtension(
            "stiefel_kernels._C", CPU_SOURCES + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
        if torch.version.cuda is None:
            # Build check against a CPU-only torch: it has no CUDA libraries, and the sources use
            # only torch's device-generic API and cudart.
            ext.libraries = [lib for lib in ext.libraries if lib not in ("c10_cuda", "torch_cuda")]
    else:
        ext = cpp_extension.CppExtension(
            "stiefel_kernels._C", CPU_SOURCES, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": _build_ext_class(cpp_extension)}


ext_modules, cmdclass = ([], {}) if SKIP_NATIVE else _native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
