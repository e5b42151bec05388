"""Make any ``torch.optim`` optimizer Riemannian on Stiefel factors (StelLA's optimizer hooks).

:func:`make_riemannian` registers two hooks on *your* optimizer (it stays a real
``torch.optim.Optimizer``: ``state_dict``, ``load_state_dict``, param groups and
``torch.optim.lr_scheduler.*`` work as before). For a factor ``Y`` (column form ``m x r``,
``m >= r``, orthonormal columns; ``m`` is the long side):

* **pre-step hook** (``register_step_pre_hook``): Euclidean -> Riemannian gradient, in place,
  ``grad <- grad - Y grad^T Y`` (no scaling here), and a copy ``Y_old`` of ``Y`` is kept.
* **post-step hook** (``register_step_post_hook``): the optimizer moved ``Y_old`` to ``Y_new``;
  its update ``Delta = Y_new - Y_old`` is scaled by StelLA's gradient scaling,
  ``Delta <- Delta / sqrt(m / c)`` (skipped where ``m == c`` or scaling is off), projected onto
  the tangent space, ``xi = Delta - Y_old sym(Y_old^T Delta)``, and retracted by the polar
  decomposition, ``Y <- uf(Y_old + xi)``.

This is the update rule of the official StelLA code (``StellaModel.pre_optimizer_step`` /
``post_optimizer_step`` of github.com/SonyResearch/stella), where ``c`` is the model's hidden
size (``config.hidden_size``) or a number the user gives, for ``U`` and ``V`` alike. The scaling
acts on the optimizer's *update*, not on the gradient: under Adam a constant factor on the
gradient cancels (up to ``eps``). See ``docs/stella.md``.

Factors of the same (column-form) shape, dtype and device are stacked (the buckets of
:mod:`stiefel_kernels._buckets`), and each bucket takes one batched call per operation (no
per-factor Python loop for the math): the Riemannian gradient is two batched matmuls; the
retraction is the Gram fast path of :mod:`stiefel_kernels.gram` (``K, G, H`` from
:func:`~stiefel_kernels.gram.gram_pass`, ``r x r`` polar coefficients from
:func:`~stiefel_kernels.gram.retraction_coefficients`, then ``Y = X C + D E``). That is StelLA's
"batched SVD" idea, with an ``r x r`` eigendecomposition in place of an ``m x r`` SVD. The
scaling enters that path as its step size: with ``D = Y_old - Y_new = -Delta``,
``xi = -s P_X(D) = P_X(s Delta)``, ``s = 1 / sqrt(m / c)``.

Orientation follows the shape as everywhere in the package: a tall factor has orthonormal
columns (StelLA's ``U``, ``V``), a wide one orthonormal rows, a stack (``ndim > 2``) is a stack.

Notes:
    * Decoupled weight decay of the wrapped optimizer on a factor is removed by the projection
      (``P_Y(-lr wd Y) = 0`` for orthonormal ``Y``); put factors in a group without decay anyway.
    * A ``closure`` passed to ``step`` would compute gradients after the pre-hook ran, so it is
      refused; compute the loss and call ``backward()`` before ``step()``.
    * ``torch.amp.GradScaler.step`` unscales before calling ``step`` (the hooks see true
      gradients) and skips ``step`` altogether on inf/NaN, so the hooks do not run then.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch
from torch import Tensor

from . import _buckets
from ._buckets import working_dtype
from .geometry import as_column_form, orthogonality_error
from .gram import apply_coefficients, gram_pass, retraction_coefficients

__all__ = ["RiemannianHooks", "make_riemannian", "riemannian_gradient_", "project_and_retract_"]


def _check_c(value, what: str) -> float:
    """``value`` as a float if it is a positive finite real number (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"make_riemannian: {what} must be a positive finite number (StelLA's "
                         f"gradient-scaling constant c, e.g. the model's hidden size), got "
                         f"{type(value).__name__} {value!r}")
    c = float(value)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"make_riemannian: {what} must be a positive finite number (StelLA's "
                         f"gradient-scaling constant c, e.g. the model's hidden size), got {value!r}")
    return c


