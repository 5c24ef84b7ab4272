"""Compiled scan kernels: every backward row of a packed chain, any schedule, one call.

For a packed chain (:mod:`chainprod.kernels.pack`) with tape ``Y`` and
``cotangent = dloss/dy_{L-1}``, :func:`scan_rows` returns every row::

    v_{L-1} = cotangent
    v_l     = cotangent . A_{L-1} A_{L-2} ... A_{l+1}        (l < L-1, 0-based layers)

``A_j`` the input Jacobian of layer ``j`` (``diag(act'(y_j)) W_j`` dense,
``act'(y_j) * a_j`` diagonal). As in :func:`chainprod.grad`, the rows are the
prefixes of one scan over the ``L-1`` positions::

    scan order:  [cotangent . A_{L-1},  A_{L-2},  ...,  A_1]
    prefix [0, k] = v_{L-2-k}

Position 0 is a thin ``N x 1 x w`` block, so every prefix is a batch of row
vectors and the down-sweep ops are vector-matrix products.

How the compiled path works
---------------------------
1. Plan (pure, cached): :func:`chainprod.planning.flat.bind_flat` binds the
   schedule to the positions' kinds and shapes: one flat buffer with a fixed
   offset per slot, an op table, and *stages* (a round, or many rounds fused
   into per-lane sequential loops when that loses no parallelism).
2. One kernel call: form every position's block straight into its slot
   (``prange`` over positions; diagonal positions stay ``O(w)``), run the
   stages (``prange`` over groups of lanes split by flops when a stage is
   worth a parallel region, else a plain loop), copy the prefixes into ``V``
   and find the first non-finite one. A dense op is a loop below the
   crossover of its form (thin or square, :mod:`chainprod.kernels.crossover`)
   and one BLAS ``gemm`` per batch element from it on; the square op is
   never slower than ``np.matmul`` on the same stacked blocks.

numba is imported only when the compiled kernels are first used: the kernel
is in :mod:`chainprod.kernels.scan_compiled`, imported at that point;
``import chainprod.kernels.scan`` needs numpy alone.
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np

from .._validate import check_workers
from ..planning.flat import bind_flat
from ..schedules import Schedule

__all__ = ["scan_rows", "run_scan_compiled", "position_specs", "plan_for", "SCAN_KERNELS", "compiled_scan_kernel"]

#: Registered implementations of :func:`scan_rows`; the first is the default.
SCAN_KERNELS = ("numba", "numpy")

# Below this many elements, forming the blocks or copying out the rows is
# quicker on one thread than waking the others.
_PARALLEL_MIN_ELEMENTS = 1 << 15


# -- planning glue (numpy only) ------------------------------------------------
def position_specs(pc):
    """``(kinds, rows, cols)`` of the ``L-1`` scan positions of a packed chain.

    Position 0 is the thin head ``cotangent . A_{L-1}`` (dense ``1 x d_in[L-1]``);
    position ``p >= 1`` is layer ``L-1-p``'s Jacobian (``d_out x d_in``, its kind).
    """
    L = pc.L
    j = np.arange(L - 2, 0, -1)  # layers L-2 .. 1
    kinds = np.concatenate(([0], pc.kind[j])).astype(np.int64)
    rows = np.concatenate(([1], pc.d_out[j])).astype(np.int64)
    cols = np.concatenate(([pc.d_in[L - 1]], pc.d_in[j])).astype(np.int64)
    return kinds, rows, cols


def plan_for(pc, schedule, batch: int, *, workers=None):
    """The cached :class:`~chainprod.planning.flat.FlatPlan` of ``schedule`` on chain ``pc`` (``None`` if L=1).

    Parameters
    ----------
    pc : PackedChain
    schedule : Schedule or str
        A :class:`~chainprod.schedules.Schedule` of length ``L-1``, or the
        name of a schedule builder (built for ``workers``). ``"auto"`` is not
        accepted: choosing a schedule by the cost model is the caller's
        decision, made before the kernels are reached; pass the Schedule it
        chose (e.g. ``chainprod.schedule("auto", L - 1, blocks=...)``).
    batch : int
        The batch size ``N`` the plan is bound to.
    workers : int, optional
        Workers a named schedule is built for (``chunked`` uses ``P + 1``
        chunks); ignored for a Schedule.

    Raises
    ------
    ValueError
        ``schedule`` is ``"auto"``, is for another length, or does not
        produce every prefix.
    """
    if isinstance(schedule, str) and schedule == "auto":
        raise ValueError("the scan kernels take a Schedule, not method 'auto': the cost model chooses above the "
                         "kernels; pass the Schedule it chose, e.g. chainprod.schedule('auto', L - 1, "
                         "blocks=...), or a plain method name such as 'sklansky'")
    if pc.L < 2:
        return None
    kinds, rows, cols = position_specs(pc)
    if not isinstance(schedule, Schedule):
        from ..schedules import schedule as build

        schedule = build(schedule, pc.L - 1, workers=workers)
    if schedule.length != pc.L - 1:
        raise ValueError(f"schedule {schedule.name!r} is for {schedule.length} positions; a chain of "
                         f"{pc.L} layers scans L-1 = {pc.L - 1}")
    if not schedule.is_scan:
        raise ValueError(f"schedule {schedule.name!r} does not produce every prefix; the rows need a scan "
                         "(tree gives only the total product)")
    return bind_flat(schedule, kinds, rows, cols, batch=batch)


def _check_inputs(pc, Y, cotangent):
    for name in ("L", "dtype", "kind", "act", "d_in", "d_out", "p_off", "theta", "y_off"):
        if not hasattr(pc, name):
            raise TypeError(f"scan_rows needs a PackedChain (chainprod.kernels.pack); {type(pc).__name__} "
                            f"has no field {name!r}")
    dt = np.dtype(pc.dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"the packed chain is {dt}; the scan kernels support float32 and float64")
    cotangent = np.asarray(cotangent)
    if cotangent.ndim == 1:
        cotangent = cotangent[None]
    d_last = int(pc.d_out[-1])
    if cotangent.ndim != 2 or cotangent.shape[1] != d_last or cotangent.shape[0] < 1:
        raise ValueError(f"cotangent must be (N, {d_last}) (dloss/dy of the last layer, layer {pc.L - 1}), "
                         f"got shape {cotangent.shape}")
    if cotangent.dtype != dt:
        raise TypeError(f"cotangent is {cotangent.dtype} but the chain is {dt}")
    N = cotangent.shape[0]
    if not isinstance(Y, np.ndarray) or Y.ndim != 1 or Y.shape[0] != N * int(pc.y_off[-1]):
        raise ValueError(f"Y must be the flat tape of a batch of {N}: a 1-D array of length N * y_off[L] = "
                         f"{N * int(pc.y_off[-1])}, got {getattr(Y, 'shape', type(Y).__name__)}")
    if Y.dtype != dt:
        raise TypeError(f"Y is {Y.dtype} but the chain is {dt}")
    return np.ascontiguousarray(Y), np.ascontiguousarray(cotangent), N


def scan_rows(pc, Y, cotangent, schedule, *, workers=None, kernels="numba"):
    """Every backward row ``v_l = cotangent . A_{L-1} ... A_{l+1}`` by a prefix scan, in one kernel call.

    Parameters
    ----------
    pc : PackedChain
        The chain (:func:`chainprod.kernels.pack`); any mix of dense and
        diagonal layers, activations and widths.
    Y : ndarray, shape ``(N * y_off[L],)``
        The forward tape, layer-major (layer ``l``'s outputs are
        ``Y[N*y_off[l]:N*y_off[l+1]].reshape(N, d_out[l])``).
    cotangent : ndarray, shape ``(N, d_out[L-1])``
        ``dloss/dy_{L-1}``.
    schedule : Schedule or str
        A scan of length ``L-1``, or the name of a schedule builder (built
        for ``workers``); not ``"auto"`` (see :func:`plan_for`).
    workers : int, optional
        Threads for the compiled kernel (clamped to
        ``numba.config.NUMBA_NUM_THREADS``); ``None`` uses them all.
    kernels : {"numba", "numpy"}
        ``"numpy"`` runs the plain reference (:mod:`.scan_numpy`).

    Returns
    -------
    V : ndarray
        The rows in the layout of ``Y``; layer ``L-1``'s block is ``cotangent``.
    bad : int
        The first scan position ``k`` whose prefix (``v_{L-2-k}``, the product
        of the Jacobians of layers ``L-1-k .. L-1``) is NaN or infinite, or -1.
        Nothing is raised for it: the caller names the layer range.

    >>> import numpy as np, chainprod as cp
    >>> from chainprod.kernels import pack
    >>> from chainprod.kernels.scan import scan_rows
    >>> chain = cp.mlp([3, 4, 4, 1])
    >>> tape = cp.forward(chain, np.ones((2, 3)))
    >>> Y = np.concatenate([o.reshape(-1) for o in tape.outputs])
    >>> V, bad = scan_rows(pack(chain), Y, np.ones((2, 1)), "sklansky", kernels="numpy")
    >>> V.shape, bad
    ((18,), -1)
    """
    if not isinstance(kernels, str) or kernels not in SCAN_KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid kernels: {', '.join(SCAN_KERNELS)}")
    workers = check_workers(workers)
    Y, cotangent, N = _check_inputs(pc, Y, cotangent)
    plan = plan_for(pc, schedule, N, workers=workers)
    if kernels == "numpy":
        from .scan_numpy import run_scan

        return run_scan(pc, Y, cotangent, plan)
    return run_scan_compiled(pc, Y, cotangent, plan, workers=workers)


def run_scan_compiled(pc, Y, cotangent, plan, workers=None):
    """Run a bound flat plan with the numba kernel (inputs already checked).

    Dense products go to BLAS from the crossovers of
    :mod:`chainprod.kernels.crossover`, BLAS limited to one thread for the
    call (the kernel runs on ``workers`` threads of its own); where it
    cannot be limited, a kernel on more than one thread keeps to its loops.
    """
    kernel = _compiled()
    import numba

    from . import crossover, numba_blas

    N = cotangent.shape[0]
    L = pc.L
    V = np.empty(N * int(pc.y_off[L]), dtype=pc.dtype)
    V[N * int(pc.y_off[L - 1]):] = cotangent.reshape(-1)
    if plan is None:
        return V, -1
    nmax = numba.config.NUMBA_NUM_THREADS
    threads = nmax if workers is None else max(1, min(int(workers), nmax))
    if numba_blas.blas_available():
        rows, blocks = (crossover.blas_crossover(pc.dtype, form) for form in ("rows", "blocks"))
    else:
        rows = blocks = crossover.NEVER
    biggest = max(N, pc.max_width) * pc.max_width ** 2  # the head over the batch, or a square op
    blas_inside = min(rows, blocks) <= biggest and biggest >= numba_blas.BLAS_THREADS_MIN
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with numba_blas.one_blas_thread() if blas_inside else contextlib.nullcontext(True) as limited:
            if not limited and threads > 1:
                rows = blocks = crossover.NEVER
            form_elems = plan.buf_size  # an upper bound on what the forming writes
            bad = kernel(pc.theta, pc.p_off, pc.kind, pc.act, pc.d_in, pc.d_out, pc.y_off, Y, cotangent,
                         plan.slot_off, plan.op_left, plan.op_right, plan.op_out, plan.op_code, plan.op_m,
                         plan.op_k, plan.op_n, plan.op_tmp, plan.lane_ptr, plan.lane_cum, plan.lane_mid,
                         plan.stage_ptr, plan.stage_parallel, plan.out_off, plan.buf_size, plan.max_tmp,
                         threads, form_elems >= _PARALLEL_MIN_ELEMENTS, rows, blocks, V)
    finally:
        numba.set_num_threads(before)
    return V, int(bad)


def _compiled():
    """The compiled scan kernel (:mod:`.scan_compiled`), compiled or loaded from numba's disk cache."""
    if importlib.util.find_spec("numba") is None:
        raise ImportError("kernels='numba' needs numba, which is not installed: pip install numba "
                          "(or use kernels='numpy')")
    from .scan_compiled import scan_kernel

    return scan_kernel


def compiled_scan_kernel():
    """The compiled scan kernel itself, for benchmarks that time its stages apart (imports numba).

    Its arguments are those :func:`run_scan_compiled` passes.
    """
    return _compiled()
