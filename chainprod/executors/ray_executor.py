"""The Ray executor: ``backend="ray"``.

The schedule runs as the owner-computes task graph of
:mod:`chainprod.planning.partition`: ``P`` chains of fused tasks, submitted
at once, task arguments are ``ObjectRef`` s of earlier tasks (so Ray moves
only chunk-boundary blocks between workers and nothing goes through the
driver between rounds).

Cluster lifecycle
-----------------
* ``address=None`` and no ``RAY_ADDRESS``: if this process is already
  connected to Ray (``ray.is_initialized()``), that connection is used;
  otherwise an embedded single-node local cluster is started with
  ``num_cpus = max(workers, CPU count)``, its temp dir under a directory chainprod
  creates (and deletes), token auth and usage stats off, and it is reused
  by later runs and shut down at interpreter exit.
* ``address="host:port"`` (or ``RAY_ADDRESS``) joins that cluster within ``timeout``
  (default :data:`CONNECT_TIMEOUT`) in any environment, or raises
  :class:`~chainprod.errors.ClusterConnectionError`: TCP and gRPC probes, then
  ``ray.init`` in a thread of its own. A loopback-only head is joined on loopback.
  Ray's reconnect window is raised (:data:`GCS_RECONNECT_TIMEOUT_S`) so a dead
  head never ends the process; runs check the head (:func:`check_head`,
  :func:`watched_get`). A joined cluster is never shut down (:func:`shutdown` disconnects).
* :func:`cluster` holds a cluster for a block of work.

Ray sets ``OMP_NUM_THREADS=1`` in its workers; chainprod's tasks also cap
BLAS at one thread with threadpoolctl, on any cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time

import ray
import ray.exceptions as rex

from .._validate import check_timeout
from ..errors import ClusterConnectionError, DistributedError, DistributedTimeoutError, first_line
from ..planning.partition import TaskSpec
from .distributed import (
    DistributedExecutor,
    answers_grpc,
    check_reachable,
    embedded_size,
    make_temp_dir,
    remove_temp_dir,
    run_bounded,
)

__all__ = ["RayExecutor", "cluster", "shutdown", "head_alive", "check_head", "watched_get", "ensure_ray"]

_LOCK = threading.RLock()
#: what chainprod started: {"temp": dir, "env": saved env} or None
_OWNED: dict | None = None
_REMOTE = {}


def _fn(f):
    if f not in _REMOTE:
        _REMOTE[f] = ray.remote(f)
    return _REMOTE[f]


def _current_address():
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # pragma: no cover
        return None


def _is_client_mode():
    try:
        return ray.util.client.ray.is_connected()
    except Exception:  # pragma: no cover
        return False


def _start_embedded(workers, init_kwargs):
    """Start a local Ray on loopback in a temp dir chainprod owns; returns True."""
    global _OWNED
    temp = make_temp_dir("cpray-")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED",
                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # A loopback cluster of our own needs no auth token (Ray writes one under ~/.ray) nor usage stats.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Keep every Ray process on loopback: on Linux Ray registers nodes under the host's
    # network address even for a single-machine cluster (ignoring _node_ip_address). Ray's
    # "no cluster" switch makes the driver (patched constant) and workers (env) use 127.0.0.1.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    kw = dict(num_cpus=embedded_size(workers), include_dashboard=False, log_to_driver=False,
              logging_level=logging.ERROR, configure_logging=False, _temp_dir=temp)
    kw.update(init_kwargs)
    _OWNED = {"temp": temp, "env": saved, "cluster_flag": saved_cluster_flag}
    try:
        ray.init(**kw)
    except Exception as e:
        shutdown()  # restores the environment and removes the temp dir
        raise ClusterConnectionError(f"ray: could not start an embedded local cluster: {e}", "ray") from e
    return True


def _restore_env(saved):
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


#: seconds a join may take when no timeout= is given
CONNECT_TIMEOUT = 10.0
#: Ray's seconds before a driver's core worker ends the whole process once the head is gone
#: (status 1, no exception, no ``finally``; 60 by default) ...
RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"
#: ... and the least a driver chainprod joins gets, whatever the environment says (11.6 days)
GCS_RECONNECT_TIMEOUT_S = 1_000_000
#: seconds between two checks of a joined cluster's head while a wait goes on
HEAD_CHECK_EVERY = 1.0
#: seconds a disconnect (``ray.shutdown``) may take: about 5 s when the head is dead
SHUTDOWN_TIMEOUT = 30.0

#: the cluster chainprod joined: {"address": as given, "gcs": the head's address} or None
_JOINED: dict | None = None
#: a join that timed out and may still be inside ray.init (its thread), or None
_PENDING: threading.Thread | None = None


def _connect_budget(timeout) -> float:
    return CONNECT_TIMEOUT if timeout is None else min(float(timeout), 3600.0)


def _probe(address, t_end) -> bool:
    """Fail before ``t_end`` with a clear error unless a Ray cluster answers at ``address``.

    True when the head answers on loopback only (``--node-ip-address=127.0.0.1``)
    while ``ray.init`` would dial this node's network address, where nothing
    listens (it would retry there for many minutes): join on loopback then.
    """
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    left = lambda: max(0.05, t_end - time.monotonic())  # noqa: E731 - seconds left of the join
    check_reachable(hostport, "ray", timeout=min(left(), 3.0))  # nothing listens: fail at once
    if not answers_grpc(hostport, left()):
        raise ClusterConnectionError(
            f"ray: {address!r} accepts connections but does not answer as a Ray cluster within the "
            "timeout (is it another service, e.g. a Dask scheduler? `ray start --head` prints the "
            "address to use)", "ray")
    from ray._private import services

    try:  # what ray.init dials: Ray replaces a loopback host by this node's address
        dial = hostport if address.startswith("ray://") else services.canonicalize_bootstrap_address(hostport)
    except Exception:  # noqa: BLE001 - an address Ray cannot read fails in ray.init, bounded
        dial = hostport
    if dial in (hostport, None):
        return False
    try:
        check_reachable(dial, "ray", timeout=min(left(), 1.0))
        return not answers_grpc(dial, min(left(), 2.0))
    except ClusterConnectionError:
        return True


@contextlib.contextmanager
def _join_settings(loopback):
    """Settings that hold while ``ray.init`` joins (Ray reads them as the driver starts)."""
    from ray._private import ray_constants

    # At least GCS_RECONNECT_TIMEOUT_S, whatever the environment says: with less, the
    # driver's core worker ends this process that long after the head dies.
    saved_env = os.environ.get(RECONNECT_ENV)
    given = int(saved_env) if (saved_env or "").strip().isdigit() else 0
    os.environ[RECONNECT_ENV] = str(max(given, GCS_RECONNECT_TIMEOUT_S))
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    if loopback:  # Ray's "no cluster" switch keeps the driver's node address on 127.0.0.1
        ray_constants.ENABLE_RAY_CLUSTER = False
    worker_log = logging.getLogger("ray._private.worker")
    quiet = lambda r: not str(r.msg).startswith("SIGTERM handler is not set")  # noqa: E731 - init in a thread
    worker_log.addFilter(quiet)
    try:
        yield
    finally:
        worker_log.removeFilter(quiet)
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        _restore_env({RECONNECT_ENV: saved_env})


def _join(address, init_kwargs, timeout):
    """Join the cluster at ``address`` within the timeout, whatever Ray does (see module doc)."""
    global _JOINED, _PENDING
    t = _connect_budget(timeout)
    t_end = time.monotonic() + t
    loopback = address != "auto" and _probe(address, t_end)  # "auto": a cluster Ray finds on this node
    kw = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    kw.update(init_kwargs)

    def init():
        with _join_settings(loopback):
            ray.init(address=address, **kw)
        return _current_address()

    try:
        gcs = run_bounded(init, max(0.05, t_end - time.monotonic()), name="chainprod-ray-join",
                          late=lambda _: ray.shutdown())
    except TimeoutError as e:
        _PENDING = getattr(e, "thread", None)
        raise ClusterConnectionError(
            f"ray: joining the cluster at {address!r} did not complete within {t:g}s: its head answers, but "
            "ray.init did not finish (a head advertising an address this machine cannot reach, an auth "
            "token this process lacks, a cluster still starting?). Raise timeout= or read the head's log.",
            "ray") from None
    except Exception as e:
        raise ClusterConnectionError(f"ray: could not join the cluster at {address!r}: {e}", "ray") from e
    _JOINED = {"address": address, "gcs": None if address.startswith("ray://") else gcs}
    return False


def _wait_pending(timeout):
    """A join that timed out may still run inside ``ray.init``: wait for it within the timeout."""
    global _PENDING
    if _PENDING is None:
        return
    _PENDING.join(_connect_budget(timeout))
    if _PENDING.is_alive():
        raise ClusterConnectionError(
            "ray: an earlier join of this process timed out and is still inside ray.init; try again "
            "in a while (it disconnects by itself if it ever completes)", "ray")
    _PENDING = None


def _watched() -> bool:  # connected to a head of its own: not embedded, not Ray client mode
    return ray.is_initialized() and _OWNED is None and not _is_client_mode()


def head_alive(timeout=2.0) -> bool:
    """False when this process is connected to a Ray cluster whose head no longer accepts connections.

    One TCP connection to the head's GCS port. An embedded cluster, Ray
    client mode and no connection count as alive (no separate head to lose).
    """
    gcs = _watched() and ((_JOINED or {}).get("gcs") or _current_address())
    try:
        if gcs:
            check_reachable(gcs, "ray", timeout=timeout)
    except ClusterConnectionError:
        return False
    return True


def check_head():
    """Raise :class:`~chainprod.errors.ClusterConnectionError` if the joined cluster's head is gone.

    On a dead head some Ray calls block (cluster queries) or end the process
    (``ray.put`` when the head's raylet was this node's): check first. The
    process stays connected; after restarting the head, :func:`shutdown`, then join.
    """
    if not head_alive():
        gcs = (_JOINED or {}).get("gcs") or _current_address()
        raise ClusterConnectionError(
            f"ray: the cluster this process joined (head at {gcs!r}) no longer answers: its head is "
            "down. Start it again, then call chainprod.executors.ray_executor.shutdown() and join it "
            "again (or use another address).", "ray")


def watched_get(refs, timeout=None):
    """``ray.get(refs, timeout=timeout)`` that also watches the head of a joined cluster.

    On a joined cluster the wait goes in slices of :data:`HEAD_CHECK_EVERY`
    seconds with a head check between them (and after any Ray error): a dead
    head raises :class:`~chainprod.errors.ClusterConnectionError` within about
    a second. ``ray.exceptions.GetTimeoutError`` when ``timeout`` runs out.
    """
    if not _watched():
        return ray.get(refs, timeout=timeout)
    t_end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if t_end is None else max(0.0, t_end - time.monotonic())
        step = HEAD_CHECK_EVERY if left is None else min(left, HEAD_CHECK_EVERY)
        try:
            return ray.get(refs, timeout=step)
        except rex.GetTimeoutError:
            check_head()
            if left is not None and left <= step:
                raise
        except rex.RayError:
            check_head()  # a lost worker or actor may only be the head's node going down
            raise


def ensure_ray(address=None, workers=None, *, timeout=None, **init_kwargs) -> bool:
    """Connect this process to Ray (see module doc); True if this call started a cluster.

    ``timeout`` bounds a join (default :data:`CONNECT_TIMEOUT` seconds) in any environment.
    """
    with _LOCK:
        _wait_pending(timeout)
        if address is None:
            address = os.environ.get("RAY_ADDRESS") or None
        joining = address not in (None, "auto")
        if joining and not ray.is_initialized():
            return _join(address, init_kwargs, timeout)
        check_head()  # connected to a head that died: say so (the address check would not)
        if joining and not address.startswith("ray://"):
            check_reachable(address, "ray")
        if ray.is_initialized():
            if joining and _OWNED is not None:
                raise ClusterConnectionError(
                    f"ray: this process runs an embedded chainprod cluster; cannot also join {address!r} "
                    "(one process talks to one Ray cluster). Call "
                    "chainprod.executors.ray_executor.shutdown() first.", "ray")
            cur = _current_address() or ""
            if joining and not address.startswith("ray://") and cur.split(":")[-1] != address.split(":")[-1]:
                raise ClusterConnectionError(
                    f"ray: this process is already connected to {cur!r}; cannot also join {address!r}", "ray")
            return False
        if address is None:
            return _start_embedded(workers, init_kwargs)
        return _join(address, init_kwargs, timeout)


def shutdown():
    """Shut down Ray if chainprod started it; disconnect from a cluster chainprod joined.

    A joined cluster keeps running; disconnecting is bounded by :data:`SHUTDOWN_TIMEOUT`
    seconds (about 5 s on a dead head). Afterwards this process can join again.
    """
    global _OWNED, _JOINED
    with _LOCK:
        owned, _OWNED = _OWNED, None
        joined, _JOINED = _JOINED, None
        if ray.is_initialized() and owned is not None:
            ray.shutdown()
        elif ray.is_initialized() and joined is not None:
            try:
                run_bounded(ray.shutdown, SHUTDOWN_TIMEOUT, name="chainprod-ray-disconnect")
            except TimeoutError:
                raise ClusterConnectionError(f"ray: disconnecting from {joined['address']!r} did not finish "
                                             f"within {SHUTDOWN_TIMEOUT:g}s", "ray") from None
        if owned is not None:
            _restore_env(owned["env"])
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = owned["cluster_flag"]
            remove_temp_dir(owned["temp"])


@atexit.register
def _at_exit():  # pragma: no cover - interpreter exit
    with contextlib.suppress(Exception):
        shutdown()


class RayExecutor(DistributedExecutor):
    """``backend="ray"``: the owner-computes task graph on a Ray cluster.

    ``RayExecutor(address=None, timeout=None, retries=3, workers=None,
    **ray_init_kwargs)``; see :class:`~chainprod.executors.distributed.DistributedExecutor`.
    Every task runs with ``num_cpus=1``, ``max_retries=retries`` and
    ``retry_exceptions=False`` (errors of the numbers are never retried).
    """

    name = "ray"

    def connect(self, workers):
        addr = self.address
        if addr is not None and not isinstance(addr, str):
            raise TypeError(f"ray: address must be a 'host:port' string or None, got {type(addr).__name__}")
        ensure_ray(addr, workers, timeout=self.timeout, **self.engine_options)

    def head_alive(self) -> bool:
        """False when this process joined a Ray cluster whose head is gone (see :func:`head_alive`)."""
        return head_alive()

    def _default_workers(self):
        if not ray.is_initialized():
            return 2
        try:  # a query of the head: bounded like a join (a head may accept and never answer)
            res = run_bounded(ray.cluster_resources, _connect_budget(self.timeout), name="chainprod-ray-cpus")
        except TimeoutError:
            raise ClusterConnectionError("ray: the head did not say how many CPUs the cluster has in time; "
                                         "pass workers= or check the head", "ray") from None
        return max(1, int(res.get("CPU", 2)))

    def _put(self, obj, key):
        return ray.put(obj)

    def _submit(self, fn, args, key, retries):
        spec = args[0]
        name = spec.name if isinstance(spec, TaskSpec) else fn.__name__
        return _fn(fn).options(num_cpus=1, max_retries=retries, retry_exceptions=False,
                               name=f"chainprod {name}").remote(*args)

    def _wait(self, handles, deadline, names, retries):
        out = []
        try:
            for h, name in zip(handles, names):
                try:
                    out.append(watched_get(h, deadline.left()))
                except rex.GetTimeoutError:
                    raise DistributedTimeoutError(
                        f"ray: the run did not finish within timeout={deadline.timeout}s (waiting for "
                        f"task {name!r}); its tasks were cancelled. Raise timeout= or use fewer/larger "
                        "workers.", "ray", name) from None
                except (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
                        rex.OwnerDiedError, rex.TaskUnschedulableError, rex.OutOfMemoryError) as e:
                    raise DistributedError(
                        f"ray: task {name!r} (or a task it depends on) failed: {type(e).__name__}: "
                        f"{first_line(e)}. A worker process died or its data was lost and Ray could not "
                        f"recover it with retries={retries} (max_retries per task).",
                        "ray", name) from e
                except rex.RayTaskError as e:  # an exception raised by the numbers: surface it as its own type
                    if isinstance(getattr(e, "cause", None), Exception):
                        raise e.cause from None
                    raise DistributedError(f"ray: task {name!r} failed: {first_line(e)}", "ray", name) from None
                except rex.RayError as e:  # cancelled, or any other failure of the engine: never raw
                    raise DistributedError(f"ray: task {name!r} failed: {type(e).__name__}: {first_line(e)}",
                                           "ray", name) from e
        except ClusterConnectionError:
            raise  # the head is gone: nothing left to cancel, and Ray calls would block on it
        except BaseException:  # cancel only what is unfinished: a forced cancel racing a task's
            # completion aborted the Ray 2.60 driver ("Tried to complete task that was not pending")
            with contextlib.suppress(Exception):
                for h in ray.wait(list(handles), num_returns=len(handles), timeout=0)[1]:
                    ray.cancel(h, force=True, recursive=True)
            raise
        return out


@contextlib.contextmanager
def cluster(workers=None, address=None, *, timeout=None, retries=3, **ray_init_kwargs):
    """Hold a Ray cluster for a block of work; yields a :class:`RayExecutor`.

    Starts an embedded cluster (``num_cpus = max(workers, CPU count)``, ``ray_init_kwargs``
    passed to ``ray.init``) unless this process is already connected, or joins
    ``address``. Shuts down only a cluster this block started.
    """
    started = ensure_ray(address, workers, timeout=check_timeout(timeout), **ray_init_kwargs)
    try:
        yield RayExecutor(address=address, timeout=timeout, retries=retries, workers=workers)
    finally:
        if started:
            shutdown()
