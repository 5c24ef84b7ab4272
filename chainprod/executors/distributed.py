"""What the Ray and Dask executors share: running the task graph, errors, cluster lifecycle.

An engine subclass (:class:`~chainprod.executors.ray_executor.RayExecutor`,
:class:`~chainprod.executors.dask_executor.DaskExecutor`) supplies five verbs:
connect to (or start) a cluster, place driver data, submit a task whose
arguments may be handles of other tasks, wait for handles with a deadline,
and release/cancel handles. Everything else, the plan
(:func:`chainprod.planning.partition.partition`), the trace, the error
messages, ``grad`` on the workers, lives here once.
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
from ..errors import ClusterConnectionError, NonFiniteError
from ..planning.bind import as_index
from ..planning.partition import partition
from ..schedules import schedule as build_schedule
from . import remote_tasks
from .base import Executor, ListResult, TraceEvent

__all__ = ["DistributedExecutor", "GroupResult", "Deadline", "check_reachable", "embedded_size", "make_temp_dir",
           "remove_temp_dir"]


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
    """

    name = "?"

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
    def connect(self, workers):  # -> int: cluster CPU count
        raise NotImplementedError

    def _default_workers(self) -> int:
        return 2

    def _put(self, obj, key):
        raise NotImplementedError

    def _submit(self, fn, args, key, retries):
        raise NotImplementedError

    def _wait(self, handles, deadline, names):  # -> list of values
        raise NotImplementedError

    def _release(self, handles):
        pass

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
    def _submit_graph(self, part, init_handles, retries, token, collect=None, collect_extra=None):
        """Submit every segment and collect task of ``part``; returns handles by tid."""
        h = list(init_handles) + [None] * (len(part.tasks) - part.workers)
        for t in part.tasks[part.workers:]:
            args = [h[d] for d in t.deps]
            key = f"chainprod-{self.name}-{t.kind}-{token}-{t.tid}"
            if t.kind == "segment":
                h[t.tid] = self._submit(remote_tasks.segment_task, [t, *args], key, retries)
            else:
                fn = collect or remote_tasks.collect_task
                extra = [] if collect_extra is None else [collect_extra[t.worker]]
                h[t.tid] = self._submit(fn, [t, *extra, *args], key, retries)
        return h

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
        timeout, retries = self._opts(options)
        deadline = Deadline(timeout)
        if schedule.length != len(blocks):
            raise ValueError(f"schedule is for L={schedule.length} factors, got {len(blocks)} blocks")
        P = self._resolve_workers(workers)
        self.connect(P)
        wall0 = time.time() - (trace.clock() if trace is not None else 0.0)
        part = partition(schedule, P)
        token = self._token(schedule.key, P, [s.array for s in blocks.segments])
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
            inits.append(self._put({"values": {}, "packed": packed, "meta": []},
                                   f"chainprod-{self.name}-init-{token}-{b}"))
        handles = self._submit_graph(part, inits, retries, token)
        try:
            results = self._wait([handles[t] for t in part.collect], deadline,
                                 [part.tasks[t].name for t in part.collect])
        finally:
            self._release(handles)
            del handles, inits
        self._fill_trace(trace, [r["meta"] for r in results], wall0, P)
        return GroupResult(schedule.length, [g for res in results for g in res["outputs"]])

    # -- grad on the workers ------------------------------------------------
    def backward_remote(self, tape, seed, *, method="auto", workers=None, trace=None, **options):
        """Per-layer gradients with Jacobians, scan and VJPs computed on the workers.

        Called by :func:`chainprod.grad.backward` for this backend. The driver
        ships each worker the layer data of its chunk (parameters and
        activations), the workers build their Jacobian blocks, run the scan
        and apply the parameter VJPs; only per-layer gradients come back, as
        views of one stacked array per worker and parameter (on Ray: zero-copy,
        read-only views of the object store; ``np.array(g)`` for a writable copy).
        """
        timeout, retries = self._opts(options)
        deadline = Deadline(timeout)
        chain = tape.chain
        L = len(chain)
        P = self._resolve_workers(workers)
        n = L - 1
        specs = [("dense", 1, chain.layers[L - 1].d_in)]
        specs += [(chain.layers[L - 1 - p].kind, chain.layers[L - 1 - p].d_out, chain.layers[L - 1 - p].d_in)
                  for p in range(1, n)]
        sched = build_schedule(method, n, workers=P, blocks=specs, backend=self.name)
        if not sched.is_scan:
            raise ValueError(f"schedule {sched.name!r} does not produce every prefix; grad needs a scan")
        if trace is not None:
            trace.schedule = sched
        self.connect(P)
        wall0 = time.time() - (trace.clock() if trace is not None else 0.0)
        part = partition(sched, P)
        payloads = remote_tasks.grad_payloads(tape, seed, part)
        token = self._token(sched.key, P, tape.x, seed,
                            [(r.cls.__name__, r.activation, r.start, r.reversed) for r in chain.runs])
        data = [self._put(p, f"chainprod-{self.name}-layers-{token}-{b}") for b, p in enumerate(payloads)]
        # The layer data is each chain's init: segments build the Jacobian
        # blocks they read from it where they run (Jacobians never travel).
        inits = data
        handles = self._submit_graph(part, inits, retries, token, collect=remote_tasks.vjp_task, collect_extra=data)
        try:
            results = self._wait([handles[t] for t in part.collect], deadline,
                                 [f"w{part.tasks[t].worker}.vjp" for t in part.collect])
        finally:
            self._release(handles + data)
            del handles, inits, data
        self._fill_trace(trace, [r["meta"] for r in results], wall0, P)
        bads = [r["bad"] for r in results if r["bad"] is not None]
        if bads:
            bad = min(bads)
            lo = L - 1 - bad - 1
            raise NonFiniteError(
                f"non-finite value in the product of the input Jacobians of layers {lo + 1}..{L - 1} "
                f"(0-based): the chain product overflowed; scale the weights down or shorten the chain",
                (lo + 1, L - 1))
        grads = [None] * L
        for res in results:
            for layers, gs in res["grads"]:
                # list(array) makes the per-layer views in C; no per-layer copies
                for l, g in zip(layers.tolist(), zip(*(list(g) for g in gs))):
                    grads[l] = g
        # The last layer's v is the seed itself: one cheap VJP on the driver.
        last = chain.runs[-1]
        Y = tape.outputs[-1][-1:]
        S = last.cls.derivs(Y, last.activation)
        X = tape.run_inputs(len(chain.runs) - 1)[-1:]
        gs = last.cls.param_grads(tuple(p[-1:] for p in last.params), (seed * S[0])[None], X)
        grads[L - 1] = tuple(g[0] for g in gs)
        return grads


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
