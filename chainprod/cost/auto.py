"""``method="auto"``: the candidate schedule with the least predicted time, and grad's whole time.

Registered in the schedule registry as ``"auto"`` (it needs the blocks,
the workers and the backend, so it is a context builder).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._caches import PlanCache
from ..blocks import KINDS, BlockSeq, Segment
from ..schedules import Schedule, build, register_schedule, schedule
from .model import CostModel, load_model
from .scan import chain_blocks, predict, predict_backprop, signature

__all__ = ["LOCAL_BACKENDS", "auto_runs_backprop", "choose_schedule", "predict_grad"]

# -- method="auto" -------------------------------------------------------------
LOCAL_BACKENDS = ("vectorized", "serial", "threads")


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
        P = workers or os.cpu_count() or 1
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
    batch = blocks.batch if isinstance(blocks, BlockSeq) else 1
    sig = signature(blocks if blocks is not None else 64, L)
    model = load_model()
    key = (L, sig, workers, str(backend), batch, model.key)
    return _CHOICES.get(key, lambda: _choose(L, _shapes_of(sig), workers, backend, batch, model))


def _shapes_of(sig) -> BlockSeq:
    """A shape-only BlockSeq (batch 0: not one byte of data) from a run-length signature."""
    return BlockSeq([Segment(kind, np.empty((count, 0, *KINDS[kind].shape(rows, cols))))
                     for kind, count, rows, cols in sig])


def _auto(L: int, *, workers=None, blocks=None, backend="vectorized") -> Schedule:
    return choose_schedule(L, blocks=blocks, workers=workers, backend=backend)


_auto.__doc__ = choose_schedule.__doc__
_CHOICES = PlanCache(maxsize=256)
register_schedule("auto", _auto, context=True, builtin=True)


def predict_grad(structure: str, L: int, width: int, *, method="auto", backend="vectorized",
                 workers=None, batch=1, kernels="numba", model: CostModel | None = None) -> dict:
    """Predicted seconds of ``grad`` on a depth-``L`` chain: forward, backward and end-to-end.

    ``method`` is ``"backprop"``, a schedule name, ``"auto"`` or a Schedule
    for ``L - 1`` factors. ``kernels`` matters for ``"auto"`` on a local
    backend: the compiled kernels measure backprop beside the scans and run
    the faster (:mod:`chainprod.autotune`), so the prediction is the lesser
    of the two; the numpy reference runs the model's pick. On Ray and Dask
    the backward pass also pays :meth:`CostModel.remote_time` per layer.
    Returns ``{"forward", "backward", "total", "schedule"}``.
    """
    model = model or load_model()
    fwd = model.run_time(structure, "forward", width, L, batch)
    bp = predict_backprop(L, width, batch, model, structure)
    if method == "backprop" or L < 2:
        return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    blocks = chain_blocks(structure, L, width)
    if isinstance(method, Schedule):
        sched = method
    elif method == "auto":
        sched = _choose(L - 1, blocks, workers, backend, batch, model)
        if auto_runs_backprop(sched, backend):
            # grad's auto then runs backprop itself: the same order without forming Jacobians
            return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    else:
        sched = schedule(method, L - 1, workers=workers, backend=backend)
    bwd = (model.run_time(structure, "prep", width, L, batch) + model.remote_time(backend, structure, width, L, batch)
           + predict(sched, blocks, backend=backend, workers=workers, batch=batch, model=model, kernels=kernels))
    if method == "auto" and kernels != "numpy" and backend in LOCAL_BACKENDS and bp < bwd:
        return {"forward": fwd, "backward": bp, "total": fwd + bp, "schedule": "backprop"}
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "schedule": sched.name}
