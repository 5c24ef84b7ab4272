"""Executors: run any schedule on blocks, locally or on a cluster.

Named registry in joblib's ``BACKENDS`` habit; engines are imported only
when chosen, so ``import chainprod`` never imports Ray or Dask. Inside the
package the order is ``base`` -> ``serial``, ``vectorized``, ``threads`` ->
``remote_tasks`` -> ``distributed`` -> ``ray_executor``, ``dask_executor``
(``array_api``, the vectorized rounds for torch, JAX and CuPy arrays, beside ``vectorized``);
this module, the registry, reaches the engines only by name. What an
executor can do beyond :meth:`Executor.run` it declares as a class
attribute (``runs_task_graphs``), never by the methods it happens to have.
"""

from __future__ import annotations

import contextlib
import importlib

from .base import Executor, ListResult, ScanResult, Trace, TraceEvent

__all__ = ["EXECUTORS", "get_executor", "register_executor", "valid_backends", "cluster",
           "Executor", "ScanResult", "ListResult", "Trace", "TraceEvent"]

#: name -> ("module:Class", pip extra that provides its engine or None).
#: A distributed engine's module also defines ``cluster(workers, address, ...)``.
EXECUTORS: dict[str, tuple[str, str | None]] = {
    "serial": ("chainprod.executors.serial:SerialExecutor", None),
    "vectorized": ("chainprod.executors.vectorized:VectorizedExecutor", None),
    "threads": ("chainprod.executors.threads:ThreadsExecutor", "threads"),
    "ray": ("chainprod.executors.ray_executor:RayExecutor", "ray"),
    "dask": ("chainprod.executors.dask_executor:DaskExecutor", "dask"),
    "array": ("chainprod.executors.array_api:ArrayExecutor", "array"),
}
_BUILTIN = frozenset(EXECUTORS)
_DISTRIBUTED = ("ray", "dask")
_instances: dict[str, Executor] = {}


def valid_backends() -> list[str]:
    """Every registered backend name."""
    return sorted(EXECUTORS)


def register_executor(name: str, target, extra: str | None = None, *, override: bool = False) -> None:
    """Register an executor class (or ``"module:Class"`` string) under ``name``.

    ``extra`` names the pip extra that installs its engine (for the error
    when it is missing). A built-in name is replaced only with ``override=True``.

    What ``grad`` does with the executor follows its class attribute
    ``runs_task_graphs`` (see :class:`Executor`): ``False`` (the default of
    :class:`Executor`) runs only :meth:`Executor.run` on Jacobian blocks
    formed on the driver; ``True`` (a
    :class:`~chainprod.executors.distributed.DistributedExecutor` subclass)
    runs the whole backward pass as a task graph on the executor's workers.
    """
    if name in _BUILTIN and not override:
        raise ValueError(f"{name!r} is a built-in backend; pass override=True to replace it")
    EXECUTORS[name] = (target, extra)
    _instances.pop(name, None)


def _import(backend, attr=None):
    target, extra = EXECUTORS[backend]
    if not isinstance(target, str):
        return target
    mod, cls = target.split(":")
    try:
        return getattr(importlib.import_module(mod), attr or cls)
    except ImportError as e:
        hint = f" Install it with: pip install 'chainprod[{extra}]'" if extra else ""
        raise ImportError(f"backend {backend!r} needs a package that is missing ({e.name}).{hint}") from e


def get_executor(backend) -> Executor:
    """The executor for ``backend`` (a registered name or an Executor instance)."""
    if isinstance(backend, Executor):
        return backend
    if not isinstance(backend, str) or backend not in EXECUTORS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")
    if backend not in _instances:
        _instances[backend] = _import(backend)()
    return _instances[backend]


@contextlib.contextmanager
def cluster(backend: str, workers: int | None = None, address=None, *, timeout=None, retries=3,
            **engine_options):
    """Hold a Ray or Dask cluster for a block of work; yields the executor.

    >>> with chainprod.cluster("dask", workers=2) as ex:          # doctest: +SKIP
    ...     g = chainprod.grad(chain, x, backend=ex, workers=2)
    ...     g = chainprod.grad(chain, x, backend="dask")           # same cluster

    With ``address=None`` a local cluster is started for the block (unless
    the process already holds one, which is then reused) and shut down at
    its end if this block started it. With ``address=`` (a ``host:port``, a
    ``ray://`` URL or a ``distributed.Client``) the cluster is joined and
    left running. ``engine_options`` go to ``ray.init`` / ``LocalCluster``.
    Inside the block ``backend="ray"`` / ``"dask"`` use this cluster too.
    """
    if backend not in _DISTRIBUTED:
        raise ValueError(f"chainprod.cluster() needs backend 'ray' or 'dask', got {backend!r}")
    engine_cluster = _import(backend, "cluster")
    with engine_cluster(workers=workers, address=address, timeout=timeout, retries=retries,
                        **engine_options) as ex:
        yield ex
