"""Compiled affine scans: every state of ``h_t = A_t h_{t-1} + c_t``, any schedule, one kernel call.

The scan of :func:`chainprod.linear_recurrence` (``docs/recurrences.md``) on
the compiled kernels: ``n + 1`` positions in scan order, the start state
``h_{-1}`` (position 0, a thin ``1 x (d + 1)`` row in the logical shapes of
:mod:`chainprod.blocks`), then step ``t``'s map ``(A_t, c_t)`` at position
``t + 1`` (``(d + 1) x (d + 1)``). Prefix ``[0, t + 1]`` is the state
``h_t``. Maps compose as ``(A2, c2) o (A1, c1) = (A2 A1, A2 c1 + c2)``
(:data:`chainprod.blocks.COMBINE`'s ``affine`` and ``affine_diag`` rules);
``A_t`` is dense or diagonal for every step of one scan.

How it works
------------
1. Plan (pure, cached): :func:`affine_layout` binds the schedule with
   :func:`chainprod.planning.flat.bind_flat`, the positions described by
   their logical shapes (dense ``(d + 1) x (d + 1)`` maps; for a diagonal
   ``A``, ``diag`` blocks of ``2d``, the stored size of ``[a | c]``). The
   planner sizes the slots, groups rounds into stages of lanes and splits
   them by flops exactly as for a gradient's scan; the kernel only reads
   the slots with the affine layout below.
2. Form the blocks straight into their slots (:func:`form_blocks`; the
   compiled Newton linearisation of :mod:`.newton_numba` writes them
   there itself), then one kernel call runs every stage and copies the
   states out, noting the first non-finite one.

Buffer layout, per slot at element offset ``off``, batch element ``b``:
a dense map ``[A | c]`` is ``(d, d + 1)`` row-major at ``off + b d (d + 1)``;
a diagonal one ``[a | c]`` is ``2d`` numbers at ``off + 2 b d``; a state is
``d`` numbers at ``off + b d``. With no schedule (``None``: the plain loop)
step ``t``'s block is at ``t N s`` (``s`` the block size) and no state is
stored in the buffer.

numba is imported only when the compiled kernels are first used (the
kernels are in :mod:`.affine_numba`); ``import chainprod.kernels.affine_scan``
needs numpy alone. ``kernels="numpy"`` runs the plain twin
(:mod:`.affine_numpy`), the reference in the tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import NamedTuple

import numpy as np

from .._caches import PlanCache
from .._validate import check_workers
from ..planning.flat import PARALLEL_MIN_FLOPS, FlatPlan, bind_flat
from ..schedules import Schedule
from ..schedules import schedule as build_schedule

__all__ = ["AFFINE_KERNELS", "AffineLayout", "affine_layout", "affine_scan", "block_size", "form_blocks",
           "run_affine", "kernel_threads", "numba_threads"]

#: Registered implementations; the first is the default.
AFFINE_KERNELS = ("numba", "numpy")


class AffineLayout(NamedTuple):
    """Where every block and state of one affine scan lives in its flat buffer (see the module docstring)."""

    n: int                   #: steps
    N: int                   #: batch
    d: int                   #: state size
    diag: bool               #: diagonal ``A`` (blocks ``[a | c]``)
    plan: FlatPlan | None    #: the bound schedule, or None for the plain loop
    pos_off: np.ndarray      #: int64[n], element offset of step ``t``'s block
    head_off: int            #: element offset of the start state (-1 for the loop: not stored)
    buf_size: int            #: elements of the buffer


def block_size(d: int, diag: bool) -> int:
    """Stored numbers of one step's block per batch element: ``d (d + 1)``, or ``2 d`` diagonal."""
    return 2 * d if diag else d * (d + 1)


