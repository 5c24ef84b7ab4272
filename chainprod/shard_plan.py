"""Which plan a sharded step runs across its shards: the pipeline or a scan.

A step of a model on ``P`` shards (:mod:`chainprod.shard`) gives every shard
the row entering its chunk from above either in pipeline order
(``"backprop"``: ``P-1`` dependent hops) or by a prefix scan over the ``P-1``
elements ``[row of the top shard, T_{P-2}, ..., T_1]`` (a
:class:`~chainprod.schedules.Schedule` of that length). :func:`resolve_plan`
turns the ``method=`` a caller passed into one of the two.

``method="auto"`` (:func:`auto_plan`) compares the flops on the critical path
of the two (the scan's slowest product plus its combine rounds plus the
slowest local backprop, against the sum of the lower shards' backprops) and
picks the smaller. A dense product costs about ``w/2`` times a backprop per
layer, so the scan pays only when ``P`` is well above ``w/2``; with
``P <= 2`` the two are the same plan. It reads only the shards' packed layer
tables: nothing here talks to a worker.
"""

from __future__ import annotations

import numpy as np

from .schedules import Schedule, valid_methods
from .schedules import schedule as build_schedule

__all__ = ["resolve_plan", "auto_plan"]


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
