"""Gradients through time of the diagonal recurrence layer (:class:`chainprod.DiagonalRecurrence`).

With ``g_t = dloss/dy_t`` the adjoint ``lambda_t = dloss/dh_t`` of
``h_t = a * h_{t-1} + B u_t``, ``y_t = C h_t + D u_t`` obeys the same
recurrence run backwards, ``lambda_t = a * lambda_{t+1} + C^T g_t``
(``lambda_T = 0``), and::

    da = sum_t lambda_t * h_{t-1}     dB = sum_t lambda_t u_t^T     dC = sum_t g_t h_t^T     dD = sum_t g_t u_t^T
    du_t = B^T lambda_t + D^T g_t     dh0 = a * lambda_0

(sums over the batch too). Only the two recurrences are sequential; every
projection runs over all steps at once in one BLAS product. ``"backprop"``
runs the recurrences as loops of a kernel set (compiled:
:mod:`chainprod.kernels.ssm_numba`; reference:
:mod:`chainprod.kernels.ssm_numpy`); every scan schedule runs them with
:func:`chainprod.linear_recurrence` on :class:`~chainprod.blocks.Diag`
blocks. The input checks and the forward pass the layer uses live here too,
so that this module does not import the layer's. ``docs/recurrences.md`` has
the derivation and the costs.
"""

from __future__ import annotations

import numpy as np

from ._caches import PlanCache
from ._validate import as_float_array, check_workers
from .blocks import BlockSeq, Diag, Segment
from .cost import AUTO, resolve_schedule, valid_schedules
from .errors import NonFiniteError
from .executors import Executor, TraceEvent, get_executor, valid_backends
from .forward_methods import add_forward_note, gradient_tape
from .grad import make_trace
from .kernels import ssm_numpy
from .kernels.ssm_numpy import first_bad_step
from .recurrence import best_seconds, linear_recurrence
from .tape import resolve_kernels

__all__ = ["outputs", "read_h0", "read_u", "run_states", "to_layout", "value_and_grad"]

LOSSES = ("sum", "mse")


# -- inputs and the forward pass ----------------------------------------------------------------------------
def read_u(layer, u):
    """``u`` time-first and C-contiguous, ``(T, N, d_in)``, checked (a copy only when needed)."""
    shape = np.shape(u)
    layout = "(N, T, d_in)" if layer.batch_first else "(T, N, d_in)"
    if len(shape) != 3 or shape[2] != layer.d_in or 0 in shape:
        raise ValueError(f"u: expected shape {layout} with d_in = {layer.d_in} (from B of shape "
                         f"{layer.params['B'].shape}) and T, N >= 1, got {shape} (one sequence: add a batch "
                         "axis of size 1)")
    arr = as_float_array(u, "u", allow_nonfinite=True)
    if arr.dtype != layer.dtype:
        raise TypeError(f"u is {arr.dtype} but the layer is {layer.dtype}: pass u in the layer's dtype")
    arr = np.ascontiguousarray(arr.transpose(1, 0, 2) if layer.batch_first else arr)
    t = first_bad_step(arr)
    if t >= 0:
        n, i = (int(k) for k in np.argwhere(~np.isfinite(arr[t]))[0])
        raise ValueError(f"u: contains NaN or infinity at step t={t} (sample n={n}, feature {i}; u has shape "
                         f"{shape}, layout {layout})")
    return arr


def read_h0(layer, h0, N):
    """``h0`` as ``(N, d)``, and the shape it was given in (``(N, d)`` or ``(d,)``)."""
    if h0 is None:
        return np.zeros((N, layer.d), layer.dtype), (N, layer.d)
    h = as_float_array(h0, "h0", allow_nonfinite=True)
    if h.shape not in ((N, layer.d), (layer.d,)):
        raise ValueError(f"h0: expected shape (N, d) = ({N}, {layer.d}) or (d,) = ({layer.d},), got {h.shape}")
    if h.dtype != layer.dtype:
        raise TypeError(f"h0 is {h.dtype} but the layer is {layer.dtype}: pass h0 in the layer's dtype")
    if not np.isfinite(h).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(h))[0])
        raise ValueError(f"h0: contains NaN or infinity (first at index {bad} of shape {h.shape})")
    return np.ascontiguousarray(np.broadcast_to(h, (N, layer.d))), h.shape

