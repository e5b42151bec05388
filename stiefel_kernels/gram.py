"""The Gram/coefficient form of every retraction (docs/design.md, "The fast path").

For ``X`` (``(..., n, r)``, column form) and a direction ``D`` of the same shape, every
retraction of ``Z = X + xi``, ``xi = -lr P_X(D)``, lands in ``span(X, D)``:

    Y = X C + D E,   C, E of shape (..., r, r),

and ``C, E`` depend only on ``lr`` and the three Gram matrices

    K = X^T X,  G = X^T D,  H = D^T D.

So a step is: :func:`gram_pass` (one streaming pass), :func:`retraction_coefficients`
(``r x r`` math, batched over all factors, no host sync), :func:`apply_coefficients` (one more
streaming pass). Each coefficient form reproduces its full-matrix definition in
:mod:`stiefel_kernels.geometry` to rounding; ``tests/test_geometry.py``
(``test_gram_form_equals_full_matrix_form``) checks that in float64.

Derivations (``sym(M) = (M + M^T)/2``):

* ``xi = -lr (D - X sym(G))``  so ``Z = X C0 + D E0`` with ``C0 = I + lr sym(G)``, ``E0 = -lr I``.
* ``Z^T Z = C0^T K C0 + C0^T G E0 + E0^T G^T C0 + E0^T H E0``  (:func:`coefficient_gram`).
* polar: ``(C, E) = (C0, E0) (Z^T Z)^(-1/2)``;  QR: ``(C, E) = (C0, E0) R^(-1)``, ``R^T R = Z^T Z``.
* Newton–Schulz: ``Y_k = Z P_k``, ``P_(k+1) = P_k (3I - P_k^T (Z^T Z) P_k) / 2``, ``P_0 = s I``.
* Cayley: with ``Q = [X, D]`` (``n x 2r``) and ``Pxi = X a + D b``,
  ``a = lr sym(G) - lr (K sym(G) - G) / 2``, ``b = -lr I``, the skew ``W = Pxi X^T - X Pxi^T``
  equals ``Q M Q^T`` with ``M = [[a - a^T, -b^T], [b, 0]]``, hence ``W Q c = Q (M N c)`` with
  ``N = Q^T Q = [[K, G], [G^T, H]]``. Writing ``Y = Q c`` (``c`` is ``2r x r``), exact Cayley is
  the ``2r x 2r`` solve ``(I - MN/2) c = (I + MN/2) e1`` and the fixed-point iteration is
  ``c <- e1 + MN (e1 + c) / 2`` from ``c_0 = [C0; E0]``.

Orthonormality correction (:func:`orthonormality_correction`): ``cayley_fp`` is orthonormal only
to ``O(||W||^(iters+2))``, ``newton_schulz`` only to its convergence, the exact Cayley
transform preserves whatever ``X^T X`` it is given, and every output carries rounding. Since ``Y^T Y`` is known from ``K, G, H, C, E``
(:func:`coefficient_gram`), the step folds ``S = (Y^T Y)^(-1/2)`` into ``(C, E)`` where
``||Y^T Y - I||_F > tol``: the output becomes ``polar(Y)``, the closest orthonormal point, at
``r x r`` cost and without another pass over the factor (:func:`step_coefficients`).

Accuracy: :func:`gram_pass` sums float32 products over chunks of :data:`GRAM_CHUNK_ROWS` rows and
adds the chunks in float64, so the error of ``K`` does not grow with ``n`` (a single float32
matmul over 10^6 rows is off by ~4e-4 in ``K``, which no correction computed from ``K`` can see).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _native, smallmat
from ._buckets import working_dtype
from .geometry import newton_schulz_scale, sym

__all__ = [
    "RETRACTIONS",
    "canonical_retraction",
    "gram_pass",
    "coefficient_gram",
    "retraction_coefficients",
    "orthonormality_correction",
    "step_coefficients",
    "apply_coefficients",
]

#: canonical retraction names -> what they are
RETRACTIONS = {
    "cayley_fp": "Cayley transform by fixed-point iteration (default)",
    "cayley": "exact Cayley transform (Sherman-Morrison-Woodbury, a 2r x 2r solve)",
    "qr": "Q factor of X + xi (Cholesky of the r x r Gram matrix)",
    "polar": "polar factor of X + xi (inverse square root of the r x r Gram matrix)",
    "newton_schulz": "polar factor of X + xi by Newton-Schulz iterations",
}
_ALIASES = {"cayley_smw": "cayley", "cayley_direct": "cayley", "cayley_exact": "cayley",
            "ns": "newton_schulz", "cayley_fixed_point": "cayley_fp"}


def canonical_retraction(name: str) -> str:
    """Map a retraction name (the paper's aliases included) to its canonical name.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    if not isinstance(name, str):
        raise ValueError(f"retraction must be a string, got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in RETRACTIONS:
        valid = sorted(set(RETRACTIONS) | set(_ALIASES))
        raise ValueError(f"unknown retraction {name!r}; choose one of {valid}")
    return key


#: rows of one partial Gram sum in :func:`gram_pass` (the partial sums are added in float64)
GRAM_CHUNK_ROWS = 4096


def gram_pass(x: Tensor, d: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``K = X^T X``, ``G = X^T D``, ``H = D^T D`` for ``x``, ``d`` of shape ``(..., n, r)``.

    Products in ``dtype`` (default: float32 for half types, else the input dtype) over chunks of
    :data:`GRAM_CHUNK_ROWS` rows, chunks added in float64 in a fixed order (so the rounding error
    does not grow with ``n``; float32 on MPS, which has no float64). Returns three ``(..., r, r)``
    tensors of ``dtype``.
    """
    if dtype is None:
        dtype = working_dtype(x)
    x = x.to(dtype)
    d = d.to(dtype)
    n = x.shape[-2]
    if n <= GRAM_CHUNK_ROWS:
        return x.mT @ x, x.mT @ d, d.mT @ d
    # A loop over row slices, not one batched matmul over a (..., chunks, rows, r) view: such a
    # view of a stack (or of transposed wide factors) cannot be flattened, and matmul then copies
    # it (8x slower on the CPU for 8 factors of 16 x 100000).
    acc = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    k = g = h = None
    for start in range(0, n, GRAM_CHUNK_ROWS):
        xs, ds = x[..., start:start + GRAM_CHUNK_ROWS, :], d[..., start:start + GRAM_CHUNK_ROWS, :]
        pk, pg, ph = (xs.mT @ xs).to(acc), (xs.mT @ ds).to(acc), (ds.mT @ ds).to(acc)
        k, g, h = (pk, pg, ph) if k is None else (k + pk, g + pg, h + ph)
    return k.to(dtype), g.to(dtype), h.to(dtype)


def coefficient_gram(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """``Y^T Y`` for ``Y = X C + D E`` from the Gram matrices; all ``(..., r, r)``."""
    ctg_e = c.mT @ g @ e
    return c.mT @ k @ c + ctg_e + ctg_e.mT + e.mT @ h @ e


def _lr_tensor(lr: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(lr, Tensor):
        lr = lr.to(dtype=like.dtype, device=like.device)
    else:  # a fill on the device: as_tensor would copy a host scalar, which waits for the device
        lr = torch.full((), float(lr), dtype=like.dtype, device=like.device)
    while lr.dim() < like.dim():
        lr = lr.unsqueeze(-1)
    return lr


def _eye(like: Tensor, k: int) -> Tensor:
    return torch.eye(k, dtype=like.dtype, device=like.device).expand(*like.shape[:-2], k, k)


def _sym_coefficient_gram(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """``sym(Y^T Y)`` (:func:`coefficient_gram`) with five ``r x r`` products instead of six:
    ``sym(C^T G E + E^T G^T C) = sym(2 C^T G E)``, so ``sym(C^T (K C + 2 G E) + E^T (H E))``."""
    mm = smallmat.bmm
    inner = mm(g, e, mm(k, c), alpha=2.0)
    yty = mm(e.mT, mm(h, e), mm(c.mT, inner))
    return sym(yty)


def retraction_coefficients(
    k: Tensor,
    g: Tensor,
    h: Tensor,
    lr: float | Tensor,
    retraction: str,
    *,
    cayley_iters: int = 2,
    ns_steps: int = 6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients ``(C, E)`` of ``Y = X C + D E = R_X(-lr P_X(D))`` for a batch of factors.

    For ``cayley_fp`` the step is ``min(lr, 1/||W_1||_F)`` (:func:`cayley_step_size`, Li et al.
    2020), so the fixed-point iteration contracts for any learning rate.

    Args:
        k, g, h: ``(..., r, r)`` Gram matrices from :func:`gram_pass`.
        lr: learning rate, a float or a tensor broadcastable to ``(..., 1, 1)``.
        retraction: a name accepted by :func:`canonical_retraction`.
        cayley_iters: fixed-point iterations of ``cayley_fp``.
        ns_steps: iterations of ``newton_schulz``.
    Returns:
        ``(C, E, info)``: ``C``, ``E`` of shape ``(..., r, r)``; ``info`` int32 ``(...)``, nonzero
        where an ``r x r`` factorization failed (QR, polar, exact Cayley).
    """
    retraction = canonical_retraction(retraction)
    r = k.shape[-1]
    if retraction == "cayley_fp":
        c, e = _cayley_fp_coefficients(k.reshape(-1, r, r), g.reshape(-1, r, r),
                                       h.reshape(-1, r, r), _flat_lr(lr, k).view(-1, 1, 1),
                                       cayley_iters)
        info = torch.zeros(k.shape[:-2], dtype=torch.int32, device=k.device)
        return c.reshape(k.shape), e.reshape(k.shape), info
    lr = _lr_tensor(lr, k)
    eye = _eye(k, r)
    sg = sym(g)
    mn1 = _cayley_mn1(k, g, h, sg) if retraction == "cayley" else None
    c0 = eye + lr * sg
    e0 = -lr * eye
    info = torch.zeros(k.shape[:-2], dtype=torch.int32, device=k.device)

    if retraction in ("polar", "qr", "newton_schulz"):
        m = coefficient_gram(k, g, h, c0, e0)
        if retraction == "polar":
            s, info = smallmat.inv_sqrt_spd(sym(m))
        elif retraction == "qr":
            s, info = smallmat.cholesky_upper_inverse(sym(m))
        else:
            s = newton_schulz_scale(m) * eye
            for _ in range(ns_steps):
                s = 0.5 * s @ (3.0 * eye - s.mT @ m @ s)
        return c0 @ s, e0 @ s, info

    # exact Cayley: coefficients c (2r x r) of Y = [X, D] c from the 2r x 2r solve
    e1 = torch.cat([eye, torch.zeros_like(k)], dim=-2)
    amat = lr * mn1
    c, info = smallmat.solve(_eye(k, 2 * r) - 0.5 * amat, e1 + 0.5 * amat @ e1)
    return c[..., :r, :], c[..., r:, :], info


def _flat_lr(lr: float | Tensor, k: Tensor) -> Tensor:
    """``lr`` (a float, or a tensor broadcastable to ``k``'s batch ``(..., 1, 1)``) as a 1-D
    tensor of ``k``'s dtype: one element, or one per factor of the flattened batch."""
    lr = _lr_tensor(lr, k)
    return lr.reshape(1) if lr.numel() == 1 else lr.expand(*k.shape[:-2], 1, 1).reshape(-1)


def _cayley_fp_coefficients(k: Tensor, g: Tensor, h: Tensor, lr: Tensor,
                            iters: int) -> tuple[Tensor, Tensor]:
    """``cayley_fp``'s ``(C, E)`` (``(B, r, r)`` each, for ``(B, r, r)`` Gram matrices and
    ``lr`` of shape ``(1, 1, 1)`` or ``(B, 1, 1)``) by the blocks of ``M_1 N`` (:func:`_cayley_mn1`):
    the same math as the dense iteration ``c <- e1 + (lr/2) M_1 N (e1 + c)`` with fewer
    products (``tests/test_gram_small_step.py`` compares the two in float64).

    * the step size ``min(lr, 1/||W_1||_F)`` from ``tr((M_1 N)^2)`` as sums of elementwise
      products of the blocks (``O(r^2)``, not a ``2r x 2r`` product);
    * the first iteration starts from ``c_0 = [I + lr sym(G); -lr I]``, whose blocks are
      multiples of ``I`` and ``sym(G)``: its bottom block reuses ``K sym(G)`` (computed for
      ``a_1``) and its top block takes one ``r x r`` product instead of two;
    * the identities are added on the diagonal in place, not as ``r x r`` sums.

    ``r x r`` products: 3 for the blocks, 1 for the first iteration, 4 for each further one
    (the dense form: a ``2r x 2r`` product for the step size and 4 per iteration). With
    ``iters = 0``: ``c_0`` with the clipped step."""
    mm = smallmat.bmm
    sg = (g + g.mT).mul_(0.5)
    ksg = mm(k, sg)
    a = (ksg - g).mul_(-0.5).add_(sg)  # sym(G) - (K sym(G) - G) / 2
    skew = a - a.mT
    p11 = mm(skew, k, g.mT)  # A K + G^T
    p12 = mm(skew, g, h)     # A G + H
    # ||W_1||_F^2 = -tr((M_1 N)^2), M_1 N = [[P11, P12], [-K, -G]]
    trace = ((p11 * p11.mT).sum((-2, -1)) - 2.0 * (p12 * k.mT).sum((-2, -1))
             + (g * g.mT).sum((-2, -1)))
    w_norm = (-trace).clamp_min(0).sqrt()
    lr = torch.minimum(lr, 1.0 / w_norm.clamp_min(torch.finfo(k.dtype).tiny)[..., None, None])
    half_lr = 0.5 * lr
    if iters == 0:  # c_0 = [I + lr sym(G); -lr I]
        c = sg * lr
        c.diagonal(dim1=-2, dim2=-1).add_(1.0)
        return c, (-lr) * torch.eye(k.shape[-1], dtype=k.dtype, device=k.device).expand_as(k)
    # iteration 1, from U = e1 + c_0 = [2I + lr sym(G); -lr I]:
    #   C = I + (lr/2) (2 P11 + lr (P11 sym(G) - P12)),  E = -(lr/2) (2K + lr (K sym(G) - G))
    c = mm(p11, sg).sub_(p12).mul_(lr).add_(p11, alpha=2.0).mul_(half_lr)
    c.diagonal(dim1=-2, dim2=-1).add_(1.0)
    e = (ksg - g).mul_(lr).add_(k, alpha=2.0).mul_(-half_lr)
    for _ in range(iters - 1):
        u1 = c.clone()
        u1.diagonal(dim1=-2, dim2=-1).add_(1.0)
        top = mm(p12, e, mm(p11, u1))
        e = mm(g, e, mm(k, u1)).mul_(-half_lr)
        c = top.mul_(half_lr)
        c.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return c, e


def _cayley_generator(k: Tensor, g: Tensor, sg: Tensor, lr: Tensor) -> Tensor:
    """Skew ``M`` (``(..., 2r, 2r)``) with ``W = Q M Q^T``, ``Q = [X, D]`` (module docstring).
    The dense form: the step uses ``M N`` by blocks (:func:`_cayley_mn1`); the tests compare
    the two."""
    eye = _eye(k, k.shape[-1])
    a = lr * sg - 0.5 * lr * (k @ sg - g)
    b = -lr * eye
    zeros = torch.zeros_like(k)
    mw = torch.cat([torch.cat([a - a.mT, -b.mT], dim=-1), torch.cat([b, zeros], dim=-1)], dim=-2)
    return mw


def cayley_step_size(k: Tensor, g: Tensor, h: Tensor, lr: Tensor) -> Tensor:
    """``min(lr, 1/||W_1||_F)`` from the Gram matrices, ``(..., 1, 1)``: the coefficient form of
    :func:`stiefel_kernels.geometry.cayley_step_size`: ``W = lr W_1`` and, ``M`` being skew,
    ``||W||_F^2 = tr(M^T N M N) = -tr((M N)^2)``."""
    return _step_size_from_mn1(_cayley_mn1(k, g, h, sym(g)), lr)


def _step_size_from_mn1(mn1: Tensor, lr: Tensor) -> Tensor:
    """:func:`cayley_step_size` from ``M_1 N`` (:func:`_cayley_mn1`)."""
    w_norm = (-(mn1 * mn1.mT).sum((-2, -1))).clamp_min(0).sqrt()  # tr(A A) without the product
    return torch.minimum(lr, 1.0 / w_norm.clamp_min(torch.finfo(mn1.dtype).tiny)[..., None, None])


def _cayley_mn1(k: Tensor, g: Tensor, h: Tensor, sg: Tensor) -> Tensor:
    """``M_1 N`` (``(..., 2r, 2r)``; ``M = lr M_1``, module docstring) by blocks: with
    ``b = -I``, ``M_1 = [[A, I], [-I, 0]]``, ``A = a_1 - a_1^T``, ``a_1 = sym(G) - (K sym(G) - G)/2``:

        M_1 N = [[A K + G^T, A G + H], [-K, -G]]

    two ``r x r`` products (and ``K sym(G)``) instead of a dense ``2r x 2r`` product with
    ``M_1``'s identity and zero blocks."""
    a = sg - 0.5 * (k @ sg - g)
    skew = a - a.mT
    top = torch.cat([skew @ k + g.mT, skew @ g + h], dim=-1)
    return torch.cat([top, torch.cat([-k, -g], dim=-1)], dim=-2)


def _gram_2r(k: Tensor, g: Tensor, h: Tensor) -> Tensor:
    """``N = [X, D]^T [X, D] = [[K, G], [G^T, H]]``, ``(..., 2r, 2r)``."""
    return torch.cat([torch.cat([k, g], dim=-1), torch.cat([g.mT, h], dim=-1)], dim=-2)


#: coupled Newton–Schulz steps of the correction: from ``||Y^T Y - I||_F <= 0.3`` (``cayley_fp``
#: with its clipped step stays below 0.05) five steps reach float32 rounding
CORRECTION_ITERS = 5


def orthonormality_correction(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor, tol: float,
                              iters: int = CORRECTION_ITERS) -> Tensor:
    """Right factor ``S`` (``(..., r, r)``) that makes ``Y S`` orthonormal, ``Y = X C + D E``.

    ``Y^T Y`` comes from the Gram matrices (:func:`coefficient_gram`); where
    ``||Y^T Y - I||_F > tol`` we return ``S ~ (Y^T Y)^(-1/2)`` (so ``Y S`` is the polar factor of
    ``Y``), elsewhere ``S = I``. The inverse square root is the coupled Newton–Schulz iteration of
    :func:`stiefel_kernels.smallmat.newton_schulz_inv_sqrt` (matrix products only, no host sync).
    This also removes drift of the input (``Y^T Y`` carries ``K``'s error).

    Args:
        k, g, h: ``(..., r, r)`` Gram matrices of the step's ``X`` and ``D``.
        c, e: ``(..., r, r)`` coefficients of the retraction.
        tol: orthogonality error below which nothing is corrected.
        iters: Newton–Schulz steps.
    """
    s = _correction_or_none(k, g, h, c, e, tol, iters)
    return _eye(k, k.shape[-1]) if s is None else s


#: ``(drift bound, steps)`` of :func:`correction_iters_for` per working dtype: the fewest coupled
#: Newton–Schulz steps that bring ``||S M S - I||_F`` below ``1e-12`` (float64 steps) or ``1e-8``
#: (float32 steps, a tenth of float32's epsilon) for every ``||M - I||_F <= bound``
#: (``tests/test_gram_small_step.py`` checks each bound, and that one step fewer is not enough)
_CORRECTION_STEPS = {
    torch.float64: ((1e-4, 2), (1e-2, 3), (0.1, 4)),
    torch.float32: ((3e-5, 1), (5e-3, 2), (0.05, 3), (0.1, 4)),
}


def correction_iters_for(drift: float, dtype: torch.dtype = torch.float64) -> int:
    """Coupled Newton–Schulz steps that take ``||Y^T Y - I||_F = drift`` to the rounding level
    of ``dtype`` (the dtype the step computes in; float32 for anything but float64).
    The residual ``R = I - Z Y`` starts at most about ``2 drift`` (after the scaling of
    :func:`stiefel_kernels.smallmat.newton_schulz_inv_sqrt`) and each step maps it to
    ``3/4 R^2 + 1/4 R^3``: in float64, from ``1e-4`` two steps reach ``1e-15``, from ``1e-2``
    three, from ``0.1`` four; in float32 one step suffices up to ``3e-5`` (the drift a float32
    step measures at ``r = 64`` is ``~5e-6``, its rounding), and it takes no product (the first
    step's are with the identity). Beyond the table: :data:`CORRECTION_ITERS`. Where the drift
    is known on the host for free (CPU) the correction takes only these (the native CPU
    ``cayley_fp_step``: per factor, from a copy of this table); elsewhere it runs all of them."""
    table = _CORRECTION_STEPS[torch.float64 if dtype == torch.float64 else torch.float32]
    for bound, steps in table:
        if drift <= bound:
            return steps
    return CORRECTION_ITERS


#: probed once at import (a constant for torch.compile): the native CPU kernel of
#: ``stiefel_kernels::cayley_fp_step`` is registered
_NATIVE_CAYLEY_STEP = _native.has_cpu_kernel("cayley_fp_step")
_NATIVE_CAYLEY_STEP_INTO = _native.has_cpu_kernel("cayley_fp_step_into")


def takes_native_step(k: Tensor, retraction: str, cayley_iters: int) -> bool:
    """Whether :func:`step_coefficients` runs the native op ``cayley_fp_step`` on these Gram
    matrices (so that its ``out=`` buffers are used)."""
    return (canonical_retraction(retraction) == "cayley_fp" and cayley_iters >= 1
            and k.device.type == "cpu" and _NATIVE_CAYLEY_STEP
            and k.dtype in (torch.float32, torch.float64))


def _host_branch_is_free(t: Tensor) -> bool:
    """A data-dependent Python branch costs nothing here: eager CPU tensors (no device sync, no
    graph break under torch.compile)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _correction_or_none(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor, tol: float,
                        iters: int = CORRECTION_ITERS) -> Tensor | None:
    """:func:`orthonormality_correction`, or ``None`` where that is the identity for every
    factor, known without a device sync (CPU). On the CPU the Newton–Schulz iteration runs only
    on the factors whose drift test fires; elsewhere on all of them (no host sync)."""
    eye = _eye(k, k.shape[-1])
    m = _sym_coefficient_gram(k, g, h, c, e)
    drift = torch.linalg.matrix_norm(m - eye)
    fire = drift > tol
    if not _host_branch_is_free(k):
        z, scale = smallmat.newton_schulz_inv_sqrt(m, iters, drift)
        return torch.where(fire[..., None, None], z * scale.rsqrt(), eye)
    if drift.numel() == 0:  # no factor here (an empty shard's stack)
        return None
    iters = min(iters, correction_iters_for(float(drift.max()), k.dtype))
    if fire.dim() == 0:
        if not bool(fire):
            return None
        z, scale = smallmat.newton_schulz_inv_sqrt(m, iters, drift)
        return z * scale.rsqrt()
    index = fire.reshape(-1).nonzero().squeeze(-1)
    if index.numel() == 0:
        return None
    r = k.shape[-1]
    flat = m.reshape(-1, r, r)
    if index.numel() == flat.shape[0]:
        z, scale = smallmat.newton_schulz_inv_sqrt(flat, iters, drift.reshape(-1))
        return (z * scale.rsqrt()).reshape(m.shape)
    z, scale = smallmat.newton_schulz_inv_sqrt(flat.index_select(0, index), iters,
                                               drift.reshape(-1).index_select(0, index))
    s = torch.eye(r, dtype=k.dtype, device=k.device).repeat(flat.shape[0], 1, 1)
    s.index_copy_(0, index, z * scale.rsqrt())
    return s.reshape(m.shape)


def step_coefficients(
    k: Tensor,
    g: Tensor,
    h: Tensor,
    lr: float | Tensor,
    retraction: str,
    *,
    tol: float,
    cayley_iters: int = 2,
    ns_steps: int = 6,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The optimizer's ``r x r`` step: :func:`retraction_coefficients`, then the
    :func:`orthonormality_correction` folded into ``(C, E)`` (every retraction: ``qr`` and
    ``polar`` are orthonormal by construction and only take it at rounding level).

    On the CPU, ``cayley_fp`` runs as the native op ``stiefel_kernels::cayley_fp_step`` when
    the extension has it (csrc/cayley_step_cpu.cpp: the same math factor by factor, with each
    factor's own correction step count), otherwise as :func:`_step_coefficients_torch`.

    ``out``: two contiguous tensors of ``k``'s shape and dtype, sharing no memory with ``k, g,
    h``, that the native op writes ``C, E`` into (``stiefel_kernels::cayley_fp_step_into``) and
    that are then returned: buffers a caller keeps from step to step. The other paths allocate
    their results and leave ``out`` alone.

    Returns ``(C, E, info)`` as :func:`retraction_coefficients`.
    """
    retraction = canonical_retraction(retraction)
    if takes_native_step(k, retraction, cayley_iters):
        r = k.shape[-1]
        args = (k.reshape(-1, r, r), g.reshape(-1, r, r), h.reshape(-1, r, r), _flat_lr(lr, k),
                cayley_iters, float(tol))
        if out is None or not _NATIVE_CAYLEY_STEP_INTO:  # (an extension built before the op)
            c, e = torch.ops.stiefel_kernels.cayley_fp_step(*args)
        else:
            c, e = out
            torch.ops.stiefel_kernels.cayley_fp_step_into(*args, c.view(-1, r, r), e.view(-1, r, r))
        info = torch.zeros(k.shape[:-2], dtype=torch.int32, device=k.device)
        return c.reshape(k.shape), e.reshape(k.shape), info
    return _step_coefficients_torch(k, g, h, lr, retraction, tol=tol, cayley_iters=cayley_iters,
                                    ns_steps=ns_steps)


def _step_coefficients_torch(k: Tensor, g: Tensor, h: Tensor, lr: float | Tensor, retraction: str,
                             *, tol: float, cayley_iters: int = 2,
                             ns_steps: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`step_coefficients` in torch ops (any device; the default kernel of
    ``stiefel_kernels::cayley_fp_step`` and the reference its CPU kernel is tested against)."""
    c, e, info = retraction_coefficients(k, g, h, lr, retraction, cayley_iters=cayley_iters,
                                         ns_steps=ns_steps)
    s = _correction_or_none(k, g, h, c, e, tol)
    if s is None:  # no factor drifted (known on the CPU without a sync): C S = C, E S = E
        return c, e, info
    return smallmat.bmm(c, s), smallmat.bmm(e, s), info


def apply_coefficients(x: Tensor, d: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """``Y = X C + D E`` for ``x``, ``d`` ``(..., n, r)`` and ``c``, ``e`` ``(..., r, r)``."""
    return x @ c + d @ e
