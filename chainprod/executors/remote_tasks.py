"""What the Ray and Dask executors ship and run: per-worker payloads and the task functions.

The task graph itself is planned in :mod:`chainprod.planning.partition`.
The payload builder reads a forward tape duck-typed (runs of stacked
parameters and outputs) and imports no layer; everything below
``# -- on the workers`` is plain numpy and runs inside Ray or Dask worker
processes; it imports no engine.
"""

from __future__ import annotations

import itertools
import os
import socket
import time

import numpy as np

from ..blocks import COMBINE
from ..planning.partition import Partition, TaskSpec

__all__ = ["segment_task", "collect_task", "vjp_task", "grad_payloads"]


# -- grad: what each worker needs to build its Jacobians and its VJPs --------
def grad_payloads(tape, seed, part: Partition):
    """Per worker, the layer data for its Jacobian blocks and its parameter VJPs.

    Scan position ``p`` holds layer ``L-1-p``'s input Jacobian (position 0:
    ``seed . A_{L-1}``); prefix ``k`` is ``v`` of layer ``L-2-k``. Worker ``b``
    needs the layers of its input positions and of its output prefixes: one
    contiguous layer range, shipped as slices of the chain's stacked runs.
    """
    chain = tape.chain
    L = len(chain)
    n = L - 1  # scan length
    payloads = []
    for b in range(part.workers):
        pos = part.init_slots[b]
        kout = [k for t in (part.tasks[part.chains[b][-1]],) for k, _ in t.outputs]
        layers = [L - 1 - int(p) for p in pos] + [L - 2 - k for k in kout]
        lo, hi = min(layers), max(layers)
        runs = []
        for r, run in enumerate(chain.runs):
            a, z = max(lo, run.start), min(hi + 1, run.start + run.count)
            if a >= z:
                continue
            ia, iz = a - run.start, z - run.start
            X = tape.inputs[r][None] if ia == 0 else None
            Xs = tape.outputs[r][max(ia - 1, 0): iz - 1]
            X = Xs if X is None else (np.concatenate([X, Xs]) if Xs.shape[0] else X)
            # Parameters go in scan order (last layer first): slices of the
            # run's contiguous ``reversed`` stacks, so they serialise as one
            # out-of-band buffer each (``run.params`` are negative-stride views,
            # which pickle would copy in-band, ~10x slower).
            m = run.count
            runs.append(dict(cls=run.cls, activation=run.activation, kind=run.cls.kind, start=a,
                             count=z - a, rparams=tuple(p[m - iz: m - ia] for p in run.reversed),
                             Y=tape.outputs[r][ia:iz], X=X))
        payloads.append(dict(L=L, n=n, positions=pos, outputs=np.array(kout, dtype=np.int64),
                             seed=seed if 0 in set(pos.tolist()) else None, runs=runs, meta=[]))
    return payloads


# -- on the workers -------------------------------------------------------------
_BLAS_LIMITED = False


def _limit_blas():
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


def _where() -> str:
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


def _pack(vals, slots):
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


def _values(inp) -> dict:
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
    """``{slot: (kind, array)}`` for ``(slot, dep index)`` pairs.

    A dep is either a task result (``{"values": ...}``) or, in ``grad``, the
    worker's layer data: then the input Jacobian blocks are built here, where
    they are used, in one batched call per run (they never travel).
    """
    by_dep: dict = {}
    for s, i in pairs:
        by_dep.setdefault(i, []).append(s)
    vals = {}
    for i, slots in by_dep.items():
        inp = inputs[i]
        if "runs" in inp:
            vals.update(_jacobians(inp, slots))
        else:
            src = _values(inp)
            for s in slots:
                vals[s] = src[s]
    return vals


def segment_task(spec: TaskSpec, *inputs):
    """Run a fused run of rounds on one worker. Returns ``{"values", "meta"}``."""
    _limit_blas()
    t_start = time.time()
    vals = _read(spec, inputs, spec.reads.items())
    where = _where()
    meta = list(inputs[0]["meta"])
    for r, left, right, out in spec.rounds:
        t0 = time.time()
        _run_round(vals, left, right, out)
        meta.append((r, where, t0, time.time(), len(out), spec.name))
    if not spec.rounds:  # pragma: no cover
        meta.append((-1, where, t_start, time.time(), 0, spec.name))
    big, packed = _pack(vals, sorted(spec.keep))
    return {"values": big, "packed": packed, "meta": meta}


