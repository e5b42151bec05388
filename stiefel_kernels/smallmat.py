"""Batched small-matrix solves of the retraction's r x r step, with one signature per operation.

Each function takes a batch ``(..., k, k)`` and returns ``(result, info)`` where ``info`` is an
``int32`` tensor of shape ``(...)``: 0 where the factorization succeeded, nonzero where it
failed (the result is then not to be trusted). No function reads ``info`` on the host, so none
synchronizes with the device; the optimizer folds ``info`` into a flag it reads lazily.

:func:`inv_sqrt_spd`, :func:`cholesky_upper_inverse` and :func:`solve` call the operators
``torch.ops.stiefel_kernels.*``; the dispatcher picks their kernel per device
(:mod:`stiefel_kernels.ops`): the native CPU kernels of ``stiefel_kernels._C`` when it is
built, the default torch.linalg formulations (``*_torch``, also the tests' oracle) elsewhere,
the native CUDA kernels only once enabled (:func:`stiefel_kernels._native.enable_cuda_kernels`).
The Newton–Schulz inverse square root below is products only (the orthonormality correction
uses it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _native  # noqa: F401  (defines the ops and loads the native kernels)
from .ops import cholesky_upper_inverse_torch, inv_sqrt_spd_torch, solve_torch

__all__ = ["inv_sqrt_spd", "cholesky_upper_inverse", "solve", "inv_sqrt_spd_torch",
           "cholesky_upper_inverse_torch", "solve_torch", "inv_sqrt_spd_newton_schulz",
           "newton_schulz_inv_sqrt", "bmm"]


def bmm(a: Tensor, b: Tensor, add: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``add + alpha * (a @ b)`` for batches ``a`` ``(..., m, k)``, ``b`` ``(..., k, n)`` of one
    batch shape (``add``: ``(..., m, n)`` or ``None``); a new tensor, contiguous.

    The operator ``torch.ops.stiefel_kernels.small_bmm``: on the CPU with the native extension,
    its AVX-512 kernel (``csrc/small_bmm_cpu.cpp``: ~1.9x torch's MKL bmm at ``r = 64`` on the
    AMD CPU it was measured on); elsewhere ``torch.baddbmm``. The two agree to rounding, not bit
    for bit; the native kernel gives the same bits at any thread count. Other dtypes, and
    operands that need gradients, take ``a @ b`` (the op has no autograd formula).
    """
    if (a.dtype not in (torch.float32, torch.float64) or torch.is_grad_enabled()
            and (a.requires_grad or b.requires_grad or (add is not None and add.requires_grad))):
        # the op has float32/float64 kernels and no autograd formula: torch for anything else
        prod = a @ b
        prod = prod if alpha == 1.0 else prod * alpha
        return prod if add is None else add + prod
    batch = a.shape[:-2]
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    count = math.prod(batch)
    a3 = a.reshape(count, m, k)
    b3 = b.reshape(count, k, n)
    d3 = None if add is None else add.reshape(count, m, n)
    return torch.ops.stiefel_kernels.small_bmm(a3, b3, d3, float(alpha)).reshape(*batch, m, n)


def newton_schulz_inv_sqrt(m: Tensor, iters: int, dist_to_eye: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Coupled Newton–Schulz on ``M / c``: returns ``(Z, c)`` with ``Z c^(-1/2) ~ M^(-1/2)``.

    ``c`` (``(..., 1, 1)``) is the smaller of two upper bounds of the largest eigenvalue of a
    symmetric ``M``: its largest absolute row sum and ``1 + ||M - I||_F`` (the tight one when
    ``M`` is near ``I``, as for an orthonormality correction: the spectrum of ``M / c`` then
    starts within ``2 ||M - I||_F`` of 1). The spectrum of ``M / c`` lies in ``(0, 1]`` for SPD
    ``M``, where the iteration ``T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z`` converges: about
    ``log_1.5(cond)`` steps to reach the quadratic phase (residual ``e -> 3e^2/4``), then a few
    more. Matrix products only: no host sync.

    ``dist_to_eye``: ``||M - I||_F`` (shape ``(...)``) when the caller has it already.
    """
    if dist_to_eye is None:
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
        dist_to_eye = torch.linalg.matrix_norm(m - eye)
    row_sum = m.abs().sum(dim=-1).amax(dim=-1)
    c = torch.minimum(row_sum, 1.0 + dist_to_eye)[..., None, None]
    y = m / c
    z = None  # the identity: the first step's products with it are skipped (they are exact)
    for i in range(iters):
        # T = (3I - Z Y) / 2 as -ZY/2 with 3/2 added on the diagonal: the same bits (halving
        # is exact and commutes with rounding), without an r x r identity
        t = (y if z is None else z @ y).mul(-0.5)
        t.diagonal(dim1=-2, dim2=-1).add_(1.5)
        z = t if z is None else t @ z
        if i + 1 < iters:  # the last step's Y is not used
            y = y @ t
    if z is None:
        z = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
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


#: Newton–Schulz steps of the inverse square root on CUDA without the native kernels: in float64,
#: 30 steps reach rounding level (~1e-11 relative) up to condition number 1e7, beyond what a
#: float32 step can mean (20 steps stop converging at ~1e6)
CUDA_NS_ITERS = 30


def inv_sqrt_spd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse square root of symmetric positive definite ``(..., k, k)``; returns ``(M^(-1/2), info)``.

    On CUDA, unless the native CUDA kernels are enabled, this is :func:`inv_sqrt_spd_newton_schulz`
    in float64 (:data:`CUDA_NS_ITERS` steps): the default kernel's ``torch.linalg.eigh`` waits
    for the device (it checks its own ``info`` on the host), which would stall every step of
    ``polar`` / ``qr`` / ``newton_schulz`` and make it impossible to capture in a CUDA graph."""
    if m.device.type == "cuda" and not _native.cuda_kernels_enabled:
        x, info = inv_sqrt_spd_newton_schulz(m.double(), CUDA_NS_ITERS)
        return x.to(m.dtype), info
    return torch.ops.stiefel_kernels.inv_sqrt_spd(m)


def cholesky_upper_inverse(m: Tensor) -> tuple[Tensor, Tensor]:
    """``(R^(-1), info)`` with ``R`` upper triangular, ``R^T R = M`` (``(..., k, k)`` SPD)."""
    return torch.ops.stiefel_kernels.cholesky_upper_inverse(m)


def solve(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``(A^(-1) B, info)`` for ``A`` ``(..., k, k)``, ``B`` ``(..., k, m)``."""
    return torch.ops.stiefel_kernels.solve(a, b)
