"""Fake (meta) kernels of the native ops ``torch.ops.stiefel_kernels.*``.

They give output shapes, dtypes and strides without computing anything, so that ``torch.compile``
(and FakeTensor / meta tensors generally) can trace through the ops. Imported by
:mod:`stiefel_kernels._native` right after the extension ``_C`` registered the schemas. The
checks mirror those of ``csrc/module.cpp`` so tracing rejects what the kernels reject.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__: list[str] = []

_DTYPES = (torch.float32, torch.float64)


def _check_square_batch(m: Tensor, op: str) -> None:
    torch._check(m.dim() >= 2, lambda: f"stiefel_kernels::{op}: expected a (..., k, k) tensor "
                 f"with at least 2 dims, got shape {tuple(m.shape)}")
    torch._check(m.shape[-1] == m.shape[-2], lambda: f"stiefel_kernels::{op}: expected square "
                 f"matrices in the last two dims, got shape {tuple(m.shape)}")
    torch._check(m.dtype in _DTYPES, lambda: f"stiefel_kernels::{op}: expected float32 or "
                 f"float64, got {m.dtype}")


def _info(like: Tensor, batch_shape) -> Tensor:
    return like.new_empty(batch_shape, dtype=torch.int32)


@torch.library.register_fake("stiefel_kernels::inv_sqrt_spd")
def _inv_sqrt_spd_fake(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "inv_sqrt_spd")
    return m.new_empty(m.shape), _info(m, m.shape[:-2])


@torch.library.register_fake("stiefel_kernels::cholesky_upper_inverse")
def _cholesky_upper_inverse_fake(m: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(m, "cholesky_upper_inverse")
    return m.new_empty(m.shape), _info(m, m.shape[:-2])


@torch.library.register_fake("stiefel_kernels::solve")
def _solve_fake(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    _check_square_batch(a, "solve")
    torch._check(b.dim() >= 2, lambda: "stiefel_kernels::solve: expected b of shape (..., k, m) "
                 f"with at least 2 dims, got shape {tuple(b.shape)}")
    torch._check(b.shape[-2] == a.shape[-1], lambda: f"stiefel_kernels::solve: a is "
                 f"{tuple(a.shape)} so b must have {a.shape[-1]} rows (dim -2), got shape "
                 f"{tuple(b.shape)}")
    torch._check(b.dtype == a.dtype, lambda: "stiefel_kernels::solve: a and b must have the "
                 f"same dtype, got {a.dtype} and {b.dtype}")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return b.new_empty((*batch, a.shape[-1], b.shape[-1])), _info(a, batch)
