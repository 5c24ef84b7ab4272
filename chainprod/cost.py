"""A cost model of one run, and ``method="auto"``.

Time of a run on ``P`` workers, round by round (every round is a barrier)::

    T = sum over rounds of [ latency(backend, tasks in round)
                             + max over tasks of (flops of its ops x batch / rate(kind)) ]

with ``tasks in round = min(P, ops)``: ops are dealt to ``P`` workers in
contiguous shares (Brent: ``T_P <= W/P + D``). The constants below are
defaults measured on the development machine (2-core x86_64, numpy 2.4,
OpenBLAS); ``chainprod calibrate`` measures them anew and saves them where
this module finds them (see :func:`load_model`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .blocks import BlockSeq
from .schedules import Schedule, _round_flops, _spec_arrays, build

__all__ = ["CostModel", "load_model", "predict", "choose_schedule", "DEFAULT_MODEL"]


@dataclass
class CostModel:
    """Per-backend latencies (seconds) and per-kind compute rates (flop/s)."""

    #: seconds per batched numpy call (a group of ops) in-process
    call_latency: float = 6e-6
    #: extra seconds per op inside a batched call (loop overhead of stacked matmul)
    op_latency: float = 6e-8
    #: flop/s of batched dense matmul and of elementwise (diagonal) kernels
    dense_rate: float = 6e9
    elementwise_rate: float = 1.5e9
    #: seconds per op when run one at a time (serial executor)
    serial_op_latency: float = 4e-6
    #: per-round fixed cost of each backend (barrier / dependent hop), seconds
    round_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 6e-5, "ray": 1.5e-3, "dask": 5.8e-3})
    #: per-task cost of each backend, seconds
    task_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 2e-5, "ray": 5e-4, "dask": 1.8e-3})
    #: seconds per backprop step (one vector-Jacobian product in a Python loop)
    backprop_step: float = 2.5e-6
    source: str = "defaults"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


DEFAULT_MODEL = CostModel()


def model_path() -> str:
    """Where ``chainprod calibrate`` saves the model (``$CHAINPROD_COST_MODEL`` overrides)."""
    env = os.environ.get("CHAINPROD_COST_MODEL")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chainprod", "cost_model.json")


@functools.lru_cache(maxsize=1)
def load_model() -> CostModel:
    """The calibrated model if one was saved, else the defaults."""
    try:
        with open(model_path()) as f:
            data = json.load(f)
        return CostModel(**data)
    except (OSError, ValueError, TypeError):
        return DEFAULT_MODEL


def _round_costs(sched: Schedule, blocks, model: CostModel):
    """Per round: (ops, dense flops, elementwise flops, widest single op time)."""
    spec = _spec_arrays(blocks, sched.length)
    out = []
    for i, k, j in sched.intervals():
        f = _round_flops(spec, i, k, j)
        dense = (spec.dense_before[j + 1] - spec.dense_before[i]) > 0
        # dense x dense products are matmuls; anything touching a diagonal is elementwise
        ld = (spec.dense_before[k + 1] - spec.dense_before[i]) > 0
        rd = (spec.dense_before[j + 1] - spec.dense_before[k + 1]) > 0
        mm = ld & rd
        t = np.where(mm, f / model.dense_rate, f / model.elementwise_rate)
        out.append((len(i), t, dense))
    return out


def predict(sched: Schedule, blocks=None, *, backend="vectorized", workers=None, batch=1,
            model: CostModel | None = None) -> float:
    """Predicted seconds for running ``sched`` on ``backend`` with ``workers``."""
    model = model or load_model()
    P = workers or 1
    total = 0.0
    for ops, t, _ in _round_costs(sched, blocks, model):
        t = t * batch
        if backend == "serial":
            total += ops * model.serial_op_latency + t.sum()
            continue
        tasks = min(P, ops) if backend != "vectorized" else 1
        share = -(-ops // tasks)
        # the slowest task sets the round; ops are dealt in contiguous shares
        work = max(t[s: s + share].sum() for s in range(0, ops, share)) if tasks > 1 else t.sum()
        total += (model.round_latency.get(backend, 0.0) + model.task_latency.get(backend, 0.0)
                  + model.call_latency + ops / tasks * model.op_latency + work)
    return total


def predict_backprop(L, width, batch=1, model: CostModel | None = None) -> float:
    """Predicted seconds of the sequential backprop loop (one VJP per layer)."""
    model = model or load_model()
    return L * (model.backprop_step + 2 * width * width * batch / model.dense_rate)


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
            yield build("chunked", L, chunks=P)


def choose_schedule(L: int, *, blocks=None, workers=None, backend="vectorized") -> Schedule:
    """``method="auto"``: the candidate with the least predicted time.

    Candidates: ``sequential``, ``brent_kung``, ``sklansky`` and ``chunked``
    (chunk counts around ``sqrt(L)`` for the vectorized executor, ``P``
    chunks for parallel backends). ``hillis_steele`` and ``independent`` do
    strictly more work than ``sklansky`` for the same depth, so they never win.
    """
    sig = blocks.signature() if isinstance(blocks, BlockSeq) else (
        blocks if isinstance(blocks, (int, type(None))) else tuple(map(tuple, blocks)))
    return _choose_cached(L, sig, workers, backend, blocks if isinstance(blocks, BlockSeq) else None)


def _choose_cached(L, sig, workers, backend, seq):
    key = (L, sig, workers, backend)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    blocks = seq if seq is not None else (sig if not isinstance(sig, tuple) else list(sig))
    batch = seq.batch if seq is not None else 1
    best = min(_candidates(L, workers, backend),
               key=lambda s: predict(s, blocks, backend=backend, workers=workers, batch=batch))
    _CHOICES[key] = best
    return best


_CHOICES: dict = {}
