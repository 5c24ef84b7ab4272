"""Gradients through time of one recurrent layer by a scan: the adjoints as a reverse linear recurrence.

One layer of an RNN, GRU or LSTM carries a state ``s_t`` (``h_t``, or
``(h_t, c_t)`` for an LSTM: ``S = H`` or ``2H`` numbers per sample). With a
loss term at every step, the adjoint ``lambda_t = dloss/ds_t`` obeys

    lambda_t = J_{t+1}^T lambda_{t+1} + g_t,      J_{t+1} = ds_{t+1}/ds_t,      g_t = [dloss/dh_t, 0]

an affine recurrence run backwards in time, which
:func:`chainprod.linear_recurrence` computes with any scan schedule (the
state Jacobians are dense, one per step and sample, ``(T, N, S, S)``).
From every ``lambda_t`` each step's own gradients are local, so they are
formed for all steps at once. :func:`scan_backward` returns exactly what a
recurrent kernel set's ``backward`` returns (:mod:`chainprod.kernels.recurrent_numpy`),
so a model runs either through the same code. :func:`auto_uses_scan` asks
the cost model whether any scan beats the loop. ``docs/recurrences.md``
has the Jacobians written out.
"""

from __future__ import annotations

import numpy as np

from ._caches import PlanCache
from .blocks import BlockSeq, Segment
from .cost import AUTO, predict, predict_backprop, resolve_schedule
from .recurrence import best_seconds, linear_recurrence

__all__ = ["auto_uses_scan", "probe_scan", "probed_loop_wins", "scan_backward", "state_jacobians", "step_grads"]


def _chunks(a, H, k):
    return [a[..., j * H:(j + 1) * H] for j in range(k)]


def _prev(Hs, h0):
    """``h_{t-1}`` of every step: ``h0``, then every state but the last."""
    return np.concatenate([h0[None], Hs[:-1]], axis=0)


def _prev_c(cell, Z, c0, H):
    if cell != "lstm":
        return None
    return np.concatenate([c0[None], Z[:-1, :, 4 * H:]], axis=0)


def state_jacobians(cell, W_hh, Hs, Z, h0, c0):
    """``J_t = ds_t/ds_{t-1}`` of every step and sample, ``(T, N, S, S)``.

    Parameters
    ----------
    cell : {"rnn_tanh", "rnn_relu", "gru", "lstm"}
    W_hh : ndarray, (G*H, H)
    Hs, Z : ndarray
        What the kernel set's ``forward`` returned.
    h0, c0 : ndarray (N, H)
        The initial state (``c0`` for ``"lstm"`` only, else None).

    Returns
    -------
    ndarray, (T, N, S, S)
        ``S = H``, or ``2H`` for an LSTM with the state ordered ``(h, c)``.
    """
    T, N, H = Hs.shape
    eye = np.arange(H)
    h_prev = _prev(Hs, h0)
    if cell in ("rnn_tanh", "rnn_relu"):
        d = 1 - Hs * Hs if cell == "rnn_tanh" else (Hs > 0).astype(Hs.dtype)
        return d[..., None] * W_hh  # diag(f'(a_t)) W_hh
    if cell == "gru":
        W_r, W_z, W_n = W_hh[:H], W_hh[H:2 * H], W_hh[2 * H:]
        r, z, n, ghn = _chunks(Z, H, 4)
        dn = (1 - z) * (1 - n * n)  # dh_t / d(pre-activation of n)
        # h_t = (1 - z) n + z h_{t-1}: through n (r times the n-chunk, and r itself), through z, and directly
        J = (dn * r)[..., None] * W_n + (dn * ghn * r * (1 - r))[..., None] * W_r
        J += ((h_prev - n) * z * (1 - z))[..., None] * W_z
        J[..., eye, eye] += z
        return J
    W_i, W_f, W_g, W_o = (W_hh[k * H:(k + 1) * H] for k in range(4))
    i, f, g, o, c = _chunks(Z, H, 5)
    c_prev = _prev_c(cell, Z, c0, H)
    tc = np.tanh(c)
    dtc = o * (1 - tc * tc)  # dh_t / dc_t
    dc_dh = ((c_prev * f * (1 - f))[..., None] * W_f + (g * i * (1 - i))[..., None] * W_i
             + (i * (1 - g * g))[..., None] * W_g)
    J = np.zeros((T, N, 2 * H, 2 * H), Hs.dtype)
    J[..., :H, :H] = (tc * o * (1 - o))[..., None] * W_o + dtc[..., None] * dc_dh
    J[..., eye, H + eye] = dtc * f  # dh_t / dc_{t-1}
    J[..., H:, :H] = dc_dh
    J[..., H + eye, H + eye] = f  # dc_t / dc_{t-1}
    return J


