"""The compiled scan kernel: form every block, run every stage of a flat plan, copy the rows out.

What the kernel computes, and the plan it runs, are described in
:mod:`chainprod.kernels.scan` (which imports this module only when the
compiled kernels are first used; importing it imports numba).

How it forms products: a dense op ``left (m x k) @ right (k x n)``, one per
batch element, is a plain loop below the crossover and one BLAS ``gemm``
from it on (:mod:`.numba_blas`, :mod:`.crossover`). Thin ops (``m = 1``,
a row times a Jacobian) use the crossover of row products, square ops
(``m x k @ k x n`` blocks) their own: a BLAS call on an 8 x 8 block already
beats the loop (the loop cannot keep a block's row in registers), so the
square op is never slower than ``np.matmul`` on the same stacked blocks. The
head block ``cotangent . diag(act') W`` is one product over the whole
batch. Every activation derivative is taken one layer at a time by a loop
specialised to that activation (:func:`~.numba_rules.deriv_rows`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .crossover import best_seconds_per_rep
from .numba_blas import NOTRANS, gemm
from .numba_rules import deriv_rows

__all__ = ["block_op_seconds", "scan_kernel"]


@njit(cache=True, error_model="numpy")
def _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, off, buf, s, cross_rows):
    """Position ``p``'s block into ``buf[off:]``: the head (p = 0) or layer ``L-1-p``'s Jacobian.

    ``s`` is scratch of at least ``N * d_out[L-1-p]``.
    """
    j = L - 1 - p
    r = d_out[j]
    c = d_in[j]
    yb = N * y_off[j]
    t0 = p_off[j]
    deriv_rows(act[j], Y[yb:yb + N * r], s, N * r)
    if p == 0:  # thin head: cotangent . diag(act') W, or cotangent * act' * a
        for b in range(N):
            for i in range(r):
                s[b * r + i] = cotangent[b, i] * s[b * r + i]
        if kind[j] == 0:
            if N * r * c >= cross_rows:  # all samples at once: (N x r) @ W (r x c)
                gemm(NOTRANS, NOTRANS, N, c, r, s, 0, r, theta, t0, c, 0.0, buf, off, c)
                return
            for b in range(N):
                ob = off + b * c
                for cc in range(c):
                    buf[ob + cc] = 0.0
                for i in range(r):
                    g = s[b * r + i]
                    row = t0 + i * c
                    for cc in range(c):
                        buf[ob + cc] += g * theta[row + cc]
        else:
            for b in range(N):
                for i in range(r):
                    buf[off + b * r + i] = s[b * r + i] * theta[t0 + i]
    elif kind[j] == 0:
        for b in range(N):
            for i in range(r):
                si = s[b * r + i]
                ob = off + (b * r + i) * c
                row = t0 + i * c
                for cc in range(c):
                    buf[ob + cc] = si * theta[row + cc]
    else:
        for b in range(N):
            for i in range(r):
                buf[off + b * r + i] = s[b * r + i] * theta[t0 + i]


@njit(cache=True, error_model="numpy")
def _combine(buf, code, lo, ro, m, k, n, N, dst, do, cross_rows, cross_blocks):
    """``dst[do:] <- left (x) right`` for one op, every batch element (kinds by ``code``)."""
    if code == 0:  # dense (m x k) @ dense (k x n)
        if (k * n >= cross_rows) if m == 1 else (m * k * n >= cross_blocks):
            for b in range(N):
                gemm(NOTRANS, NOTRANS, m, n, k, buf, lo + b * m * k, k, buf, ro + b * k * n, n, 0.0, dst,
                     do + b * m * n, n)
            return
        for b in range(N):
            lv = buf[lo + b * m * k:lo + (b + 1) * m * k]
            rv = buf[ro + b * k * n:ro + (b + 1) * k * n]
            ov = dst[do + b * m * n:do + (b + 1) * m * n]
            for i in range(m):
                orow = ov[i * n:(i + 1) * n]
                x = lv[i * k]
                r0 = rv[:n]
                for jj in range(n):
                    orow[jj] = x * r0[jj]
                for kk in range(1, k):
                    x = lv[i * k + kk]
                    rr = rv[kk * n:(kk + 1) * n]
                    for jj in range(n):  # contiguous axpy on views: vectorises
                        orow[jj] += x * rr[jj]
    elif code == 1:  # dense @ diag: scale the columns
        for b in range(N):
            lb = lo + b * m * n
            rb = ro + b * n
            ob = do + b * m * n
            for i in range(m):
                for jj in range(n):
                    dst[ob + i * n + jj] = buf[lb + i * n + jj] * buf[rb + jj]
    elif code == 2:  # diag @ dense: scale the rows
        for b in range(N):
            lb = lo + b * m
            rb = ro + b * m * n
            ob = do + b * m * n
            for i in range(m):
                x = buf[lb + i]
                for jj in range(n):
                    dst[ob + i * n + jj] = x * buf[rb + i * n + jj]
    else:  # diag * diag: elementwise, O(w)
        for b in range(N):
            lb = lo + b * m
            rb = ro + b * m
            ob = do + b * m
            for i in range(m):
                dst[ob + i] = buf[lb + i] * buf[rb + i]


@njit(cache=True, error_model="numpy")
def _run_lanes(a, b, N, buf, tmp, lane_ptr, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp,
               cross_rows, cross_blocks):
    """Lanes ``a .. b-1`` in order (their ops are contiguous in the plan)."""
    for o in range(lane_ptr[a], lane_ptr[b]):
        code = op_code[o]
        m = op_m[o]
        n = op_n[o]
        if op_tmp[o] == 0:
            _combine(buf, code, op_left[o], op_right[o], m, op_k[o], n, N, buf, op_out[o], cross_rows, cross_blocks)
        else:  # the output overlaps an operand: form it aside, then copy
            _combine(buf, code, op_left[o], op_right[o], m, op_k[o], n, N, tmp, 0, cross_rows, cross_blocks)
            size = N * m if code == 3 else N * m * n
            oo = op_out[o]
            for e in range(size):
                buf[oo + e] = tmp[e]


@njit(cache=True, parallel=True, error_model="numpy")
def scan_kernel(theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent,
                slot_off, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp,
                lane_ptr, lane_cum, lane_mid, stage_ptr, stage_parallel, out_off, buf_size, max_tmp,
                threads, form_parallel, cross_rows, cross_blocks, V):
    """Form the blocks, run every stage, write the rows into ``V``; returns the first bad prefix or -1.

    ``cross_rows`` / ``cross_blocks``: multiply-adds from which a thin / a
    square dense product goes to BLAS. With ``threads > 1`` the caller limits
    BLAS to one thread (the lanes of a stage call it concurrently).
    """
    L = kind.shape[0]
    M = L - 1
    N = cotangent.shape[0]
    buf = np.empty(buf_size, dtype=V.dtype)
    wmax = max(d_out.max(), d_in.max())
    T = max(threads, 1)
    if form_parallel and threads > 1:
        G = min(T, M)
        for g in prange(G):  # contiguous groups of positions, one derivative scratch each
            s = np.empty(N * wmax, dtype=V.dtype)
            for p in range(g * M // G, (g + 1) * M // G):
                _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, slot_off[p], buf,
                               s, cross_rows)
    else:
        s = np.empty(N * wmax, dtype=V.dtype)
        for p in range(M):
            _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, slot_off[p], buf, s,
                           cross_rows)

    tmps = np.empty((T, max(max_tmp, 1)), dtype=V.dtype)  # one temporary per group of lanes
    bounds = np.empty(T + 1, dtype=np.int64)
    n_stages = stage_ptr.shape[0] - 1
    for st in range(n_stages):
        a = stage_ptr[st]
        b = stage_ptr[st + 1]
        if stage_parallel[st] == 1 and threads > 1:
            # Contiguous groups of lanes with about equal flops, one per thread
            # (a lane goes to the group its middle falls in).
            G = min(T, b - a)
            base = lane_cum[a]
            F = lane_cum[b] - base
            bounds[0] = a
            bounds[G] = b
            for g in range(1, G):
                bounds[g] = a + np.searchsorted(lane_mid[a:b], base + F * g / G)
            for g in prange(G):
                _run_lanes(bounds[g], bounds[g + 1], N, buf, tmps[g], lane_ptr, op_left, op_right, op_out,
                           op_code, op_m, op_k, op_n, op_tmp, cross_rows, cross_blocks)
        else:
            _run_lanes(a, b, N, buf, tmps[0], lane_ptr, op_left, op_right, op_out, op_code, op_m, op_k, op_n,
                       op_tmp, cross_rows, cross_blocks)

    # Rows out: prefix k is v_{L-2-k}, a thin (N, 1, d) block.
    bad = -1
    for k in range(M):
        l = L - 2 - k
        d = d_out[l]
        src = out_off[k]
        dst = N * y_off[l]
        ok = True
        for e in range(N * d):
            x = buf[src + e]
            V[dst + e] = x
            if not np.isfinite(x):
                ok = False
        if not ok and bad < 0:
            bad = k
    return bad


# -- timing the two ways (for the calibration of the crossover) ------------------------------------
@njit(cache=True, error_model="numpy")
def _block_ops(buf, w, N, cross, reps):
    n = N * w * w
    for _ in range(reps):
        _combine(buf, 0, 0, n, w, w, w, N, buf, 2 * n, cross, cross)


def block_op_seconds(w, dtype, cross, batch=64, repeats=5, min_seconds=2e-4):
    """Best seconds of one square op ``(w x w) @ (w x w)`` per batch element, by loop or BLAS (``cross``).

    Timed as the kernel runs it (``batch`` stacked blocks per op), inside one
    compiled loop of enough repeats to last ``min_seconds``; the best of
    ``repeats`` such loops.
    """
    buf = (np.random.default_rng(0).standard_normal(3 * batch * w * w) / np.sqrt(w)).astype(dtype)
    return best_seconds_per_rep(lambda reps: _block_ops(buf, w, batch, cross, reps), repeats, min_seconds) / batch
