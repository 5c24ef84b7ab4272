"""How one row of the sweep is measured: the chain of a problem, the gradient timings, sharded training steps.

:mod:`chainprod.bench` plans the sweep and writes it; this module holds what
one measurement runs:

* :func:`baseline_backends` says which baselines (:data:`BASELINES`) run here;
* :func:`build_chain` builds the chain of a problem;
* :func:`timing_of` times one gradient (a baseline, a peer or a scan) with
  :mod:`chainprod._timing`;
* the *sharded* rows (backends :data:`SHARDED`, ``ray-sharded`` and
  ``dask-sharded``) time one training step of a model that lives on ``P``
  workers (:func:`chainprod.shard.shard`): ``value_and_grad`` plus
  ``sgd_step``, by :func:`chainprod.shard.measure_sharded_step`. Their
  forward, backward and total columns are the step's (the backward includes
  the SGD update, a few vector ops per shard), ``bytes_moved`` what crossed
  a process boundary, and the plan column what ran across the shards
  (``backprop`` is the pipeline; at ``P <= 2`` every scan is that plan).
  :class:`Clusters` opens one cluster per engine for the whole sweep.
"""

from __future__ import annotations

import contextlib
import importlib.util

import numpy as np

from ._timing import backprop_kernels, measure_chainprod, measure_jax, measure_torch
from .executors import cluster
from .layers import diagonal_chain, mlp
from .shard import measure_sharded_step, shard

__all__ = ["BASELINES", "SHARDED", "baseline_backends", "build_chain", "timing_of", "sharded_engine",
           "sharded_available", "sharded_estimate", "Clusters", "sharded_row", "measure_sharded", "traced_step"]

#: the backprop implementations every problem is measured with, where installed
BASELINES = ("backprop", "backprop-numpy", "jax", "torch")
#: sharded backends of the sweep and the engine each runs on
SHARDED = {"ray-sharded": "ray", "dask-sharded": "dask"}
#: what each engine needs installed
_MODULES = {"ray": "ray", "dask": "distributed"}
#: rough seconds to place a model (start P actors or pinned states, load the kernels there): ETA only
_PLACE_SECONDS = {"ray": 2.5, "dask": 1.5}
#: untimed steps after placing a model (the first loads the kernels on the workers)
WARMUP = 1


def baseline_backends(names) -> tuple[dict, list]:
    """``({baseline: backend label}, [skipped reasons])`` of the baselines that run here."""
    kernels = backprop_kernels()
    run, skipped = {}, []
    for name in names:
        if name == "backprop":
            run[name] = kernels[0] if kernels else "numpy"
        elif name == "backprop-numpy":
            if len(kernels) > 1:
                run[name] = "numpy"
            else:
                skipped.append({"baseline": name, "reason": "backprop already is the numpy loop here "
                                                            "(no compiled kernels)"})
        elif name in ("jax", "torch"):
            if importlib.util.find_spec(name) is None:
                skipped.append({"baseline": name, "reason": f"{name} is not installed"})
            else:
                run[name] = name
        else:
            raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    return run, skipped



def build_chain(structure, L, w, dtype, seed=0):
    """The chain of a problem: ``mlp([w] * L + [1])`` or ``diagonal_chain(L - 1, w)`` (L layers each)."""
    if structure == "dense":
        return mlp([w] * L + [1], dtype=np.dtype(dtype), seed=seed)
    if structure == "diagonal":
        return diagonal_chain(L - 1, w, dtype=np.dtype(dtype), seed=seed)
    raise ValueError(f"unknown structure {structure!r}; valid: dense, diagonal")


def timing_of(method, backend, workers, chain, x, repeats, *, baseline):
    """Time one gradient: a peer (``jax``, ``torch``), a backprop baseline (``backend`` = kernels) or a scan."""
    if method == "jax":
        return measure_jax(chain, x, repeats)
    if method == "torch":
        return measure_torch(chain, x, repeats)
    if baseline:  # backprop, backprop-numpy: the backend label is the kernel set
        return measure_chainprod(chain, x, method="backprop", kernels=backend if backprop_kernels() else None,
                                 repeats=repeats)
    return measure_chainprod(chain, x, method=method, backend=backend, workers=workers, repeats=repeats, trace=True)


