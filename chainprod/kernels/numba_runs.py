"""Runs of layers in one compiled loop: diagonal layers (forward and backprop), small square dense ones (backprop).

A diagonal layer is ``O(w)`` arithmetic: at width 8 about ten multiply-adds
and eight activations. Taken one layer at a time through the general step
(:mod:`.numba_layers`) it paid for two calls and half a dozen array views
per layer, about 90 ns, against 5-10 ns of arithmetic: a 2048-layer diagonal
chain ran 18x slower than a plain ``@njit`` loop written for it (measured).
These loops take a whole *run* (consecutive diagonal layers of one width and
one activation, each reading the previous one's output from the tape) with
flat indexing and no call or view per layer; the activation's branch is
tested once per run.

The same holds for backprop through a run of square dense layers whose
products stay below the loop/BLAS crossover (``w x w`` at a few rows: at
``w = 8`` the general step's calls and views cost more than its 200
multiply-adds; backprop at ``L = 4096`` ran 2.4x a plain ``@njit`` loop).
Such a run may mix activations: the branch is tested once per layer (a
chain cycling tanh, relu, sigmoid and softplus took each layer through the
general step before, 1.4-1.7x the mean of its uniform parts at ``w = 8``).

The arithmetic is the general step's, operation for operation (``a * x``
rounded, then ``+ b`` and the activation; ``delta = v * f'(y)``; the
parameter sums over the rows in order, the first row assigning), so a chain
gives the same bits whichever path a layer takes. Importing this module
imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_rules import activate, derivative

__all__ = ["diag_run_start", "diag_run_stop", "diag_forward_run", "diag_backprop_run", "dense_run_start",
           "dense_backprop_run", "DENSE", "DIAG"]

#: Kind codes of a dense and a diagonal layer (``chainprod.kernels.KIND_CODES``).
DENSE = 0
DIAG = 1


@njit(cache=True, error_model="numpy")
def diag_run_stop(kind, act, d_out, l0):
    """The end (exclusive) of the run of diagonal layers that starts at ``l0``: same activation and width."""
    L = kind.shape[0]
    l1 = l0 + 1
    while l1 < L and kind[l1] == DIAG and act[l1] == act[l0] and d_out[l1] == d_out[l0]:
        l1 += 1
    return l1


@njit(cache=True, error_model="numpy")
def diag_run_start(kind, act, d_out, l1, lo):
    """The first layer (not below ``lo``) of the run of diagonal layers that ends at ``l1`` (inclusive)."""
    l0 = l1
    while l0 - 1 >= lo and kind[l0 - 1] == DIAG and act[l0 - 1] == act[l1] and d_out[l0 - 1] == d_out[l1]:
        l0 -= 1
    return l0


@njit(cache=True, error_model="numpy")
def diag_forward_run(code, d, count, theta, po, Y, yo, N, nr):
    """Forward through ``count`` diagonal layers whose input is the tape block just below the first.

    Layer ``k`` of the run has parameters ``theta[po + 2dk : po + 2d(k+1)]``
    (``a`` then ``b``) and writes rows ``yo + N d k + n d + i`` (``n <
    nr``) of ``Y``; its input is the same rows of the block ``N d`` lower
    (the run never starts at layer 0). Returns the index within the run of
    the first layer with a non-finite output, or -1.
    """
    # one call of the inlined loop per code, each with its code a constant: the activation's
    # branch leaves the loop (a branch inside it cost a third of the run's time, measured)
    if code == 1:
        return _forward_loop(1, d, count, theta, po, Y, yo, N, nr)
    if code == 2:
        return _forward_loop(2, d, count, theta, po, Y, yo, N, nr)
    if code == 3:
        return _forward_loop(3, d, count, theta, po, Y, yo, N, nr)
    if code == 4:
        return _forward_loop(4, d, count, theta, po, Y, yo, N, nr)
    return _forward_loop(0, d, count, theta, po, Y, yo, N, nr)


@njit(cache=True, inline="always", error_model="numpy")
def _forward_loop(code, d, count, theta, po, Y, yo, N, nr):
    """The loop of :func:`diag_forward_run`."""
    # Unsigned offsets: numba wraps a signed index that could be negative (a test and a
    # select per access, which kept these loops from vectorising: measured 2.4x slower).
    zero = Y.dtype.type(0.0)
    u = np.uint64
    bad = -1
    for k in range(count):
        p = u(po + 2 * d * k)
        o = u(yo + N * d * k)
        src = u(yo + N * d * (k - 1))
        chk = 0
        for n in range(nr):
            for i in range(d):
                r = u(n * d + i)
                z = theta[p + u(i)] * Y[src + r]  # a * x rounded first, as the general step
                v = activate(code, z + theta[p + u(d + i)])
                Y[o + r] = v
                chk += 1 if v - v != zero else 0
        if bad < 0 and chk != 0:
            bad = k
    return bad


@njit(cache=True, error_model="numpy")
def diag_backprop_run(code, d, count, theta, po, Y, yo, N, nr, v, grads):
    """Backprop through ``count`` diagonal layers, the top one first; ``v`` holds the rows entering from above.

    Layout as in :func:`diag_forward_run` (the run's bottom layer is ``k =
    0``). For each layer, top down: ``delta = v * f'(y)``, ``da = sum_n
    delta * x``, ``db = sum_n delta`` (into ``grads`` at the layer's
    parameter offsets), ``v = delta * a`` in place, so ``v`` leaves as the
    rows entering the layer below the run. Returns the index within the run
    of the first layer *met* (the highest) whose delta is not finite, or -1.
    """
    # one compiled function per code, not the forward run's inlined branches: five inlined copies
    # of this loop in one function ran it 14 % slower (41-42 against 37 us, L = 4096, w = 8, measured)
    if code == 1:
        return _backprop_tanh(d, count, theta, po, Y, yo, N, nr, v, grads)
    if code == 2:
        return _backprop_relu(d, count, theta, po, Y, yo, N, nr, v, grads)
    if code == 3:
        return _backprop_sigmoid(d, count, theta, po, Y, yo, N, nr, v, grads)
    if code == 4:
        return _backprop_softplus(d, count, theta, po, Y, yo, N, nr, v, grads)
    return _backprop_identity(d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, error_model="numpy")
def _backprop_identity(d, count, theta, po, Y, yo, N, nr, v, grads):
    return _backprop_loop(0, d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, error_model="numpy")
def _backprop_tanh(d, count, theta, po, Y, yo, N, nr, v, grads):
    return _backprop_loop(1, d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, error_model="numpy")
def _backprop_relu(d, count, theta, po, Y, yo, N, nr, v, grads):
    return _backprop_loop(2, d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, error_model="numpy")
def _backprop_sigmoid(d, count, theta, po, Y, yo, N, nr, v, grads):
    return _backprop_loop(3, d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, error_model="numpy")
def _backprop_softplus(d, count, theta, po, Y, yo, N, nr, v, grads):
    return _backprop_loop(4, d, count, theta, po, Y, yo, N, nr, v, grads)


@njit(cache=True, inline="always", error_model="numpy")
def _backprop_loop(code, d, count, theta, po, Y, yo, N, nr, v, grads):
    """The loop of :func:`diag_backprop_run`."""
    zero = Y.dtype.type(0.0)
    u = np.uint64
    m = nr * d
    # The rows carried down the run live in a fresh array, copied back at the end: LLVM then knows
    # they overlap none of the other arrays and keeps them out of the per-layer alias checks
    # (L = 4096, w = 8, batch 1: 51 -> 43 us, measured; with the float check below 37, the plain loop 38).
    w = np.empty(m, Y.dtype)
    for r in range(m):
        w[r] = v[r]
    bad = -1
    for k in range(count - 1, -1, -1):
        p = u(po + 2 * d * k)
        o = u(yo + N * d * k)
        src = u(yo + N * d * (k - 1))
        # a float sum of delta - delta: 0 while every delta is finite, NaN from the first that is not
        # (an integer count of selects, as the forward loop keeps, cost 20 % here: measured)
        chk = zero
        for i in range(d):  # row 0 assigns the sums
            ui, uj = u(i), u(d + i)
            dl = w[i] * derivative(code, Y[o + ui])
            chk += dl - dl
            grads[p + ui] = dl * Y[src + ui]
            grads[p + uj] = dl
            w[i] = dl * theta[p + ui]
        for n in range(1, nr):
            for i in range(d):
                ui, uj, r = u(i), u(d + i), u(n * d + i)
                dl = w[r] * derivative(code, Y[o + r])
                chk += dl - dl
                grads[p + ui] += dl * Y[src + r]
                grads[p + uj] += dl
                w[r] = dl * theta[p + ui]
        if bad < 0 and chk != zero:
            bad = k
    for r in range(m):
        v[r] = w[r]
    return bad


@njit(cache=True, error_model="numpy")
def dense_run_start(kind, act, d_in, d_out, l1, lo):
    """The first layer (not below ``lo``) of the run of square dense layers (one width, any activations) to ``l1``."""
    d = d_out[l1]
    l0 = l1
    while l0 - 1 >= lo and kind[l0 - 1] == DENSE and d_out[l0 - 1] == d and d_in[l0 - 1] == d:
        l0 -= 1
    return l0


@njit(cache=True, error_model="numpy")
def dense_backprop_run(acts, d, count, theta, po, Y, yo, N, nr, v, delta, grads):
    """Backprop through ``count`` square dense layers (``d x d``, loops only), the top one first.

    Layer ``k`` of the run (``k = 0`` the bottom) has activation code
    ``acts[k]``, ``W`` then ``b`` at ``theta[po + (d d + d) k ...]``, its
    output rows at ``yo + N d k + n d`` and its input rows ``N d`` lower
    (the run never starts at layer 0). Per layer, top down: ``delta = v *
    f'(y)`` (into ``delta``; the activation's branch tested once per layer,
    so a run may mix activations), ``db = sum_n delta``, ``dW = sum_n
    delta^T x``, then ``v = delta W`` in place. Returns the index within
    the run of the first layer met whose delta is not finite, or -1.
    """
    zero = Y.dtype.type(0.0)
    u = np.uint64
    dd = d * d
    bad = -1
    for k in range(count - 1, -1, -1):
        p = u(po + (dd + d) * k)
        pb = p + u(dd)
        o = u(yo + N * d * k)
        src = u(yo + N * d * (k - 1))
        chk = _deltas(acts[k], v, Y, o, delta, nr * d)
        if bad < 0 and chk != 0:
            bad = k
        for i in range(d):  # db, row 0 assigning
            grads[pb + u(i)] = delta[i]
        for n in range(1, nr):
            for i in range(d):
                grads[pb + u(i)] += delta[n * d + i]
        for i in range(d):  # dW = delta^T x, row 0 assigning
            di = delta[i]
            row = p + u(i * d)
            for j in range(d):
                grads[row + u(j)] = di * Y[src + u(j)]
        for n in range(1, nr):
            xo = src + u(n * d)
            for i in range(d):
                di = delta[n * d + i]
                row = p + u(i * d)
                for j in range(d):
                    grads[row + u(j)] += di * Y[xo + u(j)]
        for n in range(nr):  # v = delta W, in place: delta holds all this layer needs
            vo = n * d
            for j in range(d):
                v[vo + j] = zero
            for i in range(d):
                di = delta[vo + i]
                row = p + u(i * d)
                for j in range(d):
                    v[vo + j] += di * theta[row + u(j)]
    return bad


@njit(cache=True, inline="always", error_model="numpy")
def _deltas(code, v, Y, o, delta, n):
    """``delta[r] = v[r] * f'(Y[o + r])`` for ``r < n``, one loop per activation; the count of non-finite deltas.

    :func:`.numba_rules.delta_rows` computes the same, called on a view: a call and a view per layer,
    which made backprop of the w = 8 tanh chain at L = 4096 18-26 % slower (0.315 against 0.250-0.266 ms).
    """
    if code == 1:
        return _delta_loop(1, v, Y, o, delta, n)
    if code == 2:
        return _delta_loop(2, v, Y, o, delta, n)
    if code == 3:
        return _delta_loop(3, v, Y, o, delta, n)
    if code == 4:
        return _delta_loop(4, v, Y, o, delta, n)
    return _delta_loop(0, v, Y, o, delta, n)


@njit(cache=True, inline="always", error_model="numpy")
def _delta_loop(code, v, Y, o, delta, n):
    zero = Y.dtype.type(0.0)
    chk = 0
    for r in range(n):
        dl = v[r] * derivative(code, Y[o + np.uint64(r)])
        delta[r] = dl
        chk += 1 if dl - dl != zero else 0
    return chk
