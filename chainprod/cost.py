"""A cost model of one run, the simulator behind it, and ``method="auto"``.

How a run is costed
-------------------
Every combine op of a schedule falls in one of three *op classes*, from the
block shapes and the combine table (:data:`chainprod.blocks.COMBINE`):

* ``mm`` -- dense x dense with more than one row (an interior ``w x w``
  interval times another): a matrix-matrix product;
* ``mv`` -- dense x dense with one row (an interval containing the output
  Jacobian ``A_L`` is a thin ``1 x w`` block): a vector-matrix product;
* ``ew`` -- anything touching a diagonal block: elementwise.

``chainprod calibrate`` measures the seconds per op of each class at a grid
of sizes (ops batched as the vectorized executor batches them, in place) and
the fixed cost of one numpy call; the model interpolates log-log between
grid points. A round on ``P`` workers is list-scheduled: its ops are dealt
to ``min(P, ops)`` tasks in contiguous shares, so the round takes::

    round latency(backend) + tasks x task latency(backend)
        + max over tasks of (calls x call latency + sum of its ops' times x batch)

and rounds add up (every round is a barrier). That is Brent's schedule:
``T_P <= W/P + D`` with ``W`` the work and ``D`` the sum of the rounds'
longest ops, plus the engine's latencies.

``grad`` adds the per-layer work around the scan, also calibrated per
layer type, width and batch: the forward pass (sequential for every
method), building the Jacobians and the parameter VJPs (the scan's
*preparation*), and the backprop loop itself. :func:`predict_grad` puts
these together; :func:`simulate` answers Q4 for many more workers than this
machine has; :func:`crossover` gives the smallest depth where the scan wins.

The defaults below were measured on the development machine (2-core
x86_64, numpy 2.4, OpenBLAS); ``chainprod calibrate`` measures this machine
and saves a JSON file where :func:`load_model` finds it.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .blocks import BlockSeq, Segment
from .schedules import Schedule, _spec_arrays, build

__all__ = [
    "CostModel", "DEFAULT_MODEL", "load_model", "save_model", "model_path", "predict",
    "predict_backprop", "predict_grad", "choose_schedule", "round_stats", "simulate", "crossover",
    "OP_CLASSES", "STRUCTURES",
]

#: op classes of the model (see the module docstring)
OP_CLASSES = ("mm", "mv", "ew")
#: chain structures the per-layer tables know: ``mlp`` layers and ``Diagonal`` layers
STRUCTURES = ("dense", "diagonal")

_W = [2, 4, 8, 16, 32, 64, 128, 256]


def _default_ops():
    # Seconds per op per batch element on the development machine (measured, then rounded).
    return {
        "mm": {"w": _W, "t": [5.0e-8, 6.6e-8, 1.6e-7, 6.0e-7, 3.3e-6, 2.2e-5, 1.6e-4, 1.2e-3]},
        "mv": {"w": _W, "t": [4.5e-8, 5.0e-8, 7.0e-8, 1.5e-7, 4.0e-7, 1.4e-6, 5.5e-6, 2.4e-5]},
        "ew": {"w": _W, "t": [1.0e-8, 1.0e-8, 1.2e-8, 1.5e-8, 2.5e-8, 4.0e-8, 7.0e-8, 1.4e-7]},
    }


def _default_layers():
    # Seconds per layer at batch 1 and batch 16 (measured, then rounded).
    return {
        "dense": {
            "w": _W, "batch": [1, 16],
            "forward": [[3.2e-6] * 4 + [3.6e-6, 5.0e-6, 1.2e-5, 4.5e-5],
                        [3.4e-6, 3.6e-6, 4.0e-6, 5.0e-6, 8.0e-6, 2.0e-5, 7.0e-5, 2.8e-4]],
            "backprop": [[3.0e-6] * 4 + [3.8e-6, 6.0e-6, 2.0e-5, 1.0e-4],
                         [4.0e-6, 4.4e-6, 5.0e-6, 7.0e-6, 1.4e-5, 4.5e-5, 1.6e-4, 6.0e-4]],
            "prep": [[1.0e-7, 2.0e-7, 5.0e-7, 1.5e-6, 6.0e-6, 2.4e-5, 1.0e-4, 5.0e-4],
                     [1.0e-6, 2.5e-6, 8.0e-6, 3.0e-5, 1.2e-4, 5.0e-4, 2.0e-3, 8.0e-3]],
        },
        "diagonal": {
            "w": _W, "batch": [1, 16],
            "forward": [[2.8e-6] * 8, [3.0e-6] * 6 + [4.0e-6, 6.0e-6]],
            "backprop": [[3.0e-6] * 8, [3.2e-6] * 6 + [4.5e-6, 7.0e-6]],
            "prep": [[5.0e-8, 5.0e-8, 6.0e-8, 8.0e-8, 1.2e-7, 2.0e-7, 3.5e-7, 7.0e-7],
                     [1.0e-7, 1.5e-7, 2.5e-7, 4.5e-7, 9.0e-7, 1.8e-6, 3.5e-6, 7.0e-6]],
        },
    }


@dataclass
class CostModel:
    """Calibrated costs of this machine. All times in seconds.

    Attributes
    ----------
    call_latency : float
        Fixed cost of one batched numpy kernel call.
    gather_factor : float
        Slow-down of a batched call whose rows are not a strided view (a
        gather and a scatter copy).
    serial_op_latency : float
        Python overhead per op of the ``serial`` executor.
    ops : dict
        ``class -> {"w": sizes, "t": seconds per op per batch element}``.
        ``w`` is the block width: ``w x w @ w x w`` for ``mm``, ``1 x w @
        w x w`` for ``mv`` and ``w`` elements for ``ew``.
    layers : dict
        ``structure -> {"w", "batch", "forward", "backprop", "prep"}``:
        seconds per layer; ``prep`` is everything a scan's backward pass does
        besides the scan (derivatives, Jacobian blocks, parameter VJPs).
    round_latency, task_latency, run_latency : dict
        Per backend: fixed cost of a dependent round (barrier / hop), of a
        task, and of a whole run (submitting, gathering results).
    """

    call_latency: float = 4e-6
    gather_factor: float = 2.0
    serial_op_latency: float = 3e-6
    ops: dict = field(default_factory=_default_ops)
    layers: dict = field(default_factory=_default_layers)
    round_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 3e-5, "ray": 1.5e-3, "dask": 5.8e-3})
    task_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 2e-5, "ray": 5e-4, "dask": 1.8e-3})
    run_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 0.0, "ray": 5e-3, "dask": 2e-2})
    machine: dict = field(default_factory=dict)
    source: str = "defaults"

    # -- lookups ---------------------------------------------------------
    def op_time(self, cls: str, w) -> np.ndarray:
        """Seconds per op per batch element of class ``cls`` at width(s) ``w``."""
        tab = self.ops[cls]
        return _loglog(tab["w"], tab["t"], w)

    def layer_time(self, structure: str, what: str, w, batch: int = 1) -> float:
        """Seconds per layer of ``what`` in {forward, backprop, prep} at width ``w`` and ``batch``."""
        if structure not in self.layers:
            raise ValueError(f"unknown structure {structure!r}; valid: {', '.join(sorted(self.layers))}")
        tab = self.layers[structure]
        b = list(tab["batch"])
        t = [float(_loglog(tab["w"], row, w)) for row in tab[what]]
        if len(b) == 1:
            return t[0] * batch / b[0]
        # linear in the batch size between (and beyond) the two measured batch sizes
        slope = (t[1] - t[0]) / (b[1] - b[0])
        return max(t[0] + slope * (batch - b[0]), t[0] * 0.5)

    def latency(self, kind: str, backend: str) -> float:
        table = {"round": self.round_latency, "task": self.task_latency, "run": self.run_latency}[kind]
        return float(table.get(backend, table.get("ray", 0.0)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _loglog(xs, ys, x):
    """Piecewise-linear interpolation in log-log space, extrapolating the end segments."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-15))
    q = np.log(np.maximum(np.asarray(x, float), 1e-12))
    i = np.clip(np.searchsorted(lx, q) - 1, 0, len(lx) - 2)
    t = (q - lx[i]) / (lx[i + 1] - lx[i])
    return np.exp(ly[i] + t * (ly[i + 1] - ly[i]))


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
    """The calibrated model if one was saved (see :func:`model_path`), else the defaults."""
    try:
        with open(model_path()) as f:
            return CostModel.from_dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return DEFAULT_MODEL


