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


def _register(kind: str, names, schemas: dict, defaults: dict, fakes: dict) -> torch.library.Library | None:
    """Schemas, default kernels and fake kernels of ``names``, once per process (a reload of
    this module keeps the first registration). ``kind``: ``"DEF"`` for the library's first
    registration, ``"FRAGMENT"`` after it. The returned library must stay referenced."""
    if hasattr(torch.ops.stiefel_kernels, names[-1]):
        return None
    lib = torch.library.Library("stiefel_kernels", kind)
    for name in names:
        lib.define(schemas[name])
        lib.impl(name, defaults[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"stiefel_kernels::{name}", fakes[name], lib=lib)
    return lib


_LIB = _register("DEF", OPS, _SCHEMAS, _DEFAULTS, _FAKES)


# ============================================================================= fused step passes
# The two streaming passes of a Stiefel-AdamW step over a bucket of same-shape factors
# (docs/design.md, "The fast path"); CPU kernels in csrc/fused_step_cpu.cpp, the Python entry
# points in stiefel_kernels/cpu_fused.py (which documents the arguments). The default kernel
# below is the pure-torch formulation of the torch backend (any device; also the tests'
# reference), the fake kernels give the output shape.
#
# * ``stiefel_adamw_pass1(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, beta1,
#   beta2, eps, amsgrad, maximize, row_orthonormal) -> grams``: moments in place, ``D``, and
#   ``grams`` of shape ``(P, *batch, 3, r, r)`` (``K, G, H`` along dim -3) in the working dtype.
# * ``stiefel_adamw_pass2(params, exp_avgs, exp_avg_sqs, bc, c, e, eps, row_orthonormal)``:
#   ``X <- X + (X (C - I) + D E)`` in place (``c`` is ``C``, not ``C - I``; ``exp_avg_sqs`` is
#   the ``max_exp_avg_sqs`` list with AMSGrad).
# * ``stiefel_adamw_pass1_into(..., grams)``: pass 1 into a caller's ``grams`` (contiguous, the
#   shape and dtype pass 1 returns, no memory shared with the inputs): an optimizer keeps one
#   per bucket instead of allocating ``(P, *batch, 3, r, r)`` at every step.

#: the fused-pass operators, ``torch.ops.stiefel_kernels.<name>`` (kept apart from :data:`OPS`,
#: the small-matrix ops)
FUSED_OPS = ("stiefel_adamw_pass1", "stiefel_adamw_pass2", "stiefel_adamw_pass1_into")
_FUSED_SCHEMAS = {
    "stiefel_adamw_pass1": (
        "stiefel_adamw_pass1(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, "
        "Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] max_exp_avg_sqs, Tensor bc, float beta1, "
        "float beta2, float eps, bool amsgrad, bool maximize, bool row_orthonormal) -> Tensor"),
    "stiefel_adamw_pass2": (
        "stiefel_adamw_pass2(Tensor(a!)[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
        "Tensor bc, Tensor c, Tensor e, float eps, bool row_orthonormal) -> ()"),
    "stiefel_adamw_pass1_into": (
        "stiefel_adamw_pass1_into(Tensor[] params, Tensor[] grads, Tensor(a!)[] exp_avgs, "
        "Tensor(b!)[] exp_avg_sqs, Tensor(c!)[] max_exp_avg_sqs, Tensor bc, float beta1, "
        "float beta2, float eps, bool amsgrad, bool maximize, bool row_orthonormal, "
        "Tensor(d!) grams) -> ()"),
}


def _fused_working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_shape(params, row_orthonormal: bool, op: str) -> tuple[tuple[int, ...], int]:
    """(batch shape, r) of a bucket; checks that every factor has params[0]'s shape."""
    p0 = params[0]
    torch._check(p0.dim() >= 2, lambda: f"stiefel_kernels::{op}: a Stiefel factor needs at "
                 f"least 2 dims, got shape {tuple(p0.shape)}")
    for p in params:
        torch._check(p.shape == p0.shape, lambda: f"stiefel_kernels::{op}: every tensor must "
                     f"have the shape {tuple(p0.shape)} of params[0], got {tuple(p.shape)}")
    r = p0.shape[-2] if row_orthonormal else p0.shape[-1]
    return tuple(p0.shape[:-2]), r


def _fused_direction(m: Tensor, v: Tensor, bc1: Tensor, bc2: Tensor, eps: float) -> Tensor:
    return (m / bc1) / (v.sqrt() / bc2 + eps)


def _fused_bc(bc: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor bias corrections as ``(P, 1, ..., 1)`` tensors of ``like``'s dtype."""
    shape = (-1, *([1] * (like.dim() - 1)))
    bc = bc.to(dtype=like.dtype, device=like.device)
    return bc[0].view(shape), bc[1].view(shape)


def _stiefel_adamw_pass1_default(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc,
                                 beta1, beta2, eps, amsgrad, maximize, row_orthonormal):
    from .gram import gram_pass  # noqa: PLC0415  (gram imports smallmat, which imports this module)

    if len(params) == 0:
        return bc.new_empty((0, 3, 0, 0), dtype=torch.float32)
    batch, r = _fused_shape(params, row_orthonormal, "stiefel_adamw_pass1")
    work = _fused_working_dtype(params[0].dtype)
    gs = [g.to(work) for g in grads]
    if maximize:
        gs = torch._foreach_neg(gs)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, 1 - beta2)
    vs = exp_avg_sqs
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        vs = max_exp_avg_sqs
    m = torch.stack(list(exp_avgs))
    bc1, bc2 = _fused_bc(bc, m)
    d = _fused_direction(m, torch.stack(list(vs)), bc1, bc2, eps)
    x = torch.stack(list(params)).to(work)
    if row_orthonormal:
        x, d = x.mT, d.mT
    k, g, h = gram_pass(x, d, work)
    return torch.stack([k, g, h], dim=-3)


def _stiefel_adamw_pass2_default(params, exp_avgs, exp_avg_sqs, bc, c, e, eps, row_orthonormal):
    if len(params) == 0:
        return
    batch, r = _fused_shape(params, row_orthonormal, "stiefel_adamw_pass2")
    work = _fused_working_dtype(params[0].dtype)
    m = torch.stack(list(exp_avgs))
    bc1, bc2 = _fused_bc(bc, m)
    d = _fused_direction(m, torch.stack(list(exp_avg_sqs)), bc1, bc2, eps)
    x = torch.stack(list(params)).to(work)
    if row_orthonormal:
        x, d = x.mT, d.mT
    shape = (len(params), *batch, r, r)
    eye = torch.eye(r, dtype=c.dtype, device=c.device)
    cm = (c.reshape(shape) - eye).to(work)
    y = x + (x @ cm + d @ e.reshape(shape).to(work))
    if row_orthonormal:
        y = y.mT
    torch._foreach_copy_(list(params), list(y.to(params[0].dtype).unbind(0)))


def _stiefel_adamw_pass1_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc,
                              beta1, beta2, eps, amsgrad, maximize, row_orthonormal):
    if len(params) == 0:
        return bc.new_empty((0, 3, 0, 0), dtype=torch.float32)
    batch, r = _fused_shape(params, row_orthonormal, "stiefel_adamw_pass1")
    return params[0].new_empty((len(params), *batch, 3, r, r),
                               dtype=_fused_working_dtype(params[0].dtype))


