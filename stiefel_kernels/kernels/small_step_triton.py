"""Triton kernel of the small step (docs/design.md, "The fast path", step 2) for the matmul-only
retractions: ``cayley_fp`` and ``newton_schulz``, each followed by the orthonormality correction.

One program per factor (grid ``(F,)``) reads that factor's reduced Gram matrices ``K, G, H``
(fp32 ``r x r``, zero-padded to ``R_PAD x R_PAD`` tiles) and writes its coefficients ``C, E``.
All products are fp32 ``tl.dot(..., input_precision="ieee")`` (no TF32). The math is that of
:func:`stiefel_kernels.gram.step_coefficients` (:func:`~stiefel_kernels.gram.retraction_coefficients`,
then :func:`~stiefel_kernels.gram.orthonormality_correction`), written blockwise on ``r x r`` tiles:

* ``cayley_fp``: with the unit-step generator ``M1 = [[Ms1, I], [-I, 0]]``,
  ``Ms1 = a1 - a1^T``, ``a1 = sym(G) - (K sym(G) - G) / 2`` and ``N = [[K, G], [G^T, H]]``,

      A1 = M1 N = [[P, Q], [-K, -G]],   P = Ms1 K + G^T,   Q = Ms1 G + H.

  The step is ``t = min(lr, 1/||W_1||_F)``, ``||W_1||_F^2 = -tr(A1^2)
  = -(<P, P^T> - 2 <Q, K^T> + <G, G^T>)``; ``A = M N = t A1``. From ``c0 = [I + t sym(G); -t I]``
  the fixed-point iteration ``c <- e1 + A (e1 + c) / 2`` reads, with ``u = [I + c_top; c_bot]``,
  ``c_top = I + t/2 (P u_top + Q u_bot)``, ``c_bot = -t/2 (K u_top + G u_bot)``.
* ``newton_schulz``: ``c0 = I + lr sym(G)``, ``e0 = -lr I``,
  ``m = c0^T K c0 - lr (c0^T G + G^T c0) + lr^2 H`` (:func:`~stiefel_kernels.gram.coefficient_gram`),
  ``s = newton_schulz_scale(m) I``, ``iters`` steps ``s <- s (3I - s^T m s) / 2``;
  ``C = c0 s``, ``E = -lr s``.
* correction, both: ``Y^T Y = C^T K C + C^T G E + (C^T G E)^T + E^T H E``; where
  ``||Y^T Y - I||_F > tol`` both ``C`` and ``E`` are multiplied by ``S ~ (Y^T Y)^(-1/2)``
  (coupled Newton–Schulz on ``Y^T Y / c``, ``c = min(max row sum, 1 + ||Y^T Y - I||_F)``,
  ``CORRECTION_ITERS`` steps).

Registers: ``tl.dot``'s fp32 (FMA) lowering holds whole operand rows/columns per thread, so
whole-width products spill on sm_90 from ``R_PAD = 32`` on. With ``BK < R_PAD`` every product
streams ``BK``-wide slices of its inner dimension through a per-program scratch buffer
(``(F, 2, R_PAD, R_PAD)`` fp32, L1/L2 resident, ordered by barriers). Compiled for sm_90 with
8 warps, ``BK = 16`` at ``R_PAD = 32`` and ``BK = 8`` at 64 there are no spills
(``bench/kernel_report.py``; ``BK = 16`` spilled ~300 bytes per thread at 64); at
``R_PAD = 128`` (16 warps) about 2 KB per thread, so the backend stops at rank 64.

Padding: every tile is zero outside ``[:r, :r]`` (masked loads, an identity restricted to ``r``),
and the products keep it so; the kernel stores ``store_n x store_n`` entries, so it can write
either compact ``(F, r, r)`` outputs (``store_n = r``) or the zero-padded ``(F, 2, R_PAD, R_PAD)``
coefficient buffer of pass 2 (``store_n = R_PAD``, ``minus_i = 1.0`` to store ``C - I``).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["small_step_kernel", "CAYLEY_FP", "NEWTON_SCHULZ"]

CAYLEY_FP = 0
NEWTON_SCHULZ = 1


@triton.jit
def _mm(a, b, scratch, R_PAD: tl.constexpr, BK: tl.constexpr):
    """``a @ b`` in fp32. For ``BK < R_PAD`` the operands go through this program's scratch
    (two ``R_PAD x R_PAD`` slots in global memory, L1/L2 resident) and the product is summed over
    ``BK``-wide slices of the inner dimension: the FMA lowering of ``tl.dot`` holds whole operand
    rows/columns per thread, which spills at ``R_PAD >= 64`` when the full width is used."""
    if BK >= R_PAD:
        return tl.dot(a, b, input_precision="ieee")
    else:
        rr = tl.arange(0, R_PAD)
        kk = tl.arange(0, BK)
        tile = rr[:, None] * R_PAD + rr[None, :]
        tl.debug_barrier()  # earlier readers of the slots are done
        tl.store(scratch + tile, a)
        tl.store(scratch + R_PAD * R_PAD + tile, b)
        tl.debug_barrier()  # the whole program sees both operands
        acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
        for k0 in range(0, R_PAD, BK):
            a_k = tl.load(scratch + rr[:, None] * R_PAD + (k0 + kk)[None, :])
            b_k = tl.load(scratch + R_PAD * R_PAD + (k0 + kk)[:, None] * R_PAD + rr[None, :])
            acc += tl.dot(a_k, b_k, input_precision="ieee")
        return acc


@triton.jit(do_not_specialize=["r", "stride_in_f", "stride_in_row", "stride_out_f",
                               "stride_out_row", "store_n", "iters"],
            do_not_specialize_on_alignment=["k_ptr", "g_ptr", "h_ptr", "c_ptr", "e_ptr"])
def small_step_kernel(
    k_ptr, g_ptr, h_ptr, c_ptr, e_ptr, scratch_ptr,
    lr, tol, r,
    stride_in_f, stride_in_row, stride_out_f, stride_out_row, store_n, iters, minus_i,
    RETRACTION: tl.constexpr, CORRECTION_ITERS: tl.constexpr,
    R_PAD: tl.constexpr, BK: tl.constexpr,
):
    """Grid ``(F,)``. Inputs ``K, G, H`` at ``ptr + f * stride_in_f + i * stride_in_row + j``,
    outputs likewise with the ``out`` strides. ``RETRACTION`` is :data:`CAYLEY_FP` (``iters`` =
    fixed-point iterations) or :data:`NEWTON_SCHULZ` (``iters`` = steps); ``iters`` and
    ``minus_i`` (1.0: store ``C - I``, else 0.0) are runtime values, and no integer argument is
    specialized, so one kernel per ``(RETRACTION, R_PAD)`` serves every call."""
    f = tl.program_id(0).to(tl.int64)
    rr = tl.arange(0, R_PAD)
    in_r = rr < r
    mask = in_r[:, None] & in_r[None, :]
    offs = rr[:, None] * stride_in_row + rr[None, :]
    base = f * stride_in_f
    eye = tl.where((rr[:, None] == rr[None, :]) & mask, 1.0, 0.0)
    scratch = scratch_ptr + f * (2 * R_PAD * R_PAD)  # unused when BK >= R_PAD

    k = tl.load(k_ptr + base + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
    sg = 0.5 * (g + tl.trans(g))

    h = tl.load(h_ptr + base + offs, mask=mask, other=0.0)
    if RETRACTION == 0:  # cayley_fp
        a1 = sg - 0.5 * (_mm(k, sg, scratch, R_PAD, BK) - g)
        ms1 = a1 - tl.trans(a1)
        p = _mm(ms1, k, scratch, R_PAD, BK) + tl.trans(g)
        q = _mm(ms1, g, scratch, R_PAD, BK) + h
        tr = tl.sum(tl.sum(p * tl.trans(p), axis=1), axis=0) \
            - 2.0 * tl.sum(tl.sum(q * tl.trans(k), axis=1), axis=0) \
            + tl.sum(tl.sum(g * tl.trans(g), axis=1), axis=0)
        w_norm = tl.sqrt(tl.maximum(-tr, 0.0))
        t = tl.minimum(lr, 1.0 / tl.maximum(w_norm, 1.1754943508222875e-38))
        c_out = eye + t * sg
        e_out = -t * eye
        half_t = 0.5 * t
        for _it in range(iters):
            u_top = eye + c_out
            pu = _mm(p, u_top, scratch, R_PAD, BK) + _mm(q, e_out, scratch, R_PAD, BK)
            ku = _mm(k, u_top, scratch, R_PAD, BK) + _mm(g, e_out, scratch, R_PAD, BK)
            c_out = eye + half_t * pu
            e_out = -half_t * ku
    else:  # newton_schulz
        c0 = eye + lr * sg
        c0t = tl.trans(c0)
        x = -lr * _mm(c0t, g, scratch, R_PAD, BK)
        m = _mm(_mm(c0t, k, scratch, R_PAD, BK), c0, scratch, R_PAD, BK) + x + tl.trans(x) \
            + (lr * lr) * h
        bound = tl.max(tl.sum(tl.abs(m), axis=1), axis=0)
        s = tl.sqrt(tl.minimum(2.5 / bound, 1.0)) * eye
        for _it in range(iters):
            sms = _mm(_mm(tl.trans(s), m, scratch, R_PAD, BK), s, scratch, R_PAD, BK)
            s = 0.5 * _mm(s, 3.0 * eye - sms, scratch, R_PAD, BK)
        c_out = _mm(c0, s, scratch, R_PAD, BK)
        e_out = -lr * s

    # orthonormality correction (gram.orthonormality_correction): Y^T Y = C^T K C + C^T G E
    # + (C^T G E)^T + E^T H E; where ||Y^T Y - I||_F > tol, (C, E) <- (C, E) S with
    # S ~ (Y^T Y)^(-1/2) by scaled coupled Newton-Schulz
    ct = tl.trans(c_out)
    ctge = _mm(_mm(ct, g, scratch, R_PAD, BK), e_out, scratch, R_PAD, BK)
    yty = _mm(_mm(ct, k, scratch, R_PAD, BK), c_out, scratch, R_PAD, BK) + ctge + tl.trans(ctge) \
        + _mm(_mm(tl.trans(e_out), h, scratch, R_PAD, BK), e_out, scratch, R_PAD, BK)
    yty = 0.5 * (yty + tl.trans(yty))
    dy = yty - eye
    err = tl.sqrt(tl.sum(tl.sum(dy * dy, axis=1), axis=0))
    if err > tol:
        scale = tl.minimum(tl.max(tl.sum(tl.abs(yty), axis=1), axis=0), 1.0 + err)
        y = yty / scale
        z = eye
        for _ in tl.static_range(CORRECTION_ITERS):
            tt = 0.5 * (3.0 * eye - _mm(z, y, scratch, R_PAD, BK))
            y = _mm(y, tt, scratch, R_PAD, BK)
            z = _mm(tt, z, scratch, R_PAD, BK)
        s = z * (1.0 / tl.sqrt(scale))
        c_out = _mm(c_out, s, scratch, R_PAD, BK)
        e_out = _mm(e_out, s, scratch, R_PAD, BK)

    c_out = c_out - minus_i * eye  # exact: minus_i is 0.0 or 1.0
    out_mask = (rr < store_n)[:, None] & (rr < store_n)[None, :]
    out_offs = f * stride_out_f + rr[:, None] * stride_out_row + rr[None, :]
    tl.store(c_ptr + out_offs, c_out, mask=out_mask)
    tl.store(e_ptr + out_offs, e_out, mask=out_mask)
