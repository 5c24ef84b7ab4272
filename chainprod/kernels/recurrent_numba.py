"""Compiled recurrent kernels (numba): the sequential part of RNN, GRU and LSTM layers, one loop over all steps.

Same functions, signatures and meanings as the reference
:mod:`chainprod.kernels.recurrent_numpy` (its docstring is the contract:
the equations, torch's gate order, what ``Z`` holds). Importing this module
imports numba; :func:`chainprod.kernels.recurrent.get_recurrent_kernels`
does that only when ``"numba"`` is chosen.

How the kernels are built:

- **One compiled loop over every step** per call (:mod:`.recurrent_numba_loops`):
  the Python functions here only check dtypes and shapes, allocate the
  outputs and choose the paths below. No allocation and no Python per step.
- **Per-step products, loops or BLAS by size.** Each step multiplies the
  ``N`` states by ``W_hh`` (forward: ``h W_hh^T``; backward: the adjoint
  ``dG W_hh``). Small ones are fused loops whose inner loop runs along a
  contiguous row (``W_hh^T``'s, copied once per call, in the forward pass;
  ``W_hh``'s own in the backward one), so it vectorises without
  reassociating a sum; from :data:`STEP_BLAS_MIN` multiply-adds per step on
  (:data:`STEP_BLAS_MIN_BATCH` from two samples on),
  one ``gemm`` per step (:mod:`.numba_blas`, on one BLAS thread).
- **dW_hh after the loop.** ``dW_hh = sum_t dG_t^T h_{t-1}`` is accumulated
  by the loop (fused with the adjoint's product) while a step is small, and
  from :data:`DW_BLAS_MIN` multiply-adds per step on it is one product over
  all ``T * N`` rows once the loop is done: the gate gradients are ``dX``
  itself for the RNN and the LSTM, and for the GRU ``dX`` with its
  ``n``-chunk scaled by ``r``, which the loop keeps in a ``(T, N, H)`` array.
- Activations are vectorisable: in float64 the ``tanh`` and ``sigmoid`` of
  :mod:`.numba_math` / :mod:`.numba_rules`, in float32 shorter ones of
  :mod:`.recurrent_numba_loops` (a degree-7 ``exp``, int32 exponents).
  Every constant takes the array's type, so float32 is computed in float32
  (``sgemm`` included).
- Threads: one. A step is microseconds of work; the caller's threads are
  for the products around the kernels (``X``, ``dW_ih``, ``du``), which
  ``dW_hh``'s product after the loop joins (numpy's BLAS, on its threads).
- ``error_model="numpy"`` and ``fastmath=False`` (IEEE arithmetic in the
  written order), ``cache=True``: compiled once per machine and dtype.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import numba_blas
from .recurrent_numba_loops import backward_loop, forward_loop, padded

__all__ = ["CELLS", "DW_BLAS_MIN", "GATES", "STEP_BLAS_MIN", "STEP_BLAS_MIN_BATCH", "backward", "forward", "precompile"]

NAME = "numba"

#: gates per cell (rows of ``W_hh`` are ``G * H``), torch's order
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
CELLS = tuple(GATES)
_CODES = {"rnn_tanh": 0, "rnn_relu": 1, "gru": 2, "lstm": 3}

#: multiply-adds per step (``N * G * H * H``) from which a step's product with ``W_hh`` is one BLAS call,
#: for one sample (``N = 1``: a matrix-vector product). Measured per step, float32, loops / BLAS: the
#: LSTM at H=20 (1600) 0.56 / 0.83 us forward, at H=32 (4096) 0.78 / 0.74; the RNN at H=64 (4096)
#: 0.53 / 0.42
STEP_BLAS_MIN = 3000
#: the same from two samples on (a matrix product), where BLAS won from the smallest size measured:
#: the RNN at N=4, H=8 (256) 0.21 / 0.16 us forward, 0.45 / 0.39 backward; the LSTM at N=16, H=20 5.9 / 4.3
STEP_BLAS_MIN_BATCH = 256
#: multiply-adds per step from which ``dW_hh`` is one BLAS product after the loop instead of being
#: accumulated in it: the product after the loop was as fast or faster from 64 on (backward per step,
#: the LSTM at N=1, H=20: 0.92 us accumulated, 0.63 after; at N=16, H=64: 73.8 / 63.6 with loops)
DW_BLAS_MIN = 256


def _fail(msg):
    raise ValueError(msg)


def _cell(cell):
    if cell not in _CODES:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}; got {cell!r}")
    return GATES[cell]


def _array(name, a, shape, dtype):
    """``a`` as a C-contiguous array of ``shape`` and ``dtype`` (no copy when it is one already)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array; got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; every array must have X's dtype {dtype}")
    if a.shape != shape:
        _fail(f"{name} has shape {a.shape}; expected {shape}")
    return np.ascontiguousarray(a)


