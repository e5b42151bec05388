"""Stiefel-manifold geometry on full matrices: the literal definitions.

Everything here works in **column form**: ``X`` has shape ``(..., n, r)`` with ``n >= r`` and
``X^T X = I_r``; leading dimensions are a batch (a stack of factors). Users store factors the
other way round too (LoRA's ``A`` is ``r x n``, orthonormal rows); :func:`as_column_form` turns
any stored factor into its column-form view without copying.

These functions are the specification. The fast path (:mod:`stiefel_kernels.gram`) computes
the same points from three ``r x r`` Gram matrices and is tested against them.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "sym",
    "skew",
    "is_row_orthonormal",
    "as_column_form",
    "project_tangent",
    "riemannian_gradient",
    "retract_qr",
    "retract_polar",
    "retract_newton_schulz",
    "retract_cayley",
    "retract_cayley_direct",
    "retract_cayley_fixed_point",
    "cayley_step_size",
    "orthogonality_error",
    "orthonormalize_",
    "random_stiefel",
]


def sym(m: Tensor) -> Tensor:
    """Symmetric part ``(M + M^T) / 2`` of ``(..., k, k)`` matrices."""
    return 0.5 * (m + m.mT)


def skew(m: Tensor) -> Tensor:
    """Skew-symmetric part ``(M - M^T) / 2`` of ``(..., k, k)`` matrices."""
    return 0.5 * (m - m.mT)


def is_row_orthonormal(shape: torch.Size | tuple[int, ...]) -> bool:
    """True when a stored factor of this shape is orthonormal by rows (it is wide: rows < cols).

    A tall or square matrix is orthonormal by columns (a square one is orthogonal).
    """
    if len(shape) < 2:
        raise ValueError(f"a Stiefel factor needs at least 2 dims, got shape {tuple(shape)}")
    return shape[-2] < shape[-1]


def as_column_form(p: Tensor) -> Tensor:
    """View of a stored factor ``(..., a, b)`` as ``X`` of shape ``(..., max(a,b), min(a,b))``.

    Wide factors (orthonormal rows) are transposed; this is a view, writes go through.
    """
    return p.mT if is_row_orthonormal(p.shape) else p


def project_tangent(x: Tensor, d: Tensor) -> Tensor:
    """Orthogonal projection onto the tangent space: ``P_X(D) = D - X sym(X^T D)``.

    Args:
        x: ``(..., n, r)`` point on the Stiefel manifold.
        d: ``(..., n, r)`` ambient direction.
    Returns:
        ``(..., n, r)`` tangent vector ``xi`` with ``X^T xi`` skew-symmetric.
    """
    return d - x @ sym(x.mT @ d)


def riemannian_gradient(x: Tensor, grad: Tensor) -> Tensor:
    """StelLA's Euclidean-to-Riemannian gradient ``grad - X grad^T X`` (``(..., n, r)``).

    Equal to ``2 * skew`` part plus normal part; on the manifold it differs from
    :func:`project_tangent` only by the tangential scaling of the canonical metric.
    """
    return grad - x @ grad.mT @ x


def _eye_like(x: Tensor, k: int) -> Tensor:
    return torch.eye(k, dtype=x.dtype, device=x.device).expand(*x.shape[:-2], k, k)


def retract_qr(x: Tensor, xi: Tensor) -> Tensor:
    """QR retraction: the Q factor (positive diagonal of R) of ``X + xi``; ``(..., n, r)``."""
    q, r = torch.linalg.qr(x + xi)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def retract_polar(x: Tensor, xi: Tensor) -> Tensor:
    """Polar retraction: ``Z (Z^T Z)^(-1/2)`` with ``Z = X + xi``, via the thin SVD ``U V^T``."""
    u, _, vh = torch.linalg.svd(x + xi, full_matrices=False)
    return u @ vh


def newton_schulz_scale(gram: Tensor) -> Tensor:
    """Scale ``s`` (shape ``(..., 1, 1)``) that puts every singular value of ``s Z`` below
    ``sqrt(2.5)`` given ``gram = Z^T Z``, so the cubic Newton–Schulz iteration converges.

    Uses ``||Z^T Z||_2 <= max row sum of |Z^T Z|``; ``s = 1`` whenever that bound is ``<= 2.5``
    (the usual case: a retraction step is small), so no accuracy is lost then.
    """
    bound = gram.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)
    return torch.clamp(2.5 / bound, max=1.0).sqrt()


def retract_newton_schulz(x: Tensor, xi: Tensor, steps: int = 6) -> Tensor:
    """Polar factor of ``Z = X + xi`` by ``steps`` cubic Newton–Schulz iterations
    ``Y <- Y (3I - Y^T Y) / 2`` from ``Y_0 = s Z`` (see :func:`newton_schulz_scale`); ``(..., n, r)``.

    Converges quadratically to :func:`retract_polar`; with few steps it is an approximate retraction.
    """
    z = x + xi
    y = z * newton_schulz_scale(z.mT @ z)
    eye = _eye_like(x, x.shape[-1])
    for _ in range(steps):
        y = 0.5 * y @ (3.0 * eye - y.mT @ y)
    return y


def _cayley_factors(x: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
    """``(Pxi, X)`` with ``W = Pxi X^T - X Pxi^T`` and ``Pxi = (I - X X^T / 2) xi``, so ``W X = xi``."""
    pxi = xi - 0.5 * x @ (x.mT @ xi)
    return pxi, x


def retract_cayley_direct(x: Tensor, xi: Tensor) -> Tensor:
    """Cayley retraction by its definition: solve ``(I - W/2) Y = (I + W/2) X`` with the
    ``n x n`` skew matrix ``W``. Costs ``O(n^3)``: for tests and small ``n`` only."""
    pxi, _ = _cayley_factors(x, xi)
    w = pxi @ x.mT - x @ pxi.mT
    eye = _eye_like(x, x.shape[-2])
    return torch.linalg.solve(eye - 0.5 * w, x + 0.5 * w @ x)


def retract_cayley(x: Tensor, xi: Tensor) -> Tensor:
    """Exact Cayley retraction through Sherman–Morrison–Woodbury, ``O(n r^2)``.

    With ``W = U V^T``, ``U = [Pxi, X]``, ``V = [X, -Pxi]`` (``n x 2r``):
    ``Y = X + U (I_2r - V^T U / 2)^(-1) V^T X``. Equal to :func:`retract_cayley_direct`.
    """
    pxi, _ = _cayley_factors(x, xi)
    u = torch.cat([pxi, x], dim=-1)
    v = torch.cat([x, -pxi], dim=-1)
    eye = _eye_like(x, 2 * x.shape[-1])
    return x + u @ torch.linalg.solve(eye - 0.5 * v.mT @ u, v.mT @ x)


def cayley_step_size(x: Tensor, eta: Tensor, lr: float | Tensor) -> Tensor:
    """Step size ``min(lr, 1 / ||W(eta)||_F)`` of the Cayley fixed-point iteration, ``(..., 1, 1)``.

    ``W(eta)`` is the skew matrix of :func:`retract_cayley_fixed_point` for the tangent direction
    ``eta`` (``(..., n, r)``). Li, Li & Todorovic (2020) clip the step like this so that
    ``||W / 2|| <= 1/2`` and the fixed-point iteration contracts; without it a large learning
    rate makes the iteration diverge. ``||W||_F^2 = tr((U^T U)(V^T V))`` for ``W = U V^T``.
    """
    pxi, _ = _cayley_factors(x, eta)
    u = torch.cat([pxi, x], dim=-1)
    v = torch.cat([x, -pxi], dim=-1)
    w_norm = torch.einsum("...ij,...ji->...", u.mT @ u, v.mT @ v).clamp_min(0).sqrt()
    lr = torch.as_tensor(lr, dtype=x.dtype, device=x.device)
    return torch.minimum(lr, 1.0 / w_norm.clamp_min(torch.finfo(x.dtype).tiny)[..., None, None])


def retract_cayley_fixed_point(x: Tensor, xi: Tensor, iters: int = 2) -> Tensor:
    """Cayley retraction approximated by the fixed-point iteration of Li, Li & Todorovic (2020):
    ``Y_0 = X + xi``, then ``iters`` times ``Y <- X + W (X + Y) / 2``; ``(..., n, r)``.

    ``W`` is applied through its two factors, never formed. Each iteration gains one order in
    ``||W||``; the result is orthonormal up to ``O(||W||^(iters + 2))``.
    """
    pxi, _ = _cayley_factors(x, xi)
    y = x + xi
    for _ in range(iters):
        v = 0.5 * (x + y)
        y = x + pxi @ (x.mT @ v) - x @ (pxi.mT @ v)
    return y


def orthogonality_error(p: Tensor) -> Tensor:
    """``||X^T X - I||_F`` per matrix, computed in float64, for a stored factor in either
    orientation (``(..., a, b)`` -> ``(...)``)."""
    x = as_column_form(p.detach()).to(torch.float64)
    eye = torch.eye(x.shape[-1], dtype=torch.float64, device=x.device)
    return torch.linalg.matrix_norm(x.mT @ x - eye)


@torch.no_grad()
def orthonormalize_(p: Tensor) -> Tensor:
    """Make a stored factor orthonormal on its shorter side, in place, by a QR factorization.

    In column form ``X_old = X_new R`` with ``R`` upper triangular (positive diagonal). The
    returned ``R`` (``(..., r, r)``) lets a caller keep a product unchanged: for ``W = B A`` with
    a wide ``A`` (row-orthonormal), ``A_old = R^T A_new``, so set ``B <- B R^T``.

    Args:
        p: ``(..., a, b)`` factor with ``min(a, b) >= 1``; must have full rank ``min(a, b)``.
    Returns:
        ``R`` of shape ``(..., min(a,b), min(a,b))`` in ``p``'s dtype.
    Raises:
        ValueError: if ``p`` has fewer than 2 dims, is complex, or is rank deficient.
    """
    if p.dim() < 2:
        raise ValueError(f"orthonormalize_ needs a matrix or a stack of matrices, got shape {tuple(p.shape)}")
    if p.is_complex():
        raise ValueError("orthonormalize_ supports real tensors only")
    x = as_column_form(p)
    work = x.to(torch.float64) if x.dtype != torch.float64 else x
    q, r = torch.linalg.qr(work)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    diag_abs = torch.diagonal(r, dim1=-2, dim2=-1).abs()
    scale = diag_abs.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    if bool((diag_abs <= 1e-12 * scale).any()):
        raise ValueError("orthonormalize_: the factor is rank deficient; initialize it with full rank")
    q = q * signs.unsqueeze(-2)
    r = r * signs.unsqueeze(-1)
    x.copy_(q.to(x.dtype))
    return r.to(p.dtype)


def random_stiefel(*shape: int, dtype: torch.dtype = torch.float32, device=None,
                   generator: torch.Generator | None = None) -> Tensor:
    """A random factor of stored shape ``shape`` (``(..., a, b)``), orthonormal on its shorter
    side, drawn uniformly (Haar) by QR of a Gaussian matrix."""
    g = torch.randn(*shape, dtype=torch.float64, generator=generator)
    orthonormalize_(g)
    return g.to(dtype=dtype, device=device)