def _stiefel_adamw_pass2_fake(params, exp_avgs, exp_avg_sqs, bc, c, e, eps, row_orthonormal):
    return None


def _check_out(op: str, name: str, out: Tensor, shape, dtype: torch.dtype) -> None:
    """An ``_into`` op's output buffer: contiguous, the shape and dtype the op would return."""
    torch._check(tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.is_contiguous(),
                 lambda: f"stiefel_kernels::{op}: {name} must be a contiguous tensor of shape "
                 f"{tuple(shape)} and dtype {dtype}, got {tuple(out.shape)}, {out.dtype}"
                 + ("" if out.is_contiguous() else ", not contiguous"))


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory: one storage and intersecting address spans (the
    test of csrc/out_checks.h, for the default kernels of the ``_into`` ops)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t: Tensor) -> tuple[int, int]:
        lo = sum(min(0, (n - 1) * st) for n, st in zip(t.shape, t.stride()))
        hi = sum(max(0, (n - 1) * st) for n, st in zip(t.shape, t.stride()))
        return t.data_ptr() + lo * t.element_size(), t.data_ptr() + (hi + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _check_out_apart(op: str, name: str, out: Tensor, inputs) -> None:
    """An ``_into`` op's output buffer shares no memory with its inputs (it would be read after
    it is written) and lives on their device."""
    for t in inputs:
        torch._check(out.device == t.device, lambda: f"stiefel_kernels::{op}: {name} must be on "
                     f"the inputs' device {t.device}, got {out.device}")
        torch._check(not _shares_memory(out, t), lambda: f"stiefel_kernels::{op}: {name} must not "
                     "share memory with the inputs")


def _pass1_into_checks(params, row_orthonormal: bool, grams: Tensor) -> None:
    op = "stiefel_adamw_pass1_into"
    if len(params) == 0:
        _check_out(op, "grams", grams, (0, 3, 0, 0), grams.dtype)
        return
    batch, r = _fused_shape(params, row_orthonormal, op)
    _check_out(op, "grams", grams, (len(params), *batch, 3, r, r),
               _fused_working_dtype(params[0].dtype))


def _stiefel_adamw_pass1_into_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc,
                                   beta1, beta2, eps, amsgrad, maximize, row_orthonormal, grams):
    _pass1_into_checks(params, row_orthonormal, grams)


