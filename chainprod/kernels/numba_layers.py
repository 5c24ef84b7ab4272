"""One layer's steps for the compiled kernels, each choosing between a fused loop and BLAS by its size.

The whole-chain loops of :mod:`chainprod.kernels.numba_kernels` call these
once per layer (or once per layer and sample, for the Jacobian product).
A dense step forms a product of ``nr x d_in x d_out`` multiply-adds
(``nr`` rows of the batch): below the crossover ``cross`` it runs as a
plain loop straight on ``theta`` (no call, no allocation: at batch 1 and
widths of 8 a BLAS call costs more than the arithmetic), from it on as
one :func:`~chainprod.kernels.numba_blas.gemm` on the contiguous blocks.
``cross`` comes from :func:`chainprod.kernels.crossover.blas_crossover`:
``0`` forces BLAS, :data:`~chainprod.kernels.crossover.NEVER` the loops.
A diagonal step is ``O(w)`` and always a loop.

Arrays are flat (layout of :mod:`chainprod.kernels.pack`); ``xs``, ``ys``,
``delta`` hold the ``nr`` rows of one layer, row-major. Importing this
module imports numba.

numba's on-disk cache keys a compiled function by its own source file only:
after changing a step here (or in :mod:`.numba_rules`, :mod:`.numba_blas`),
clear this package's ``__pycache__`` so the kernels that compile them in
are compiled again.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .crossover import best_seconds_per_rep
from .numba_blas import NOTRANS, TRANS, gemm
from .numba_rules import bias_act, deriv_rows

__all__ = ["layer_forward", "layer_vjp", "next_row", "product_step", "row_step_seconds"]


@njit(cache=True, error_model="numpy")
def layer_forward(kind, code, din, dout, th, xs, ys, nr, cross):
    """``ys = act(xs @ W.T + b)`` (dense) or ``act(a * xs + b)`` (diag) for ``nr`` rows.

    Returns ``chk``: the number of outputs written that are not finite (0 when all are).
    """
    if kind == 0:
        if nr * din * dout >= cross:
            gemm(NOTRANS, TRANS, nr, dout, din, xs, 0, din, th, 0, din, 0.0, ys, 0, dout)
        else:
            for n in range(nr):
                xr = xs[n * din:(n + 1) * din]
                yr = ys[n * dout:(n + 1) * dout]
                for i in range(dout):
                    w = th[i * din:(i + 1) * din]
                    s = w[0] * xr[0]  # x @ W.T first, then + b (in bias_act): numpy's order
                    for j in range(1, din):
                        s += w[j] * xr[j]
                    yr[i] = s
        return bias_act(code, ys, th[dout * din:], nr, dout)
    a = th[:dout]
    for n in range(nr):
        xr = xs[n * din:(n + 1) * din]
        yr = ys[n * dout:(n + 1) * dout]
        for i in range(dout):
            yr[i] = a[i] * xr[i]
    return bias_act(code, ys, th[dout:], nr, dout)


@njit(cache=True, error_model="numpy")
def layer_vjp(kind, din, dout, delta, xs, nr, g, cross):
    """One layer's gradient ``g`` (its theta-shaped slice) from ``delta`` (nr, dout) and its input ``xs`` (nr, din).

    Dense: ``dW = delta.T @ xs``, ``db = sum_n delta``; diag: ``da = sum_n
    delta * xs``, ``db = sum_n delta``. Sums over samples run in order, the
    first sample assigning (no zeroing pass).
    """
    if kind == 0:
        gb = g[dout * din:]
        for i in range(dout):
            gb[i] = delta[i]
        for r in range(1, nr):
            dr = delta[r * dout:(r + 1) * dout]
            for i in range(dout):
                gb[i] += dr[i]
        if nr * din * dout >= cross:
            gemm(TRANS, NOTRANS, dout, din, nr, delta, 0, dout, xs, 0, din, 0.0, g, 0, din)
            return
        for i in range(dout):
            d = delta[i]
            gw = g[i * din:(i + 1) * din]
            for j in range(din):
                gw[j] = d * xs[j]
        for r in range(1, nr):
            xr = xs[r * din:(r + 1) * din]
            for i in range(dout):
                d = delta[r * dout + i]
                gw = g[i * din:(i + 1) * din]
                for j in range(din):
                    gw[j] += d * xr[j]
    else:
        ga = g[:dout]
        gb = g[dout:]
        for i in range(dout):
            ga[i] = delta[i] * xs[i]
            gb[i] = delta[i]
        for r in range(1, nr):
            for i in range(dout):
                d = delta[r * dout + i]
                ga[i] += d * xs[r * din + i]
                gb[i] += d


@njit(cache=True, error_model="numpy")
def next_row(kind, din, dout, th, delta, out, nr, cross):
    """``out = v_{l-1}``, the rows entering layer ``l`` from above: ``delta @ W`` (dense) or ``delta * a`` (diag)."""
    if kind == 0:
        if nr * din * dout >= cross:
            gemm(NOTRANS, NOTRANS, nr, din, dout, delta, 0, dout, th, 0, din, 0.0, out, 0, din)
            return
        zero = out.dtype.type(0.0)
        for r in range(nr):
            vr = out[r * din:(r + 1) * din]
            for j in range(din):
                vr[j] = zero
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


@njit(cache=True, error_model="numpy")
def product_step(kind, code, din, dout, th, y, M, Mn, s, scratch, dtop, cross):
    """``Mn = M diag(act'(y)) W`` (dense) or ``M diag(act'(y) a)`` (diag) for one sample.

    ``M`` is ``dtop x dout``, ``Mn`` ``dtop x din``; ``s`` (``dout``) and
    ``scratch`` (``dtop x dout``) are work space.
    """
    deriv_rows(code, y, s, dout)
    if kind == 0:
        # (M diag(s)) W: the rows M diag(s) times W is next_row's product, by loop or BLAS alike
        for i in range(dtop):
            for k in range(dout):
                scratch[i * dout + k] = M[i * dout + k] * s[k]
        next_row(0, din, dout, th, scratch, Mn, dtop, cross)
    else:
        for i in range(dtop):
            for k in range(dout):
                Mn[i * dout + k] = M[i * dout + k] * (s[k] * th[k])


# -- timing the two ways (for the calibration of the crossover) ------------------------------------
@njit(cache=True, error_model="numpy")
def _row_steps(nr, w, cross, th, xs, ys, delta, g, vn, reps):
    for _ in range(reps):
        layer_forward(0, 0, w, w, th, xs, ys, nr, cross)
        layer_vjp(0, w, w, delta, xs, nr, g, cross)
        next_row(0, w, w, th, delta, vn, nr, cross)


def row_step_seconds(nr, w, dtype, cross, repeats=5, min_seconds=2e-4):
    """Best seconds of one dense layer's three row products (forward, VJP, next row) at ``nr`` rows, width ``w``.

    ``cross`` as in the kernels (``0``: BLAS, :data:`~.crossover.NEVER`: the
    loops). Timed inside one compiled loop of enough repeats to last
    ``min_seconds``, so no Python call is in the figure; the best of
    ``repeats`` such loops.
    """
    rng = np.random.default_rng(0)
    th = (rng.standard_normal(w * w + w) / np.sqrt(w)).astype(dtype)
    xs, delta = (rng.standard_normal(nr * w).astype(dtype) for _ in range(2))
    ys, vn, g = np.empty(nr * w, dtype), np.empty(nr * w, dtype), np.empty(w * w + w, dtype)
    args = (nr, w, cross, th, xs, ys, delta, g, vn)
    return best_seconds_per_rep(lambda reps: _row_steps(*args, reps), repeats, min_seconds)