@torch.no_grad()
def riemannian_gradient_(xs: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """In place, ``grad <- grad - X grad^T X`` for same-shape column-form factors (one batched call).

    Args:
        xs: ``L`` factors, each ``(..., m, r)`` in column form (orthonormal columns).
        grads: their gradients, same shapes (views of ``.grad`` are written in place).
    """
    x = torch.stack(list(xs)).to(working_dtype(xs[0]))
    g = torch.stack(list(grads)).to(x.dtype)
    rg = g - x @ (g.mT @ x)
    torch._foreach_copy_(list(grads), list(rg.unbind(0)))


@torch.no_grad()
def project_and_retract_(xs_new: Sequence[Tensor], x_old: Tensor,
                         scales: float | Sequence[float] | Tensor = 1.0) -> Tensor:
    """In place, ``Y <- polar(X + P_X(s (Y - X)))`` for same-shape column-form factors.

    Args:
        xs_new: ``L`` factors after the optimizer's step, each ``(..., m, r)`` in column form
            (views of the parameters; overwritten).
        x_old: the stacked points before the step, ``(L, ..., m, r)``.
        scales: ``s``, the scale of each factor's update ``Delta = Y - X``: one float for all,
            or ``L`` values (StelLA's gradient scaling: ``s = 1 / sqrt(m / c)``).
    Returns:
        the int32 failure flags of the ``r x r`` factorizations, ``(L, ...)``.

    Gram fast path with ``D = -(Y - X)`` and step size ``lr = s`` (so
    ``xi = -s P_X(D) = P_X(s Delta)``).
    """
    y = torch.stack(list(xs_new)).to(x_old.dtype)
    d = x_old - y
    k, g, h = gram_pass(x_old, d)
    lr = scales if isinstance(scales, (float, int, Tensor)) else torch.tensor(list(scales), dtype=k.dtype)
    c, e, info = retraction_coefficients(k, g, h, lr, "polar")
    out = apply_coefficients(x_old, d, c.to(x_old.dtype), e.to(x_old.dtype))
    torch._foreach_copy_(list(xs_new), list(out.unbind(0)))
    return info


class RiemannianHooks:
    """Handle of the hooks installed by :func:`make_riemannian`; :meth:`remove` uninstalls them.

    Attributes:
        optimizer: the wrapped optimizer (unchanged class, still a ``torch.optim.Optimizer``).
        params: the Stiefel factors.
        c: StelLA's constant ``c`` (``None`` where scaling is off).
        scales: the scale ``s = 1 / sqrt(m / c)`` applied to each factor's update (``1.0`` where
            scaling is off or ``m == c``; ``m`` = the factor's long side).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params, *, grad_scaling: bool = True,
                 c: float | None = None, ortho_tol: float | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_riemannian needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(grad_scaling, bool):
            raise ValueError(f"make_riemannian: grad_scaling must be True or False, got "
                             f"{type(grad_scaling).__name__} {grad_scaling!r} (give the constant as c=)")
        if c is not None:
            c = _check_c(c, "c")
            if not grad_scaling:
                raise ValueError("make_riemannian: c is given but grad_scaling=False (c would be ignored); "
                                 "drop one of them")
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.optimizer = optimizer
        self.params: list[Tensor] = []
        self.scales: list[float] = []
        seen: set[int] = set()
        for j, p in enumerate(params):
            if isinstance(p, tuple):
                raise TypeError(
                    f"make_riemannian: param {j} is a tuple; (factor, d) pairs are gone: StelLA scales "
                    "each factor's update by 1/sqrt(m / c) with ONE c for the model (its hidden size, "
                    "as the official code), not a per-layer d. Pass the tensors and c=..., or "
                    "grad_scaling=False")
            if not isinstance(p, Tensor):
                raise TypeError(f"make_riemannian: param {j} is a {type(p).__name__}, expected a tensor")
            if p.dim() < 2 or not p.is_floating_point() or p.is_complex():
                raise ValueError(f"make_riemannian: param {j} (shape {tuple(p.shape)}, {p.dtype}) is not a "
                                 "real floating-point matrix or stack of matrices")
            if id(p) not in in_opt:
                raise ValueError(f"make_riemannian: param {j} (shape {tuple(p.shape)}) is not in the optimizer's "
                                 "param groups")
            if id(p) in seen:
                raise ValueError(f"make_riemannian: param {j} is listed twice")
            seen.add(id(p))
            tol = ortho_tol if ortho_tol is not None else {torch.float64: 1e-8, torch.float32: 1e-4}.get(p.dtype, 5e-2)
            err = float(orthogonality_error(p).max())
            if not err <= tol:
                raise ValueError(
                    f"make_riemannian: param {j} (shape {tuple(p.shape)}) is not orthonormal on its shorter "
                    f"side (||X^T X - I||_F = {err:.3e} > {tol:.1e}); call stiefel_kernels.orthonormalize_ first")
            m = as_column_form(p).shape[-2]
            self.params.append(p)
            self.scales.append(1.0 / math.sqrt(m / c) if (c is not None and m != c) else 1.0)
        if grad_scaling and c is None and self.params:
            raise ValueError(
                "make_riemannian: StelLA's gradient scaling (Delta / sqrt(m / c)) needs c, the model's "
                "hidden size: pass c=..., or grad_scaling=False")
        self.c = c
        self._pending: list[tuple[list[int], Tensor]] = []
        self._failures: Tensor | None = None
        self._pre = optimizer.register_step_pre_hook(self._pre_hook)
        self._post = optimizer.register_step_post_hook(self._post_hook)

    def _buckets(self) -> dict[tuple, list[int]]:
        """Indices of the factors with a gradient, per bucket of column-form shape, dtype and
        device (:mod:`stiefel_kernels._buckets`)."""
        live = []
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("make_riemannian: sparse gradients are not supported")
            live.append(i)
        found = _buckets.buckets([self.params[i] for i in live], column_form=True)
        return {key: [live[j] for j in idx] for key, idx in found.items()}

    @torch.no_grad()
    def _pre_hook(self, optimizer, args, kwargs) -> None:
        # args are step()'s positional arguments, self included: (optimizer, closure?)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:
            raise RuntimeError("a Riemannian-hooked optimizer cannot take a closure: its pre-step hook "
                               "converts the gradients before step() runs; call backward() first")
        self._pending = []
        for idx in self._buckets().values():
            xs = [as_column_form(self.params[i]) for i in idx]
            grads = [as_column_form(self.params[i].grad) for i in idx]
            riemannian_gradient_(xs, grads)
            x_old = torch.stack(xs).to(working_dtype(xs[0]))  # a copy: the step writes the params
            self._pending.append((idx, x_old))

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs) -> None:
        for idx, x_old in self._pending:
            # one c and, within a bucket, one shape, so one m: one scale per bucket (a Python
            # float, so nothing is copied to the device)
            info = project_and_retract_([as_column_form(self.params[i]) for i in idx], x_old,
                                        self.scales[idx[0]])
            n_fail = info.ne(0).sum()
            self._failures = n_fail if self._failures is None else self._failures + n_fail
        self._pending = []

    @property
    def retraction_failures(self) -> int:
        """Failed ``r x r`` factorizations so far (reading it synchronizes with the device)."""
        return 0 if self._failures is None else int(self._failures)

    def remove(self) -> None:
        """Uninstall both hooks (the optimizer becomes Euclidean again)."""
        self._pre.remove()
        self._post.remove()


def make_riemannian(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], *,
                    grad_scaling: bool = True, c: float | None = None,
                    ortho_tol: float | None = None) -> RiemannianHooks:
    """Turn ``optimizer`` into a Riemannian optimizer on the Stiefel factors ``params`` (StelLA).

    Each step: ``grad <- grad - Y grad^T Y`` before the optimizer's step; after it, its update
    ``Delta = Y_new - Y_old`` becomes ``Delta / sqrt(m / c)`` (gradient scaling; skipped where
    ``m == c``), is projected onto the tangent space at ``Y_old`` and retracted by polar
    decomposition (module docstring; the official StelLA code's rule).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (Adam, AdamW, SGD, ...) that holds ``params``.
        params: the factors, each a tensor (a matrix ``(m, r)`` / ``(r, m)`` or a stack
            ``(..., m, r)`` / ``(..., r, m)``), each already orthonormal on its shorter side
            (checked once, here).
        grad_scaling: apply StelLA's scaling ``Delta / sqrt(m / c)`` to each factor's update,
            ``m`` = the factor's long side (rows of ``U`` (``out x r``), rows of ``V``
            (``in x r``)). Needs ``c``; with ``grad_scaling=False`` no ``c`` may be given.
        c: StelLA's constant, one for all factors as in the official code: the model's hidden
            size (:func:`stiefel_kernels.nn.make_stella_optimizer` reads it from the model's
            config). A positive finite number (int or float).
        ortho_tol: largest ``||X^T X - I||_F`` accepted now (default by dtype: 1e-4 float32).
    Returns:
        a :class:`RiemannianHooks` handle (``.remove()``, ``.retraction_failures``, ``.scales``).
    Raises:
        ValueError: for a bad ``c`` (not a number, a bool, ``<= 0``, NaN, inf), a missing ``c``
            with ``grad_scaling=True``, a ``c`` with ``grad_scaling=False``, a non-bool
            ``grad_scaling``, or a factor that is not a real floating-point matrix, not in the
            optimizer, listed twice or not orthonormal.
        TypeError: for an item that is not a tensor (the old ``(factor, d)`` pairs included).
        All checks run before any hook is registered: on an error nothing changes.
    """
    return RiemannianHooks(optimizer, params, grad_scaling=grad_scaling, c=c, ortho_tol=ortho_tol)
