"""Predicted time of a scan: per-op costs of a real schedule, rounds list-scheduled on P workers."""

from __future__ import annotations

import functools

import numpy as np

from .._caches import PlanCache, cpu_count, register_cache
from ..blocks import COMBINE, KINDS, BlockSeq, Segment, kind_table
from ..planning.bind import bind_signature
from ..planning.partition import partition
from ..schedules import Schedule, block_spec, kinded_rounds, prefix_kind_ids
from .model import OP_CLASSES, STRUCTURES, CostModel, load_model

__all__ = ["predict", "predict_backprop", "chain_blocks", "compiled_scan_time", "signature"]

# -- per-op costs of a real schedule ------------------------------------------
def _op_classes(spec, i, k, j, kl, kr):
    """Class index (0 mm, 1 mv, 2 ew) and model width of each op ``[i,k] (x) [k+1,j]``.

    ``kl``/``kr`` are the operands' kind ids (from a kinded replay); the
    class comes from the combine table's ``cost`` column, so a new kind is
    costed by its own rule: a ``matmul`` rule is ``mm`` with more than one
    row and ``mv`` for the thin head, anything else is elementwise over the
    elements of its output block.
    """
    names, _ = kind_table()
    r, inner, c = spec.rows[i], spec.cols[k], spec.cols[j]
    matmul = np.zeros(i.shape, bool)
    out_2d = np.zeros(i.shape, bool)
    for (lk, rk), rule in COMBINE.items():
        m = (kl == names.index(lk)) & (kr == names.index(rk))
        matmul |= m & (rule.cost == "matmul")
        out_2d |= m & (KINDS[rule.out].block_ndim == 2)
    cls = np.where(matmul, np.where(r > 1, 0, 1), 2)
    width = np.where(cls == 0, np.cbrt(r * inner * c),
                     np.where(cls == 1, np.sqrt(inner * c), np.where(out_2d, r * c, r)))
    return cls, width.astype(float)


def _op_times(spec, i, k, j, kl, kr, model):
    cls, width = _op_classes(spec, i, k, j, kl, kr)
    t = np.empty(cls.shape, float)
    for ci, name in enumerate(OP_CLASSES):
        m = cls == ci
        if np.any(m):
            t[m] = model.op_time(name, width[m])
    return cls, t


def signature(blocks, L) -> tuple:
    """The segment signature (as :meth:`BlockSeq.signature`) of any ``blocks`` description."""
    if isinstance(blocks, BlockSeq):
        return blocks.signature()
    spec = block_spec(blocks, L)
    # run-length encoding of (kind, rows, cols) along the positions
    change = np.flatnonzero((spec.kind_ids[1:] != spec.kind_ids[:-1]) | (spec.rows[1:] != spec.rows[:-1])
                            | (spec.cols[1:] != spec.cols[:-1])) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [L]]))
    return tuple((spec.kind_names[p], int(n), int(spec.rows[p]), int(spec.cols[p]))
                 for p, n in zip(starts.tolist(), counts.tolist()))


_COSTS = PlanCache(maxsize=64)


def _round_costs(sched: Schedule, blocks, model: CostModel):
    """Per round: (op times per batch element in execution order, groups, gathered groups)."""
    sig = signature(blocks, sched.length)
    return _COSTS.get((model.key, sched.key, sig), lambda: _make_round_costs(sched, blocks, sig, model))


def _sequential_ops(spec, length):
    """``(i, k, j, left kind, right kind)`` of the sequential scan's ops ``[0, j-1] (x) [j, j]``, in order."""
    j = np.arange(1, length)
    return np.zeros_like(j), j - 1, j, prefix_kind_ids(spec)[:-1], spec.kind_ids[1:]


