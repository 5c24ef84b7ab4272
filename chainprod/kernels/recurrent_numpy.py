"""The numpy reference of the recurrent kernel set: the sequential part of RNN, GRU and LSTM layers.

Plain numpy, one step at a time, written to be read; the compiled set
(:mod:`chainprod.kernels.recurrent_numba`) is tested against it. Both
provide exactly :func:`forward` and :func:`backward` with one contract:

* cells ``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"``, ``"lstm"`` with
  ``G = 1, 1, 3, 4`` gates and torch's equations and gate order
  (``(r, z, n)`` for the GRU, ``(i, f, g, o)`` for the LSTM);
* ``X = u @ W_ih^T + b_ih`` of every step is formed by the caller in one
  product, ``(T, N, G*H)``; the kernels do only what depends on ``h_{t-1}``;
* every array time-first, C-contiguous, one dtype (float32 is computed in
  float32); inputs are never written.

``forward`` returns every state ``Hs`` ``(T, N, H)`` and ``Z`` ``(T, N, K)``,
what ``backward`` needs besides: nothing for an RNN (``K = 0``),
``[r, z, n, gh_n]`` for a GRU (``K = 4H``; ``gh_n`` is the n-chunk of
``h_{t-1} W_hh^T + b_hh`` before ``r`` multiplies it), ``[i, f, g, o, c_t]``
for an LSTM (``K = 5H``). Non-finite states are not raised here: the caller
checks ``Hs`` and names the step.

>>> import numpy as np
>>> from chainprod.kernels.recurrent import get_recurrent_kernels
>>> k = get_recurrent_kernels("numpy")
>>> X, W, b, h0 = np.ones((3, 1, 2)), 0.5 * np.eye(2), np.zeros(2), np.zeros((1, 2))
>>> Hs, Z = k.forward("rnn_tanh", X, W, b, h0, None)
>>> Hs[:, 0, 0].round(3).tolist()
[0.762, 0.881, 0.894]
"""

from __future__ import annotations

import numpy as np

__all__ = ["CELLS", "GATES", "forward", "backward", "out_arrays", "saved_width"]

#: cell name -> number of gates G (X has G*H columns, W_hh has G*H rows)
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
CELLS = tuple(GATES)


def saved_width(cell, H):
    """``K``: the width of a row of ``Z``, what ``forward`` keeps for ``backward`` (module docstring)."""
    return {"gru": 4 * H, "lstm": 5 * H}.get(cell, 0)


def out_arrays(out, shapes, dtype):
    """New arrays of ``shapes``, or the given ``out`` arrays once checked (C-contiguous, those shapes, ``dtype``)."""
    if out is None:
        return tuple(np.empty(shape, dtype) for shape in shapes)
    for k, (a, shape) in enumerate(zip(out, shapes)):
        if not (isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
                and a.flags.writeable):
            raise ValueError(f"out[{k}] must be a writeable C-contiguous {np.dtype(dtype)} array of shape {shape}; "
                             f"got {getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return tuple(out)


def _sigmoid(a):
    # exp(-a) overflows to inf for a very negative a, and 1 / (1 + inf) = 0 is the right limit
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-a))


def _check_cell(cell):
    if cell not in GATES:
        raise ValueError(f"cell: unknown {cell!r}; use one of {list(CELLS)}")


def forward(cell, X, W_hh, b_hh, h0, c0, out=None):
    """Every state of one recurrent layer from its input projections.

    Parameters
    ----------
    cell : {"rnn_tanh", "rnn_relu", "gru", "lstm"}
    X : ndarray, (T, N, G*H)
        The input projections ``u_t W_ih^T + b_ih`` of every step.
    W_hh : ndarray, (G*H, H)
    b_hh : ndarray, (G*H,)
        Zeros for a model without biases.
    h0 : ndarray, (N, H)
    c0 : ndarray (N, H) or None
        The initial cell state, for ``"lstm"`` only.
    out : pair of ndarray, optional
        ``(Hs, Z)`` to write into (C-contiguous, the shapes and dtype
        returned); new arrays by default.

    Returns
    -------
    Hs : ndarray, (T, N, H)
        Every state ``h_t`` (torch's ``output``).
    Z : ndarray, (T, N, K)
        What :func:`backward` needs besides ``Hs`` (module docstring).
    """
    _check_cell(cell)
    T, N, _ = X.shape
    H = W_hh.shape[1]
    K = saved_width(cell, H)
    Hs, Z = out_arrays(out, ((T, N, H), (T, N, K)), X.dtype)
    h, c = h0, c0
    # a relu state may overflow: the caller reports it with its step, so no warning here
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(T):
            gh = h @ W_hh.T + b_hh  # (N, G*H): the only part that waits for h_{t-1}
            if cell == "rnn_tanh":
                h = np.tanh(X[t] + gh)
            elif cell == "rnn_relu":
                h = np.maximum(X[t] + gh, 0)
            elif cell == "gru":
                r = _sigmoid(X[t, :, :H] + gh[:, :H])
                z = _sigmoid(X[t, :, H:2 * H] + gh[:, H:2 * H])
                n = np.tanh(X[t, :, 2 * H:] + r * gh[:, 2 * H:])
                h = (1 - z) * n + z * h
                Z[t] = np.concatenate([r, z, n, gh[:, 2 * H:]], axis=1)
            else:
                a = X[t] + gh
                i, f = _sigmoid(a[:, :H]), _sigmoid(a[:, H:2 * H])
                g, o = np.tanh(a[:, 2 * H:3 * H]), _sigmoid(a[:, 3 * H:])
                c = f * c + i * g
                h = o * np.tanh(c)
                Z[t] = np.concatenate([i, f, g, o, c], axis=1)
            Hs[t] = h
    return Hs, Z


