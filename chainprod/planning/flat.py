"""Flat plans: a schedule bound to block kinds and shapes, for the compiled scan kernels.

A compiled kernel cannot afford a Python object per op, so :func:`bind_flat`
turns a *schedule* (:class:`~chainprod.schedules.Schedule`) plus the kind and
shape of every scan position into a *flat plan* (:class:`FlatPlan`), plain
integer arrays. It starts from the schedule's flat op table, the one
:func:`~chainprod.schedules.replay` (which also rejects a broken schedule):

* **Slots as offsets.** Every slot gets a fixed offset in one flat buffer,
  sized by the largest block it ever holds (the interval ``[i, j]`` a slot
  holds is ``rows[i] x cols[j]``, dense unless every factor in it is
  diagonal). A block of a batch of ``N`` is stored ``(N, rows, cols)``
  (dense) or ``(N, d)`` (diagonal), C order.
* **Ops as rows of a table.** ``out <- left (x) right`` becomes the element
  offsets of its three blocks, an op code from :data:`OP_CODES` (which pair
  of kinds meets) and ``m, k, n`` (``left`` is ``m x k``, ``right`` is
  ``k x n``). ``op_tmp`` marks the ops whose output overlaps an operand in a
  way that an in-place loop would corrupt (a matrix product writing over a
  factor): the kernel computes those into a temporary first.
* **Stages, not rounds.** Rounds are grouped into *stages*, the unit a
  kernel runs as one parallel region (or one serial loop). A stage is a list
  of *lanes*; lanes of a stage touch disjoint written slots, so they may run
  concurrently, and the ops of one lane run in order. One round is a stage
  whose lanes are its ops. Consecutive rounds are *fused* into one stage
  when that loses no parallelism (the lanes, connected components of the
  slots the rounds touch, are at least as many as the widest round's ops)
  or when the stage is too cheap to be worth waking threads for. So a
  sequential scan is one serial stage, and ``chunked`` (reduce-then-scan)
  becomes three: the per-chunk folds/scans (a lane per chunk), the small
  carry scan, the per-chunk fix-up scans — no parallel region per round.

Flat plans are cached by plain tuples (the schedule's value key, the
run-length-encoded kind/shape signature, the batch and the threshold);
:func:`clear_cache` (or :func:`chainprod.clear_caches`) empties the cache. A
:class:`FlatPlan` holds only ints and numpy arrays, so it pickles.

This module plans; it never touches a value. The kernels that run a plan
are in :mod:`chainprod.kernels.scan` (numba) and
:mod:`chainprod.kernels.scan_numpy` (the plain reference).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._caches import PlanCache
from ..blocks import COMBINE
from ..schedules import Schedule, replay

__all__ = ["FlatPlan", "KIND_CODES", "OP_CODES", "OP_NAMES", "PARALLEL_MIN_FLOPS", "bind_flat",
           "clear_cache", "kind_signature"]

#: Block kinds the flat kernels implement -> code.
KIND_CODES = {"dense": 0, "diag": 1}
#: ``(left kind, right kind)`` -> op code in ``FlatPlan.op_code``.
OP_CODES = {("dense", "dense"): 0, ("dense", "diag"): 1, ("diag", "dense"): 2, ("diag", "diag"): 3}
#: op code -> ``"left(x)right"`` name (for printing).
OP_NAMES = tuple(f"{a}(x){b}" for (a, b) in sorted(OP_CODES, key=OP_CODES.get))

#: A stage runs in parallel only when it has this many flops (all batch
#: elements together): waking the worker threads for a parallel region costs
#: a few microseconds, about this much arithmetic on one core.
PARALLEL_MIN_FLOPS = 20_000.0

#: Rounds with more ops than this are never fused with their neighbours
#: (they have all the parallelism a machine can use; fusing is for the long
#: stretches of narrow rounds, and finding lanes costs Python time per op).
_FUSE_MAX_WIDTH = 4096


def _op_out_kind(left: str, right: str) -> str:
    return "diag" if (left, right) == ("diag", "diag") else "dense"


# The kernels hard-code the product kinds of the combine table; make sure the
# table agrees (a new kind there needs a code here and in the kernels).
for _pair in OP_CODES:
    if COMBINE[_pair].out != _op_out_kind(*_pair):  # pragma: no cover - guards a future table change
        raise ImportError(f"chainprod.blocks.COMBINE{_pair} gives {COMBINE[_pair].out!r}, the flat kernels "
                          f"assume {_op_out_kind(*_pair)!r}")


class FlatPlan(NamedTuple):
    """A flat plan: a schedule bound to block shapes, plain arrays a compiled kernel runs in one call.

    Offsets are in elements of the flat buffer (batch included). Ops are
    stored stage by stage, lane by lane, in run order within a lane: the ops
    of lanes ``a .. b-1`` are ``op_*[lane_ptr[a]:lane_ptr[b]]`` and the lanes
    of stage ``s`` are ``stage_ptr[s] .. stage_ptr[s+1]-1``.
    """

    length: int                 #: scan positions
    batch: int                  #: ``N``
    n_slots: int
    buf_size: int               #: elements of the flat slot buffer
    slot_off: np.ndarray        #: int64[n_slots], element offset of each slot
    pos_kind: np.ndarray        #: int64[length], kind code of each position (:data:`KIND_CODES`)
    pos_rows: np.ndarray        #: int64[length]
    pos_cols: np.ndarray        #: int64[length]
    op_left: np.ndarray         #: int64[ops], offset of the left operand
    op_right: np.ndarray        #: int64[ops], offset of the right operand
    op_out: np.ndarray          #: int64[ops], offset of the output
    op_code: np.ndarray         #: int64[ops], :data:`OP_CODES`
    op_m: np.ndarray            #: int64[ops], rows of left and out
    op_k: np.ndarray            #: int64[ops], cols of left = rows of right
    op_n: np.ndarray            #: int64[ops], cols of right and out
    op_tmp: np.ndarray          #: int64[ops], 1: compute into a temporary, then copy to out
    op_flops: np.ndarray        #: float64[ops], all batch elements
    op_round: np.ndarray        #: int64[ops], the schedule round the op comes from
    lane_ptr: np.ndarray        #: int64[lanes+1]
    lane_cum: np.ndarray        #: float64[lanes+1], flops of all lanes before this one
    lane_mid: np.ndarray        #: float64[lanes], flops before the middle of each lane (for splitting)
    stage_ptr: np.ndarray       #: int64[stages+1]
    stage_parallel: np.ndarray  #: int64[stages], 1: worth a parallel region (>= 2 lanes, enough flops)
    stage_rounds: np.ndarray    #: int64[stages], schedule rounds fused into the stage
    out_slot: np.ndarray        #: int64[length], slot holding prefix ``[0, k]``
    out_off: np.ndarray         #: int64[length], its element offset
    out_kind: np.ndarray        #: int64[length], its kind code
    max_tmp: int                #: largest temporary an op needs (elements)

    @property
    def n_ops(self) -> int:
        return int(self.op_out.shape[0])

    @property
    def n_stages(self) -> int:
        return int(self.stage_ptr.shape[0] - 1)

    def flops(self) -> float:
        """Total flops of the scan (all batch elements)."""
        return float(self.op_flops.sum())

    def summary(self) -> str:
        """One line per kind of stage: what the kernel will do."""
        lanes = np.diff(self.stage_ptr)
        par = int(self.stage_parallel.sum())
        fused = int((self.stage_rounds > 1).sum())
        return (f"FlatPlan: {self.length} positions, batch {self.batch}, {self.n_ops} ops in "
                f"{int(self.stage_rounds.sum())} rounds -> {self.n_stages} stages ({fused} fused, {par} "
                f"parallel, up to {int(lanes.max(initial=0))} lanes); buffer {self.buf_size} elements, "
                f"{self.flops():.4g} flops")

    __str__ = summary


def kind_signature(kinds, rows, cols) -> tuple:
    """Run-length encoding ``((kind_code, count, rows, cols), ...)`` of per-position specs.

    ``kinds`` are kind codes (:data:`KIND_CODES`) or names. A plain tuple: the
    cache key of a bound plan, as long as the chain has runs, not as long as
    it has layers.
    """
    k = _kind_codes(kinds)
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    c = np.asarray(cols, dtype=np.int64).reshape(-1)
    if not (k.shape == r.shape == c.shape):
        raise ValueError(f"kinds, rows and cols need one entry per position, got lengths "
                         f"{k.shape[0]}, {r.shape[0]}, {c.shape[0]}")
    if k.size == 0:
        return ()
    change = (np.diff(k) != 0) | (np.diff(r) != 0) | (np.diff(c) != 0)
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    counts = np.diff(np.concatenate((starts, [k.size])))
    return tuple(zip(k[starts].tolist(), counts.tolist(), r[starts].tolist(), c[starts].tolist()))


def _kind_codes(kinds) -> np.ndarray:
    a = np.asarray(kinds)
    if a.dtype.kind in "iu":
        bad = (a < 0) | (a >= len(KIND_CODES))
        if np.any(bad):
            p = int(np.flatnonzero(bad.reshape(-1))[0])
            raise ValueError(f"position {p}: unknown kind code {int(a.reshape(-1)[p])}; valid codes: "
                             f"{', '.join(f'{v} ({n})' for n, v in KIND_CODES.items())}")
        return a.astype(np.int64).reshape(-1)
    out = np.empty(a.size, dtype=np.int64)
    for p, name in enumerate(a.reshape(-1).tolist()):
        if name not in KIND_CODES:
            raise ValueError(f"position {p}: block kind {name!r} has no flat kernel; supported kinds: "
                             f"{', '.join(KIND_CODES)}")
        out[p] = KIND_CODES[name]
    return out


def bind_flat(schedule: Schedule, kinds, rows, cols, *, batch: int = 1,
              parallel_min_flops: float = PARALLEL_MIN_FLOPS) -> FlatPlan:
    """Bind ``schedule`` to per-position block kinds and shapes (cached).

    Parameters
    ----------
    schedule : Schedule
        A scan (every prefix produced) over ``len(kinds)`` positions.
    kinds : array of int or str
        Kind of each position's block (:data:`KIND_CODES`).
    rows, cols : array of int
        Logical shape of each position's block (``rows == cols`` for diag);
        position ``p`` is the left neighbour of ``p + 1``, so
        ``cols[p] == rows[p + 1]``.
    batch : int
        ``N``: every block carries a leading batch axis.
    parallel_min_flops : float
        A stage with fewer flops runs serially (see :data:`PARALLEL_MIN_FLOPS`).

    Returns
    -------
    FlatPlan
        The same object for equal ``(schedule value, signature, batch,
        threshold)``.

    Raises
    ------
    ScheduleError
        When the schedule breaks a rule (from :func:`~chainprod.schedules.replay`).
    ValueError
        When the shapes do not chain or the schedule is not a scan.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"bind_flat needs a chainprod Schedule, got {type(schedule).__name__}")
    sig = kind_signature(kinds, rows, cols)
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    length = sum(c for _, c, _, _ in sig)
    if length != schedule.length:
        raise ValueError(f"schedule {schedule.name!r} is for {schedule.length} positions, the blocks describe "
                         f"{length}")
    key = (schedule.key, sig, int(batch), float(parallel_min_flops))
    return _FLAT.get(key, lambda: _bind(schedule, sig, int(batch), float(parallel_min_flops)))


