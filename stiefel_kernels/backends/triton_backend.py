"""Triton backend: the two-pass Gram form with one fused kernel launch per pass and bucket.

This module buckets factors and dispatches; the launchers (launch configurations, pointer
arrays, one function per kernel launch) live beside the kernels in
:mod:`stiefel_kernels.kernels.launch`.

Per bucket of a parameter group (same shape, dtype, device and gradient dtype), following
:mod:`.torch_backend`:

1. pass 1 (:func:`~stiefel_kernels.kernels.stiefel_adamw_triton.stiefel_pass1_kernel`, one
   launch): moments in place, ``D``, per-chunk Gram partials of ``K, G, H`` in fp32; then a
   fixed-order ``sum`` over chunks (deterministic, no atomics);
2. small step, once for all buckets of equal rank (the ``r x r`` math does not depend on ``n``:
   LoRA's ``r x 4096`` and ``r x 11008`` factors share one small step): for ``cayley_fp`` and
   ``newton_schulz`` (matrix products only) one launch of
   :func:`~stiefel_kernels.kernels.small_step_triton.small_step_kernel` (one program per factor,
   orthonormality correction folded in) up to rank :data:`SMALL_STEP_MAX_RANK`; otherwise (``qr``,
   ``polar``, ``cayley`` need factorizations; larger ranks)
   :func:`stiefel_kernels.gram.step_coefficients` in batched torch ops on the ``r x r``
   matrices;
3. pass 2 (one launch): ``D`` recomputed by the same jit helper, ``p = X C + D E`` in place.

Factors are addressed through ``int64`` arrays of ``data_ptr()`` values (cached per bucket), so
nothing is stacked or copied; a stack (``(..., a, b)`` parameter) contributes one factor per
matrix. Wide stored factors are read transposed through strides. Hyper-parameters and bias
corrections are runtime arguments: changing ``lr`` or the step never recompiles.

No host synchronization: bias corrections come from the CPU step counters; the count of failed
``r x r`` factorizations stays on the device.

The step of a group (all its buckets on one device) is registered as the custom op
``torch.ops.stiefel_kernels.triton_stiefel_step``
(``torch.library.custom_op`` with its mutated arguments declared and a fake kernel), so a step
can sit inside ``torch.compile``d code as one opaque op. ``torch.library.triton_op`` is not used:
its mutation analysis looks at the tensor arguments of the kernels, and these kernels reach the
parameters through pointer arrays.

On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before
triton is imported); that is how the tests cover them without a GPU.
"""
from __future__ import annotations

import os
from collections import defaultdict

import torch
from torch import Tensor

import triton  # noqa: F401  (first: a missing triton is reported by name, whatever is cached)

from .. import _buckets
from ..kernels import launch
from ..kernels.launch import (  # noqa: F401  (re-exported: tests and benchmarks reach them here)
    DOT_PRECISION, GRAD_DTYPES as _GRAD_DTYPES, MAX_CHUNK_ROWS, PARAM_DTYPES as _PARAM_DTYPES,
    SMALL_STEP_MAX_RANK, SMALL_STEP_TRITON, TILES, launch_config, next_pow2 as _next_pow2,
    orientation as _orientation, pass1, pass2, pointer_array, small_step, small_step_launch)
from . import FunctionBackend, StiefelHyperparams, bias_corrections, state_dtype

name = "triton"

MAX_RANK = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(param: Tensor) -> str | None:
    """``None`` when the kernels can step ``param``, else why not."""
    if param.device.type == "cuda":
        pass
    elif param.device.type == "cpu":
        if not _interpreting():
            return ("CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before "
                    "importing triton); use backend='torch' or 'reference' on CPU")
    else:
        return f"device {param.device.type!r} is not supported (CUDA only)"
    if param.dtype not in _PARAM_DTYPES:
        return (f"dtype {param.dtype} is not supported (float32 or bfloat16 parameters only); "
                "convert the factor to one of them, or use backend='torch' or 'reference'")
    if param.dim() < 2:
        return f"a Stiefel factor needs at least 2 dims, got shape {tuple(param.shape)}"
    r = min(param.shape[-2], param.shape[-1])
    if r > MAX_RANK:
        return f"rank {r} (the shorter side) is above the kernels' limit of {MAX_RANK}"
    if param.numel() == 0:
        return "empty parameter"
    return None


