"""Compiled kernels (numba): a whole chain in one call, each product as a fused loop or in BLAS by its size.

Same functions, signatures and meanings as the reference
:mod:`chainprod.kernels.numpy_kernels` (read the contracts there). Importing
this module imports numba; :func:`chainprod.kernels.get_kernels` does that
only when ``"numba"`` is chosen.

How the kernels are built:

- One loop over layers reads the packed tables (kind, activation code,
  widths, offsets) and runs each layer's steps (:mod:`.numba_layers`).
- **Loops or BLAS, by work.** Every dense product (a layer's forward step
  ``x W^T``, backprop's next row ``delta W``, the parameter VJP
  ``delta^T x``, a step of the Jacobian product) is formed by a plain loop
  straight on ``theta`` when it has fewer multiply-adds than the crossover,
  and by one BLAS ``gemm`` on its contiguous blocks from there on
  (:mod:`.numba_blas`; at batch ``N > 1`` backprop's row is an ``N x w``
  matrix and each step a matrix product). The crossover is measured by
  ``chainprod calibrate`` on the machine and read from the saved
  calibration (:mod:`.crossover`, with a measured default). Batch-1 chains
  of width 8 stay in the loops: there a BLAS call costs more than the
  arithmetic.
- **One branch per layer.** Each activation and its derivative run as a
  loop specialised to that activation (:mod:`.numba_rules`), so a chain
  whose activations change from layer to layer costs what its uniform parts
  cost; ``exp`` and ``tanh`` are vectorisable ones (:mod:`.numba_math`).
- Non-finite detection costs a subtraction and a select per output: ``chk
  += 1 if y - y != 0`` counts the outputs that are NaN or infinite (exact,
  never a false alarm, no second pass over memory, and an integer sum, so
  the loop still vectorises).
- ``error_model="numpy"``: a division is IEEE arithmetic, not a check that
  could raise (which would keep LLVM from vectorising the loop around it).
- One compiled loop per computation: :func:`backprop` and
  :func:`backprop_with_row` run the same loop, with the same loop-or-BLAS
  choices (the latter also keeps the row leaving layer 0), so their
  gradients agree bit for bit.
- Parallelism only where the work is independent, on numba's threads
  only: the batch is cut into one chunk of samples per thread for the
  forward pass and backprop (each chunk runs through the whole chain;
  backprop sums per-chunk gradients at the end, so its last bits depend on
  the number of chunks), and :func:`param_grads` runs ``prange`` over
  layers. Small problems (``N * n_params < PARALLEL_MIN_WORK``, or
  ``BLAS_SPEEDUP`` times that in BLAS) stay serial: waking threads costs
  microseconds. BLAS runs on one thread inside every call whose products
  could make it start more (``threadpoolctl``): the kernels run on the
  threads they are given, and BLAS threads inside or beside numba's were
  measured 2-30x slower. The exception is a chain of wide layers
  (``BLAS_THREADS_WIDE``): its batch is not cut, and BLAS shares each
  product over the threads the batch would have used. Without ``threadpoolctl`` a call that would run
  BLAS on numba's threads runs serially, BLAS using its own threads.
  :func:`chunk_product` is one serial loop over samples.
- **float32 throughout**: every constant takes the array's type, BLAS runs
  ``sgemm``, nothing goes through float64. Against the float64 kernels on
  the same (rounded) inputs, float32 outputs and gradients agree to about
  ``1e-6`` of the largest entry (measured ``1e-7`` at width 8 to ``1.2e-6``
  at width 1024; the tests allow ``1e-5``); float64 agrees with the numpy
  reference to about ``1e-12`` (loops and BLAS sum in different orders).
- ``fastmath=False`` everywhere: IEEE arithmetic in the written order.
- ``cache=True``: compiled once per machine and dtype, then loaded from
  ``__pycache__``. :func:`precompile` compiles both dtypes up front.
"""

from __future__ import annotations

