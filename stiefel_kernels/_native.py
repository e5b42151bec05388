"""Loads the compiled extension ``stiefel_kernels._C`` if it was built.

The package works without it (the torch.linalg formulations in :mod:`stiefel_kernels.smallmat`
take over); importing warns once so a user knows the native CPU small step is missing.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

__all__ = ["available", "has_op", "load_error"]

load_error: Exception | None = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.stiefel_kernels.*)
    from . import _fake_kernels  # noqa: F401  (meta/fake kernels for torch.compile)
    available = True
except Exception as exc:  # ImportError, or an ABI mismatch with the running torch
    available = False
    load_error = exc
    built = importlib.util.find_spec(f"{__package__}._C") is not None
    reason = f"failed to load ({type(exc).__name__}: {exc})" if built else "is not built"
    warnings.warn(
        f"stiefel_kernels: the native extension stiefel_kernels._C {reason}; "
        "using the torch.linalg fallback for the r x r step. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=3,
    )


def has_op(name: str, device_type: str) -> bool:
    """True when ``torch.ops.stiefel_kernels.<name>`` has a kernel for ``device_type``."""
    if not available:
        return False
    try:
        op = getattr(torch.ops.stiefel_kernels, name)
    except (AttributeError, RuntimeError):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), key)
