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

import math
import operator
import os
from collections import OrderedDict, defaultdict
from typing import NamedTuple

import torch
from torch import Tensor

import triton  # noqa: F401  (first: a missing triton is reported by name, whatever is cached)

from .. import _buckets
from ..kernels import launch
from ..kernels.launch import (  # noqa: F401  (re-exported: tests and benchmarks reach them here)
    DOT_PRECISION, GRAD_DTYPES as _GRAD_DTYPES, MAX_CHUNK_ROWS, PARAM_DTYPES as _PARAM_DTYPES,
    SMALL_STEP_MAX_RANK, SMALL_STEP_TRITON, TILES, launch_config, next_pow2 as _next_pow2,
    orientation as _orientation, pass1, pass2, pointer_array, small_step, small_step_launch)
from . import (FunctionBackend, StiefelHyperparams, advance_steps, bias_correction_tensor,
               gram_orthogonality_error, state_dtype)

name = "triton"

#: largest rank (shorter side) the kernels take: ``R_PAD = 128`` has no configuration that
#: compiles for sm_90 without register spills (``bench/kernel_report.py``), so rank 65-128
#: factors go to the torch backend (``backend='auto'``) or are refused (``backend='triton'``)
MAX_RANK = launch.MAX_R_PAD


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(param: Tensor, *, row_orthonormal: bool | None = None) -> str | None:
    """``None`` when the kernels can step ``param``, else why not.

    ``row_orthonormal`` (given for the local shard of a sharded factor): the global
    orientation, which says which side is the rank; a shard may be empty."""
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
    if row_orthonormal is None:
        r = min(param.shape[-2], param.shape[-1])
    else:
        r = param.shape[-2] if row_orthonormal else param.shape[-1]
    if r > MAX_RANK:
        return (f"rank {r} (the shorter side) is above the Triton kernels' limit of {MAX_RANK} "
                f"(above it no tile configuration compiles for sm_90 without register spills); "
                f"use backend='torch' (backend='auto' does so by itself)")
    if param.numel() == 0 and row_orthonormal is None:
        return "empty parameter"
    return None


def _runs(params: list[Tensor], grads: list[Tensor]) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of consecutive factors that form one bucket (same shape, dtype,
    device, gradient dtype: :mod:`stiefel_kernels._buckets`); :func:`step` orders the lists so
    that buckets are contiguous."""
    return _buckets.runs(params, grads)


class _Plan:
    """What every steady-state step of one device group reuses: per bucket its pointer array,
    launch configuration and pass-1 partials buffer, in bucket order. Built on the first step
    of a set of tensors (their pointers, shapes and dtypes are the cache key), so a step with an
    unchanged set of tensors does no per-factor Python work, no host-to-device copy and no
    allocation proportional to the factors. The buffers are reused step after step; kernels on
    one stream run in order, so a step's pass 1 never overwrites partials still being read."""

    __slots__ = ("launches", "ranks")

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool,
                 rows: bool | None = None):
        device = params[0].device
        self.launches = []  # (ptrs, shape, p dtype, g dtype, cfg, num, r, bc offset, partials)
        self.ranks: dict[int, int] = {}  # rank -> number of its buckets (small-step batches)
        offset = 0
        for start, stop in _runs(params, grads):
            p0 = params[start]
            shape = p0.shape
            num = (stop - start) * math.prod(shape[:-2])
            if num == 0:  # a rank holding none of a stack's matrices (sharded over its stack dim)
                continue
            n, r, _, _ = _orientation(shape, rows)
            cfg = launch_config(n, r, num, device)
            ptrs = pointer_array([params[start:stop], grads[start:stop], exp_avgs[start:stop],
                                  exp_avg_sqs[start:stop],
                                  max_exp_avg_sqs[start:stop] if amsgrad else None], device)
            partials = torch.empty((num, cfg["num_chunks"], 3, cfg["R_PAD"], cfg["R_PAD"]),
                                   dtype=torch.float32, device=device)
            self.launches.append((ptrs, shape, p0.dtype, grads[start].dtype, cfg, num, r, offset,
                                  partials))
            self.ranks[r] = self.ranks.get(r, 0) + 1
            offset += num


