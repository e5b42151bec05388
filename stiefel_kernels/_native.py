"""Loads the compiled extension ``stiefel_kernels._C`` if it was built.

The ``stiefel_kernels::`` ops always exist (:mod:`stiefel_kernels.ops` defines them with their
default torch.linalg kernels); the extension adds native kernels that override the defaults:
its CPU kernels when it loads, its CUDA kernels when :func:`enable_cuda_kernels` is called
(at import when ``STIEFEL_KERNELS_CUDA_KERNELS=1``). A missing extension warns once.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _elf, ops  # noqa: F401  (schemas and default kernels: before _C registers its kernels)

__all__ = ["available", "has_op", "has_cpu_kernel", "load_error", "enable_cuda_kernels", "disable_cuda_kernels",
           "cuda_kernels_enabled"]

#: environment variable that registers the native CUDA kernels at import
CUDA_KERNELS_ENV = "STIEFEL_KERNELS_CUDA_KERNELS"

load_error: Exception | None = None
cuda_kernels_enabled = False


def _refuse_own_cxx_runtime() -> None:
    """Raises ImportError for an extension with libstdc++ linked into it (a compiler wrapper that
    finds only the static archive): its first error would crash the process instead of raising
    (_elf.py). setup.py builds link the shared runtime; this catches a module built otherwise."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is not None and spec.origin and _elf.links_cxx_runtime_statically(spec.origin):
        raise ImportError(
            f"{spec.origin} has the C++ runtime linked into it (neither libstdc++.so nor "
            "libc++.so among its libraries): an error raised inside it would crash the process, "
            "so it is not loaded; rebuild it with this version's setup.py, which links "
            "libstdc++.so.6")


try:
    _refuse_own_cxx_runtime()
    from . import _C  # registers the CPU kernels of torch.ops.stiefel_kernels.*
    available = True
except Exception as exc:  # ImportError, or an ABI mismatch with the running torch
    available = False
    load_error = exc
    built = importlib.util.find_spec(f"{__package__}._C") is not None
    reason = f"failed to load ({type(exc).__name__}: {exc})" if built else "is not built"
    warnings.warn(
        f"stiefel_kernels: the native extension stiefel_kernels._C {reason}; "
        "the r x r step uses the default torch.linalg kernels. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=3,
    )


def enable_cuda_kernels() -> None:
    """Make the native CUDA kernels (``csrc/cuda/``, one thread block per matrix) override the
    default torch.linalg kernels on CUDA tensors, for the rest of the process. Opt-in until a GPU
    has measured them (``bench/bench_smallmat.py --device cuda``).

    Raises:
        RuntimeError: the extension is not loaded, or was built without CUDA.
    """
    global cuda_kernels_enabled
    if not available:
        raise RuntimeError(f"stiefel_kernels._C is not loaded ({load_error}): no native CUDA kernels")
    _C.enable_cuda_kernels()  # raises when built without CUDA
    cuda_kernels_enabled = True


def disable_cuda_kernels() -> None:
    """Undo :func:`enable_cuda_kernels`: the default torch.linalg kernels run on CUDA again."""
    global cuda_kernels_enabled
    if available:
        _C.disable_cuda_kernels()
    cuda_kernels_enabled = False


def has_op(name: str, device_type: str) -> bool:
    """True when the native kernel of ``torch.ops.stiefel_kernels.<name>`` runs on
    ``device_type`` (otherwise the default torch.linalg kernel does)."""
    if not available or name not in ops.OPS:
        return False
    return device_type == "cpu" or (device_type == "cuda" and cuda_kernels_enabled)


def has_cpu_kernel(name: str) -> bool:
    """True when the extension registered a CPU kernel for ``torch.ops.stiefel_kernels.<name>``
    (the dispatcher's own record; ``False`` without the extension). Callers probe once at import
    and keep a plain bool, which torch.compile reads as a constant (the query would break its
    graph)."""
    if not available:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"stiefel_kernels::{name}", "CPU")
    except Exception:  # pragma: no cover - private API changed
        return False


if os.environ.get(CUDA_KERNELS_ENV, "0") not in ("", "0"):
    try:
        enable_cuda_kernels()
    except RuntimeError as exc:  # asked for, but not there: say so, keep the defaults
        warnings.warn(f"stiefel_kernels: {CUDA_KERNELS_ENV} is set but {exc}", RuntimeWarning,
                      stacklevel=3)
