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
* ``address="host:port"`` (or ``RAY_ADDRESS``) joins that cluster; an
  unreachable address fails within a few seconds with
  :class:`~chainprod.errors.ClusterConnectionError`. A joined
  cluster is never shut down.
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
    check_reachable,
    embedded_size,
    make_temp_dir,
    remove_temp_dir,
)

__all__ = ["RayExecutor", "cluster", "shutdown"]

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


def _start_embedded(workers, init_kwargs):
    """Start a local Ray on loopback in a temp dir chainprod owns; returns True."""
    global _OWNED
    temp = make_temp_dir("cpray-")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED",
                                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # A loopback cluster of our own needs no auth token (which Ray would write
    # under ~/.ray) and must not phone home.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Keep every Ray process on loopback: on Linux Ray registers nodes under the
    # host's network address even for a single-machine cluster (and ignores
    # _node_ip_address for that). Ray's "no cluster" switch makes the driver
    # (patched constant) and the workers (inherited env) use 127.0.0.1. Only
    # for clusters we start: joining a real cluster leaves Ray's defaults alone.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    kw = dict(num_cpus=embedded_size(workers), include_dashboard=False, log_to_driver=False,
              logging_level=logging.ERROR, configure_logging=False,
              _temp_dir=temp)
    kw.update(init_kwargs)
    try:
        ray.init(**kw)
    except Exception as e:
        _restore_env(saved)
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster_flag
        remove_temp_dir(temp)
        raise ClusterConnectionError(f"ray: could not start an embedded local cluster: {e}", "ray") from e
    _OWNED = {"temp": temp, "env": saved, "cluster_flag": saved_cluster_flag}
    return True


def _restore_env(saved):
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


#: seconds a join may take when no timeout= is given
CONNECT_TIMEOUT = 10.0


def _answers_grpc(address, timeout) -> bool:
    """True when ``host:port`` completes a gRPC (HTTP/2) handshake within ``timeout`` seconds.

    Ray's GCS and its client server speak gRPC; a port that accepts TCP but
    is something else (a Dask scheduler, a socket that never replies) never
    completes the handshake. ``ray.init`` itself would wait minutes there.
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


def _probe(address, timeout):
    """Fail within ``timeout`` with a clear error unless a Ray cluster answers at ``address``."""
    hostport = address[len("ray://"):] if address.startswith("ray://") else address
    t = CONNECT_TIMEOUT if timeout is None else min(float(timeout), 3600.0)
    t0 = time.monotonic()
    check_reachable(hostport, "ray", timeout=min(t, 3.0))  # nothing listens: fail at once
    if not _answers_grpc(hostport, max(0.05, t - (time.monotonic() - t0))):
        raise ClusterConnectionError(
            f"ray: {address!r} accepts connections but does not answer as a Ray cluster within {t:g}s "
            "(is it another service, e.g. a Dask scheduler? `ray start --head` prints the address to "
            "use)", "ray")


def _join(address, init_kwargs):
    kw = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
    kw.update(init_kwargs)
    try:
        ray.init(address=address, **kw)
    except Exception as e:
        raise ClusterConnectionError(f"ray: could not join the cluster at {address!r}: {e}", "ray") from e
    return False


def _check_joined_alive():
    """The process joined a cluster: fail with a clear error if its head is gone.

    Without this, Ray's core worker ends the whole process (status 1, no
    exception) once it gives up on the lost head.
    """
    cur = _current_address()
    if not cur:
        return
    try:
        check_reachable(cur, "ray", timeout=2.0)
    except ClusterConnectionError:
        raise ClusterConnectionError(
            f"ray: the cluster this process joined (head at {cur!r}) no longer answers: its head is "
            "down. Start it again and reconnect (ray.shutdown(), then join it), or use another "
            "address.", "ray") from None


def ensure_ray(address=None, workers=None, *, timeout=None, **init_kwargs) -> bool:
    """Connect this process to Ray (see module doc); True if this call started a cluster.

    ``timeout`` bounds a join (default :data:`CONNECT_TIMEOUT` seconds).
    """
    with _LOCK:
        if address is None:
            address = os.environ.get("RAY_ADDRESS") or None
        if address is not None and address != "auto" and not ray.is_initialized():
            _probe(address, timeout)  # fail fast and within timeout, before ray.init
        elif address is not None and address != "auto" and not address.startswith("ray://"):
            check_reachable(address, "ray")
        if ray.is_initialized() and _OWNED is None and not _is_client_mode():
            _check_joined_alive()
        if ray.is_initialized():
            if address is not None and address != "auto" and _OWNED is not None:
                raise ClusterConnectionError(
                    f"ray: this process runs an embedded chainprod cluster; cannot also join {address!r} "
                    "(one process talks to one Ray cluster). Call "
                    "chainprod.executors.ray_executor.shutdown() first.", "ray")
            if address is not None and address != "auto" and not address.startswith("ray://"):
                cur = _current_address() or ""
                if cur.split(":")[-1] != address.split(":")[-1]:
                    raise ClusterConnectionError(
                        f"ray: this process is already connected to {cur!r}; cannot also join {address!r}",
                        "ray")
            return False
        if address is None:
            return _start_embedded(workers, init_kwargs)
        return _join(address, init_kwargs)


def _is_client_mode():
    try:
        return ray.util.client.ray.is_connected()
    except Exception:  # pragma: no cover
        return False


def shutdown():
    """Shut down Ray if chainprod started it (a joined cluster is only disconnected from)."""
    global _OWNED
    with _LOCK:
        owned, _OWNED = _OWNED, None
        if ray.is_initialized() and owned is not None:
            ray.shutdown()
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

    def _default_workers(self):
        if ray.is_initialized():
            return max(1, int(ray.cluster_resources().get("CPU", 2)))
        return 2

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
                    out.append(ray.get(h, timeout=deadline.left()))
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
                except rex.TaskCancelledError as e:
                    raise DistributedError(f"ray: task {name!r} was cancelled", "ray", name) from e
                except rex.RayTaskError as e:
                    # An exception raised by the numbers: surface it as its own type.
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, Exception):
                        raise cause from None
                    raise
        except BaseException:
            for h in handles:
                with contextlib.suppress(Exception):
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
