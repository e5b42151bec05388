"""Native CPU passes of a Stiefel-AdamW step over a bucket (``csrc/fused_step_cpu.cpp``).

The two streaming passes of docs/design.md ("The fast path") as the ops
``torch.ops.stiefel_kernels.stiefel_adamw_pass1`` / ``stiefel_adamw_pass2`` (schemas, default
pure-torch kernels and fake kernels in :mod:`stiefel_kernels.ops`). Every list holds the ``P``
same-shape tensors of one bucket (:mod:`stiefel_kernels._buckets`); a tensor of shape
``(*batch, a, b)`` is a stack of ``L = prod(batch)`` factors. In column form a factor is ``X``
(``n x r``): a wide stored factor (``row_orthonormal``, ``a < b``: LoRA's ``A``) is ``X = A^T``.
Both orientations are read in place through the strides (no stacking, no transposed copies);
every tensor of the call must have unit stride along the same one of its last two dims
(:func:`unsupported_reason`).

Working dtype: float32 for bfloat16 / float16 / float32 parameters, float64 for float64 ones;
the moments (and ``max_exp_avg_sqs``) must be of the working dtype, the gradients of the
parameters' dtype.

Numerics (what the tests check):

* moments: bit for bit ``torch._foreach_lerp_(m, g, 1 - beta1)``, ``_foreach_mul_(v, beta2)``,
  ``_foreach_addcmul_(v, g, g, 1 - beta2)``, ``_foreach_maximum_(v_max, v)`` as torch computes
  them with its AVX2/AVX512 kernels (one FMA for lerp and one for addcmul); on a CPU without FMA
  the results differ from torch's in the last bit;
* ``D = (m / bc1) / (sqrt(v) / bc2 + eps)`` in the working dtype, the torch backend's expression
  in its order, with a correctly rounded ``sqrt`` (as the Triton kernels' ``sqrt_rn``). torch's
  CPU ``sqrt`` is not correctly rounded (in torch 2.13's CPU wheel about 16% of random float32
  inputs differ in the last bit), so ``D`` can differ from the torch backend's by one rounding;
  pass 2 recomputes the kernel's ``D`` bit for bit;
* ``K = X^T X``, ``G = X^T D``, ``H = D^T D``: products accumulated in the working dtype within
  chunks of 4096 rows of ``X`` (``gram.GRAM_CHUNK_ROWS``), chunk partials added in float64 in
  chunk order: the same bits at any thread count; ``K`` and ``H`` exactly symmetric;
* pass 2 writes ``X + (X (C - I) + D E)`` rounded once to the parameter dtype (round to nearest
  even for bfloat16), ``C - I`` formed in float64.

Neither op allocates memory proportional to the parameters: per thread a scratch of a few
sub-blocks (``8192`` elements each) and ``r x r`` accumulators; pass 1 allocates its output and
the chunk partials (``F * ceil(n / 4096) * 3 r^2`` elements; none where ``n <= 4096``:
the one partial of each factor is then written into the output).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import _native
from .geometry import is_row_orthonormal

__all__ = ["available", "unsupported_reason", "bias_correction_tensor", "pass1", "pass2"]

_OPS = torch.ops.stiefel_kernels


#: probed once, at import (after stiefel_kernels._C registered its kernels): a plain bool that
#: torch.compile reads as a constant (the dispatcher query itself would break its graph)
_AVAILABLE = _native.has_cpu_kernel("stiefel_adamw_pass1")


def available() -> bool:
    """True when the native CPU kernels of the two passes are loaded (``stiefel_kernels._C``
    built with ``csrc/fused_step_cpu.cpp``); otherwise the ops run their pure-torch default."""
    return _AVAILABLE


def _unit_stride_axis(t: Tensor, rows: bool) -> set[str]:
    n_dim, r_dim = (-1, -2) if rows else (-2, -1)
    axes = set()
    if t.shape[n_dim] == 1 or t.stride(n_dim) == 1:
        axes.add("n")
    if t.shape[r_dim] == 1 or t.stride(r_dim) == 1:
        axes.add("r")
    return axes


def unsupported_reason(*tensor_lists: Sequence[Tensor], row_orthonormal: bool | None = None) -> str | None:
    """Why the native passes cannot run on these lists (``None`` when they can): not built, not
    CPU, a dtype other than float32/float64/bfloat16/float16, or tensors whose unit-stride axis
    differs (e.g. a gradient given as a transposed view). The first list holds the parameters."""
    if not available():
        return "the native extension stiefel_kernels._C is not built or does not have the fused passes"
    tensors = [t for lst in tensor_lists for t in lst]
    if not tensors:
        return None
    p0 = tensor_lists[0][0]
    if p0.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {p0.dtype}"
    if not all(t.is_cpu for t in tensors):  # (t.device builds a device object per tensor)
        return "not a CPU tensor"
    if all(map(Tensor.is_contiguous, tensors)):  # the usual case, in one C-level pass: every
        return None  # tensor has unit stride along its last dim, the same axis for all
    rows = is_row_orthonormal(p0.shape) if row_orthonormal is None else row_orthonormal
    common = {"n", "r"}
    for t in tensors:
        common &= _unit_stride_axis(t, rows)
    if not common:
        return "the tensors do not all have unit stride along the same one of their last two dims"
    return None


def bias_correction_tensor(bc1: Sequence[float], bc2_sqrt: Sequence[float]) -> Tensor:
    """``(2, P)`` float64 tensor of ``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per tensor (the
    lists :func:`stiefel_kernels.backends.bias_corrections` returns)."""
    return torch.tensor([list(bc1), list(bc2_sqrt)], dtype=torch.float64).reshape(2, len(bc1))


def _hyper(hp, name: str):
    return getattr(hp, name) if not isinstance(hp, dict) else hp[name]


def pass1(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor] | None, bc: Tensor,
          hp, *, row_orthonormal: bool | None = None, out: Tensor | None = None) -> Tensor:
    """Pass 1 of a bucket: Adam moments in place and the Gram matrices of ``X`` and ``D``.

    Args:
        params: ``P`` parameters of shape ``(*batch, a, b)`` (read only).
        grads: their gradients, same shapes and dtype (read only; negated when ``hp.maximize``).
        exp_avgs, exp_avg_sqs: the moments, working dtype, updated in place.
        max_exp_avg_sqs: with ``hp.amsgrad``, updated in place to ``max(v_max, v)`` (and used
            for ``D``); ignored (may be ``None``) otherwise.
        bc: ``(2, P)`` floating tensor: ``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per parameter
            (steps already incremented; :func:`bias_correction_tensor`), rounded to the
            working dtype inside, as the torch backend does.
        hp: :class:`stiefel_kernels.backends.StiefelHyperparams` (or anything with ``beta1``,
            ``beta2``, ``eps``, ``amsgrad``, ``maximize``; a dict works too).
        row_orthonormal: orientation; default :func:`stiefel_kernels.geometry.is_row_orthonormal`
            of ``params[0].shape``.
        out: where to write ``grams`` (contiguous, the shape and dtype below, sharing no memory
            with the other arguments; ``stiefel_kernels::stiefel_adamw_pass1_into``): a buffer
            kept from step to step, so that no ``(P, *batch, 3, r, r)`` tensor is allocated.
    Returns:
        ``grams`` of shape ``(P, *batch, 3, r, r)`` in the working dtype: ``K = X^T X``,
        ``G = X^T D``, ``H = D^T D`` along dim ``-3`` (``grams.unbind(-3)``); ``(0, 3, 0, 0)``
        for empty lists. ``out`` itself when given.
    """
    params = list(params)
    if row_orthonormal is None:
        row_orthonormal = bool(params) and is_row_orthonormal(params[0].shape)
    amsgrad = bool(_hyper(hp, "amsgrad"))
    maxs = list(max_exp_avg_sqs) if (amsgrad and max_exp_avg_sqs is not None) else []
    args = (params, list(grads), list(exp_avgs), list(exp_avg_sqs), maxs, bc,
            float(_hyper(hp, "beta1")), float(_hyper(hp, "beta2")), float(_hyper(hp, "eps")),
            amsgrad, bool(_hyper(hp, "maximize")), bool(row_orthonormal))
    if out is None:
        return _OPS.stiefel_adamw_pass1(*args)
    _OPS.stiefel_adamw_pass1_into(*args, out)
    return out


def pass2(params: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs_or_max: Sequence[Tensor], bc: Tensor, c: Tensor, e: Tensor, hp,
          *, row_orthonormal: bool | None = None) -> None:
    """Pass 2 of a bucket: ``X <- X + (X (C - I) + D E)`` in place, ``D`` recomputed bit for bit
    as :func:`pass1` computed it.

    Args:
        params: the ``P`` parameters, written in place.
        exp_avgs: the moments after pass 1 (read only).
        exp_avg_sqs_or_max: ``exp_avg_sqs``, or ``max_exp_avg_sqs`` with AMSGrad (read only).
        bc: the ``(2, P)`` tensor pass 1 got.
        c, e: ``C`` (not ``C - I``: the identity is subtracted in float64 inside) and ``E`` of
            ``Y = X C + D E``, shape ``(P, *batch, r, r)`` (any floating dtype; float32 or
            float64 as :func:`stiefel_kernels.gram.step_coefficients` returns them).
        hp: hyper-parameters; only ``eps`` is read (a float works too).
        row_orthonormal: as in :func:`pass1`.
    """
    params = list(params)
    if row_orthonormal is None:
        row_orthonormal = bool(params) and is_row_orthonormal(params[0].shape)
    eps = float(hp) if isinstance(hp, (int, float)) else float(_hyper(hp, "eps"))
    _OPS.stiefel_adamw_pass2(params, list(exp_avgs), list(exp_avg_sqs_or_max), bc, c, e, eps,
                             bool(row_orthonormal))
