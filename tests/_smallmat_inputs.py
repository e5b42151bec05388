"""Inputs and checks shared by the tests of the batched small-matrix ops (native CPU kernels and
the emulated CUDA block kernels): fresh random matrices with a condition number the test chooses,
the relative-error metric and the dtype-derived tolerance (tests/README.md)."""
from __future__ import annotations

import math
import zlib

import torch

BAD = (1, 4)  # bad batch entries among 6
# Relative (Frobenius) error allowed up to condition number 1e3; scaled linearly beyond.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def seeded_gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh inputs per test, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def orthogonal(shape, k, gen) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(*shape, k, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def spd(shape, k, cond, gen) -> torch.Tensor:
    """Random SPD (float64) with eigenvalues log-spaced in [1, cond], shuffled."""
    q = orthogonal(shape, k, gen)
    lam = torch.logspace(0, math.log10(cond), k, dtype=torch.float64)
    lam = lam[torch.randperm(k, generator=gen)]
    m = (q * lam.unsqueeze(-2)) @ q.mT
    return (m + m.mT) / 2


def nonsingular(shape, k, cond, gen) -> torch.Tensor:
    """Random general matrix (float64) U diag(s) V^T with singular values in [1, cond]."""
    u, v = orthogonal(shape, k, gen), orthogonal(shape, k, gen)
    s = torch.logspace(0, math.log10(cond), k, dtype=torch.float64)
    return (u * s[torch.randperm(k, generator=gen)].unsqueeze(-2)) @ v.mT


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-matrix relative Frobenius error over the batch."""
    x = x.double().reshape(-1, *x.shape[-2:])
    ref = ref.double().reshape(-1, *ref.shape[-2:])
    return ((x - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


def rtol(dtype, cond) -> float:
    return RTOL[dtype] * max(1.0, cond / 1e3)


def check_flags(x, info, bad=BAD):
    """info nonzero exactly at ``bad``; those outputs NaN, the others finite."""
    mask = torch.zeros(info.shape, dtype=torch.bool)
    mask[list(bad)] = True
    assert (info[mask] != 0).all(), info
    assert (info[~mask] == 0).all(), info
    assert torch.isnan(x[mask]).all()
    assert torch.isfinite(x[~mask]).all()


def pd_with_negative_pivot(k, p, gen):
    """L D L^T with unit lower L and D[p] < 0: leading minors 1..p are PD, minor p+1 is not."""
    low = torch.randn(k, k, generator=gen, dtype=torch.float64).tril(-1) * 0.3
    low = low + torch.eye(k, dtype=torch.float64)
    d = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    d[p] = -d[p]
    return (low * d) @ low.T
