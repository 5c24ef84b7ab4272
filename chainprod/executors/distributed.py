"""What the Ray and Dask executors share: running a task graph, errors, cluster lifecycle.

An engine subclass (:class:`~chainprod.executors.ray_executor.RayExecutor`,
:class:`~chainprod.executors.dask_executor.DaskExecutor`) supplies five verbs:
connect to (or start) a cluster, place driver data, submit a task whose
arguments may be handles of other tasks, wait for handles with a deadline,
and release/cancel handles. Everything else lives here once: running the
owner-computes task graph of :func:`chainprod.planning.partition.partition`
(:meth:`DistributedExecutor.run_graph`), the trace and the error messages.
What the tasks compute is given to :meth:`~DistributedExecutor.run_graph`:
blocks for :meth:`~DistributedExecutor.run`, layer data for ``grad``
(:mod:`chainprod.backward_remote`, which knows the layers; this module does not).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from urllib.parse import urlparse

import numpy as np

from .._validate import check_retries, check_timeout, check_workers
from ..errors import ClusterConnectionError
from ..planning.bind import as_index
from ..planning.partition import partition
from . import remote_tasks
from .base import Executor, ListResult, TraceEvent

__all__ = ["DistributedExecutor", "GroupResult", "Deadline", "check_reachable", "embedded_size", "make_temp_dir",
           "remove_temp_dir", "run_bounded", "answers_grpc"]


# -- lifecycle helpers -----------------------------------------------------------
_TEMP_DIRS: list[str] = []
_LOCK = threading.RLock()


def make_temp_dir(prefix: str) -> str:
    """A temp dir chainprod owns (removed at exit, or by :func:`remove_temp_dir`)."""
    d = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(d)
    return d


def remove_temp_dir(d: str | None):
    if d:
        shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _TEMP_DIRS.remove(d)


@atexit.register
def _cleanup_temp_dirs():  # pragma: no cover - runs at interpreter exit
    for d in list(_TEMP_DIRS):
        shutil.rmtree(d, ignore_errors=True)


def check_reachable(address: str, backend: str, timeout: float = 3.0):
    """Fail fast with a clear error when nothing listens at ``host:port``."""
    a = address if "://" in address else f"tcp://{address}"
    u = urlparse(a)
    host, port = u.hostname, u.port
    if not host or not port:
        raise ClusterConnectionError(
            f"{backend}: cannot read host:port from address {address!r} (expected e.g. '127.0.0.1:6379')",
            backend)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterConnectionError(
            f"{backend}: no cluster reachable at {address!r} ({e.strerror or e}); start one "
            f"(e.g. `ray start --head` / `dask scheduler`) or pass address=None for an embedded "
            "local cluster", backend) from None


def run_bounded(fn, seconds, *, name, late=None):
    """``fn()`` in a daemon thread, waited for at most ``seconds``; its result, or its exception.

    For an engine call that has no timeout of its own and can block in native
    code (``ray.init`` retrying a head for minutes, ``ray.shutdown`` on a dead
    head): the caller gets control back in time whatever the engine does.

    Parameters
    ----------
    fn : callable
        Called with no arguments, in a new daemon thread named ``name``.
    seconds : float or None
        How long to wait (``None``: as long as it takes).
    name : str
        Names the thread and the timeout's message.
    late : callable, optional
        ``late(result)`` runs in that thread if ``fn`` returns after the
        caller gave up (to undo what it did, e.g. disconnect a late join).

    Raises
    ------
    TimeoutError
        ``fn`` did not return in time; ``.thread`` is the thread, still running.
    """
    box, lock = {}, threading.Lock()

    def run():
        try:
            result, error = fn(), None
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result, error = None, e
        with lock:
            box.update(done=True, result=result, error=error)
            abandoned = box.get("abandoned", False)
        if abandoned and error is None and late is not None:
            with contextlib.suppress(Exception):
                late(result)

    th = threading.Thread(target=run, daemon=True, name=name)
    try:
        th.start()
    except RuntimeError:  # no new threads at interpreter exit: call it here, unbounded
        return fn()
    try:
        th.join(seconds)
    finally:
        with lock:
            finished = box.get("done", False)
            if not finished:  # also on Ctrl-C while waiting
                box["abandoned"] = True
    if not finished:
        e = TimeoutError(f"{name} did not finish within {seconds:g}s")
        e.thread = th
        raise e
    if box["error"] is not None:
        raise box["error"]
    return box["result"]


def answers_grpc(address: str, timeout: float) -> bool:
    """True when ``host:port`` completes a gRPC (HTTP/2) handshake within ``timeout`` seconds.

    A head that speaks gRPC (Ray's GCS and client server) completes it;
    another service (a Dask scheduler, a silent socket) never does.
    """
    import grpc

    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


class Deadline:
    """Seconds left of a run's ``timeout`` (``None`` = unbounded)."""

    def __init__(self, timeout):
        self.timeout = timeout
        self.t_end = None if timeout is None else time.monotonic() + timeout

    def left(self):
        if self.t_end is None:
            return None
        return max(0.0, self.t_end - time.monotonic())


# -- the shared executor --------------------------------------------------------
class DistributedExecutor(Executor):
    """Runs a schedule as the owner-computes task graph of :mod:`chainprod.planning.partition` on a cluster.

    Parameters (all also accepted per run as keywords of :meth:`run`)
    ----------
    address : str or engine client, optional
        Join this cluster; chainprod never shuts down a cluster it joined.
        ``None``: use the engine's current connection if there is one, else
        start an embedded local cluster on loopback (reused by later runs,
        shut down at interpreter exit).
    timeout : float, optional
        Seconds; bounds every wait of a run. ``None`` waits as long as it takes.
    retries : int
        How often a task is re-run after its worker process died (Ray
        ``max_retries``; Dask ``allowed-failures`` on clusters chainprod
        starts). ``0`` turns retries off: a dead worker raises
        :class:`DistributedError`. Exceptions raised by the numbers themselves
        are never retried.
    workers : int, optional
        Default ``P`` when a run passes none (else the cluster's CPU count, or 2).

    Notes
    -----
    ``runs_task_graphs`` is True: besides :meth:`run`, :meth:`prepare` and
    :meth:`run_graph` run any partitioned task graph, which ``grad`` uses to
    compute Jacobians, scan and VJPs on the workers
    (:mod:`chainprod.backward_remote`). A subclass that sets it False gets
    the driver-side path instead (Jacobians on the driver, the scan by :meth:`run`).
    """

    name = "?"
    runs_task_graphs = True

    def __init__(self, address=None, *, timeout=None, retries=3, workers=None, **engine_options):
        self.address = address
        self.timeout = check_timeout(timeout)
        self.retries = check_retries(retries)
        self.workers = check_workers(workers)
        self.engine_options = engine_options

    def __repr__(self):
        where = "embedded" if self.address is None else repr(self.address)
        return f"<{type(self).__name__} {self.name!r} {where}, timeout={self.timeout}, retries={self.retries}>"

    # -- engine verbs (subclasses) ------------------------------------------
    def connect(self, workers):  # -> the engine's client (or None)
        raise NotImplementedError

    def _default_workers(self) -> int:
        return 2

    def _put(self, obj, key):
        raise NotImplementedError

    def _submit(self, fn, args, key, retries):
        raise NotImplementedError

    def _wait(self, handles, deadline, names, retries):  # -> list of values
        raise NotImplementedError

    def _release(self, handles):
        pass

    def _use_retries(self, retries):
        """Apply a run's ``retries`` where the engine takes them per cluster, not per task."""

    def _token(self, *parts) -> str:
        return ""

    # -- options ------------------------------------------------------------
    def check_options(self, options):
        """Validate per-call ``engine_options`` before a run (names and values), with clear errors.

        ``workers`` is an argument of the call (``grad(..., workers=P)``), not
        an engine option: passed in both places it would reach the executor
        twice.
        """
        if "workers" in options:
            raise TypeError(f"{self.name}: 'workers' is not an engine option; pass workers={options['workers']!r} "
                            "to grad() / suffix_products() / cluster() itself (engine_options take "
                            "timeout and retries)")
        self._opts(options)

    def _opts(self, options):
        unknown = set(options) - {"timeout", "retries", "address"}
        if unknown:
            raise TypeError(f"{self.name} executor: unknown option(s) {sorted(unknown)}; "
                            "valid: address, timeout, retries")
        if "address" in options and options["address"] != self.address:
            raise ValueError(f"{self.name}: pass address= when creating the executor "
                             f"(e.g. {type(self).__name__}(address=...)) or use chainprod.cluster()")
        timeout = check_timeout(options.get("timeout", self.timeout))
        retries = check_retries(options.get("retries", self.retries))
        return timeout, retries

    def _resolve_workers(self, workers):
        workers = check_workers(workers)
        return workers or self.workers or self._default_workers()

    # -- the graph ----------------------------------------------------------
    def prepare(self, workers=None) -> int:
        """Connect to the cluster (starting the embedded one if needed) and return ``P`` for a run.

        ``workers`` as given to the run; ``None`` takes the executor's
        ``workers``, else the cluster's CPU count (or 2). Call it before
        :func:`~chainprod.planning.partition.partition`: the partition is
        cut for this ``P``.
        """
        P = self._resolve_workers(workers)
        self.connect(P)
        return P

    def run_graph(self, part, inits, *, workers, token_parts=(), segment=None, collect=None,
                  collect_label="collect", trace=None, **options) -> list:
        """Submit the task graph of ``part``, wait for its collect tasks, return their results.

        The one place a graph is run: :meth:`run` and the remote backward
        pass (:mod:`chainprod.backward_remote`) both come here, so submitting,
        the deadline, releasing handles and the trace are written once.

        Parameters
        ----------
        part : Partition
            From :func:`~chainprod.planning.partition.partition` for ``P = workers``.
        inits : list
            Per worker ``b < part.workers``, its init payload: a dict with
            ``"meta": []`` that ``segment`` and ``collect`` can read. Placed
            in the cluster here (engine handles, released after the run).
        workers : int
            ``P`` (from :meth:`prepare`), recorded in the trace.
        token_parts : tuple
            What identifies the run's input (the engine derives its keys from it).
        segment, collect : callable, optional
            The task functions, run on the workers and imported there by
            name: ``segment(spec, *inputs)`` for each combine task (default
            :func:`~chainprod.executors.remote_tasks.segment_task`),
            ``collect(spec, *inputs)`` for each worker's last task (default
            :func:`~chainprod.executors.remote_tasks.collect_task`). Every
            result holds ``"meta"``, the trace events of its chain.
        collect_label : str
            Names a collect task ``w<b>.<label>`` in errors of the wait.
        trace : Trace, optional
            Filled with the measured events of every task.
        **options
            ``timeout``, ``retries`` (as the constructor's).

        Returns
        -------
        list
            The collect tasks' results, worker by worker.
        """
        timeout, retries = self._opts(options)
        deadline = Deadline(timeout)
        self._use_retries(retries)
        segment = segment or remote_tasks.segment_task
        collect = collect or remote_tasks.collect_task
        # Workers stamp events with time.time(): this offset puts them on the trace's clock.
        wall0 = time.time() - (trace.clock() if trace is not None else 0.0)
        token = self._token(*token_parts)
        h = [None] * len(part.tasks)  # engine handles by task id; the inits are tasks 0..workers-1
        try:
            for b, p in enumerate(inits):
                h[b] = self._put(p, f"chainprod-{self.name}-init-{token}-{b}")
            for t in part.tasks[part.workers:]:
                fn = segment if t.kind == "segment" else collect
                h[t.tid] = self._submit(fn, [t, *(h[d] for d in t.deps)],
                                        f"chainprod-{self.name}-{t.kind}-{token}-{t.tid}", retries)
            results = self._wait([h[t] for t in part.collect], deadline,
                                 [f"w{part.tasks[t].worker}.{collect_label}" for t in part.collect], retries)
        finally:
            self._release([x for x in h if x is not None])
            del h
        self._fill_trace(trace, [r["meta"] for r in results], wall0, workers)
        return results

    def _fill_trace(self, trace, metas, wall0, workers):
        if trace is None:
            return
        trace.backend = trace.backend or self.name
        trace.workers = trace.workers or workers
        for meta in metas:
            for r, where, t0, t1, ops, task in meta:
                ev = TraceEvent(int(r), where, t0 - wall0, t1 - wall0, int(ops), task)
                if r >= 0:
                    trace.add(ev)
                else:
                    trace.other_events.append(ev)  # Jacobians, VJPs, collection: not combine rounds

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):
        """Run ``schedule`` on ``blocks`` as ``P = workers`` chains of tasks (:mod:`chainprod.planning.partition`)."""
        self._opts(options)  # bad options fail before a cluster starts
        if schedule.length != len(blocks):
            raise ValueError(f"schedule is for L={schedule.length} factors, got {len(blocks)} blocks")
        P = self.prepare(workers)
        part = partition(schedule, P)
        inits = []
        for b in range(part.workers):
            # Each worker's inputs as slices of the stacked segments: a few big
            # buffers to serialise, not one small array per block.
            slots = part.init_slots[b]
            packed, p0 = [], 0
            for seg in blocks.segments:
                sl = slots[(slots >= p0) & (slots < p0 + seg.count)]
                if sl.size:
                    packed.append((seg.kind, sl, seg.array[as_index(sl - p0)]))
                p0 += seg.count
            inits.append({"values": {}, "packed": packed, "meta": []})
        results = self.run_graph(part, inits, workers=P, trace=trace,
                                 token_parts=(schedule.key, P, [s.array for s in blocks.segments]), **options)
        return GroupResult(schedule.length, [g for res in results for g in res["outputs"]])


