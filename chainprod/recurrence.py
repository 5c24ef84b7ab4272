"""Linear recurrences ``h_t = A_t h_{t-1} + b_t``: every state from one prefix scan of affine blocks.

Step ``t`` is the affine map ``F_t(h) = A_t h + b_t``, and affine maps
compose associatively: ``(A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2)``. The
state ``h_t = F_t o ... o F_0 (h0)`` is therefore a prefix of a scan. The
scan runs over ``T + 1`` blocks in scan order: the constant map ``h -> h0``
(an ``affine`` block from ``R^0``, a thin state row like the head of a
gradient chain), then ``F_0 .. F_{T-1}`` (``affine`` blocks for a dense
``A``, ``affine_diag`` for :class:`~chainprod.blocks.Diag`). The prefix
``[0, t + 1]`` is the constant map ``h -> h_t``: the scan yields the states
themselves, and its sequential order costs what the plain loop costs (a
matrix-vector product per step). Schedules, the cost model and executors
run these blocks through the combine table (:data:`chainprod.blocks.COMBINE`)
like any other; ``docs/recurrences.md`` has the math and the costs.
"""

from __future__ import annotations

import time

import numpy as np

from ._caches import PlanCache
from ._validate import as_float_array, check_workers
from .array_inputs import all_finite, array_backend, float_array, nonfinite_index
from .arrays import common_library, device_of, dtype_name, is_foreign, namespace, to_numpy
from .autotune import COMPILED_BACKENDS
from .blocks import BlockSeq, Diag, Segment
from .cost import AUTO, LOCAL_BACKENDS, resolve_schedule
from .errors import NonFiniteError
from .executors import TraceEvent, get_executor
from .grad import make_trace
from .tape import resolve_kernels

__all__ = ["linear_recurrence", "best_seconds"]

_EXPECTED_A = "an array (T, d, d) or (T, N, d, d), or chainprod.Diag(a) with a of shape (T, d) or (T, N, d)"


