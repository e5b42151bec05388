"""Batched small-matrix solves of the retraction's r x r step, with one signature per operation.

Each function takes a batch ``(..., k, k)`` and returns ``(result, info)`` where ``info`` is an
``int32`` tensor of shape ``(...)``: 0 where the factorization succeeded, nonzero where it
failed (the result is then not to be trusted). No function reads ``info`` on the host, so none
synchronizes with the device; the optimizer folds ``info`` into a flag it reads lazily.

Dispatch (:func:`implementation`): the native op of ``stiefel_kernels._C`` where it is built for
the tensor's device and measured faster, otherwise the torch.linalg formulation below (also the
oracle in the tests):

* CPU: native up to the measured ``NATIVE_CPU_MAX_K[op]``, torch.linalg above.
* CUDA: torch.linalg. The CUDA kernels (one block per matrix, ``csrc/cuda/``) are tested on the
  CPU by emulation and compile-checked, but no GPU has measured them yet, so they are opt-in.

``STIEFEL_KERNELS_SMALLMAT=native`` forces the native ops (an error where they are not built),
``=torch`` forces torch.linalg (``STIEFEL_KERNELS_NO_NATIVE=1`` is the same), ``=auto`` is the
default above. The native ops fill failed entries with NaN; the torch.linalg ones return whatever
LAPACK gives. Either way ``info`` says which entries failed.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import _native

__all__ = ["inv_sqrt_spd", "cholesky_upper_inverse", "solve", "implementation",
           "inv_sqrt_spd_torch", "cholesky_upper_inverse_torch", "solve_torch",
           "inv_sqrt_spd_newton_schulz", "newton_schulz_inv_sqrt"]


#: Largest k for which each native CPU op is the default (None: every k). Measured with
#: ``bench/bench_smallmat.py`` (float32, 2 threads, 2-core CPU, batches 32..1024;
#: bench/results/cpu-smallmat-2026-11-24.md), speed-up of native over the best other formulation:
#: inverse square root 1.9-3.3x for k = 8..32, 1.3-1.5x at 64, 0.6-0.7x at 128, 0.35x at 256
#: (torch.linalg.eigh; Newton–Schulz is slower than both everywhere); Cholesky + inverse
#: 2.2-3.4x up to k = 128, 1.1-1.2x at 256; LU solve 1.4-3.1x up to 64, 1.1-1.4x at 128,
#: 0.75x at 256. The solve stays native at every k anyway: with torch 2.13's CPU build, while a
#: thread count >= 2 set by ``torch.set_num_threads`` is in effect, batched
#: ``torch.linalg.solve_ex`` of 256 x 256 matrices returns wrong solutions with ``info = 0`` (or
#: raises about lu_solve's pivots); ``tests/test_smallmat_dispatch.py`` checks the dispatched
#: solve under such a setting.
NATIVE_CPU_MAX_K = {"inv_sqrt_spd": 64, "cholesky_upper_inverse": None, "solve": None}


#: Whether the native CUDA kernels are the default on CUDA. False until a GPU measures them
#: against torch.linalg with ``bench/bench_smallmat.py`` (issue 5's GPU half is pending).
NATIVE_CUDA_DEFAULT = False

_MODES = ("auto", "native", "torch")


def implementation(op: str, device_type: str, k: int) -> str:
    """``"native"`` or ``"torch"``: what ``op`` runs for a ``(..., k, k)`` input on ``device_type``."""
    mode = os.environ.get("STIEFEL_KERNELS_SMALLMAT", "auto")
    if mode not in _MODES:
        raise ValueError(f"STIEFEL_KERNELS_SMALLMAT must be one of {_MODES}, got {mode!r}")
    if os.environ.get("STIEFEL_KERNELS_NO_NATIVE") == "1" or mode == "torch":
        return "torch"
    built = _native.has_op(op, device_type)
    if mode == "native":
        if not built:
            raise RuntimeError(
                f"STIEFEL_KERNELS_SMALLMAT=native but stiefel_kernels._C has no {device_type} kernel "
                f"for {op} (extension not built, or built without CUDA: {_native.load_error})")
        return "native"
    if not built:
        return "torch"
    if device_type == "cpu":
        limit = NATIVE_CPU_MAX_K[op]
        return "torch" if limit is not None and k > limit else "native"
    if device_type == "cuda" and NATIVE_CUDA_DEFAULT:
        return "native"
    return "torch"


def _use_native(t: Tensor, op: str) -> bool:
    return implementation(op, t.device.type, t.shape[-1]) == "native"


def inv_sqrt_spd_torch(m: Tensor) -> tuple[Tensor, Tensor]:
    """``M^(-1/2)`` of symmetric positive definite ``(..., k, k)`` by ``torch.linalg.eigh``."""
    evals, evecs = torch.linalg.eigh(m)
    info = (evals <= 0).sum(dim=-1).to(torch.int32)
    inv_sqrt = evals.clamp_min(torch.finfo(m.dtype).tiny).rsqrt()
    return (evecs * inv_sqrt.unsqueeze(-2)) @ evecs.mT, info


def newton_schulz_inv_sqrt(m: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Coupled Newton–Schulz on ``M / c``: returns ``(Z, c)`` with ``Z c^(-1/2) ~ M^(-1/2)``.

    ``c`` (``(..., 1, 1)``) is the smaller of two upper bounds of the largest eigenvalue of a
    symmetric ``M``: its largest absolute row sum and ``1 + ||M - I||_F`` (the tight one when
    ``M`` is near ``I``, as for an orthonormality correction: the spectrum of ``M / c`` then
    starts within ``2 ||M - I||_F`` of 1). The spectrum of ``M / c`` lies in ``(0, 1]`` for SPD
    ``M``, where the iteration ``T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z`` converges: about
    ``log_1.5(cond)`` steps to reach the quadratic phase (residual ``e -> 3e^2/4``), then a few
    more. Matrix products only: no host sync.
    """
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
    row_sum = m.abs().sum(dim=-1).amax(dim=-1)
    c = torch.minimum(row_sum, 1.0 + torch.linalg.matrix_norm(m - eye))[..., None, None]
    y, z = m / c, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return z, c


def inv_sqrt_spd_newton_schulz(m: Tensor, iters: int = 20) -> tuple[Tensor, Tensor]:
    """``M^(-1/2)`` by :func:`newton_schulz_inv_sqrt`, a fixed number of steps (no host sync).

    20 steps reach the dtype's rounding level up to condition number ~1e4 (float32 and float64,
    k = 8..128). ``info``: -1 for a non-finite input, -2 where the residual
    ``||X M X - I||_F`` exceeds ``sqrt(eps)`` (not converged: ill-conditioned or not positive
    definite; unlike the eigh formulation this does not count the bad eigenvalues).
    """
    z, c = newton_schulz_inv_sqrt(m, iters)
    x = z * c.rsqrt()
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    resid = torch.linalg.matrix_norm(x @ m @ x - eye)
    finite = torch.isfinite(m).flatten(-2).all(dim=-1)
    tol = torch.finfo(m.dtype).eps ** 0.5
    info = torch.where(finite, torch.where(resid <= tol, 0, -2), -1).to(torch.int32)
    return x, info


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