# -- forward ------------------------------------------------------------------------------------
def outputs(layer, uu, H):
    """``y = C h + D u`` for every step, ``(T, N, d_out)``, checked for overflow."""
    T, N = uu.shape[:2]
    p = layer.params
    y = (H.reshape(T * N, layer.d) @ p["C"].T).reshape(T, N, layer.d_out)
    if layer.has_feedthrough:
        y += (uu.reshape(T * N, layer.d_in) @ p["D"].T).reshape(T, N, layer.d_out)
    t = first_bad_step(y)
    if t >= 0:
        raise NonFiniteError(f"output y_t at step t={t} is not finite: C h_t + D u_t overflowed (the states "
                             "are finite)", (0, t))
    return y


def to_layout(layer, arr):
    """A time-first array in the layer's layout (a batch-first copy with ``batch_first``)."""
    return arr.transpose(1, 0, 2).copy() if layer.batch_first else arr


def _loops(kernels):
    """The two sequential loops of a kernel set: ``(states, adjoint)``."""
    if kernels == "numpy":
        return ssm_numpy.states, ssm_numpy.adjoint
    from .kernels import ssm_numba  # loaded only here: ``import chainprod`` never loads numba

    return ssm_numba.states, ssm_numba.adjoint


def run_states(layer, uu, h, kernels, trace=None):
    """Every state by the sequential loop, ``(T, N, d)``; ``X = B u`` first, one BLAS product."""
    T, N = uu.shape[:2]
    t0 = trace.clock() if trace is not None else 0.0
    H = (uu.reshape(T * N, layer.d_in) @ layer.params["B"].T).reshape(T, N, layer.d)
    states, _ = _loops(kernels)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the step
        bad = states(layer.params["a"], H, h, H)  # in place: X = B u is not needed afterwards
    if trace is not None:
        trace.add(TraceEvent(0, "main", t0, trace.clock(), T, "states loop"))
    if bad >= 0:
        raise NonFiniteError(f"state h_t at step t={bad} is not finite: the recurrence overflowed (inputs are "
                             f"finite; max |a| = {float(np.abs(layer.params['a']).max()):.3g})", (0, bad))
    return H


# -- gradients ----------------------------------------------------------------------------------------------
def _loss_terms(layer, Y, y, loss):
    """The loss and ``g_t = dloss/dy_t`` for every step, time first."""
    if loss == "sum":
        if y is not None:
            raise ValueError("loss='sum' takes no targets y (it is the sum of every output); use loss='mse'")
        return float(Y.sum(dtype=np.float64)), np.ones_like(Y)
    if y is None:
        raise ValueError("loss='mse' needs targets y shaped like the output sequence")
    yy = as_float_array(y, "y", allow_nonfinite=True)
    want = (Y.shape[1], Y.shape[0], Y.shape[2]) if layer.batch_first else Y.shape
    if yy.shape != want:
        layout = "(N, T, d_out)" if layer.batch_first else "(T, N, d_out)"
        raise ValueError(f"y: expected the output's shape {layout} = {want}, got {yy.shape}")
    if yy.dtype != layer.dtype:
        raise TypeError(f"y is {yy.dtype} but the layer is {layer.dtype}: pass y in the layer's dtype")
    yy = yy.transpose(1, 0, 2) if layer.batch_first else yy
    diff = np.subtract(Y, yy, out=Y)  # over the outputs, which are ours and not needed again; y is only read
    t = first_bad_step(diff)
    if t >= 0:
        raise ValueError(f"y: contains NaN or infinity at step t={t}")
    flat = diff.reshape(-1)
    # float64: one BLAS dot, no temporary; float32: summed in float64, as a float32 dot would lose digits
    sq = np.dot(flat, flat) if flat.dtype == np.float64 else np.sum(np.square(flat, dtype=np.float64))
    value = float(sq) / flat.size
    diff *= Y.dtype.type(2.0 / diff.size)
    return value, diff


