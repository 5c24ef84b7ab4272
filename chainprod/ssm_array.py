"""The diagonal recurrence layer (:class:`chainprod.DiagonalRecurrence`) on torch, JAX or CuPy arrays.

``layer.forward(u)``, ``cp.grad(layer, u)`` and ``cp.value_and_grad`` with a
foreign ``u`` land here (:mod:`chainprod.ssm` asks
:func:`chainprod.arrays.is_foreign`). The math is :mod:`chainprod.ssm_grad`'s,
written against the array API standard and run in ``u``'s library, on its
device, in its dtype::

    h_t = a * h_{t-1} + B u_t,   y_t = C h_t + D u_t,   lambda_t = a * lambda_{t+1} + C^T g_t

The two recurrences run as plain loops (``"backprop"``) or both by
:func:`chainprod.linear_recurrence` on :class:`~chainprod.blocks.Diag` blocks
(any scan schedule), which takes foreign arrays to the ``"array"``
executor; every projection and every sum over time is one product over all
``T N`` rows. ``"auto"``: the loops on a CPU device (the numpy path's probe
times compiled loops, which do not exist here, and each step of a loop in
``xp`` is two small kernels); on an accelerator the ``"sklansky"`` scan once
``T >= 16``: a diagonal scan costs ``O(d)`` per op, about what a loop step
costs, and ``ceil(log2 T)`` rounds of a few launches replace ``T`` dependent
steps of launches. The parameters are converted once per layer, library,
device and dtype (:func:`chainprod.recurrent_array.params_like`).
"""

from __future__ import annotations

import math

from .arrays import common_library, device_of, dtype_name, namespace, on_accelerator
from .blocks import Diag
from .errors import NonFiniteError
from .executors import TraceEvent
from .grad import make_trace
from .recurrence import linear_recurrence
from .recurrent_array import check_finite, check_foreign_options, detached, params_like, read_array
from .recurrent_array_cells import run_steps
from .recurrent_io import resolve_loss

__all__ = ["ACCELERATOR_MIN_STEPS", "forward", "value_and_grad"]

#: on an accelerator ``method="auto"`` runs the ``"sklansky"`` scan from this many steps on
ACCELERATOR_MIN_STEPS = 16


def _read(xp, layer, u, h0):
    """``(uu, h, h0's shape, params)``: ``u`` time-first ``(T, N, d_in)``, ``h`` ``(N, d)``, checked."""
    want = dtype_name(layer.dtype)
    if dtype_name(u.dtype) != want:
        raise TypeError(f"u is {dtype_name(u.dtype)} but the layer is {want}: pass u in the layer's dtype")
    shape = tuple(u.shape)
    layout = "(N, T, d_in)" if layer.batch_first else "(T, N, d_in)"
    if len(shape) != 3 or shape[2] != layer.d_in or 0 in shape:
        raise ValueError(f"u: expected shape {layout} with d_in = {layer.d_in} (from B of shape "
                         f"{layer.params['B'].shape}) and T, N >= 1, got {shape} (one sequence: add a batch "
                         "axis of size 1)")
    uu = xp.permute_dims(u, (1, 0, 2)) if layer.batch_first else u
    bad = check_finite(xp, uu)
    if bad is not None:
        raise ValueError(f"u: contains NaN or infinity at step t={bad[0]} (sample n={bad[1]}, feature {bad[2]}; u "
                         f"has shape {shape}, layout {layout})")
    N, d = uu.shape[1], layer.d
    if h0 is None:
        h, h_shape = xp.zeros((N, d), dtype=u.dtype, device=device_of(u)), (N, d)
    else:
        h = read_array(xp, h0, "h0", shapes=((N, d), (d,)), dtype=want, device=device_of(u))
        h, h_shape = xp.broadcast_to(h, (N, d)), tuple(h0.shape)
    return uu, h, h_shape, params_like(layer, u)


def _flat(xp, a):
    return xp.reshape(a, (a.shape[0] * a.shape[1], a.shape[2]))


def _states(xp, p, uu, h, sched, workers, trace, engine_options):
    """Every state ``(T, N, d)``: the loop ``h_t = a * h_{t-1} + B u_t``, or the scan ``sched``."""
    T, N = uu.shape[:2]
    X = xp.reshape(_flat(xp, uu) @ p["B"].T, (T, N, p["B"].shape[0]))  # B u of every step in one product
    if sched is None:
        t0 = trace.clock() if trace is not None else 0.0
        H = run_steps(xp, "diagonal", None, (p["a"],), h, (X,))[1][0]
        if trace is not None:
            trace.add(TraceEvent(0, "main", t0, trace.clock(), T, "states loop (array)"))
    else:
        A = Diag(xp.broadcast_to(p["a"], (T, p["a"].shape[0])))  # one a for every step: a view, no copy
        H = linear_recurrence(A, X, h, method=sched, backend="array", workers=workers,
                              return_trace=trace if trace is not None else False, engine_options=engine_options)
        H = H[0] if trace is not None else H
    bad = check_finite(xp, H)
    if bad is not None:
        raise NonFiniteError(f"state h_t at step t={bad[0]} is not finite: the recurrence overflowed (inputs are "
                             "finite)", (0, bad[0]))
    return H


