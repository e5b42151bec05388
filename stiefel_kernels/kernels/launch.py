"""Launchers of the Triton kernels: launch configurations, pointer arrays and one function per
kernel launch (:func:`pass1`, :func:`small_step_launch`, :func:`pass2`). The backend
(:mod:`stiefel_kernels.backends.triton_backend`) keeps only bucketing and dispatch.

Compiled-resource facts (registers, spills, shared memory) of every configuration
:func:`launch_config` can return are checked by ``tests/test_kernel_report.py`` and printed by
``bench/kernel_report.py``.
"""
from __future__ import annotations

import functools
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


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (cached); ``None`` elsewhere (interpreter)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


#: most rows of one pass-1 chunk (float32 accumulation inside a chunk, float64 across chunks)
MAX_CHUNK_ROWS = gram.GRAM_CHUNK_ROWS


#: ``(BLOCK_N, num_warps, num_stages)`` of both passes per ``R_PAD`` (see :func:`tile_config`).
#: Checked by ``tests/test_kernel_report.py``: compiled ahead of time for sm_90 over every
#: specialization the launchers can ask for, none spills and all stay under the 227 KB
#: (232,448 B) of shared memory a block may use on H100/H200 (``bench/results/kernel-report-*``).
#: Not yet timed on a GPU: ``bench/bench_step.py`` is the check.
TILES = {16: (64, 8, 1), 32: (32, 4, 1), 64: (16, 8, 1)}
#: the same for ``DOT_PRECISION = "tf32x3"``: its split operands need more registers
TILES_TF32X3 = {16: (32, 8, 1), 32: (16, 8, 1), 64: (16, 8, 1)}
#: pass 2's ``num_warps`` where it differs from pass 1's (``(R_PAD, dot precision)``): at
#: ``R_PAD = 64`` with tf32x3, 8 warps spill 8 bytes in pass 2, 4 warps none
PASS2_WARPS = {(64, "tf32x3"): 4}

#: below two waves' worth of programs (``num_factors * chunks < 2 * SMs`` at the usual minimum
#: of ``16 * R_PAD`` rows per chunk) a chunk may hold as few as ``FEW_FACTORS_ROWS * R_PAD`` rows
FEW_FACTORS_ROWS = 4


def tile_config(r_pad: int, dot_precision: str | None = None) -> tuple[int, int, int]:
    """``(BLOCK_N, num_warps, num_stages)`` of both passes at ``R_PAD`` (and dot precision,
    default :data:`DOT_PRECISION`): the one place the launchers and the kernel report
    (``bench/kernel_report.py``) take them from."""
    table = TILES_TF32X3 if (dot_precision or DOT_PRECISION) == "tf32x3" else TILES
    return table[r_pad]


#: largest ``R_PAD`` with tiles (the backend's ``MAX_RANK``). ``R_PAD = 128`` has no spill-free
#: configuration found: pass 1 spilled ~0.5 KB per thread (ieee) to ~3 KB (tf32x3) at
#: ``(16, 8, 1)``, and pass 2 with tf32x3 needed 278,528 B of shared memory (over the limit).
MAX_R_PAD = max(TILES)