import contextlib
import threading

import numba
import numpy as np

from .._caches import register_cache
from . import checks, crossover, numba_blas
from . import numba_chain as loops

__all__ = ["forward", "backprop", "backprop_with_row", "chunk_product", "param_grads", "derivatives", "all_finite",
           "serial_plan", "precompile", "PARALLEL_MIN_WORK", "BLAS_SPEEDUP"]

NAME = "numba"

#: Below this many multiply-adds (``N * n_params``) a call runs on one thread.
PARALLEL_MIN_WORK = 1 << 18
#: About how much faster a multiply-add is in BLAS than in the loops at the sizes where BLAS is
#: chosen (measured 5-15x): a call in BLAS needs this many times ``PARALLEL_MIN_WORK`` to go parallel
BLAS_SPEEDUP = 8
#: From this many multiply-adds per sample in a chain's largest layer (``d_in * d_out``), a batch that
#: would be cut over the threads runs serially instead, BLAS sharing each product over those threads:
#: one chunk per thread reads every weight matrix whole and sums a full gradient of its own, which
#: past a few MB per layer cost more than BLAS's own split (float32, 2 threads, a training step of
#: an MLP: widths 768-2048 6-18 % faster serially, widths 256-512 as fast or 10-25 % slower; measured)
BLAS_THREADS_WIDE = 1 << 19

# -- public functions (contracts: chainprod.kernels.numpy_kernels) --------------------------------
def _crossover(pc, N):
    """Multiply-adds from which a product of this chain's dtype over ``N`` rows goes to BLAS (never without BLAS).

    One sample's products (matrix-vector, outer) have their own crossover
    (form ``"row"``): measured apart from a batch's, they stayed faster as
    loops at widths where a batch's products were already faster in BLAS.
    """
    if not numba_blas.blas_available():
        return crossover.NEVER
    return crossover.blas_crossover(pc.dtype, "row" if N == 1 else "rows")


