"""``method="auto"``: the candidate schedule with the least predicted time, and grad's whole time.

``"auto"`` is decided here, by the cost model, and is not a builder in the
schedule registry (:data:`chainprod.schedules.SCHEDULES`): the registry sits
below the cost model and cannot ask it. :func:`resolve_schedule` is the one
place a method name, ``"auto"`` included, becomes a :class:`Schedule`;
every caller above the cost model resolves through it, so kernels and
executors only ever receive a Schedule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._caches import PlanCache, cpu_count, register_cache
from .._validate import check_workers
from ..arrays import on_accelerator
from ..blocks import KINDS, BlockSeq, Segment
from ..schedules import Schedule, build, schedule, valid_methods
from .model import CostModel, load_model
from .scan import chain_blocks, predict, predict_backprop, signature

__all__ = ["AUTO", "LOCAL_BACKENDS", "RemoteAuto", "auto_runs_backprop", "choose_schedule", "known_remote_auto",
           "predict_grad", "remote_auto", "resolve_schedule", "valid_schedules"]

#: the method name the cost model resolves (not a builder in the schedule registry)
AUTO = "auto"

# -- method="auto" -------------------------------------------------------------
LOCAL_BACKENDS = ("vectorized", "serial", "threads")
#: backends costed as another: the array executor runs the vectorized executor's rounds, so on a CPU
#: its best schedule is the vectorized one's (the calibrated costs are numpy's; torch and JAX on a CPU
#: pay more per call but the same number of calls per round)
COSTED_AS = {"array": "vectorized"}
#: ``auto`` on the array executor with blocks on an accelerator: each round is a few kernel launches
#: and launch latency, not flops, dominates, so the fewest rounds win: ``ceil(log2 L)`` (Sklansky)
ACCELERATOR_SCAN = "sklansky"
#: what ``auto`` assumes of an accelerator where it weighs a scan against backprop (rough data-centre GPU
#: figures, not measured here): seconds per kernel launch, sustained flops of batched small products (an
#: order of magnitude below peak), and the most bytes of Jacobian blocks a scan may form in device memory
ACCELERATOR = {"launch_seconds": 1e-5, "flops": 1e13, "max_bytes": 2 ** 30}


def auto_runs_backprop(sched: Schedule, backend) -> bool:
    """For ``grad``: when ``auto``'s best scan is the sequential one on a local backend,
    backprop does the same order without forming Jacobians, so ``auto`` runs backprop."""
    return sched.name == "sequential" and isinstance(backend, str) and backend in LOCAL_BACKENDS


def _candidates(L, workers, backend):
    yield build("sequential", L)
    if L < 4:
        return
    yield build("brent_kung", L)
    yield build("sklansky", L)
    if backend in ("vectorized", "serial"):
        root = math.sqrt(L)
        for f in (0.25, 0.5, 1, 2, 4):
            c = max(2, int(round(root * f)))
            if c < L:
                yield build("chunked", L, chunks=c)
    else:
        P = workers or cpu_count()
        if 1 < P < L:
            yield build("chunked", L, chunks=P + 1)  # P + 1 chunks keep P workers busy


def _choose(L, blocks, workers, backend, batch, model):
    return min(_candidates(L, workers, backend),
               key=lambda s: predict(s, blocks, backend=backend, workers=workers, batch=batch, model=model))


def choose_schedule(L: int, *, blocks=None, workers=None, backend="vectorized") -> Schedule:
    """``method="auto"``: the candidate schedule with the least predicted scan time.

    Candidates: ``sequential``, ``brent_kung``, ``sklansky`` and ``chunked``
    (chunk counts around ``sqrt(L)`` for the vectorized executor, ``P``
    chunks for parallel backends). ``hillis_steele`` and ``independent`` do
    strictly more work than ``sklansky`` for the same depth, so they never
    win. Choices are cached per (L, block shapes, workers, backend).
    """
    L = int(L)
    backend = COSTED_AS.get(backend, backend) if isinstance(backend, str) else backend
    batch = blocks.batch if isinstance(blocks, BlockSeq) else 1
    sig = signature(blocks if blocks is not None else 64, L)
    model = load_model()
    key = (L, sig, workers, str(backend), batch, model.key)
    return _CHOICES.get(key, lambda: _choose(L, _shapes_of(sig), workers, backend, batch, model))


def _shapes_of(sig) -> BlockSeq:
    """A shape-only BlockSeq (batch 0: not one byte of data) from a run-length signature."""
    return BlockSeq([Segment(kind, np.empty((count, 0, *KINDS[kind].shape(rows, cols))))
                     for kind, count, rows, cols in sig])


_CHOICES = PlanCache(maxsize=256)


def valid_schedules() -> list[str]:
    """Every method :func:`resolve_schedule` accepts by name: the registry's names and aliases, and ``"auto"``."""
    return sorted([*valid_methods(), AUTO])