def launch_config(n: int, r: int, num_factors: int, device: torch.device,
                  num_chunks: int | None = None, block_n: int | None = None, *,
                  sm_count: int | None = None, dot_precision: str | None = None) -> dict:
    """Tile sizes and the split of the long dimension ``n`` into chunks (one program each).

    A chunk holds at least ``16 * R_PAD`` rows, so the ``3 R_PAD^2`` partial sums it writes (and
    the float64 reduction reads) stay small (< 10%) next to the ``6 r`` words per row that
    pass 1 moves, and at most :data:`MAX_CHUNK_ROWS` rows, so the float32 accumulation inside a
    chunk stays short (the chunks are added in float64, as in
    :func:`stiefel_kernels.gram.gram_pass`). The grid aims at ``4 * SMs`` programs. When the
    factors are few (fewer than two waves' worth of programs at that minimum, e.g. GPT-2's 144
    QK factors of ``768 x 64`` on 132 SMs), the minimum drops to ``FEW_FACTORS_ROWS * R_PAD``
    rows: up to ~12% more pass-1 traffic in partials, but a grid that fills the GPU.

    ``sm_count``: the SMs to fill (default: the CUDA device's; off CUDA, the interpreter, one
    program per factor unless the minimum forces more). ``dot_precision``: that of the kernels
    to launch (default :data:`DOT_PRECISION`). ``num_chunks`` / ``block_n`` override (tests)."""
    r_pad = max(16, next_pow2(r))
    tile_n, num_warps, num_stages = tile_config(r_pad, dot_precision)
    if block_n is None:
        block_n = tile_n
    if n == 0:  # an empty shard (FSDP2): no program to launch, its Gram sums are zero
        return dict(R_PAD=r_pad, BLOCK_N=block_n, rows_per_chunk=block_n, num_chunks=0,
                    num_warps=num_warps, num_stages=num_stages,
                    pass2_num_warps=PASS2_WARPS.get((r_pad, dot_precision or DOT_PRECISION), num_warps))
    if num_chunks is None:
        sms = sm_count if sm_count is not None else device_sm_count(device)
        min_rows = max(block_n, 16 * r_pad)
        target = 1  # interpreter: fewest programs is fastest
        if sms:
            target = 4 * sms
            if num_factors * math.ceil(n / min_rows) < 2 * sms:
                min_rows = max(block_n, FEW_FACTORS_ROWS * r_pad)
        max_chunks = max(1, math.ceil(n / min_rows))
        num_chunks = min(max_chunks, max(1, math.ceil(target / num_factors)))
        num_chunks = max(num_chunks, math.ceil(n / MAX_CHUNK_ROWS))
    num_chunks = max(1, min(num_chunks, math.ceil(n / block_n)))
    rows = math.ceil(math.ceil(n / num_chunks) / block_n) * block_n
    num_chunks = math.ceil(n / rows)
    dot = dot_precision or DOT_PRECISION
    return dict(R_PAD=r_pad, BLOCK_N=block_n, rows_per_chunk=rows, num_chunks=num_chunks,
                num_warps=num_warps, num_stages=num_stages,
                pass2_num_warps=PASS2_WARPS.get((r_pad, dot), num_warps))


# ----------------------------------------------------------------------------- pointer arrays
_PTR_CACHE: OrderedDict = OrderedDict()
_PTR_CACHE_SIZE = 256
#: attribute of a pointer array: every pointer in it is 16-byte aligned
_ALIGN_ATTR = "_stiefel_kernels_align16"


def _matrix_pointers(t: Tensor) -> list[int]:
    """``data_ptr()`` of every matrix of a contiguous ``(..., a, b)`` tensor (an empty matrix,
    e.g. an empty shard, has the tensor's pointer: the kernels read nothing there)."""
    mat = t.shape[-2] * t.shape[-1]
    count = math.prod(t.shape[:-2])
    base, step = t.data_ptr(), mat * t.element_size()
    return [base + s * step for s in range(count)]


def pointer_array(kinds: list[list[Tensor] | None], device: torch.device) -> Tensor:
    """``(len(kinds), F)`` int64 device tensor of matrix pointers; a ``None`` kind repeats the
    first row (never dereferenced). Cached by the pointer values themselves, which is always
    valid: the array only holds those values. Whether every pointer is 16-byte aligned is
    recorded with it (:func:`pointers_aligned`): the launchers pick the 16-byte-access kernels
    from that."""
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
    setattr(arr, _ALIGN_ATTR, all(q % 16 == 0 for row in rows for q in row))
    _PTR_CACHE[key] = arr
    if len(_PTR_CACHE) > _PTR_CACHE_SIZE:
        _PTR_CACHE.popitem(last=False)
    return arr


def pointers_aligned(ptrs: Tensor) -> bool:
    """Whether every pointer of an array from :func:`pointer_array` is 16-byte aligned (``False``
    for an array built elsewhere: the unaligned kernels are correct for any address)."""
    return bool(getattr(ptrs, _ALIGN_ATTR, False))


def aligned_elements(dtypes, ld: int, aligned: bool) -> int:
    """The kernels' ``ALIGNED`` constexpr: 0, or the number of elements of the narrowest stream
    in 16 bytes when every base pointer is 16-byte aligned (``aligned``) and the leading
    dimension ``ld`` keeps every row (tall) / column (wide) so."""
    vec = 16 // min(torch.empty((), dtype=dt).element_size() for dt in dtypes)
    return vec if aligned and ld % vec == 0 else 0