def _chunks(pc, N, cross):
    """Threads to cut the batch over, or 1 for serial.

    A call whose products go to BLAS needs :data:`BLAS_SPEEDUP` times more
    multiply-adds to pay for waking the threads: each one costs that much less.
    """
    if N < 2 or N * pc.n_params < PARALLEL_MIN_WORK:
        return 1
    T = min(numba.get_num_threads(), N)
    if pc.max_product * (N // T) >= cross and N * pc.n_params < PARALLEL_MIN_WORK * BLAS_SPEEDUP:
        return 1
    return T


def _split(pc, N, cross):
    """``(chunks, blas)``: threads to cut the batch over, and threads BLAS may use inside the call.

    Wide layers (:data:`BLAS_THREADS_WIDE`) run serially, BLAS on the threads the batch would have
    been cut over; otherwise BLAS runs on one thread (see :func:`_blas_threads`).
    """
    T = _chunks(pc, N, cross)
    if T > 1 and pc.max_product >= BLAS_THREADS_WIDE and cross != crossover.NEVER:
        return 1, T
    return T, 1


#: the context of a call whose products stay below BLAS: nothing to limit (reusable, made once)
_UNLIMITED = contextlib.nullcontext(True)


def _blas_threads(pc, rows, cross, threads=1):
    """The context a call runs in: BLAS on ``threads`` threads if the call's products (``rows`` high) reach it.

    One thread unless the call runs serially on wide layers (:func:`_split`).

    The kernels run on the threads they are given (numba's; one for a serial
    call): BLAS starting threads of its own inside a parallel region
    oversubscribes the cores, and its threads, which keep spinning for a while
    after a call, slowed the next parallel region 2-3x (measured). Products
    below :data:`~.numba_blas.BLAS_THREADS_MIN` multiply-adds run on one BLAS
    thread anyway, and the limit (about 10 us) is not paid for them. The
    context yields False where BLAS cannot be limited: the caller then runs
    serially, BLAS using its own threads.
    """
    if cross == crossover.NEVER or pc.max_product * rows < max(cross, numba_blas.BLAS_THREADS_MIN):
        return _UNLIMITED
    return numba_blas.blas_threads(threads)


def serial_plan(pc, N):
    """``(loops, cross)`` when a batch of ``N`` runs forward and backprop serially with BLAS unlimited, else None.

    For :mod:`chainprod.quick`, which then calls the loops of
    :mod:`chainprod.kernels.numba_chain` itself: the same loops, crossover and
    policy as :func:`forward` and :func:`backprop`, without their per-call checks.
    """
    if N == 1:
        # One sample never splits: the answer depends on the chain and the crossover alone, and is kept
        # on the packed chain with the crossover state it was worked out under (0.6 us a call to work
        # out, 10 % of the short backward path on a 256-layer diagonal chain; measured).
        state = crossover.generation()
        got = pc.__dict__.get("_serial_one")
        if got is None or got[0] != state:
            got = pc.__dict__["_serial_one"] = (state, _serial_plan(pc, N))
        return got[1]
    return _serial_plan(pc, N)


def _serial_plan(pc, N):
    cross = _crossover(pc, N)
    if _chunks(pc, N, cross) == 1 and _blas_threads(pc, N, cross) is _UNLIMITED:
        return loops, cross
    return None


def forward(pc, x):
    """Compiled :func:`chainprod.kernels.numpy_kernels.forward`: ``(Y, bad)``."""
    pc = checks.packed(pc)
    x = checks.batch_input(pc, x)
    N = x.shape[0]
    Y = np.empty(pc.tape_size(N), pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, x.reshape(-1), Y, N)
    cross = _crossover(pc, N)
    nchunks, blas = _split(pc, N, cross)
    with _blas_threads(pc, N, cross, blas) as limited:
        if nchunks > 1 and limited:
            bad = loops.forward_chunks(*args, cross, nchunks)
        else:
            bad = loops.forward_rows(*args, 0, N, cross)
    return Y, int(bad)


def _backprop(pc, x, Y, cotangent, keep_row):
    pc, x, N, Y, cotangent = checks.backward_args(pc, x, Y, cotangent)
    grads = np.empty(pc.n_params, pc.dtype)
    row_in = np.empty(N * pc.width_in if keep_row else 0, pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, x.reshape(-1), Y,
            cotangent.reshape(-1), N, grads, row_in, pc.max_width, _crossover(pc, N))
    nchunks, blas = _split(pc, N, args[-1])
    with _blas_threads(pc, N, args[-1], blas) as limited:
        if nchunks > 1 and limited:
            bad = loops.backprop_chunks(*args, _scratch(nchunks - 1, pc.n_params, pc.dtype))
        else:
            bad = loops.backprop_serial(*args)
    return grads, row_in.reshape(N, pc.width_in) if keep_row else None, int(bad)


_SCRATCH = threading.local()


def _clear_scratch():
    _SCRATCH.__dict__.clear()


register_cache(_clear_scratch)


def _scratch(rows, n, dtype):
    """A ``(rows, n)`` work array, kept per Python thread and reused (``clear_caches`` releases it).

    Backprop's per-chunk gradients: fresh memory there is first touched by every thread at once,
    measured 18.7 ms against 13.2 ms reused (width 1024, batch 256, float32).
    """
    buf = _SCRATCH.__dict__.get(dtype)
    if buf is None or buf.size < rows * n:
        buf = _SCRATCH.__dict__[dtype] = np.empty(rows * n, dtype)
    return buf[:rows * n].reshape(rows, n)


def backprop(pc, x, Y, cotangent):
    """Compiled :func:`chainprod.kernels.numpy_kernels.backprop`: ``(grads, bad)``."""
    grads, _, bad = _backprop(pc, x, Y, cotangent, False)
    return grads, bad


def backprop_with_row(pc, x, Y, cotangent):
    """Compiled :func:`chainprod.kernels.numpy_kernels.backprop_with_row`: ``(grads, row_in, bad)``.

    The loop of :func:`backprop` (the same compiled function, the same batch
    chunks, the same loop-or-BLAS choices), so ``grads`` equal its gradients
    bit for bit.
    """
    return _backprop(pc, x, Y, cotangent, True)


def all_finite(a) -> bool:
    """Compiled :func:`chainprod.kernels.numpy_kernels.all_finite` (one pass, no temporaries: 2x faster)."""
    return loops.count_nonfinite(checks.flat_array(a)) == 0


def chunk_product(pc, Y, N):
    """Compiled :func:`chainprod.kernels.numpy_kernels.chunk_product`: ``T``, ``(N, d_out[L-1], d_in[0])``."""
    pc = checks.packed(pc)
    N = checks.batch_size(N)
    Y = checks.tape(pc, Y, N)
    T = np.empty(N * pc.width_out * pc.width_in, pc.dtype)
    cross = _crossover(pc, pc.width_out)  # each sample's product carries width_out rows
    with _blas_threads(pc, pc.width_out, cross):
        loops.product(pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, Y, N, T, pc.max_width, cross)
    return T.reshape(N, pc.width_out, pc.width_in)


def param_grads(pc, x, Y, V):
    """Compiled :func:`chainprod.kernels.numpy_kernels.param_grads` (``prange`` over layers)."""
    pc, x, N, Y, V = checks.backward_args(pc, x, Y, V, rows_are="V")
    grads = np.empty(pc.n_params, pc.dtype)
    cross = _crossover(pc, N)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, x.reshape(-1), Y, V, N, grads, pc.max_width,
            cross)
    nchunks = min(numba.get_num_threads(), pc.L)
    work = PARALLEL_MIN_WORK * (BLAS_SPEEDUP if pc.max_product * N >= cross else 1)
    with _blas_threads(pc, N, cross) as limited:
        if nchunks > 1 and N * pc.n_params >= work and limited:
            bad = loops.param_grads_par(*args, nchunks)
        else:
            bad = loops.param_grads_serial(*args)
    return grads, int(bad)


