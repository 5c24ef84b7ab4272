"""The schedule type: rounds of slot ops, and the one replay that gives them meaning.

A *schedule* (:class:`Schedule`) is pure data built from sizes alone.
:func:`replay` is the single definition of what a schedule means: it walks
the rounds on intervals, checks every rule and returns the flat op table
(:class:`Replay`) that :meth:`Schedule.validate` and every planner of
:mod:`chainprod.planning` (the bound plan, the flat plan, the partition)
read. A broken schedule fails there, with one message, whoever asks.

The flop counts from real block shapes are in :mod:`chainprod.schedules.flops`,
the builders in :mod:`chainprod.schedules.builders`, the registry in
:mod:`chainprod.schedules`.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from .._validate import check_workers
from ..errors import ScheduleError
from .flops import ScheduleInfo, block_spec, kinded_rounds, round_flops

__all__ = ["Schedule", "Round", "Replay", "replay", "make_round"]


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
    """A schedule: rounds of combine ops over the slots of ``length`` factors, validated on demand.

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
        # schedules are cached and shared: nothing about them may be mutable
        self.options = MappingProxyType(dict(options or {}))

    @property
    def key(self) -> tuple:
        """A plain, hashable description of the whole schedule, for caches downstream.

        ``(name, length, n_slots, digest)``, the digest taken over every
        round and the outputs; equal schedules have equal keys whoever built
        them, so bound plans, flat plans and partitions are cached by value,
        never by object identity.
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

    def __getstate__(self):  # schedules travel to Ray/Dask workers; a mappingproxy does not pickle
        state = dict(self.__dict__)
        state["options"] = dict(self.options)
        state.pop("_key", None)
        state.pop("_replay", None)  # rebuilt on demand; not worth its bytes on the wire
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
    def intervals(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per round, the read-only arrays ``(i, k, j)``: op combines ``[i, k]`` and ``[k+1, j]`` into ``[i, j]``.

        A view of :func:`replay` (so it raises :class:`ScheduleError` on a broken schedule).
        """
        return replay(self).per_round()

    def validate(self) -> Schedule:
        """Prove the schedule correct by :func:`replay`; return ``self``.

        Raises
        ------
        ScheduleError
            On the first broken rule, naming the round, the op, its slots and their intervals.
        """
        replay(self)
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

        Kinds are followed through the schedule with the combine table of
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
        workers = check_workers(workers, allow_none=False)
        work = depth = 0.0
        for f in self.op_flops(blocks):
            work += float(f.sum())
            depth += float(f.max())
        return work / workers + depth

    def describe(self, blocks=None, workers=None) -> ScheduleInfo:
        """A printable summary (see :class:`ScheduleInfo`)."""
        return ScheduleInfo(self, blocks, workers)


class Replay(NamedTuple):
    """A schedule walked on intervals: its flat op table, every op in run order.

    The ops of round ``r`` are ``round_ptr[r]:round_ptr[r + 1]``; op ``q``
    runs ``slot[out[q]] <- slot[left[q]] (x) slot[right[q]]``, which combines
    ``[i[q], k[q]]`` with ``[k[q]+1, j[q]]`` into ``[i[q], j[q]]``. ``lo`` and
    ``hi`` give the interval every slot holds once the schedule has run
    (``-1`` where a slot stays empty). Every array is read-only: a replay is
    cached on its schedule and shared by every planner.
    """

    round_ptr: np.ndarray  #: int64[rounds + 1]
    left: np.ndarray       #: int64[ops], slot of the left operand
    right: np.ndarray      #: int64[ops], slot of the right operand
    out: np.ndarray        #: int64[ops], slot written
    i: np.ndarray          #: int64[ops]
    k: np.ndarray          #: int64[ops]
    j: np.ndarray          #: int64[ops]
    lo: np.ndarray         #: int64[n_slots]
    hi: np.ndarray         #: int64[n_slots]

    @property
    def n_ops(self) -> int:
        return int(self.out.shape[0])

    @property
    def widths(self) -> np.ndarray:
        """Ops per round."""
        return np.diff(self.round_ptr)

    @property
    def op_round(self) -> np.ndarray:
        """The round of every op."""
        return np.repeat(np.arange(self.round_ptr.shape[0] - 1, dtype=np.int64), self.widths)

    def per_round(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per round, the ``(i, k, j)`` of its ops (views)."""
        p = self.round_ptr.tolist()
        return [(self.i[a:b], self.k[a:b], self.j[a:b]) for a, b in zip(p[:-1], p[1:])]


def replay(schedule: Schedule) -> Replay:
    """Walk ``schedule`` on intervals, check every rule, return its flat op table.

    The one definition of what a schedule means. :meth:`Schedule.validate`
    and the planners of :mod:`chainprod.planning` all call it, so a broken
    schedule fails with the same message whichever of them meets it first.
    The result is cached on the schedule (which is immutable).

    Parameters
    ----------
    schedule : Schedule

    Returns
    -------
    Replay

    Raises
    ------
    ScheduleError
        On the first broken rule in round order, naming the schedule, the
        round, the op (its index within the round), its slots and the
        intervals they hold: a slot outside ``0 .. n_slots-1``, a read of an
        empty slot, operands that are not adjacent intervals, two ops of a
        round writing one slot, an op reading a slot another op of its round
        writes, or ``outputs[k]`` not holding ``[0, k]``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"replay needs a chainprod Schedule, got {type(schedule).__name__}")
    cached = schedule.__dict__.get("_replay")
    if cached is None:
        cached = _walk(schedule)
        schedule.__dict__["_replay"] = cached  # only a schedule that passed is cached
    return cached


