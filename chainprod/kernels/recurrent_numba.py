"""Compiled recurrent kernels (numba): the sequential part of RNN, GRU and LSTM layers, one loop over all steps.

Same functions, signatures and meanings as the reference
:mod:`chainprod.kernels.recurrent_numpy` (its docstring is the contract:
the equations, torch's gate order, what ``Z`` holds). Importing this module
imports numba; :func:`chainprod.kernels.recurrent.get_recurrent_kernels`
does that only when ``"numba"`` is chosen.

How the kernels are built:

- **One compiled loop over every step** per call (:mod:`.recurrent_numba_loops`):
  the Python functions here only check dtypes and shapes, allocate the
  outputs and choose the paths below; one compiled call
  (:func:`~.recurrent_numba_loops.forward_call`, ``backward_call``) lays out
  ``W_hh`` for the products and runs the loop (the same layout made in
  numpy, a call's fixed cost was 29 against 10 us forward and 22 against
  11 us backward at ``H = 8``). No allocation and no Python per step.
- **Per-step products in registers.** Each step multiplies the ``N``
  states by ``W_hh`` (forward: ``h W_hh^T``; backward: the adjoint
  ``dG W_hh``): :func:`.recurrent_numba_simd.rows_times` keeps up to eight
  vectors of sums in registers over a product (``W_hh^T`` and ``W_hh`` are
  copied once per call with rows padded to whole vectors). From the
  crossover ``chainprod calibrate`` measures (forms ``"step"`` for one
  sample, ``"step_batch"`` from two on, :mod:`.crossover`) one ``gemm`` per
  step instead (:mod:`.numba_blas`, on one BLAS thread). Without a
  calibration, never: on the development machine BLAS took 1.0-6.0x the
  loops' time at one sample and 0.84-2.9x in a batch (the LSTM at N = 16,
  H = 64, float32: 28.5 against 22.9 us a step's forward and backward; at
  N = 1 13.5 against 2.8), where an earlier host had BLAS winning batched
  steps (25.8 against 35.6 ms at N = 16, H = 64).
- **dW_hh after the loop.** ``dW_hh = sum_t dG_t^T h_{t-1}`` is one product
  over all ``T * N`` rows once the loop is done (numpy's BLAS) from
  :data:`DW_BLAS_MIN` multiply-adds per call on, and accumulated step by
  step below: the gate gradients are ``dX`` itself for the RNN and the
  LSTM, and for the GRU ``dX`` with its ``n``-chunk scaled by ``r``, which
  the loop keeps in a ``(T, N, H)`` array. ``db_hh`` is summed in float64
  (a sum of ``T N`` terms; in float32 step by step it drifted by 4e-6).
- Activations are vectorisable (:mod:`.recurrent_numba_act`): in float64
  the ``tanh`` and ``sigmoid`` of :mod:`.numba_math` / :mod:`.numba_rules`,
  in float32 a rational ``tanh`` (no ``exp``) and ``sigmoid`` from it.
  Every constant takes the array's type, so float32 is computed in float32.
- **Threads: groups of the batch, when asked.** Samples never meet in a
  recurrence, so from :data:`PARALLEL_MIN_WORK` multiply-adds per call
  (off by default: measured slower on a shared 2-core machine) the batch
  is cut into one contiguous group per numba thread
  (``numba.set_num_threads``), each running every step alone: no
  synchronisation per step, which a step of microseconds could not pay
  for. Otherwise one thread; the caller's threads serve the products
  around the kernels (``X``, ``dW_ih``) and ``dW_hh``'s after the loop.
- ``error_model="numpy"``, ``boundscheck=False`` and ``fastmath=False``
  (IEEE arithmetic in the written order), ``cache=True``: compiled once per
  machine and dtype. The products with ``W_hh`` fuse each multiply-add where
  the machine can (:func:`~.recurrent_numba_simd.vmuladd`); the activations
  do not.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np

from . import crossover, numba_blas
from .recurrent_numba_loops import backward_call, forward_call
from .recurrent_numpy import out_arrays, saved_width

__all__ = ["CELLS", "DW_BLAS_MIN", "GATES", "PARALLEL_MIN_WORK", "STEP_BLAS_MIN", "STEP_BLAS_MIN_BATCH", "backward",
           "forward", "precompile"]

NAME = "numba"

#: gates per cell (rows of ``W_hh`` are ``G * H``), torch's order
GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
CELLS = tuple(GATES)
_CODES = {"rnn_tanh": 0, "rnn_relu": 1, "gru": 2, "lstm": 3}

#: multiply-adds per step (``N * G * H * H``) from which a step's product with ``W_hh`` is one BLAS call,
#: for one sample (``N = 1``: a matrix-vector product); below it, the register-blocked products of
#: :mod:`.recurrent_numba_simd`. None: the crossover ``chainprod calibrate`` measured on this machine
#: (form ``"step"`` of :mod:`.crossover`, or its default). A number overrides it (tests, precompile).
STEP_BLAS_MIN = None
#: the same from two samples on (a matrix product; form ``"step_batch"``)
STEP_BLAS_MIN_BATCH = None
#: multiply-adds of the whole call (``T N G H^2``) from which ``dW_hh`` is one BLAS product after the
#: loop instead of being accumulated in it, step by step (backward per step, T = 1000, the tanh RNN at
#: N=1, H=8: 0.27 us accumulated, 0.22 after; the LSTM at N=1, H=20: 0.91 / 0.53)
DW_BLAS_MIN = 1 << 15
#: multiply-adds of a whole call's products with ``W_hh`` (``T N G H^2``) from which the batch is cut into
#: groups, one per numba thread (each group runs every step alone: no synchronisation per step). Off by
#: default: on the 2-core development VM, shared with other jobs, two threads never ran faster than one (a
#: trivially parallel numba loop: 50 ms on one thread, 50-73 ms on two; a training step of the LSTM at
#: N=16, H=20, T=1000, float32, P=2: 73.7 ms cut in two groups, 35.1 ms for the one-thread kernels before
#: the register-blocked products, in the same run). Set it (1 << 18, say) where numba's threads have
#: cores of their own
PARALLEL_MIN_WORK = 1 << 62


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


def _chunks(T, N, GH, H):
    """Groups of the batch to run on numba's threads (1: one loop on the caller's thread).

    From :data:`PARALLEL_MIN_WORK` multiply-adds per call of the product with
    ``W_hh``, at most one group per thread and per sample.
    """
    if N < 2 or T * N * GH * H < PARALLEL_MIN_WORK:
        return 1
    return max(1, min(numba.get_num_threads(), N))


def _step_blas(N, GH, H, dtype):
    limit = STEP_BLAS_MIN if N == 1 else STEP_BLAS_MIN_BATCH
    if limit is None:
        limit = crossover.blas_crossover(dtype, "step" if N == 1 else "step_batch")
    return N * GH * H >= limit and numba_blas.blas_available()


def forward(cell, X, W_hh, b_hh, h0, c0, out=None):
    """Every state ``Hs`` ``(T, N, H)`` and what backward needs ``Z`` ``(T, N, K)``: ``(Hs, Z)``.

    Contract: :func:`chainprod.kernels.recurrent_numpy.forward`.
    """
    G, T, N, H, X, W_hh, b_hh, h0, c0 = _inputs(cell, X, W_hh, b_hh, h0, c0)
    K = saved_width(cell, H)
    Hs, Z = out_arrays(out, ((T, N, H), (T, N, K)), X.dtype)
    nchunks = _chunks(T, N, G * H, H)
    blas = _step_blas(N // nchunks, G * H, H, X.dtype)
    with _one_blas_thread(N * G * H * H, blas):
        forward_call(_CODES[cell], X, W_hh, b_hh, h0, c0, Hs, Z, nchunks, blas)
    return Hs, Z


def backward(cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs, dhT=None, dcT=None, out=None):
    """Gradients ``(dX, dW_hh, db_hh, dh0, dc0)`` by backprop through time.

    Contract: :func:`chainprod.kernels.recurrent_numpy.backward`.
    """
    G, T, N, H, X, W_hh, b_hh, h0, c0 = _inputs(cell, X, W_hh, b_hh, h0, c0)
    dtype, GH = X.dtype, G * H
    K = saved_width(cell, H)
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
    nchunks = _chunks(T, N, GH, H)
    blas = _step_blas(N // nchunks, GH, H, dtype)
    blas_dw = T * N * GH * H >= DW_BLAS_MIN and T > 0 and numba_blas.blas_available()
    (dX,) = out_arrays(None if out is None else (out,), ((T, N, GH),), dtype)
    dGn = np.empty((T, N, H) if blas_dw and G == 3 else (0, 0, H), dtype)  # the GRU's r * dn, for dW_hh
    with _one_blas_thread(N * GH * H, blas):
        dW, db = backward_call(_CODES[cell], W_hh, h0, c0, Hs, Z, dHs, dX, dh, dc, dGn, nchunks, blas, blas_dw)
    if blas_dw:
        _dw_after(G, T, N, H, dX, dGn, Hs, h0, dW)
    return dX, dW, db.astype(dtype), dh, (dc if lstm else None)


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


def step_seconds(cell, H, N, dtype, limit, repeats=5, T=200):
    """Best seconds per step of ``forward`` then ``backward`` with the step's products sent to BLAS from ``limit``.

    ``limit`` stands for both step crossovers during the call (``0``: BLAS;
    :data:`~.crossover.NEVER`: the loops); what ``chainprod calibrate``
    times on a grid of cells, widths and batches.
    """
    G = GATES[cell]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((T, N, G * H)).astype(dtype)
    W = (rng.standard_normal((G * H, H)) / np.sqrt(H)).astype(dtype)
    b, h = np.zeros(G * H, dtype), np.zeros((N, H), dtype)
    c = h if cell == "lstm" else None

    def run(reps):
        for _ in range(reps):
            Hs, Z = forward(cell, X, W, b, h, c)
            backward(cell, X, W, b, h, c, Hs, Z, Hs)

    with crossover.using_crossover({np.dtype(dtype).name: {"step": limit, "step_batch": limit}}):
        return crossover.best_seconds_per_rep(run, repeats) / T


def precompile(dtypes=(np.float32, np.float64)):
    """Compile (or load from the on-disk cache) both loops, every path, for ``dtypes``; returns the seconds."""
    import time

    global STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN, PARALLEL_MIN_WORK
    t0 = time.perf_counter()
    saved = STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN, PARALLEL_MIN_WORK
    try:
        for dt in dtypes:
            # every product a loop, then every one in BLAS; one group of the batch, then one per thread
            for threshold, parallel in ((1 << 62, 1 << 62), (0, 1 << 62), (1 << 62, 0), (0, 0)):
                STEP_BLAS_MIN = STEP_BLAS_MIN_BATCH = DW_BLAS_MIN = threshold
                PARALLEL_MIN_WORK = parallel
                for cell, G in GATES.items():
                    X = np.zeros((2, 2, G), dt)
                    W, b, h = np.zeros((G, 1), dt), np.zeros(G, dt), np.zeros((2, 1), dt)
                    c = h if cell == "lstm" else None
                    Hs, Z = forward(cell, X, W, b, h, c)
                    backward(cell, X, W, b, h, c, Hs, Z, Hs)
    finally:
        STEP_BLAS_MIN, STEP_BLAS_MIN_BATCH, DW_BLAS_MIN, PARALLEL_MIN_WORK = saved
    return time.perf_counter() - t0
