"""Triton backend: the two-pass Gram form with one fused kernel launch per pass and bucket.

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
import os
from collections import OrderedDict, defaultdict

import torch
from torch import Tensor

import triton
import triton.language as tl

from .. import _buckets, gram
from ..kernels.stiefel_adamw_triton import stiefel_pass1_kernel, stiefel_pass2_kernel
from ..kernels.small_step_triton import CAYLEY_FP, NEWTON_SCHULZ, small_step_kernel
from . import FunctionBackend, StiefelHyperparams, bias_corrections, state_dtype

name = "triton"

MAX_RANK = 128
_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
_GRAD_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}


#: precision of the G, H and pass-2 products (K is always "ieee"); "tf32x3" is the faster option
DOT_PRECISION = os.environ.get("STIEFEL_KERNELS_TRITON_DOT", "ieee")
if DOT_PRECISION not in ("ieee", "tf32x3"):
    raise ImportError(f"STIEFEL_KERNELS_TRITON_DOT must be 'ieee' or 'tf32x3', got {DOT_PRECISION!r}")


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


# ----------------------------------------------------------------------------- launch config
def _next_pow2(x: int) -> int:
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
    r_pad = max(16, _next_pow2(r))
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
def _orientation(shape) -> tuple[int, int, int, int]:
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
    n, r, s_n, s_r = _orientation(shape)
    r_pad, chunks = cfg["R_PAD"], cfg["num_chunks"]
    if partials is None:
        partials = torch.empty((num_factors, chunks, 3, r_pad, r_pad), dtype=torch.float32,
                               device=ptrs.device)
    stiefel_pass1_kernel[(num_factors, chunks)](
        ptrs, bc[0], bc[1], partials,
        num_factors, n, r, s_n, s_r, cfg["rows_per_chunk"],
        1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.eps,
        P_DT=_PARAM_DTYPES[p_dtype], G_DT=_GRAD_DTYPES[g_dtype], S_DT=tl.float32,
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
        r_pad = max(16, _next_pow2(r))
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
    n, r, s_n, s_r = _orientation(shape)
    stiefel_pass2_kernel[(num_factors, cfg["num_chunks"])](
        ptrs, bc[0], bc[1], coef,
        num_factors, n, r, s_n, s_r, cfg["rows_per_chunk"], hp.eps,
        P_DT=_PARAM_DTYPES[p_dtype], S_DT=tl.float32, AMSGRAD=hp.amsgrad,
        R_PAD=cfg["R_PAD"], BLOCK_N=cfg["BLOCK_N"], DOT_PREC=DOT_PRECISION,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


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
