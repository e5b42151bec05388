"""Torch backend: the two-pass Gram form over whole buckets of same-shape factors.

Portable fast path and the template of the Triton kernels. Per bucket (same shape, dtype,
device: :mod:`stiefel_kernels._buckets`) of a parameter group:

1. moments with ``torch._foreach_*`` (no per-factor Python loop), ``D`` batched;
2. pass 1: ``K, G, H`` by batched matmuls in float32 or wider (TF32 off);
3. small step: :func:`stiefel_kernels.gram.step_coefficients` for all factors at once (the
   retraction, and the orthonormality correction where the retraction needs one);
4. pass 2: ``Y = X C + D E`` and one ``_foreach_copy_`` back into the parameters.

On the CPU, when the native extension has them, steps 1-2 and 4 of each bucket are the native
ops ``stiefel_kernels::stiefel_adamw_pass1`` / ``pass2`` (:mod:`stiefel_kernels.cpu_fused`:
in place, both orientations by strides, nothing stacked, the same bits at any thread count);
the pure-torch formulation stays the portable fallback and their test reference.

No host synchronization: bias corrections are computed on the device from the step counters
(:func:`~stiefel_kernels.backends.bias_correction_tensor`), factorization failures stay on the
device as a count.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _buckets, _native, cpu_fused, geometry, gram
from . import (FunctionBackend, StiefelHyperparams, advance_steps, bias_correction_tensor,
               gram_orthogonality_error, state_dtype)

name = "torch"


def unsupported_reason(param: Tensor) -> str | None:
    return None


#: buckets whose buffers a workspace keeps at most (beyond it, e.g. when the set of factors with
#: gradients changes from step to step, it starts over)
_MAX_WORKSPACE_BUCKETS = 64
#: the native kernels that write into buffers (an extension built before them has only the
#: allocating ops: then nothing is kept, rather than the ``_into`` ops' pure-torch default)
_NATIVE_INTO = (_native.has_cpu_kernel("stiefel_adamw_pass1_into")
                and _native.has_cpu_kernel("cayley_fp_step_into"))


class _Buffers:
    """One bucket's buffers in a workspace, each made at its first use: ``grams``
    ``(P, *batch, 3, r, r)``, and ``c``, ``e``, ``k_minus_i`` ``(P, *batch, r, r)``, in the working
    dtype (GPT-2's 144 factors of 768 x 64: 14 MB, half the parameters' bytes, that were
    allocated, and page-faulted in, at every step)."""

    def __init__(self, p0: Tensor, count: int, rows: bool):
        r = p0.shape[-2] if rows else p0.shape[-1]
        self._lead = (count, *p0.shape[:-2])
        self._r = r
        self._opts = {"dtype": state_dtype(p0), "device": p0.device}
        self._made: dict[str, Tensor] = {}

    def get(self, name: str) -> Tensor:
        t = self._made.get(name)
        if t is None:
            shape = (*self._lead, 3, self._r, self._r) if name == "grams" else (*self._lead, self._r, self._r)
            t = self._made[name] = torch.empty(shape, **self._opts)
        return t

    def tensors(self) -> list[Tensor]:
        return list(self._made.values())


def _bucket_buffers(workspace: dict | None, ps: list[Tensor], rows: bool) -> _Buffers | None:
    """The bucket's :class:`_Buffers` in ``workspace`` (kept from step to step), or ``None``
    without a workspace or without the native kernels that write into them."""
    if workspace is None or not _NATIVE_INTO:
        return None
    p0 = ps[0]
    key = ("torch/native", tuple(p0.shape), len(ps), p0.dtype, p0.device, rows)
    buf = workspace.get(key)
    if buf is None:
        if len(workspace) >= _MAX_WORKSPACE_BUCKETS:
            workspace.clear()
        buf = workspace[key] = _Buffers(p0, len(ps), rows)
    return buf


def _native_bucket(ps, gs, ms, vs, maxs, steps, hp: StiefelHyperparams, rows: bool, sharding,
                   telemetry: list | None, workspace: dict | None = None) -> Tensor:
    """One bucket through the native CPU passes; returns its failure count."""
    bc = bias_correction_tensor(advance_steps(steps), hp.beta1, hp.beta2, ps[0].device,
                                dtype=torch.float64)
    buf = _bucket_buffers(workspace, ps, rows)
    grams = cpu_fused.pass1(ps, gs, ms, vs, maxs, bc, hp, row_orthonormal=rows,
                            out=None if buf is None else buf.get("grams"))
    k, g, h = grams.unbind(-3)
    c, e, info = _small_step(k, g, h, hp, sharding, telemetry, buf)
    cpu_fused.pass2(ps, ms, maxs if hp.amsgrad else vs, bc, c, e, hp, row_orthonormal=rows)
    return (info != 0).sum()


def _small_step(k: Tensor, g: Tensor, h: Tensor, hp: StiefelHyperparams, sharding,
                telemetry: list | None, buf: _Buffers | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Between the passes, for both formulations: the one all-reduce of a sharded bucket's
    ``(K, G, H)``, the telemetry, and the ``r x r`` step; returns ``(C, E, info)``. ``buf``:
    the bucket's buffers (:func:`_bucket_buffers`), or ``None``."""
    if sharding is not None:
        k, g, h = sharding.reduce_grams(k, g, h)
    if telemetry is not None:
        err = gram_orthogonality_error(k, None if buf is None else buf.get("k_minus_i"))
        if err is not None:
            telemetry.append(err)
    native_step = buf is not None and gram.takes_native_step(k, hp.retraction, hp.cayley_iters)
    return gram.step_coefficients(k, g, h, hp.lr, hp.retraction, tol=hp.drift_tol,
                                  cayley_iters=hp.cayley_iters, ns_steps=hp.ns_steps,
                                  out=(buf.get("c"), buf.get("e")) if native_step else None)


