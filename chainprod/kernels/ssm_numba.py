"""Compiled sequential loops of the diagonal linear recurrence (:class:`chainprod.DiagonalRecurrence`).

Only the parts that are sequential in time live here: the state recurrence
``h_t = a * h_{t-1} + x_t`` and its adjoint ``lambda_t = a * lambda_{t+1} +
g_t`` with ``da`` accumulated in the same reverse loop. The projections
``x_t = B u_t``, ``y_t = C h_t + D u_t`` and ``g_t = C^T dloss/dy_t`` are not
sequential: the caller does them for every step at once in one BLAS product
each. The numpy reference of these two functions, tested against them, is
:mod:`chainprod.kernels.ssm_numpy` (``kernels="numpy"``).

Arrays are time-first and C-contiguous, ``(T, N, d)``, in one dtype
(float32 is computed in float32). Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["adjoint", "states"]


@njit(cache=True)
def states(a, X, h0, H):
    """Every state ``H[t] = a * H[t-1] + X[t]`` from ``H[-1] = h0``; returns the first non-finite step or -1.

    ``a`` ``(d,)``, ``X`` and ``H`` ``(T, N, d)``, ``h0`` ``(N, d)``. ``H``
    may be ``X`` itself (each entry of ``X`` is read before it is
    overwritten), which saves the caller one ``T N d`` array.
    """
    T, N, d = X.shape
    # v - v is 0 for a finite v and NaN for inf or NaN (in v's own dtype), and NaN sticks in a sum: one
    # accumulator per lane (no reduction across lanes, so the loop still vectorises) says whether any
    # state is not finite without reading the states a second time
    acc = np.zeros((N, d), X.dtype)
    for n in range(N):
        for i in range(d):
            v = a[i] * h0[n, i] + X[0, n, i]
            H[0, n, i] = v
            acc[n, i] += v - v
    for t in range(1, T):
        for n in range(N):
            for i in range(d):
                v = a[i] * H[t - 1, n, i] + X[t, n, i]
                H[t, n, i] = v
                acc[n, i] += v - v
    bad = -1
    if np.isfinite(acc).all():
        return bad
    for t in range(T):  # the error path only: which step
        if not np.isfinite(H[t]).all():
            bad = t
            break
    return bad


@njit(cache=True)
def adjoint(a, G, H, h0, L, da):
    """The adjoints ``L[t] = a * L[t+1] + G[t]`` (``L[T] = 0``) and ``da = sum_t sum_n L[t] * H[t-1]``.

    ``G`` ``(T, N, d)``: the direct terms ``C^T dloss/dy_t``; ``H`` the
    states, ``h0`` ``(N, d)`` the state before step 0; ``L`` ``(T, N, d)``
    the output (it may be ``G`` itself); ``da`` ``(d,)`` is overwritten.
    """
    T, N, d = G.shape
    lam = np.zeros((N, d), G.dtype)
    for i in range(d):
        da[i] = 0
    for t in range(T - 1, 0, -1):
        for n in range(N):
            for i in range(d):
                v = a[i] * lam[n, i] + G[t, n, i]
                lam[n, i] = v
                L[t, n, i] = v
                da[i] += v * H[t - 1, n, i]
    for n in range(N):
        for i in range(d):
            v = a[i] * lam[n, i] + G[0, n, i]
            L[0, n, i] = v
            da[i] += v * h0[n, i]
