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
   and find the first non-finite one.

numba is imported only when the compiled kernels are first used
(:func:`_compiled`); ``import chainprod.kernels.scan`` needs numpy alone. The
kernel bodies below are plain Python functions that numba compiles
(``njit(cache=True)``, on disk) at that point.
"""

from __future__ import annotations

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
    """Run a bound flat plan with the numba kernel (inputs already checked)."""
    k = _compiled()
    import numba

    N = cotangent.shape[0]
    L = pc.L
    V = np.empty(N * int(pc.y_off[L]), dtype=pc.dtype)
    V[N * int(pc.y_off[L - 1]):] = cotangent.reshape(-1)
    if plan is None:
        return V, -1
    nmax = numba.config.NUMBA_NUM_THREADS
    threads = nmax if workers is None else max(1, min(int(workers), nmax))
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        form_elems = plan.buf_size  # an upper bound on what the forming writes
        bad = k["scan"](pc.theta, pc.p_off, pc.kind, pc.act, pc.d_in, pc.d_out, pc.y_off, Y, cotangent,
                        plan.slot_off, plan.op_left, plan.op_right, plan.op_out, plan.op_code, plan.op_m,
                        plan.op_k, plan.op_n, plan.op_tmp, plan.lane_ptr, plan.lane_cum, plan.lane_mid,
                        plan.stage_ptr, plan.stage_parallel, plan.out_off, plan.buf_size, plan.max_tmp,
                        threads, form_elems >= _PARALLEL_MIN_ELEMENTS, V)
    finally:
        numba.set_num_threads(before)
    return V, int(bad)


_KERNELS = None


def _compiled():
    """Compile (or load from the on-disk cache) the numba kernels; imports numba."""
    global _KERNELS, prange
    if _KERNELS is None:
        if importlib.util.find_spec("numba") is None:
            raise ImportError("kernels='numba' needs numba, which is not installed: pip install numba "
                              "(or use kernels='numpy')")
        import numba

        # The bodies below call each other by their global names; rebinding
        # those names to the compiled dispatchers before the first compile is
        # what lets numba resolve them (and prange) inside the kernels.
        from .numba_rules import derivative as compiled_derivative  # the one compiled set of rules

        prange = numba.prange
        g = globals()
        g["_deriv"] = compiled_derivative
        for name in ("_form_position", "_combine", "_run_op", "_run_lanes"):
            g[name] = numba.njit(cache=True)(g[name])
        g["_scan_kernel"] = numba.njit(cache=True, parallel=True)(g["_scan_kernel"])
        _KERNELS = {"scan": g["_scan_kernel"]}
    return _KERNELS


def compiled_scan_kernel():
    """The compiled scan kernel itself, for benchmarks that time its stages apart (imports numba)."""
    return _compiled()["scan"]


# -- kernel bodies (compiled by numba in _compiled) ---------------------------------
prange = range  # replaced by numba.prange before compiling
_deriv = None  # bound to numba_rules.derivative (act' from y, by code) before compiling


def _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, off, buf):
    """Position ``p``'s block into ``buf[off:]``: the head (p = 0) or layer ``L-1-p``'s Jacobian."""
    j = L - 1 - p
    r = d_out[j]
    c = d_in[j]
    yb = N * y_off[j]
    t0 = p_off[j]
    a = act[j]
    if p == 0:  # thin head: cotangent . diag(act') W, or cotangent * act' * a
        if kind[j] == 0:
            for b in range(N):
                ob = off + b * c
                for cc in range(c):
                    buf[ob + cc] = 0.0
                for i in range(r):
                    g = cotangent[b, i] * _deriv(a, Y[yb + b * r + i])
                    row = t0 + i * c
                    for cc in range(c):
                        buf[ob + cc] += g * theta[row + cc]
        else:
            for b in range(N):
                for i in range(r):
                    buf[off + b * r + i] = cotangent[b, i] * _deriv(a, Y[yb + b * r + i]) * theta[t0 + i]
    elif kind[j] == 0:
        for b in range(N):
            for i in range(r):
                s = _deriv(a, Y[yb + b * r + i])
                ob = off + (b * r + i) * c
                row = t0 + i * c
                for cc in range(c):
                    buf[ob + cc] = s * theta[row + cc]
    else:
        for b in range(N):
            for i in range(r):
                buf[off + b * r + i] = _deriv(a, Y[yb + b * r + i]) * theta[t0 + i]


def _combine(buf, code, lo, ro, m, k, n, N, dst, do):
    """``dst[do:] <- left (x) right`` for one op, every batch element (kinds by ``code``)."""
    if code == 0:  # dense (m x k) @ dense (k x n)
        for b in range(N):
            lb = lo + b * m * k
            rb = ro + b * k * n
            ob = do + b * m * n
            for i in range(m):
                orow = ob + i * n
                for jj in range(n):
                    dst[orow + jj] = 0.0
                for kk in range(k):
                    x = buf[lb + i * k + kk]
                    rrow = rb + kk * n
                    for jj in range(n):  # contiguous axpy: vectorises
                        dst[orow + jj] += x * buf[rrow + jj]
    elif code == 1:  # dense @ diag: scale the columns
        for b in range(N):
            lb = lo + b * m * n
            rb = ro + b * n
            ob = do + b * m * n
            for i in range(m):
                for jj in range(n):
                    dst[ob + i * n + jj] = buf[lb + i * n + jj] * buf[rb + jj]
    elif code == 2:  # diag @ dense: scale the rows
        for b in range(N):
            lb = lo + b * m
            rb = ro + b * m * n
            ob = do + b * m * n
            for i in range(m):
                x = buf[lb + i]
                for jj in range(n):
                    dst[ob + i * n + jj] = x * buf[rb + i * n + jj]
    else:  # diag * diag: elementwise, O(w)
        for b in range(N):
            lb = lo + b * m
            rb = ro + b * m
            ob = do + b * m
            for i in range(m):
                dst[ob + i] = buf[lb + i] * buf[rb + i]


def _run_op(o, N, buf, tmp, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp):
    code = op_code[o]
    m = op_m[o]
    n = op_n[o]
    if op_tmp[o] == 0:
        _combine(buf, code, op_left[o], op_right[o], m, op_k[o], n, N, buf, op_out[o])
    else:  # the output overlaps an operand: form it aside, then copy
        _combine(buf, code, op_left[o], op_right[o], m, op_k[o], n, N, tmp, 0)
        size = N * m if code == 3 else N * m * n
        oo = op_out[o]
        for e in range(size):
            buf[oo + e] = tmp[e]


def _run_lanes(a, b, N, buf, tmp, lane_ptr, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp):
    """Lanes ``a .. b-1`` in order (their ops are contiguous in the plan)."""
    for o in range(lane_ptr[a], lane_ptr[b]):
        _run_op(o, N, buf, tmp, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp)


def _scan_kernel(theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent,
                 slot_off, op_left, op_right, op_out, op_code, op_m, op_k, op_n, op_tmp,
                 lane_ptr, lane_cum, lane_mid, stage_ptr, stage_parallel, out_off, buf_size, max_tmp,
                 threads, form_parallel, V):
    """Form the blocks, run every stage, write the rows into ``V``; returns the first bad prefix or -1."""
    L = kind.shape[0]
    M = L - 1
    N = cotangent.shape[0]
    buf = np.empty(buf_size, dtype=V.dtype)
    if form_parallel and threads > 1:
        for p in prange(M):
            _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, slot_off[p], buf)
    else:
        for p in range(M):
            _form_position(p, L, N, theta, p_off, kind, act, d_in, d_out, y_off, Y, cotangent, slot_off[p], buf)

    T = max(threads, 1)
    tmps = np.empty((T, max(max_tmp, 1)), dtype=V.dtype)  # one temporary per group of lanes
    bounds = np.empty(T + 1, dtype=np.int64)
    n_stages = stage_ptr.shape[0] - 1
    for s in range(n_stages):
        a = stage_ptr[s]
        b = stage_ptr[s + 1]
        if stage_parallel[s] == 1 and threads > 1:
            # Contiguous groups of lanes with about equal flops, one per thread
            # (a lane goes to the group its middle falls in).
            G = min(T, b - a)
            base = lane_cum[a]
            F = lane_cum[b] - base
            bounds[0] = a
            bounds[G] = b
            for g in range(1, G):
                bounds[g] = a + np.searchsorted(lane_mid[a:b], base + F * g / G)
            for g in prange(G):
                _run_lanes(bounds[g], bounds[g + 1], N, buf, tmps[g], lane_ptr, op_left, op_right, op_out,
                           op_code, op_m, op_k, op_n, op_tmp)
        else:
            _run_lanes(a, b, N, buf, tmps[0], lane_ptr, op_left, op_right, op_out, op_code, op_m, op_k, op_n,
                       op_tmp)

    # Rows out: prefix k is v_{L-2-k}, a thin (N, 1, d) block.
    bad = -1
    for k in range(M):
        l = L - 2 - k
        d = d_out[l]
        src = out_off[k]
        dst = N * y_off[l]
        ok = True
        for e in range(N * d):
            x = buf[src + e]
            V[dst + e] = x
            if not np.isfinite(x):
                ok = False
        if not ok and bad < 0:
            bad = k
    return bad