_PLANS: OrderedDict = OrderedDict()
#: plans kept (least recently used dropped): one per device group and optimizer is the usual need
_PLAN_CACHE_SIZE = 32
_data_ptr = Tensor.data_ptr
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")


def _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool,
          rows: bool | None = None) -> _Plan:
    """The cached :class:`_Plan` of these tensors. The key holds every pointer, every
    parameter's shape and dtype, every gradient's dtype and the orientation override ``rows``
    (local shards), so a plan is reused only for the very same memory laid out the same way
    (the caller has checked the tensors: contiguous, moments of the parameters' shapes)."""
    key = (amsgrad, rows, tuple(map(_data_ptr, params)), tuple(map(_data_ptr, grads)),
           tuple(map(_data_ptr, exp_avgs)), tuple(map(_data_ptr, exp_avg_sqs)),
           tuple(map(_data_ptr, max_exp_avg_sqs)), tuple(map(_shape, params)),
           tuple(map(_dtype, params)), tuple(map(_dtype, grads)))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _Plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad,
                                   rows)
        if len(_PLANS) > _PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def _group_step_impl(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                     exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], bc: Tensor,
                     lr: float, beta1: float, beta2: float, eps: float, maximize: bool,
                     retraction: str, cayley_iters: int, ns_steps: int,
                     drift_tol: float) -> Tensor:
    """Pass 1 per bucket, one small step for all buckets of equal rank, pass 2 per bucket.

    ``bc`` is ``(2, F)`` fp32 on the factors' device (``1 - beta1^t`` and ``sqrt(1 - beta2^t)``
    per matrix, in order). Returns the number of failed ``r x r`` factorizations (int32, on the
    device). (The custom op's signature: :func:`_group_step_core` also reports telemetry.)"""
    return _group_step_core(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, lr, beta1,
                            beta2, eps, maximize, retraction, cayley_iters, ns_steps, drift_tol)


def _group_step_core(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bc, lr, beta1, beta2,
                     eps, maximize, retraction, cayley_iters, ns_steps, drift_tol,
                     telemetry: list | None = None, sharding=None) -> Tensor:
    """:func:`_group_step_impl`; ``telemetry`` (eager steps only): a list to which the largest
    ``||K - I||_F`` of each rank's factors is appended (0-dim device tensors). ``sharding``
    (eager steps only; a :class:`~stiefel_kernels.backends.ShardGroup`): the tensors are the
    local shards of one bucket; each bucket's stacked ``(K, G, H)`` is summed over the shard
    group (one all-reduce) before the small step."""
    hp = StiefelHyperparams(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            amsgrad=len(max_exp_avg_sqs) > 0, maximize=maximize,
                            retraction=retraction, cayley_iters=cayley_iters, ns_steps=ns_steps,
                            drift_tol=drift_tol)
    rows = None if sharding is None else sharding.row_orthonormal
    plan = _plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp.amsgrad, rows)
    grams_by_rank: dict[int, list[Tensor]] = defaultdict(list)
    slots = []
    for ptrs, shape, p_dtype, g_dtype, cfg, num, r, off, partials in plan.launches:
        bcs = bc[:, off:off + num]
        grams = pass1(ptrs, shape, p_dtype, g_dtype, bcs, hp, cfg, num, partials,
                      row_orthonormal=rows)
        if sharding is not None:  # every rank, empty shards included; then identical everywhere
            grams = sharding.reduce(grams.contiguous())
        grams_by_rank[r].append(grams)
        slots.append(len(grams_by_rank[r]) - 1)
    coefs, failures = {}, None
    for r, grams in grams_by_rank.items():
        r_pad = max(16, _next_pow2(r))
        stacked = grams[0] if len(grams) == 1 else torch.cat(grams)
        if telemetry is not None:
            err = gram_orthogonality_error(stacked[:, 0])
            if err is not None:
                telemetry.append(err)
        coef, count = small_step(stacked, hp, r_pad)
        coefs[r] = coef.split([g.shape[0] for g in grams]) if len(grams) > 1 else (coef,)
        if count is not None:
            failures = count if failures is None else failures + count
    for (ptrs, shape, p_dtype, _, cfg, num, r, off, _), j in zip(plan.launches, slots):
        pass2(ptrs, shape, p_dtype, bc[:, off:off + num], coefs[r][j], hp, cfg, num,
              row_orthonormal=rows)
    if failures is None:
        failures = torch.zeros((), dtype=torch.int32, device=params[0].device)
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
_device = operator.attrgetter("device")
_contiguous = Tensor.is_contiguous


