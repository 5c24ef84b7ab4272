"""Executors: run any schedule on blocks, locally or on a cluster.

Named registry in joblib's ``BACKENDS`` habit; engines are imported only
when chosen, so ``import chainprod`` never imports Ray or Dask.
"""

from __future__ import annotations

import importlib

from .base import Executor, ListResult, ScanResult, Trace, TraceEvent

__all__ = ["EXECUTORS", "get_executor", "register_executor", "valid_backends",
           "Executor", "ScanResult", "ListResult", "Trace", "TraceEvent"]

#: name -> ("module:Class", pip extra that provides its engine or None)
EXECUTORS: dict[str, tuple[str, str | None]] = {
    "serial": ("chainprod.executors.serial:SerialExecutor", None),
    "vectorized": ("chainprod.executors.vectorized:VectorizedExecutor", None),
    "threads": ("chainprod.executors.threads:ThreadsExecutor", "threads"),
    "ray": ("chainprod.executors.ray_executor:RayExecutor", "ray"),
    "dask": ("chainprod.executors.dask_executor:DaskExecutor", "dask"),
}
_instances: dict[str, Executor] = {}


def valid_backends() -> list[str]:
    return sorted(EXECUTORS)


def register_executor(name: str, target, extra: str | None = None) -> None:
    """Register an executor class (or ``"module:Class"`` string) under ``name``."""
    EXECUTORS[name] = (target, extra)
    _instances.pop(name, None)


def get_executor(backend) -> Executor:
    """The executor for ``backend`` (a registered name or an Executor instance)."""
    if isinstance(backend, Executor):
        return backend
    if not isinstance(backend, str) or backend not in EXECUTORS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")
    if backend not in _instances:
        target, extra = EXECUTORS[backend]
        if isinstance(target, str):
            mod, cls = target.split(":")
            try:
                target = getattr(importlib.import_module(mod), cls)
            except ImportError as e:
                hint = f" Install it with: pip install 'chainprod[{extra}]'" if extra else ""
                raise ImportError(f"backend {backend!r} needs a package that is missing ({e.name}).{hint}") from e
        _instances[backend] = target()
    return _instances[backend]