#: Rounds up to this many ops are walked op by op on Python lists (cheaper
#: than a dozen numpy calls for a handful of ops; a sequential scan has
#: thousands of one-op rounds); wider rounds are walked with numpy.
_NARROW = 8

#: The rules, in the order the ops of one round are checked.
_RULES = ("range", "empty", "apart", "twice", "crossed")


def _walk(s: Schedule) -> Replay:
    L, S = s.length, s.n_slots
    if S < L:
        raise ScheduleError(f"schedule {s.name!r}: n_slots={S} is fewer than its {L} input slots")
    for r, st in enumerate(s.steps):
        if not st.left.shape == st.right.shape == st.out.shape or st.out.ndim != 1:
            raise ScheduleError(f"schedule {s.name!r}, round {r}: left, right and out must be 1-D and of one "
                                f"length, got shapes {st.left.shape}, {st.right.shape}, {st.out.shape}")
    widths = np.array([len(st) for st in s.steps], dtype=np.int64)
    round_ptr = np.concatenate(([0], np.cumsum(widths))).astype(np.int64)
    n = int(round_ptr[-1])
    slots = tuple(np.concatenate([st[f] for st in s.steps]).astype(np.int64) if n else np.zeros(0, np.int64)
                  for f in range(3))
    left, right, out = slots
    out_of_range = np.zeros(n, dtype=bool)
    for a in slots:
        out_of_range |= (a < 0) | (a >= S)
    # the round of the first op with a slot out of range: the walk stops there, before indexing with it
    range_round = int(np.searchsorted(round_ptr, np.argmax(out_of_range), "right") - 1) if out_of_range.any() \
        else len(s.steps)

    # How this works: ``lo[s], hi[s]`` is the interval slot ``s`` holds (-1:
    # empty). Each round is checked against the state at its start, then
    # applied all at once: its ops read the old state, so none may read or
    # write a slot another op of the round writes. ``owner`` marks, during a
    # wide round, which of its ops writes each slot.
    lo = np.where(np.arange(S) < L, np.arange(S), -1)
    hi = lo.copy()
    i, k, j = (np.empty(n, dtype=np.int64) for _ in range(3))
    owner = np.full(S, -1, dtype=np.int64)
    lists = None  # (lo, hi) as Python lists while walking narrow rounds
    for r in range(len(s.steps)):
        a, b = int(round_ptr[r]), int(round_ptr[r + 1])
        if r == range_round:
            broken = ("range", int(np.argmax(out_of_range[a:b])))
        elif b - a <= _NARROW:
            if lists is None:
                lists = lo.tolist(), hi.tolist()
            broken = _walk_narrow(lists, left[a:b].tolist(), right[a:b].tolist(), out[a:b].tolist(),
                                  i, k, j, a)
        else:
            if lists is not None:
                lo[:], hi[:] = lists
                lists = None
            broken = _walk_wide(lo, hi, owner, left[a:b], right[a:b], out[a:b], i, k, j, a)
        if broken is not None:
            if lists is not None:
                lo[:], hi[:] = lists
            raise ScheduleError(_op_message(s, r, *broken, left[a:b], right[a:b], out[a:b], lo, hi))
    if lists is not None:
        lo[:], hi[:] = lists
    _check_outputs(s, lo, hi)
    for x in (round_ptr, *slots, i, k, j, lo, hi):
        x.setflags(write=False)
    return Replay(round_ptr, *slots, i, k, j, lo, hi)


