"""The numpy reference kernels: plain per-layer numpy, written to be read.

This module defines the contract of every kernel set (the compiled set in
:mod:`chainprod.kernels.numba_kernels` has exactly these signatures and
meanings and is tested against this one). All arrays use the flat layout of
:mod:`chainprod.kernels.pack`: a tape ``Y`` (and the rows ``V``, and the
derivatives ``S``) is 1-D, layer-major, layer ``l``'s block being
``Y[N*y_off[l]:N*y_off[l+1]].reshape(N, d_out[l])``; gradients are flat in
the layout of ``theta``.

Math (0-based layers, ``x_{-1} = x`` the input, ``y_l`` layer ``l``'s output)::

    dense:  y_l = act(x_{l-1} @ W_l.T + b_l)      diag:  y_l = act(a_l * x_{l-1} + b_l)
    delta_l = v_l * act'(y_l)                       (v_l = dloss/dy_l, a row per sample)
    dense:  dW_l = delta_l.T @ x_{l-1},  db_l = sum_n delta_l,   v_{l-1} = delta_l @ W_l
    diag:   da_l = sum_n delta_l * x_{l-1},  db_l = sum_n delta_l,   v_{l-1} = delta_l * a_l

Derivatives come from the outputs: ``tanh' = 1 - y^2``, ``relu' = (y > 0)``,
``sigmoid' = y (1 - y)``, ``softplus' = -expm1(-y)``, ``identity' = 1``.
"""

from __future__ import annotations

import numpy as np

from . import _check
from .pack import KIND_CODES

__all__ = ["forward", "backprop", "param_grads", "derivatives"]

NAME = "numpy"
_DENSE = KIND_CODES["dense"]


def _sigmoid(y):
    # exp(-softplus(-z)) is overflow-free for both signs of z
    np.logaddexp(0, -y, out=y)
    np.negative(y, out=y)
    np.exp(y, out=y)


# Activation code (ACT_CODES) -> (in-place activation of z, act'(z) from the output y).
_ACTIVATIONS = {
    0: (lambda y: None, lambda y: np.ones_like(y)),                        # identity
    1: (lambda y: np.tanh(y, out=y), lambda y: 1 - y * y),                   # tanh
    2: (lambda y: np.maximum(y, 0, out=y), lambda y: (y > 0).astype(y.dtype)),  # relu
    3: (_sigmoid, lambda y: y * (1 - y)),                                    # sigmoid
    4: (lambda y: np.logaddexp(0, y, out=y), lambda y: -np.expm1(-y)),      # softplus
}


def _rows(pc, Z, N, l):
    return Z[N * pc.y_off[l]:N * pc.y_off[l + 1]].reshape(N, int(pc.d_out[l]))


def _params(pc, l):
    """Layer ``l``'s ``(W, b)`` or ``(a, b)`` as views of ``theta``."""
    p = pc.theta[pc.p_off[l]:pc.p_off[l + 1]]
    dout, din = int(pc.d_out[l]), int(pc.d_in[l])
    if pc.kind[l] == _DENSE:
        return p[:dout * din].reshape(dout, din), p[dout * din:]
    return p[:dout], p[dout:]


def _layer_input(pc, x, Y, N, l):
    return x if l == 0 else _rows(pc, Y, N, l - 1)


def _vjp(pc, l, delta, xin, out):
    """Write layer ``l``'s parameter gradient from ``delta`` and its input into ``out`` (its theta slice)."""
    first, second = _params(pc, l)
    if pc.kind[l] == _DENSE:
        out[:first.size] = (delta.T @ xin).reshape(-1)
    else:
        out[:first.size] = (delta * xin).sum(axis=0)
    out[first.size:] = delta.sum(axis=0)


def forward(pc, x):
    """Run the chain on a batch; keep every layer's output.

    Parameters
    ----------
    pc : PackedChain
    x : ndarray, shape ``(N, d_0)``, the chain's dtype
        Not modified.

    Returns
    -------
    Y : ndarray, shape ``(N * y_off[L],)``
        The flat tape of outputs (layer-major).
    bad : int
        The first (lowest-index) layer whose output holds NaN or infinity,
        or -1. Every layer is computed either way.
    """
    pc = _check.packed(pc)
    x = _check.batch_input(pc, x)
    N = x.shape[0]
    Y = np.empty(pc.tape_size(N), pc.dtype)
    bad = -1
    h = x
    with np.errstate(over="ignore", invalid="ignore"):  # reported as `bad`
        for l in range(pc.L):
            first, b = _params(pc, l)
            y = _rows(pc, Y, N, l)
            if pc.kind[l] == _DENSE:
                np.matmul(h, first.T, out=y)
            else:
                np.multiply(h, first, out=y)
            y += b
            _ACTIVATIONS[int(pc.act[l])][0](y)
            if bad < 0 and not np.isfinite(y).all():
                bad = l
            h = y
    return Y, bad


