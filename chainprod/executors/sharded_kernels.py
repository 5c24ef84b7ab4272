"""Compiled loops a resident shard needs beyond the whole-chain kernels.

A shard of a sharded model (:mod:`chainprod.shard`) is a contiguous chunk of
layers. Its backward pass starts from the row ``u = dloss/dy`` entering the
chunk from above and must hand the row *leaving* the chunk's bottom,
``dloss/d(chunk input)``, to the shard below. The whole-chain kernels
(:mod:`chainprod.kernels`) return parameter gradients only, so this module
adds, in the same flat layout (:mod:`chainprod.kernels.pack`):

``backprop_with_row(pc, x, Y, seed) -> (grads, row_in, bad)``
    the compiled backprop loop of :func:`chainprod.kernels.numba_kernels.backprop`
    (same per-layer helpers, same order of operations), which also keeps
    ``v_{-1} = delta_0 @ W_0`` (diagonal: ``delta_0 * a_0``): the row leaving
    the chunk. No extra pass: it is the step backprop would take next.
``chunk_product(pc, Y) -> T``
    the chunk's Jacobian product ``T = A_{L-1} ... A_0`` per sample, shape
    ``(N, d_out[L-1], d_in[0])``, seen from the output side
    (``T_new = T @ diag(act'(y_l)) W_l``, layer ``L-1`` first). It costs
    ``d_top * d_out * d_in`` multiply-adds per layer and sample: the ``w^3``
    that a scan across shards pays for its ``log2 P`` depth.

Importing this module imports numba; :mod:`chainprod.executors.sharded_worker`
does that only when a shard runs with ``kernels="numba"``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# The per-layer helpers of the whole-chain kernels: reusing them keeps the
# arithmetic (and so the rounding) of a shard identical to theirs.
from ..kernels.numba_kernels import _delta_rows, _deriv, _layer_vjp, _next_row

__all__ = ["backprop_with_row", "chunk_product"]


@njit(cache=True)
def _backprop_row(kind, act, d_in, d_out, p_off, y_off, theta, x, Y, seed, N, grads, row_in, width):
    """Backprop of all ``N`` samples into ``grads``; ``row_in`` receives ``dloss/dx``. Returns bad layer."""
    L = kind.shape[0]
    v = np.empty(N * width, Y.dtype)
    vn = np.empty(N * width, Y.dtype)
    delta = np.empty(N * width, Y.dtype)
    dL = d_out[L - 1]
    v[:N * dL] = seed[:N * dL]
    bad = -1
    for l in range(L - 1, -1, -1):
        din, dout = d_in[l], d_out[l]
        y = Y[N * y_off[l]:N * y_off[l + 1]]
        chk = _delta_rows(act[l], v, y, delta, N * dout)
        if bad < 0 and chk != 0.0:
            bad = l
        g = grads[p_off[l]:p_off[l + 1]]
        if l == 0:
            _layer_vjp(kind[0], din, dout, delta, x, N, g)
        else:
            _layer_vjp(kind[l], din, dout, delta, Y[N * y_off[l - 1]:N * y_off[l]], N, g)
        out = row_in if l == 0 else vn  # layer 0's next row is the row leaving the chunk
        _next_row(kind[l], din, dout, theta[p_off[l]:p_off[l + 1]], delta, out, N)
        v, vn = vn, v
    return bad


@njit(cache=True)
def _product(kind, act, d_in, d_out, p_off, y_off, theta, Y, N, T, width):
    """``T[n] = A_{L-1} ... A_0`` for every sample ``n`` (``T`` flat, ``(N, dtop, d_in[0])``)."""
    L = kind.shape[0]
    dtop = d_out[L - 1]
    M = np.empty(dtop * width, Y.dtype)
    Mn = np.empty(dtop * width, Y.dtype)
    s = np.empty(width, Y.dtype)
    d0 = d_in[0]
    for n in range(N):
        # M starts as the identity of the chunk's output width
        M[:dtop * dtop] = 0.0
        for i in range(dtop):
            M[i * dtop + i] = 1.0
        for l in range(L - 1, -1, -1):
            din, dout = d_in[l], d_out[l]
            y = Y[N * y_off[l] + n * dout:N * y_off[l] + (n + 1) * dout]
            th = theta[p_off[l]:p_off[l + 1]]
            for k in range(dout):
                s[k] = _deriv(act[l], y[k])
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


def backprop_with_row(pc, x, Y, seed):
    """Compiled backprop of a chunk from ``seed`` (N, d_out[L-1]): ``(flat grads, row_in (N, d_in[0]), bad)``."""
    N = x.shape[0]
    grads = np.empty(pc.n_params, pc.dtype)
    row_in = np.empty(N * pc.width_in, pc.dtype)
    bad = _backprop_row(pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta,
                        _ro(x.reshape(-1)), _ro(Y), _ro(seed.reshape(-1)), N, grads, row_in, pc.max_width)
    return grads, row_in.reshape(N, pc.width_in), int(bad)


def chunk_product(pc, Y, N):
    """The chunk's Jacobian product per sample, ``(N, d_out[L-1], d_in[0])``, compiled."""
    T = np.empty(N * pc.width_out * pc.width_in, pc.dtype)
    _product(pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, _ro(Y), N, T, pc.max_width)
    return T.reshape(N, pc.width_out, pc.width_in)


def _ro(a):
    # the whole-chain kernels see read-only arrays: same types, same compiled specialisation
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v
