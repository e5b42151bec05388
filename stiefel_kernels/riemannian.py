"""Make any ``torch.optim`` optimizer Riemannian on Stiefel factors (StelLA's optimizer hooks).

:func:`make_riemannian` registers two hooks on *your* optimizer (it stays a real
``torch.optim.Optimizer``: ``state_dict``, ``load_state_dict``, param groups and
``torch.optim.lr_scheduler.*`` work as before):

* **pre-step hook** (``register_step_pre_hook``): Euclidean -> Riemannian gradient, in place,
  ``grad <- s * (grad - Y grad^T Y)`` with StelLA's gradient scaling ``s = sqrt(d / m)``
  (``m`` = long side of the factor: rows of ``U``, rows of ``V``; ``d`` = the layer's input
  dimension by default), and a copy of ``Y`` is kept.
* **post-step hook** (``register_step_post_hook``): the optimizer moved ``Y_old`` to ``Y_new``;
  the update ``Delta = Y_new - Y_old`` is projected onto the tangent space,
  ``xi = Delta - Y sym(Y^T Delta)``, and retracted by the polar decomposition,
  ``Y <- uf(Y_old + xi)``.

Factors of the same (column-form) shape, dtype and device are stacked, and each bucket takes one
batched call per operation (no per-factor Python loop for the math): the Riemannian gradient is
two batched matmuls; the retraction is the Gram fast path of :mod:`stiefel_kernels.gram`
(``K, G, H`` from :func:`~stiefel_kernels.gram.gram_pass`, ``r x r`` polar coefficients from
:func:`~stiefel_kernels.gram.retraction_coefficients`, then ``Y = X C + D E``). That is StelLA's
"batched SVD" idea, with an ``r x r`` eigendecomposition in place of an ``n x r`` SVD.

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
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .geometry import as_column_form, orthogonality_error
from .gram import apply_coefficients, gram_pass, retraction_coefficients

__all__ = ["RiemannianHooks", "make_riemannian", "riemannian_gradient_", "project_and_retract_"]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.no_grad()
def riemannian_gradient_(xs: Sequence[Tensor], grads: Sequence[Tensor], scales: Sequence[float] | None = None) -> None:
    """In place, ``grad <- s * (grad - X grad^T X)`` for same-shape column-form factors ``xs``
    (one batched call). ``scales``: one float per factor (default 1)."""
    x = torch.stack(list(xs)).to(_work_dtype(xs[0].dtype))
    g = torch.stack(list(grads)).to(x.dtype)
    rg = g - x @ (g.mT @ x)
    if scales is not None and any(s != 1.0 for s in scales):
        s = torch.tensor(scales, dtype=x.dtype).to(x.device)
        rg = rg * s.view(-1, *([1] * (rg.dim() - 1)))
    torch._foreach_copy_(list(grads), list(rg.unbind(0)))


@torch.no_grad()
def project_and_retract_(xs_new: Sequence[Tensor], x_old: Tensor) -> Tensor:
    """In place, ``Y <- polar(X + P_X(Y - X))`` for same-shape column-form factors ``xs_new``
    (views of the parameters) and the stacked previous points ``x_old`` (``(L, ..., n, r)``).

    Gram fast path with ``D = -(Y - X)`` and ``lr = 1`` (so ``xi = -lr P_X(D) = P_X(Delta)``).
    Returns the int32 failure flags of the ``r x r`` factorizations (``(L, ...)``).
    """
    y = torch.stack(list(xs_new)).to(x_old.dtype)
    d = x_old - y
    k, g, h = gram_pass(x_old, d)
    c, e, info = retraction_coefficients(k, g, h, 1.0, "polar")
    out = apply_coefficients(x_old, d, c.to(x_old.dtype), e.to(x_old.dtype))
    torch._foreach_copy_(list(xs_new), list(out.unbind(0)))
    return info


class RiemannianHooks:
    """Handle of the hooks installed by :func:`make_riemannian`; :meth:`remove` uninstalls them.

    Attributes:
        optimizer: the wrapped optimizer (unchanged class, still a ``torch.optim.Optimizer``).
        params: the Stiefel factors.
        scales: gradient scale of each factor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params, *, grad_scaling: bool = True,
                 d: int | None = None, ortho_tol: float | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"make_riemannian needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"make_riemannian: d must be a positive int or None, got {d!r}")
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.optimizer = optimizer
        self.params: list[Tensor] = []
        self.scales: list[float] = []
        seen: set[int] = set()
        for j, item in enumerate(params):
            p, pd = item if isinstance(item, tuple) else (item, None)
            if not isinstance(p, Tensor):
                raise TypeError(f"make_riemannian: param {j} is a {type(p).__name__}, expected a tensor "
                                "or a (tensor, d) pair")
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
            dd = d if d is not None else pd
            m = as_column_form(p).shape[-2]
            self.params.append(p)
            self.scales.append(math.sqrt(dd / m) if (grad_scaling and dd is not None) else 1.0)
        self._pending: list[tuple[list[Tensor], Tensor]] = []
        self._failures: Tensor | None = None
        self._pre = optimizer.register_step_pre_hook(self._pre_hook)
        self._post = optimizer.register_step_post_hook(self._post_hook)

    def _buckets(self) -> dict[tuple, list[int]]:
        buckets: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("make_riemannian: sparse gradients are not supported")
            x = as_column_form(p)
            buckets.setdefault((tuple(x.shape), p.dtype, p.device), []).append(i)
        return buckets

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
            riemannian_gradient_(xs, grads, [self.scales[i] for i in idx])
            x_old = torch.stack(xs).to(_work_dtype(xs[0].dtype))  # a copy: the step writes the params
            self._pending.append((idx, x_old))

    @torch.no_grad()
    def _post_hook(self, optimizer, args, kwargs) -> None:
        for idx, x_old in self._pending:
            info = project_and_retract_([as_column_form(self.params[i]) for i in idx], x_old)
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


def make_riemannian(optimizer: torch.optim.Optimizer, params: Iterable[Tensor | tuple[Tensor, int]], *,
                    grad_scaling: bool = True, d: int | None = None,
                    ortho_tol: float | None = None) -> RiemannianHooks:
    """Turn ``optimizer`` into a Riemannian optimizer on the Stiefel factors ``params`` (StelLA).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (Adam, AdamW, SGD, ...) that holds ``params``.
        params: the factors, each a tensor or a ``(tensor, d)`` pair giving that factor's ``d``
            (:func:`stiefel_kernels.nn.stella_riemannian_params` yields pairs with ``d`` = the
            layer's input dimension, as in the paper). Each must already be orthonormal on its
            shorter side (checked once, here).
        grad_scaling: scale the Riemannian gradient by ``sqrt(d / m)``, ``m`` the factor's long
            side (StelLA's scaling: ``sqrt(d/m)`` for ``U`` (m x r), ``sqrt(d/n)`` for ``V`` (n x r)).
            A factor without a ``d`` is not scaled.
        d: one ``d`` for every factor, overriding the pairs' values.
        ortho_tol: largest ``||X^T X - I||_F`` accepted now (default by dtype: 1e-4 float32).
    Returns:
        a :class:`RiemannianHooks` handle (``.remove()``, ``.retraction_failures``).
    """
    return RiemannianHooks(optimizer, params, grad_scaling=grad_scaling, d=d, ortho_tol=ortho_tol)