def save_model(model: CostModel, path: str | None = None) -> str:
    """Write ``model`` as JSON (to :func:`model_path` by default) and reset the caches."""
    path = path or model_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(model.to_json())
    load_model.cache_clear()
    _CHOICES.clear()
    return path


# -- per-op costs of a real schedule ------------------------------------------
def _op_classes(spec, i, k, j):
    """Class index (0 mm, 1 mv, 2 ew) and model width of each op ``[i,k] (x) [k+1,j]``."""
    ld = (spec.dense_before[k + 1] - spec.dense_before[i]) > 0
    rd = (spec.dense_before[j + 1] - spec.dense_before[k + 1]) > 0
    r, inner, c = spec.rows[i], spec.cols[k], spec.cols[j]
    cls = np.where(ld & rd, np.where(r > 1, 0, 1), 2)
    # ew width = elements touched: r*c when one side is dense, r for diag x diag
    width = np.where(cls == 0, np.cbrt(r * inner * c),
                     np.where(cls == 1, np.sqrt(inner * c), np.where(ld | rd, r * c, r)))
    return cls, width.astype(float)


def _op_times(spec, i, k, j, model):
    cls, width = _op_classes(spec, i, k, j)
    t = np.empty(cls.shape, float)
    for ci, name in enumerate(OP_CLASSES):
        m = cls == ci
        if np.any(m):
            t[m] = model.op_time(name, width[m])
    return cls, t


