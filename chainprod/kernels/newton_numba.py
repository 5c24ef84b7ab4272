"""Compiled Newton linearisation of a chain: every layer's value, Jacobian and affine block in two calls.

One Newton iteration of a chain's forward pass (``docs/newton.md``) needs,
at the current guess ``x`` of every layer's output, for every layer ``t``
of the solved body at once (``prev_t = x_{t-1}``, ``prev_0 = h0``):

* :func:`chain_evaluate`: ``F_t = act(W_t prev_t + b_t)`` (``a_t * prev_t``
  for a diagonal layer; the sequential pass's own layer step,
  :func:`~.numba_layers.layer_forward`), and the residual's two maxima
  ``max |x_t - F_t|`` and ``max |x_t|`` with the first layer whose ``F`` is
  not finite, in one pass;
* :func:`chain_linearise`: the block of the affine recurrence
  ``x_t = J_t x_{t-1} + c_t`` straight into its slot of an affine scan's
  buffer (:mod:`chainprod.kernels.affine_scan`'s layout): ``J_t =
  diag(act'(F_t)) W_t`` (``act'(F_t) * diag(W_t)`` when ``quasi``, the
  diagonal layout; ``act'(F_t) * a_t`` for a diagonal layer) and ``c_t =
  F_t - J_t prev_t``, summed as ``J_t`` is written, Levenberg-Marquardt
  damped by ``lam`` as the numpy step damps it.

Both run in parallel over layers (``prange``; the layers of one iteration
do not wait for each other). The rules are those of
:mod:`chainprod.newton_models` (``ChainBody``), the reference they are
tested against; the activations are :mod:`.numba_rules`'. Arrays of states
(``h0``, ``x``, ``F``) are flat, layer-major: layer ``t`` of batch
``N``, width ``w`` is ``[t N w, (t + 1) N w)``. Importing this module
imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_layers import layer_forward
from .numba_rules import derivative

__all__ = ["chain_evaluate", "chain_linearise"]


@njit(cache=True, error_model="numpy")
def _evaluate_layer(kind, code, th, prev, xt, Ft, N, w, cross):
    """``Ft = act(W prev + b)`` (the sequential pass's own step); ``(max |x - F|, max |x|, non-finite count)``."""
    nbad = layer_forward(kind, code, w, w, th, prev, Ft, N, cross)
    diff = Ft.dtype.type(0.0)
    big = Ft.dtype.type(0.0)
    for e in range(N * w):
        diff = max(diff, abs(xt[e] - Ft[e]))
        big = max(big, abs(xt[e]))
    return diff, big, nbad


@njit(cache=True, parallel=True, error_model="numpy")
def chain_evaluate(theta, p_off, kind, act, first, h0, x, F, n, N, w, cross, parallel):
    """``(max |x - F|, max |x|, first non-finite layer or -1)``, filling ``F`` (see the module).

    Layer ``t`` of the body is packed layer ``first + t`` (``theta``,
    ``p_off``, ``kind``, ``act`` of :class:`~chainprod.kernels.pack.PackedChain`);
    a dense product goes to BLAS from ``cross`` multiply-adds (the caller
    limits BLAS to one thread when ``parallel``).
    """
    diffs = np.zeros(n, dtype=F.dtype)
    bigs = np.zeros(n, dtype=F.dtype)
    bads = np.zeros(n, dtype=np.int64)
    s = N * w
    if parallel:
        for t in prange(n):
            l = first + t
            diffs[t], bigs[t], bads[t] = _evaluate_layer(kind[l], act[l], theta[p_off[l]:p_off[l + 1]],
                                                         h0 if t == 0 else x[(t - 1) * s:t * s],
                                                         x[t * s:(t + 1) * s], F[t * s:(t + 1) * s], N, w, cross)
    else:
        for t in range(n):
            l = first + t
            diffs[t], bigs[t], bads[t] = _evaluate_layer(kind[l], act[l], theta[p_off[l]:p_off[l + 1]],
                                                         h0 if t == 0 else x[(t - 1) * s:t * s],
                                                         x[t * s:(t + 1) * s], F[t * s:(t + 1) * s], N, w, cross)
    bad = -1
    for t in range(n):
        if bads[t] != 0:
            bad = t
            break
    return diffs.max(), bigs.max(), bad


@njit(cache=True, error_model="numpy")
def _linearise_layer(theta, p, dense, code, prev, xt, Ft, lam, diag_layout, buf, off, N, w):
    damp = buf.dtype.type(lam)  # the dtype's arithmetic, as numpy's with a Python float
    scale = buf.dtype.type(1.0) + damp
    zero = buf.dtype.type(0.0)
    for bb in range(N):
        for i in range(w):
            e = bb * w + i
            s = derivative(code, Ft[e])
            if diag_layout:  # [a | c]: quasi-Newton keeps diag(J)
                a = s * (theta[p + i * w + i] if dense else theta[p + i])
                c = Ft[e] - a * prev[e]
                if lam != 0:
                    c = (c + damp * xt[e]) / scale
                    a = a / scale
                o = off + bb * 2 * w
                buf[o + i] = a
                buf[o + w + i] = c
                continue
            row = off + (bb * w + i) * (w + 1)  # [J | c], row i
            if dense:
                acc = zero
                for j in range(w):  # J prev summed as J is written: no second pass over J
                    a = s * theta[p + i * w + j]
                    acc += a * prev[bb * w + j]
                    buf[row + j] = a / scale if lam != 0 else a
                c = Ft[e] - acc
            else:  # a diagonal layer in a dense layout (a mixed chain): diag(s * a)
                a = s * theta[p + i]
                c = Ft[e] - a * prev[e]
                for j in range(w):
                    buf[row + j] = zero
                buf[row + i] = a / scale if lam != 0 else a
            if lam != 0:
                c = (c + damp * xt[e]) / scale
            buf[row + w] = c


@njit(cache=True, parallel=True, error_model="numpy")
def chain_linearise(theta, p_off, kind, act, first, h0, x, F, lam, diag_layout, buf, pos_off, n, N, w, parallel):
    """Every layer's block ``[J_t | c_t]`` (or ``[diag J_t | c_t]`` when ``diag_layout``) into ``buf[pos_off[t]:]``.

    ``F`` is :func:`chain_evaluate`'s at the same ``x``.
    """
    s = N * w
    if parallel:
        for t in prange(n):
            prev = h0 if t == 0 else x[(t - 1) * s:t * s]
            l = first + t
            _linearise_layer(theta, p_off[l], kind[l] == 0, act[l], prev, x[t * s:(t + 1) * s],
                             F[t * s:(t + 1) * s], lam, diag_layout, buf, pos_off[t], N, w)
    else:
        for t in range(n):
            prev = h0 if t == 0 else x[(t - 1) * s:t * s]
            l = first + t
            _linearise_layer(theta, p_off[l], kind[l] == 0, act[l], prev, x[t * s:(t + 1) * s],
                             F[t * s:(t + 1) * s], lam, diag_layout, buf, pos_off[t], N, w)