def linear_recurrence(A, b, h0=None, *, method="auto", backend="vectorized", workers=None, return_trace=False,
                      engine_options=None, kernels=None):
    """Every state of the linear recurrence ``h_t = A_t h_{t-1} + b_t``, ``t = 0 .. T-1``.

    Parameters
    ----------
    A : array or Diag
        The transition of every step: an array ``(T, d, d)`` (or batched
        ``(T, N, d, d)``), or ``chainprod.Diag(a)`` with ``a`` of shape
        ``(T, d)`` or ``(T, N, d)`` for ``h_t = a_t * h_{t-1} + b_t``.
    b : array
        The input of every step, ``(T, d)`` or ``(T, N, d)``.
    h0 : array, optional
        ``h_{-1}``: ``(d,)`` or ``(N, d)``; zeros by default.
    method : str
        ``"sequential"``: a plain loop over the steps on this machine (the
        baseline; on Ray or Dask the sequential schedule runs on the
        cluster). Any name of a scan schedule (every name of
        :func:`chainprod.valid_schedules` but ``"tree"``): the scan of
        ``T + 1`` affine blocks described in the module docstring. ``"auto"``
        (the default): the schedule the cost model predicts fastest
        (:func:`chainprod.cost.choose_schedule`); when that is the
        sequential one on a local backend, the plain loop runs instead.
    backend, workers, return_trace, engine_options
        As in :func:`chainprod.suffix_products`. ``workers`` is ignored by
        the plain loop. torch tensors, JAX arrays and CuPy arrays (all
        inputs of one library) run on ``backend="array"`` (the default for
        them) on their device; there ``"sequential"`` is the sequential
        schedule run by that executor, not the loop.
    kernels : {"numba", "numpy"}, optional
        Who runs numpy inputs on this machine: the compiled kernels (the
        default where numba is installed, see :func:`chainprod.grad`) or the
        numpy reference. Compiled, the loop is one kernel call over the
        inputs as given, and a scan on ``"vectorized"`` or ``"threads"``
        (with no ``engine_options``) one call of the compiled affine scan
        (:mod:`chainprod.kernels.affine_scan`) on ``workers`` threads, which
        the trace records as one task. With ``"numpy"`` the loop is a numpy
        loop over the steps and a scan runs on ``backend``'s executor round
        by round. ``"serial"``, Ray, Dask and foreign arrays always take the
        executor.

    Returns
    -------
    array
        The states, ``(T, N, d)`` when any of ``A``, ``b``, ``h0`` has a
        batch axis, else ``(T, d)`` (shaped like ``b`` whenever ``b``
        carries the batch), in the inputs' library, device and dtype (a
        numpy array for numpy inputs); with ``return_trace``, a pair
        ``(states, trace)``. The inputs are never modified.

    Raises
    ------
    TypeError
        A dtype other than float32 / float64, inputs of different dtypes or
        of different array libraries, or a numpy-only backend (``"serial"``,
        ``"threads"``, ``"ray"``, ``"dask"``) given for torch / JAX / CuPy inputs.
    ValueError
        Shapes that do not fit (the message names the argument, its shape
        and what was expected), a NaN or infinity in ``A`` or ``b`` (the
        message names the step ``t``) or in ``h0``, or a schedule that does
        not give every prefix.
    chainprod.errors.NonFiniteError
        The states overflowed (``layers`` is ``(0, t)`` for the first
        non-finite state ``h_t``).

    Notes
    -----
    A scan forms products ``A_j ... A_i`` of several steps: ``d^3`` flops
    per op for a dense ``A`` against the loop's ``d^2`` per step, and
    ``T N d (d + 1)`` stored numbers. For a diagonal ``A`` every op costs
    ``O(d)``. float32 runs in float32: states agree with the float64 loop to
    about ``1e-5`` relative when the recurrence is stable (``|A_t| <= 1``).

    Examples
    --------
    >>> import numpy as np
    >>> import chainprod as cp
    >>> a = np.full((4, 2), 0.5)
    >>> cp.linear_recurrence(cp.Diag(a), np.ones((4, 2)), method="sklansky")[:, 0].tolist()
    [1.0, 1.5, 1.75, 1.875]
    """
    library = common_library({"A": A.values if isinstance(A, Diag) else A, "b": b, "h0": h0})
    backend = array_backend(backend, library)
    inp = _read(A, b, h0)  # checked for NaN and infinity below (_check_steps)
    workers = check_workers(workers)
    if not isinstance(method, str):
        raise TypeError(f"method must be a schedule name or 'auto', got {method!r}")
    compiled = resolve_kernels(kernels) == "numba" and not inp.foreign
    local = isinstance(backend, str) and backend in LOCAL_BACKENDS
    executor = get_executor(backend)
    if engine_options:
        executor.check_options(engine_options)  # also on the loop's path: never ignored in silence
    trace = make_trace(return_trace, backend, workers)
    blocks = _array_blocks(inp) if inp.foreign else None  # real blocks: auto looks at their device
    if method == "sequential" and local:
        sched = None
    elif method == AUTO and compiled and local:
        # decided once per signature: the cost model's proposal, then (for a scan) a timing against the loop
        key = (inp.T, inp.N, inp.d, inp.diag, inp.A_batched, inp.b_batched, str(inp.dtype), backend, workers)
        sched, note = _AUTO_PICKS.get(key, lambda: _auto_compiled(inp, backend, workers))
        if trace is not None:
            trace.note = note
    else:
        shapes = blocks if blocks is not None else _shapes(inp)
        sched = resolve_schedule(method, inp.T + 1, workers=workers, blocks=shapes, backend=backend)
        if not sched.is_scan:
            raise ValueError(f"schedule {sched.name!r} computes only the total product, not every state; use "
                             "'sequential', 'auto' or a scan schedule such as 'sklansky' or 'brent_kung'")
        if method == AUTO and sched.name == "sequential" and local:
            sched = None  # the same order as the loop, without forming blocks
    if trace is not None:
        trace.schedule = sched
    # the compiled loop reads every entry of A and b into the state of its step, where a NaN or infinity
    # makes that state non-finite: the inputs are checked after it, and only when a state is not finite
    # (a pass over A and b saved: 3.5 of 13 ms at T = 1e5, d = 64, diagonal A)
    checked_after = compiled and sched is None
    if not checked_after:
        _check_steps(inp)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the step
        if sched is None:
            states = _compiled_loop(inp, trace) if compiled else _loop(inp, trace)
        elif compiled and backend in COMPILED_BACKENDS and not engine_options:
            states = _compiled_scan(inp, sched, workers or COMPILED_BACKENDS[backend](), trace)
        else:
            blocks = blocks if blocks is not None else _blocks(inp)
            states = _scan(inp, blocks, sched, executor, workers, trace, engine_options)
    if not all_finite(states):  # one pass over the states, also where the inputs were checked after
        if checked_after:
            _check_steps(inp)  # a NaN or infinity in the inputs, named by its step
        _overflowed(states, sched)
    states = states if inp.batched else states[:, 0]
    return (states, trace) if return_trace else states