def _signature(blocks, L):
    """The segment signature (as :meth:`BlockSeq.signature`) of any ``blocks`` description."""
    if isinstance(blocks, BlockSeq):
        return blocks.signature()
    spec = _spec_arrays(blocks, L)
    # run-length encoding of (kind, rows, cols) along the positions
    change = np.flatnonzero((spec.kind_ids[1:] != spec.kind_ids[:-1]) | (spec.rows[1:] != spec.rows[:-1])
                            | (spec.cols[1:] != spec.cols[:-1])) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [L]]))
    return tuple((spec.kind_names[p], int(n), int(spec.rows[p]), int(spec.cols[p]))
                 for p, n in zip(starts.tolist(), counts.tolist()))


def _round_costs(sched: Schedule, blocks, model: CostModel):
    """Per round: (op times per batch element in execution order, groups, gathered groups)."""
    key = (id(model), sched, _signature(blocks, sched.length))
    hit = _COSTS.get(key)
    if hit is not None:
        return hit
    spec = _spec_arrays(blocks, sched.length)
    if sched.name == "sequential":  # L-1 rounds of one op [0, j-1] (x) [j, j]: no replay needed
        j = np.arange(1, sched.length)
        _, t = _op_times(spec, np.zeros_like(j), j - 1, j, model)
        out = [(t[r: r + 1], 1, 0) for r in range(j.size)]
        _COSTS[key] = out
        return out
    groups = None
    if sched.length <= 1 << 16 and sched.rounds <= 4096:
        try:  # the executor's own grouping of each round into batched calls
            from .executors._bind import _bind_cached

            groups = _bind_cached(sched, key[2]).rounds
        except Exception:  # pragma: no cover - only a cost estimate
            groups = None
    ivals = sched.intervals()
    if not ivals:
        return []
    sizes = np.array([len(i) for i, _, _ in ivals])
    cat = [np.concatenate([iv[n] for iv in ivals]) for n in range(3)]
    cls, t = _op_times(spec, *cat, model)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for r in range(len(ivals)):
        a, b = bounds[r], bounds[r + 1]
        if groups is not None:
            g = groups[r]
            n_groups = len(g)
            gathered = sum(1 for x in g if not isinstance(x.oi, slice) or not isinstance(x.li, slice))
        else:
            n_groups, gathered = len(set(cls[a:b].tolist())), 0
        out.append((t[a:b], n_groups, gathered))
    if len(_COSTS) > 64:
        _COSTS.clear()
    _COSTS[key] = out
    return out


