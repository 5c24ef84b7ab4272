"""The compiled whole-chain loops behind :mod:`chainprod.kernels.numba_kernels`.

Each loop runs every layer of a packed chain (:mod:`chainprod.kernels.pack`)
in one call: the forward pass, backprop, the Jacobian product of a chunk and
the parameter VJPs from given rows, serially over a range of batch rows or
with ``prange`` over batch chunks. The checks, the loop-or-BLAS policy and
the thread counts are :mod:`chainprod.kernels.numba_kernels`' (the public
kernel set); this module only computes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_layers import layer_forward, layer_vjp, next_row, product_step
from .numba_rules import delta_rows, deriv_rows
from .numba_runs import (
    DENSE,
    DIAG,
    dense_backprop_run,
    dense_run_start,
    diag_backprop_run,
    diag_forward_run,
    diag_run_start,
    diag_run_stop,
)

__all__ = ["forward_rows", "forward_chunks", "backprop_rows", "backprop_serial", "backprop_serial_counted",
           "count_nonfinite", "backprop_chunks", "product", "layer_grads_from_rows", "param_grads_par",
           "param_grads_serial", "derivatives"]

# Kernels work on per-layer slices (views) of the flat arrays: a view carries its
# length, which lets LLVM drop index arithmetic and vectorize the short inner
# loops (measured ~2x faster than offset arithmetic on the flat arrays).

# -- forward -------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def forward_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N, n0, n1, cross):
    """Samples ``n0..n1-1`` through every layer; returns the first non-finite layer or -1."""
    bad = -1
    nr = n1 - n0
    L = kind.shape[0]
    l = 0
    while l < L:
        din, dout = d_in[l], d_out[l]
        if l > 0 and kind[l] == DIAG:  # a run of diagonal layers: one loop, no call per layer
            l1 = diag_run_stop(kind, act, d_out, l)
            k = diag_forward_run(act[l], dout, l1 - l, theta, p_off[l], Y, N * y_off[l] + n0 * dout, N, nr)
            if bad < 0 and k >= 0:
                bad = l + k
            l = l1
            continue
        th = theta[p_off[l]:p_off[l + 1]]
        y = Y[N * y_off[l] + n0 * dout:N * y_off[l] + n1 * dout]
        if l == 0:  # two calls: x (read-only) and Y have different array types
            chk = layer_forward(kind[0], act[0], din, dout, th, x[n0 * din:n1 * din], y, nr, cross)
        else:
            chk = layer_forward(kind[l], act[l], din, dout, th, Y[N * y_off[l - 1] + n0 * din:N * y_off[l - 1]
                                                                  + n1 * din], y, nr, cross)
        if bad < 0 and chk != 0:
            bad = l
        l += 1
    return bad


@njit(cache=True, parallel=True, error_model="numpy")
def forward_chunks(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N, cross, nchunks):
    bads = np.empty(nchunks, np.int64)
    for c in prange(nchunks):
        bads[c] = forward_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N,
                                c * N // nchunks, (c + 1) * N // nchunks, cross)
    bad = -1
    for c in range(nchunks):
        if bads[c] >= 0 and (bad < 0 or bads[c] < bad):
            bad = bads[c]
    return bad


# -- backprop ------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, n0, n1, grads, row_in, width,
                   cross):
    """Backprop of samples ``n0..n1-1`` into ``grads``; returns the first bad layer (backward order).

    The one backprop loop of both :func:`backprop` and :func:`backprop_with_row`. When
    ``row_in`` is not empty (it is then ``(N, d_in[0])``, flat) its rows ``n0..n1-1``
    receive ``v_{-1} = dloss/dx``: the step the loop would take after layer 0, with the
    same helper as every other step, so the arithmetic of the gradients does not depend
    on whether the row is kept.
    """
    L = kind.shape[0]
    nr = n1 - n0
    v = np.empty(nr * width, Y.dtype)  # v_l, then v_{l-1} in `vn` (ping-pong)
    vn = np.empty(nr * width, Y.dtype)
    delta = np.empty(nr * width, Y.dtype)
    dL = d_out[L - 1]
    v[:nr * dL] = cotangent[n0 * dL:n1 * dL]
    bad = -1
    l = L - 1
    while l >= 0:
        din, dout = d_in[l], d_out[l]
        if l > 0 and kind[l] == DIAG:  # a run of diagonal layers (above layer 0): one loop, v updated in place
            l0 = diag_run_start(kind, act, d_out, l, 1)
            k = diag_backprop_run(act[l], dout, l - l0 + 1, theta, p_off[l0], Y, N * y_off[l0] + n0 * dout, N, nr,
                                  v, grads)
            if bad < 0 and k >= 0:
                bad = l0 + k
            l = l0 - 1
            continue
        if l > 0 and kind[l] == DENSE and din == dout and nr * din * dout < cross:
            # a run of square dense layers on the loops: one call, delta and v reused in place
            l0 = dense_run_start(kind, act, d_in, d_out, l, 1)  # one width: every product in the run is this small
            k = dense_backprop_run(act[l0:l + 1], dout, l - l0 + 1, theta, p_off[l0], Y, N * y_off[l0] + n0 * dout,
                                   N, nr, v, delta, grads)
            if bad < 0 and k >= 0:
                bad = l0 + k
            l = l0 - 1
            continue
        y = Y[N * y_off[l] + n0 * dout:N * y_off[l] + n1 * dout]
        chk = delta_rows(act[l], v, y, delta, nr * dout)
        if bad < 0 and chk != 0:
            bad = l
        g = grads[p_off[l]:p_off[l + 1]]
        th = theta[p_off[l]:p_off[l + 1]]
        if l == 0:
            layer_vjp(kind[0], din, dout, delta, x[n0 * din:n1 * din], nr, g, cross)
            if row_in.shape[0] > 0:
                next_row(kind[0], din, dout, th, delta, row_in[n0 * din:n1 * din], nr, cross)
            break
        layer_vjp(kind[l], din, dout, delta, Y[N * y_off[l - 1] + n0 * din:N * y_off[l - 1] + n1 * din], nr, g,
                  cross)
        next_row(kind[l], din, dout, th, delta, vn, nr, cross)
        v, vn = vn, v
        l -= 1
    return bad


@njit(cache=True, error_model="numpy")
def backprop_serial(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width, cross):
    return backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, 0, N, grads, row_in,
                          width, cross)


@njit(cache=True, error_model="numpy")
def count_nonfinite(a):
    """How many entries of the 1-D ``a`` are NaN or infinite (one pass, no temporary array)."""
    zero = a.dtype.type(0.0)
    n = 0
    for k in range(a.shape[0]):  # x - x is 0 while x is finite, NaN after; an integer sum of selects vectorises
        n += 1 if a[k] - a[k] != zero else 0
    return n


@njit(cache=True, error_model="numpy")
def backprop_serial_counted(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width,
                            cross):
    """:func:`backprop_serial`, and how many of ``grads`` are not finite (0 where ``bad >= 0`` stops it).

    For :mod:`chainprod.quick`: one call where a call and a check of the
    gradients apart took 1 us more on a 256-layer chain (measured).
    """
    bad = backprop_serial(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width, cross)
    return bad, (count_nonfinite(grads) if bad < 0 else 0)


@njit(cache=True, parallel=True, error_model="numpy")
def backprop_chunks(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width, cross,
                     parts):
    """One chunk of the batch per thread: chunk 0 into ``grads``, chunk ``c`` into ``parts[c-1]``, then the sum.

    ``parts`` comes from the caller: memory first touched by two threads at once inside the region
    was measured to cost more than the threads save on wide layers (26 ms against 14 ms at width 1024).
    """
    nchunks = parts.shape[0] + 1
    bads = np.empty(nchunks, np.int64)
    for c in prange(nchunks):  # each chunk writes its own rows of row_in: no reduction needed for it
        g = grads if c == 0 else parts[c - 1]
        bads[c] = backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N,
                                 c * N // nchunks, (c + 1) * N // nchunks, g, row_in, width, cross)
    # the chunks' sums added serially, one vector loop per chunk (the same order per entry as before): over
    # numba's two threads the same additions took 100-127 us against 42 (526 336 float32 gradients, alone;
    # in a whole backprop of that chain, width 256, batch 128, the two differ by less than the VM's noise)
    for c in range(nchunks - 1):
        _add_into(grads, parts[c])
    return bads.max()  # highest index = first met going backward


@njit(cache=True, error_model="numpy", boundscheck=False)
def _add_into(a, b):
    """``a += b`` (1-D, same length) in one vector loop."""
    for k in range(a.shape[0]):
        a[k] += b[k]


# -- the Jacobian product of the whole chain -----------------------------------------------------
@njit(cache=True, error_model="numpy")
def product(kind, act, d_in, d_out, p_off, y_off, theta, Y, N, T, width, cross):
    """``T[n] = A_{L-1} ... A_0`` for every sample ``n`` (``T`` flat, ``(N, d_out[L-1], d_in[0])``).

    Formed from the output side (``M <- M diag(act'(y_l)) W_l``, layer ``L-1`` first), so
    ``M`` is ``d_out[L-1]`` rows high throughout.
    """
    L = kind.shape[0]
    dtop = d_out[L - 1]
    M = np.empty(dtop * width, Y.dtype)
    Mn = np.empty(dtop * width, Y.dtype)
    scratch = np.empty(dtop * width, Y.dtype)
    s = np.empty(width, Y.dtype)
    d0 = d_in[0]
    for n in range(N):
        M[:dtop * dtop] = 0.0  # the identity of the chain's output width
        for i in range(dtop):
            M[i * dtop + i] = 1.0
        for l in range(L - 1, -1, -1):
            din, dout = d_in[l], d_out[l]
            y = Y[N * y_off[l] + n * dout:N * y_off[l] + (n + 1) * dout]
            product_step(kind[l], act[l], din, dout, theta[p_off[l]:p_off[l + 1]], y, M, Mn, s, scratch, dtop,
                         cross)
            M, Mn = Mn, M
        T[n * dtop * d0:(n + 1) * dtop * d0] = M[:dtop * d0]


# -- parameter gradients from given rows V -------------------------------------------------------
@njit(cache=True, error_model="numpy")
def layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta, cross):
    """Layer ``l``'s gradient from ``V_l`` (``delta``: scratch of N*d_out); True when not finite."""
    din, dout = d_in[l], d_out[l]
    delta_rows(act[l], V[N * y_off[l]:N * y_off[l + 1]], Y[N * y_off[l]:N * y_off[l + 1]], delta, N * dout)
    g = grads[p_off[l]:p_off[l + 1]]
    if l == 0:
        layer_vjp(kind[0], din, dout, delta, x, N, g, cross)
    else:
        layer_vjp(kind[l], din, dout, delta, Y[N * y_off[l - 1]:N * y_off[l]], N, g, cross)
    zero = g.dtype.type(0.0)
    chk = 0
    for k in range(g.shape[0]):  # just written: in cache
        chk += 1 if g[k] - g[k] != zero else 0
    return chk != 0


@njit(cache=True, parallel=True, error_model="numpy")
def param_grads_par(kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, width, cross, nchunks):
    """``prange`` over contiguous chunks of layers (one scratch buffer per chunk, not per layer)."""
    L = kind.shape[0]
    flags = np.zeros(L, np.uint8)
    for c in prange(nchunks):
        delta = np.empty(N * width, Y.dtype)
        for l in range(c * L // nchunks, (c + 1) * L // nchunks):
            if layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta, cross):
                flags[l] = 1
    for l in range(L):
        if flags[l]:
            return l
    return -1


@njit(cache=True, error_model="numpy")
def param_grads_serial(kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, width, cross):
    delta = np.empty(N * width, Y.dtype)
    bad = -1
    for l in range(kind.shape[0]):
        if layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta, cross) \
                and bad < 0:
            bad = l
    return bad


@njit(cache=True, parallel=True, error_model="numpy")
def derivatives(act, d_out, y_off, Y, N, S):
    for l in prange(act.shape[0]):
        a, b = N * y_off[l], N * y_off[l + 1]
        deriv_rows(act[l], Y[a:b], S[a:b], b - a)