class _Inputs:
    """The checked inputs: ``A`` as given (``(T, [N,] d[, d])``), ``b`` as given, ``h0`` as ``(N, d)``."""

    def __init__(self, diag, A, b, h0, T, N, d, batched):
        self.diag, self.A, self.b, self.h0 = diag, A, b, h0
        self.T, self.N, self.d, self.batched = T, N, d, batched
        self.dtype = b.dtype
        self.foreign = is_foreign(b)
        # batch axis present on A / b (else one value broadcast over the batch)
        self.A_batched = A.ndim == (3 if diag else 4)
        self.b_batched = b.ndim == 3


def _array(x, what):
    """``x`` as a float array; a list of steps with one odd shape is reported by its step."""
    if is_foreign(x):
        return float_array(x, what, allow_nonfinite=True)
    if isinstance(x, (list, tuple)) and x:
        first = np.shape(x[0])
        for t, item in enumerate(x):
            if np.shape(item) != first:
                raise ValueError(f"{what}: step t={t} has shape {np.shape(item)}, expected {first} "
                                 f"(the shape of step 0)")
    return as_float_array(x, what, allow_nonfinite=True)


def _shape(x) -> tuple:
    """A shape as a plain tuple of ints (torch's ``Size`` prints otherwise), for messages."""
    return tuple(int(n) for n in x.shape)


def _read(A, b, h0) -> _Inputs:
    diag = isinstance(A, Diag)
    what_A = "A (chainprod.Diag values)" if diag else "A"
    a = _array(A.values if diag else A, what_A)
    bb = _array(b, "b")
    sa, sb = _shape(a), _shape(bb)
    if a.ndim not in ((2, 3) if diag else (3, 4)):
        raise ValueError(f"{what_A}: expected {_EXPECTED_A}; got shape {sa}")
    if bb.ndim not in (2, 3):
        raise ValueError(f"b: expected shape (T, d) or (T, N, d), got {sb}")
    T, d = sb[0], sb[-1]
    if sa[0] != T:
        raise ValueError(f"A has T={sa[0]} steps (shape {sa}) but b has T={T} (shape {sb}): "
                         "A and b need one entry per step")
    if a.dtype != bb.dtype:
        raise TypeError(f"A is {dtype_name(a.dtype)} but b is {dtype_name(bb.dtype)}: pass A, b and h0 in one "
                        "dtype (float32 or float64)")
    want = (d,) if diag else (d, d)
    if sa[-len(want):] != want:
        raise ValueError(f"{what_A}: each step must be {'a vector (d,)' if diag else 'a matrix (d, d)'} with d = "
                         f"{d} (from b of shape {sb}), got shape {sa}")
    batches = {}  # who carries a batch axis, and its size
    if a.ndim == (3 if diag else 4):
        batches["A"] = (sa[1], sa)
    if bb.ndim == 3:
        batches["b"] = (sb[1], sb)
    h = None
    if h0 is not None:
        h = float_array(h0, "h0", allow_nonfinite=True)
        sh = _shape(h)
        if h.ndim not in (1, 2) or sh[-1] != d:
            raise ValueError(f"h0: expected shape (d,) = ({d},) or (N, d) with d = {d} (from b of shape "
                             f"{sb}), got {sh}")
        if h.dtype != bb.dtype:
            raise TypeError(f"h0 is {dtype_name(h.dtype)} but b is {dtype_name(bb.dtype)}: pass A, b and h0 in "
                            "one dtype")
        if h.ndim == 2:
            batches["h0"] = (sh[0], sh)
    sizes = {n for n, _ in batches.values()}
    if len(sizes) > 1:
        said = ", ".join(f"{k} has N={n} (shape {s})" for k, (n, s) in batches.items())
        raise ValueError(f"batch sizes differ: {said}; every batched input needs the same N")
    N = sizes.pop() if sizes else 1
    if h is not None:
        bad = nonfinite_index(h)
        if bad is not None:
            raise ValueError(f"h0: contains NaN or infinity (first at index {bad} of shape {_shape(h)})")
    if is_foreign(bb):
        xp = namespace(bb)
        h = xp.zeros((N, d), dtype=bb.dtype, device=device_of(bb)) if h is None else xp.broadcast_to(h, (N, d))
    else:
        h = np.zeros((N, d), bb.dtype) if h is None else np.broadcast_to(h, (N, d))
    return _Inputs(diag, a, bb, h, T, N, d, bool(batches))