class _Layout(NamedTuple):
    """What a step derives from the factors' shapes, dtypes and devices alone (cached on them):
    the moments' dtype per factor, and per device the factors' indices in bucket order with
    the number of matrices of each (a stack ``(..., a, b)`` holds several)."""

    works: tuple[torch.dtype, ...]
    groups: tuple[tuple[torch.device, tuple[int, ...], tuple[int, ...]], ...]
    identity: bool  # one device, buckets already in list order: the lists are used as they are


_LAYOUTS: OrderedDict = OrderedDict()


def _layout(params: list[Tensor], grads: list[Tensor], key: tuple,
            rows: bool | None = None) -> _Layout:
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    for i, p in enumerate(params):  # once per layout: the checks only depend on the key
        reason = unsupported_reason(p, row_orthonormal=rows)
        if reason is not None:
            raise ValueError(f"triton backend: factor {i} ({p.dtype}, shape {tuple(p.shape)}): {reason}")
    # group by device (one op each), order by bucket so that buckets are contiguous runs
    by_device: dict[torch.device, list[int]] = {}
    for bkey, bucket in _buckets.buckets(params, grads).items():
        by_device.setdefault(bkey.device, []).extend(bucket)
    groups = tuple((dev, tuple(idx), tuple(math.prod(params[i].shape[:-2])
                                           for i in idx))
                   for dev, idx in by_device.items())
    identity = len(groups) == 1 and groups[0][1] == tuple(range(len(params)))
    layout = _LAYOUTS[key] = _Layout(tuple(state_dtype(p) for p in params), groups, identity)
    if len(_LAYOUTS) > _PLAN_CACHE_SIZE:
        _LAYOUTS.popitem(last=False)
    return layout


def _check_states(params: list[Tensor], shapes: tuple, layout: _Layout,
                  states: list[list[Tensor]]) -> None:
    """Every moment has its factor's shape, working dtype and device (compared as whole tuples:
    the loop that names the culprit runs only when something does not fit)."""
    devices = tuple(map(_device, params))
    for ts in states:
        if (tuple(map(_shape, ts)) == shapes and tuple(map(_dtype, ts)) == layout.works
                and tuple(map(_device, ts)) == devices):
            continue
        for i, (p, t) in enumerate(zip(params, ts)):
            work = layout.works[i]
            if t.dtype != work or t.shape != p.shape or t.device != p.device:
                raise ValueError(f"triton backend: factor {i}: optimizer state of dtype {t.dtype}, "
                                 f"shape {tuple(t.shape)} on {t.device} does not fit a {p.dtype} "
                                 f"parameter of shape {tuple(p.shape)} on {p.device} (expected "
                                 f"{work} moments of its shape, on its device)")