def _check_method(method, backend):
    if not isinstance(method, str):
        raise TypeError(f"method must be 'backprop', 'auto' or a scan schedule name, got {method!r}")
    names = [n for n in valid_schedules() if n != "tree"]
    if method == "tree":
        raise ValueError("method 'tree' forms only the total product, not every state; use 'backprop', 'auto' "
                         f"or a scan schedule: {names}")
    if method != "backprop" and method not in names:
        raise ValueError(f"method: unknown {method!r}; use 'backprop' or one of {names}")
    if not (isinstance(backend, Executor) or (isinstance(backend, str) and backend in valid_backends())):
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")


def _auto(layer, T, N, backend, workers, kernels):
    """``method="auto"``: the scan the cost model picks, or ``None`` for the loop; and why, for the trace.

    The cost model costs scans as the executors run them but has no entry
    for this compiled loop, so when it proposes a scan, both are timed once
    on a prefix of ``_PROBE`` steps of zeros (the same work per step as any
    data) and the choice is kept per shape, dtype, backend and workers.
    """
    def resolve():
        zero = np.zeros((), layer.dtype)
        blocks = BlockSeq([Segment("affine", np.broadcast_to(zero, (1, N, layer.d, 1))),
                           Segment("affine_diag", np.broadcast_to(zero, (T, N, 2 * layer.d)))])
        return resolve_schedule(AUTO, T + 1, workers=workers, blocks=blocks, backend=backend)

    # the cost model's pick depends only on sizes and names: kept per call signature (costing it took 0.2 ms)
    sched = (_SCHEDULES.get((T, N, layer.d, str(layer.dtype), backend, workers), resolve)
             if backend.__class__ is str else resolve())
    if sched.name == "sequential":
        return None, f"auto ran the {kernels} loop: the cost model's best schedule is the sequential one"
    Tp = min(T, _PROBE)
    key = (sched.name, Tp, N, layer.d, str(layer.dtype), str(backend), workers, kernels)
    loop, scan = _CHOICES.get(key, lambda: _probe(layer, sched.name, Tp, N, backend, workers, kernels))
    said = (f"the cost model proposed {sched.name!r}; timed on {Tp} steps here it took {scan * 1e6 / Tp:.3g} us "
            f"per step against the {kernels} loop's {loop * 1e6 / Tp:.3g} us")
    if scan >= loop:
        return None, f"auto ran the {kernels} loop: {said}"
    return sched, f"auto ran the scan {sched.name!r}: {said}"


_PROBE = 2048
_CHOICES = PlanCache(maxsize=128)
_SCHEDULES = PlanCache(maxsize=128)


def _probe(layer, method, Tp, N, backend, workers, kernels):
    """Seconds of the loop and of the scan ``method`` for ``Tp`` steps of the state recurrence (best of a few)."""
    X, h = np.zeros((Tp, N, layer.d), layer.dtype), np.zeros((N, layer.d), layer.dtype)
    A = Diag(np.broadcast_to(layer.params["a"], (Tp, layer.d)))
    states = _loops(kernels)[0]

    loop = best_seconds(lambda: states(layer.params["a"], X, h, np.empty_like(X)), 3)
    scan = best_seconds(lambda: linear_recurrence(A, X, h, method=method, backend=backend, workers=workers,
                                                  kernels=kernels), 2)
    return loop, scan