def _check_steps(inp):
    """A NaN or infinity in ``A`` or ``b``: the first step ``t`` that holds one, and where in it."""
    a, b = inp.A, inp.b
    what_A = "A (chainprod.Diag values)" if inp.diag else "A"
    if all_finite(a) and all_finite(b):
        return
    a, b = to_numpy(a), to_numpy(b)  # the failing case only: read back to say where
    T = b.shape[0]
    bad_a = ~np.isfinite(a.reshape(T, -1)).all(axis=1)
    bad_b = ~np.isfinite(b.reshape(T, -1)).all(axis=1)
    t = int(np.flatnonzero(bad_a | bad_b)[0])
    name, arr = (what_A, a) if bad_a[t] else ("b", b)
    where = tuple(int(i) for i in np.argwhere(~np.isfinite(arr[t]))[0])
    raise ValueError(f"{name}: contains NaN or infinity at step t={t} (first at index {where} of the step's "
                     f"{arr[t].shape} entry)")


def _body_kind(inp):
    return "affine_diag" if inp.diag else "affine"


def _shapes(inp) -> BlockSeq:
    """The blocks' kinds and shapes with no data (zero-stride views), for the cost model."""
    body = (inp.T, inp.N, 2 * inp.d) if inp.diag else (inp.T, inp.N, inp.d, inp.d + 1)
    zero = np.zeros((), inp.dtype)
    return BlockSeq([Segment("affine", np.broadcast_to(zero, (1, inp.N, inp.d, 1))),
                     Segment(_body_kind(inp), np.broadcast_to(zero, body))])


def _blocks(inp) -> BlockSeq:
    """The ``T + 1`` blocks in scan order, copied (executors may overwrite them in place)."""
    T, N, d = inp.T, inp.N, inp.d
    head = np.empty((1, N, d, 1), inp.dtype)
    head[0, :, :, 0] = inp.h0
    # an input without a batch axis is one value for every sample: broadcast along axis 1
    A = inp.A if inp.A_batched else inp.A[:, None]
    b = inp.b if inp.b_batched else inp.b[:, None]
    if inp.diag:
        body = np.empty((T, N, 2 * d), inp.dtype)
        body[..., :d] = A
        body[..., d:] = b
    else:
        body = np.empty((T, N, d, d + 1), inp.dtype)
        body[..., :d] = A
        body[..., d] = b
    return BlockSeq([Segment("affine", head), Segment(_body_kind(inp), body)], owned=True)