def _make_round_costs(sched, blocks, sig, model):
    spec = block_spec(blocks, sched.length)
    if sched.name == "sequential":  # L-1 rounds of one op each: no replay needed
        _, t = _op_times(spec, *_sequential_ops(spec, sched.length), model)
        return [(t[r: r + 1], 1, 0) for r in range(t.size)]
    # the executor's own grouping of each round into batched calls (small plans only: an estimate)
    groups = bind_signature(sched, sig).rounds if sched.length <= 1 << 16 and sched.rounds <= 4096 else None
    kinded = kinded_rounds(sched, spec)
    if not kinded:
        return []
    sizes = np.array([len(r[0]) for r in kinded])
    cat = [np.concatenate([r[n] for r in kinded]) for n in range(5)]
    cls, t = _op_times(spec, *cat, model)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    for r in range(len(kinded)):
        a, b = bounds[r], bounds[r + 1]
        if groups is not None:
            g = groups[r]
            n_groups = len(g)
            gathered = sum(1 for x in g if not isinstance(x.oi, slice) or not isinstance(x.li, slice))
        else:
            n_groups, gathered = len(set(cls[a:b].tolist())), 0
        out.append((t[a:b], n_groups, gathered))
    return out


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
            model: CostModel | None = None, kernels=None) -> float:
    """Predicted seconds of the scan alone: ``sched`` on ``blocks`` with ``backend`` and ``workers``.

    ``blocks`` as in :meth:`Schedule.flops_per_round` (a BlockSeq, a list of
    ``(kind, rows, cols)``, or an int ``w`` for a dense gradient chain).
    With ``kernels="numba"`` on a local backend and a model that has
    calibrated ``compiled_ops``, the scan is costed as the compiled kernel
    runs it (:func:`compiled_scan_time`); otherwise as the numpy executors
    run it.
    """
    model = model or load_model()
    P = workers or (1 if backend in ("vectorized", "serial") else cpu_count())
    if kernels not in (None, "numpy") and model.compiled_ops and backend in ("vectorized", "threads"):
        return compiled_scan_time(sched, blocks, workers=P, batch=batch, model=model)
    total = model.latency("run", backend) if sched.rounds else 0.0
    if backend in ("ray", "dask") and sched.rounds:
        return total + _partitioned_makespan(sched, blocks, P, backend, batch, model)
    for t, n_groups, gathered in _round_costs(sched, blocks, model):
        total += _round_time(t, n_groups, gathered, P, backend, batch, model)
    return total


def compiled_scan_time(sched: Schedule, blocks=None, *, workers=1, batch=1, model: CostModel | None = None):
    """Predicted seconds of one compiled scan kernel call: Brent's ``W / P + D`` from per-op costs.

    Every prefix ``[0, k]`` is made by exactly one thin op, whatever the
    schedule, so the thin ops carry the forming of the positions' blocks
    (``pos``, ``pos_ew``); the other ops are square (``mm``, ``ew``). ``W``
    sums every op, ``D`` the longest op of each round; with one worker the
    kernel runs the ops one after another (``W``).
    """
    model = model or load_model()
    sig = signature(blocks, sched.length)
    work, depth = _COSTS.get((model.key, sched.key, sig, "compiled"),
                             lambda: _compiled_work_depth(sched, blocks, model))
    P = max(int(workers or 1), 1)
    return batch * (work / P + (depth if P > 1 else 0.0))


def _compiled_work_depth(sched, blocks, model):
    spec = block_spec(blocks, sched.length)

    def times(i, k, j, kl, kr):
        cls, width = _op_classes(spec, i, k, j, kl, kr)
        thin = i == 0
        return np.where(cls == 2, np.where(thin, model.compiled_op_time("pos_ew", width),
                                           model.compiled_op_time("ew", width)),
                        np.where(thin, model.compiled_op_time("pos", width), model.compiled_op_time("mm", width)))

    if sched.name == "sequential":  # every op is thin and its own round: the depth is the work
        work = float(times(*_sequential_ops(spec, sched.length)).sum())
        return work, work
    work = depth = 0.0
    for ops in kinded_rounds(sched, spec):
        if len(ops[0]):
            t = times(*ops)
            work += float(t.sum())
            depth += float(t.max())
    return work, depth


def _partitioned_makespan(sched, blocks, P, backend, batch, model):
    """Longest path through the task graph the Ray/Dask executors really submit.

    Those executors do not pay a hop per round: each worker owns a chunk of
    positions and runs its rounds as a chain of fused tasks, cutting a task
    only where it needs a value another worker made
    (:func:`chainprod.planning.partition.partition`). So a task costs one task
    latency plus its ops; an argument that crosses workers adds one hop.
    """
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
    return model.run_time(structure, "backprop", width, L, batch)


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


@register_cache
@functools.lru_cache(maxsize=128)
def _shape_only(structure, n, width):
    # A BlockSeq of batch 0: shapes without a single byte of data.
    head = np.empty((1, 0, 1, width))
    segs = [Segment("dense", head)]
    if n > 1:
        body = np.empty((n - 1, 0, width, width)) if structure == "dense" else np.empty((n - 1, 0, width))
        segs.append(Segment("dense" if structure == "dense" else "diag", body))
    return BlockSeq(segs)
