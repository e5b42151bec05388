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

Specializations (what is compiled separately): the dtypes, ``R_PAD`` / ``BLOCK_N``, ``DOT_PREC``,
the orientation ``WIDE`` (the unit stride is a literal, so it is known to the compiler) and
``ALIGNED``. Every integer argument is ``do_not_specialize`` (``r == 1`` or ``n % 16 == 0`` does not
make another kernel), and ``maximize`` / ``amsgrad`` are runtime values (a gradient sign that
multiplies exactly; AMSGrad's extra stream is a load and a store under a runtime mask), so the
whole set of kernels the launchers can ask for is small enough to compile ahead of time in CI
(``tests/test_kernel_report.py``).

``ALIGNED`` (0, or the number of elements in 16 bytes of the narrowest stream): set by the
launcher when every matrix of the bucket starts 16-byte aligned and the leading dimension ``ld``
is a multiple of it. The kernels then tell the compiler (``tl.multiple_of``), which emits 16-byte
``cp.async`` / ``ld.global.v4`` / ``st.global.v4``; an unaligned bucket takes the ``ALIGNED = 0``
kernel (4-byte accesses), which is correct for any addresses.
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
def _factor_pointer(ptrs, row, f, F, DT: tl.constexpr, ALIGNED: tl.constexpr):
    p = tl.load(ptrs + row * F + f).to(tl.pointer_type(DT))
    if ALIGNED > 0:
        p = tl.multiple_of(p, 16)  # bytes: the launcher checked every pointer of the bucket
    return p


@triton.jit
def _sizes(n, r, ld, rows_per_chunk, BLOCK_N: tl.constexpr, WIDE: tl.constexpr,
           ALIGNED: tl.constexpr):
    """The sizes as int64 values that carry what the launcher knows: ``rows_per_chunk`` is a
    multiple of ``BLOCK_N``; with ``ALIGNED``, ``ld`` (``r`` for a tall factor, ``n`` for a wide
    one) is a multiple of ``ALIGNED``. (A hint on a kernel argument itself is dropped, so the
    hints go on the casts.)"""
    rows_per_chunk = tl.multiple_of(rows_per_chunk.to(tl.int64), BLOCK_N)
    n = n.to(tl.int64)
    r = r.to(tl.int64)
    ld = ld.to(tl.int64)
    if ALIGNED > 0:
        ld = tl.multiple_of(ld, ALIGNED)
        if WIDE:
            n = tl.multiple_of(n, ALIGNED)  # ld == n
        else:
            r = tl.multiple_of(r, ALIGNED)  # ld == r
    return n, r, ld, rows_per_chunk


@triton.jit
def _offsets(rows, cols, ld, WIDE: tl.constexpr):
    """Element offsets of ``X[rows, cols]`` in column form: a tall stored factor is row-major
    ``(n, r)`` (``X[i, j]`` at ``i * ld + j``), a wide one ``(r, n)`` (at ``i + j * ld``)."""
    if WIDE:
        return rows[:, None] + cols[None, :] * ld
    else:
        return rows[:, None] * ld + cols[None, :]


@triton.jit(do_not_specialize=["F", "n", "r", "ld", "rows_per_chunk", "amsgrad"])
def stiefel_pass1_kernel(
    ptrs, bc1_ptr, bc2_ptr, partials_ptr,
    F, n, r, ld, rows_per_chunk,
    beta1_c, beta2, beta2_c, eps, grad_sign, amsgrad,
    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr = "ieee",
    WIDE: tl.constexpr = False, ALIGNED: tl.constexpr = 0,
):
    """Grid ``(F, num_chunks)``: program ``(f, c)`` owns rows ``[c * rows_per_chunk, ...)`` of
    factor ``f``. ``beta1_c = 1 - beta1``, ``beta2_c = 1 - beta2``; ``grad_sign`` is ``-1.0``
    for ``maximize`` (else ``1.0``); ``amsgrad`` (0 / 1) turns on the ``max_exp_avg_sq`` stream.
    ``K`` is always accumulated with ``input_precision="ieee"``; ``DOT_PREC`` applies to ``G``
    and ``H``."""
    f = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    p_ptr = _factor_pointer(ptrs, 0, f, F, P_DT, ALIGNED)
    g_ptr = _factor_pointer(ptrs, 1, f, F, G_DT, ALIGNED)
    m_ptr = _factor_pointer(ptrs, 2, f, F, S_DT, ALIGNED)
    v_ptr = _factor_pointer(ptrs, 3, f, F, S_DT, ALIGNED)
    vmax_ptr = _factor_pointer(ptrs, 4, f, F, S_DT, ALIGNED)
    bc1 = tl.load(bc1_ptr + f)
    bc2_sqrt = tl.load(bc2_ptr + f)
    n, r, ld, rows_per_chunk = _sizes(n, r, ld, rows_per_chunk, BLOCK_N, WIDE, ALIGNED)

    cols = tl.arange(0, R_PAD).to(tl.int64)
    col_mask = cols < r
    acc_k = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc_g = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    acc_h = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, n)
    max_stop = stop * amsgrad
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        mask = (rows < stop)[:, None] & col_mask[None, :]
        offs = _offsets(rows, cols, ld, WIDE)
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_sign
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m + beta1_c * (g - m)              # torch lerp_ (weight < 0.5 branch)
        v = v * beta2 + beta2_c * (g * g)      # mul_(beta2).addcmul_(g, g, value=1 - beta2)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        max_mask = (rows < max_stop)[:, None] & col_mask[None, :]  # empty without AMSGrad
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=max_mask, other=0.0), v)
        tl.store(vmax_ptr + offs, vmax, mask=max_mask)
        v = tl.where(max_mask, vmax, v)
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