def _walk_narrow(lists, lf, rt, ot, i, k, j, a):
    """Check and apply one narrow round on Python lists; ``(rule, op)`` of the first broken rule, or None."""
    lo, hi = lists
    w = len(ot)
    for q in range(w):
        if lo[lf[q]] < 0 or lo[rt[q]] < 0:
            return "empty", q
    for q in range(w):
        if hi[lf[q]] + 1 != lo[rt[q]]:
            return "apart", q
    if w > 1:
        last = {z: q for q, z in enumerate(ot)}  # the op of the round that writes each slot (the last one)
        for q in range(w):
            if last[ot[q]] != q:
                return "twice", q
        for q in range(w):
            if last.get(lf[q], q) != q or last.get(rt[q], q) != q:
                return "crossed", q
    vals = [(lo[x], hi[x], hi[y]) for x, y in zip(lf, rt)]
    for q, (vi, vk, vj) in enumerate(vals):
        i[a + q], k[a + q], j[a + q] = vi, vk, vj
        lo[ot[q]], hi[ot[q]] = vi, vj
    return None


def _walk_wide(lo, hi, owner, lf, rt, ot, i, k, j, a):
    """Check and apply one wide round with numpy; ``(rule, op)`` of the first broken rule, or None."""
    llo, lhi, rlo, rhi = lo[lf], hi[lf], lo[rt], hi[rt]
    ids = np.arange(ot.shape[0])
    owner[ot] = ids  # the last op writing each slot
    wl, wr = owner[lf], owner[rt]
    twice = owner[ot] != ids
    owner[ot] = -1
    empty = (llo < 0) | (rlo < 0)
    masks = (empty, ~empty & (lhi + 1 != rlo), twice, ((wl >= 0) & (wl != ids)) | ((wr >= 0) & (wr != ids)))
    for rule, m in zip(_RULES[1:], masks):
        if m.any():
            return rule, int(np.argmax(m))
    b = a + ot.shape[0]
    i[a:b], k[a:b], j[a:b] = llo, lhi, rhi
    lo[ot], hi[ot] = llo, rhi
    return None


def _op_message(s, r, rule, q, lf, rt, ot, lo, hi):
    """What op ``q`` of round ``r`` broke, from the round's slots and the state at its start."""
    at = f"schedule {s.name!r}, round {r}, op {q}"
    x, y, z = int(lf[q]), int(rt[q]), int(ot[q])
    if rule == "range":
        field, sl = next((f, v) for f, v in (("left", x), ("right", y), ("out", z)) if not 0 <= v < s.n_slots)
        return f"{at}: {field} slot {sl} is out of range 0..{s.n_slots - 1}"
    if rule == "empty":
        side, sl = ("left", x) if lo[x] < 0 else ("right", y)
        return (f"{at}: reads {side} slot {sl}, which is empty (a scratch slot holds nothing until an "
                "earlier round writes it)")
    if rule == "apart":
        return (f"{at}: left slot {x} holds [{lo[x]}, {hi[x]}] and right slot {y} holds [{lo[y]}, {hi[y]}]; "
                "they are not adjacent")
    if rule == "twice":
        other = int(np.flatnonzero(ot == z)[-1])
        return f"{at}: writes slot {z}, and op {other} of the same round writes the same slot"
    sl = next(v for v in (x, y) if np.any((ot == v) & (np.arange(ot.shape[0]) != q)))
    other = int(np.flatnonzero(ot == sl)[-1])
    return (f"{at}: reads slot {sl}, which another op of the round (op {other}) writes; the ops of a round "
            "must not depend on one another")


def _check_outputs(s, lo, hi):
    """``outputs[k]`` must be -1 or a slot holding ``[0, k]`` once every round has run."""
    L, S = s.length, s.n_slots
    if s.outputs.shape != (L,):
        raise ScheduleError(f"schedule {s.name!r}: outputs has shape {s.outputs.shape}, expected ({L},)")
    bad = (s.outputs < -1) | (s.outputs >= S)
    if np.any(bad):
        k = int(np.argmax(bad))
        raise ScheduleError(f"schedule {s.name!r}: outputs[{k}] = {int(s.outputs[k])} is neither -1 nor a "
                            f"slot in range 0..{S - 1}")
    ks = np.flatnonzero(s.outputs >= 0)
    sl = s.outputs[ks]
    bad = (lo[sl] != 0) | (hi[sl] != ks)
    if np.any(bad):
        k = int(ks[np.argmax(bad)])
        slot = int(s.outputs[k])
        held = f"holds [{lo[slot]}, {hi[slot]}]" if lo[slot] >= 0 else "is empty"
        raise ScheduleError(f"schedule {s.name!r}: outputs[{k}] (slot {slot}) {held}, expected [0, {k}]")
