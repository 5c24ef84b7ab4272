"""The numpy reference of the diagonal recurrence's sequential loops (:class:`chainprod.DiagonalRecurrence`).

Two functions with the signatures and meaning of their compiled twins in
:mod:`chainprod.kernels.ssm_numba` (``kernels="numpy"`` selects these; the
tests hold the two sets to each other): ``states`` runs
``h_t = a * h_{t-1} + x_t``, ``adjoint`` runs ``lambda_t = a * lambda_{t+1}
+ g_t`` and accumulates ``da``. Arrays are time-first ``(T, N, d)`` in one
dtype. :func:`first_bad_step` is the one-pass finiteness check both sides use.
"""

from __future__ import annotations

import numpy as np

__all__ = ["adjoint", "first_bad_step", "states"]


def states(a, X, h0, H):
    """``H[t] = a * H[t-1] + X[t]`` from ``H[-1] = h0``, a plain loop; the first non-finite step or -1.

    ``H`` may be ``X`` itself: ``X[t]`` is read before ``H[t]`` is written.
    """
    h = h0
    for t in range(X.shape[0]):
        np.add(X[t], a * h, out=H[t])
        h = H[t]
    return first_bad_step(H)


def adjoint(a, G, H, h0, L, da):
    """``L[t] = a * L[t+1] + G[t]`` (``L[T] = 0``) and ``da = sum_t sum_n L[t] * H[t-1]`` (``H[-1] = h0``).

    ``L`` may be ``G`` itself; ``da`` ``(d,)`` is overwritten.
    """
    lam = np.zeros_like(h0)
    da[:] = 0
    for t in range(G.shape[0] - 1, -1, -1):
        lam = a * lam + G[t]
        L[t] = lam
        da += (lam * (H[t - 1] if t else h0)).sum(axis=0)


def first_bad_step(X) -> int:
    """The first step ``t`` of ``X`` ``(T, ...)`` holding a NaN or infinity, or -1: one pass over the data.

    A NaN or infinity makes its row sum non-finite, so a matrix-vector
    product with ones (memory speed, no temporary of ``X``'s size) finds the
    candidates; only when one is found (or a finite sum overflowed) are the
    entries themselves looked at.
    """
    T = X.shape[0]
    flat = X.reshape(T, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        sums = flat @ np.ones(flat.shape[1], X.dtype)
    if np.isfinite(sums).all():
        return -1
    for t in np.flatnonzero(~np.isfinite(sums)):
        if not np.isfinite(flat[t]).all():
            return int(t)
    return -1
