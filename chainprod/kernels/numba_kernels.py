"""Compiled kernels (numba): a whole chain in one call, a fraction of a microsecond per layer.

Same functions, signatures and meanings as the reference
:mod:`chainprod.kernels.numpy_kernels` (read the contracts there). Importing
this module imports numba; :func:`chainprod.kernels.get_kernels` does that
only when ``"numba"`` is chosen.

How the kernels are built:

- One loop over layers reads the packed tables (kind, activation code,
  widths, offsets) and dispatches per layer; a dense layer is a plain
  ``d_out x d_in`` loop straight on ``theta`` (no allocation, no BLAS call:
  at widths of 8-32 a call costs more than the arithmetic). Mixed chains
  therefore cost what uniform ones do.
- Non-finite detection costs one multiply-add per output: ``chk += y * 0``
  stays 0 for finite ``y`` and becomes NaN otherwise (exact, never a false
  alarm, no second pass over memory).
- One compiled loop per computation: :func:`backprop` and
  :func:`backprop_with_row` run the same loop (the latter also keeps the
  row leaving layer 0), so their gradients agree bit for bit.
- Parallelism only where the work is independent: the batch is cut into
  one chunk of samples per thread for the forward pass and backprop (each
  chunk runs through the whole chain; backprop sums per-chunk gradients at
  the end, so its last bits depend on the number of chunks), and
  :func:`param_grads` runs ``prange`` over layers. Small problems
  (``N * n_params < PARALLEL_MIN_WORK``) stay serial: waking threads costs
  microseconds. :func:`chunk_product` is one serial loop over samples.
- ``fastmath=False`` everywhere: results follow IEEE arithmetic in the
  written order (sums run over samples in order, so they may differ from
  BLAS in the last bits, not in meaning).
- ``cache=True``: compiled once per machine and dtype, then loaded from
  ``__pycache__``. :func:`precompile` compiles both dtypes up front.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from . import _check
from .numba_rules import activate, derivative

__all__ = ["forward", "backprop", "backprop_with_row", "chunk_product", "param_grads", "derivatives", "precompile",
           "PARALLEL_MIN_WORK"]

NAME = "numba"

#: Below this many multiply-adds (``N * n_params``) a call runs on one thread.
PARALLEL_MIN_WORK = 1 << 18


# Kernels work on per-layer slices (views) of the flat arrays: a view carries its
# length, which lets LLVM drop index arithmetic and vectorize the short inner
# loops (measured ~2x faster than offset arithmetic on the flat arrays).

# -- forward -------------------------------------------------------------------------------------
@njit(cache=True)
def _layer_forward(kind, code, din, dout, th, xin, y, n0, n1):
    """Rows ``n0..n1-1`` of one layer: ``xin`` (N, din) -> ``y`` (N, dout), flat; ``th`` its parameters.

    Returns ``chk``: 0 when every output written is finite, NaN otherwise."""
    chk = 0.0
    if kind == 0:
        b = th[dout * din:]
        for n in range(n0, n1):
            xr = xin[n * din:(n + 1) * din]
            yr = y[n * dout:(n + 1) * dout]
            for i in range(dout):
                w = th[i * din:(i + 1) * din]
                s = w[0] * xr[0]  # x @ W.T first, then + b: numpy's order
                for j in range(1, din):
                    s += w[j] * xr[j]
                yr[i] = activate(code, s + b[i])
                chk += yr[i] * 0.0
    else:
        a = th[:dout]
        b = th[dout:]
        for n in range(n0, n1):
            xr = xin[n * din:(n + 1) * din]
            yr = y[n * dout:(n + 1) * dout]
            for i in range(dout):
                yr[i] = activate(code, a[i] * xr[i] + b[i])
                chk += yr[i] * 0.0
    return chk


@njit(cache=True)
def _forward_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N, n0, n1):
    """Samples ``n0..n1-1`` through every layer; returns the first non-finite layer or -1."""
    bad = -1
    for l in range(kind.shape[0]):
        th = theta[p_off[l]:p_off[l + 1]]
        y = Y[N * y_off[l]:N * y_off[l + 1]]
        if l == 0:  # two calls: x (read-only) and Y have different array types
            chk = _layer_forward(kind[0], act[0], d_in[0], d_out[0], th, x, y, n0, n1)
        else:
            chk = _layer_forward(kind[l], act[l], d_in[l], d_out[l], th, Y[N * y_off[l - 1]:N * y_off[l]], y,
                                 n0, n1)
        if bad < 0 and chk != 0.0:  # NaN != 0
            bad = l
    return bad


@njit(cache=True, parallel=True)
def _forward_chunks(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N, nchunks):
    bads = np.empty(nchunks, np.int64)
    for c in prange(nchunks):
        bads[c] = _forward_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, N,
                                c * N // nchunks, (c + 1) * N // nchunks)
    bad = -1
    for c in range(nchunks):
        if bads[c] >= 0 and (bad < 0 or bads[c] < bad):
            bad = bads[c]
    return bad


# -- parameter VJPs ------------------------------------------------------------------------------
@njit(cache=True)
def _layer_vjp(kind, din, dout, delta, xin, nr, g):
    """One layer's gradient ``g`` (its theta-shaped slice) from ``delta`` (nr, dout) and
    its input ``xin`` (nr, din), both flat. The first sample assigns, the rest add: no
    zeroing pass over the gradient."""
    if kind == 0:
        gb = g[dout * din:]
        for i in range(dout):
            d = delta[i]
            gb[i] = d
            gw = g[i * din:(i + 1) * din]
            for j in range(din):
                gw[j] = d * xin[j]
        for r in range(1, nr):
            xr = xin[r * din:(r + 1) * din]
            for i in range(dout):
                d = delta[r * dout + i]
                gb[i] += d
                gw = g[i * din:(i + 1) * din]
                for j in range(din):
                    gw[j] += d * xr[j]
    else:
        ga = g[:dout]
        gb = g[dout:]
        for i in range(dout):
            ga[i] = delta[i] * xin[i]
            gb[i] = delta[i]
        for r in range(1, nr):
            for i in range(dout):
                d = delta[r * dout + i]
                ga[i] += d * xin[r * din + i]
                gb[i] += d


@njit(cache=True)
def _delta_rows(code, v, y, delta, n):
    """``delta = v * act'(y)`` over ``n`` entries; returns chk (0 if all finite, else NaN)."""
    chk = 0.0
    for k in range(n):
        delta[k] = v[k] * derivative(code, y[k])
        chk += delta[k] * 0.0
    return chk


