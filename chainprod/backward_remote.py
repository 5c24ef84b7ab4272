"""The backward pass on a cluster: Jacobians, scan and parameter VJPs on the workers.

The path of ``grad`` on an executor that declares ``runs_task_graphs``
(Ray, Dask: :class:`~chainprod.executors.distributed.DistributedExecutor`).
The scan is the one of :mod:`chainprod.backward_numpy`::

    scan order:  [cotangent . A_L,  A_{L-1},  ...,  A_2]
    prefix [0,k] = cotangent . A_L ... A_{L-k} = v_{L-k-1}

cut into ``P`` chains of tasks by :func:`chainprod.planning.partition.partition`.
The driver ships each worker the parameters and activations of *its* layer
range (:func:`payloads`), as slices of the chain's contiguous, scan-ordered
parameter stacks. That layer data is each chain's init: a task builds the
Jacobian blocks it reads from it where it runs (:func:`jacobian_blocks`, one
batched call per run), so Jacobians never travel. Each worker runs its part
of the scan, applies the parameter VJPs (:func:`vjp_task`) and returns its
per-layer gradients as one stacked array per parameter, which the driver
splits into per-layer views. The executor only runs the graph
(:meth:`~chainprod.executors.distributed.DistributedExecutor.run_graph`);
everything that reads a tape or a layer class is here.

:func:`segment_task` and :func:`vjp_task` run on the workers, imported there
by name.
"""

from __future__ import annotations

import time

import numpy as np

from .blocks import COMBINE
from .cost import resolve_schedule
from .errors import NonFiniteError
from .executors.remote_tasks import gather_outputs, limit_blas, worker_name
from .executors.remote_tasks import segment_task as run_segment
from .planning.partition import Partition, TaskSpec, partition
from .tape import Tape

__all__ = ["backward", "payloads", "scan_shapes", "segment_task", "vjp_task", "jacobian_blocks"]


def backward(tape: Tape, cotangent, executor, *, method="auto", workers=None, trace=None, **options):
    """Per-layer gradients with Jacobians, scan and VJPs computed on ``executor``'s workers.

    Parameters
    ----------
    tape : Tape
        From :func:`chainprod.forward`; at least two layers.
    cotangent : ndarray, shape ``(N, d_L)``
        ``dloss/dx_L``.
    executor : Executor
        One whose ``runs_task_graphs`` is True.
    method : str or Schedule or callable
        A scan for the ``L - 1`` factors, or ``"auto"`` (the cost model's
        pick for this executor and ``P``).
    workers : int, optional
        ``P``; ``None`` lets the executor choose (its ``prepare(workers)``).
    trace : Trace, optional
        Gets the schedule that ran and every task's events.
    **options
        ``timeout``, ``retries`` for the executor.

    Returns
    -------
    list of tuples
        ``grads[l]`` has one array per parameter of layer ``l``: views of one
        stacked array per worker and parameter (on Ray, zero-copy read-only
        views of the object store; ``np.array(g)`` gives a writable copy).
    """
    chain = tape.chain
    L = len(chain)
    P = executor.prepare(workers)
    sched = resolve_schedule(method, L - 1, workers=P, blocks=scan_shapes(chain), backend=executor.name)
    if not sched.is_scan:
        raise ValueError(f"schedule {sched.name!r} does not produce every prefix; grad needs a scan")
    if trace is not None:
        trace.schedule = sched
    part = partition(sched, P)
    token_parts = (sched.key, P, tape.x, cotangent,
                   [(r.cls.__name__, r.activation, r.start, r.reversed) for r in chain.runs])
    results = executor.run_graph(part, payloads(tape, cotangent, part), workers=P, token_parts=token_parts,
                                 segment=segment_task, collect=vjp_task, collect_label="vjp", trace=trace,
                                 **options)
    bads = [r["bad"] for r in results if r["bad"] is not None]
    if bads:
        lo = L - 1 - min(bads) - 1
        raise NonFiniteError(
            f"non-finite value in the product of the input Jacobians of layers {lo + 1}..{L - 1} "
            f"(0-based): the chain product overflowed; scale the weights down or shorten the chain",
            (lo + 1, L - 1))
    grads = [None] * L
    for res in results:
        for layers, gs in res["grads"]:
            # list(array) makes the per-layer views in C; no per-layer copies
            for l, g in zip(layers.tolist(), zip(*(list(g) for g in gs))):
                grads[l] = g
    # The last layer's v is the cotangent itself: one cheap VJP on the driver.
    last = chain.runs[-1]
    S = last.cls.derivs(tape.outputs[-1][-1:], last.activation)
    X = tape.run_inputs(len(chain.runs) - 1)[-1:]
    gs = last.cls.param_grads(tuple(p[-1:] for p in last.params), (cotangent * S[0])[None], X)
    grads[L - 1] = tuple(g[0] for g in gs)
    return grads


