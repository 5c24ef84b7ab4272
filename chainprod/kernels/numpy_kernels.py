"""The numpy reference kernels: plain per-layer numpy, written to be read.

This module defines the contract of every kernel set: the compiled set
(:mod:`chainprod.kernels.numba_kernels`) has exactly these functions,
signatures, meanings and errors, and is tested against this one. A worker or
an executor reaches either set by name, ``get_kernels(name)``
(:func:`chainprod.kernels.get_kernels`), and uses only these functions:

``forward(pc, x) -> (Y, bad)``
    Every layer's output, as the flat tape ``Y``.
``backprop(pc, x, Y, cotangent) -> (grads, bad)``
    Parameter gradients by sequential backprop from the top.
``backprop_with_row(pc, x, Y, cotangent) -> (grads, row_in, bad)``
    The same loop, also keeping the row leaving the chain's bottom,
    ``row_in = dloss/dx`` of shape ``(N, d_in[0])``.
``chunk_product(pc, Y, N) -> T``
    The Jacobian product ``A_{L-1} ... A_0`` per sample, ``(N, d_out[L-1], d_in[0])``.
``param_grads(pc, x, Y, V) -> (grads, bad)``
    Parameter gradients from given rows ``V`` (every layer independently).
``derivatives(pc, Y) -> S``
    ``act'(y)`` of every layer, in the layout of ``Y``.
``all_finite(a) -> bool``
    Whether a 1-D array (a flat gradient, a tape) holds no NaN or infinity.

``cotangent`` is ``dloss/dy_{L-1}``, one row per sample: what the backward
pass starts from. A chunk of a longer chain (a shard) is a packed chain of its
own, so ``backprop_with_row`` hands the row below it on, and
``chunk_product`` is the chunk's block in a scan across chunks.

All arrays use the flat layout of :mod:`chainprod.kernels.pack`: a tape ``Y``
(and the rows ``V``, and the derivatives ``S``) is 1-D, layer-major, layer
``l``'s block being ``Y[N*y_off[l]:N*y_off[l+1]].reshape(N, d_out[l])``;
gradients are flat in the layout of ``theta``. Bad input (not a
``PackedChain``, a wrong shape or dtype) raises the same ``TypeError`` or
``ValueError`` with the same message in every set (one set of checks serves both).

Math (0-based layers, ``x_{-1} = x`` the input, ``y_l`` layer ``l``'s output)::

    dense:  y_l = act(x_{l-1} @ W_l.T + b_l)      diag:  y_l = act(a_l * x_{l-1} + b_l)
    delta_l = v_l * act'(y_l)                       (v_l = dloss/dy_l, a row per sample)
    dense:  dW_l = delta_l.T @ x_{l-1},  db_l = sum_n delta_l,   v_{l-1} = delta_l @ W_l
    diag:   da_l = sum_n delta_l * x_{l-1},  db_l = sum_n delta_l,   v_{l-1} = delta_l * a_l
    A_l = diag(act'(y_l)) W_l  (dense),   diag(act'(y_l) * a_l)  (diag)

Activations and their derivatives from the outputs are those of
:data:`chainprod.activations.ACTIVATIONS` (``tanh' = 1 - y^2``, ``relu' =
(y > 0)``, ``sigmoid' = y (1 - y)``, ``softplus' = -expm1(-y)``,
``identity' = 1``), looked up by the packed activation code.
"""

from __future__ import annotations

import numpy as np

from ..activations import apply_activation, derivative_from_output
from . import checks
from .pack import ACT_NAMES, KIND_CODES

__all__ = ["forward", "backprop", "backprop_with_row", "chunk_product", "param_grads", "derivatives", "all_finite"]

NAME = "numpy"
_DENSE = KIND_CODES["dense"]


def _rows(pc, Z, N, l):
    return Z[N * pc.y_off[l]:N * pc.y_off[l + 1]].reshape(N, int(pc.d_out[l]))


def _deriv(pc, l, y):
    """``act'(z)`` of layer ``l`` from its outputs ``y`` (a new array)."""
    return derivative_from_output(ACT_NAMES[int(pc.act[l])], y)


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
    pc = checks.packed(pc)
    x = checks.batch_input(pc, x)
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
            apply_activation(ACT_NAMES[int(pc.act[l])], y)
            if bad < 0 and not np.isfinite(y).all():
                bad = l
            h = y
    return Y, bad


def _backprop(pc, x, Y, cotangent, keep_row):
    """The one backprop loop: ``(grads, v_{-1} or None, bad)``."""
    pc, x, N, Y, cotangent = checks.backward_args(pc, x, Y, cotangent)
    grads = np.empty(pc.n_params, pc.dtype)
    bad = -1
    v = cotangent
    with np.errstate(over="ignore", invalid="ignore"):  # reported as `bad`
        for l in range(pc.L - 1, -1, -1):
            delta = v * _deriv(pc, l, _rows(pc, Y, N, l))
            if bad < 0 and not np.isfinite(delta).all():
                bad = l
            _vjp(pc, l, delta, _layer_input(pc, x, Y, N, l), grads[pc.p_off[l]:pc.p_off[l + 1]])
            if l > 0 or keep_row:  # below layer 0 the row is dloss/dx: formed only when asked for
                first, _ = _params(pc, l)
                v = delta @ first if pc.kind[l] == _DENSE else delta * first
    return grads, (np.ascontiguousarray(v) if keep_row else None), bad