def step_grads(cell, Hs, Z, h0, c0, lam_h, lam_c):
    """Each step's own gradients from the adjoints: ``(dX, dgh)``, both ``(T, N, G*H)``.

    ``lam_h`` is the total adjoint of ``h_t`` (the loss terms and the later
    steps); ``lam_c`` that of ``c_t`` through later steps only (``h_t`` held
    fixed), for ``"lstm"``. ``dX`` is ``dloss/dX_t``, ``dgh`` is
    ``dloss/d(h_{t-1} W_hh^T + b_hh)`` (they differ for the GRU only, where
    ``r`` multiplies the n-chunk of the latter).
    """
    H = Hs.shape[2]
    if cell == "rnn_tanh":
        da = lam_h * (1 - Hs * Hs)
        return da, da
    if cell == "rnn_relu":
        da = lam_h * (Hs > 0)  # relu'(0) = 0, as torch takes it
        return da, da
    if cell == "gru":
        r, z, n, ghn = _chunks(Z, H, 4)
        dan = lam_h * (1 - z) * (1 - n * n)
        dar = dan * ghn * r * (1 - r)
        daz = lam_h * (_prev(Hs, h0) - n) * z * (1 - z)
        return np.concatenate([dar, daz, dan], axis=2), np.concatenate([dar, daz, dan * r], axis=2)
    i, f, g, o, c = _chunks(Z, H, 5)
    tc = np.tanh(c)
    dc = lam_c + lam_h * o * (1 - tc * tc)
    da = np.concatenate([dc * g * i * (1 - i), dc * _prev_c(cell, Z, c0, H) * f * (1 - f), dc * i * (1 - g * g),
                         lam_h * tc * o * (1 - o)], axis=2)
    return da, da


def _block_shapes(T, N, S, dtype):
    """The reverse recurrence's blocks with no data (zero-stride views), as ``linear_recurrence`` forms them."""
    zero = np.zeros((), dtype)
    return BlockSeq([Segment("affine", np.broadcast_to(zero, (1, N, S, 1))),
                     Segment("affine", np.broadcast_to(zero, (T, N, S, S + 1)))])


def auto_uses_scan(T, N, S, dtype, backend, workers):
    """The scan schedule the cost model picks for the adjoints, or ``None`` when the loop wins.

    The loop is backprop through time (the kernel set's ``backward``): a
    scan's interior products cost ``2 S^3`` flops per op against the
    loop's ``2 S^2`` per step, so it wins only with more than about ``S``
    workers. The chosen scan must also beat the compiled backprop through
    time (:func:`chainprod.cost.predict_backprop`, as a dense chain of ``T``
    steps of width ``S`` costs it): the schedule choice compares scans with
    the *sequential schedule* of the same blocks, which forms every ``S x S``
    block and costs far more than the loop.
    """
    if backend.__class__ is str:  # the answer depends only on sizes and names: kept (it cost 0.2 ms a call)
        return _SCAN_CHOICES.get((T, N, S, str(np.dtype(dtype)), backend, workers),  # a 1-tuple: None is an answer
                                 lambda: (_auto_uses_scan(T, N, S, dtype, backend, workers),))[0]
    return _auto_uses_scan(T, N, S, dtype, backend, workers)


_SCAN_CHOICES = PlanCache(maxsize=256)


def _auto_uses_scan(T, N, S, dtype, backend, workers):
    blocks = _block_shapes(T, N, S, dtype)
    sched = resolve_schedule(AUTO, T + 1, workers=workers, blocks=blocks, backend=backend)
    if sched.name == "sequential":
        return None
    name = getattr(backend, "name", backend)
    if predict_backprop(T, S, N) < predict(sched, blocks, backend=name, workers=workers):
        return None
    return sched.name


#: steps of the probe that settles ``auto`` when the cost model proposes a scan
PROBE_STEPS = 256
_CHOICES = PlanCache(maxsize=128)


def _probe_key(cell, sched, X_shape, H, dtype, backend, workers, kern_name):
    T, N, GH = X_shape
    return (cell, sched, min(T, PROBE_STEPS), (N, GH), H, str(dtype), str(getattr(backend, "name", backend)), workers,
            kern_name)