def resolve_schedule(method, L: int, *, workers: int | None = None, blocks=None, backend: str = "vectorized",
                     **options) -> Schedule:
    """Turn a method into a :class:`Schedule`, asking the cost model for ``"auto"``.

    Parameters
    ----------
    method : str or Schedule or callable
        ``"auto"`` (the candidate with the least predicted time, see
        :func:`choose_schedule`), a name or alias from the schedule
        registry, a ready :class:`Schedule`, or a callable
        ``f(L, **options) -> Schedule``; all but ``"auto"`` go to
        :func:`chainprod.schedules.schedule` unchanged.
    L : int
        Number of factors.
    workers : int, optional
        Workers ``P`` the plan will run on (the cost model's ``P`` for
        ``"auto"``; ``chunked`` uses ``P + 1`` chunks).
    blocks : optional
        Block shapes the cost model costs ``"auto"`` on, in any form
        :meth:`Schedule.flops_per_round` takes (a
        :class:`~chainprod.blocks.BlockSeq`, a square width, a list of
        ``(kind, rows, cols)``); the default is width 64. Passed on to
        context builders such as ``chunked``.
    backend : str
        Executor the plan is for (``"auto"`` costs rounds per backend; on
        ``"array"`` it is the vectorized choice on a CPU and
        :data:`ACCELERATOR_SCAN` for blocks on an accelerator).
    **options
        Passed to a named builder (e.g. ``chunks=``); ``"auto"`` takes none.

    Returns
    -------
    Schedule

    Raises
    ------
    ValueError
        An unknown name (the message lists :func:`valid_schedules`).

    Examples
    --------
    >>> resolve_schedule("sklansky", 8).name
    'sklansky'
    >>> isinstance(resolve_schedule("auto", 8, blocks=16), Schedule)
    True
    """
    if isinstance(method, str) and method == AUTO:
        if options:
            raise TypeError(f"schedule 'auto' does not take option(s) {sorted(options)}")
        workers = None if workers is None else check_workers(workers)
        # the plain builder's checks of L (an int >= 1), so "auto" refuses what every name refuses
        build("sequential", L)
        if backend == "array" and isinstance(blocks, BlockSeq) and on_accelerator(blocks.segments[0].array):
            return build(ACCELERATOR_SCAN, L)
        return choose_schedule(L, blocks=blocks, workers=workers, backend=backend)
    if isinstance(method, str) and method not in valid_methods():
        # the registry's own message would omit "auto", which is valid here
        raise ValueError(f"unknown schedule method {method!r}; valid methods: {', '.join(valid_schedules())}")
    return schedule(method, L, workers=workers, blocks=blocks, backend=backend, **options)


class RemoteAuto(NamedTuple):
    """What ``method="auto"`` runs on Ray or Dask (:func:`remote_auto`), and why."""

    #: the plan for the cluster, or None: backprop on the driver is predicted faster
    schedule: Schedule | None
    #: predicted seconds of the backward pass with that plan on the cluster
    cluster: float
    #: predicted seconds of the local (compiled) backprop backward pass
    local: float

    @property
    def note(self) -> str:
        """One line for a trace: where auto ran and the two predictions behind it."""
        if self.schedule is None:
            return (f"auto ran locally: the cluster's predicted time {self.cluster:.3g} s exceeds the local "
                    f"backprop's {self.local:.3g} s")
        return (f"auto ran {self.schedule.name} on the cluster: predicted {self.cluster:.3g} s, the local "
                f"backprop's {self.local:.3g} s")


def remote_auto(structure: str, L: int, width: int, *, backend: str, workers=None, batch=1, kernels="numba",
                model: CostModel | None = None) -> RemoteAuto:
    """``method="auto"`` on a distributed backend: the best plan on the cluster, unless backprop here wins.

    The cluster's time of a plan is the scan preparation (Jacobians and
    parameter VJPs), the cost of shipping the layers
    (:meth:`CostModel.remote_time`) and the plan's makespan on ``workers``
    (:func:`~chainprod.cost.predict`), for the candidate with the least
    makespan. The local time is the compiled backprop's
    (:func:`~chainprod.cost.predict_backprop`). The forward pass runs on
    the driver either way, so it is left out of both. :func:`predict_grad`
    and :func:`chainprod.grad` both decide here.

    Returns
    -------
    RemoteAuto
        ``schedule`` None when the local backprop is predicted faster. Kept
        per arguments and model: costing a plan on a cluster partitions it.
    """
    model = model or load_model()
    args = (structure, L, width, backend, workers, batch, kernels)
    hit = _LAST.get(args)
    if hit is not None and hit[0] is model:
        return hit[1]
    key = (structure, int(L), width, backend, workers, batch, kernels, model.key)
    got = _REMOTE.get(key, lambda: _remote_auto(structure, L, width, backend, workers, batch, kernels, model))
    if len(_LAST) >= 256:
        _LAST.clear()
    _LAST[args] = (model, got)
    return got