class GroupResult(ListResult):
    """Prefixes as the workers returned them: ``(kind, positions, stacked array)`` groups.

    ``stack()`` is one concatenation of the workers' stacks (no per-block
    work); ``first_nonfinite()`` one vectorised check per group.
    """

    def __init__(self, length, groups):
        items = [None] * length
        for kind, ks, arr in groups:
            for k, a in zip(ks.tolist(), list(arr)):  # views, made in C
                items[k] = (kind, a)
        super().__init__(items)
        self.groups = sorted(groups, key=lambda g: int(g[1][0]) if g[1].size else -1)

    def stack(self, positions=None):
        gs = [g for g in self.groups if g[1].size]
        if gs and len({(g[0], g[2].shape[1:], g[2].dtype) for g in gs}) == 1:
            ks = np.concatenate([g[1] for g in gs])
            if positions is None or np.array_equal(np.asarray(positions), ks):
                if np.all(np.diff(ks) > 0):
                    arr = gs[0][2] if len(gs) == 1 else np.concatenate([g[2] for g in gs])
                    return gs[0][0], arr
        return super().stack(positions)

    def first_nonfinite(self):
        bad = []
        for _, ks, arr in self.groups:
            if ks.size:
                ok = np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
                if not ok.all():
                    bad.append(int(ks[~ok].min()))
        return min(bad) if bad else None


def embedded_size(workers) -> int:
    """Worker slots of an embedded cluster: ``max(workers, CPU count)`` (at least 2).

    Sized by the machine, not only by the first call's ``workers``: a first
    run with ``workers=1`` must not leave later ``workers=2`` runs with one
    slot (their two chains would then run one after the other in one
    process). At most ``P`` tasks of a run still run at once: each worker's
    tasks form a chain.
    """
    return max(int(workers or 0), os.cpu_count() or 1, 2)
