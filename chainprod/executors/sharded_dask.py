"""Resident shards on Dask: each shard lives in one pinned worker process.

A shard is a :class:`~chainprod.executors.sharded_worker.ShardState` kept in
a dict of the worker process (:data:`_STATE`, keyed by model and shard).
Every call is a task restricted to that worker (``workers=[address]``,
``allow_other_workers=False``, ``pure=False``), taking as arguments the
futures of the values it consumes (Dask moves them worker to worker) and
the future of the shard's previous call, so the calls of one shard run in
the order they were submitted. A task returns a
:class:`~chainprod.executors.sharded_worker.Reply`; the consumer unwraps its
``value``, the driver reads its ``report``.

A worker that dies takes its shard with it; the scheduler would keep the
pinned tasks waiting for an address that is gone, so the driver checks,
while it waits, that every shard's worker is still there, and replaces a
missing one (:mod:`chainprod.shard_recovery`).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings

import distributed
from distributed.scheduler import KilledWorker

from ..errors import DistributedError, DistributedTimeoutError
from .sharded_worker import Reply, ShardLost, ShardState

__all__ = ["DaskShards"]

#: in a worker process: (model id, shard) -> ShardState
_STATE: dict = {}

#: seconds between the driver's checks that every shard's worker is still there
POLL_SECONDS = 0.5


class ShardMissing(RuntimeError):
    """A call reached a worker that does not hold its shard (the worker was restarted)."""


# -- on the workers -------------------------------------------------------------------
def _create(model, b, spec, theta, applied, log):
    import os

    _STATE[(model, b)] = ShardState(spec, theta, applied, log)
    return Reply(os.getpid())


def _call(model, b, method, after, *args):
    # `after` is the shard's previous call: an argument only to order the calls
    st = _STATE.get((model, b))
    if st is None:
        raise ShardMissing(f"shard {b} of model {model} is not on this worker")
    args = [a.value if isinstance(a, Reply) else a for a in args]
    value, report = getattr(st, method)(*args)
    return Reply(value, report)


def _drop(model, b):
    _STATE.pop((model, b), None)


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
        self.addr = [None] * P
        self._last = [None] * P

    def _workers(self):
        return sorted(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def _pick(self, b, deadline):
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

    def start(self, b, spec, theta, applied, log, deadline):
        """Create (or replace) shard ``b`` on a live worker; returns its process id."""
        old = self.addr[b]
        if old is not None:
            with contextlib.suppress(Exception):
                distributed.fire_and_forget(self.client.submit(_drop, self.model, b, workers=[old], pure=False))
        addr = self._pick(b, deadline)
        self.addr[b] = addr
        self._last[b] = None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            [th] = self.client.scatter([theta], workers=[addr], hash=False)
            f = self.client.submit(_create, self.model, b, spec, th, applied, log, workers=[addr],
                                   allow_other_workers=False, pure=False,
                                   key=f"chainprod-shard-create-{self.model}-{b}-{uuid.uuid4().hex[:8]}")
        pid = self.get({b: f}, deadline)[b].value
        del th
        return pid

    def call(self, b, method, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            f = self.client.submit(_call, self.model, b, method, self._last[b], *args, workers=[self.addr[b]],
                                   allow_other_workers=False, pure=False,
                                   key=f"chainprod-shard-{method}-{self.model}-{b}-{uuid.uuid4().hex[:8]}")
        self._last[b] = f
        return f, f

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
                        f"dask: the sharded step did not finish within timeout={deadline.timeout}s; its "
                        "calls were cancelled. Raise timeout=.", "dask", "sharded step")
                done.wait(POLL_SECONDS if left is None else min(POLL_SECONDS, max(left, 0.01)))
                for b, f in handles.items():
                    if f.status == "error":
                        self._raise(b, f)
                    if f.status == "cancelled":
                        raise DistributedError(f"dask: the call on shard {b} was cancelled", "dask",
                                               f"shard {b}")
                if all(f.status == "finished" for f in futs):
                    vals = self.client.gather(futs, direct=True)
                    return dict(zip(handles, vals))
                gone = [c for c, a in enumerate(self.addr) if a is not None and a not in set(self._workers())]
                if gone:
                    raise ShardLost(gone, "the worker holding it left the cluster")
        except BaseException:
            self._last = [None] * self.P
            with contextlib.suppress(Exception):
                self.client.cancel(futs, force=True)
            raise

    def reports(self, handles: dict, deadline):
        """``{shard: report}`` of the report handles of :meth:`call`."""
        return {b: r.report for b, r in self.get(handles, deadline).items()}

    def _raise(self, b, f):
        exc = f.exception()
        if isinstance(exc, (KilledWorker, ShardMissing)):
            raise ShardLost([b], f"{type(exc).__name__}: {exc}")
        if type(exc).__module__.split(".")[0] in ("distributed", "tornado", "asyncio"):
            raise DistributedError(f"dask: shard {b} failed: {type(exc).__name__}: {exc}", "dask",
                                   f"shard {b}") from exc
        raise exc

    def close(self):
        for b, a in enumerate(self.addr):
            if a is not None:
                with contextlib.suppress(Exception):
                    distributed.fire_and_forget(self.client.submit(_drop, self.model, b, workers=[a], pure=False))
        self.addr = [None] * self.P
        self._last = [None] * self.P