def probed_loop_wins(cell, sched, X_shape, H, dtype, backend, workers, kern_name):
    """True where :func:`probe_scan` has already timed backprop through time faster than ``sched`` for this problem.

    False where it has not been timed (in this process, since the caches were
    last cleared) or the scan won. Measures nothing.
    """
    known = _CHOICES.peek(_probe_key(cell, sched, X_shape, H, dtype, backend, workers, kern_name))
    return known is not None and not known[1] < known[0]


def probe_scan(kern, kern_name, sched, args, *, backend, workers):
    """Seconds per step of the kernel set's ``backward`` and of the scan ``sched``, on the first steps of ``args``.

    The cost model costs scans as the executors run them but the compiled
    backprop through time only as a chain of dense layers, which it is not:
    where the model proposes a scan, ``auto`` times both once on the first
    :data:`PROBE_STEPS` steps of the call's own data (the same work per step
    as any data) and keeps the answer per cell, shape, dtype, backend and
    workers. Returns ``(loop, scan)``, the best of a few runs each.
    """
    cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs = args
    Tp = min(X.shape[0], PROBE_STEPS)
    part = (cell, X[:Tp], W_hh, b_hh, h0, c0, Hs[:Tp], Z[:Tp], dHs[:Tp])
    key = _probe_key(cell, sched, X.shape, Hs.shape[2], X.dtype, backend, workers, kern_name)

    def measure():
        loop = best_seconds(lambda: kern.backward(*part), 3) / Tp
        scan = best_seconds(lambda: scan_backward(*part, method=sched, backend=backend, workers=workers,
                                                  kernels=kern_name), 2) / Tp
        return loop, scan

    return _CHOICES.get(key, measure)


def scan_backward(cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs, dhT=None, dcT=None, *, method, backend="vectorized",
                  workers=None, trace=None, engine_options=None, kernels=None):
    """A kernel set's ``backward`` with the adjoints from a scan of the reverse recurrence.

    Parameters
    ----------
    cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs, dhT, dcT
        As for ``backward`` of :mod:`chainprod.kernels.recurrent_numpy`.
    method : str
        A scan schedule name (or ``"auto"``), passed to
        :func:`chainprod.linear_recurrence` with ``backend``, ``workers``
        and ``engine_options``.
    kernels : {"numba", "numpy"}, optional
        Who runs the scan (``linear_recurrence``'s ``kernels``).
    trace : chainprod.Trace, optional
        Receives the scan's events.

    Returns
    -------
    dX, dW_hh, db_hh, dh0, dc0
        As the kernel set's ``backward`` returns them.
    """
    T, N, H = Hs.shape
    lstm = cell == "lstm"
    S = 2 * H if lstm else H
    J = state_jacobians(cell, W_hh, Hs, Z, h0, c0)
    # reversed time: mu_s = lambda_{T-1-s} = J_{T-s}^T mu_{s-1} + g_{T-1-s}, from mu_0 = g_{T-1} (+ the adjoint
    # arriving from later): the transposes are views of J, which linear_recurrence copies into its blocks once
    G = np.zeros((T, N, S), Hs.dtype)
    G[:, :, :H] = dHs[::-1]
    if dhT is not None:
        G[0, :, :H] += dhT
    if lstm and dcT is not None:
        G[0, :, H:] += dcT
    if T > 1:
        out = linear_recurrence(np.swapaxes(J[:0:-1], -1, -2), G[1:], G[0], method=method, backend=backend,
                                workers=workers, return_trace=trace if trace is not None else False,
                                engine_options=engine_options, kernels=kernels)
        G[1:] = out[0] if trace is not None else out
    lam = G[::-1]
    lam_h, lam_c = lam[..., :H], (lam[..., H:] if lstm else None)
    dX, dgh = step_grads(cell, Hs, Z, h0, c0, lam_h, lam_c)
    GH = dgh.shape[2]
    dW = dgh.reshape(-1, GH).T @ _prev(Hs, h0).reshape(-1, H)
    db = dgh.sum(axis=(0, 1))
    lam0 = np.matmul(np.swapaxes(J[0], -1, -2), lam[0][..., None])[..., 0]  # J_0^T lambda_0 = dloss/ds_{-1}
    return dX, dW, db, np.ascontiguousarray(lam0[:, :H]), (np.ascontiguousarray(lam0[:, H:]) if lstm else None)