def _outputs(xp, layer, p, uu, H):
    """``y = C h + D u`` for every step, ``(T, N, d_out)``, checked for overflow."""
    T, N = uu.shape[:2]
    Y = _flat(xp, H) @ p["C"].T
    if layer.has_feedthrough:
        Y = Y + _flat(xp, uu) @ p["D"].T
    Y = xp.reshape(Y, (T, N, layer.d_out))
    bad = check_finite(xp, Y)
    if bad is not None:
        raise NonFiniteError(f"output y_t at step t={bad[0]} is not finite: C h_t + D u_t overflowed (the states "
                             "are finite)", (0, bad[0]))
    return Y


def _layout(xp, layer, a):
    return xp.permute_dims(a, (1, 0, 2)) if layer.batch_first else a


def forward(layer, u, h0=None, *, return_states=False):
    """``layer.forward(u, h0, return_states=...)`` for a foreign ``u``: arrays of its library, device and dtype."""
    common_library({"u": u, "h0": h0})
    xp = namespace(u)
    uu, h, _, p = _read(xp, layer, u, h0)
    H = _states(xp, p, uu, h, None, None, None, None)
    y = _layout(xp, layer, _outputs(xp, layer, p, uu, H))
    return (y, _layout(xp, layer, H)) if return_states else y


def _loss_terms(xp, layer, Y, y, loss, like):
    """The loss as a float and ``g_t = dloss/dy_t`` of every step, time first."""
    if loss == "sum":
        return float(xp.sum(Y)), xp.ones_like(Y)
    T, N, d_out = Y.shape
    want = (N, T, d_out) if layer.batch_first else (T, N, d_out)
    yy = read_array(xp, y, "y", shapes=(want,), dtype=dtype_name(like.dtype), device=device_of(like),
                    layout=" (the output's shape)")
    diff = Y - _layout(xp, layer, yy)
    return float(xp.mean(diff * diff)), diff * (2.0 / math.prod(diff.shape))


def value_and_grad(layer, u, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
                   return_trace=False, engine_options=None, kernels=None, h0=None, with_inputs=False,
                   forward="sequential", forward_options=None):
    """:func:`chainprod.ssm_grad.value_and_grad` for a foreign ``u``: arguments and results as there.

    ``grads`` are arrays of ``u``'s library, device and dtype; ``value`` a
    float. ``kernels`` must be None and ``forward`` ``"sequential"``.
    """
    loss = resolve_loss(loss, y)
    library = common_library({"u": u, "y": y, "h0": h0})
    check_foreign_options(library, method=method, backend=backend, kernels=kernels, forward=forward,
                          forward_options=forward_options)
    u, y, h0 = detached(u), detached(y), detached(h0)  # gradients come from here, not from autograd
    xp = namespace(u)
    uu, h, h_shape, p = _read(xp, layer, u, h0)
    T, N = uu.shape[:2]
    trace = make_trace(return_trace, "array", workers)
    sched, note = (None, "method 'backprop': both recurrences as loops in the arrays' library") \
        if method == "backprop" else (method, f"method {method!r}: both recurrences by chainprod.linear_recurrence")
    if method == "auto":
        accelerator = on_accelerator(u)
        scan = accelerator and T >= ACCELERATOR_MIN_STEPS
        sched = "sklansky" if scan else None
        note = ("method 'auto' on an accelerator ran the scan 'sklansky': ceil(log2 T) rounds of O(d) ops replace T "
                "dependent steps of kernel launches") if scan else "method 'auto' ran the loops: " + (
            f"T={T} steps, under {ACCELERATOR_MIN_STEPS}" if accelerator else "a CPU device")
    H = _states(xp, p, uu, h, sched, workers, trace, engine_options)
    value, g = _loss_terms(xp, layer, _outputs(xp, layer, p, uu, H), y, loss, u)
    g2, u2 = _flat(xp, g), _flat(xp, uu)
    G = xp.reshape(g2 @ p["C"], (T, N, layer.d))  # C^T g_t for every step: the adjoint's direct terms
    if sched is None:
        L = run_steps(xp, "diagonal", None, (p["a"],), xp.zeros_like(h), (G,), reverse=True)[1][0]
    else:
        A = Diag(xp.broadcast_to(p["a"], (T, layer.d)))
        out = linear_recurrence(A, xp.flip(G, axis=0), method=sched, backend="array", workers=workers,
                                return_trace=trace if trace is not None else False, engine_options=engine_options)
        L = xp.flip(out[0] if trace is not None else out, axis=0)
    bad = check_finite(xp, L)
    if bad is not None:
        raise NonFiniteError(f"adjoint lambda_t is not finite at step t={bad[0]}: the reverse recurrence overflowed",
                             (bad[0], T - 1))
    da = xp.sum(L[1:, ...] * H[:-1, ...], axis=(0, 1)) + xp.sum(L[0, ...] * h, axis=0)
    L2 = _flat(xp, L)
    grads = {"a": da, "B": L2.T @ u2, "C": g2.T @ _flat(xp, H)}
    if layer.has_feedthrough:
        grads["D"] = g2.T @ u2
    if with_inputs:
        du = L2 @ p["B"]
        if layer.has_feedthrough:
            du = du + g2 @ p["D"]
        dh0 = p["a"] * L[0, ...]
        grads["input"] = _layout(xp, layer, xp.reshape(du, (T, N, layer.d_in)))
        grads["h0"] = dh0 if len(h_shape) == 2 else xp.sum(dh0, axis=0)
    if trace is None:
        return value, grads
    trace.note = note  # after the scans, which write their own
    return value, grads, trace