def known_remote_auto(structure, L, width, backend, workers, batch, kernels):
    """:func:`remote_auto`'s answer with the saved model if it was already given for these arguments, else None.

    A per-call row on Ray keeps backprop on the driver in about 14 us, so the
    decision must cost well under a microsecond: the last answer per plain
    arguments is kept beside the model it was made with (one tuple hashed,
    one identity compared; the full key hashes the model's description), and
    this positional lookup skips the keyword call.
    """
    hit = _LAST.get((structure, L, width, backend, workers, batch, kernels))
    return hit[1] if hit is not None and hit[0] is load_model() else None


_REMOTE = PlanCache(maxsize=256)
_LAST: dict = {}
register_cache(_LAST.clear)


def _remote_auto(structure, L, width, backend, workers, batch, kernels, model):
    blocks = chain_blocks(structure, L, width)
    sched = _choose(L - 1, blocks, workers, backend, batch, model)
    cluster = (model.run_time(structure, "prep", width, L, batch)
               + model.remote_time(backend, structure, width, L, batch)
               + predict(sched, blocks, backend=backend, workers=workers, batch=batch, model=model, kernels=kernels))
    local = predict_backprop(L, width, batch, model, structure)
    return RemoteAuto(None if local < cluster else sched, cluster, local)


#: the backends where ``auto`` on the compiled kernels measures backprop beside the scans
#: (``chainprod.autotune.COMPILED_BACKENDS``, which sits above this package)
_MEASURED = ("vectorized", "threads")


def predict_grad(structure: str, L: int, width: int, *, method="auto", backend="vectorized",
                 workers=None, batch=1, kernels="numba", model: CostModel | None = None) -> dict:
    """Predicted seconds of ``grad`` on a depth-``L`` chain: forward, backward and end-to-end.

    ``method`` is ``"backprop"``, a schedule name, ``"auto"`` or a Schedule
    for ``L - 1`` factors. ``kernels`` matters for ``"auto"`` on the
    vectorized and threads backends: the compiled kernels measure backprop
    beside the scans and run the faster (:mod:`chainprod.autotune`), so the
    prediction is the lesser of the two; the numpy reference (and any
    kernels on ``serial``) runs the model's pick. On Ray and Dask
    the backward pass also pays :meth:`CostModel.remote_time` per layer, and
    ``"auto"`` runs backprop on the driver where that is predicted faster
    than every plan on the cluster (:func:`remote_auto`, which ``grad``
    follows). Returns ``{"forward", "backward", "total", "schedule"}``;
    ``"schedule"`` is ``"backprop"`` where backprop runs.
    """
    model = model or load_model()
    fwd = model.run_time(structure, "forward", width, L, batch)
    bp = predict_backprop(L, width, batch, model, structure)
    if method == "backprop" or L < 2:
        return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    blocks = chain_blocks(structure, L, width)
    if isinstance(method, Schedule):
        sched = method
    elif method == AUTO and backend not in LOCAL_BACKENDS:
        pick = remote_auto(structure, L, width, backend=backend, workers=workers, batch=batch, kernels=kernels,
                           model=model)
        if pick.schedule is None:
            return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
        return {"forward": fwd, "backward": pick.cluster, "total": fwd + pick.cluster, "schedule": pick.schedule.name}
    elif method == AUTO:
        sched = _choose(L - 1, blocks, workers, backend, batch, model)
        if auto_runs_backprop(sched, backend):
            # grad's auto then runs backprop itself: the same order without forming Jacobians
            return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    else:
        sched = schedule(method, L - 1, workers=workers, backend=backend)
    bwd = (model.run_time(structure, "prep", width, L, batch) + model.remote_time(backend, structure, width, L, batch)
           + predict(sched, blocks, backend=backend, workers=workers, batch=batch, model=model, kernels=kernels))
    if method == AUTO and kernels != "numpy" and backend in _MEASURED and bp < bwd:
        return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "schedule": sched.name}