def backprop(pc, x, Y, seed):
    """Sequential backprop: parameter gradients from a tape and ``seed = dloss/dy_{L-1}``.

    For ``l = L-1`` down to 0: ``delta_l = v_l * act'(y_l)`` (``v_{L-1} =
    seed``), the parameter VJPs of layer ``l``, then ``v_{l-1} = delta_l @ W_l``
    (diag: ``delta_l * a_l``). No Jacobian is formed.

    Parameters
    ----------
    pc : PackedChain
    x : ndarray, shape ``(N, d_0)``
        The input the tape was made from.
    Y : ndarray, shape ``(N * y_off[L],)``
        The tape from :func:`forward`.
    seed : ndarray, shape ``(N, d_L)``
        ``dloss/dy_{L-1}``, one row per sample.

    Returns
    -------
    grads : ndarray, shape ``(n_params,)``
        Flat, in the layout of ``theta`` (:func:`~chainprod.kernels.unpack_grads`
        gives per-layer views).
    bad : int
        The first layer *met by the backward pass* (the highest index) whose
        ``delta_l`` holds NaN or infinity, or -1. With finite inputs this
        means the row ``v_l = seed . A_{L-1} ... A_{l+1}`` overflowed: the
        product of the input Jacobians of layers ``bad+1 .. L-1`` (``bad =
        L-1``: the seed itself is not finite). Non-finite values propagate,
        so every lower layer's delta is non-finite too. A parameter gradient
        can still overflow with finite deltas (``delta^T x``); check ``grads``
        with :func:`~chainprod.kernels.first_nonfinite_layer` if that matters.
    """
    pc, x, N, Y, seed = _check.backward_args(pc, x, Y, seed)
    grads = np.empty(pc.n_params, pc.dtype)
    bad = -1
    v = seed
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L - 1, -1, -1):
            y = _rows(pc, Y, N, l)
            delta = v * _ACTIVATIONS[int(pc.act[l])][1](y)
            if bad < 0 and not np.isfinite(delta).all():
                bad = l
            _vjp(pc, l, delta, _layer_input(pc, x, Y, N, l), grads[pc.p_off[l]:pc.p_off[l + 1]])
            if l > 0:
                first, _ = _params(pc, l)
                v = delta @ first if pc.kind[l] == _DENSE else delta * first
    return grads, bad


def param_grads(pc, x, Y, V):
    """Parameter gradients from given rows ``V`` (every layer's VJP is independent).

    ``delta_l = V_l * act'(y_l)``, then the same parameter VJPs as
    :func:`backprop`. This is the step after a scan has formed every
    ``v_l`` at once.

    Parameters
    ----------
    pc : PackedChain
    x : ndarray, shape ``(N, d_0)``
    Y : ndarray, shape ``(N * y_off[L],)``
        The tape from :func:`forward`.
    V : ndarray, shape ``(N * y_off[L],)``
        ``v_l = dloss/dy_l`` in the layout of ``Y`` (``V`` of the last layer
        is the seed).

    Returns
    -------
    grads : ndarray, shape ``(n_params,)``
    bad : int
        The lowest layer whose parameter gradient holds NaN or infinity, or
        -1 (a non-finite ``delta_l`` always makes ``db_l`` non-finite, so this
        covers non-finite rows ``V_l`` too).
    """
    pc, x, N, Y, V = _check.backward_args(pc, x, Y, V, rows_are="V")
    grads = np.empty(pc.n_params, pc.dtype)
    bad = -1
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L):
            delta = _rows(pc, V, N, l) * _ACTIVATIONS[int(pc.act[l])][1](_rows(pc, Y, N, l))
            out = grads[pc.p_off[l]:pc.p_off[l + 1]]
            _vjp(pc, l, delta, _layer_input(pc, x, Y, N, l), out)
            if bad < 0 and not np.isfinite(out).all():
                bad = l
    return grads, bad


def derivatives(pc, Y):
    """``S = act'(y)`` for every layer, in the layout of ``Y`` (the batch is read from ``Y``'s length)."""
    pc = _check.packed(pc)
    N = _check.batch_of_tape(pc, Y)
    S = np.empty_like(Y)
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L):
            _rows(pc, S, N, l)[...] = _ACTIVATIONS[int(pc.act[l])][1](_rows(pc, Y, N, l))
    return S