def _gather_outputs(spec, inputs):
    vals = _read(spec, inputs, [(s, spec.reads[s]) for _, s in spec.outputs])
    return [(k, vals[s]) for k, s in spec.outputs]


def collect_task(spec: TaskSpec, *inputs):
    """Gather the prefixes this worker owns into stacked arrays (one per kind and shape)."""
    t0 = time.time()
    groups: dict = {}
    for k, (kind, a) in _gather_outputs(spec, inputs):
        groups.setdefault((kind, a.shape), []).append((k, a))
    out = [(kind, np.array([k for k, _ in items], dtype=np.int64), np.array([a for _, a in items]))
           for (kind, _), items in groups.items()]
    meta = list(inputs[0]["meta"])
    meta.append((-1, _where(), t0, time.time(), 0, spec.name))
    return {"outputs": out, "meta": meta}


def _jacobians(payload, positions):
    """``{p: (kind, block)}``: the input Jacobian blocks of scan positions ``positions``."""
    L = payload["L"]
    want = np.zeros(L, dtype=bool)
    want[np.asarray(positions, dtype=np.int64)] = True
    vals = {}
    for run in payload["runs"]:
        start, count = run["start"], run["count"]
        # scan positions of this run's layers, in scan order (last layer first)
        pos = L - 1 - np.arange(start + count - 1, start - 1, -1)
        need = np.flatnonzero(want[pos])
        if not need.size:
            continue
        lo, hi = int(need[0]), int(need[-1]) + 1  # contiguous hull: slices, no gathers
        cls = run["cls"]
        Y = run["Y"][count - hi: count - lo][::-1]
        S = cls.derivs(Y, run["activation"])
        J = cls.jacobians(tuple(p[lo:hi] for p in run["rparams"]), S)
        for i in need.tolist():
            p = int(pos[i])
            if p == 0:  # the head: seed . A_{L-1}, a thin 1 x d block per sample
                rule = COMBINE[("dense", run["kind"])]
                vals[0] = (rule.out, rule.kernel(payload["seed"][:, None, :], J[i - lo]))
            else:
                vals[p] = (run["kind"], J[i - lo])
    return vals


def vjp_task(spec: TaskSpec, payload, *inputs):
    """Per-layer parameter gradients for this worker's prefixes (only these go back).

    Returns ``{"grads": [(first layer, count, stacked grads)], "bad": smallest
    non-finite prefix or None, "meta": the chain's trace}``.
    """
    _limit_blas()
    t0 = time.time()
    L = payload["L"]
    v = dict((L - 2 - k, a) for k, (_, a) in _gather_outputs(spec, inputs))
    bad = [L - 2 - l for l, a in v.items() if not np.all(np.isfinite(a))]
    grads = []
    for run in payload["runs"]:
        start, count = run["start"], run["count"]
        layers = [l for l in range(start, start + count) if l in v]
        if not layers:
            continue
        lo, hi = layers[0] - start, layers[-1] - start + 1
        if hi - lo == len(layers):  # contiguous (always, for the owner-computes partition)
            sel = slice(lo, hi)
            rp = tuple(p[count - hi: count - lo][::-1] for p in run["rparams"])
        else:  # pragma: no cover - defensive
            sel = np.asarray(layers) - start
            rp = tuple(p[::-1][sel] for p in run["rparams"])
        Y = run["Y"][sel]
        S = run["cls"].derivs(Y, run["activation"])
        G = np.stack([v[l].reshape(Y.shape[1:]) for l in layers])
        G *= S
        gs = run["cls"].param_grads(rp, G, run["X"][sel])
        # one stacked array per parameter, layer order: the driver splits it into views
        grads.append((np.asarray(layers, dtype=np.int64), tuple(np.ascontiguousarray(g) for g in gs)))
    meta = list(inputs[0]["meta"])
    meta.append((-1, _where(), t0, time.time(), 0, f"w{spec.worker}.vjp"))
    return {"grads": grads, "bad": min(bad) if bad else None, "meta": meta}