@triton.jit(do_not_specialize=["F", "n", "r", "ld", "rows_per_chunk", "v_row"])
def stiefel_pass2_kernel(
    ptrs, bc1_ptr, bc2_ptr, coef_ptr,
    F, n, r, ld, rows_per_chunk, eps, v_row,
    P_DT: tl.constexpr, S_DT: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr = "ieee",
    WIDE: tl.constexpr = False, ALIGNED: tl.constexpr = 0,
):
    """Grid ``(F, num_chunks)``. ``coef`` is ``(F, 2, R_PAD, R_PAD)`` fp32: ``C - I`` and ``E``,
    zero-padded. ``v_row``: the pointer-array row of the second moment (3, or 4 with AMSGrad).
    Writes ``p = X + X (C - I) + D E`` in place (row ``i`` of the new point depends only on row
    ``i`` of ``X`` and ``D``)."""
    f = tl.program_id(0)
    chunk = tl.program_id(1)
    p_ptr = _factor_pointer(ptrs, 0, f, F, P_DT, ALIGNED)
    m_ptr = _factor_pointer(ptrs, 2, f, F, S_DT, ALIGNED)
    v_ptr = _factor_pointer(ptrs, v_row, f, F, S_DT, ALIGNED)
    bc1 = tl.load(bc1_ptr + f)
    bc2_sqrt = tl.load(bc2_ptr + f)
    n, r, ld, rows_per_chunk = _sizes(n, r, ld, rows_per_chunk, BLOCK_N, WIDE, ALIGNED)

    rr = tl.arange(0, R_PAD)
    tile = rr[:, None] * R_PAD + rr[None, :]
    cbase = f.to(tl.int64) * (2 * R_PAD * R_PAD)
    c_m = tl.load(coef_ptr + cbase + tile)
    e = tl.load(coef_ptr + cbase + R_PAD * R_PAD + tile)

    cols = tl.arange(0, R_PAD).to(tl.int64)
    col_mask = cols < r
    start = chunk * rows_per_chunk
    stop = tl.minimum(start + rows_per_chunk, n)
    for row0 in range(start, stop, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        mask = (rows < stop)[:, None] & col_mask[None, :]
        offs = _offsets(rows, cols, ld, WIDE)
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        d = tl.where(mask, _direction(m, v, bc1, bc2_sqrt, eps), 0.0)
        y = x + (tl.dot(x, c_m, input_precision=DOT_PREC) + tl.dot(d, e, input_precision=DOT_PREC))
        tl.store(p_ptr + offs, _round_to(y, P_DT), mask=mask)
