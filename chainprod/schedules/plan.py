"""The plan type: a schedule as rounds of slot ops, its replay and its costs.

A :class:`Schedule` is pure data built from sizes alone. This module holds
the type, the symbolic replay that proves a plan correct, and the flop
counts from real block shapes; the builders are in
:mod:`chainprod.schedules.builders`, the registry in :mod:`chainprod.schedules`.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from ..blocks import COMBINE, BlockSeq, BlockSpec, kind_table
from ..errors import ScheduleError

__all__ = ["Schedule", "Round", "ScheduleInfo", "BlockSpecArrays", "block_spec", "sequential_flops",
           "check_workers", "make_round", "kinded_rounds", "prefix_kind_ids", "round_flops"]


class Round(NamedTuple):
    """The ops of one round as three aligned integer arrays of slots."""

    left: np.ndarray
    right: np.ndarray
    out: np.ndarray

    def __len__(self):  # number of ops, not of fields
        return int(self.out.shape[0])


def make_round(left, right, out) -> Round:
    """A read-only :class:`Round` from three sequences of slots."""
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

    @property
    def key(self) -> tuple:
        """A plain, hashable description of the whole plan, for caches downstream.

        ``(name, length, n_slots, digest)``, the digest taken over every
        round and the outputs; equal plans have equal keys whoever built
        them, so bound plans are cached by value, never by object identity.
        """
        key = self.__dict__.get("_key")
        if key is None:
            h = hashlib.blake2b(digest_size=16)
            for st in self.steps:
                for a in st:
                    h.update(a.tobytes())
                h.update(b"|")
            h.update(self.outputs.tobytes())
            key = (self.name, self.length, self.n_slots, h.hexdigest())
            self.__dict__["_key"] = key
        return key

    def __getstate__(self):  # plans travel to Ray/Dask workers; a mappingproxy does not pickle
        state = dict(self.__dict__)
        state["options"] = dict(self.options)
        state.pop("_key", None)
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
        spec = block_spec(blocks, self.length)
        return [round_flops(spec, i, k, j, kl, kr) for i, k, j, kl, kr in kinded_rounds(self, spec)]

    def flops(self, blocks=None) -> float:
        """Total flops per batch element (see :meth:`flops_per_round`)."""
        return float(self.flops_per_round(blocks).sum())

    def brent_bound(self, workers: int, blocks=None) -> float:
        """Brent's bound ``T_P <= W/P + D`` in flop-time units.

        ``W`` is the total flops and ``D`` the sum over rounds of the
        largest single op (the critical path when every round is a barrier).
        """
        workers = check_workers(workers)
        work = depth = 0.0
        for f in self.op_flops(blocks):
            work += float(f.sum())
            depth += float(f.max())
        return work / workers + depth

    def describe(self, blocks=None, workers=None) -> ScheduleInfo:
        """A printable summary (see :class:`ScheduleInfo`)."""
        return ScheduleInfo(self, blocks, workers)


def check_workers(workers):
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


class BlockSpecArrays(NamedTuple):
    kind_names: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    kind_ids: np.ndarray  # per position, index into blocks.kind_table()[0]


def kinded_rounds(s: Schedule, spec: BlockSpecArrays):
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


def block_spec(blocks, length) -> BlockSpecArrays:
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
    return BlockSpecArrays(kinds, rows, cols, kind_ids)


def round_flops(spec: BlockSpecArrays, i, k, j, kl, kr) -> np.ndarray:
    """Flops of each op ``[i,k] (x) [k+1,j]`` from the combine table.

    ``kl``/``kr`` are the kind ids of the two operands (from a kinded replay,
    :func:`kinded_rounds`).
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
        spec = block_spec(blocks, sched.length)
        self.round_flops = sched.flops_per_round(blocks)
        self.flops = float(self.round_flops.sum())
        seq = sequential_flops(spec)
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


def prefix_kind_ids(spec: BlockSpecArrays) -> np.ndarray:
    """Kind id of every prefix ``[0, p]``, folded along the positions with the combine table."""
    _, table = kind_table()
    table, ids = table.tolist(), spec.kind_ids.tolist()
    pref = [ids[0]] if ids else []
    for p in range(1, len(ids)):
        pref.append(table[pref[-1]][ids[p]])
    return np.array(pref, dtype=np.int64)


def sequential_flops(spec: BlockSpecArrays) -> float:
    """Flops of the sequential (backprop-order) scan over ``spec``, per batch element."""
    L = len(spec.rows)
    if L < 2:
        return 0.0
    pref = prefix_kind_ids(spec)
    j = np.arange(1, L)
    return float(round_flops(spec, np.zeros_like(j), j - 1, j, pref[:-1], spec.kind_ids[1:]).sum())
