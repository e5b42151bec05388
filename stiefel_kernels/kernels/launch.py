"""Launchers of the Triton kernels: launch configurations, pointer arrays and one function per
kernel launch (:func:`pass1`, :func:`small_step_launch`, :func:`pass2`). The backend
(:mod:`stiefel_kernels.backends.triton_backend`) keeps only bucketing and dispatch.

Compiled-resource facts (registers, spills, shared memory) of every configuration
:func:`launch_config` can return are checked by ``tests/test_kernel_report.py`` and printed by
``bench/kernel_report.py``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
from torch import Tensor

import triton  # noqa: F401
import triton.language as tl

from .. import gram
from ..backends import StiefelHyperparams
from .small_step_triton import CAYLEY_FP, NEWTON_SCHULZ, small_step_kernel
from .stiefel_adamw_triton import stiefel_pass1_kernel, stiefel_pass2_kernel

#: parameter / gradient dtypes the kernels read (moments are always float32)
PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
GRAD_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

#: precision of the G, H and pass-2 products (K is always "ieee"); "tf32x3" is the faster option
DOT_PRECISION = os.environ.get("STIEFEL_KERNELS_TRITON_DOT", "ieee")
if DOT_PRECISION not in ("ieee", "tf32x3"):
    raise ImportError(f"STIEFEL_KERNELS_TRITON_DOT must be 'ieee' or 'tf32x3', got {DOT_PRECISION!r}")


# ----------------------------------------------------------------------------- launch config
def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: fewest programs is fastest
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 4 * _SM_COUNT[idx]


#: most rows of one pass-1 chunk (float32 accumulation inside a chunk, float64 across chunks)
MAX_CHUNK_ROWS = gram.GRAM_CHUNK_ROWS


#: ``(BLOCK_N, num_warps, num_stages)`` of both passes per ``R_PAD``. Compiled ahead of time for
#: sm_90 (Triton 3.9, ptxas 13.0, fp32 and bf16 parameters, with and without AMSGrad), these are
#: configurations without register spills whose shared memory stays far below the 227 KB
#: (232,448 B) a block may use on H100/H200. Triton's default ``num_stages=3`` with the former
#: tiles spilled 1.6-40 KB per thread at every ``R_PAD``, and pass 2 at ``R_PAD = 128`` needed
#: 240 KB of shared memory, so its launch failed. ``R_PAD = 128`` has no spill-free
#: configuration (pass 1 spills ~0.5 KB per thread at (16, 8, 1); pass 2 none, 144 KB shared).
#: Not yet timed on a GPU: ``bench/bench_step.py`` is the check.
TILES = {16: (128, 4, 1), 32: (32, 8, 2), 64: (16, 8, 2), 128: (16, 8, 1)}


def launch_config(n: int, r: int, num_factors: int, device: torch.device,
                  num_chunks: int | None = None, block_n: int | None = None) -> dict:
    """Tile sizes and the split of the long dimension ``n`` into chunks (one program each).

    A chunk holds at least ``16 * R_PAD`` rows so the ``3 R_PAD^2`` partial sums it writes stay
    small (< 10%) next to the ``6 r`` words per row that pass 1 moves, and at most
    :data:`MAX_CHUNK_ROWS` rows, so the float32 accumulation inside a chunk stays short (the
    chunks are added in float64, as in :func:`stiefel_kernels.gram.gram_pass`).
    ``num_chunks`` / ``block_n`` override (tests)."""
    r_pad = max(16, next_pow2(r))
    tile_n, num_warps, num_stages = TILES[r_pad]
    if block_n is None:
        block_n = tile_n
    if num_chunks is None:
        min_rows = max(block_n, 16 * r_pad)
        max_chunks = max(1, math.ceil(n / min_rows))
        num_chunks = min(max_chunks, max(1, math.ceil(_target_programs(device) / num_factors)))
        num_chunks = max(num_chunks, math.ceil(n / MAX_CHUNK_ROWS))
    num_chunks = max(1, min(num_chunks, math.ceil(n / block_n)))
    rows = math.ceil(math.ceil(n / num_chunks) / block_n) * block_n
    num_chunks = math.ceil(n / rows)
    return dict(R_PAD=r_pad, BLOCK_N=block_n, rows_per_chunk=rows, num_chunks=num_chunks,
                num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- pointer arrays
_PTR_CACHE: OrderedDict = OrderedDict()
_PTR_CACHE_SIZE = 256


def _matrix_pointers(t: Tensor) -> list[int]:
    """``data_ptr()`` of every matrix of a contiguous ``(..., a, b)`` tensor."""
    mat = t.shape[-2] * t.shape[-1]
    count = t.numel() // mat
    base, step = t.data_ptr(), mat * t.element_size()
    return [base + s * step for s in range(count)]


def pointer_array(kinds: list[list[Tensor] | None], device: torch.device) -> Tensor:
    """``(len(kinds), F)`` int64 device tensor of matrix pointers; a ``None`` kind repeats the
    first row (never dereferenced). Cached by the pointer values themselves, which is always
    valid: the array only holds those values."""
    rows = []
    for ts in kinds:
        rows.append(None if ts is None else tuple(q for t in ts for q in _matrix_pointers(t)))
    first = rows[0]
    rows = [first if row is None else row for row in rows]
    key = (device, tuple(rows))
    hit = _PTR_CACHE.get(key)
    if hit is not None:
        _PTR_CACHE.move_to_end(key)
        return hit
    arr = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    _PTR_CACHE[key] = arr
    if len(_PTR_CACHE) > _PTR_CACHE_SIZE:
        _PTR_CACHE.popitem(last=False)
    return arr


# ----------------------------------------------------------------------------- passes
def orientation(shape) -> tuple[int, int, int, int]:
    """``(n, r, stride_n, stride_r)`` of the column form of a contiguous ``(..., a, b)`` matrix."""
    a, b = shape[-2], shape[-1]
    if a < b:  # wide, row-orthonormal: X = A^T
        return b, a, 1, b
    return a, b, b, 1


def pass1(ptrs: Tensor, shape, p_dtype: torch.dtype, g_dtype: torch.dtype, bc: Tensor,
          hp: StiefelHyperparams, cfg: dict, num_factors: int,
          partials: Tensor | None = None) -> Tensor:
    """Launch pass 1; returns the reduced Gram matrices ``(F, 3, r, r)`` (K, G, H), fp32.

    ``partials`` (``(F, num_chunks, 3, R_PAD, R_PAD)`` fp32) may be given (tests poison it)."""
    n, r, s_n, s_r = orientation(shape)
    r_pad, chunks = cfg["R_PAD"], cfg["num_chunks"]
    if partials is None:
        partials = torch.empty((num_factors, chunks, 3, r_pad, r_pad), dtype=torch.float32,
                               device=ptrs.device)
    stiefel_pass1_kernel[(num_factors, chunks)](
        ptrs, bc[0], bc[1], partials,
        num_factors, n, r, s_n, s_r, cfg["rows_per_chunk"],
        1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps,
        P_DT=PARAM_DTYPES[p_dtype], G_DT=GRAD_DTYPES[g_dtype], S_DT=tl.float32,
        AMSGRAD=hp.amsgrad, MAXIMIZE=hp.maximize,
        R_PAD=r_pad, BLOCK_N=cfg["BLOCK_N"], DOT_PREC=DOT_PRECISION, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    # fixed order, no atomics; float64 so the error does not grow with the number of chunks
    grams = partials[:, 0] if chunks == 1 else partials.sum(dim=1, dtype=torch.float64).float()
    return grams[..., :r, :r]


#: retractions whose small step runs as one Triton launch (matrix products only)
SMALL_STEP_TRITON = {"cayley_fp": CAYLEY_FP, "newton_schulz": NEWTON_SCHULZ}
#: largest rank of the Triton small step (above it: the batched torch ops)
SMALL_STEP_MAX_RANK = 64
#: above this R_PAD the kernel's products stream ``SMALL_STEP_BK``-wide inner slices through a
#: scratch buffer (whole-width FMA dots spill registers on sm_90 from R_PAD = 32 on)
SMALL_STEP_BK = 16


def small_step_launch(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor, lr: float,
                      retraction: str, *, cayley_iters: int = 2, ns_steps: int = 6,
                      tol: float = float("inf"), r_pad: int | None = None,
                      c_minus_i: bool = False) -> None:
    """One launch of the small-step kernel for ``cayley_fp`` / ``newton_schulz``.

    ``k, g, h``: fp32 ``(F, r, r)`` views with unit column stride and common strides (they may
    be slices of a padded buffer). ``c, e``: fp32 ``(F, s, s)`` outputs with unit column stride
    and common strides, ``s = r`` (compact) or ``s = r_pad`` (zero padding is written too).
    ``c_minus_i`` stores ``C - I``. ``tol``: the orthonormality correction's threshold
    (:func:`stiefel_kernels.gram.orthonormality_correction`; ``inf`` turns it off)."""
    num, r = k.shape[0], k.shape[-1]
    if r_pad is None:
        r_pad = max(16, next_pow2(r))
    for t in (k, g, h, c, e):
        if t.dtype != torch.float32 or t.stride(-1) != 1:
            raise ValueError("small_step_launch: fp32 tensors with unit column stride expected")
    if g.stride() != k.stride() or h.stride() != k.stride() or e.stride() != c.stride():
        raise ValueError("small_step_launch: k, g, h (and c, e) must share strides")
    store_n = c.shape[-1]
    if store_n not in (r, r_pad) or r > r_pad:
        raise ValueError(f"small_step_launch: outputs of size {store_n} for rank {r}, R_PAD {r_pad}")
    iters = cayley_iters if retraction == "cayley_fp" else ns_steps
    bk = SMALL_STEP_BK if r_pad > SMALL_STEP_BK else r_pad
    scratch = (c if bk >= r_pad else
               torch.empty((num, 2, r_pad, r_pad), dtype=torch.float32, device=k.device))
    small_step_kernel[(num,)](
        k, g, h, c, e, scratch, float(lr), float(tol), r,
        k.stride(0), k.stride(-2), c.stride(0), c.stride(-2), store_n,
        RETRACTION=SMALL_STEP_TRITON[retraction], ITERS=iters, CORRECTION_ITERS=gram.CORRECTION_ITERS,
        C_MINUS_I=c_minus_i, R_PAD=r_pad, BK=bk, num_warps=4 if r_pad <= 16 else 8)


def small_step(grams: Tensor, hp: StiefelHyperparams, r_pad: int) -> tuple[Tensor, Tensor | None]:
    """Coefficients ``(F, 2, R_PAD, R_PAD)`` (``C - I``, ``E``; zero-padded) and the failure count
    (``None`` for the Triton small step: its retractions cannot fail)."""
    k, g, h = grams.unbind(1)
    num, r = k.shape[0], k.shape[-1]
    if hp.retraction in SMALL_STEP_TRITON and r <= SMALL_STEP_MAX_RANK:
        coef = torch.empty((num, 2, r_pad, r_pad), dtype=torch.float32, device=k.device)
        small_step_launch(k, g, h, coef[:, 0], coef[:, 1], hp.lr, hp.retraction,
                          cayley_iters=hp.cayley_iters, ns_steps=hp.ns_steps,
                          tol=hp.drift_tol, r_pad=r_pad, c_minus_i=True)
        return coef, None
    c, e, info = gram.step_coefficients(
        k, g, h, hp.lr, hp.retraction, tol=hp.drift_tol, cayley_iters=hp.cayley_iters,
        ns_steps=hp.ns_steps)
    coef = torch.zeros((num, 2, r_pad, r_pad), dtype=torch.float32, device=k.device)
    coef[:, 0, :r, :r] = c - torch.eye(r, dtype=c.dtype, device=c.device)
    coef[:, 1, :r, :r] = e
    return coef, (info != 0).sum(dtype=torch.int32)


def pass2(ptrs: Tensor, shape, p_dtype: torch.dtype, bc: Tensor, coef: Tensor,
          hp: StiefelHyperparams, cfg: dict, num_factors: int) -> None:
    n, r, s_n, s_r = orientation(shape)
    stiefel_pass2_kernel[(num_factors, cfg["num_chunks"])](
        ptrs, bc[0], bc[1], coef,
        num_factors, n, r, s_n, s_r, cfg["rows_per_chunk"], hp.eps,
        P_DT=PARAM_DTYPES[p_dtype], S_DT=tl.float32, AMSGRAD=hp.amsgrad,
        R_PAD=cfg["R_PAD"], BLOCK_N=cfg["BLOCK_N"], DOT_PREC=DOT_PRECISION,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
