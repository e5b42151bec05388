"""Reference backend: Algorithm 1 of the Stiefel-AdamW talk, literally, one tensor at a time.

This is the specification every other backend is tested against. It uses the full-matrix
retractions of :mod:`stiefel_kernels.geometry` and AdamW's moment semantics:

    m <- beta1 m + (1 - beta1) g                     (torch: exp_avg.lerp_(g, 1 - beta1))
    v <- beta2 v + (1 - beta2) g*g
    v_max <- max(v_max, v)                           (amsgrad)
    D = (m / (1 - beta1^t)) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    xi = -lr P_X(D);   X <- R_X(xi)

For ``cayley_fp`` the step is ``min(lr, 1/||W(P_X(D))||_F)`` (:func:`geometry.cayley_step_size`),
as in Li, Li & Todorovic (2020), so the fixed-point iteration contracts.

No weight decay (a Stiefel factor has fixed norm). Every retraction ends with an orthonormality
correction: where ``||Y^T Y - I||_F > drift_tol`` the new point is replaced by its polar factor
``Y (Y^T Y)^(-1/2)`` (``cayley_fp`` is orthonormal only to ``O(||W||^(iters+2))``,
``newton_schulz`` to its convergence, ``cayley`` preserves any drift of ``X^T X``, and a float32
QR or SVD of a factor with 10^6 rows is off by ~5e-5).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import geometry
from . import FunctionBackend, StiefelHyperparams, gram_orthogonality_error, state_dtype

name = "reference"


def unsupported_reason(param: Tensor) -> str | None:
    return None  # any device, any real floating dtype


def retract(x: Tensor, xi: Tensor, hp: StiefelHyperparams) -> Tensor:
    """Full-matrix retraction named by ``hp.retraction`` (canonical), ``(..., n, r)``, followed by
    the orthonormality correction (:func:`correct_orthonormality`)."""
    if hp.retraction == "qr":
        y = geometry.retract_qr(x, xi)
    elif hp.retraction == "polar":
        y = geometry.retract_polar(x, xi)
    elif hp.retraction == "newton_schulz":
        y = geometry.retract_newton_schulz(x, xi, hp.ns_steps)
    elif hp.retraction == "cayley":
        y = geometry.retract_cayley(x, xi)
    else:
        y = geometry.retract_cayley_fixed_point(x, xi, hp.cayley_iters)
    return correct_orthonormality(y, hp.drift_tol)


def correct_orthonormality(y: Tensor, tol: float) -> Tensor:
    """``Y (Y^T Y)^(-1/2)`` (the polar factor of ``Y``) where ``||Y^T Y - I||_F > tol``, else ``Y``;
    ``(..., n, r)``. Computed in float64 by an eigendecomposition."""
    y64 = y.to(torch.float64)
    m = y64.mT @ y64
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    off = torch.linalg.matrix_norm(m - eye) > tol
    if not bool(off.any()):
        return y
    evals, evecs = torch.linalg.eigh(m)
    inv_sqrt = (evecs * evals.rsqrt().unsqueeze(-2)) @ evecs.mT
    return torch.where(off[..., None, None], (y64 @ inv_sqrt).to(y.dtype), y)


@torch.no_grad()
def step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
         state_steps: list[Tensor], hp: StiefelHyperparams, *,
         telemetry: list | None = None) -> Tensor | None:
    """``telemetry``: a list to which each factor's ``||X^T X - I||_F`` before its step is
    appended (0-dim tensors).

    No local-shard support (the full-matrix retractions need whole factors): a DTensor factor
    is gathered by :func:`stiefel_kernels.distributed.backend_step` before it gets here."""
    for i, p in enumerate(params):
        work = state_dtype(p)
        grad = grads[i].to(work)
        if hp.maximize:
            grad = -grad
        m, v = exp_avgs[i], exp_avg_sqs[i]
        state_steps[i] += 1
        t = float(state_steps[i])
        m.lerp_(grad, 1 - hp.beta1)
        v.mul_(hp.beta2).addcmul_(grad, grad, value=1 - hp.beta2)
        if hp.amsgrad:
            torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
            v = max_exp_avg_sqs[i]
        bias_correction1 = 1 - hp.beta1 ** t
        bias_correction2_sqrt = (1 - hp.beta2 ** t) ** 0.5
        d = (m / bias_correction1) / (v.sqrt() / bias_correction2_sqrt + hp.eps)

        x = geometry.as_column_form(p).to(work)
        if telemetry is not None:
            err = gram_orthogonality_error(x.mT @ x)
            if err is not None:
                telemetry.append(err)
        eta = geometry.project_tangent(x, geometry.as_column_form(d))
        lr = geometry.cayley_step_size(x, eta, hp.lr) if hp.retraction == "cayley_fp" else hp.lr
        xi = -lr * eta
        y = retract(x, xi, hp)
        geometry.as_column_form(p).copy_(y)
    return None


BACKEND = FunctionBackend(name, unsupported_reason, step, reports_telemetry=True)
