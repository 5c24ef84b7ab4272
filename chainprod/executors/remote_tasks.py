"""What the Ray and Dask executors run on their workers: the task functions of a graph.

The task graph itself is planned in :mod:`chainprod.planning.partition` and
submitted by :meth:`chainprod.executors.distributed.DistributedExecutor.run_graph`.
A task's inputs are its chain predecessor's result, results of other
workers' tasks and, for a worker's first task, that worker's init payload.
Everything here is plain numpy on blocks (it knows no layer and imports no
engine) and runs inside Ray or Dask worker processes, where the functions
are imported by name. :mod:`chainprod.backward_remote` wraps
:func:`segment_task` and :func:`gather_outputs` for ``grad``, whose init
payloads hold layer data instead of blocks.

Init payloads of :meth:`~chainprod.executors.distributed.DistributedExecutor.run`
are ``{"values": {slot: (kind, array)}, "packed": [(kind, slots, stacked
array)], "meta": []}``; every task returns ``{..., "meta": [(round, worker,
t0, t1, ops, task name)]}``, the trace events of its chain so far.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import numpy as np

from ..blocks import COMBINE
from ..planning.partition import TaskSpec

__all__ = ["segment_task", "collect_task", "gather_outputs", "limit_blas", "worker_name", "pack_values",
           "task_values"]


# -- on the workers -------------------------------------------------------------
_BLAS_LIMITED = False


def limit_blas():
    """One BLAS thread per worker process (P workers use P cores, no oversubscription)."""
    global _BLAS_LIMITED
    if _BLAS_LIMITED:
        return
    _BLAS_LIMITED = True
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except Exception:  # pragma: no cover - env vars set by the engine still apply
        pass


def worker_name() -> str:
    """``"host/pid..."``: the worker a trace event names."""
    return f"{socket.gethostname()}/pid{os.getpid()}"


def _run_round(vals, left, right, out):
    """Run one round's ops on the slot dict ``vals`` (reads first: rounds are order-free)."""
    n = len(out)
    if n == 0:
        return
    L_, R_ = [vals[s] for s in left.tolist()], [vals[s] for s in right.tolist()]
    if n >= 4:
        # Fast path (the usual case): one kind and one small shape on each side.
        (ka, a0), (kb, b0) = L_[0], R_[0]
        sa, sb = a0.shape, b0.shape
        if (b0.size <= 8192 and all(k == ka and a.shape == sa for k, a in L_)
                and all(k == kb and b.shape == sb for k, b in R_)):
            rule = COMBINE[(ka, kb)]
            y = rule.kernel(np.array([a for _, a in L_]), np.array([b for _, b in R_]))
            vals.update(zip(out.tolist(), zip(itertools.repeat(rule.out), list(y))))
            return
        # Batch ops of equal kinds and shapes when the blocks are small: one
        # numpy call instead of n (for big blocks the per-op call is cheap).
        groups: dict = {}
        for i, ((ka, a), (kb, b)) in enumerate(zip(L_, R_)):
            groups.setdefault((ka, kb, a.shape, b.shape), []).append(i)
        res = [None] * n
        for (ka, kb, _, sb), idx in groups.items():
            rule = COMBINE[(ka, kb)]
            if len(idx) >= 4 and int(np.prod(sb)) <= 8192:
                y = rule.kernel(np.stack([L_[i][1] for i in idx]), np.stack([R_[i][1] for i in idx]))
                for q, i in enumerate(idx):
                    res[i] = (rule.out, y[q])
            else:
                for i in idx:
                    res[i] = (rule.out, rule.kernel(L_[i][1], R_[i][1]))
    else:
        res = []
        for (ka, a), (kb, b) in zip(L_, R_):
            rule = COMBINE[(ka, kb)]
            res.append((rule.out, rule.kernel(a, b)))
    for s, v in zip(out.tolist(), res):
        vals[s] = v


#: blocks up to this many bytes travel stacked (one buffer per kind and shape);
#: bigger ones travel as they are (stacking would only add a copy)
_STACK_MAX = 1 << 16


def pack_values(vals, slots):
    """The values of ``slots`` for a task result: ``(big, packed)``.

    Serialising thousands of tiny arrays one by one costs far more than the
    numbers in them, so small blocks go as ``(kind, slots, stacked array)``
    groups; big blocks stay per slot in ``big``.
    """
    big, groups = {}, {}
    for s in slots:
        kind, a = vals[s]
        if a.nbytes > _STACK_MAX:
            big[s] = (kind, a)
        else:
            groups.setdefault((kind, a.shape, a.dtype.str), []).append(s)
    # np.array (one C loop) rather than np.stack (Python per array) for many small blocks
    packed = [(k[0], np.array(ss, dtype=np.int64), np.array([vals[s][1] for s in ss]))
              for k, ss in groups.items()]
    return big, packed


def task_values(inp) -> dict:
    """``{slot: (kind, array)}`` of a task result (``values`` plus unpacked ``packed``)."""
    vals = inp["values"]
    packed = inp.get("packed")
    if packed:
        vals = dict(vals)
        for kind, slots, arr in packed:
            # list(arr) makes the per-block views in C
            vals.update(zip(slots.tolist(), zip(itertools.repeat(kind), list(arr))))
    return vals


def _read(spec, inputs, pairs):
    """``{slot: (kind, array)}`` for ``(slot, dep index)`` pairs, read from the task's inputs."""
    by_dep: dict = {}
    for s, i in pairs:
        by_dep.setdefault(i, []).append(s)
    vals = {}
    for i, slots in by_dep.items():
        src = task_values(inputs[i])
        for s in slots:
            vals[s] = src[s]
    return vals


def segment_task(spec: TaskSpec, *inputs):
    """Run a fused run of rounds on one worker. Returns ``{"values", "meta"}``."""
    limit_blas()
    t_start = time.time()
    vals = _read(spec, inputs, spec.reads.items())
    where = worker_name()
    meta = list(inputs[0]["meta"])
    for r, left, right, out in spec.rounds:
        t0 = time.time()
        _run_round(vals, left, right, out)
        meta.append((r, where, t0, time.time(), len(out), spec.name))
    if not spec.rounds:  # pragma: no cover
        meta.append((-1, where, t_start, time.time(), 0, spec.name))
    big, packed = pack_values(vals, sorted(spec.keep))
    return {"values": big, "packed": packed, "meta": meta}


def gather_outputs(spec: TaskSpec, inputs) -> list:
    """``[(k, (kind, array))]``: the prefixes a collect task returns, read from its inputs."""
    vals = _read(spec, inputs, [(s, spec.reads[s]) for _, s in spec.outputs])
    return [(k, vals[s]) for k, s in spec.outputs]


def collect_task(spec: TaskSpec, *inputs):
    """Gather the prefixes this worker owns into stacked arrays (one per kind and shape)."""
    t0 = time.time()
    groups: dict = {}
    for k, (kind, a) in gather_outputs(spec, inputs):
        groups.setdefault((kind, a.shape), []).append((k, a))
    out = [(kind, np.array([k for k, _ in items], dtype=np.int64), np.array([a for _, a in items]))
           for (kind, _), items in groups.items()]
    meta = list(inputs[0]["meta"])
    meta.append((-1, worker_name(), t0, time.time(), 0, spec.name))
    return {"outputs": out, "meta": meta}