_COSTS: dict = {}


def _round_time(t, n_groups, gathered, P, backend, batch, model):
    """Seconds of one round: ``t`` op times, dealt to ``min(P, ops)`` tasks in contiguous shares."""
    ops = t.size
    call = model.call_latency
    if backend == "serial":
        return ops * model.serial_op_latency + float(t.sum()) * batch
    gather = 1.0 + (model.gather_factor - 1.0) * (gathered / max(n_groups, 1))
    tasks = 1 if backend == "vectorized" else max(1, min(P, ops))
    if tasks == 1:
        lat = model.latency("round", backend) if backend not in ("vectorized", "threads") else 0.0
        return lat + model.latency("task", backend) * (backend not in ("vectorized", "threads")) \
            + n_groups * call + float(t.sum()) * batch * gather
    share = -(-ops // tasks)
    work = np.add.reduceat(t, np.arange(0, ops, share)).max() if share > 1 else float(t.max())
    return (model.latency("round", backend) + tasks * model.latency("task", backend)
            + n_groups * call + float(work) * batch * gather)


def predict(sched: Schedule, blocks=None, *, backend="vectorized", workers=None, batch=1,
            model: CostModel | None = None) -> float:
    """Predicted seconds of the scan alone: ``sched`` on ``blocks`` with ``backend`` and ``workers``.

    ``blocks`` as in :meth:`Schedule.flops_per_round` (a BlockSeq, a list of
    ``(kind, rows, cols)``, or an int ``w`` for a dense gradient chain).
    """
    model = model or load_model()
    P = workers or (1 if backend in ("vectorized", "serial") else (os.cpu_count() or 1))
    total = model.latency("run", backend) if sched.rounds else 0.0
    if backend in ("ray", "dask") and sched.rounds:
        return total + _partitioned_makespan(sched, blocks, P, backend, batch, model)
    for t, n_groups, gathered in _round_costs(sched, blocks, model):
        total += _round_time(t, n_groups, gathered, P, backend, batch, model)
    return total


def _partitioned_makespan(sched, blocks, P, backend, batch, model):
    """Longest path through the task graph the Ray/Dask executors really submit.

    Those executors do not pay a hop per round: each worker owns a chunk of
    positions and runs its rounds as a chain of fused tasks, cutting a task
    only where it needs a value another worker made
    (:func:`chainprod.executors._remote.partition`). So a task costs one task
    latency plus its ops; an argument that crosses workers adds one hop.
    """
    from .executors._remote import partition

    part = partition(sched, P)
    # time of every op, keyed by (round, out slot): out slots are unique in a round
    op_time = {}
    for r, ((t, _, _), st) in enumerate(zip(_round_costs(sched, blocks, model), sched.steps)):
        op_time[r] = dict(zip(st.out.tolist(), (t * batch).tolist()))
    hop, task = model.latency("round", backend), model.latency("task", backend)
    finish = {}
    for spec in sorted(part.tasks, key=lambda s: s.tid):  # deps always have smaller ids
        # ops inside a task run from a dict of slots: a Python-level cost per op on top of the math
        work = sum(op_time[r][o] + model.serial_op_latency for r, _, _, outs in spec.rounds for o in outs.tolist())
        start = max((finish[d] + (hop if part.tasks[d].worker != spec.worker else 0.0)
                     for d in spec.deps), default=0.0)
        finish[spec.tid] = start + task + work
    return max(finish.values(), default=0.0)


def predict_backprop(L, width, batch=1, model: CostModel | None = None, structure="dense") -> float:
    """Predicted seconds of the sequential backprop backward pass over ``L`` layers."""
    model = model or load_model()
    return L * model.layer_time(structure, "backprop", width, batch)


def chain_blocks(structure: str, L: int, width: int):
    """Block shapes of the scan inside ``grad`` for a depth-``L`` chain of the given structure.

    The scan runs over ``L - 1`` factors: a thin ``1 x w`` head (seed times
    the output layer's Jacobian), then ``w x w`` dense blocks (``mlp``) or
    ``w`` diagonals (``diagonal_chain``).
    """
    n = L - 1
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; valid: {', '.join(STRUCTURES)}")
    return _shape_only(structure, n, width)


@functools.lru_cache(maxsize=128)
def _shape_only(structure, n, width):
    # A BlockSeq of batch 0: shapes without a single byte of data.
    head = np.empty((1, 0, 1, width))
    segs = [Segment("dense", head)]
    if n > 1:
        body = np.empty((n - 1, 0, width, width)) if structure == "dense" else np.empty((n - 1, 0, width))
        segs.append(Segment("dense" if structure == "dense" else "diag", body))
    return BlockSeq(segs)


def predict_grad(structure: str, L: int, width: int, *, method="auto", backend="vectorized",
                 workers=None, batch=1, model: CostModel | None = None) -> dict:
    """Predicted seconds of ``grad`` on a depth-``L`` chain: forward, backward and end-to-end.

    ``method`` is ``"backprop"``, a schedule name, ``"auto"`` or a Schedule
    for ``L - 1`` factors. Returns ``{"forward", "backward", "total", "schedule"}``.
    """
    model = model or load_model()
    fwd = L * model.layer_time(structure, "forward", width, batch)
    if method == "backprop" or L < 2:
        bwd, name = predict_backprop(L, width, batch, model, structure), "backprop"
    else:
        blocks = chain_blocks(structure, L, width)
        if isinstance(method, Schedule):
            sched = method
        elif method == "auto":
            sched = _choose(L - 1, blocks, workers, backend, batch, model)
            if auto_runs_backprop(sched, backend):
                # grad's auto then runs backprop itself (see chainprod.grad._auto_prefers_backprop)
                bwd = predict_backprop(L, width, batch, model, structure)
                return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "schedule": "backprop"}
        else:
            from .schedules import schedule as _schedule

            sched = _schedule(method, L - 1, workers=workers, backend=backend)
        prep = L * model.layer_time(structure, "prep", width, batch)
        bwd = prep + predict(sched, blocks, backend=backend, workers=workers, batch=batch, model=model)
        name = sched.name
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "schedule": name}


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
    seq = blocks if isinstance(blocks, BlockSeq) else None
    if seq is not None:
        sig = seq.signature()
    elif blocks is None or isinstance(blocks, (int, np.integer)):
        sig = blocks
    else:
        sig = tuple(tuple(b) for b in blocks)
    key = (L, sig, workers, backend, seq.batch if seq is not None else 1)
    hit = _CHOICES.get(key)
    if hit is None:
        spec_blocks = seq if seq is not None else (list(sig) if isinstance(sig, tuple) else sig)
        hit = _choose(L, spec_blocks, workers, backend, key[-1], load_model())
        _CHOICES[key] = hit
    return hit


