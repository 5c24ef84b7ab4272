"""What every executor shares: the run contract, results and traces.

An executor runs a :class:`~chainprod.schedules.Schedule` on a
:class:`~chainprod.blocks.BlockSeq` and knows nothing about layers. The
contract, tested once for every registered executor
(``tests/test_executor_contract.py``)::

    result = executor.run(schedule, blocks, workers=P, trace=trace)
    result.block(k)   # (kind, array) of the prefix [0, k], for each k in outputs

must equal a left fold of the blocks to rounding, whatever the schedule.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..planning.bind import as_index

__all__ = ["Executor", "ScanResult", "ListResult", "Trace", "TraceEvent"]


class Executor:
    """Base class: subclasses set ``name`` and implement :meth:`run`.

    Attributes
    ----------
    name : str
        The backend name (traces and messages).
    runs_task_graphs : bool
        A declared capability, read by :func:`chainprod.grad.backward`.
        ``False`` (the default): ``grad`` forms the Jacobian blocks on the
        driver and hands them to :meth:`run`. ``True``: the executor also
        provides ``prepare(workers) -> P`` and ``run_graph(part, inits, *,
        workers, token_parts, segment, collect, collect_label, trace,
        **options)`` as
        :class:`~chainprod.executors.distributed.DistributedExecutor` does
        (Ray, Dask), and ``grad`` runs the Jacobians, the scan and the
        parameter VJPs as one task graph on its workers
        (:mod:`chainprod.backward_remote`): only per-layer gradients come back.
    """

    name = "?"
    runs_task_graphs: bool = False

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):  # pragma: no cover
        raise NotImplementedError

    def check_options(self, options):
        """Local executors take no engine options: say so instead of ignoring them."""
        if options:
            raise TypeError(f"backend {self.name!r} takes no engine options, got {sorted(options)}; "
                            "engine_options (timeout, retries) are for 'ray' and 'dask'")

    def __repr__(self):
        return f"<{type(self).__name__} {self.name!r}>"


class ScanResult:
    """Prefix products produced by a run, addressed by scan position ``k``."""

    length: int

    def block(self, k: int) -> tuple[str, np.ndarray]:  # pragma: no cover
        """``(kind, array)`` of the prefix ``[0, k]``; the array is ``(N, ...)``."""
        raise NotImplementedError

    def available(self) -> np.ndarray:  # pragma: no cover
        """Positions ``k`` whose prefix was produced."""
        raise NotImplementedError

    def stack(self, positions=None) -> tuple[str, np.ndarray] | None:
        """All requested prefixes as one ``(n, N, ...)`` array if they share kind and shape.

        Returns ``None`` when they do not (varying widths); callers then use
        :meth:`block` per position.
        """
        ks = self.available() if positions is None else np.asarray(positions)
        blocks = [self.block(int(k)) for k in ks]
        kinds = {b[0] for b in blocks}
        shapes = {b[1].shape for b in blocks}
        if len(kinds) != 1 or len(shapes) != 1:
            return None
        return kinds.pop(), np.stack([b[1] for b in blocks])

    def first_nonfinite(self) -> int | None:
        """Smallest position whose prefix holds a NaN or infinity, else ``None``."""
        for k in self.available():
            if not np.all(np.isfinite(self.block(int(k))[1])):
                return int(k)
        return None


class ListResult(ScanResult):
    """A result held as one ``(kind, array)`` per position (``None`` if absent)."""

    def __init__(self, items):
        self.items = list(items)
        self.length = len(self.items)

    def block(self, k):
        item = self.items[k]
        if item is None:
            raise KeyError(f"prefix [0, {k}] was not produced by this schedule")
        return item

    def available(self):
        return np.array([k for k, it in enumerate(self.items) if it is not None], dtype=np.int64)


class SlabResult(ScanResult):
    """A result that lives in the slabs of a bound plan (vectorised executors)."""

    def __init__(self, plan, slabs):
        self.plan = plan
        self.slabs = slabs
        self.length = plan.schedule.length

    def available(self):
        return np.flatnonzero(self.plan.out_slab >= 0)

    def block(self, k):
        s = int(self.plan.out_slab[k])
        if s < 0:
            raise KeyError(f"prefix [0, {k}] was not produced by this schedule")
        return self.plan.slabs[s].kind, self.slabs[s][int(self.plan.out_row[k])]

    def stack(self, positions=None):
        ks = self.available() if positions is None else np.asarray(positions, dtype=np.int64)
        sids = self.plan.out_slab[ks]
        if ks.size and np.all(sids == sids[0]) and sids[0] >= 0:
            s = int(sids[0])
            return self.plan.slabs[s].kind, self.slabs[s][as_index(self.plan.out_row[ks])]
        return super().stack(ks)

    def first_nonfinite(self):
        bad = []
        for s in np.unique(self.plan.out_slab[self.plan.out_slab >= 0]):
            rows = self.plan.out_row[self.plan.out_slab == s]
            ks = np.flatnonzero(self.plan.out_slab == s)
            arr = self.slabs[int(s)]
            if np.isfinite(arr).all():  # the common case: skip the per-row reduction
                continue
            ok = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)[rows]
            if not ok.all():
                bad.append(int(ks[np.flatnonzero(~ok)[0]]))
        return min(bad) if bad else None


@dataclass
class TraceEvent:
    """One task of a run: what it did, where, and when (seconds since the run began)."""

    round: int
    worker: str
    start: float
    end: float
    ops: int
    task: str = ""


@dataclass
class Trace:
    """Measured record of a run: one :class:`TraceEvent` per task.

    Pass a ``Trace()`` as ``trace=`` to an executor (or ``return_trace=True``
    to :func:`chainprod.suffix_products` / :func:`chainprod.grad`); rounds,
    observed concurrency and Gantt charts come from these measurements, not
    from the plan.
    """

    backend: str = ""
    workers: int | None = None
    #: the Schedule that ran (set by the planner: says what ``method="auto"`` chose)
    schedule: object = None
    #: why the run took the path it took, when a choice was made for the user (e.g. ``method="auto"``
    #: on a cluster running locally because the cluster's predicted time exceeds local backprop's)
    note: str = ""
    events: list = field(default_factory=list)
    #: work of a run outside the combine rounds (Jacobians, VJPs, collection on Ray/Dask workers)
    other_events: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, event: TraceEvent):
        with self._lock:
            self.events.append(event)

    @property
    def rounds(self) -> int:
        """Distinct rounds that ran at least one task."""
        return len({e.round for e in self.events})

    @property
    def num_tasks(self) -> int:
        return len(self.events)

    def peak_concurrency(self) -> int:
        """Most tasks observed running at the same instant."""
        edges = sorted([(e.start, 1) for e in self.events] + [(e.end, -1) for e in self.events],
                       key=lambda t: (t[0], t[1]))
        cur = peak = 0
        for _, d in edges:
            cur += d
            peak = max(peak, cur)
        return peak

    @property
    def span(self) -> float:
        """Wall time from the first task start to the last task end."""
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    def to_records(self) -> list[dict]:
        return [dict(e.__dict__) for e in self.events]


def alloc_slabs(plan, blocks):
    """Slabs for a run. A slab that is exactly one owned input segment aliases it."""
    slabs = [None] * len(plan.slabs)
    if blocks.owned:
        for (sid, rows), seg in zip(plan.placement, blocks.segments):
            if (isinstance(rows, slice) and rows.start == 0 and rows.step in (None, 1)
                    and plan.slabs[sid].count == seg.count and seg.array.flags.writeable):
                slabs[sid] = seg.array
    for i, s in enumerate(plan.slabs):
        if slabs[i] is None:
            slabs[i] = np.empty(s.shape(blocks.batch), dtype=blocks.dtype)
    for (sid, rows), seg in zip(plan.placement, blocks.segments):
        if slabs[sid] is not seg.array:
            slabs[sid][rows] = seg.array
    return slabs


def run_group(g, slabs, lo=0, hi=None):
    """Run ops ``lo:hi`` of group ``g`` (all of it by default)."""
    li, ri, oi = g.li, g.ri, g.oi
    if lo != 0 or (hi is not None and hi != g.size):
        li, ri, oi = (_sub(ix, lo, hi) for ix in (li, ri, oi))
    a = slabs[g.left][li]
    b = slabs[g.right][ri]
    if isinstance(oi, slice):
        # Strided view: the kernel writes in place. numpy detects the overlap
        # of an in-place circuit (out is one of the operands) and buffers.
        g.kernel(a, b, out=slabs[g.out][oi])
    else:
        slabs[g.out][oi] = g.kernel(a, b)


def _sub(ix, lo, hi):
    if isinstance(ix, slice):
        step = ix.step or 1
        return slice(ix.start + lo * step, ix.start + hi * step, step)
    return ix[lo:hi]