def _scan_states(layer, uu, h, method, backend, workers, trace, engine_options, kernels):
    T, N = uu.shape[:2]
    X = (uu.reshape(T * N, layer.d_in) @ layer.params["B"].T).reshape(T, N, layer.d)
    A = Diag(np.broadcast_to(layer.params["a"], (T, layer.d)))  # one a for every step: a view, no copy
    return linear_recurrence(A, X, h, method=method, backend=backend, workers=workers,
                             return_trace=trace if trace is not None else False, engine_options=engine_options,
                             kernels=kernels)


def _scan_adjoints(layer, G, H, h, method, backend, workers, trace, engine_options, kernels):
    """``lambda`` by :func:`~chainprod.linear_recurrence` in reversed time, and ``da``."""
    T = G.shape[0]
    A = Diag(np.broadcast_to(layer.params["a"], (T, layer.d)))
    try:
        out = linear_recurrence(A, G[::-1], method=method, backend=backend, workers=workers,
                                return_trace=trace if trace is not None else False, engine_options=engine_options,
                                kernels=kernels)
    except NonFiniteError as e:
        s = e.layers[1]
        raise NonFiniteError(f"adjoint lambda_t at step t={T - 1 - s} is not finite: the reverse recurrence "
                             "overflowed", (T - 1 - s, T - 1)) from None
    L = (out[0] if trace is not None else out)[::-1]
    da = np.einsum("tni,tni->i", L[1:], H[:-1]) + np.einsum("ni,ni->i", L[0], h)
    return L, da


