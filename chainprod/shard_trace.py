"""The trace of one sharded training step: its events, the bytes it moved, its rounds.

:class:`ShardTrace` is what ``ShardedModel.value_and_grad(...,
return_trace=True)`` returns (:mod:`chainprod.shard`); :func:`fill_trace`
turns the reports the shards sent at the end of a step (their events, the
bytes they sent) into it, and :func:`check_finite` raises what they say
overflowed. Nothing here talks to a worker: the step's call
graph is in :mod:`chainprod.shard`, the worker's side in
:mod:`chainprod.executors.sharded_worker`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NonFiniteError
from .executors import Trace, TraceEvent

__all__ = ["ShardTrace", "fill_trace", "check_finite", "union_seconds"]


@dataclass
class ShardTrace(Trace):
    """The record of one sharded step: a :class:`~chainprod.executors.Trace` plus what moved.

    ``events`` holds every call on every shard (worker = ``host/pid``,
    times in seconds since the step began). ``rounds`` is the number of
    dependent cross-shard hops of the backward pass (``P-1`` for backprop,
    ``max(1, rounds of the scan)`` for a scan). ``bytes_moved`` counts the
    numpy payload bytes that crossed a process boundary, where they were
    sent: the driver's arguments (``x``, ``y``), every value a shard returned
    (activations, rows, products) and the reports the driver read.
    """

    method: str = ""
    bytes_moved: int = 0
    hops: int = 0
    #: seconds from submission to the end of the top shard's forward pass, and from there to the end
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    total_seconds: float = 0.0
    #: wall time with at least one shard computing (the union of the events)
    compute_seconds: float = 0.0
    #: this step started with a checkpoint of every shard's parameters (their bytes are in bytes_moved)
    checkpoint: bool = False
    #: shards replaced during this step
    replaced: tuple = ()
    #: the forward pass that ran: "sequential" (the pipeline) or a Newton method (:mod:`chainprod.shard_newton`)
    forward: str = "sequential"
    #: the Newton pass's :class:`~chainprod.newton_solve.NewtonTrace` (iterations, residuals, fallback), or None
    newton: object = None
    #: bytes each Newton iteration moved, both ways (in ``bytes_moved`` too); independent of the depth
    newton_bytes: list = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return self.hops

    @property
    def overhead_seconds(self) -> float:
        """Step time minus the time the workers were computing."""
        return self.total_seconds - self.compute_seconds


def fill_trace(trace: ShardTrace, reports: dict, wall0: float, clock0: float, sent: int, shards: int) -> None:
    """Complete ``trace`` (its ``total_seconds`` already set) from the end-of-step reports.

    Parameters
    ----------
    trace : ShardTrace
        Of the step; ``schedule`` is the scan that ran across the shards, if one did.
    reports : dict
        ``{shard: report}``, the report of each shard's last call of the step.
    wall0, clock0 : float
        ``time.time()`` and ``trace.clock()`` when the step was submitted: the
        shards stamp events with their wall clock, the trace counts from ``t0``.
    sent : int
        Bytes the driver counted itself (its arguments, reports riding with values).
    shards : int
        ``P``.
    """
    off = wall0 - clock0
    t_top_forward = None
    for b in sorted(reports):
        rep = reports[b]
        sent += rep["sent"]
        for rnd, where, t0, t1, ops, task in rep["events"]:
            trace.add(TraceEvent(int(rnd), where, t0 - off, t1 - off, int(ops), task))
            if b == shards - 1 and task.endswith(".forward"):
                t_top_forward = t1 - off
    trace.bytes_moved += sent
    P = shards
    scan = not isinstance(trace.schedule, (str, type(None)))
    trace.hops = 0 if P == 1 else (max(1, trace.schedule.rounds) if scan and P > 2 else P - 1)
    end = clock0 + trace.total_seconds
    trace.forward_seconds = (t_top_forward if t_top_forward is not None else end) - clock0
    trace.backward_seconds = end - clock0 - trace.forward_seconds
    trace.compute_seconds = union_seconds([(e.start, e.end) for e in trace.events])


def check_finite(reports: dict, L: int) -> None:
    """Raise :class:`~chainprod.errors.NonFiniteError` if a shard's report says its forward or backward overflowed.

    ``reports`` as :func:`fill_trace` takes them; ``L`` the model's number of layers (named in the error).
    """
    bad_f = [r["bad_forward"] for r in reports.values() if r["bad_forward"] >= 0]
    if bad_f:
        raise NonFiniteError(f"the forward pass overflowed: the output of layer {min(bad_f)} is NaN or "
                             "infinite (inputs and parameters are finite)", (min(bad_f), min(bad_f)))
    bad_b = [r["bad_backward"] for r in reports.values() if r["bad_backward"] >= 0]
    if bad_b:
        first = max(bad_b) + 1
        raise NonFiniteError(f"the backward pass produced a non-finite gradient: the product of the input "
                             f"Jacobians of layers {min(first, L - 1)}..{L - 1} (0-based) overflowed",
                             (min(first, L - 1), L - 1))


def union_seconds(intervals) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total
