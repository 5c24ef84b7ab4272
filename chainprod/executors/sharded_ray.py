"""Resident shards on Ray: one actor per shard.

Each shard is a Ray actor of :class:`~chainprod.executors.sharded_worker.ShardState`
(its own process, holding its layers between calls). A call returns two
objects (``num_returns=2``): the value the next shard consumes, passed on as
an ``ObjectRef`` argument (Ray moves it between the processes, never through
a driver round-trip), and the report only the driver reads. An actor runs
its calls in the order they were submitted, so a whole step is submitted at
once and the driver waits only for the reports.

Actors are created with Ray's default resources (one CPU to place, none held
while alive), so ``P`` shards fit on a cluster with fewer CPUs and leave its
CPUs to ordinary tasks; ``max_restarts=0``: a dead actor is replaced by the
driver (:mod:`chainprod.shard_recovery`), which restores its parameters by replay.

Every call goes through ``ShardState.run`` with the driver's epoch (one per
attempt). The handles of an attempt that failed or timed out are kept until
their results or errors are read: Ray logs an "Unhandled error" for every
error object dropped unread, and a killed actor turns every call queued on
it, and every call that consumes their values, into one.
"""

from __future__ import annotations

import contextlib

import ray
import ray.exceptions as rex

from .. import errors
from ..errors import DistributedError, DistributedTimeoutError, first_line
from .ray_executor import check_head, watched_get
from .sharded_worker import ShardLost, ShardState

__all__ = ["RayShards", "ShardLost"]

_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(max_restarts=0, max_task_retries=0)(ShardState)
    return _ACTOR


#: Ray errors that mean a process or its data is gone (the shard is replaced)
_LOST = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OwnerDiedError)


class RayShards:
    """The engine side of a sharded model on Ray (see module docstring)."""

    name = "ray"
    #: on Ray a consumed value travels without the report next to it
    reports_travel_with_values = False

    def __init__(self, executor, P):
        executor.connect(P)
        self.P = P
        self.actors = [None] * P
        self.epoch = 0
        #: handles of the current attempt, and of abandoned attempts not yet read
        self.inflight: list = []
        self.unread: list = []

    def new_epoch(self):
        """Start an attempt: later calls carry a newer epoch; read what abandoned attempts left."""
        # A dead joined head first: the attempt's ray.put of a large input would end the process
        # (Ray quits when the raylet it put to is gone); this raises ClusterConnectionError instead.
        check_head()
        self.epoch += 1
        self.inflight = []
        self.read_abandoned()

    def abandon(self):
        """The current attempt failed: keep its handles, to read them once they are done.

        Its calls still queued on live actors are not cancelled: they run
        (the next attempt's calls queue behind them) and change nothing the
        next attempt relies on. Cancelling queued actor calls stalled the
        next call on the same actor for over a minute on Ray 2.60.
        """
        self.unread.extend(self.inflight)
        self.inflight = []
        self.read_abandoned()

    def read_abandoned(self, wait=0.0):
        """Read (and drop) every abandoned handle that is ready, waiting up to ``wait`` seconds."""
        if not self.unread:
            return
        with contextlib.suppress(Exception):
            ready, rest = ray.wait(self.unread, num_returns=len(self.unread), timeout=wait)
            for r in ready:
                with contextlib.suppress(Exception):
                    ray.get(r, timeout=0)
            self.unread = rest

    def forget(self, b):
        """Shard ``b`` is lost: kill its actor if it still lives, and stop pinging it."""
        old, self.actors[b] = self.actors[b], None
        if old is not None:
            with contextlib.suppress(Exception):
                ray.kill(old, no_restart=True)

    def start(self, b, spec, theta, applied, log, deadline):
        """Create (or replace) shard ``b``'s actor; returns its process id."""
        self.forget(b)
        actor = _actor_class().options(scheduling_strategy="SPREAD").remote(spec, theta, applied, log)
        self.actors[b] = actor
        ref = actor.pid.remote()
        self.inflight.append(ref)
        return self.waited({b: ref}, deadline)[b]

    def call(self, b, method, *args):
        """Submit ``method`` on shard ``b``; returns ``(value handle, report handle)``."""
        refs = self.actors[b].run.options(num_returns=2).remote(self.epoch, method, *args)
        self.inflight.extend(refs)
        return refs

    def fetch(self, b, method, *args, deadline):
        """Run ``method`` on shard ``b`` and return its value (a one-return call)."""
        ref = self.call(b, method, *args)[0]
        return self.waited({b: ref}, deadline)[b]

    def waited(self, handles: dict, deadline):
        """:meth:`get`, keeping the attempt's handles to read later when it fails."""
        try:
            return self.get(handles, deadline)
        except BaseException:
            self.abandon()
            raise

    def get(self, handles: dict, deadline):
        """``{shard: value}`` of ``{shard: handle}``; raises :class:`ShardLost` or a chainprod error."""
        b = next(iter(handles))  # named in errors; _dead() finds the shards really lost

        try:
            out = dict(zip(handles, watched_get(list(handles.values()), deadline.left())))
        except rex.GetTimeoutError:
            raise DistributedTimeoutError(
                f"ray: the sharded step did not finish within timeout={deadline.timeout}s; calls already "
                "queued on the shards still run. Raise timeout=.", "ray", "sharded step") from None
        except _LOST as e:
            raise ShardLost(self._dead() or [b], f"{type(e).__name__}: {first_line(e)}") from None
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, _LOST):
                raise ShardLost(self._dead() or [b], f"{type(cause).__name__}: {first_line(cause)}") from None
            if isinstance(cause, Exception) and type(cause).__module__ == errors.__name__:
                raise cause from None
            # anything else raised on a shard is a fault of this library, reported as one of its errors
            raise DistributedError(f"ray: shard {b} failed: {first_line(e)}", "ray", f"shard {b}") from None
        except rex.RayError as e:
            raise DistributedError(f"ray: shard {b} failed: {type(e).__name__}: {first_line(e)}", "ray",
                                   f"shard {b}") from None
        return out

    def reports(self, handles: dict, deadline):
        """``{shard: report}`` of the report handles of :meth:`call`."""
        return self.waited(handles, deadline)

    def results(self, calls: dict, deadline):
        """``{shard: (value, report)}`` of ``{shard: (value handle, report handle)}`` from :meth:`call`."""
        values = self.waited({b: c[0] for b, c in calls.items()}, deadline)
        reports = self.waited({b: c[1] for b, c in calls.items()}, deadline)
        return {b: (values[b], reports[b]) for b in calls}

    def _dead(self, wait=2.0):
        """Shards whose actor is dead, found by a ping (a busy actor answers late: it is alive)."""
        pings = {b: a.pid.remote() for b, a in enumerate(self.actors) if a is not None}
        self.unread.extend(pings.values())  # a busy actor's ping may fail later: read it then
        ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=wait)
        ready = set(ready)
        dead = []
        for b, ref in pings.items():
            if ref in ready:
                try:
                    ray.get(ref, timeout=0)
                except Exception:
                    dead.append(b)
        return dead

    def close(self):
        for a in self.actors:
            if a is not None:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        self.actors = [None] * self.P
        # calls still queued on the killed actors fail now: read their errors before dropping them
        self.unread.extend(self.inflight)
        self.inflight = []
        self.read_abandoned(wait=1.0)
        self.unread = []