# -- backprop ------------------------------------------------------------------------------------
@njit(cache=True)
def _backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, n0, n1, grads, row_in, width):
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
    for l in range(L - 1, -1, -1):
        din, dout = d_in[l], d_out[l]
        y = Y[N * y_off[l] + n0 * dout:N * y_off[l] + n1 * dout]
        chk = _delta_rows(act[l], v, y, delta, nr * dout)
        if bad < 0 and chk != 0.0:
            bad = l
        g = grads[p_off[l]:p_off[l + 1]]
        if l == 0:
            _layer_vjp(kind[0], din, dout, delta, x[n0 * din:n1 * din], nr, g)
            if row_in.shape[0] > 0:
                _next_row(kind[0], din, dout, theta[p_off[0]:p_off[1]], delta, row_in[n0 * din:n1 * din], nr)
            break
        _layer_vjp(kind[l], din, dout, delta, Y[N * y_off[l - 1] + n0 * din:N * y_off[l - 1] + n1 * din], nr, g)
        _next_row(kind[l], din, dout, theta[p_off[l]:p_off[l + 1]], delta, vn, nr)
        v, vn = vn, v
    return bad


@njit(cache=True)
def _next_row(kind, din, dout, th, delta, out, nr):
    """``out = v_{l-1}``, the row entering layer ``l`` from above, for ``nr`` samples.

    Dense: ``delta @ W`` (``W`` row-major in ``th``); diagonal: ``delta * a``.
    """
    if kind == 0:
        for r in range(nr):
            vr = out[r * din:(r + 1) * din]
            vr[:] = 0.0
            for i in range(dout):
                d = delta[r * dout + i]
                w = th[i * din:(i + 1) * din]
                for j in range(din):
                    vr[j] += d * w[j]
    else:
        a = th[:dout]
        for r in range(nr):
            for i in range(dout):
                out[r * dout + i] = delta[r * dout + i] * a[i]


@njit(cache=True)
def _backprop_serial(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width):
    return _backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, 0, N, grads, row_in,
                          width)