def _array_blocks(inp) -> BlockSeq:
    """:func:`_blocks` for torch / JAX / CuPy inputs: new arrays in their library, on their device.

    Built by ``stack`` and ``concat`` (never a view of an input, and no
    in-place write, which JAX arrays do not allow).
    """
    xp = namespace(inp.b)
    T, N, d = inp.T, inp.N, inp.d
    head = xp.stack([inp.h0])[..., None]  # (1, N, d, 1), a copy: the executor may write into it
    A = xp.broadcast_to(inp.A if inp.A_batched else inp.A[:, None], (T, N, d) if inp.diag else (T, N, d, d))
    b = xp.broadcast_to(inp.b if inp.b_batched else inp.b[:, None], (T, N, d))
    body = xp.concat([A, b], axis=-1) if inp.diag else xp.concat([A, b[..., None]], axis=-1)
    return BlockSeq([Segment("affine", head), Segment(_body_kind(inp), body)], owned=True)


def _scan(inp, blocks, sched, executor, workers, trace, engine_options):
    result = executor.run(sched, blocks, workers=workers, trace=trace, **(engine_options or {}))
    # position 0 is the head (h0) and position t + 1 the constant map h -> h_t, stored as (N, d, 1)
    stacked = result.stack()
    if stacked is not None:
        arr = stacked[1][1:]
    else:
        parts = [result.block(p)[1] for p in range(1, inp.T + 1)]
        arr = namespace(parts[0]).stack(parts) if inp.foreign else np.stack(parts)
    return arr[..., 0] if inp.foreign else np.ascontiguousarray(arr[..., 0])


def _auto_compiled(inp, backend, workers):
    """``(schedule or None, note)`` of ``method="auto"`` on compiled kernels: a scan only if it beats the loop here.

    The cost model prices a scan as the executors run it and the loop as a
    numpy loop (one or two calls per step), so on compiled kernels its
    choice of a scan is a proposal: both are timed once on the call's first
    :data:`PROBE_STEPS` steps (the loop, and the scan as it would run here:
    compiled on ``vectorized``/``threads``, else on the executor) and the
    timings are kept per sizes, dtype, backend and workers.
    """
    sched = resolve_schedule(AUTO, inp.T + 1, workers=workers, blocks=_shapes(inp), backend=backend)
    if sched.name == "sequential":
        return None, "method 'auto' ran the compiled loop: the cost model's best schedule is the sequential one"
    Tp = min(inp.T, PROBE_STEPS)
    key = (sched.name, Tp, inp.N, inp.d, inp.diag, inp.A_batched, inp.b_batched, str(inp.dtype), str(backend),
           workers)

    def measure():
        part = _Inputs(inp.diag, inp.A[:Tp], inp.b[:Tp], inp.h0, Tp, inp.N, inp.d, inp.batched)
        probe = resolve_schedule(sched.name, Tp + 1, workers=workers, backend=backend)
        if backend in COMPILED_BACKENDS:
            threads = workers or COMPILED_BACKENDS[backend]()
            scan = best_seconds(lambda: _compiled_scan(part, probe, threads, None), 3)
        else:
            executor = get_executor(backend)
            scan = best_seconds(lambda: _scan(part, _blocks(part), probe, executor, workers, None, None), 3)
        return best_seconds(lambda: _compiled_loop(part, None), 3), scan

    loop, scan = _AUTO_CHOICES.get(key, measure)
    said = (f"the cost model proposed {sched.name!r}; timed on {Tp} steps here it took {scan * 1e6 / Tp:.3g} us "
            f"per step against the compiled loop's {loop * 1e6 / Tp:.3g} us")
    if scan < loop:
        return sched, f"method 'auto' ran the scan {sched.name!r}: {said}"
    return None, f"method 'auto' ran the compiled loop: {said}"


#: steps of a call on which ``auto`` times the compiled loop against the proposed scan
PROBE_STEPS = 2048
_AUTO_CHOICES = PlanCache(maxsize=128)
_AUTO_PICKS = PlanCache(maxsize=128)