def _stiefel_adamw_pass1_into_default(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc,
                                      beta1, beta2, eps, amsgrad, maximize, row_orthonormal, grams):
    _pass1_into_checks(params, row_orthonormal, grams)
    _check_out_apart("stiefel_adamw_pass1_into", "grams", grams,
                     [*params, *grads, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, bc])
    grams.copy_(_stiefel_adamw_pass1_default(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                             bc, beta1, beta2, eps, amsgrad, maximize, row_orthonormal))


_FUSED_DEFAULTS = {"stiefel_adamw_pass1": _stiefel_adamw_pass1_default,
                   "stiefel_adamw_pass2": _stiefel_adamw_pass2_default,
                   "stiefel_adamw_pass1_into": _stiefel_adamw_pass1_into_default}
_FUSED_FAKES = {"stiefel_adamw_pass1": _stiefel_adamw_pass1_fake,
                "stiefel_adamw_pass2": _stiefel_adamw_pass2_fake,
                "stiefel_adamw_pass1_into": _stiefel_adamw_pass1_into_fake}


_FUSED_LIB = _register("FRAGMENT", FUSED_OPS, _FUSED_SCHEMAS, _FUSED_DEFAULTS, _FUSED_FAKES)


# ============================================================================= small batched products
# ``small_bmm(a, b, add, alpha) -> add + alpha * (a @ b)`` for ``a`` ``(B, m, k)``, ``b``
# ``(B, k, n)``, ``add`` ``(B, m, n)`` or None; float32/float64; any strides. The ``r x r``
# products of the retraction's small step (``stiefel_kernels.smallmat.bmm``: the torch
# formulation of ``cayley_fp``'s step, and the other retractions' correction). The default
# kernel is torch's ``baddbmm``; the CPU kernel (csrc/small_bmm_cpu.cpp) exists because torch's
# CPU bmm (MKL) runs at less than half of an AVX-512 core's FMA rate on the AMD CPU it was
# measured on (bench/results/cpu-small-bmm-2026-11-26.md). Results agree to rounding (one FMA
# per term, summed over k in order), not bit for bit.

#: the small-product operator, ``torch.ops.stiefel_kernels.small_bmm``
SMALL_BMM_OPS = ("small_bmm",)
_SMALL_BMM_SCHEMAS = {"small_bmm": "small_bmm(Tensor a, Tensor b, Tensor? add, float alpha) -> Tensor"}


def _check_small_bmm(a: Tensor, b: Tensor, add: Tensor | None) -> None:
    torch._check(a.dim() == 3 and b.dim() == 3, lambda: "stiefel_kernels::small_bmm: expected "
                 f"3-dim a (B, m, k) and b (B, k, n), got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    torch._check(a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1], lambda: "stiefel_kernels::"
                 f"small_bmm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    torch._check(a.dtype == b.dtype and a.dtype in _DTYPES, lambda: "stiefel_kernels::small_bmm: "
                 f"expected float32 or float64 operands of one dtype, got {a.dtype} and {b.dtype}")
    if add is not None:
        want = (a.shape[0], a.shape[1], b.shape[2])
        torch._check(tuple(add.shape) == want and add.dtype == a.dtype, lambda: "stiefel_kernels::"
                     f"small_bmm: add must have shape {want} and dtype {a.dtype}, got "
                     f"{tuple(add.shape)}, {add.dtype}")


def _small_bmm_default(a: Tensor, b: Tensor, add: Tensor | None, alpha: float) -> Tensor:
    _check_small_bmm(a, b, add)
    if add is None:
        out = torch.bmm(a, b)
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.baddbmm(add, a, b, alpha=alpha)


def _small_bmm_fake(a: Tensor, b: Tensor, add: Tensor | None, alpha: float) -> Tensor:
    _check_small_bmm(a, b, add)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


_SMALL_BMM_LIB = _register("FRAGMENT", SMALL_BMM_OPS, _SMALL_BMM_SCHEMAS,
                           {"small_bmm": _small_bmm_default}, {"small_bmm": _small_bmm_fake})


# ============================================================================= cayley_fp's r x r step
# ``cayley_fp_step(k, g, h, lr, iters, tol) -> (C, E)``: the whole ``r x r`` step of
# ``cayley_fp`` (coefficients and the orthonormality correction folded in) for ``k, g, h`` of
# shape ``(F, r, r)`` (float32/float64, one layout), ``lr`` with 1 or ``F`` elements, ``iters >=
# 1`` fixed-point iterations, drift tolerance ``tol``; ``C, E`` contiguous ``(F, r, r)``. The
# default kernel is the torch formulation (:func:`stiefel_kernels.gram._step_coefficients_torch`);
# the CPU kernel (csrc/cayley_step_cpu.cpp) runs it factor by factor in a per-thread workspace.

