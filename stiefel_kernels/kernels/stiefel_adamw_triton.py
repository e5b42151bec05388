"""Triton kernels of the Stiefel-AdamW fast path (docs/design.md, "The fast path").

Two streaming kernels per bucket of same-shape factors; every factor is addressed through an
int64 array of ``data_ptr()`` values (no stacking copies). In column form a factor is
``X`` (``n x r``) with element ``(i, j)`` at ``base + i * stride_n + j * stride_r``; a stored
wide factor (LoRA's ``A``, ``r x n``) has ``stride_n = 1, stride_r = n``, a tall one the
transpose, so both orientations are read in place.

* :func:`stiefel_pass1_kernel`: moments update (in place), ``D`` and per-chunk Gram partials
  ``K = X^T X``, ``G = X^T D``, ``H = D^T D`` (fp32, ``input_precision="ieee"``) into
  ``partials[f, chunk, 0:3, R_PAD, R_PAD]``; the caller reduces over chunks in a fixed order.
* :func:`stiefel_pass2_kernel`: recomputes ``D`` with the same ``@triton.jit`` helper
  (:func:`_direction`) and writes ``p = X + X (C - I) + D E`` (the identity is taken out of
  ``C`` so the product only carries the small update).

``DOT_PREC`` (``"ieee"`` by default: fp32 FMA) selects the precision of the ``G``, ``H`` and
pass-2 products; ``"tf32x3"`` (three TF32 tensor-core products, about fp32 accurate) is the
faster option to measure on a GPU. ``K`` is always ``"ieee"``.

Pointer arrays ``ptrs`` have shape ``(5, F)``: rows are param, grad, exp_avg, exp_avg_sq,
max_exp_avg_sq (the last row is unused without AMSGrad). Hyper-parameters and the per-factor
bias corrections are runtime values (no recompilation when ``lr`` or the step changes).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["stiefel_pass1_kernel", "stiefel_pass2_kernel"]


@triton.jit
def _direction(m, v, bc1, bc2_sqrt, eps):
    """``D = (m / bc1) / (sqrt(v) / bc2_sqrt + eps)`` with correctly rounded sqrt and division
    (the same expression, in the same order, as the reference backend)."""
    return tl.div_rn(tl.div_rn(m, bc1), tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)


@triton.jit
def _round_to(y, DT: tl.constexpr):
    """Cast fp32 ``y`` to ``DT``; for bfloat16 with explicit round-to-nearest-even, so the GPU and
    the interpreter (which truncates) agree."""
    if DT == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return y.to(DT)


@triton.jit
def _factor_pointer(ptrs, row, f, F, DT: tl.constexpr):
    return tl.load(ptrs + row * F + f).to(tl.pointer_type(DT))


@triton.jit
def stiefel_pass1_kernel(
    ptrs, bc1_ptr, bc2_ptr, partials_ptr,
    F, n, r, stride_n, stride_r, rows_per_chunk,
    beta1_c, beta2, beta2_c, eps,
    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr = "ieee",
):
    """Grid ``(F, num_chunks)``: program ``(f, c)`` owns rows ``[c * rows_per_chunk, ...)`` of
    factor ``f``. ``beta1_c = 1 - beta1``, ``beta2_c = 1 - beta2``. ``K`` is always accumulated
    with ``input_precision="ieee"``; ``DOT_PREC`` applies to ``G`` and ``H``."""
    f = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    p_ptr = _factor_pointer(ptrs, 0, f, F, P_DT)
    g_ptr = _factor_pointer(ptrs, 1, f, F, G_DT)
    m_ptr = _factor_pointer(ptrs, 2, f, F, S_DT)
    v_ptr = _factor_pointer(ptrs, 3, f, F, S_DT)
    vmax_ptr = _factor_pointer(ptrs, 4, f, F, S_DT)
    bc1 = tl.load(bc1_ptr + f)
    bc2_sqrt = tl.load(bc2_ptr + f)

    cols = tl.arange(0, R_PAD)
    col_mask = cols < r
    col_off = cols.to(tl.int64) * stride_r
    acc_k = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc_g = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc_h = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, n)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        mask = (rows < stop)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_n + col_off[None, :]
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m + beta1_c * (g - m)              # torch lerp_ (weight < 0.5 branch)
        v = v * beta2 + beta2_c * (g * g)      # mul_(beta2).addcmul_(g, g, value=1 - beta2)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0)
            vmax = tl.maximum(vmax, v)
            tl.store(vmax_ptr + offs, vmax, mask=mask)
            v = vmax
        d = tl.where(mask, _direction(m, v, bc1, bc2_sqrt, eps), 0.0)
        xt = tl.trans(x)
        acc_k += tl.dot(xt, x, input_precision="ieee")
        acc_g += tl.dot(xt, d, input_precision=DOT_PREC)
        acc_h += tl.dot(tl.trans(d), d, input_precision=DOT_PREC)

    rr = tl.arange(0, R_PAD)
    tile = rr[:, None] * R_PAD + rr[None, :]
    base = (f.to(tl.int64) * num_chunks + chunk) * (3 * R_PAD * R_PAD)
    tl.store(partials_ptr + base + tile, acc_k)
    tl.store(partials_ptr + base + R_PAD * R_PAD + tile, acc_g)
    tl.store(partials_ptr + base + 2 * R_PAD * R_PAD + tile, acc_h)


@triton.jit
def stiefel_pass2_kernel(
    ptrs, bc1_ptr, bc2_ptr, coef_ptr,
    F, n, r, stride_n, stride_r, rows_per_chunk, eps,
    P_DT: tl.constexpr, S_DT: tl.constexpr, AMSGRAD: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr = "ieee",
):
    """Grid ``(F, num_chunks)``. ``coef`` is ``(F, 2, R_PAD, R_PAD)`` fp32: ``C - I`` and ``E``,
    zero-padded. Writes ``p = X + X (C - I) + D E`` in place (row ``i`` of the new point depends
    only on row ``i`` of ``X`` and ``D``)."""
    f = tl.program_id(0)
    chunk = tl.program_id(1)
    p_ptr = _factor_pointer(ptrs, 0, f, F, P_DT)
    m_ptr = _factor_pointer(ptrs, 2, f, F, S_DT)
    if AMSGRAD:
        v_ptr = _factor_pointer(ptrs, 4, f, F, S_DT)
    else:
        v_ptr = _factor_pointer(ptrs, 3, f, F, S_DT)
    bc1 = tl.load(bc1_ptr + f)
    bc2_sqrt = tl.load(bc2_ptr + f)

    rr = tl.arange(0, R_PAD)
    tile = rr[:, None] * R_PAD + rr[None, :]
    cbase = f.to(tl.int64) * (2 * R_PAD * R_PAD)
    c_m = tl.load(coef_ptr + cbase + tile)
    e = tl.load(coef_ptr + cbase + R_PAD * R_PAD + tile)

    cols = tl.arange(0, R_PAD)
    col_mask = cols < r
    col_off = cols.to(tl.int64) * stride_r
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, n)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        mask = (rows < stop)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * stride_n + col_off[None, :]
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        d = tl.where(mask, _direction(m, v, bc1, bc2_sqrt, eps), 0.0)
        y = x + (tl.dot(x, c_m, input_precision=DOT_PREC) + tl.dot(d, e, input_precision=DOT_PREC))
        tl.store(p_ptr + offs, _round_to(y, P_DT), mask=mask)
