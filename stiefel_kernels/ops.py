"""The ``stiefel_kernels::`` operators: one schema each, a default kernel, per-device overrides.

The batched ``r x r`` solves of the retraction's small step are torch operators, so that the
dispatcher (not Python branching) picks their implementation per device:

* the schema and the **default kernel** (``CompositeExplicitAutograd``: every device) are
  defined here, and the default is the torch.linalg formulation below (also the tests' oracle);
* the native extension ``stiefel_kernels._C`` registers **CPU kernels** that override it when
  the extension is built (hand-written, float64 inside, at every ``k``: faster than torch.linalg
  up to ``k = 128`` for Cholesky and LU and up to ``k = 64`` for the inverse square root, which
  is 0.6-0.7x ``eigh`` at ``k = 128`` and 0.35x at 256,
  ``bench/results/cpu-smallmat-2026-11-24.md``; one kernel per device keeps one contract:
  exactly symmetric results, NaN where ``info`` is nonzero, the same failure thresholds);
* its **CUDA kernels** (one thread block per matrix, ``csrc/cuda/``) are registered only on
  request (``STIEFEL_KERNELS_CUDA_KERNELS=1`` at import, or
  :func:`stiefel_kernels._native.enable_cuda_kernels`) until a GPU has measured them against
  torch.linalg;
* fake kernels give ``torch.compile`` / FakeTensor the output shapes.

Every op returns ``(result, info)``: ``info`` is int32 of the batch shape, 0 where the
factorization succeeded, nonzero where it failed (never read on the host, so no op
synchronizes with the device). The native kernels fill failed entries with NaN; the default
ones return whatever LAPACK gives. Either way ``info`` says which entries failed.

Ops (float32/float64, ``(..., k, k)`` batches):

* ``inv_sqrt_spd(m) -> (M^(-1/2), info)``, ``M`` symmetric positive definite (lower triangle
  read); ``info`` = number of eigenvalues ``<= 0``.
* ``cholesky_upper_inverse(m) -> (R^(-1), info)``, ``R`` upper triangular with ``R^T R = M``.
* ``solve(a, b) -> (A^(-1) B, info)``, ``B`` ``(..., k, m)``, LU with partial pivoting.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inv_sqrt_spd_torch", "cholesky_upper_inverse_torch", "solve_torch", "OPS"]

#: the operators this module defines, ``torch.ops.stiefel_kernels.<name>``
OPS = ("inv_sqrt_spd", "cholesky_upper_inverse", "solve")
_SCHEMAS = {
    "inv_sqrt_spd": "inv_sqrt_spd(Tensor m) -> (Tensor, Tensor)",
    "cholesky_upper_inverse": "cholesky_upper_inverse(Tensor m) -> (Tensor, Tensor)",
    "solve": "solve(Tensor a, Tensor b) -> (Tensor, Tensor)",
}
_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- formulations
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


# ----------------------------------------------------------------------------- argument checks
def _check_square_batch(m: Tensor, op: str) -> None:
    torch._check(m.dim() >= 2, lambda: f"stiefel_kernels::{op}: expected a (..., k, k) tensor "
                 f"with at least 2 dims, got shape {tuple(m.shape)}")
    torch._check(m.shape[-1] == m.shape[-2], lambda: f"stiefel_kernels::{op}: expected square "
                 f"matrices in the last two dims, got shape {tuple(m.shape)}")
    torch._check(m.dtype in _DTYPES, lambda: f"stiefel_kernels::{op}: expected float32 or "
                 f"float64, got {m.dtype}")


def _check_solve(a: Tensor, b: Tensor) -> None:
    _check_square_batch(a, "solve")
    torch._check(b.dim() >= 2, lambda: "stiefel_kernels::solve: expected b of shape (..., k, m) "
                 f"with at least 2 dims, got shape {tuple(b.shape)}")
    torch._check(b.shape[-2] == a.shape[-1], lambda: f"stiefel_kernels::solve: a is "
                 f"{tuple(a.shape)} so b must have {a.shape[-1]} rows (dim -2), got shape "
                 f"{tuple(b.shape)}")
    torch._check(b.dtype == a.dtype, lambda: "stiefel_kernels::solve: a and b must have the "
                 f"same dtype, got {a.dtype} and {b.dtype}")


# ----------------------------------------------------------------------------- registration
def _inv_sqrt_spd_default(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "inv_sqrt_spd")
    return inv_sqrt_spd_torch(m)


def _cholesky_upper_inverse_default(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "cholesky_upper_inverse")
    return cholesky_upper_inverse_torch(m)


def _solve_default(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    _check_solve(a, b)
    return solve_torch(a, b)


def _info(like: Tensor, batch_shape) -> Tensor:
    return like.new_empty(batch_shape, dtype=torch.int32)


def _inv_sqrt_spd_fake(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "inv_sqrt_spd")
    return m.new_empty(m.shape), _info(m, m.shape[:-2])


def _cholesky_upper_inverse_fake(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "cholesky_upper_inverse")
    return m.new_empty(m.shape), _info(m, m.shape[:-2])


def _solve_fake(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    _check_solve(a, b)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return b.new_empty((*batch, a.shape[-1], b.shape[-1])), _info(a, batch)


_DEFAULTS = {"inv_sqrt_spd": _inv_sqrt_spd_default,
             "cholesky_upper_inverse": _cholesky_upper_inverse_default, "solve": _solve_default}
_FAKES = {"inv_sqrt_spd": _inv_sqrt_spd_fake,
          "cholesky_upper_inverse": _cholesky_upper_inverse_fake, "solve": _solve_fake}


def _register() -> torch.library.Library | None:
    """Schemas, default kernels and fake kernels, once per process (a reload of this module
    keeps the first registration). The returned library must stay referenced."""
    if hasattr(torch.ops.stiefel_kernels, OPS[-1]):
        return None
    lib = torch.library.Library("stiefel_kernels", "DEF")
    for name in OPS:
        lib.define(_SCHEMAS[name])
        lib.impl(name, _DEFAULTS[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"stiefel_kernels::{name}", _FAKES[name], lib=lib)
    return lib


_LIB = _register()