def backprop(pc, x, Y, cotangent):
    """Sequential backprop: parameter gradients from a tape and ``cotangent = dloss/dy_{L-1}``.

    For ``l = L-1`` down to 0: ``delta_l = v_l * act'(y_l)`` (``v_{L-1} =
    cotangent``), the parameter VJPs of layer ``l``, then ``v_{l-1} = delta_l
    @ W_l`` (diag: ``delta_l * a_l``). No Jacobian is formed.

    Parameters
    ----------
    pc : PackedChain
    x : ndarray, shape ``(N, d_0)``
        The input the tape was made from.
    Y : ndarray, shape ``(N * y_off[L],)``
        The tape from :func:`forward`.
    cotangent : ndarray, shape ``(N, d_L)``
        ``dloss/dy_{L-1}``, one row per sample.

    Returns
    -------
    grads : ndarray, shape ``(n_params,)``
        Flat, in the layout of ``theta`` (:func:`~chainprod.kernels.unpack_grads`
        gives per-layer views).
    bad : int
        The first layer *met by the backward pass* (the highest index) whose
        ``delta_l`` holds NaN or infinity, or -1. With finite inputs this
        means the row ``v_l = cotangent . A_{L-1} ... A_{l+1}`` overflowed: the
        product of the input Jacobians of layers ``bad+1 .. L-1`` (``bad =
        L-1``: the cotangent itself is not finite). Non-finite values
        propagate, so every lower layer's delta is non-finite too. A parameter
        gradient can still overflow with finite deltas (``delta^T x``); check
        ``grads`` with :func:`~chainprod.kernels.first_nonfinite_layer` if that
        matters.
    """
    grads, _, bad = _backprop(pc, x, Y, cotangent, False)
    return grads, bad


def backprop_with_row(pc, x, Y, cotangent):
    """:func:`backprop` that also returns the row leaving the chain's bottom, ``dloss/dx``.

    The same loop as :func:`backprop`, taking one more step after layer 0:
    ``row_in = v_{-1} = delta_0 @ W_0`` (diag: ``delta_0 * a_0``), which is
    ``cotangent . A_{L-1} ... A_0``. For a chunk of a longer chain this is the
    row the chunk below starts its own backward pass from.

    Parameters
    ----------
    pc, x, Y, cotangent
        As in :func:`backprop`.

    Returns
    -------
    grads : ndarray, shape ``(n_params,)``
        Equal to :func:`backprop`'s bit for bit (in each kernel set).
    row_in : ndarray, shape ``(N, d_in[0])``
        ``dloss/dx``, C-contiguous.
    bad : int
        As in :func:`backprop` (``row_in`` is not checked; it is non-finite
        whenever ``bad >= 0``).
    """
    return _backprop(pc, x, Y, cotangent, True)


def chunk_product(pc, Y, N):
    """The chain's Jacobian product ``T = A_{L-1} ... A_0``, one matrix per sample.

    Formed from the output side, ``T <- T diag(act'(y_l)) W_l`` (diag:
    ``T diag(act'(y_l) a_l)``), layer ``L-1`` first, starting from the
    identity; ``d_out[L-1] * d_out[l] * d_in[l]`` multiply-adds per dense
    layer and sample. ``cotangent . T`` is ``row_in`` of
    :func:`backprop_with_row`.

    Parameters
    ----------
    pc : PackedChain
    Y : ndarray, shape ``(N * y_off[L],)``
        The tape from :func:`forward`.
    N : int
        The batch size ``Y`` was made for (``>= 1``).

    Returns
    -------
    T : ndarray, shape ``(N, d_out[L-1], d_in[0])``
        C-contiguous. Non-finite entries are returned as they are (nothing is
        raised).
    """
    pc = checks.packed(pc)
    N = checks.batch_size(N)
    Y = checks.tape(pc, Y, N)
    T = np.broadcast_to(np.eye(pc.width_out, dtype=pc.dtype), (N, pc.width_out, pc.width_out))
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L - 1, -1, -1):
            s = _deriv(pc, l, _rows(pc, Y, N, l))
            first, _ = _params(pc, l)
            T = (T * s[:, None, :]) @ first if pc.kind[l] == _DENSE else T * (s * first)[:, None, :]
    return np.ascontiguousarray(T)


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
        is the cotangent).

    Returns
    -------
    grads : ndarray, shape ``(n_params,)``
    bad : int
        The lowest layer whose parameter gradient holds NaN or infinity, or
        -1 (a non-finite ``delta_l`` always makes ``db_l`` non-finite, so this
        covers non-finite rows ``V_l`` too).
    """
    pc, x, N, Y, V = checks.backward_args(pc, x, Y, V, rows_are="V")
    grads = np.empty(pc.n_params, pc.dtype)
    bad = -1
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L):
            delta = _rows(pc, V, N, l) * _deriv(pc, l, _rows(pc, Y, N, l))
            out = grads[pc.p_off[l]:pc.p_off[l + 1]]
            _vjp(pc, l, delta, _layer_input(pc, x, Y, N, l), out)
            if bad < 0 and not np.isfinite(out).all():
                bad = l
    return grads, bad


def derivatives(pc, Y):
    """``S = act'(y)`` for every layer, in the layout of ``Y`` (the batch is read from ``Y``'s length)."""
    pc = checks.packed(pc)
    N = checks.batch_of_tape(pc, Y)
    S = np.empty_like(Y)
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(pc.L):
            _rows(pc, S, N, l)[...] = _deriv(pc, l, _rows(pc, Y, N, l))
    return S


def all_finite(a) -> bool:
    """Whether the 1-D array ``a`` holds no NaN or infinity."""
    a = checks.flat_array(a)
    return bool(np.isfinite(a).all())