_FLAT = PlanCache(maxsize=64)


def clear_cache() -> None:
    """Forget every bound flat plan (:func:`chainprod.clear_caches` empties this cache too)."""
    _FLAT.clear()


# -- the planner --------------------------------------------------------------
def _expand(sig):
    k = np.repeat(np.array([s[0] for s in sig], dtype=np.int64), [s[1] for s in sig])
    r = np.repeat(np.array([s[2] for s in sig], dtype=np.int64), [s[1] for s in sig])
    c = np.repeat(np.array([s[3] for s in sig], dtype=np.int64), [s[1] for s in sig])
    return k, r, c


def _bind(s: Schedule, sig, batch: int, thr: float) -> FlatPlan:
    L = s.length
    kind, rows, cols = _expand(sig)
    diag = KIND_CODES["diag"]
    if np.any((kind == diag) & (rows != cols)):
        p = int(np.flatnonzero((kind == diag) & (rows != cols))[0])
        raise ValueError(f"position {p}: a diagonal block must be square, got {rows[p]}x{cols[p]}")
    if L > 1 and np.any(cols[:-1] != rows[1:]):
        p = int(np.flatnonzero(cols[:-1] != rows[1:])[0])
        raise ValueError(f"shapes do not chain at position {p + 1}: position {p} is {rows[p]}x{cols[p]} but "
                         f"position {p + 1} is {rows[p + 1]}x{cols[p + 1]}")
    rp = replay(s)  # the schedule's rules, and its ops as one flat table
    if not s.is_scan:
        raise ValueError(f"schedule {s.name!r} does not produce every prefix; the flat scan needs a scan")

    # How this works: every per-op quantity is one numpy expression over the
    # replay's flat op table; only the grouping into stages walks the rounds.
    left, right, out, i, k, j = rp.left, rp.right, rp.out, rp.i, rp.k, rp.j
    round_ptr, widths, n_ops = rp.round_ptr, rp.widths, rp.n_ops

    # Kind of an interval: diagonal iff no dense factor in it.
    dense_before = np.concatenate(([0], np.cumsum(kind != diag))).astype(np.int64)
    kl = np.where(dense_before[k + 1] - dense_before[i] > 0, 0, diag)
    kr = np.where(dense_before[j + 1] - dense_before[k + 1] > 0, 0, diag)
    ko = np.where((kl == diag) & (kr == diag), diag, 0)
    code = np.select([(kl == 0) & (kr == 0), (kl == 0) & (kr == diag), (kl == diag) & (kr == 0)],
                     [0, 1, 2], default=3).astype(np.int64)
    m, kk, n = rows[i], cols[k], cols[j]
    out_size = np.where(ko == diag, m, m * n)
    flops = np.select([code == 0, code == 3], [2.0 * m * kk * n, m.astype(float)],
                      default=(m * n).astype(float)) * batch

    # Slot sizes: the largest block each slot ever holds (per batch element).
    size = np.zeros(s.n_slots, dtype=np.int64)
    size[:L] = np.where(kind == diag, rows, rows * cols)
    np.maximum.at(size, out, out_size)
    slot_off = np.concatenate(([0], np.cumsum(size)[:-1])).astype(np.int64) * batch
    buf_size = int(size.sum()) * batch

    # A temporary is needed when the output overlaps an operand and the
    # elementwise loop would read an element after writing over it.
    tmp = ((code == 0) & ((out == left) | (out == right))) \
        | ((code == 1) & (out == right) & (m > 1)) \
        | ((code == 2) & (out == left) & (n > 1))
    max_tmp = int((out_size[tmp] * batch).max(initial=0))

    order, lane_ptr, stage_ptr, stage_rounds = _stages(left, right, out, round_ptr, widths, flops, thr)
    lane_flops = np.add.reduceat(flops[order], lane_ptr[:-1]) if n_ops else np.zeros(0)
    lane_cum = np.concatenate(([0.0], np.cumsum(lane_flops)))
    lane_mid = lane_cum[:-1] + 0.5 * lane_flops
    stage_flops = lane_cum[stage_ptr[1:]] - lane_cum[stage_ptr[:-1]]
    stage_parallel = ((np.diff(stage_ptr) >= 2) & (stage_flops >= thr)).astype(np.int64)

    o = order
    out_slot = np.asarray(s.outputs, dtype=np.int64).copy()
    out_kind = np.where(dense_before[np.arange(L) + 1] > 0, 0, diag).astype(np.int64)
    arrays = dict(
        slot_off=slot_off, pos_kind=kind, pos_rows=rows, pos_cols=cols,
        op_left=slot_off[left][o], op_right=slot_off[right][o], op_out=slot_off[out][o],
        op_code=code[o], op_m=m[o], op_k=kk[o], op_n=n[o], op_tmp=tmp.astype(np.int64)[o],
        op_flops=flops[o].astype(np.float64),
        op_round=rp.op_round[o],
        lane_ptr=lane_ptr, lane_cum=lane_cum, lane_mid=lane_mid, stage_ptr=stage_ptr,
        stage_parallel=stage_parallel, stage_rounds=stage_rounds,
        out_slot=out_slot, out_off=slot_off[out_slot], out_kind=out_kind,
    )
    for a in arrays.values():
        a.setflags(write=False)  # plans are cached and shared
    return FlatPlan(length=L, batch=batch, n_slots=s.n_slots, buf_size=buf_size, max_tmp=max_tmp, **arrays)