@njit(cache=True, parallel=True)
def _backprop_chunks(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N, grads, row_in, width,
                     nchunks):
    parts = np.empty((nchunks, grads.shape[0]), grads.dtype)
    bads = np.empty(nchunks, np.int64)
    for c in prange(nchunks):  # each chunk writes its own rows of row_in: no reduction needed for it
        bads[c] = _backprop_rows(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, cotangent, N,
                                 c * N // nchunks, (c + 1) * N // nchunks, parts[c], row_in, width)
    for k in prange(grads.shape[0]):
        s = parts[0, k]
        for c in range(1, nchunks):
            s += parts[c, k]
        grads[k] = s
    return bads.max()  # highest index = first met going backward


# -- the Jacobian product of the whole chain -----------------------------------------------------
@njit(cache=True)
def _product(kind, act, d_in, d_out, p_off, y_off, theta, Y, N, T, width):
    """``T[n] = A_{L-1} ... A_0`` for every sample ``n`` (``T`` flat, ``(N, d_out[L-1], d_in[0])``).

    Formed from the output side (``M <- M diag(act'(y_l)) W_l``, layer ``L-1`` first), so
    ``M`` is ``d_out[L-1]`` rows high throughout.
    """
    L = kind.shape[0]
    dtop = d_out[L - 1]
    M = np.empty(dtop * width, Y.dtype)
    Mn = np.empty(dtop * width, Y.dtype)
    s = np.empty(width, Y.dtype)
    d0 = d_in[0]
    for n in range(N):
        M[:dtop * dtop] = 0.0  # the identity of the chain's output width
        for i in range(dtop):
            M[i * dtop + i] = 1.0
        for l in range(L - 1, -1, -1):
            din, dout = d_in[l], d_out[l]
            y = Y[N * y_off[l] + n * dout:N * y_off[l] + (n + 1) * dout]
            th = theta[p_off[l]:p_off[l + 1]]
            for k in range(dout):
                s[k] = derivative(act[l], y[k])
            if kind[l] == 0:  # M (dtop x dout) @ diag(s) W (dout x din)
                Mn[:dtop * din] = 0.0
                for i in range(dtop):
                    mr = Mn[i * din:(i + 1) * din]
                    for k in range(dout):
                        c = M[i * dout + k] * s[k]
                        w = th[k * din:(k + 1) * din]
                        for j in range(din):
                            mr[j] += c * w[j]
            else:  # M @ diag(s * a)
                for i in range(dtop):
                    for k in range(dout):
                        Mn[i * dout + k] = M[i * dout + k] * (s[k] * th[k])
            M, Mn = Mn, M
        T[n * dtop * d0:(n + 1) * dtop * d0] = M[:dtop * d0]


# -- parameter gradients from given rows V -------------------------------------------------------
@njit(cache=True)
def _layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta):
    """Layer ``l``'s gradient from ``V_l`` (``delta``: scratch of N*d_out); True when not finite."""
    din, dout = d_in[l], d_out[l]
    _delta_rows(act[l], V[N * y_off[l]:N * y_off[l + 1]], Y[N * y_off[l]:N * y_off[l + 1]], delta, N * dout)
    g = grads[p_off[l]:p_off[l + 1]]
    if l == 0:
        _layer_vjp(kind[0], din, dout, delta, x, N, g)
    else:
        _layer_vjp(kind[l], din, dout, delta, Y[N * y_off[l - 1]:N * y_off[l]], N, g)
    chk = 0.0
    for k in range(g.shape[0]):  # just written: in cache
        chk += g[k] * 0.0
    return chk != 0.0


@njit(cache=True, parallel=True)
def _param_grads_par(kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, width, nchunks):
    """``prange`` over contiguous chunks of layers (one scratch buffer per chunk, not per layer)."""
    L = kind.shape[0]
    flags = np.zeros(L, np.uint8)
    for c in prange(nchunks):
        delta = np.empty(N * width, Y.dtype)
        for l in range(c * L // nchunks, (c + 1) * L // nchunks):
            if _layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta):
                flags[l] = 1
    for l in range(L):
        if flags[l]:
            return l
    return -1


@njit(cache=True)
def _param_grads_serial(kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, width):
    delta = np.empty(N * width, Y.dtype)
    bad = -1
    for l in range(kind.shape[0]):
        if _layer_grads_from_rows(l, kind, act, d_in, d_out, p_off, y_off, x, Y, V, N, grads, delta) and bad < 0:
            bad = l
    return bad


@njit(cache=True, parallel=True)
def _derivatives(act, d_out, y_off, Y, N, S):
    for l in prange(act.shape[0]):
        code = act[l]
        for k in range(N * y_off[l], N * y_off[l + 1]):
            S[k] = derivative(code, Y[k])


# -- public functions (contracts: chainprod.kernels.numpy_kernels) --------------------------------
def _chunks(pc, N):
    """Threads to cut the batch over, or 1 for serial."""
    if N < 2 or N * pc.n_params < PARALLEL_MIN_WORK:
        return 1
    return min(numba.get_num_threads(), N)