def _runs(params: list[Tensor], grads: list[Tensor]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of consecutive factors that form one bucket (same shape, dtype,
    device, gradient dtype: :mod:`stiefel_kernels._buckets`); :func:`step` orders the lists so
    that buckets are contiguous."""
    return _buckets.runs(params, grads)


def _group_step_impl(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], bc: Tensor,
                     lr: float, beta1: float, beta2: float, eps: float, maximize: bool,
                     retraction: str, cayley_iters: int, ns_steps: int,
                     drift_tol: float) -> Tensor:
    """Pass 1 per bucket, one small step for all buckets of equal rank, pass 2 per bucket.

    ``bc`` is ``(2, F)`` fp32 (``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per matrix, in order)."""
    hp = StiefelHyperparams(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            amsgrad=len(max_exp_avg_sqs) > 0, maximize=maximize,
                            retraction=retraction, cayley_iters=cayley_iters, ns_steps=ns_steps,
                            drift_tol=drift_tol)
    device = params[0].device
    launches = []  # (ptrs, shape, p dtype, bc slice, cfg, num)
    grams_by_rank: dict[int, list[Tensor]] = defaultdict(list)
    offset = 0
    for start, stop in _runs(params, grads):
        p0 = params[start]
        shape = p0.shape
        num = (stop - start) * (p0.numel() // (shape[-2] * shape[-1]))
        n, r, _, _ = _orientation(shape)
        cfg = launch_config(n, r, num, device)
        ptrs = pointer_array([params[start:stop], grads[start:stop], exp_avgs[start:stop],
                              exp_avg_sqs[start:stop],
                              max_exp_avg_sqs[start:stop] if hp.amsgrad else None], device)
        bcs = bc[:, offset:offset + num]
        offset += num
        grams_by_rank[r].append(pass1(ptrs, shape, p0.dtype, grads[start].dtype, bcs, hp, cfg, num))
        launches.append((ptrs, shape, p0.dtype, bcs, cfg, num, r, len(grams_by_rank[r]) - 1))
    coefs, failures = {}, torch.zeros((), dtype=torch.int32, device=device)
    for r, grams in grams_by_rank.items():
        r_pad = max(16, _next_pow2(r))
        coef, count = small_step(grams[0] if len(grams) == 1 else torch.cat(grams), hp, r_pad)
        coefs[r] = coef.split([g.shape[0] for g in grams])
        if count is not None:
            failures = failures + count
    for ptrs, shape, p_dtype, bcs, cfg, num, r, j in launches:
        pass2(ptrs, shape, p_dtype, bcs, coefs[r][j], hp, cfg, num)
    return failures


_group_step = _group_step_impl
# Registration is what lets a step sit inside torch.compile'd code; the eager step does not need
# it. Re-registration raises nothing: importlib.reload of this module redefines the op
# (custom_op replaces a definition of its own; tests/test_optimizer.py checks it). What
# can fail is a name already defined by something other than custom_op (RuntimeError), or a
# torch whose schema inference rejects the signature (ValueError, NotImplementedError): then the
# step runs unregistered, and the warning says so (once per import of this module).
try:
    _group_step = torch.library.custom_op(
        "stiefel_kernels::triton_stiefel_step",
        mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
    )(_group_step_impl)

    @_group_step.register_fake
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, lr, beta1, beta2, eps,
          maximize, retraction, cayley_iters, ns_steps, drift_tol):
        return torch.empty((), dtype=torch.int32, device=params[0].device)
except (RuntimeError, ValueError, NotImplementedError) as _exc:
    import warnings

    _group_step = _group_step_impl
    warnings.warn(f"triton backend: could not register the custom op "
                  f"stiefel_kernels::triton_stiefel_step ({type(_exc).__name__}: {_exc}); the "
                  f"step still works, but not as one opaque op inside torch.compile'd code",
                  RuntimeWarning)
    del _exc


# ----------------------------------------------------------------------------- backend step
@torch.no_grad()
def step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
         state_steps: list[Tensor], hp: StiefelHyperparams) -> Tensor | None:
    """One Stiefel-AdamW step over ``params`` (see :mod:`stiefel_kernels.backends`).

    Every check runs before anything changes. Errors name a factor by its index in ``params``
    (this module does not know names; ``StiefelAdamW`` checks the same before any group steps
    and names the parameter)."""
    if not params:
        return None
    for i, p in enumerate(params):
        reason = unsupported_reason(p)
        if reason is not None:
            raise ValueError(f"triton backend: factor {i} ({p.dtype}, shape {tuple(p.shape)}): {reason}")
    grads = [g if g.dtype in _GRAD_DTYPES else g.to(torch.float32) for g in grads]
    grads = [g.contiguous() for g in grads]
    for i, p in enumerate(params):
        work = state_dtype(p)
        for t in [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if hp.amsgrad else []):
            if t.dtype != work or t.shape != p.shape or t.device != p.device:
                raise ValueError(f"triton backend: factor {i}: optimizer state of dtype {t.dtype}, "
                                 f"shape {tuple(t.shape)} on {t.device} does not fit a {p.dtype} "
                                 f"parameter of shape {tuple(p.shape)} on {p.device} (expected "
                                 f"{work} moments of its shape, on its device)")
    # group by device (one op each), order by bucket so that buckets are contiguous runs
    groups: dict[torch.device, list[int]] = {}
    for key, bucket in _buckets.buckets(params, grads).items():
        groups.setdefault(key.device, []).extend(bucket)
    failures = None
    for device, idx in groups.items():
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, 1)
        bc1, bc2 = bias_corrections(steps, hp.beta1, hp.beta2)
        per = [params[i].numel() // (params[i].shape[-2] * params[i].shape[-1]) for i in idx]
        bc = torch.tensor([[b for b, k in zip(bc1, per) for _ in range(k)],
                           [b for b, k in zip(bc2, per) for _ in range(k)]], dtype=torch.float32)
        bc = bc.to(device, non_blocking=True)
        # The kernels address contiguous matrices; anything else goes through a contiguous copy.
        tensors = [[params[i] for i in idx], [exp_avgs[i] for i in idx],
                   [exp_avg_sqs[i] for i in idx],
                   [max_exp_avg_sqs[i] for i in idx] if hp.amsgrad else []]
        staged = [[t if t.is_contiguous() else t.contiguous() for t in ts] for ts in tensors]
        count = _group_step(staged[0], [grads[i] for i in idx], staged[1], staged[2], staged[3],
                            bc, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.maximize, hp.retraction,
                            hp.cayley_iters, hp.ns_steps, hp.drift_tol)
        for orig, new in zip(tensors, staged):
            for t, s in zip(orig, new):
                if s is not t:
                    t.copy_(s)
        failures = count if failures is None else failures + count
    return failures


BACKEND = FunctionBackend(name, unsupported_reason, step)