def scan_shapes(chain) -> list:
    """``(kind, rows, cols)`` per scan position: the shapes ``"auto"`` is costed on.

    Position 0 is the thin head ``cotangent . A_L`` (one row); position
    ``p`` is layer ``L-1-p``'s input Jacobian.
    """
    L = len(chain)
    last = chain.layers[L - 1]
    return [("dense", 1, last.d_in)] + [(chain.layers[L - 1 - p].kind, chain.layers[L - 1 - p].d_out,
                                         chain.layers[L - 1 - p].d_in) for p in range(1, L - 1)]


def payloads(tape: Tape, cotangent, part: Partition) -> list[dict]:
    """Per worker, the layer data for its Jacobian blocks and its parameter VJPs.

    Scan position ``p`` holds layer ``L-1-p``'s input Jacobian (position 0:
    ``cotangent . A_{L-1}``); prefix ``k`` is ``v`` of layer ``L-2-k``.
    Worker ``b`` needs the layers of its input positions and of its output
    prefixes: one contiguous layer range, shipped as slices of the chain's
    stacked runs.
    """
    chain = tape.chain
    L = len(chain)
    out = []
    for b in range(part.workers):
        pos = part.init_slots[b]
        kout = [k for k, _ in part.tasks[part.chains[b][-1]].outputs]
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
        out.append(dict(L=L, positions=pos, outputs=np.array(kout, dtype=np.int64),
                        cotangent=cotangent if 0 in set(pos.tolist()) else None, runs=runs, meta=[]))
    return out


# -- on the workers -------------------------------------------------------------
def _with_jacobians(spec: TaskSpec, inputs) -> list:
    """``inputs`` with each layer payload replaced by the Jacobian blocks ``spec`` reads from it."""
    out = list(inputs)
    for i, inp in enumerate(inputs):
        if "runs" in inp:
            slots = [s for s, d in spec.reads.items() if d == i]
            out[i] = {"values": jacobian_blocks(inp, slots), "meta": inp["meta"]}
    return out


def segment_task(spec: TaskSpec, *inputs):
    """A combine task of the scan; its own init holds layer data, not blocks.

    As :func:`chainprod.executors.remote_tasks.segment_task`, after forming
    the Jacobian blocks it reads from that layer data.
    """
    limit_blas()
    return run_segment(spec, *_with_jacobians(spec, inputs))


def jacobian_blocks(payload, positions) -> dict:
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
            if p == 0:  # the head: cotangent . A_{L-1}, a thin 1 x d block per sample
                rule = COMBINE[("dense", run["kind"])]
                vals[0] = (rule.out, rule.kernel(payload["cotangent"][:, None, :], J[i - lo]))
            else:
                vals[p] = (run["kind"], J[i - lo])
    return vals


def vjp_task(spec: TaskSpec, *inputs):
    """Per-layer parameter gradients for this worker's prefixes (only these go back).

    The worker's layer data is its own init, one of the collect task's
    inputs. Returns ``{"grads": [(layers, stacked grads per parameter)],
    "bad": smallest non-finite prefix or None, "meta": the chain's trace}``.
    """
    limit_blas()
    t0 = time.time()
    payload = inputs[spec.deps.index(spec.worker)]
    L = payload["L"]
    v = {L - 2 - k: a for k, (_, a) in gather_outputs(spec, _with_jacobians(spec, inputs))}
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
    meta.append((-1, worker_name(), t0, time.time(), 0, f"w{spec.worker}.vjp"))
    return {"grads": grads, "bad": min(bad) if bad else None, "meta": meta}
