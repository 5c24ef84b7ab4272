"""The simulator: Q4 for many more workers than this machine has, from round statistics."""

from __future__ import annotations

import math

from .model import CostModel, load_model
from .scan import predict_backprop

__all__ = ["round_stats", "simulate", "crossover"]

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
    prep = model.run_time(structure, "prep", width, L, batch) / min(workers, L)
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
