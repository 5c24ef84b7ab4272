"""The Dask executor: ``backend="dask"`` (dask.distributed).

The schedule runs as the owner-computes task graph of
:mod:`chainprod.planning.partition`: ``P`` chains of fused tasks submitted
at once with ``client.submit``, each task taking the futures of its inputs,
so only chunk-boundary blocks move between workers.

Keys name the input and the run: ``dask.base.tokenize`` of the blocks (or
of the chain's parameters and input) and of the schedule, then the run's
number in this process, so no run can get another run's results (or trace
events, or cancellation) from the scheduler's live keys. Driver
data enters the graph as tasks (not ``scatter``), so the scheduler can
recompute anything a dead worker held.

Cluster lifecycle
-----------------
* ``address=None``: the process's default ``distributed.Client`` if there
  is one; otherwise an embedded ``LocalCluster`` on loopback (processes, one
  thread each, ``n_workers = max(workers, CPU count)``, ``local_directory`` a temp dir
  chainprod creates and deletes, ``OMP/OPENBLAS/MKL_NUM_THREADS=1`` through
  ``distributed.nanny.pre-spawn-environ``), reused by later runs and closed
  at interpreter exit. Worker processes are spawned, so scripts need the
  usual ``if __name__ == "__main__":`` guard.
* ``address="tcp://host:port"`` or a ``distributed.Client`` joins; never
  closed by chainprod (only the client chainprod opened is). Joining is
  bounded by ``timeout`` (default :data:`CONNECT_TIMEOUT`): a TCP probe, one
  ``identity`` request, then ``Client(...)`` in a thread of its own. Every
  wait of a run (futures, gathering the results, the worker count) takes
  the run's ``timeout``; cancelling and closing take :data:`CANCEL_TIMEOUT`,
  :data:`CLIENT_CLOSE_TIMEOUT` and :data:`CLUSTER_CLOSE_TIMEOUT`.
* ``retries`` maps to the scheduler's ``allowed_failures`` (how often a task
  may be on a worker that dies) on clusters chainprod started; a joined
  cluster keeps its own ``distributed.scheduler.allowed-failures``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import threading
import time
import warnings
import weakref

import dask
import distributed
import numpy as np
from dask.base import tokenize
from distributed import Client, LocalCluster

from ..errors import ClusterConnectionError, DistributedError, DistributedTimeoutError, first_line
from .distributed import (
    DistributedExecutor,
    check_reachable,
    embedded_size,
    make_temp_dir,
    remove_temp_dir,
    run_bounded,
)

__all__ = ["DaskExecutor", "cluster", "shutdown", "BLAS_ENV"]

#: set in every worker process before it starts (before numpy loads BLAS)
BLAS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_LOCK = threading.RLock()
#: the embedded cluster chainprod started: {"cluster", "client", "temp"} or None
_EMBEDDED: dict | None = None
#: clients chainprod opened to joined clusters, by address
_JOINED: dict = {}


def _value(x):
    """Driver data as a task: the scheduler keeps it, so it can be recomputed."""
    return x


#: numbers the runs of this process (see DaskExecutor._token)
_RUNS = itertools.count()

#: id(array) -> (weakref, token) for big read-only arrays (a chain's frozen parameters)
_TOKENS: dict = {}


def _cached_tokens(obj):
    """``obj`` with big read-only arrays replaced by their (cached) tokens.

    Hashing a chain's parameters costs ~0.3 s per 512 MB; they are frozen
    (``writeable=False``), so their token is computed once per array object.
    """
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cached_tokens(o) for o in obj)
    if isinstance(obj, np.ndarray) and obj.nbytes >= 1 << 20 and not obj.flags.writeable:
        hit = _TOKENS.get(id(obj))
        if hit is not None and hit[0]() is obj:
            return ("ndarray-token", hit[1])
        tok = tokenize(obj)
        key = id(obj)
        try:
            ref = weakref.ref(obj, lambda _r: _TOKENS.pop(key, None))
        except TypeError:  # pragma: no cover
            return ("ndarray-token", tok)
        _TOKENS[key] = (ref, tok)
        return ("ndarray-token", tok)
    return obj


def start_local(workers=None, retries=3, **cluster_kwargs):
    """Start chainprod's embedded LocalCluster (if not running); returns (client, started)."""
    global _EMBEDDED
    with _LOCK:
        if _EMBEDDED is not None:
            return _EMBEDDED["client"], False
        temp = make_temp_dir("cpdask-")
        config = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in BLAS_ENV.items()}
        config["distributed.scheduler.allowed-failures"] = retries
        kw = dict(n_workers=embedded_size(workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                  dashboard_address=None, local_directory=temp, silence_logs=logging.ERROR)
        kw.update(cluster_kwargs)
        try:
            with dask.config.set(config), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*already in use.*")
                lc = LocalCluster(**kw)
                client = Client(lc, set_as_default=False)
        except Exception as e:
            remove_temp_dir(temp)
            raise ClusterConnectionError(f"dask: could not start an embedded LocalCluster: {e}", "dask") from e
        _EMBEDDED = {"cluster": lc, "client": client, "temp": temp}
        return client, True


#: seconds a join may take when no timeout= is given
CONNECT_TIMEOUT = 10.0
#: seconds a cancel (after a failed or timed-out run) may take
CANCEL_TIMEOUT = 5.0
#: seconds closing a client, and closing the embedded cluster, may take
CLIENT_CLOSE_TIMEOUT, CLUSTER_CLOSE_TIMEOUT = 5.0, 10.0


def _probe(address, timeout):
    """Fail within ``timeout`` with a clear error unless a Dask scheduler answers at ``address``.

    ``Client(address, timeout=...)`` can wait minutes on a port that accepts
    TCP but never completes Dask's handshake (another service, a silent
    socket). One ``identity`` request on a comm of our own, bounded by
    ``timeout``, in a thread with its own event loop (the caller may already
    run one), says quickly whether a scheduler is there.
    """
    import asyncio

    from distributed.comm import connect

    t_end = time.monotonic() + timeout

    async def identity():
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    box = {}

    def run():
        try:
            box["reply"] = asyncio.run(asyncio.wait_for(identity(), max(0.05, t_end - time.monotonic())))
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    th = threading.Thread(target=run, daemon=True, name="chainprod-dask-probe")
    th.start()
    th.join(max(0.05, t_end - time.monotonic()) + 0.1)
    reply = box.get("reply")
    if th.is_alive() or not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        why = "no answer" if th.is_alive() or "error" in box and isinstance(
            box["error"], (TimeoutError, asyncio.TimeoutError)) else (
            f"{type(box['error']).__name__}: {box['error']}" if "error" in box else f"unexpected reply {reply!r:.80}")
        raise ClusterConnectionError(
            f"dask: {address!r} accepts connections but does not answer as a Dask scheduler within "
            f"{timeout:g}s ({why}); is it another service (e.g. a Ray head)? `dask scheduler` prints "
            "the address to use", "dask")


def _join(address, timeout):
    with _LOCK:
        c = _JOINED.get(address)
        if c is not None and c.status == "running":
            return c
        t = CONNECT_TIMEOUT if timeout is None else min(float(timeout), 3600.0)
        t0 = time.monotonic()
        check_reachable(address, "dask", timeout=min(t, 3.0))
        _probe(address if "://" in address else f"tcp://{address}", max(0.05, t - (time.monotonic() - t0)))
        left = max(0.05, t - (time.monotonic() - t0))
        try:  # Client(timeout=) bounds the connect, not what follows it: bound the whole call
            c = run_bounded(lambda: Client(address, timeout=left, set_as_default=False), left,
                            name="chainprod-dask-join", late=lambda c: c.close(timeout=CLIENT_CLOSE_TIMEOUT))
        except TimeoutError:
            raise ClusterConnectionError(f"dask: joining the scheduler at {address!r} did not complete within "
                                         f"{t:g}s", "dask") from None
        except Exception as e:
            raise ClusterConnectionError(f"dask: could not join the scheduler at {address!r}: {e}",
                                         "dask") from e
        _JOINED[address] = c
        return c


def shutdown():
    """Close the embedded cluster (if chainprod started one) and the clients chainprod opened."""
    global _EMBEDDED
    with _LOCK:
        emb, _EMBEDDED = _EMBEDDED, None
        for c in list(_JOINED.values()):
            with contextlib.suppress(Exception):
                c.close(timeout=CLIENT_CLOSE_TIMEOUT)
        _JOINED.clear()
        if emb is not None:
            with contextlib.suppress(Exception):
                emb["client"].close(timeout=CLIENT_CLOSE_TIMEOUT)
            with contextlib.suppress(Exception):
                emb["cluster"].close(timeout=CLUSTER_CLOSE_TIMEOUT)
            remove_temp_dir(emb["temp"])


@atexit.register
def _at_exit():  # pragma: no cover - interpreter exit
    with contextlib.suppress(Exception):
        shutdown()


class DaskExecutor(DistributedExecutor):
    """``backend="dask"``: the owner-computes task graph on a dask.distributed cluster.

    ``DaskExecutor(address=None, timeout=None, retries=3, workers=None,
    **local_cluster_kwargs)``; ``address`` may be a scheduler address or a
    ``distributed.Client``. See
    :class:`~chainprod.executors.distributed.DistributedExecutor`.
    """

    name = "dask"

    def __init__(self, address=None, **kw):
        super().__init__(address, **kw)
        self._client = None
        self._owned = False

    def connect(self, workers):
        a = self.address
        if isinstance(a, Client):
            self._client, self._owned = a, False
        elif isinstance(a, str):
            self._client, self._owned = _join(a, self.timeout), False
        elif a is None:
            try:
                self._client, self._owned = distributed.default_client(), False
            except ValueError:
                self._client, _ = start_local(workers, self.retries, **self.engine_options)
                self._owned = True
        else:
            raise TypeError(f"dask: address must be 'tcp://host:port', a distributed.Client or None, "
                            f"got {type(a).__name__}")
        if self._client.status != "running":
            raise ClusterConnectionError(f"dask: the client is {self._client.status}", "dask")
        return self._client

    def _use_retries(self, retries):
        """Honour ``retries`` on a cluster chainprod started (the scheduler runs in this process)."""
        if self._owned and _EMBEDDED is not None:
            sched = getattr(_EMBEDDED["cluster"], "scheduler", None)
            if sched is not None:
                sched.allowed_failures = retries

    def _default_workers(self):
        if self._client is None:
            return 2
        # one identity request, bounded like a join (scheduler_info() would wait as long as it takes)
        t = CONNECT_TIMEOUT if self.timeout is None else min(self.timeout, 3600.0)
        try:
            info = self._client.sync(self._client.scheduler.identity, n_workers=-1, callback_timeout=t)
        except (TimeoutError, OSError) as e:
            raise ClusterConnectionError(f"dask: the scheduler did not list its workers within {t:g}s "
                                         f"({type(e).__name__}); pass workers= or check it", "dask") from None
        return max(1, len(info.get("workers", {})))

    def _token(self, *parts):
        # The input's token, then the run's number: keys are never shared between
        # runs. The scheduler may still hold an earlier run's keys (being
        # forgotten, or cancelled): a run reusing them would get that run's
        # results with its trace events, or its cancellation.
        return f"{tokenize(*_cached_tokens(parts))}-{next(_RUNS)}"

    def _put(self, obj, key):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            return self._client.submit(_value, obj, key=key)

    def _submit(self, fn, args, key, retries):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            return self._client.submit(fn, *args, key=key)

    def _wait(self, handles, deadline, names, retries):
        out = []
        try:
            for f, name in zip(handles, names):
                try:
                    self._client.sync(distributed.client._wait, [f], timeout=deadline.left())
                    if f.status != "finished":
                        # raises the task's error (KilledWorker, an error of the numbers, ...)
                        f.result(timeout=deadline.left())
                    # all finished: fetch every result at once, straight from the workers
                    # (not through the scheduler, which runs in this process for
                    # embedded clusters), on the last iteration
                    if len(out) == len(handles) - 1:
                        out = self._client.sync(self._client._gather, list(handles), direct=True,
                                                callback_timeout=deadline.left())
                    else:
                        out.append(None)
                except (TimeoutError, distributed.TimeoutError):
                    raise DistributedTimeoutError(
                        f"dask: the run did not finish within timeout={deadline.timeout}s (waiting for "
                        f"task {name!r}); its tasks were cancelled. Raise timeout= or use fewer/larger "
                        "workers.", "dask", name) from None
                except distributed.scheduler.KilledWorker as e:
                    raise DistributedError(
                        f"dask: task {name!r} (or a task it depends on) failed: the worker running it "
                        f"died (KilledWorker: {e}); allowed failures per task were exhausted "
                        f"(retries={retries}).", "dask", name) from None
                except (distributed.client.FutureCancelledError, distributed.client.FuturesCancelledError) as e:
                    raise DistributedError(f"dask: task {name!r} was cancelled ({first_line(e)})", "dask",
                                           name) from None
                except Exception as e:
                    if _is_engine_error(e):  # the engine's own failure: never let it escape raw
                        raise DistributedError(f"dask: task {name!r} failed: {type(e).__name__}: "
                                               f"{first_line(e)}", "dask", name) from e
                    raise  # an error of the numbers, raised by the task: surface it as it is
        except BaseException:
            with contextlib.suppress(Exception):  # one message to the scheduler; bounded all the same
                self._client.sync(self._client._cancel, handles, force=True, callback_timeout=CANCEL_TIMEOUT)
            raise
        return out

    def _release(self, handles):
        for f in handles:
            with contextlib.suppress(Exception):
                f.release()

    def prepare(self, workers=None):
        # Connected first, so that workers=None counts the cluster's workers
        # (the client does not exist before).
        self.connect(self._resolve_workers(workers))
        return super().prepare(workers)


def _is_engine_error(e) -> bool:
    """An exception of Dask's machinery (comms, scheduler, event loop), not of a task's code."""
    mod = type(e).__module__.split(".")[0]
    return mod in ("distributed", "tornado", "asyncio", "concurrent") or isinstance(e, (OSError, EOFError))


@contextlib.contextmanager
def cluster(workers=None, address=None, *, timeout=None, retries=3, **cluster_kwargs):
    """Hold a Dask cluster for a block of work; yields a :class:`DaskExecutor`.

    With ``address=None`` starts chainprod's embedded ``LocalCluster``
    (``cluster_kwargs`` go to it) unless it already runs, and closes it at the
    end of the block if this block started it. With ``address`` (string or
    ``distributed.Client``) joins and leaves the cluster running.
    """
    started = False
    if address is None:
        _, started = start_local(workers, retries, **cluster_kwargs)
    ex = DaskExecutor(address=address, timeout=timeout, retries=retries, workers=workers)
    try:
        yield ex
    finally:
        if started:
            shutdown()