class _Components:
    """Union-find over the slots that a run of rounds touches."""

    def __init__(self):
        self.parent = {}
        self.touched = 0
        self.unions = 0

    def find(self, x):
        p = self.parent
        r = x
        while p[r] != r:
            r = p[r]
        while p[x] != r:
            p[x], x = r, p[x]
        return r

    def add_op(self, lf, rt, ot):
        p = self.parent
        for x in (lf, rt, ot):
            if x not in p:
                p[x] = x
                self.touched += 1
        ro = self.find(ot)
        for x in (lf, rt):
            rx = self.find(x)
            if rx != ro:
                p[rx] = ro
                self.unions += 1

    @property
    def count(self):
        return self.touched - self.unions


def _add_round(comp, left, right, out, a, b):
    for x, y, z in zip(left[a:b].tolist(), right[a:b].tolist(), out[a:b].tolist()):
        comp.add_op(x, y, z)


def _stages(left, right, out, round_ptr, widths, flops, thr):
    """Group rounds into stages and each stage's ops into lanes.

    Returns ``(order, lane_ptr, stage_ptr, stage_rounds)``: ``order`` permutes
    the ops (in round order) into stage/lane order.

    A run of rounds is fused while its lanes (connected components of the
    slots it touches; an op joins its three slots, which over-joins ops that
    only share a read, a safe loss) are at least as many as its widest
    round has ops, or while the whole run is cheaper than a parallel region.
    """
    R = len(widths)
    round_flops = np.add.reduceat(flops, round_ptr[:-1]) if flops.size else np.zeros(R)
    runs = []  # (first round, last round + 1)
    start = None
    comp = None
    run_w = run_f = 0
    for r in range(R):
        w, f = int(widths[r]), float(round_flops[r])
        if w > _FUSE_MAX_WIDTH:
            if start is not None:
                runs.append((start, r))
            runs.append((r, r + 1))
            start = None
            continue
        if start is None:
            start, comp, run_w, run_f = r, _Components(), 0, 0.0
        _add_round(comp, left, right, out, round_ptr[r], round_ptr[r + 1])
        if r == start or comp.count >= max(run_w, w) or run_f + f < thr:
            run_w, run_f = max(run_w, w), run_f + f
            continue
        # Round r would merge lanes that had parallel work: close the run before it.
        runs.append((start, r))
        start, comp, run_w, run_f = r, _Components(), w, f
        _add_round(comp, left, right, out, round_ptr[r], round_ptr[r + 1])
    if start is not None:
        runs.append((start, R))

    order_parts, lane_sizes, stage_lanes, stage_rounds = [], [], [], []
    for a, b in runs:
        ops = np.arange(round_ptr[a], round_ptr[b], dtype=np.int64)
        if b - a == 1:  # one round: every op is a lane
            order_parts.append(ops)
            lane_sizes.append(np.ones(ops.size, dtype=np.int64))
            stage_lanes.append(ops.size)
        else:
            comp = _Components()
            _add_round(comp, left, right, out, ops[0], ops[-1] + 1)
            roots = np.array([comp.find(o) for o in out[ops].tolist()], dtype=np.int64)
            # lanes in order of their first op; ops keep round order inside a lane (stable sort)
            _, first = np.unique(roots, return_index=True)
            rank = np.empty(roots.max() + 1 if roots.size else 0, dtype=np.int64)
            lane_roots = roots[np.sort(first)]
            rank[lane_roots] = np.arange(lane_roots.size)
            lane_of = rank[roots]
            perm = np.argsort(lane_of, kind="stable")
            order_parts.append(ops[perm])
            lane_sizes.append(np.bincount(lane_of, minlength=lane_roots.size).astype(np.int64))
            stage_lanes.append(lane_roots.size)
        stage_rounds.append(b - a)
    order = np.concatenate(order_parts) if order_parts else np.zeros(0, dtype=np.int64)
    sizes = np.concatenate(lane_sizes) if lane_sizes else np.zeros(0, dtype=np.int64)
    lane_ptr = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    stage_ptr = np.concatenate(([0], np.cumsum(stage_lanes))).astype(np.int64)
    return order, lane_ptr, stage_ptr, np.array(stage_rounds, dtype=np.int64)
