"""Batched small-matrix solves of the retraction's r x r step, with one signature per operation.

Each function takes a batch ``(..., k, k)`` and returns ``(result, info)`` where ``info`` is an
``int32`` tensor of shape ``(...)``: 0 where the factorization succeeded, nonzero where it
failed (the result is then not to be trusted). No function reads ``info`` on the host, so none
synchronizes with the device; the optimizer folds ``info`` into a flag it reads lazily.

Dispatch: the native op of ``stiefel_kernels._C`` where it is built for the tensor's device
and measured faster (see :data:`NATIVE_INV_SQRT_MAX_K`), otherwise the torch.linalg formulation
below (also the oracle in the tests). ``STIEFEL_KERNELS_NO_NATIVE=1`` forces torch.linalg.
The native ops fill failed entries with NaN; the torch.linalg ones return whatever LAPACK gives.
Either way ``info`` says which entries failed.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _native

__all__ = ["inv_sqrt_spd", "cholesky_upper_inverse", "solve", "inv_sqrt_spd_torch",
           "cholesky_upper_inverse_torch", "solve_torch"]


#: Largest k for which the native CPU ``inv_sqrt_spd`` is the default. Measured with
#: ``bench/bench_smallmat.py`` (float32, 2 threads, 2-core CPU): native / torch.linalg.eigh speed-up
#: 2.0-3.4x for k = 8..32, 1.3-1.4x at k = 64, 0.6-0.7x at k = 128 (batches 32..1024).
#: Cholesky and LU are faster natively at every measured k (2.2-2.9x and 1.0-2.8x).
NATIVE_INV_SQRT_MAX_K = 64


def _use_native(t: Tensor, op: str) -> bool:
    if os.environ.get("STIEFEL_KERNELS_NO_NATIVE") == "1":
        return False
    if op == "inv_sqrt_spd" and t.device.type == "cpu" and t.shape[-1] > NATIVE_INV_SQRT_MAX_K:
        return False
    return _native.has_op(op, t.device.type)


def inv_sqrt_spd_torch(m: Tensor) -> tuple[Tensor, Tensor]:
    """``M^(-1/2)`` of symmetric positive definite ``(..., k, k)`` by ``torch.linalg.eigh``."""
    evals, evecs = torch.linalg.eigh(m)
    info = (evals <= 0).sum(dim=-1).to(torch.int32)
    inv_sqrt = evals.clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    return (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT, info


def cholesky_upper_inverse_torch(m: Tensor) -> tuple[Tensor, Tensor]:
    """``R^(-1)`` where ``R`` is upper triangular with positive diagonal and ``R^T R = M``."""
    low, info = torch.linalg.cholesky_ex(m)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
    return torch.linalg.solve_triangular(low.mT, eye, upper=True), info.to(torch.int32)


def solve_torch(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``A^(-1) B`` for ``A`` ``(..., k, k)``, ``B`` ``(..., k, m)`` by LU with partial pivoting."""
    x, info = torch.linalg.solve_ex(a, b)
    return x, info.to(torch.int32)


def inv_sqrt_spd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse square root of symmetric positive definite ``(..., k, k)``; returns ``(M^(-1/2), info)``."""
    if _use_native(m, "inv_sqrt_spd"):
        return torch.ops.stiefel_kernels.inv_sqrt_spd(m)
    return inv_sqrt_spd_torch(m)


def cholesky_upper_inverse(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(R^(-1), info)`` with ``R^T R = M`` (Cholesky, ``R`` upper, positive diagonal); ``(..., k, k)``."""
    if _use_native(m, "cholesky_upper_inverse"):
        return torch.ops.stiefel_kernels.cholesky_upper_inverse(m)
    return cholesky_upper_inverse_torch(m)


def solve(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A^(-1) B, info)`` for a batch of general square ``A``; ``(..., k, k)``, ``(..., k, m)``."""
    if _use_native(a, "solve"):
        return torch.ops.stiefel_kernels.solve(a, b)
    return solve_torch(a, b)