def backward(cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs, dhT=None, dcT=None, out=None):
    """Backprop through time of one recurrent layer: the plain loop from the last step to the first.

    Parameters
    ----------
    cell, X, W_hh, b_hh, h0, c0
        As given to :func:`forward`.
    Hs, Z
        What :func:`forward` returned.
    dHs : ndarray, (T, N, H)
        ``dloss/dh_t`` from the loss terms on every output (the direct
        terms only).
    dhT, dcT : ndarray (N, H), optional
        The adjoint arriving at the last state ``h_{T-1}`` (and
        ``c_{T-1}``) from later in time, for a time chunk that is not the
        last one; zeros by default.
    out : ndarray, optional
        ``(T, N, G*H)``, C-contiguous, in ``X``'s dtype: ``dX`` is written
        there (a new array by default).

    Returns
    -------
    dX : ndarray, (T, N, G*H)
        ``dloss/dX_t``; the caller forms ``dW_ih``, ``db_ih`` and ``du``.
    dW_hh : ndarray, (G*H, H)
    db_hh : ndarray, (G*H,)
        Summed over time and batch.
    dh0 : ndarray, (N, H)
    dc0 : ndarray (N, H) or None
        ``"lstm"`` only.
    """
    _check_cell(cell)
    T, N, GH = X.shape
    H = W_hh.shape[1]
    dt = X.dtype
    (dX,) = out_arrays(None if out is None else (out,), ((T, N, GH),), dt)
    dW = np.zeros((GH, H), dt)
    db = np.zeros(GH, dt)
    # the adjoint of h_t (and c_t) arriving from step t + 1
    dh = np.zeros((N, H), dt) if dhT is None else np.array(dhT, dt, copy=True)
    dc = None
    if cell == "lstm":
        dc = np.zeros((N, H), dt) if dcT is None else np.array(dcT, dt, copy=True)
    for t in range(T - 1, -1, -1):
        dh = dh + dHs[t]
        h_prev = Hs[t - 1] if t > 0 else h0
        if cell == "rnn_tanh":
            da = dh * (1 - Hs[t] * Hs[t])
            dgh = da
        elif cell == "rnn_relu":
            da = dh * (Hs[t] > 0)  # relu'(0) = 0, as torch takes it
            dgh = da
        elif cell == "gru":
            r, z, n, ghn = Z[t, :, :H], Z[t, :, H:2 * H], Z[t, :, 2 * H:3 * H], Z[t, :, 3 * H:]
            dan = dh * (1 - z) * (1 - n * n)
            dar = dan * ghn * r * (1 - r)
            daz = dh * (h_prev - n) * z * (1 - z)
            da = np.concatenate([dar, daz, dan], axis=1)
            # r multiplies the n-chunk of h_{t-1} W_hh^T + b_hh, not the n-chunk of X
            dgh = np.concatenate([dar, daz, dan * r], axis=1)
        else:
            i, f, g, o, c = (Z[t, :, k * H:(k + 1) * H] for k in range(5))
            c_prev = Z[t - 1, :, 4 * H:] if t > 0 else c0
            tc = np.tanh(c)
            dc = dc + dh * o * (1 - tc * tc)  # c_t reaches the loss through h_t too
            da = np.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                                 dh * tc * o * (1 - o)], axis=1)
            dgh = da
            dc = dc * f  # the adjoint of c_{t-1}
        dX[t] = da
        dW += dgh.T @ h_prev
        db += dgh.sum(axis=0)
        dh_prev = dgh @ W_hh
        if cell == "gru":
            dh_prev += dh * z  # the direct path h_t = ... + z * h_{t-1}
        dh = dh_prev
    return dX, dW, db, dh, dc