# -- sharded training steps ------------------------------------------------------------------------
def sharded_engine(backend) -> str | None:
    """``"ray"`` for ``"ray-sharded"``, ``"dask"`` for ``"dask-sharded"``, None for any other backend."""
    return SHARDED.get(backend) if isinstance(backend, str) else None


def sharded_available(backend) -> str | None:
    """None if the sharded ``backend`` can run here, else the reason it cannot."""
    engine = SHARDED[backend]
    if importlib.util.find_spec(_MODULES[engine]) is None:
        return (f"backend {backend!r} not available: {_MODULES[engine]} is not installed "
                f"(pip install 'chainprod[{engine}]')")
    return None


def sharded_estimate(backend, P, step_seconds, repeats, latency) -> float:
    """Seconds a sharded row should take: placing the model, then ``WARMUP + repeats`` steps.

    A step is estimated as the local gradient (``step_seconds``) plus one
    call latency per call of the pipeline (``2P - 1`` dependent calls).
    """
    engine = SHARDED[backend]
    return _PLACE_SECONDS[engine] + (WARMUP + repeats) * (step_seconds + (2 * P - 1) * latency)


class Clusters:
    """One cluster per engine for a whole sweep, opened when a sharded row first needs it.

    ``clusters.get("ray")`` is the executor of ``chainprod.cluster("ray",
    workers=P)`` with ``P`` the largest worker count of the sweep (an
    embedded cluster already running is reused); :meth:`close` leaves every
    cluster this object started.
    """

    def __init__(self, workers=2):
        self.workers = int(workers)
        self._stack = contextlib.ExitStack()
        self._open = {}

    def get(self, engine):
        if engine not in self._open:
            self._open[engine] = self._stack.enter_context(cluster(engine, workers=self.workers))
        return self._open[engine]

    def close(self):
        self._open.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def measure_sharded(backend, P, method, chain, x, repeats, executor=None) -> dict:
    """The columns of a sharded row: one training step on ``P`` shards, medians of ``repeats`` steps.

    Forward, backward and total are the step's (medians only: ``min``,
    ``max`` and ``iqr`` stay blank); ``schedule`` is what ran across the
    shards; ``rounds`` and ``measured_rounds`` the dependent cross-shard hops
    of the backward pass.
    """
    m = measure_sharded_step(chain, x, shards=P, method=method, backend=SHARDED[backend], repeats=repeats,
                             warmup=WARMUP, executor=executor)
    return {"forward_median": m["forward"], "backward_median": m["backward"], "total_median": m["total"],
            "schedule": m["method"], "rounds": m["rounds"], "measured_rounds": m["rounds"],
            "bytes_moved": m["bytes_moved"], "workers": m["shards"]}


def traced_step(backend, P, method, chain, x, executor) -> dict:
    """The trace record of one training step (after a warm-up step) for ``traces.json.gz``.

    ``{"kind": "sharded", "schedule", "method", "events", "forward_seconds",
    "backward_seconds", "total_seconds", "bytes_moved", "rounds"}``; each
    event is a call on a shard (``task`` = ``s<b>.<forward|backprop|product|combine>``).
    """
    with shard(chain, executor, shards=P) as model:
        for _ in range(WARMUP):
            _, g = model.value_and_grad(x, method=method)
            model.sgd_step(g, 1e-3)
        _, g, tr = model.value_and_grad(x, method=method, return_trace=True)
        model.sgd_step(g, 1e-3)
    return {"kind": "sharded", "schedule": tr.method, "method": tr.method, "backend": backend, "shards": P,
            "events": tr.to_records(), "forward_seconds": tr.forward_seconds,
            "backward_seconds": tr.backward_seconds, "total_seconds": tr.total_seconds,
            "bytes_moved": tr.bytes_moved, "rounds": tr.rounds}


def sharded_row(backend, P, method, chain, x, repeats, clusters=None, trace=False) -> tuple[dict, dict | None]:
    """``(columns, trace record or None)`` of a sharded row, on ``clusters`` (else on a cluster of its own)."""
    engine = SHARDED[backend]
    with contextlib.ExitStack() as stack:
        if clusters is None:
            clusters = stack.enter_context(Clusters(P))
        ex = clusters.get(engine)
        fields = measure_sharded(backend, P, method, chain, x, repeats, executor=ex)
        return fields, (traced_step(backend, P, method, chain, x, ex) if trace else None)
