"""Resident shards on Dask: each shard lives in one pinned worker process.

A shard is a :class:`~chainprod.executors.sharded_worker.ShardState` kept in
a dict of the worker process (:data:`_STATE`, keyed by model and shard).
Every call is a task restricted to that worker (``workers=[address]``,
``allow_other_workers=False``, ``pure=False``), taking as arguments the
futures of the values it consumes (Dask moves them worker to worker) and,
within one attempt, the future of the shard's previous call, so the calls of
one shard run in the order they were submitted. Across attempts no future is
passed on: the driver has waited for the last call of every shard before it
starts the next step or fetch, so the order holds without it, and a chain of
dependencies from each call to the one before would keep every call since the
model was placed on the scheduler (it could not forget a task that a live
task depends on). Calls of an abandoned attempt still queued or running on a
worker are fenced off by the epoch every call carries
(``ShardState.run``). A task returns a
:class:`~chainprod.executors.sharded_worker.Reply`; the consumer unwraps its
``value``, the driver reads its ``report``.

A worker that dies takes its shards with it; the scheduler would keep the
pinned tasks waiting for an address that is gone, so the driver checks,
while it waits, that every shard's worker is still there. Whatever shows the
loss (a worker gone from the cluster, a ``KilledWorker``, a restarted worker
without the shard), the shards named lost are those whose worker is gone or
that the error names, never the shard whose call happened to fail first (a
call that consumes a lost shard's value fails too); the driver replaces them
(:mod:`chainprod.shard_recovery`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings

import distributed
from distributed.scheduler import KilledWorker

from .. import errors
from ..errors import DistributedError, DistributedTimeoutError
from .sharded_worker import Reply, ShardLost, ShardState

__all__ = ["DaskShards"]

#: in a worker process: (model id, shard) -> ShardState
_STATE: dict = {}

#: seconds between the driver's checks that every shard's worker is still there
POLL_SECONDS = 0.5

#: calls between two trims of what the scheduler records per submission (:meth:`DaskShards.trim_scheduler_records`)
TRIM_EVERY = 1000

#: the task group of every call (see ``DaskShards.__init__``)
GROUP = "chainprod-shard"


class ShardMissing(RuntimeError):
    """A call reached a worker that does not hold its shard (the worker was restarted).

    ``shard`` is the missing shard's index (the exception travels pickled:
    both arguments are kept in ``args``).
    """

    def __init__(self, message, shard):
        super().__init__(message, shard)
        self.shard = shard

    def __str__(self):
        return str(self.args[0])


# -- on the workers -------------------------------------------------------------------
def _create(model, b, spec, theta, applied, log):
    import os

    _STATE[(model, b)] = ShardState(spec, theta, applied, log)
    return Reply(os.getpid())


def _call(model, b, epoch, method, after, *args):
    # `after` is the shard's previous call of the same attempt: an argument only to order the calls
    st = _STATE.get((model, b))
    if st is None:
        raise ShardMissing(f"shard {b} of model {model} is not on this worker", b)
    args = [a.value if isinstance(a, Reply) else a for a in args]
    value, report = st.run(epoch, method, *args)
    return Reply(value, report)


def _drop(model, b):
    _STATE.pop((model, b), None)


def _nothing():
    return None


def _trim_span_records(dask_scheduler, group):
    # on the scheduler: the span of `group` appends one metadata entry per submission and never
    # drops one (distributed 2026.8); keep the first. Best effort: these are the scheduler's internals.
    try:
        tg = dask_scheduler.task_groups.get(group)
        span = dask_scheduler.extensions["spans"].spans[tg.span_id]
        entries = span.metadata["collections"]
    except Exception:
        return 0
    dropped = max(0, len(entries) - 1)
    del entries[1:]
    return dropped


# -- on the driver --------------------------------------------------------------------
def _done_event(futs):
    """An Event set once every future is done (finished, erred or cancelled).

    Waiting on it never raises. Waiting with a timeout that raises (the engine's
    own wait) would leave the exception's traceback in a reference cycle that
    holds the futures, so their keys would stay on the scheduler until Python's
    cycle collector happened to run.
    """
    event, left, lock = threading.Event(), [len(futs)], threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            if left[0] == 0:
                event.set()

    if not futs:
        event.set()
    for f in futs:
        f.add_done_callback(one_done)
    return event


class DaskShards:
    """The engine side of a sharded model on Dask (see module docstring)."""

    name = "dask"
    #: a consumed Reply carries its report along to the consumer
    reports_travel_with_values = True

    def __init__(self, executor, P):
        self.client = executor.connect(P)
        self.P = P
        self.model = uuid.uuid4().hex[:12]
        # Every call's key starts "chainprod-shard-<shard number>-": Dask groups tasks by the words
        # before the first number, so all of them fall in one task group. Holding one task of that
        # group for the model's life keeps the group, and the scheduler's span it belongs to, alive:
        # otherwise each step would find its group gone, and the scheduler would open a new group
        # and a new span, which it keeps forever (about 2 KiB of the driver's RSS per step, where
        # an embedded scheduler runs, and some on every worker).
        self.anchor = self.client.submit(_nothing, key=self._key(0, "anchor"), pure=False)
        self.submitted = 0
        self.addr = [None] * P
        self._last = [None] * P
        self.epoch = 0
        #: futures of the current attempt (all cancelled when it fails)
        self.inflight: list = []

    def _key(self, b, what):
        return f"{GROUP}-{b}-{self.model}-{what}-{uuid.uuid4().hex[:8]}"

    def new_epoch(self):
        """Start an attempt: later calls carry a newer epoch and depend on no earlier call."""
        self.epoch += 1
        self._last = [None] * self.P
        self.inflight = []

    def tasks_on_scheduler(self) -> int:
        """How many of this model's tasks the scheduler holds (bounded: the calls of one step)."""
        tag = self.model
        return int(self.client.run_on_scheduler(
            lambda dask_scheduler: sum(tag in str(k) for k in dask_scheduler.tasks)))

    def _workers(self):
        return sorted(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def pick_worker(self, b, deadline):
        """A live worker for shard ``b``: the one of its slot, else the least used."""
        t_end = None if deadline.left() is None else time.monotonic() + deadline.left()
        while True:
            live = self._workers()
            if live:
                break
            if t_end is not None and time.monotonic() > t_end:
                raise DistributedError("dask: no live worker to place a shard on", "dask", f"shard {b}")
            time.sleep(0.1)
        used = {a: 0 for a in live}
        for c, a in enumerate(self.addr):
            if c != b and a in used:
                used[a] += 1
        preferred = live[b % len(live)]
        return min(live, key=lambda a: (used[a], a != preferred))

    def _drop_at(self, b, addr):
        # allowed anywhere: pinned to a worker that died, the task would wait on the scheduler forever
        with contextlib.suppress(Exception):
            distributed.fire_and_forget(self.client.submit(_drop, self.model, b, workers=[addr],
                                                           allow_other_workers=True, pure=False))

    def forget(self, b):
        """Shard ``b`` is lost: drop it where it was (if that worker lives) and stop watching its worker."""
        if self.addr[b] is not None:
            self._drop_at(b, self.addr[b])
        self.addr[b] = None
        self._last[b] = None

    def start(self, b, spec, theta, applied, log, deadline):
        """Create (or replace) shard ``b`` on a live worker; returns its process id."""
        self.forget(b)
        addr = self.pick_worker(b, deadline)
        self.addr[b] = addr
        self._last[b] = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            try:
                [th] = self.client.scatter([theta], workers=[addr], hash=False)
            except (OSError, KeyError) as e:
                # the chosen worker died as it was sent to: distributed's CommClosedError, or the scheduler's
                # KeyError of a worker it has already removed (seen once in a fresh clone's chaos test)
                raise ShardLost([b] + [c for c in self._gone() if c != b],
                                f"worker {addr} was lost while shard {b} was sent to it: {type(e).__name__}: {e}"
                                ) from None
            f = self.client.submit(_create, self.model, b, spec, th, applied, log, workers=[addr],
                                   allow_other_workers=False, pure=False,
                                   key=self._key(b, "create"))
        pid = self.get({b: f}, deadline)[b].value
        del th
        return pid

    def call(self, b, method, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            f = self.client.submit(_call, self.model, b, self.epoch, method, self._last[b], *args,
                                   workers=[self.addr[b]], allow_other_workers=False, pure=False,
                                   key=self._key(b, method))
        self._last[b] = f
        self.inflight.append(f)
        self.submitted += 1
        if self.submitted % TRIM_EVERY == 0:
            self.trim_scheduler_records()
        return f, f

    def trim_scheduler_records(self) -> int:
        """Drop what the scheduler keeps per submission of these calls; returns the entries dropped.

        The scheduler's span of the calls' task group keeps one metadata
        entry per ``submit`` forever (a few hundred bytes each, 3 per step);
        this keeps one. Nothing else of the scheduler's grows with the steps.
        """
        with contextlib.suppress(Exception):
            return int(self.client.run_on_scheduler(_trim_span_records, group=GROUP))
        return 0

    def fetch(self, b, method, *args, deadline):
        f, _ = self.call(b, method, *args)
        return self.get({b: f}, deadline)[b].value

    def get(self, handles: dict, deadline):
        """``{shard: Reply}`` of ``{shard: future}``; raises :class:`ShardLost` or a chainprod error."""
        futs = list(handles.values())
        done = _done_event(futs)
        try:
            while True:
                left = deadline.left()
                if left is not None and left <= 0:
                    raise DistributedTimeoutError(
                        f"dask: the sharded step did not finish within timeout={deadline.timeout}s; its calls "
                        "not yet started were cancelled (a call already running finishes, and is then "
                        "ignored). Raise timeout=.", "dask", "sharded step")
                done.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, max(left, 0.01)))
                for b, f in handles.items():
                    if f.status == "error":
                        self._raise(b, f)
                    if f.status == "cancelled":
                        gone = self._gone()
                        if gone:
                            # a worker left: the scheduler cancels the calls that needed data only it held
                            # (a replacement's scattered parameters, when its new worker dies before its
                            # create call runs: seen in the chaos test on a slower host)
                            raise ShardLost(gone, f"the call on shard {b} was cancelled: its worker left")
                        raise DistributedError(f"dask: the call on shard {b} was cancelled", "dask",
                                               f"shard {b}")
                if all(f.status == "finished" for f in futs):
                    try:
                        vals = self.client.gather(futs, direct=True)
                    except Exception as e:  # a worker died after its call finished
                        gone = self._gone()
                        if gone:
                            raise ShardLost(gone, f"{type(e).__name__}: {e}") from None
                        raise DistributedError(f"dask: fetching the results of the sharded calls failed: "
                                               f"{type(e).__name__}: {e}", "dask", "gather") from e
                    for b, f in handles.items():
                        if self._last[b] is f:
                            self._last[b] = None  # done: a later call needs no dependency on it
                    self.inflight = [f for f in self.inflight if not f.done()]
                    return dict(zip(handles, vals))
                gone = self._gone()
                if gone:
                    raise ShardLost(gone, "the worker holding it left the cluster")
        except BaseException:
            # the attempt is abandoned: none of its calls may run later (nor keep keys on the scheduler)
            self._last = [None] * self.P
            abandoned, self.inflight = futs + self.inflight, []
            with contextlib.suppress(Exception):
                self.client.cancel(abandoned, force=True)
            raise

    def reports(self, handles: dict, deadline):
        """``{shard: report}`` of the report handles of :meth:`call`."""
        return {b: r.report for b, r in self.get(handles, deadline).items()}

    def results(self, calls: dict, deadline):
        """``{shard: (value, report)}`` of ``{shard: (value handle, report handle)}`` from :meth:`call`."""
        return {b: (r.value, r.report) for b, r in self.get({b: c[0] for b, c in calls.items()}, deadline).items()}

    def _gone(self):
        """Shards whose worker is no longer in the cluster."""
        live = set(self._workers())
        return [c for c, a in enumerate(self.addr) if a is not None and a not in live]

    def _raise(self, b, f):
        exc = f.exception()
        if isinstance(exc, (KilledWorker, ShardMissing)):
            # the call of shard b may have failed only because it consumed a lost shard's value
            # (a dependent task errs with its dependency's exception): name the shards really lost
            lost = set(self._gone())
            if isinstance(exc, ShardMissing):
                lost.add(exc.shard)
            last = getattr(exc, "last_worker", None)
            last = getattr(last, "address", last)
            lost.update(c for c, a in enumerate(self.addr) if a is not None and a == last)
            raise ShardLost(sorted(lost) or [b], f"{type(exc).__name__}: {exc}")
        if isinstance(exc, Exception) and type(exc).__module__ == errors.__name__:
            raise exc
        # an engine error (comm, cancelled) or anything else raised on a shard: one of this library's errors
        raise DistributedError(f"dask: shard {b} failed: {type(exc).__name__}: {exc}", "dask",
                               f"shard {b}") from exc

    def close(self):
        for b, a in enumerate(self.addr):
            if a is not None:
                self._drop_at(b, a)
        self.addr = [None] * self.P
        self._last = [None] * self.P
        self.inflight = []
        self.anchor = None