def _inputs(cell, X, W_hh, b_hh, h0, c0):
    """Checked, C-contiguous ``X, W_hh, b_hh`` and *copies* of ``h0``, ``c0`` (the loops' starting states)."""
    G = _cell(cell)
    if not isinstance(X, np.ndarray) or X.ndim != 3:
        raise ValueError(f"X must be a (T, N, G*H) array; got {getattr(X, 'shape', type(X).__name__)}")
    dtype = X.dtype
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"X has dtype {dtype}; the kernels take float32 or float64")
    T, N, GH = X.shape
    if not isinstance(W_hh, np.ndarray) or W_hh.ndim != 2:
        raise ValueError(f"W_hh must be a (G*H, H) array; got {getattr(W_hh, 'shape', type(W_hh).__name__)}")
    H = W_hh.shape[1]
    if GH != G * H:
        _fail(f"cell {cell!r} has {G} gate(s): X's last axis must be {G} * H = {G * H} (H = {H} from W_hh "
              f"{W_hh.shape}); got X {X.shape}")
    X = _array("X", X, (T, N, GH), dtype)
    W_hh = _array("W_hh", W_hh, (GH, H), dtype)
    b_hh = _array("b_hh", b_hh, (GH,), dtype)
    h0 = np.array(_array("h0", h0, (N, H), dtype))
    if cell == "lstm":
        c0 = np.array(_array("c0", c0, (N, H), dtype))
    elif c0 is not None:
        _fail(f"c0 is only for 'lstm'; got an array of shape {getattr(c0, 'shape', None)} for {cell!r}")
    else:
        c0 = np.zeros((0, H), dtype)
    return G, T, N, H, X, W_hh, b_hh, h0, c0


def _one_blas_thread(step_macs, blas):
    # per-step products: BLAS's own threads cost more than they save on them (and must not oversubscribe
    # the threads the caller gave); small products run on one BLAS thread anyway
    if not blas or step_macs < numba_blas.BLAS_THREADS_MIN:
        return contextlib.nullcontext()
    return numba_blas.one_blas_thread()


def _step_blas(N, GH, H):
    return N * GH * H >= (STEP_BLAS_MIN if N == 1 else STEP_BLAS_MIN_BATCH) and numba_blas.blas_available()


def forward(cell, X, W_hh, b_hh, h0, c0):
    """Every state ``Hs`` ``(T, N, H)`` and what backward needs ``Z`` ``(T, N, K)``: ``(Hs, Z)``.

    Contract: :func:`chainprod.kernels.recurrent_numpy.forward`.
    """
    G, T, N, H, X, W_hh, b_hh, h0, c0 = _inputs(cell, X, W_hh, b_hh, h0, c0)
    K = {1: 0, 3: 4 * H, 4: 5 * H}[G]
    Hs = np.empty((T, N, H), X.dtype)
    Z = np.empty((T, N, K), X.dtype)
    blas = _step_blas(N, G * H, H)
    WT = np.ascontiguousarray(W_hh.T)  # the loops' rows: a step adds h[k] * W_hh[:, k] to the gates
    work = np.zeros(N * G * H + 2 * padded(N * H), X.dtype)  # zeros: the padding is computed, never used
    coef = np.ones((G, H), X.dtype)
    if cell == "lstm":
        coef[2] = 2  # the g-gate's tanh(v) = 2 sigmoid(2 v) - 1, in the sigmoid gates' loop
    with _one_blas_thread(N * G * H * H, blas):
        forward_loop(_CODES[cell], X.reshape(-1), W_hh.reshape(-1), WT.reshape(-1), b_hh, h0.reshape(-1),
                     c0.reshape(-1), Hs.reshape(-1), Z.reshape(-1), work, coef.reshape(-1), T, N, H, blas)
    return Hs, Z