@torch.no_grad()
def step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
         state_steps: list[Tensor], hp: StiefelHyperparams, *,
         telemetry: list | None = None, sharding=None) -> Tensor | None:
    """One Stiefel-AdamW step over ``params`` (see :mod:`stiefel_kernels.backends`).

    ``sharding`` (a :class:`~stiefel_kernels.backends.ShardGroup`, given by
    :func:`stiefel_kernels.distributed.backend_step` for factors sharded along their long side):
    the tensors are the local shards of one bucket (possibly empty, possibly looking the other
    way round: the orientation is ``sharding.row_orthonormal``); pass 1 runs on them, the
    bucket's ``(K, G, H)`` are summed over the shard group in one all-reduce, then the small
    step (the same on every rank) and pass 2 on the local shards. Such a step runs eagerly.

    Every check runs before anything changes. Errors name a factor by its index in ``params``
    (this module does not know names; ``StiefelAdamW`` checks the same before any group steps
    and names the parameter).

    Host cost: the checks compare whole tuples of shapes / dtypes / devices, the layout
    (buckets, device groups) and the launch plan (pointer arrays, configurations, buffers) are
    cached, and the bias corrections are computed on the device from the step counters, so a
    steady-state step does no per-factor Python work beyond building those tuples, and with
    counters on the factors' device no host-to-device copy (capturable)."""
    if not params:
        return None
    shapes = tuple(map(_shape, params))
    rows = None if sharding is None else sharding.row_orthonormal
    key = (shapes, tuple(map(_dtype, params)), tuple(map(_dtype, grads)),
           tuple(map(_device, params)), _interpreting(), rows)
    layout = _layout(params, grads, key, rows)
    if tuple(map(_shape, grads)) != shapes:
        i = next(i for i, (p, g) in enumerate(zip(params, grads)) if g.shape != p.shape)
        raise ValueError(f"triton backend: factor {i}: gradient of shape {tuple(grads[i].shape)} "
                         f"for a parameter of shape {tuple(params[i].shape)}")
    vmax = max_exp_avg_sqs if hp.amsgrad else []
    _check_states(params, shapes, layout, [exp_avgs, exp_avg_sqs] + ([vmax] if hp.amsgrad else []))
    if not all(map(_contiguous, grads)) or any(d not in _GRAD_DTYPES for d in key[2]):
        grads = [(g if g.dtype in _GRAD_DTYPES else g.to(torch.float32)).contiguous() for g in grads]
    # The kernels address contiguous matrices; anything else goes through a contiguous copy.
    tensors = [params, exp_avgs, exp_avg_sqs, vmax]
    staged = [ts if all(map(_contiguous, ts)) else [t if t.is_contiguous() else t.contiguous() for t in ts]
              for ts in tensors]
    compiling = torch.compiler.is_compiling()
    failures = None
    for device, idx, repeats in layout.groups:
        if layout.identity:
            ps, gs, ms, vs, xs, steps = staged[0], grads, staged[1], staged[2], staged[3], state_steps
        else:
            ps, gs, ms, vs, steps = ([ts[i] for i in idx] for ts in
                                     (staged[0], grads, staged[1], staged[2], state_steps))
            xs = [staged[3][i] for i in idx] if hp.amsgrad else []
        bc = bias_correction_tensor(advance_steps(steps), hp.beta1, hp.beta2, device, repeats)
        # the custom op is what torch.compile sees; eager calls skip its dispatch (it bumps
        # the version counter of every tensor argument: ~1 ms for 256 factors)
        args = (ps, gs, ms, vs, xs, bc, hp.lr, hp.beta1, hp.beta2, hp.eps, hp.maximize,
                hp.retraction, hp.cayley_iters, hp.ns_steps, hp.drift_tol)
        if compiling and sharding is None:
            count = _group_step(*args)
        else:
            count = _group_step_core(*args, telemetry=telemetry, sharding=sharding)
        failures = count if failures is None else failures + count
    for orig, new in zip(tensors, staged):
        if new is not orig:
            for t, s in zip(orig, new):
                if s is not t:
                    t.copy_(s)
    return failures


BACKEND = FunctionBackend(name, unsupported_reason, step, reports_telemetry=True,
                          steps_local_shards=True)