@torch.no_grad()
def step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
         exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor] | None,
         state_steps: list[Tensor], hp: StiefelHyperparams, *, sharding=None,
         native_passes: bool = True, telemetry: list | None = None,
         workspace: dict | None = None) -> Tensor | None:
    """On the CPU, where the native extension has them (:mod:`stiefel_kernels.cpu_fused`), each
    bucket's two streaming passes run as the native ops ``stiefel_kernels::stiefel_adamw_pass1``
    / ``pass2`` (in place, nothing stacked); elsewhere, or with ``native_passes=False``, the
    pure-torch formulation below (the portable fallback, and what the native passes are tested
    against).

    ``telemetry``: a list to which the step appends, per bucket, the largest ``||X^T X - I||_F``
    of its input factors (from the ``K`` it computes anyway; a 0-dim device tensor).

    ``workspace``: a dict kept by the caller from step to step (``StiefelAdamW`` keeps one), in
    which the native CPU path keeps each bucket's Gram matrices, ``C``, ``E`` and telemetry
    scratch (:func:`_bucket_buffers`) instead of allocating them at every step.

    ``sharding`` (a :class:`~stiefel_kernels.backends.ShardGroup`, given by
    :func:`stiefel_kernels.distributed.backend_step` for factors sharded along their long side):
    the tensors are local shards of one bucket; it gives their global orientation
    (``row_orthonormal``) and sums ``(K, G, H)`` over the shards (``reduce_grams``)."""
    failures = None
    for idx in _buckets.buckets(params).values():
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        steps = [state_steps[i] for i in idx]
        rows = geometry.is_row_orthonormal(ps[0].shape) if sharding is None else sharding.row_orthonormal
        # a CUDA bucket never looks at the native CPU passes (no per-tensor checks on its hot path)
        if native_passes and ps[0].device.type == "cpu" and cpu_fused.available():
            g_in = [grads[i] for i in idx]
            maxs = [max_exp_avg_sqs[i] for i in idx] if hp.amsgrad else []
            if (all(g.dtype == ps[0].dtype for g in g_in)
                    and cpu_fused.unsupported_reason(ps, g_in, ms, vs, maxs, row_orthonormal=rows) is None):
                count = _native_bucket(ps, g_in, ms, vs, maxs, steps, hp, rows, sharding, telemetry,
                                       workspace)
                failures = count if failures is None else failures + count
                continue
        work = state_dtype(ps[0])
        gs = [grads[i].to(work) for i in idx]
        if hp.maximize:
            gs = torch._foreach_neg(gs)

        t = advance_steps(steps)
        torch._foreach_lerp_(ms, gs, 1 - hp.beta1)
        torch._foreach_mul_(vs, hp.beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - hp.beta2)
        if hp.amsgrad:
            maxs = [max_exp_avg_sqs[i] for i in idx]
            torch._foreach_maximum_(maxs, vs)
            vs = maxs

        m = torch.stack(ms)
        bc1, bc2_sqrt = bias_correction_tensor(t, hp.beta1, hp.beta2, m.device,
                                               dtype=m.dtype).view(2, -1, *([1] * (m.dim() - 1)))
        d = (m / bc1) / (torch.stack(vs).sqrt() / bc2_sqrt + hp.eps)
        x = torch.stack(ps).to(work)
        x, d = (x.mT, d.mT) if rows else (x, d)  # column form

        k, g, h = gram.gram_pass(x, d)
        c, e, info = _small_step(k, g, h, hp, sharding, telemetry)
        y = gram.apply_coefficients(x, d, c.to(work), e.to(work))
        stored = y.mT if rows else y
        torch._foreach_copy_(ps, list(stored.to(ps[0].dtype).unbind(0)))

        count = (info != 0).sum()
        failures = count if failures is None else failures + count
    return failures


BACKEND = FunctionBackend(name, unsupported_reason, step, reports_telemetry=True,
                          steps_local_shards=True, keeps_workspace=True)