#: the small-step operators, ``torch.ops.stiefel_kernels.cayley_fp_step`` and its ``_into`` form
#: (``C, E`` into a caller's contiguous ``c, e`` of ``k``'s shape and dtype, sharing no memory
#: with the inputs: an optimizer keeps them per bucket)
CAYLEY_STEP_OPS = ("cayley_fp_step", "cayley_fp_step_into")
_CAYLEY_STEP_SCHEMAS = {
    "cayley_fp_step": "cayley_fp_step(Tensor k, Tensor g, Tensor h, Tensor lr, int iters, float tol) -> (Tensor, Tensor)",
    "cayley_fp_step_into": ("cayley_fp_step_into(Tensor k, Tensor g, Tensor h, Tensor lr, int iters, "
                            "float tol, Tensor(a!) c, Tensor(b!) e) -> ()")}


def _check_cayley_fp_step(k: Tensor, g: Tensor, h: Tensor, lr: Tensor, iters: int) -> None:
    op = "stiefel_kernels::cayley_fp_step"
    torch._check(k.dim() == 3 and k.shape[1] == k.shape[2],
                 lambda: f"{op}: expected k of shape (F, r, r), got {tuple(k.shape)}")
    torch._check(g.shape == k.shape and h.shape == k.shape, lambda: f"{op}: k, g, h must have one "
                 f"shape, got {tuple(k.shape)}, {tuple(g.shape)}, {tuple(h.shape)}")
    torch._check(k.dtype == g.dtype == h.dtype and k.dtype in _DTYPES, lambda: f"{op}: expected "
                 f"float32 or float64 k, g, h of one dtype, got {k.dtype}, {g.dtype}, {h.dtype}")
    torch._check(lr.numel() in (1, k.shape[0]), lambda: f"{op}: lr must have 1 or F = {k.shape[0]} "
                 f"elements, got {lr.numel()}")
    torch._check(iters >= 1, lambda: f"{op}: iters must be >= 1, got {iters}")


def _cayley_fp_step_default(k: Tensor, g: Tensor, h: Tensor, lr: Tensor, iters: int,
                            tol: float) -> tuple[Tensor, Tensor]:
    from .gram import _step_coefficients_torch  # noqa: PLC0415  (gram imports this module)

    _check_cayley_fp_step(k, g, h, lr, iters)
    lr = lr.reshape(()) if lr.numel() == 1 else lr.reshape(-1, 1, 1)
    c, e, _ = _step_coefficients_torch(k, g, h, lr, "cayley_fp", tol=tol, cayley_iters=iters)
    return c.contiguous(), e.contiguous()


def _cayley_fp_step_fake(k: Tensor, g: Tensor, h: Tensor, lr: Tensor, iters: int,
                         tol: float) -> tuple[Tensor, Tensor]:
    _check_cayley_fp_step(k, g, h, lr, iters)
    return k.new_empty(k.shape), k.new_empty(k.shape)


def _cayley_fp_step_into_fake(k: Tensor, g: Tensor, h: Tensor, lr: Tensor, iters: int, tol: float,
                              c: Tensor, e: Tensor) -> None:
    _check_cayley_fp_step(k, g, h, lr, iters)
    for name, out in (("c", c), ("e", e)):
        _check_out("cayley_fp_step_into", name, out, k.shape, k.dtype)


def _cayley_fp_step_into_default(k: Tensor, g: Tensor, h: Tensor, lr: Tensor, iters: int,
                                 tol: float, c: Tensor, e: Tensor) -> None:
    _cayley_fp_step_into_fake(k, g, h, lr, iters, tol, c, e)
    for name, out in (("c", c), ("e", e)):
        _check_out_apart("cayley_fp_step_into", name, out, (k, g, h))
    torch._check(not _shares_memory(c, e), lambda: "stiefel_kernels::cayley_fp_step_into: c and e "
                 "must not share memory")
    cc, ee = _cayley_fp_step_default(k, g, h, lr, iters, tol)
    c.copy_(cc)
    e.copy_(ee)


_CAYLEY_STEP_LIB = _register("FRAGMENT", CAYLEY_STEP_OPS, _CAYLEY_STEP_SCHEMAS,
                             {"cayley_fp_step": _cayley_fp_step_default,
                              "cayley_fp_step_into": _cayley_fp_step_into_default},
                             {"cayley_fp_step": _cayley_fp_step_fake,
                              "cayley_fp_step_into": _cayley_fp_step_into_fake})