def derivatives(pc, Y):
    """Compiled :func:`chainprod.kernels.numpy_kernels.derivatives`: ``S = act'(y)`` in ``Y``'s layout."""
    pc = checks.packed(pc)
    N = checks.batch_of_tape(pc, Y)
    Y = checks.tape(pc, Y, N)
    S = np.empty(Y.shape, pc.dtype)
    loops.derivatives(pc.act, pc.d_out, pc.y_off, Y, N, S)
    return S


def precompile(dtypes=(np.float32, np.float64)):
    """Compile (or load from the on-disk cache) every kernel for ``dtypes``, serial and parallel variants.

    Returns the seconds it took. The first call on a machine compiles; later
    processes load the cache in a fraction of that.
    """
    import time

    from ..layers import Chain, Dense, Diagonal
    from .pack import pack

    global PARALLEL_MIN_WORK
    t0 = time.perf_counter()
    saved = PARALLEL_MIN_WORK
    try:
        for dt in dtypes:
            dt = np.dtype(dt)
            chain = Chain([Dense(np.ones((2, 2), dt), np.zeros(2, dt), "tanh"),
                           Diagonal(np.ones(2, dt), np.zeros(2, dt), "relu")])
            pc = pack(chain)
            for threshold in (saved, 0):  # serial, then the parallel variants
                PARALLEL_MIN_WORK = threshold
                x = np.ones((2, 2), dt)
                Y, _ = forward(pc, x)
                backprop(pc, x, Y, np.ones((2, 2), dt))
                backprop_with_row(pc, x, Y, np.ones((2, 2), dt))
                param_grads(pc, x, Y, Y)
            derivatives(pc, Y)
            chunk_product(pc, Y, 2)
    finally:
        PARALLEL_MIN_WORK = saved
    return time.perf_counter() - t0