def value_and_grad(layer, u, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
                   return_trace=False, engine_options=None, kernels=None, h0=None, with_inputs=False,
                   forward="sequential", forward_options=None):
    """The loss over every step of a :class:`DiagonalRecurrence` and its gradients through time.

    Called by ``cp.value_and_grad(layer, u, y, ...)`` and ``cp.grad``.

    Parameters
    ----------
    layer : chainprod.DiagonalRecurrence
    u : array, (T, N, d_in)
        The inputs (``(N, T, d_in)`` with ``layer.batch_first``).
    y : array, optional
        Targets shaped like the output sequence, for ``loss="mse"``.
    loss : {"sum", "mse"}, optional
        ``"sum"``: the sum of every output; ``"mse"``: the mean of the
        squared error over every entry. Default: ``"mse"`` with ``y``, else
        ``"sum"``.
    method : str
        ``"backprop"``: both recurrences as compiled loops. Any scan
        schedule of :func:`chainprod.valid_schedules` but ``"tree"``: both
        by :func:`chainprod.linear_recurrence` with that schedule.
        ``"auto"`` (the default): the compiled loop unless the cost model
        predicts its best scan faster on ``backend`` with ``workers``.
    backend, workers, engine_options
        As in :func:`chainprod.linear_recurrence`; the scans only.
    return_trace : bool or Trace
        Also return a :class:`~chainprod.Trace`; its ``note`` says what
        ``"auto"`` ran and why.
    kernels : {"numba", "numpy"}, optional
        The compiled loops or their numpy reference (the default as in
        :func:`chainprod.grad`).
    h0 : array, optional
        The state before step 0, ``(N, d)`` or ``(d,)``; zeros by default.
    with_inputs : bool
        Also return ``"input"`` (``dloss/du``, shaped like ``u``) and
        ``"h0"`` (shaped like ``h0``; ``(N, d)`` when not given).
    forward, forward_options
        The forward pass of the states, as in :func:`chainprod.grad` (a
        Newton method solves this linear recurrence in one iteration).

    Returns
    -------
    value : float
    grads : dict of numpy.ndarray
        ``"a"``, ``"B"``, ``"C"`` (and ``"D"``), summed over time and batch,
        in the layer's dtype. With ``return_trace``, a triple ``(value,
        grads, trace)``. Nothing passed in is modified.

    Raises
    ------
    ValueError
        Bad shapes, NaN or infinity (naming the step), an unknown loss,
        method or backend.
    TypeError
        Inputs in a dtype other than the layer's.
    chainprod.errors.NonFiniteError
        A state, output, adjoint or gradient overflowed (naming the step).
    """
    loss = loss if loss is not None else ("sum" if y is None else "mse")
    if loss not in LOSSES:
        raise ValueError(f"loss: unknown {loss!r}; use one of {list(LOSSES)}")
    _check_method(method, backend)
    kernels = resolve_kernels(kernels)
    workers = check_workers(workers)
    uu = read_u(layer, u)
    h, h0_shape = read_h0(layer, h0, uu.shape[1])
    T, N = uu.shape[:2]
    trace = make_trace(return_trace, backend, workers)
    if engine_options:
        get_executor(backend).check_options(engine_options)  # never ignored in silence, loop or scan
    sched, note = None, f"method 'backprop': the sequential loops of the {kernels} kernels"
    if method == AUTO:
        sched, note = _auto(layer, T, N, backend, workers, kernels)
    elif method != "backprop":
        sched, note = method, f"method {method!r}: both recurrences by chainprod.linear_recurrence"
    p = layer.params
    H, ftrace = gradient_tape(layer, uu, forward=forward, forward_options=forward_options, h0=h, kernels=kernels,
                              backend=backend, workers=workers)
    if H is None and sched is None:
        H = run_states(layer, uu, h, kernels, trace)
    elif H is None:
        H = _scan_states(layer, uu, h, method, backend, workers, trace, engine_options, kernels)
        H = H[0] if trace is not None else H
    Y = outputs(layer, uu, H)
    value, g = _loss_terms(layer, Y, y, loss)
    g2, u2, H2 = g.reshape(T * N, layer.d_out), uu.reshape(T * N, layer.d_in), H.reshape(T * N, layer.d)
    G = (g2 @ p["C"]).reshape(T, N, layer.d)  # C^T g_t for every step: the adjoint's direct terms
    if sched is None:
        t0 = trace.clock() if trace is not None else 0.0
        da = np.empty(layer.d, layer.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            _loops(kernels)[1](p["a"], G, H, h, G, da)  # in place: the adjoints overwrite their direct terms
        L = G
        if trace is not None:
            trace.add(TraceEvent(1, "main", t0, trace.clock(), T, "adjoint loop"))
    else:
        L, da = _scan_adjoints(layer, G, H, h, method, backend, workers, trace, engine_options, kernels)
    L2 = L.reshape(T * N, layer.d)
    grads = {"a": da, "B": L2.T @ u2, "C": g2.T @ H2}
    if layer.has_feedthrough:
        grads["D"] = g2.T @ u2
    if with_inputs:
        du = (L2 @ p["B"]).reshape(T, N, layer.d_in)
        if layer.has_feedthrough:
            du += (g2 @ p["D"]).reshape(T, N, layer.d_in)
        dh0 = p["a"] * L[0]
        grads["input"] = to_layout(layer, du)
        grads["h0"] = dh0 if len(h0_shape) == 2 else dh0.sum(axis=0)
    _check_grads(grads, L)
    if trace is not None:
        trace.note = note  # after the scans, which write their own
    return (value, grads, add_forward_note(trace, ftrace)) if trace is not None else (value, grads)


def _check_grads(grads, L):
    bad = [k for k, v in grads.items() if not np.isfinite(v).all()]
    if not bad:
        return
    t = first_bad_step(L)
    if t >= 0:
        # the adjoint runs from the last step down: the overflow started at the highest bad step
        last = L.shape[0] - 1 - first_bad_step(L[::-1])
        raise NonFiniteError(f"adjoint lambda_t is not finite from step t={last} down: the reverse recurrence "
                             f"overflowed (gradients {bad})", (t, last))
    raise NonFiniteError(f"gradients {bad} are not finite: their sums over time overflowed (states and adjoints "
                         "are finite)", None)