def _compiled_loop(inp, trace):
    """The baseline compiled: one step after another in one kernel call over the inputs as given."""
    from .kernels.affine_numba import linear_loop

    T, N, d = inp.T, inp.N, inp.d
    t0 = trace.clock() if trace is not None else 0.0
    A, b = np.ascontiguousarray(inp.A), np.ascontiguousarray(inp.b)
    h0 = np.ascontiguousarray(inp.h0)  # (N, d): a broadcast h0 becomes N rows
    out = np.empty((T, N, d), inp.dtype)
    block = d if inp.diag else d * d  # one sample's transition
    a_batch = block if inp.A_batched else 0  # 0: one transition for every sample
    b_batch = d if inp.b_batched else 0
    u = np.uint64
    linear_loop(A.reshape(-1), b.reshape(-1), h0.reshape(-1), out.reshape(-1), u(T), u(N), u(d),
                u((N if inp.A_batched else 1) * block), u(a_batch), u((N if inp.b_batched else 1) * d), u(b_batch),
                inp.diag)
    if trace is not None:
        trace.note = trace.note or "method 'sequential': the compiled loop over the steps on this machine"
        trace.add(TraceEvent(0, "numba", t0, trace.clock(), T, "loop"))
    return out


def _compiled_scan(inp, sched, workers, trace):
    """A scan schedule in one call of the compiled affine scan, on ``workers`` threads."""
    from .kernels.affine_scan import affine_layout, form_blocks, run_affine

    T, N, d = inp.T, inp.N, inp.d
    t0 = trace.clock() if trace is not None else 0.0
    # the schedule covers T + 1 positions (h0 first); the kernel's layout counts the T steps
    layout = affine_layout(sched, T, N, d, diag=inp.diag, workers=workers)
    shape = (T, N, d) if inp.diag else (T, N, d, d)
    A = np.broadcast_to(inp.A if inp.A_batched else inp.A[:, None], shape)  # views: read, never written
    b = np.broadcast_to(inp.b if inp.b_batched else inp.b[:, None], (T, N, d))
    buf = np.empty(layout.buf_size, inp.dtype)
    form_blocks(layout, buf, A, b, np.broadcast_to(np.zeros((), inp.dtype), (T, N, d)))
    states, _ = run_affine(layout, buf, inp.h0, workers=workers)
    if trace is not None:
        trace.add(TraceEvent(0, "numba-threads", t0, trace.clock(), sched.num_ops, "compiled affine scan"))
    return states


def _loop(inp, trace):
    """The baseline: one step after another, ``(T, N, d)``."""
    T, N, d = inp.T, inp.N, inp.d
    t0 = trace.clock() if trace is not None else 0.0
    out = np.empty((T, N, d), inp.dtype)
    A, b = inp.A, inp.b
    h = inp.h0
    for t in range(T):
        if inp.diag:
            np.multiply(A[t], h, out=out[t])
        elif inp.A_batched:
            np.matmul(A[t], h[:, :, None], out=out[t][:, :, None])
        else:
            np.matmul(h, A[t].T, out=out[t])
        out[t] += b[t]
        h = out[t]
    if trace is not None:
        trace.note = "method 'sequential': a plain loop over the steps on this machine, no schedule"
        trace.add(TraceEvent(0, "main", t0, trace.clock(), T, "loop"))
    return out


def _overflowed(states, sched):
    """Raise :class:`NonFiniteError` for the first step whose state (of finite inputs) is not finite."""
    states = to_numpy(states)  # the failing case only: read back to say where
    T = states.shape[0]
    ok = np.isfinite(states.reshape(T, -1)).all(axis=1)
    t = int(np.flatnonzero(~ok)[0])
    hint = "" if sched is None else (
        f"; the scan ({sched.name!r}) forms products A_j ... A_i of many steps, which can overflow before the "
        "states do: method='sequential' forms none")
    raise NonFiniteError(f"state h_t at step t={t} is not finite: the recurrence overflowed (inputs are finite)"
                         + hint, (0, t))


def best_seconds(fn, repeats):
    """The fastest of ``repeats`` runs of ``fn()``, in seconds.

    How ``method="auto"`` of the models over time settles a scan against
    their loop where the cost model cannot: the minimum, since on a shared
    machine every other run is the same work plus interference.
    """
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