# ----------------------------------------------------------------------------- passes
def orientation(shape, row_orthonormal: bool | None = None) -> tuple[int, int, int, int]:
    """``(n, r, stride_n, stride_r)`` of the column form of a contiguous ``(..., a, b)`` matrix.

    ``row_orthonormal``: the orientation when the shape alone does not tell it (a local shard of
    a factor sharded along its long side may look square or the other way round); default: wide
    when ``a < b``."""
    a, b = shape[-2], shape[-1]
    if (a < b) if row_orthonormal is None else row_orthonormal:  # wide, row-orthonormal: X = A^T
        return b, a, 1, b
    return a, b, b, 1


def pass1_launch(ptrs: Tensor, shape, p_dtype: torch.dtype, g_dtype: torch.dtype, bc: Tensor,
                 hp: StiefelHyperparams, cfg: dict, num_factors: int, partials: Tensor, *,
                 aligned: bool | None = None, dot_precision: str | None = None,
                 row_orthonormal: bool | None = None):
    """``(grid, args, kwargs)`` of one pass-1 launch (what :func:`pass1` launches and what
    ``bench/kernel_report.py`` compiles); ``row_orthonormal`` as in :func:`orientation`."""
    n, r, s_n, s_r = orientation(shape, row_orthonormal)
    wide = s_n == 1
    ld = s_r if wide else s_n
    if aligned is None:
        aligned = pointers_aligned(ptrs)
    args = (ptrs, bc[0], bc[1], partials,
            num_factors, n, r, ld, cfg["rows_per_chunk"],
            1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps, -1.0 if hp.maximize else 1.0,
            int(hp.amsgrad))
    kwargs = dict(P_DT=PARAM_DTYPES[p_dtype], G_DT=GRAD_DTYPES[g_dtype], S_DT=tl.float32,
                  R_PAD=cfg["R_PAD"], BLOCK_N=cfg["BLOCK_N"],
                  DOT_PREC=dot_precision or DOT_PRECISION, WIDE=wide,
                  ALIGNED=aligned_elements((p_dtype, g_dtype, torch.float32), ld, aligned),
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (num_factors, cfg["num_chunks"]), args, kwargs


def pass1(ptrs: Tensor, shape, p_dtype: torch.dtype, g_dtype: torch.dtype, bc: Tensor,
          hp: StiefelHyperparams, cfg: dict, num_factors: int,
          partials: Tensor | None = None, *, aligned: bool | None = None,
          row_orthonormal: bool | None = None) -> Tensor:
    """Launch pass 1; returns the reduced Gram matrices ``(F, 3, r, r)`` (K, G, H), fp32.

    ``partials`` (``(F, num_chunks, 3, R_PAD, R_PAD)`` fp32) may be given (tests poison it).
    ``aligned``: whether every pointer is 16-byte aligned (default: as :func:`pointer_array`
    recorded; ``False`` forces the unaligned kernel). ``row_orthonormal`` as in
    :func:`orientation`. An empty shard (``n = 0``, ``num_chunks = 0``) launches nothing: its
    sums are zero."""
    r = orientation(shape, row_orthonormal)[1]
    r_pad, chunks = cfg["R_PAD"], cfg["num_chunks"]
    if chunks == 0:
        return torch.zeros((num_factors, 3, r, r), dtype=torch.float32, device=ptrs.device)
    if partials is None:
        partials = torch.empty((num_factors, chunks, 3, r_pad, r_pad), dtype=torch.float32,
                               device=ptrs.device)
    grid, args, kwargs = pass1_launch(ptrs, shape, p_dtype, g_dtype, bc, hp, cfg, num_factors,
                                      partials, aligned=aligned, row_orthonormal=row_orthonormal)
    stiefel_pass1_kernel[grid](*args, **kwargs)
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


#: ``BK`` at ``R_PAD = 64``: 16-wide slices spill (88/208 bytes per thread in cayley_fp with 8
#: warps, 80/108 with 16, Triton 3.9); 8-wide ones do not. Raised to :func:`min_fp32_dot_k`
#: where the installed Triton allows no K = 8 dot.
SMALL_STEP_BK_64 = 8


@functools.lru_cache(maxsize=None)
def min_fp32_dot_k() -> int:
    """The smallest inner size K of an fp32 ``tl.dot`` that the installed Triton compiles for
    CUDA: 8 from Triton 3.9 on; 16 in Triton 3.6, which refuses a K = 8 dot at compile time
    (seen on an H200, 2026-11-26). 16 where Triton does not say."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size

        return int(min_dot_size(None)(tl.float32, tl.float32)[2])
    except Exception:  # noqa: BLE001  (another Triton layout: the size every version accepts)
        return 16


def small_step_config(r_pad: int) -> tuple[int, int]:
    """``(BK, num_warps)`` of the small-step kernel at ``R_PAD`` (launcher and kernel report)."""
    bk = r_pad if r_pad <= SMALL_STEP_BK else SMALL_STEP_BK if r_pad <= 32 else SMALL_STEP_BK_64
    return min(r_pad, max(bk, min_fp32_dot_k())), 4 if r_pad <= 16 else 8


def small_step_args(k: Tensor, g: Tensor, h: Tensor, c: Tensor, e: Tensor, lr: float,
                    retraction: str, *, cayley_iters: int = 2, ns_steps: int = 6,
                    tol: float = float("inf"), r_pad: int | None = None,
                    c_minus_i: bool = False, scratch: Tensor | None = None):
    """Checks, then ``(grid, args, kwargs)`` of one small-step launch (see
    :func:`small_step_launch`); ``scratch`` (``(F, 2, R_PAD, R_PAD)`` fp32) is allocated when
    the products stream through it and none is given."""
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
    bk, num_warps = small_step_config(r_pad)
    if scratch is None:
        scratch = (c if bk >= r_pad else
                   torch.empty((num, 2, r_pad, r_pad), dtype=torch.float32, device=k.device))
    args = (k, g, h, c, e, scratch, float(lr), float(tol), r,
            k.stride(0), k.stride(-2), c.stride(0), c.stride(-2), store_n, int(iters),
            1.0 if c_minus_i else 0.0)
    kwargs = dict(RETRACTION=SMALL_STEP_TRITON[retraction], CORRECTION_ITERS=gram.CORRECTION_ITERS,
                  R_PAD=r_pad, BK=bk, num_warps=num_warps)
    return (num,), args, kwargs


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
    grid, args, kwargs = small_step_args(k, g, h, c, e, lr, retraction, cayley_iters=cayley_iters,
                                         ns_steps=ns_steps, tol=tol, r_pad=r_pad,
                                         c_minus_i=c_minus_i)
    small_step_kernel[grid](*args, **kwargs)


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


def pass2_launch(ptrs: Tensor, shape, p_dtype: torch.dtype, bc: Tensor, coef: Tensor,
                 hp: StiefelHyperparams, cfg: dict, num_factors: int, *,
                 aligned: bool | None = None, dot_precision: str | None = None,
                 row_orthonormal: bool | None = None):
    """``(grid, args, kwargs)`` of one pass-2 launch (:func:`pass2`, ``bench/kernel_report.py``)."""
    n, r, s_n, s_r = orientation(shape, row_orthonormal)
    wide = s_n == 1
    ld = s_r if wide else s_n
    if aligned is None:
        aligned = pointers_aligned(ptrs)
    args = (ptrs, bc[0], bc[1], coef, num_factors, n, r, ld, cfg["rows_per_chunk"], hp.eps,
            4 if hp.amsgrad else 3)
    kwargs = dict(P_DT=PARAM_DTYPES[p_dtype], S_DT=tl.float32, R_PAD=cfg["R_PAD"],
                  BLOCK_N=cfg["BLOCK_N"], DOT_PREC=dot_precision or DOT_PRECISION, WIDE=wide,
                  ALIGNED=aligned_elements((p_dtype, torch.float32), ld, aligned),
                  num_warps=cfg.get("pass2_num_warps", cfg["num_warps"]),
                  num_stages=cfg["num_stages"])
    return (num_factors, cfg["num_chunks"]), args, kwargs


def pass2(ptrs: Tensor, shape, p_dtype: torch.dtype, bc: Tensor, coef: Tensor,
          hp: StiefelHyperparams, cfg: dict, num_factors: int, *,
          aligned: bool | None = None, row_orthonormal: bool | None = None) -> None:
    """Launch pass 2 (``aligned``, ``row_orthonormal`` as in :func:`pass1`; an empty shard
    launches nothing)."""
    if cfg["num_chunks"] == 0:
        return
    grid, args, kwargs = pass2_launch(ptrs, shape, p_dtype, bc, coef, hp, cfg, num_factors,
                                      aligned=aligned, row_orthonormal=row_orthonormal)
    stiefel_pass2_kernel[grid](*args, **kwargs)
