"""Partitions: a schedule cut into per-worker task chains, the task graph Ray and Dask run.

How this works (owner computes)
-------------------------------
Scan positions ``0 .. L-1`` are cut into ``P`` contiguous chunks of
``c = ceil(L/P)`` positions; worker ``b`` *owns* chunk ``b``. An op
``[i, k] (x) [k+1, j] -> [i, j]`` runs on the owner of ``j``, the right end
of the interval it produces, so the prefix ``[0, k]`` ends on the owner of
``k`` and the output of a scan never moves between workers.

Walking the schedule's replay (:func:`~chainprod.schedules.replay`, which
also rejects a broken schedule) round by round, the ops of one worker are
*fused* into one task for as long as they only read values that worker
already holds. When a worker needs a value another worker produced, the
producer's task is closed (its value becomes a task result) and the reader
starts a new task that takes that result as an argument. So a task is a run
of rounds on one worker, and only the values that cross a chunk boundary
travel:

* ``chunked`` with ``chunks = P`` becomes: local reduce (one task per
  worker), a scan of the ``P`` chunk totals (a hop per level), local
  down-sweep (one task per worker);
* ``sequential`` becomes ``P`` tasks handing one block along;
* ``sklansky`` / ``brent_kung`` run their first ``log2 c`` levels locally
  in one task and hop only on the levels that span chunks.

Each worker's tasks form a *chain* (every task takes its predecessor as an
argument), so at most ``P`` tasks run at once and a trace can prove it. The
whole DAG is built here from the schedule alone (pure, cached) and submitted
at once by the engine; there is no driver round-trip per round.

The functions the tasks run live in :mod:`chainprod.executors.remote_tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._caches import PlanCache
from ..schedules import Schedule, replay

__all__ = ["TaskSpec", "Partition", "partition", "FROM_INPUT", "EMPTY"]


@dataclass
class TaskSpec:
    """One task of the graph; arguments are ``deps`` (task ids) in this order."""

    tid: int
    worker: int
    kind: str  # "init" | "segment" | "collect"
    index: int = 0  # position in the worker's chain
    rounds: list = field(default_factory=list)  # of (round, left, right, out) slot arrays
    deps: list = field(default_factory=list)  # task ids; deps[0] is the chain predecessor
    reads: dict = field(default_factory=dict)  # slot -> index into deps, for slots read first
    keep: set = field(default_factory=set)  # slots whose final value is returned
    outputs: list = field(default_factory=list)  # collect: (k, slot) pairs
    opened: int = 0
    closed: int | None = None

    @property
    def ops(self) -> int:
        return sum(len(o) for _, _, _, o in self.rounds)

    @property
    def name(self) -> str:
        if self.kind == "segment" and self.rounds:
            return f"w{self.worker}.seg{self.index} rounds {self.rounds[0][0]}..{self.rounds[-1][0]}"
        return f"w{self.worker}.{self.kind}"


@dataclass
class Partition:
    """A partition: one schedule cut into task chains for ``P`` workers (see module docstring)."""

    length: int
    workers: int  # workers that own at least one position
    chunk: int
    tasks: list  # TaskSpec by tid; tids 0..workers-1 are the init tasks
    chains: list  # per worker: its tids in order (init first, collect last)
    init_slots: list  # per worker: input positions its init must hold
    cross_edges: int  # task arguments that cross workers
    segments: int  # combine tasks

    def owner(self, pos):
        return np.minimum(np.asarray(pos) // self.chunk, self.workers - 1)

    @property
    def collect(self) -> list[int]:
        return [c[-1] for c in self.chains]

    def describe(self) -> str:
        return (f"{self.workers} chains of ~{self.chunk} positions, {self.segments} combine tasks, "
                f"{self.cross_edges} cross-worker edges")


_PARTITIONS = PlanCache(maxsize=32)


def partition(schedule: Schedule, workers: int) -> Partition:
    """Cut ``schedule`` into per-worker chains of fused tasks (pure; cached by value).

    Raises :class:`~chainprod.errors.ScheduleError` when the schedule breaks a
    rule (from :func:`~chainprod.schedules.replay`).
    """
    P = int(workers)
    return _PARTITIONS.get((schedule.key, P), lambda: _Partitioner(schedule, P).run())


#: producer marks of a slot that no task result holds
FROM_INPUT = -1  # an input position not yet overwritten: the reader's own init task holds it
EMPTY = -2  # a scratch slot not yet written


class _Partitioner:
    """One walk over the rounds of a schedule, placing each op on the owner of its output.

    State: ``producer[s]`` is the task whose result holds slot ``s`` now (or
    :data:`FROM_INPUT` / :data:`EMPTY`); ``open_task[b]`` is worker ``b``'s
    task still taking ops; ``seq`` orders task openings and closings, so a
    task can tell whether a value it reads was closed after it opened.
    """

    def __init__(self, schedule: Schedule, P: int):
        self.schedule = schedule
        L = schedule.length
        self.chunk = c = max(1, -(-L // P))
        self.nw = nw = -(-L // c)
        self.tasks: list[TaskSpec] = [TaskSpec(b, b, "init", closed=-1) for b in range(nw)]
        self.chains = [[b] for b in range(nw)]
        self.init_slots = [set(range(b * c, min((b + 1) * c, L))) for b in range(nw)]
        self.producer = np.full(schedule.n_slots, EMPTY, dtype=np.int64)
        self.producer[:L] = FROM_INPUT
        self.open_task: list[TaskSpec | None] = [None] * nw
        self.seq = 0
        self.cross = 0

    def owner(self, pos):
        return np.minimum(pos // self.chunk, self.nw - 1)

    def read(self, t: TaskSpec, s: int, src: int):
        """Task ``t`` reads slot ``s`` produced by task ``src``: make it an argument."""
        if src == FROM_INPUT:
            self.init_slots[t.worker].add(s)
            src = t.worker
        if src not in t.deps:
            t.deps.append(src)
            if self.tasks[src].worker != t.worker:
                self.cross += 1
        t.reads[s] = t.deps.index(src)
        if src >= self.nw:
            self.tasks[src].keep.add(s)

    def close(self, t: TaskSpec):
        if t.closed is None:
            self.seq += 1
            t.closed = self.seq
            self.open_task[t.worker] = None

    def run(self) -> Partition:
        sched = self.schedule
        for r, ((_, _, j), st) in enumerate(zip(replay(sched).per_round(), sched.steps)):
            self._place_round(r, st, self.owner(j))
        for t in list(self.open_task):
            if t is not None:
                self.close(t)
        self._add_collects()
        segs = sum(1 for t in self.tasks if t.kind == "segment")
        return Partition(sched.length, self.nw, self.chunk, self.tasks, self.chains,
                         [np.array(sorted(s), dtype=np.int64) for s in self.init_slots], self.cross, segs)

    def _place_round(self, r, st, ob):
        tasks, producer = self.tasks, self.producer
        reads = (st.left, st.right)
        # A value another worker produced in a still-open task must become a
        # task result: close that task at this round boundary.
        for s_arr in reads:
            for b, t in zip(ob.tolist(), producer[s_arr].tolist()):
                if t >= 0 and tasks[t].worker != b and tasks[t].closed is None:
                    self.close(tasks[t])
        # A worker whose open task began before a value it now reads was
        # closed cannot take that value as an argument: split its task.
        for b in np.unique(ob).tolist():
            t_open = self.open_task[b]
            if t_open is None:
                continue
            m = ob == b
            if any(t >= 0 and t != t_open.tid and tasks[t].closed > t_open.opened
                   for s_arr in reads for t in producer[s_arr[m]].tolist()):
                self.close(t_open)
        # Place the ops; record where each task reads its operands.
        for b in np.unique(ob).tolist():
            m = ob == b
            t = self.open_task[b]
            if t is None:
                self.seq += 1
                prev = self.chains[b][-1]
                t = TaskSpec(len(tasks), b, "segment", index=len(self.chains[b]) - 1, deps=[prev], opened=self.seq)
                tasks.append(t)
                self.chains[b].append(t.tid)
                self.open_task[b] = t
            left, right, out = st.left[m], st.right[m], st.out[m]
            for s in np.concatenate([left, right]).tolist():
                src = int(producer[s])
                if src == t.tid or s in t.reads:
                    continue
                if src == EMPTY:  # pragma: no cover - replay() rules this out
                    raise RuntimeError(f"round {r}: slot {s} read before written")
                self.read(t, s, src)
            t.rounds.append((r, left, right, out))
        for b in np.unique(ob).tolist():
            producer[st.out[ob == b]] = self.open_task[b].tid

    def _add_collects(self):
        """Each worker gathers the prefixes it owns."""
        sched = self.schedule
        ks = np.flatnonzero(sched.outputs >= 0)
        kown = self.owner(ks)
        for b in range(self.nw):
            t = TaskSpec(len(self.tasks), b, "collect", index=len(self.chains[b]) - 1, deps=[self.chains[b][-1]])
            if b not in t.deps:
                t.deps.append(b)  # its own init: inputs and, for grad, the layer data
            for k in ks[kown == b].tolist():
                s = int(sched.outputs[k])
                self.read(t, s, int(self.producer[s]))
                t.outputs.append((k, s))
            self.tasks.append(t)
            self.chains[b].append(t.tid)