_CHOICES: dict = {}


# -- the simulator: many workers, long chains, from round statistics ------------
def round_stats(name: str, L: int, chunks: int | None = None) -> list[tuple[int, int]]:
    """Per round ``(thin ops, interior ops)`` of a scan over a gradient chain, from sizes alone.

    In a gradient chain only intervals that start at position 0 (they
    contain ``A_L``) are thin; every other interval is ``w x w``. This counts,
    without building the plan, what :meth:`Schedule.intervals` would show --
    so the simulator reaches ``L = 2^20`` in microseconds. Supported:
    ``sequential``, ``sklansky``, ``brent_kung``, ``hillis_steele``, ``chunked``.
    """
    if L < 2:
        return []
    if name == "sequential":
        return [(1, 0)] * (L - 1)
    if name in ("sklansky", "ladner_fischer"):
        out, half = [], 1
        while half < L:
            ops = (L // (2 * half)) * half + max(0, L % (2 * half) - half)
            thin = min(max(L - half, 0), half)
            out.append((thin, ops - thin))
            half *= 2
        return [o for o in out if sum(o)]
    if name in ("hillis_steele", "kogge_stone"):
        out, stride = [], 1
        while stride < L:
            thin = min(stride, L - stride)  # j < 2*stride reads [0, ...]
            out.append((thin, (L - stride) - thin))
            stride *= 2
        return out
    if name in ("brent_kung", "blelloch"):
        up, strides, stride = [], [], 1
        while stride < L:
            ops = len(range(2 * stride - 1, L, 2 * stride))
            up.append((min(ops, 1), max(ops - 1, 0)))
            strides.append(stride)
            stride *= 2
        down = [(len(range(3 * s - 1, L, 2 * s)), 0) for s in reversed(strides[:-1])]
        return [u for u in up if sum(u)] + [d for d in down if d[0]]
    if name == "chunked":
        chunks = chunks or max(1, round(math.sqrt(L)))
        c = max(1, -(-L // chunks))
        n = -(-L // c)
        if c == 1:
            return round_stats("sklansky", L)
        if n <= 1:
            return round_stats("sequential", L)
        last = L - (n - 1) * c
        out = [(1, n - 2)] * (c - 1)
        if n - 1 >= 2:
            out += round_stats("sklansky", n - 1)
        out += [((n - 2) + (1 if t < last else 0), 0) for t in range(c)]
        return [o for o in out if sum(o)]
    raise ValueError(f"round_stats knows sequential, sklansky, brent_kung, hillis_steele, chunked; got {name!r}")


def _sim_scan(stats, t_thin, t_sq, P, round_lat, task_lat, call):
    """List scheduling of uniform rounds: thin ops first, contiguous shares of ``ceil(ops/P)``."""
    total = 0.0
    for thin, sq in stats:
        ops = thin + sq
        if not ops:
            continue
        tasks = min(P, ops)
        share = -(-ops // tasks)
        # the slowest share holds as many interior ops as it can
        n_sq = min(sq, share)
        work = n_sq * t_sq + (share - n_sq) * t_thin
        total += round_lat + tasks * task_lat + call + work
    return total


def simulate(L: int, width: int, workers: int, *, structure="dense", batch=1, backend="ray",
             methods=("sklansky", "brent_kung", "chunked"), model: CostModel | None = None) -> dict:
    """Predicted backward-pass seconds of the best scan and of backprop on ``workers`` workers.

    Assumptions (stated, not hidden): each worker is one core running its
    share of a round as one batched call; the per-layer preparation
    (Jacobians, parameter VJPs) is spread over the workers; every round pays
    ``backend``'s round and task latency (``backend="ideal"`` pays none);
    backprop runs on one core. Returns the times and the winning schedule.
    """
    model = model or load_model()
    if structure == "dense":
        t_thin = float(model.op_time("mv", width))
        t_sq = float(model.op_time("mm", width))
    else:
        t_thin = t_sq = float(model.op_time("ew", width))
    ideal = backend == "ideal"
    rl = 0.0 if ideal else model.latency("round", backend)
    tl = 0.0 if ideal else model.latency("task", backend)
    run = 0.0 if ideal else model.latency("run", backend)
    prep = L * model.layer_time(structure, "prep", width, batch) / min(workers, L)
    best = None
    for m in methods:
        if m == "chunked" and not (1 < workers < L - 1):
            continue
        stats = round_stats(m, L - 1, chunks=workers + 1 if m == "chunked" else None)
        t = run + prep + _sim_scan(stats, t_thin * batch, t_sq * batch, workers, rl, tl, model.call_latency)
        if best is None or t < best[0]:
            best = (t, m, len(stats))
    bp = predict_backprop(L, width, batch, model, structure)
    return {"L": L, "width": width, "workers": workers, "structure": structure, "batch": batch,
            "backend": backend, "scan": best[0], "schedule": best[1], "rounds": best[2],
            "backprop": bp, "speedup": bp / best[0]}


def crossover(width: int, workers: int, *, structure="dense", batch=1, backend="ray",
              max_log2_L: int = 20, model: CostModel | None = None) -> int | None:
    """Q4: the smallest depth ``L = 2^k`` (k <= ``max_log2_L``) where the scan's backward beats backprop."""
    for k in range(2, max_log2_L + 1):
        r = simulate(2 ** k, width, workers, structure=structure, batch=batch, backend=backend, model=model)
        if r["speedup"] > 1:
            return 2 ** k
    return None