def backward(cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs, dhT=None, dcT=None):
    """Gradients ``(dX, dW_hh, db_hh, dh0, dc0)`` by backprop through time.

    Contract: :func:`chainprod.kernels.recurrent_numpy.backward`.
    """
    G, T, N, H, X, W_hh, b_hh, h0, c0 = _inputs(cell, X, W_hh, b_hh, h0, c0)
    dtype, GH = X.dtype, G * H
    K = {1: 0, 3: 4 * H, 4: 5 * H}[G]
    Hs = _array("Hs", Hs, (T, N, H), dtype)
    Z = _array("Z", Z, (T, N, K), dtype)
    dHs = _array("dHs", dHs, (T, N, H), dtype)
    # the adjoints carried back through time start at dhT / dcT and end as dh0 / dc0: fresh arrays
    dh = np.zeros((N, H), dtype) if dhT is None else np.array(_array("dhT", dhT, (N, H), dtype))
    lstm = cell == "lstm"
    if lstm:
        dc = np.zeros((N, H), dtype) if dcT is None else np.array(_array("dcT", dcT, (N, H), dtype))
    elif dcT is not None:
        _fail(f"dcT is only for 'lstm'; got an array of shape {getattr(dcT, 'shape', None)} for {cell!r}")
    else:
        dc = np.zeros((0, H), dtype)
    blas = _step_blas(N, GH, H)
    blas_dw = N * GH * H >= DW_BLAS_MIN and T > 0 and numba_blas.blas_available()
    dX = np.empty((T, N, GH), dtype)
    dW = np.zeros((GH, H), dtype)
    db = np.zeros(GH, dtype)
    dG = np.empty(N * GH, dtype)  # one step's gate gradients (the GRU's differ from dX in the n-chunk)
    dGn = np.empty((T, N, H) if blas_dw and G == 3 else (0, 0, H), dtype)  # the GRU's r * dn, for dW_hh
    with _one_blas_thread(N * GH * H, blas):
        backward_loop(_CODES[cell], W_hh.reshape(-1), h0.reshape(-1), c0.reshape(-1), Hs.reshape(-1),
                      Z.reshape(-1), dHs.reshape(-1), dX.reshape(-1), dW.reshape(-1), db, dh.reshape(-1),
                      dc.reshape(-1), dG, dGn.reshape(-1), np.zeros(padded(N * H), dtype), T, N, H, blas,
                      blas_dw)
    if blas_dw:
        _dw_after(G, T, N, H, dX, dGn, Hs, h0, dW)
    return dX, dW, db, dh, (dc if lstm else None)


def _dw_after(G, T, N, H, dX, dGn, Hs, h0, dW):
    """``dW += sum_t dG_t^T h_{t-1}`` as products over all rows (``h_{-1} = h0``), in numpy's BLAS.

    numpy's BLAS, on the threads the caller gave it, not the compiled kernels' (scipy's library): the
    caller's own products (the input projection, ``dW_ih``) run in numpy's, and with these products in
    scipy's the caller's next ones were measured at 6-7 ms instead of 0.1-0.2 ms (a T = 1000 step LSTM
    at H = 20, on 2 loaded cores; both libraries' threads then compete for the cores).
    """
    GH = G * H
    m = GH if G != 3 else 2 * H  # the GRU's r- and z-chunks are dX's; its n-chunk (scaled by r) is dGn
    x = dX.reshape(T * N, GH)[:, :m]
    hs = Hs.reshape(T * N, H)
    dW[:m] += x[N:].T @ hs[:-N] + x[:N].T @ h0
    if G == 3:
        gn = dGn.reshape(T * N, H)
        dW[m:] += gn[N:].T @ hs[:-N] + gn[:N].T @ h0


def precompile(dtypes=(np.float32, np.float64)):
    """Compile (or load from the on-disk cache) both loops, every path, for ``dtypes``; returns the seconds."""
    import time

    global STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN
    t0 = time.perf_counter()
    saved = STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN
    try:
        for dt in dtypes:
            for threshold in (1 << 62, 0):  # every product a loop, then every one in BLAS
                STEP_BLAS_MIN = STEP_BLAS_MIN_BATCH = DW_BLAS_MIN = threshold
                for cell, G in GATES.items():
                    X = np.zeros((2, 1, G), dt)
                    W, b, h = np.zeros((G, 1), dt), np.zeros(G, dt), np.zeros((1, 1), dt)
                    c = h if cell == "lstm" else None
                    Hs, Z = forward(cell, X, W, b, h, c)
                    backward(cell, X, W, b, h, c, Hs, Z, Hs)
    finally:
        STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN = saved
    return time.perf_counter() - t0
