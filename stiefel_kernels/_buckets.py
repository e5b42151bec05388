"""Buckets of Stiefel factors and their working dtype: the one rule every step path uses.

A *bucket* is a set of factors that one batched computation steps together (one stack, one kernel
launch, one all-reduce). Its key is a :class:`BucketKey`:

* ``shape``: the stored shape, or with ``column_form=True`` the column-form shape
  ``(..., max(a, b), min(a, b))`` (the Riemannian hooks: a tall ``m x r`` factor and a wide
  ``r x m`` one share a bucket);
* ``dtype``, ``device``: of the parameter;
* ``grad_dtype``: the gradient's dtype where the computation is specialized on it (the
  ``triton`` kernels), else ``None``;
* ``layout``: the DTensor layout (mesh, placements) of a sharded factor
  (:func:`stiefel_kernels.distributed.backend_step`), else ``None``.

Order (the order of the stacked results, and so part of bit-identical steps): buckets come in
the order of their first factor in the list, and the factors of a bucket in list order.

Users: ``backends.torch_backend`` (:func:`buckets`), ``backends.triton_backend`` (:func:`buckets`
with gradients, then by device; :func:`runs` inside its custom op), ``riemannian.RiemannianHooks``
(:func:`buckets` with ``column_form=True``), ``distributed.backend_step`` (:func:`group` of
:func:`bucket_key` with the layout).

:func:`working_dtype` is the dtype a factor is stepped in: float32 for float16/bfloat16, the
parameter's own dtype otherwise (moments, Gram matrices, Riemannian gradients).
"""
from __future__ import annotations

import operator
from typing import Hashable, Iterable, NamedTuple, Sequence

import torch
from torch import Tensor

from .geometry import is_row_orthonormal

__all__ = ["BucketKey", "bucket_key", "group", "buckets", "runs", "working_dtype"]

_HALF = (torch.float16, torch.bfloat16)
_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")


def working_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """The dtype a factor (a tensor, or a dtype) is stepped in: float32 for float16/bfloat16,
    else its own dtype."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float32 if dtype in _HALF else dtype


class BucketKey(NamedTuple):
    """Key of a bucket (module docstring): factors with equal keys are stepped together."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    grad_dtype: torch.dtype | None = None
    layout: Hashable | None = None


def bucket_key(param: Tensor, grad: Tensor | None = None, *, column_form: bool = False,
               layout: Hashable | None = None) -> BucketKey:
    """The :class:`BucketKey` of ``param``: ``grad_dtype`` only when ``grad`` is given, the
    column-form shape with ``column_form=True``, ``layout`` as given."""
    shape = tuple(param.shape)
    if column_form and is_row_orthonormal(shape):
        shape = shape[:-2] + (shape[-1], shape[-2])
    return BucketKey(shape, param.dtype, param.device, None if grad is None else grad.dtype, layout)


def group(keys: Iterable[Hashable]) -> dict[Hashable, list[int]]:
    """Positions of equal keys: ``{key: [i, ...]}``, keys in order of first appearance,
    positions ascending."""
    out: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def buckets(params: Sequence[Tensor], grads: Sequence[Tensor] | None = None, *,
            column_form: bool = False) -> dict[BucketKey, list[int]]:
    """Indices of ``params`` per bucket (:func:`group` of :func:`bucket_key`); with ``grads``
    the gradient dtype is part of the key."""
    if grads is None and not column_form and not torch.compiler.is_compiling():
        # the eager step's case: grouped by C-level maps of what bucket_key reads (dynamo does
        # not trace them), then bucket_key once per bucket (once per factor costs ~0.4 ms at 224)
        raw = group(zip(map(_shape, params), map(_dtype, params), map(_device, params)))
        return {bucket_key(params[idx[0]]): idx for idx in raw.values()}
    return group(bucket_key(p, None if grads is None else grads[i], column_form=column_form)
                 for i, p in enumerate(params))


def runs(params: Sequence[Tensor], grads: Sequence[Tensor] | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of maximal runs of consecutive factors with equal
    :func:`bucket_key`; the buckets of a list ordered by :func:`buckets`."""
    keys = [bucket_key(p, None if grads is None else grads[i]) for i, p in enumerate(params)]
    out, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            out.append((start, i))
            start = i
    return out