def affine_layout(schedule, n: int, N: int, d: int, *, diag: bool, workers=None,
                  parallel_min_flops: float = PARALLEL_MIN_FLOPS) -> AffineLayout:
    """The layout of a scan of ``n`` steps, batch ``N``, state ``d`` by ``schedule`` (plans cached).

    Parameters
    ----------
    schedule : Schedule, str or None
        A scan over ``n + 1`` positions, or the name of a schedule builder
        (built for ``workers``; not ``"auto"``: the cost model chooses above
        the kernels), or None for the plain loop.
    diag : bool
        Every ``A_t`` is diagonal.
    workers : int, optional
        Workers a named schedule is built for (``chunked``: ``P + 1`` chunks).
    parallel_min_flops : float
        A stage with fewer flops runs on one thread (the planner's threshold,
        :data:`chainprod.planning.flat.PARALLEL_MIN_FLOPS`).

    Raises
    ------
    ValueError
        ``"auto"``, a schedule for another length, or one that is not a scan.
    """
    for name, v in (("n", n), ("N", N), ("d", d)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < (0 if name == "n" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'n' else 1}, got {v!r}")
    n, N, d = int(n), int(N), int(d)
    size = block_size(d, diag)
    if schedule is None or n == 0:
        pos_off = np.arange(n, dtype=np.int64) * (N * size)
        pos_off.setflags(write=False)  # read-only like a plan's offsets: one compiled variant of each kernel
        return AffineLayout(n, N, d, bool(diag), None, pos_off, -1, n * N * size)
    if isinstance(schedule, str) and schedule == "auto":
        raise ValueError("the affine scan kernels take a Schedule, not 'auto': the cost model chooses above the "
                         "kernels (chainprod.cost.resolve_schedule); pass the Schedule it chose, or a name")
    if not isinstance(schedule, Schedule):
        schedule = build_schedule(schedule, n + 1, workers=workers)
    if schedule.length != n + 1:
        raise ValueError(f"schedule {schedule.name!r} is for {schedule.length} positions; an affine scan of "
                         f"{n} steps has n + 1 = {n + 1} (the start state first)")
    if not schedule.is_scan:
        raise ValueError(f"schedule {schedule.name!r} does not produce every prefix; every state needs a scan")
    key = (schedule.key, n, N, d, bool(diag), float(parallel_min_flops))
    return _LAYOUTS.get(key, lambda: _bind_layout(schedule, n, N, d, bool(diag), parallel_min_flops))


def _bind_layout(schedule, n, N, d, diag, parallel_min_flops):
    if diag:
        kinds = ["dense"] + ["diag"] * n
        rows, cols = [1] + [2 * d] * n, [2 * d] * (n + 1)
    else:
        kinds = ["dense"] * (n + 1)
        rows, cols = [1] + [d + 1] * n, [d + 1] * (n + 1)
    plan = bind_flat(schedule, kinds, rows, cols, batch=N, parallel_min_flops=parallel_min_flops)
    pos_off = np.ascontiguousarray(plan.slot_off[1:n + 1])
    pos_off.setflags(write=False)
    return AffineLayout(n, N, d, diag, plan, pos_off, int(plan.slot_off[0]), int(plan.buf_size))


# a layout is described by its schedule's key and sizes: describing the positions to bind_flat (lists of n
# entries) took 2.6 ms a call at n = 16384, more than the scan's own kernel at d = 8
_LAYOUTS = PlanCache(maxsize=32)


def _check_kernels(kernels):
    if not isinstance(kernels, str) or kernels not in AFFINE_KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid kernels: {', '.join(AFFINE_KERNELS)}")
    if kernels == "numba" and importlib.util.find_spec("numba") is None:
        raise ImportError("kernels='numba' needs numba, which is not installed: pip install numba "
                          "(or use kernels='numpy')")


def kernel_threads(workers) -> int:
    """Threads a compiled kernel runs on: ``workers`` clamped to numba's pool, all of it for None."""
    import numba

    nmax = numba.config.NUMBA_NUM_THREADS
    return nmax if workers is None else max(1, min(int(workers), nmax))


@contextlib.contextmanager
def numba_threads(threads):
    """numba's thread count set to ``threads`` inside the block (it is per process: restored after)."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def form_blocks(layout: AffineLayout, buf, J, F, prev, x=None, lam=0.0, *, kernels="numba"):
    """Write step ``t``'s block ``[J_t | c_t]``, ``c_t = F_t - J_t prev_t``, into its slot of ``buf``.

    ``J`` is ``(n, N, d, d)`` (a dense layout) or ``(n, N, d)`` (diagonal);
    ``F``, ``prev``, ``x`` are ``(n, N, d)``. With ``lam > 0`` the block is
    damped: ``(J, c + lam x) / (1 + lam)`` (ELK, ``docs/newton.md``). The
    affine recurrence ``h_t = A_t h_{t-1} + c_t`` itself is ``F = c``,
    ``prev = 0``.
    """
    _check_kernels(kernels)
    if (J.ndim == 3) != layout.diag:
        raise ValueError(f"J has shape {J.shape}: the layout is for {'diagonal' if layout.diag else 'dense'} "
                         f"blocks, (n, N, d{'' if layout.diag else ', d'})")
    x = F if x is None else x
    if kernels == "numpy":
        from .affine_numpy import form_blocks as form

        return form(J, F, prev, x, lam, buf, layout.pos_off)
    from . import affine_numba as k

    form = k.form_affine_diag_blocks if layout.diag else k.form_affine_blocks
    form(J, F, prev, x, float(lam), buf, layout.pos_off)
    return None


def run_affine(layout: AffineLayout, buf, h0, *, workers=None, kernels="numba"):
    """``(states, bad)``: every state ``h_t`` ``(n, N, d)`` from the blocks in ``buf``, and the first
    non-finite ``t`` (-1 when all are finite; nothing is raised: the caller names the step).

    ``buf`` (``layout.buf_size`` elements) is overwritten by the scan.
    Dense compositions go to BLAS from the square-product crossover of
    :mod:`chainprod.kernels.crossover`, limited to one thread for the call
    when the kernel runs on ``workers > 1`` threads of its own (where it
    cannot be limited, a multi-threaded kernel keeps to its loops).
    """
    _check_kernels(kernels)
    h0 = np.ascontiguousarray(h0)
    n, N, d = layout.n, layout.N, layout.d
    if h0.shape != (N, d):
        raise ValueError(f"h0: expected shape {(N, d)} (batch, state), got {h0.shape}")
    if layout.plan is not None:
        buf[layout.head_off:layout.head_off + N * d] = h0.reshape(-1)
    if kernels == "numpy":
        from . import affine_numpy as ref

        if layout.plan is None:
            return ref.run_loop(buf, layout.pos_off, h0, layout.diag, n)
        return ref.run_plan(layout.plan, buf, N, d, layout.diag, n)
    from . import affine_numba as k
    from . import crossover, numba_blas

    states = np.empty((n, N, d), buf.dtype)
    if n == 0:
        return states, -1
    if layout.plan is None:
        return states, int(k.affine_loop_kernel(buf, layout.pos_off, h0, layout.diag, states))
    threads = kernel_threads(workers)
    cross = crossover.blas_crossover(buf.dtype, "blocks") if numba_blas.blas_available() else crossover.NEVER
    blas_inside = not layout.diag and d * d * (d + 1) >= cross and cross < crossover.NEVER
    p = layout.plan
    with numba_threads(threads), \
            numba_blas.one_blas_thread() if blas_inside else contextlib.nullcontext(True) as limited:
        if not limited and threads > 1:
            cross = crossover.NEVER
        bad = k.affine_scan_kernel(buf, d, layout.diag, p.op_left, p.op_right, p.op_out, p.op_m, p.lane_ptr,
                                   p.lane_cum, p.lane_mid, p.stage_ptr, p.stage_parallel, p.out_off, threads, cross,
                                   states)
    return states, int(bad)


def affine_scan(A, c, h0, schedule, *, workers=None, kernels="numba"):
    """``(states, bad)`` of ``h_t = A_t h_{t-1} + c_t``, ``t = 0 .. n-1``, by ``schedule`` in one kernel call.

    Parameters
    ----------
    A : ndarray
        ``(n, N, d, d)``, or the diagonals ``(n, N, d)``.
    c : ndarray, ``(n, N, d)``
    h0 : ndarray, ``(N, d)``
    schedule : Schedule, str or None
        As :func:`affine_layout` takes it (None: the plain loop).
    workers : int, optional
        Threads of the compiled kernel (clamped to numba's pool; None: all).
    kernels : {"numba", "numpy"}

    Returns
    -------
    states : ndarray, ``(n, N, d)``
    bad : int
        The first ``t`` whose state is NaN or infinite, or -1.

    >>> import numpy as np
    >>> from chainprod.kernels.affine_scan import affine_scan
    >>> a, c = np.full((4, 1, 2), 0.5), np.ones((4, 1, 2))
    >>> states, bad = affine_scan(a, c, np.zeros((1, 2)), "sklansky", kernels="numpy")
    >>> states[:, 0, 0].tolist(), bad
    ([1.0, 1.5, 1.75, 1.875], -1)
    """
    _check_kernels(kernels)
    workers = check_workers(workers)
    A, c, h0 = (np.ascontiguousarray(v) for v in (A, c, h0))
    if c.ndim != 3:
        raise ValueError(f"c: expected shape (n, N, d), got {c.shape}")
    n, N, d = c.shape
    diag = A.ndim == 3
    want = (n, N, d) if diag else (n, N, d, d)
    if A.shape != want:
        raise ValueError(f"A: expected shape {(n, N, d, d)} or its diagonals {(n, N, d)} (from c of shape "
                         f"{c.shape}), got {A.shape}")
    if not (A.dtype == c.dtype == h0.dtype) or c.dtype not in (np.float32, np.float64):
        raise TypeError(f"A, c and h0 must share one dtype, float32 or float64; got {A.dtype}, {c.dtype}, "
                        f"{h0.dtype}")
    layout = affine_layout(schedule, n, N, d, diag=diag, workers=workers)
    buf = np.empty(layout.buf_size, c.dtype)
    form_blocks(layout, buf, A, c, np.zeros_like(c), kernels=kernels)
    return run_affine(layout, buf, h0, workers=workers, kernels=kernels)