def forward(pc, x):
    """Compiled :func:`chainprod.kernels.numpy_kernels.forward`: ``(Y, bad)``."""
    pc = _check.packed(pc)
    x = _check.batch_input(pc, x)
    N = x.shape[0]
    Y = np.empty(pc.tape_size(N), pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, x.reshape(-1), Y, N)
    nchunks = _chunks(pc, N)
    bad = _forward_rows(*args, 0, N) if nchunks == 1 else _forward_chunks(*args, nchunks)
    return Y, int(bad)


def _backprop(pc, x, Y, cotangent, keep_row):
    pc, x, N, Y, cotangent = _check.backward_args(pc, x, Y, cotangent)
    grads = np.empty(pc.n_params, pc.dtype)
    row_in = np.empty(N * pc.width_in if keep_row else 0, pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, x.reshape(-1), Y,
            cotangent.reshape(-1), N, grads, row_in, pc.max_width)
    nchunks = _chunks(pc, N)
    bad = _backprop_serial(*args) if nchunks == 1 else _backprop_chunks(*args, nchunks)
    return grads, row_in.reshape(N, pc.width_in) if keep_row else None, int(bad)


def backprop(pc, x, Y, cotangent):
    """Compiled :func:`chainprod.kernels.numpy_kernels.backprop`: ``(grads, bad)``."""
    grads, _, bad = _backprop(pc, x, Y, cotangent, False)
    return grads, bad


def backprop_with_row(pc, x, Y, cotangent):
    """Compiled :func:`chainprod.kernels.numpy_kernels.backprop_with_row`: ``(grads, row_in, bad)``.

    The loop of :func:`backprop` (the same compiled function, the same batch
    chunks), so ``grads`` equal its gradients bit for bit.
    """
    return _backprop(pc, x, Y, cotangent, True)


def chunk_product(pc, Y, N):
    """Compiled :func:`chainprod.kernels.numpy_kernels.chunk_product`: ``T``, ``(N, d_out[L-1], d_in[0])``."""
    pc = _check.packed(pc)
    N = _check.batch_size(N)
    Y = _check.tape(pc, Y, N)
    T = np.empty(N * pc.width_out * pc.width_in, pc.dtype)
    _product(pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, Y, N, T, pc.max_width)
    return T.reshape(N, pc.width_out, pc.width_in)


def param_grads(pc, x, Y, V):
    """Compiled :func:`chainprod.kernels.numpy_kernels.param_grads` (``prange`` over layers)."""
    pc, x, N, Y, V = _check.backward_args(pc, x, Y, V, rows_are="V")
    grads = np.empty(pc.n_params, pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, x.reshape(-1), Y, V, N, grads, pc.max_width)
    nchunks = min(numba.get_num_threads(), pc.L)
    if nchunks > 1 and N * pc.n_params >= PARALLEL_MIN_WORK:
        bad = _param_grads_par(*args, nchunks)
    else:
        bad = _param_grads_serial(*args)
    return grads, int(bad)


def derivatives(pc, Y):
    """Compiled :func:`chainprod.kernels.numpy_kernels.derivatives`: ``S = act'(y)`` in ``Y``'s layout."""
    pc = _check.packed(pc)
    N = _check.batch_of_tape(pc, Y)
    Y = _check.tape(pc, Y, N)
    S = np.empty(Y.shape, pc.dtype)
    _derivatives(pc.act, pc.d_out, pc.y_off, Y, N, S)
    return S


def precompile(dtypes=(np.float32, np.float64)):
    """Compile (or load from the on-disk cache) every kernel for ``dtypes``, serial and parallel variants.

    Returns the seconds it took. The first call on a machine compiles; later
    processes load the cache in a fraction of that.
    """
    import time

    from ..layers import Chain, Dense, Diagonal
    from .pack import pack

    global PARALLEL_MIN_WORK
    t0 = time.perf_counter()
    saved = PARALLEL_MIN_WORK
    try:
        for dt in dtypes:
            dt = np.dtype(dt)
            chain = Chain([Dense(np.ones((2, 2), dt), np.zeros(2, dt), "tanh"),
                           Diagonal(np.ones(2, dt), np.zeros(2, dt), "relu")])
            pc = pack(chain)
            for threshold in (saved, 0):  # serial, then the parallel variants
                PARALLEL_MIN_WORK = threshold
                x = np.ones((2, 2), dt)
                Y, _ = forward(pc, x)
                backprop(pc, x, Y, np.ones((2, 2), dt))
                backprop_with_row(pc, x, Y, np.ones((2, 2), dt))
                param_grads(pc, x, Y, Y)
            derivatives(pc, Y)
            chunk_product(pc, Y, 2)
    finally:
        PARALLEL_MIN_WORK = saved
    return time.perf_counter() - t0
