"""Schedules: pure plans for computing all prefix products of a chain.

A schedule is built from sizes alone. It never touches an array, so it can
be printed, costed and validated before anything runs (opt_einsum's
``contract_path`` habit); executors run any schedule.

The model
---------
The factors ``a_0, a_1, ..., a_{L-1}`` sit in *slots* ``0 .. L-1`` (scan
order: ``a_0 = A_L`` is the output end of the network, see ``DESIGN.md``).
A schedule is a list of *rounds*; a round is a set of independent combine
ops, each ``slot[out] <- slot[left] (x) slot[right]``, where ``left`` holds
the interval product ``[i, k] = a_i a_{i+1} ... a_k`` and ``right`` holds
``[k+1, j]``, so ``out`` receives ``[i, j]``. Left is always the earlier
factor: ``combine(x, y) = x @ y`` is associative, not commutative.

Rules every schedule obeys (``validate()`` proves them by replay):

* within a round, no slot written by one op is read or written by another,
  so the ops of a round may run in any order or all at once;
* an op may overwrite one of its own operands (in-place circuits);
* slots ``>= L`` are scratch, empty until first written;
* at the end, ``outputs[k]`` is the slot holding ``[0, k]`` (``-1`` where a
  schedule does not produce that prefix, e.g. ``tree`` gives only the total).

References: Ladner & Fischer, "Parallel prefix computation" (1980); Brent &
Kung, "A regular layout for parallel adders" (1982); Blelloch, "Prefix sums
and their applications" (1990); Sklansky, "Conditional-sum addition logic"
(1960); Hillis & Steele, "Data parallel algorithms" (1986).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from .blocks import COMBINE, BlockSeq, BlockSpec, kind_table
from .errors import ScheduleError

__all__ = [
    "Schedule",
    "Round",
    "ScheduleError",
    "ScheduleInfo",
    "SCHEDULES",
    "schedule",
    "register_schedule",
]


class Round(NamedTuple):
    """The ops of one round as three aligned integer arrays of slots."""

    left: np.ndarray
    right: np.ndarray
    out: np.ndarray

    def __len__(self):  # number of ops, not of fields
        return int(self.out.shape[0])


def _round(left, right, out) -> Round:
    r = Round(*(np.asarray(a, dtype=np.int64).reshape(-1) for a in (left, right, out)))
    for a in r:
        a.setflags(write=False)
    return r


class Schedule:
    """A validated-on-demand plan of combine rounds over ``length`` factors.

    Attributes
    ----------
    name : str
        Builder that made it (``"sklansky"``, ``"chunked"``, ...).
    length : int
        Number of factors ``L``.
    n_slots : int
        Slots used: ``L`` inputs plus scratch.
    steps : tuple of Round
        The rounds, in order.
    outputs : ndarray of int
        ``outputs[k]`` = slot holding the prefix ``[0, k]`` at the end, or -1.
    options : dict
        The options the builder was called with.
    """

    def __init__(self, name, length, n_slots, steps, outputs, options=None):
        self.name = name
        self.length = int(length)
        self.n_slots = int(n_slots)
        self.steps = tuple(s for s in steps if len(s))  # empty rounds are not rounds
        self.outputs = np.asarray(outputs, dtype=np.int64)
        self.outputs.setflags(write=False)
        # plans are cached and shared: nothing about them may be mutable
        self.options = MappingProxyType(dict(options or {}))

    def __getstate__(self):  # plans travel to Ray/Dask workers; a mappingproxy does not pickle
        state = dict(self.__dict__)
        state["options"] = dict(self.options)
        return state

    def __setstate__(self, state):
        state["options"] = MappingProxyType(state["options"])
        self.__dict__.update(state)

    # -- shape-free statistics -------------------------------------------
    @property
    def rounds(self) -> int:
        """Number of dependent rounds (the depth ``D``)."""
        return len(self.steps)

    @property
    def widths(self) -> list[int]:
        """Ops per round."""
        return [len(s) for s in self.steps]

    @property
    def peak_width(self) -> int:
        """Most ops in one round: the workers needed to run it in ``rounds`` steps."""
        return max(self.widths, default=0)

    @property
    def num_ops(self) -> int:
        """Total combine ops (the work ``W`` in ops)."""
        return sum(self.widths)

    @property
    def is_scan(self) -> bool:
        """True when every prefix ``[0, k]`` is produced."""
        return bool(np.all(self.outputs >= 0))

    def __repr__(self):
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"<Schedule {self.name!r} L={self.length}{opts}: rounds={self.rounds}, "
            f"peak_width={self.peak_width}, ops={self.num_ops}>"
        )

    def __str__(self):
        return str(self.describe())

    # -- symbolic replay -----------------------------------------------
    def intervals(self):
        """Replay the plan on intervals.

        Returns a list with, per round, the arrays ``(i, k, j)``: each op
        combines ``[i, k]`` with ``[k+1, j]`` into ``[i, j]``. Raises
        :class:`ScheduleError` if an op reads an empty slot or combines
        intervals that do not meet.
        """
        return _replay(self)[0]

    def validate(self) -> Schedule:
        """Prove the plan correct by symbolic replay; return ``self``.

        Checks that every op reads slots holding adjacent intervals, that
        the ops of a round do not touch each other's output slots, and that
        ``outputs[k]`` holds exactly ``[0, k]``.
        """
        _replay(self, check_outputs=True)
        return self

    def ops(self, round_index: int) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """The ops of one round as ``([i, k], [k+1, j], [i, j])`` tuples (for reading)."""
        i, k, j = self.intervals()[round_index]
        return [((a, b), (b + 1, c), (a, c)) for a, b, c in zip(i.tolist(), k.tolist(), j.tolist())]

    # -- costs (need shapes) -------------------------------------------
    def flops_per_round(self, blocks=None) -> np.ndarray:
        """Flops of each round per batch element, counted from real block shapes.

        ``blocks`` is a :class:`~chainprod.blocks.BlockSeq`, a list of
        :class:`~chainprod.blocks.BlockSpec` (or ``(kind, rows, cols)``
        tuples), or an int ``w`` meaning the usual gradient chain: a thin
        ``1 x w`` head (it contains the output Jacobian ``A_L``) followed by
        dense ``w x w`` blocks. ``None`` uses ``w = 64``.
        """
        return np.array([f.sum() for f in self.op_flops(blocks)], dtype=float)

    def op_flops(self, blocks=None) -> list[np.ndarray]:
        """Per round, the flops of each op (per batch element).

        Kinds are followed through the plan with the combine table of
        :mod:`chainprod.blocks` (e.g. diagonal x diagonal stays diagonal), so a
        new block kind is costed by its own rule without changes here.
        """
        spec = _spec_arrays(blocks, self.length)
        return [_round_flops(spec, i, k, j, kl, kr) for i, k, j, kl, kr in _kinded_rounds(self, spec)]

    def flops(self, blocks=None) -> float:
        """Total flops per batch element (see :meth:`flops_per_round`)."""
        return float(self.flops_per_round(blocks).sum())

    def brent_bound(self, workers: int, blocks=None) -> float:
        """Brent's bound ``T_P <= W/P + D`` in flop-time units.

        ``W`` is the total flops and ``D`` the sum over rounds of the
        largest single op (the critical path when every round is a barrier).
        """
        workers = _check_workers(workers)
        work = depth = 0.0
        for f in self.op_flops(blocks):
            work += float(f.sum())
            depth += float(f.max())
        return work / workers + depth

    def describe(self, blocks=None, workers=None) -> ScheduleInfo:
        """A printable summary (see :class:`ScheduleInfo`)."""
        return ScheduleInfo(self, blocks, workers)


def _check_workers(workers):
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)):
        raise TypeError(f"workers must be a positive int, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return int(workers)


def _replay(s: Schedule, check_outputs=False):
    lo = np.full(s.n_slots, -1, dtype=np.int64)
    hi = np.full(s.n_slots, -1, dtype=np.int64)
    lo[: s.length] = hi[: s.length] = np.arange(s.length)
    out = []
    for r, (left, right, dst) in enumerate(s.steps):
        for name, a in (("left", left), ("right", right), ("out", dst)):
            if a.size and (a.min() < 0 or a.max() >= s.n_slots):
                raise ScheduleError(f"round {r}: {name} slot out of range 0..{s.n_slots - 1}")
        if np.any(lo[left] < 0) or np.any(lo[right] < 0):
            bad = int(np.flatnonzero((lo[left] < 0) | (lo[right] < 0))[0])
            raise ScheduleError(f"round {r}, op {bad}: reads an empty slot")
        if np.any(hi[left] + 1 != lo[right]):
            bad = int(np.flatnonzero(hi[left] + 1 != lo[right])[0])
            raise ScheduleError(
                f"round {r}, op {bad}: [{lo[left][bad]}, {hi[left][bad]}] and "
                f"[{lo[right][bad]}, {hi[right][bad]}] are not adjacent"
            )
        if np.unique(dst).size != dst.size:
            raise ScheduleError(f"round {r}: two ops write the same slot")
        # An op may overwrite its own operand, but no other op of the round
        # may read the slot it writes (the round must be order-free).
        op_of_out = np.full(s.n_slots, -1, dtype=np.int64)
        op_of_out[dst] = np.arange(dst.size)
        ids = np.arange(dst.size)
        for reads in (left, right):
            w = op_of_out[reads]
            if np.any((w >= 0) & (w != ids)):
                bad = int(np.flatnonzero((w >= 0) & (w != ids))[0])
                raise ScheduleError(f"round {r}, op {bad}: reads a slot written by another op of the round")
        i, k, j = lo[left].copy(), hi[left].copy(), hi[right].copy()
        out.append((i, k, j))
        lo[dst], hi[dst] = i, j
    if check_outputs:
        if s.outputs.shape != (s.length,):
            raise ScheduleError(f"outputs has shape {s.outputs.shape}, expected ({s.length},)")
        ks = np.flatnonzero(s.outputs >= 0)
        slots = s.outputs[ks]
        bad = (lo[slots] != 0) | (hi[slots] != ks)
        if np.any(bad):
            k = int(ks[np.flatnonzero(bad)[0]])
            sl = int(s.outputs[k])
            raise ScheduleError(f"output {k} (slot {sl}) holds [{lo[sl]}, {hi[sl]}], expected [0, {k}]")
    return out, lo, hi


class _Spec(NamedTuple):
    dense_before: np.ndarray  # dense_before[p] = number of dense blocks in positions < p
    kind_names: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    kind_ids: np.ndarray  # per position, index into blocks.kind_table()[0]


def _kinded_rounds(s: Schedule, spec: _Spec):
    """Replay with kinds: per round ``(i, k, j, left_kind_id, right_kind_id)``."""
    _, table = kind_table()
    slot_kind = np.full(s.n_slots, -1, dtype=np.int64)
    slot_kind[: s.length] = spec.kind_ids
    out = []
    for (i, k, j), st in zip(s.intervals(), s.steps):
        kl, kr = slot_kind[st.left], slot_kind[st.right]
        out.append((i, k, j, kl, kr))
        slot_kind[st.out] = table[kl, kr]
    return out


def _spec_arrays(blocks, length) -> _Spec:
    if blocks is None:
        blocks = 64
    if isinstance(blocks, (int, np.integer)):
        w = int(blocks)
        kinds = np.full(length, "dense", dtype=object)
        rows = np.full(length, w, dtype=np.int64)
        rows[0] = 1
        cols = np.full(length, w, dtype=np.int64)
    elif isinstance(blocks, BlockSeq):
        kinds, rows, cols = blocks.kinds, blocks.rows, blocks.cols
    else:
        specs = [BlockSpec(*b) for b in blocks]
        kinds = np.array([b.kind for b in specs], dtype=object)
        rows = np.array([b.rows for b in specs], dtype=np.int64)
        cols = np.array([b.cols for b in specs], dtype=np.int64)
    if len(kinds) != length:
        raise ValueError(f"blocks describe {len(kinds)} factors, the schedule has {length}")
    names, _ = kind_table()
    unknown = set(np.unique(kinds).tolist()) - set(names)
    if unknown:
        raise ValueError(f"unknown block kind(s) {sorted(unknown)}; known kinds: {', '.join(names)}")
    kind_ids = np.searchsorted(np.array(names, dtype=object), kinds).astype(np.int64)
    dense = (kinds != "diag").astype(np.int64)
    return _Spec(np.concatenate([[0], np.cumsum(dense)]), kinds, rows, cols, kind_ids)


def _round_flops(spec: _Spec, i, k, j, kl, kr) -> np.ndarray:
    """Flops of each op ``[i,k] (x) [k+1,j]`` from the combine table.

    ``kl``/``kr`` are the kind ids of the two operands (from a kinded replay,
    :func:`_kinded_rounds`).
    """
    names, _ = kind_table()
    r, inner, c = spec.rows[i], spec.cols[k], spec.cols[j]
    f = np.zeros(i.shape, dtype=float)
    for (lk, rk), rule in COMBINE.items():
        m = (kl == names.index(lk)) & (kr == names.index(rk))
        if np.any(m):
            f[m] = rule.flops(r[m], inner[m], c[m])
    return f


class ScheduleInfo:
    """What a schedule costs, printable (opt_einsum's ``PathInfo`` habit)."""

    def __init__(self, sched: Schedule, blocks=None, workers=None):
        self.schedule = sched
        self.blocks = blocks
        self.workers = workers if workers is not None else max(sched.peak_width, 1)
        spec = _spec_arrays(blocks, sched.length)
        self.round_flops = sched.flops_per_round(blocks)
        self.flops = float(self.round_flops.sum())
        seq = _sequential_flops(spec)
        self.sequential_flops = seq
        self.brent = sched.brent_bound(self.workers, blocks)
        self.largest = max(
            ((int(r), int(c), k) for k, r, c in zip(spec.kind_names, spec.rows, spec.cols)),
            key=lambda t: t[0] * t[1],
        )

    def __str__(self):
        s = self.schedule
        desc = "w=64 gradient chain (1x64 head, 64x64 dense)" if self.blocks is None else (
            f"w={self.blocks} gradient chain (1x{self.blocks} head, dense)"
            if isinstance(self.blocks, (int, np.integer)) else "given blocks")
        lines = [
            f"Schedule {s.name!r} over L={s.length} factors"
            + (f"  {dict(s.options)}" if s.options else ""),
            "  scan order: position 0 = A_L (output end); [i,k] (x) [k+1,j] -> [i,j]",
            f"  shapes                  : {desc}",
            f"  rounds (depth D)        : {s.rounds}",
            f"  peak width (workers)    : {s.peak_width}",
            f"  ops (work W)            : {s.num_ops}",
            f"  sequential flops        : {self.sequential_flops:.4g}  (backprop order, all thin)",
            f"  scheduled flops         : {self.flops:.4g}  "
            f"({self.flops / max(self.sequential_flops, 1):.3g}x the sequential work)",
            f"  largest block           : {self.largest[0]}x{self.largest[1]} {self.largest[2]}",
            f"  Brent bound, P={self.workers:<6d}  : T_P <= W/P + D = {self.brent:.4g} flop-times",
        ]
        if s.rounds:
            lines.append(f"  {'round':>5} {'ops':>7} {'flops':>11}  ops ([i,k] (x) [k+1,j] -> [i,j])")
        show = range(s.rounds) if s.rounds <= 24 else [*range(12), None, *range(s.rounds - 6, s.rounds)]
        ivals = s.intervals()
        for r in show:
            if r is None:
                lines.append(f"  {'...':>5}")
                continue
            i, k, j = ivals[r]
            ex = ", ".join(f"[{a},{b}]x[{b + 1},{c}]" for a, b, c in zip(i[:3], k[:3], j[:3]))
            more = f", ... (+{len(i) - 3})" if len(i) > 3 else ""
            lines.append(f"  {r + 1:>5} {len(i):>7} {self.round_flops[r]:>11.4g}  {ex}{more}")
        return "\n".join(lines)

    __repr__ = __str__


def _sequential_flops(spec: _Spec) -> float:
    L = len(spec.rows)
    if L < 2:
        return 0.0
    # kind of each prefix [0, p], folded with the combine table
    _, table = kind_table()
    table, ids = table.tolist(), spec.kind_ids.tolist()
    pref = [ids[0]]
    for p in range(1, L):
        pref.append(table[pref[-1]][ids[p]])
    j = np.arange(1, L)
    return float(_round_flops(spec, np.zeros_like(j), j - 1, j, np.array(pref[:-1]), spec.kind_ids[1:]).sum())


# ---------------------------------------------------------------------------
# Builders. Each returns a Schedule; the registry below maps names to them.
# ---------------------------------------------------------------------------


def sequential(L: int) -> Schedule:
    """Backprop order: ``[0, j-1] (x) [j, j]`` for j = 1..L-1, one op per round.

    L-1 rounds, width 1, L-1 ops, every op thin (vector-matrix). This is the
    scan that backpropagation performs (seed question Q1).
    """
    steps = [_round([j - 1], [j], [j]) for j in range(1, L)]
    return Schedule("sequential", L, L, steps, np.arange(L))


def tree(L: int) -> Schedule:
    """Balanced tree for the total product only (Q3).

    Adjacent partial products are paired each round, the right one
    overwritten: ``ceil(log2 L)`` rounds, ``floor(L/2)`` ops in the first
    round, ``L-1`` ops. An odd node out is carried to the next round.
    ``outputs`` holds only ``[0, L-1]``.
    """
    nodes = np.arange(L)
    steps = []
    while nodes.size > 1:
        pairs = nodes.size // 2
        left, right = nodes[0 : 2 * pairs : 2], nodes[1 : 2 * pairs : 2]
        steps.append(_round(left, right, right))
        nodes = np.concatenate([right, nodes[2 * pairs :]])
    outputs = np.full(L, -1)
    outputs[L - 1] = nodes[0] if L else -1
    return Schedule("tree", L, L, steps, outputs)


def independent(L: int) -> Schedule:
    """A separate balanced tree for every prefix, sharing nothing (Q4, Q5).

    ``ceil(log2 L)`` rounds, but the first round alone has about ``L^2/4``
    ops and the work is ``L(L-1)/2`` ops: the quadratic cost that Q6 removes.
    Trees never write input slots (other trees read them); each tree
    writes its own scratch slots.
    """
    next_slot = L
    per_round: list[list[list[int]]] = []
    outputs = np.arange(L)
    for k in range(1, L):
        nodes = list(range(k + 1))
        own = set()  # scratch slots of this tree
        r = 0
        while len(nodes) > 1:
            if len(per_round) <= r:
                per_round.append([[], [], []])
            nxt = []
            for a in range(0, len(nodes) - 1, 2):
                x, y = nodes[a], nodes[a + 1]
                if x in own:
                    dst = x
                elif y in own:
                    dst = y
                else:
                    dst = next_slot
                    next_slot += 1
                    own.add(dst)
                per_round[r][0].append(x)
                per_round[r][1].append(y)
                per_round[r][2].append(dst)
                nxt.append(dst)
            if len(nodes) % 2:
                nxt.append(nodes[-1])
            nodes = nxt
            r += 1
        outputs[k] = nodes[0]
    steps = [_round(*ops) for ops in per_round]
    return Schedule("independent", L, next_slot, steps, outputs)


def hillis_steele(L: int) -> Schedule:
    """Hillis & Steele (Kogge-Stone): every position combines with the one ``stride`` back.

    ``ceil(log2 L)`` rounds, ``L - stride`` ops per round (peak ``L-1``),
    about ``L log2 L`` ops. Every op of a round reads a value another op of
    the same round replaces, so the builder double-buffers: two banks of
    ``L`` slots, written alternately (``n_slots = 2L``).
    """
    cur = np.arange(L)  # slot currently holding position p's partial product
    steps = []
    stride, bank = 1, 1
    while stride < L:
        j = np.arange(stride, L)
        dst = bank * L + j
        steps.append(_round(cur[j - stride], cur[j], dst))
        cur = cur.copy()
        cur[j] = dst
        stride *= 2
        bank ^= 1
    return Schedule("hillis_steele", L, 2 * L if L > 1 else L, steps, cur)


def sklansky(L: int) -> Schedule:
    """Sklansky's divide-and-conquer circuit (Q6: linear workers, log rounds).

    Round ``r`` (``half = 2^r``): in every block of ``2*half`` positions, each
    position of the upper half combines with the last position of the lower
    half, which already holds that block's prefix. ``ceil(log2 L)`` rounds,
    ``floor(L/2)`` peak width, about ``(L/2) log2 L`` ops; in place.
    """
    steps = []
    pos = np.arange(L)
    half = 1
    while half < L:
        j = pos[(pos & half) != 0]
        left = (j & ~(2 * half - 1)) + half - 1
        steps.append(_round(left, j, j))
        half *= 2
    return Schedule("sklansky", L, L, steps, np.arange(L))


def brent_kung(L: int) -> Schedule:
    """Brent-Kung / Blelloch work-efficient scan: an up-sweep then a down-sweep.

    Up-sweep (a reduction tree): for ``stride = 1, 2, 4, ...`` slot
    ``j = 2*stride*m + 2*stride - 1`` takes ``slot[j - stride] (x) slot[j]``.
    Afterwards slots ``2^t - 1`` hold full prefixes. Down-sweep: for the
    strides in reverse, slot ``j = 2*stride*m + 3*stride - 1`` takes
    ``slot[j - stride] (x) slot[j]``, filling the prefixes in between.
    At most ``2 ceil(log2 L) - 1`` rounds, fewer than ``2L`` ops, in place.
    This is the inclusive form of Blelloch's (1990) exclusive up/down sweep,
    which needs no identity element and keeps the operand order.
    """
    steps = []
    stride = 1
    strides = []
    while stride < L:
        j = np.arange(2 * stride - 1, L, 2 * stride)
        steps.append(_round(j - stride, j, j))
        strides.append(stride)
        stride *= 2
    for stride in reversed(strides[:-1] if strides else []):
        j = np.arange(3 * stride - 1, L, 2 * stride)
        steps.append(_round(j - stride, j, j))
    return Schedule("brent_kung", L, L, steps, np.arange(L))


def chunked(L: int, chunks: int | None = None, outer: str = "sklansky") -> Schedule:
    """Reduce-then-scan over ``chunks`` contiguous chunks (few workers, long chains).

    Phase 1, chunk by chunk in parallel: chunk 0 scans itself sequentially
    (its prefixes are final); every other chunk but the last folds its
    blocks into a scratch slot, giving the chunk total. Phase 2: the
    ``outer`` schedule scans the chunk totals, so each chunk gets the prefix
    that ends just before it. Phase 3: each chunk after the first runs a
    sequential thin scan from that prefix. About ``2L/chunks + log2 chunks``
    rounds, width ``chunks - 1`` (so ``P`` workers want ``P + 1`` chunks, which
    is what ``schedule("chunked", L, workers=P)`` builds), about ``2L`` ops; the down-sweep ops are all
    thin (vector-matrix) because every prefix contains ``a_0``.

    Chunks have equal size ``c = ceil(L/chunks)`` except a shorter last one,
    so each round's slots form arithmetic progressions that a vectorised
    executor turns into strided views. ``chunks=None`` uses ``round(sqrt(L))``.
    """
    if chunks is None:
        chunks = max(1, round(math.sqrt(L)))
    chunks = _check_workers(chunks)
    if not build(outer, 2).is_scan:
        raise ValueError(f"chunked: outer={outer!r} is not a scan (it does not produce every prefix); "
                         "use sequential, sklansky, brent_kung or hillis_steele")
    c = max(1, -(-L // chunks))
    n = -(-L // c) if L else 0
    opts = {"chunks": chunks, "outer": outer}
    if c == 1 or n <= 1:  # every chunk one block, or one chunk: nothing to split
        inner = build(outer, L) if c == 1 else sequential(L)
        return Schedule("chunked", L, inner.n_slots, inner.steps, inner.outputs, opts)
    starts = np.arange(n) * c
    ends = np.minimum(starts + c, L) - 1
    totals = np.empty(n - 1, dtype=np.int64)  # slot of chunk b's total, b < n-1
    totals[0] = ends[0]
    mids = np.arange(1, n - 1)  # chunks folded into scratch (all of size c)
    totals[1:] = L + np.arange(mids.size)
    next_slot = L + mids.size
    steps = []
    # Phase 1.
    for t in range(1, c):
        left = [t - 1]
        right = [t]
        out = [t]
        if mids.size:
            left.append(starts[mids] if t == 1 else totals[mids])
            right.append(starts[mids] + t)
            out.append(totals[mids])
        steps.append(_round(np.concatenate(left, axis=None), np.concatenate(right, axis=None),
                            np.concatenate(out, axis=None)))
    # Phase 2: scan the n-1 totals with the outer schedule, remapped to our slots.
    carry = totals.copy()  # carry[b] = slot holding [0, ends[b]] once phase 2 is done
    if n - 1 >= 2:
        sub = build(outer, n - 1)
        remap = np.concatenate([totals, next_slot + np.arange(sub.n_slots - (n - 1))])
        next_slot += sub.n_slots - (n - 1)
        steps += [_round(remap[s.left], remap[s.right], remap[s.out]) for s in sub.steps]
        carry = remap[sub.outputs]
    # Phase 3: thin sequential scan inside chunks 1..n-1 from their carry-in.
    for t in range(c):
        b = np.arange(1, n)
        b = b[starts[b] + t <= ends[b]]
        p = starts[b] + t
        left = carry[b - 1] if t == 0 else p - 1
        steps.append(_round(left, p, p))
    return Schedule("chunked", L, next_slot, steps, np.arange(L), opts)


#: name -> builder(L, **options). ``auto`` is resolved by the cost model.
SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "sequential": sequential,
    "tree": tree,
    "independent": independent,
    "hillis_steele": hillis_steele,
    "sklansky": sklansky,
    "brent_kung": brent_kung,
    "chunked": chunked,
}
ALIASES = {"blelloch": "brent_kung", "kogge_stone": "hillis_steele", "ladner_fischer": "sklansky"}


def register_schedule(name: str, builder: Callable[..., Schedule]) -> None:
    """Add a builder ``builder(L, **options) -> Schedule`` under ``name``."""
    SCHEDULES[name] = builder
    build.cache_clear()


def valid_methods() -> list[str]:
    return sorted([*SCHEDULES, *ALIASES, "auto"])


def _check_length(L):
    if isinstance(L, (bool, np.bool_)) or not isinstance(L, (int, np.integer)):
        raise TypeError(f"L must be an int, got {L!r}")
    if L < 1:
        raise ValueError(f"L must be >= 1 (a product needs at least one factor), got {L}")
    return int(L)


@functools.lru_cache(maxsize=256)
def _build_cached(name, L, opts):
    return SCHEDULES[name](L, **dict(opts))


def build(method: str, L: int, **options) -> Schedule:
    """Build (and cache) a named schedule; plans are immutable so reuse is safe."""
    L = _check_length(L)
    name = ALIASES.get(method, method)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule method {method!r}; valid methods: {', '.join(valid_methods())}")
    try:
        return _build_cached(name, L, tuple(sorted(options.items())))
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"schedule {method!r} does not take option(s) {sorted(options)}: {e}") from None
        raise


build.cache_clear = _build_cached.cache_clear  # type: ignore[attr-defined]


def schedule(method, L: int, *, workers: int | None = None, blocks=None, backend: str = "vectorized",
             **options) -> Schedule:
    """Build a schedule by name: the public planning entry point.

    Parameters
    ----------
    method : str or Schedule
        A name from :data:`SCHEDULES` (aliases: ``blelloch``, ``kogge_stone``,
        ``ladner_fischer``), ``"auto"``, or a ready :class:`Schedule`.
    L : int
        Number of factors.
    workers : int, optional
        Workers ``P`` the plan will run on; ``chunked`` then uses ``P + 1``
        chunks (peak width ``P``) and ``auto`` takes it as the cost model's ``P``.
    blocks : optional
        Shapes for ``auto`` (see :meth:`Schedule.flops_per_round`).
    backend : str
        Executor the plan is for (``auto`` costs rounds per backend).
    **options
        Passed to the builder (e.g. ``chunks=``, ``outer=`` for ``chunked``).

    Examples
    --------
    >>> s = schedule("sklansky", 8)
    >>> s.rounds, s.peak_width, s.num_ops
    (3, 4, 12)
    """
    if workers is not None:
        workers = _check_workers(workers)
    if isinstance(method, Schedule):
        if method.length != L:
            raise ValueError(f"schedule {method.name!r} is for L={method.length}, the chain has {L} factors")
        return method
    if callable(method):
        s = method(L, **options)
        if not isinstance(s, Schedule):
            raise TypeError(f"schedule callable returned {type(s).__name__}, expected Schedule")
        return s.validate()
    if not isinstance(method, str):
        raise TypeError(f"method must be a name, a Schedule or a callable, got {method!r}")
    if method == "auto":
        from .cost import choose_schedule  # the cost model sits above schedules

        return choose_schedule(_check_length(L), blocks=blocks, workers=workers, backend=backend)
    if ALIASES.get(method, method) == "chunked" and "chunks" not in options and workers is not None:
        # P workers want P + 1 chunks: chunk 0 scans itself beside the P - 1
        # folds of chunks 1..P-1 (the last chunk's total is never needed), then
        # P chunks run their down-sweeps. With P chunks one worker would idle
        # in each phase, and P = 2 would be backprop order with no parallelism.
        options["chunks"] = workers + 1
    return build(method, L, **options)
