"""What a sharded step runs across its shards: its checked batch, the pipeline or a scan, its calls.

A step of a model on ``P`` shards (:mod:`chainprod.shard`) gives every shard
the row entering its chunk from above either in pipeline order
(``"backprop"``: ``P-1`` dependent hops) or by a prefix scan over the ``P-1``
elements ``[row of the top shard, T_{P-2}, ..., T_1]`` (a
:class:`~chainprod.schedules.Schedule` of that length). :func:`resolve_plan`
turns the ``method=`` a caller passed into one of the two:

``method="backprop"`` (the baseline, pipeline order)
    the top shard hands the row leaving its bottom to the shard below, which
    backprops its chunk from it and hands its own bottom row down: ``P-1``
    dependent hops, ``O(w^2)`` per layer.
scan (``"sklansky"``, ``"brent_kung"``, ``"chunked"``, ...)
    every shard ``1 .. P-2`` forms its chunk's Jacobian product
    ``T_b = A_end ... A_start`` (per sample, ``w x w``, ``O(w^3)`` per layer)
    while the others do the same; then a prefix scan over the ``P-1``
    elements ``[row of the top shard, T_{P-2}, ..., T_1]`` (the plan is
    :func:`chainprod.schedule` of that length, ``ceil(log2(P-1))`` rounds)
    gives prefix ``k = u_{P-2-k}``, the row entering shard ``P-2-k``. Each op
    ``[i,k] (x) [k+1,j]`` runs on the shard that needs prefix ``j`` (shard
    ``P-2-j``), so the last op of every chain lands where its result is used.
    Then every shard backprops its chunk from its row, all at once.

``method="auto"`` (:func:`auto_plan`) compares the flops on the critical path
of the two (the scan's slowest product plus its combine rounds plus the
slowest local backprop, against the sum of the lower shards' backprops) and
picks the smaller. A dense product costs about ``w/2`` times a backprop per
layer, so the scan pays only when ``P`` is well above ``w/2``; with
``P <= 2`` the two are the same plan. It reads only the shards' packed layer
tables.

:func:`submit_step` submits one step's calls in the order of the plan
through an engine (:mod:`chainprod.executors.sharded_ray`,
:mod:`chainprod.executors.sharded_dask`) without waiting for any of them;
the driver (:mod:`chainprod.shard`) waits for the reports.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array
from .grad import LOSSES
from .schedules import Schedule, valid_methods
from .schedules import schedule as build_schedule

__all__ = ["check_batch", "resolve_plan", "auto_plan", "submit_step"]


def check_batch(chain, x, y, loss):
    """``(x, y, loss)`` of a step on ``chain`` checked: contiguous ``(N, d)`` arrays and the loss name.

    ``loss=None`` means ``"sum"`` without ``y`` and ``"mse"`` with it, as in
    :func:`chainprod.value_and_grad`; ``y`` is ``None`` for ``"sum"``.
    """
    x2, one = chain.check_input(x)
    x2 = np.ascontiguousarray(x2)
    if loss is None:
        loss = "sum" if y is None else "mse"
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(LOSSES))}")
    N, d_out = x2.shape[0], chain.d_out
    if loss == "sum":
        if y is not None:
            raise ValueError("loss='sum' takes no targets y; use loss='mse' for targets")
        if d_out != 1:
            raise ValueError(f"grad of the model output needs output width 1, but the last layer has width "
                             f"{d_out}; pass targets y= with loss='mse' for a vector output")
        return x2, None, loss
    y = as_float_array(y, "y", ndim=(1, 2))
    expect = (d_out,) if one else (N, d_out)
    if not (y.shape == expect or (d_out == 1 and y.shape == (N,) and not one)):
        raise ValueError(f"y has shape {y.shape} but the model output has shape {expect}")
    if y.dtype != chain.dtype:
        raise TypeError(f"y is {y.dtype} but the chain is {chain.dtype}")
    return x2, np.ascontiguousarray(y.reshape(N, d_out)), loss


def resolve_plan(method, tables, N):
    """``"backprop"`` or the scan :class:`~chainprod.schedules.Schedule` a step runs for ``method``.

    Parameters
    ----------
    method : str or Schedule
        ``"auto"``, ``"backprop"``, a scan name, or a Schedule of length ``P-1``.
    tables : list of PackedChain
        Each shard's layers (``P = len(tables)``).
    N : int
        Batch size.
    """
    P = len(tables)
    if isinstance(method, Schedule):
        if P > 1 and method.length != P - 1:
            raise ValueError(f"a Schedule for a sharded model scans the P-1 = {P - 1} chunk products, "
                             f"got one of length {method.length}")
        if not method.is_scan:
            raise ValueError(f"schedule {method.name!r} does not produce every prefix; a step needs a scan")
        return method if P > 2 else "backprop"
    if not isinstance(method, str) or (method not in ("auto", "backprop") and method not in valid_methods()):
        raise ValueError(f"unknown method {method!r}; valid methods: auto, backprop, "
                         f"{', '.join(valid_methods())}")
    if P <= 2 or method == "backprop":
        return "backprop"  # with P <= 2 a scan over P-1 <= 1 element is the pipeline itself
    if method == "auto":
        return auto_plan(tables, N)
    return build_schedule(method, P - 1, workers=P)


def auto_plan(tables, N):
    """``"backprop"`` or a Sklansky scan, whichever has fewer flops on its critical path (``P > 2``)."""
    P = len(tables)
    bp, prod = [], []
    for t in tables:
        dense = t.kind == 0
        per_layer = np.where(dense, 4 * t.d_out * t.d_in, 4 * t.d_out)
        bp.append(N * float(per_layer.sum()))
        dtop = float(t.d_out[-1])
        prod.append(N * 2 * dtop * float(np.where(dense, t.d_out * t.d_in, t.d_out).sum()))
    sched = build_schedule("sklansky", P - 1, workers=P)
    w = float(max(t.d_out.max() for t in tables))
    scan_path = max(prod[1:P - 1]) + sched.rounds * 2 * N * w ** 3 + max(bp)
    backprop_path = sum(bp[:P - 1]) + bp[P - 1]
    return sched if scan_path < backprop_path else "backprop"


def submit_step(engine, plan, step, x, y, loss, updates, boundary=None):
    """Submit every call of one step on ``engine.P`` shards; nothing is waited for.

    Parameters
    ----------
    engine : RayShards or DaskShards
        ``engine.call(b, method, *args)`` returns ``(value handle, report handle)``.
    plan : "backprop" or Schedule
        From :func:`resolve_plan`.
    step : int
        The step's number (the shards label their gradients with it).
    x, y, loss
        The batch, its targets (or None) and the loss name.
    updates : list of (seq, step, lr)
        Pending SGD updates, applied by each shard before its forward pass.
    boundary : list of ndarray, optional
        The state entering each shard ``1 .. P-1`` (a Newton forward pass
        found them, :mod:`chainprod.shard_newton`): every shard runs its
        chunk forward from its own at once instead of in pipeline order.

    Returns
    -------
    finals : dict
        ``{shard: report handle}`` of each shard's last call of the step.
    consumed : set
        Shards whose final value another shard consumed (its report travels with it on Dask).
    """
    P, eng = engine.P, engine
    finals, prev = {}, x
    for b in range(P - 1):
        if boundary is None:
            prev, _ = eng.call(b, "forward", step, prev, updates)
        else:
            eng.call(b, "forward", step, x if b == 0 else boundary[b - 1], updates, False)
    if boundary is not None and P > 1:
        prev = boundary[P - 2]
    top_row, finals[P - 1] = eng.call(P - 1, "forward_top", step, prev, updates, y, loss)
    consumed = set() if P == 1 else {P - 1}
    if P > 1 and (isinstance(plan, str) or P == 2):
        row = top_row
        for b in range(P - 2, -1, -1):
            row, finals[b] = eng.call(b, "backward", step, row, b > 0)
            if b > 0:
                consumed.add(b)
    elif P > 1:
        n = P - 1
        slots = [top_row] + [eng.call(P - 1 - p, "product")[0] for p in range(1, n)]
        slots += [None] * (plan.n_slots - n)
        for r, (st, (_, _, j)) in enumerate(zip(plan.steps, plan.intervals())):
            new = {}
            for left, right, out, jj in zip(st.left.tolist(), st.right.tolist(), st.out.tolist(), j.tolist()):
                new[out] = eng.call(P - 2 - jj, "combine", slots[left], slots[right], r)[0]
            for out, h in new.items():  # every op of a round reads before any writes
                slots[out] = h
        for b in range(P - 1):
            _, finals[b] = eng.call(b, "backward", step, slots[int(plan.outputs[P - 2 - b])], False)
    return finals, consumed
