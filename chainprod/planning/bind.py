"""Bound plans: a schedule bound to block shapes, for the numpy executors.

A *schedule* speaks of slots and intervals; arrays have kinds and shapes.
Binding joins the two into a *bound plan* (:class:`BoundPlan`): where every
value lives and which kernel runs. It reads the schedule's ops and intervals
from :func:`~chainprod.schedules.replay` (which also rejects a broken
schedule), once per (schedule, shapes) pair, cached by value
(``Schedule.key`` and the blocks' signature), so repeated runs pay nothing
for it:

* every interval value has a *signature* ``(kind, rows, cols)``;
* values of one signature live in one *slab*, a stacked array
  ``(n_rows, N, *block_shape)``; a slab holds either input-region slots
  (``< L``) or scratch slots, never both, so the regular slot patterns of a
  schedule stay regular row patterns;
* the ops of a round are grouped by (left slab, right slab, out slab): one
  batched kernel call per group. Row indices that form an arithmetic
  progression become slices, so the call works on strided views with no
  gather or scatter copy (all of ``sequential``, ``sklansky``,
  ``brent_kung`` and ``chunked`` with uniform shapes).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._caches import PlanCache
from ..blocks import COMBINE, KINDS, BlockSeq, kind_table
from ..schedules import Schedule, replay

__all__ = ["BoundPlan", "Group", "Slab", "bind", "bind_signature", "as_index"]


class Group(NamedTuple):
    """One batched kernel call: ``slab[out][oi] = kernel(slab[left][li], slab[right][ri])``."""

    kernel: object
    left: int
    li: object
    right: int
    ri: object
    out: int
    oi: object
    size: int
    #: True when ``oi`` also appears as ``li`` or ``ri`` of the same slab (in place)
    aliased: bool


class Slab(NamedTuple):
    """Stacked storage for every value of one ``(kind, rows, cols)`` in one region."""

    kind: str
    rows: int  # logical block rows
    cols: int
    count: int  # number of stored blocks

    def shape(self, batch):
        return (self.count, batch, *KINDS[self.kind].shape(self.rows, self.cols))


class BoundPlan(NamedTuple):
    """A bound plan: a schedule's rounds as batched kernel calls on slabs of one block shape."""

    schedule: Schedule
    slabs: tuple  # of Slab
    #: per input segment: (slab id, row index) where its blocks go
    placement: tuple
    #: per round, a tuple of Group
    rounds: tuple
    #: per output position k: (slab id, row) of the prefix [0, k]; -1 where absent
    out_slab: np.ndarray
    out_row: np.ndarray


def as_index(rows: np.ndarray):
    """A slice when ``rows`` is an arithmetic progression with positive step, else the array."""
    n = rows.size
    if n == 0:
        return slice(0, 0)
    if n == 1:
        return slice(int(rows[0]), int(rows[0]) + 1)
    step = int(rows[1] - rows[0])
    if step > 0 and np.all(np.diff(rows) == step):
        return slice(int(rows[0]), int(rows[-1]) + 1, step)
    return rows


_BOUND = PlanCache(maxsize=64)


def bind(schedule: Schedule, blocks: BlockSeq) -> BoundPlan:
    """Bind ``schedule`` to the kinds and shapes of ``blocks`` (cached by value).

    Raises :class:`~chainprod.errors.ScheduleError` when the schedule breaks a
    rule (from :func:`~chainprod.schedules.replay`).
    """
    if schedule.length != len(blocks):
        raise ValueError(f"schedule is for L={schedule.length} factors, got {len(blocks)} blocks")
    return bind_signature(schedule, blocks.signature())


def bind_signature(schedule: Schedule, signature: tuple) -> BoundPlan:
    """Bind ``schedule`` to a segment signature (as :meth:`BlockSeq.signature`), cached by value."""
    return _BOUND.get((schedule.key, signature), lambda: _bind(schedule, signature))


def _bind(schedule: Schedule, signature: tuple) -> BoundPlan:
    rp = replay(schedule)  # the schedule's rules, and the interval of every op
    kind_names, table = kind_table()
    counts = [count for _, count, _, _ in signature]
    kind_of_pos = np.repeat([kind_names.index(k) for k, _, _, _ in signature], counts)
    rows = np.repeat([r for _, _, r, _ in signature], counts).astype(np.int64)
    cols = np.repeat([c for _, _, _, c in signature], counts).astype(np.int64)
    L = schedule.length
    region = (np.arange(schedule.n_slots) >= L).astype(np.int64)  # 1 = scratch slot

    # Pass 1, replay: the (kind, rows, cols, region) key of every value a
    # slot receives; an interval [i, j] has the rows of i and the cols of j.
    pos = np.arange(L)
    slot_kind = np.full(schedule.n_slots, -1, dtype=np.int64)
    slot_kind[:L] = kind_of_pos
    init_keys = np.stack([kind_of_pos, rows, cols, region[:L]], axis=1)
    written = []  # per round, the (ops, 4) keys of its outputs
    for (i, _, j), st in zip(rp.per_round(), schedule.steps):
        ko = table[slot_kind[st.left], slot_kind[st.right]]
        written.append(np.stack([ko, rows[i], cols[j], region[st.out]], axis=1))
        slot_kind[st.out] = ko
    # One slab per distinct key, numbered in sorted key order.
    all_keys = np.concatenate([init_keys, *written]) if written else init_keys
    slab_keys, slab_of = np.unique(all_keys, axis=0, return_inverse=True)
    slab_of = slab_of.reshape(-1)
    init_sid, out_sids = slab_of[:L], np.split(slab_of[L:], np.cumsum([len(w) for w in written])[:-1])

    # Pass 2: which slab each slot holds over time; a slot's row in a slab is
    # its rank among the slots that ever hold a value of that slab.
    holders = [[] for _ in range(len(slab_keys))]
    for s in np.unique(init_sid):
        holders[s].append(pos[init_sid == s])
    for sids, st in zip(out_sids, schedule.steps):
        for s in np.unique(sids):
            holders[s].append(st.out[sids == s])
    slot_lists = [np.unique(np.concatenate(h)) for h in holders]
    slabs = tuple(Slab(kind_names[k], int(r), int(c), int(sl.size))
                  for (k, r, c, _), sl in zip(slab_keys.tolist(), slot_lists))

    def rows_in(sids, slots):
        row = np.empty_like(slots)
        for s in np.unique(sids):
            m = sids == s
            row[m] = np.searchsorted(slot_lists[s], slots[m])
        return row

    slot_sid = np.full(schedule.n_slots, -1, dtype=np.int64)
    slot_sid[:L] = init_sid
    rounds = []
    for osid, st in zip(out_sids, schedule.steps):
        lsid, rsid = slot_sid[st.left], slot_sid[st.right]
        lrow, rrow, orow = rows_in(lsid, st.left), rows_in(rsid, st.right), rows_in(osid, st.out)
        groups = []
        for ls, rs, os_ in np.unique(np.stack([lsid, rsid, osid]), axis=1).T.tolist():
            m = (lsid == ls) & (rsid == rs) & (osid == os_)
            # Sort by out row so that slices come out ascending where possible.
            order = np.argsort(orow[m], kind="stable")
            li, ri, oi = lrow[m][order], rrow[m][order], orow[m][order]
            kernel = COMBINE[(slabs[ls].kind, slabs[rs].kind)].kernel
            aliased = bool((ls == os_ and np.intersect1d(li, oi).size)
                           or (rs == os_ and np.intersect1d(ri, oi).size))
            groups.append(Group(kernel, ls, as_index(li), rs, as_index(ri), os_, as_index(oi),
                                int(oi.size), aliased))
        rounds.append(tuple(groups))
        slot_sid[st.out] = osid
    # Inputs: each segment's positions (one kind and shape, so one slab).
    placement = []
    p0 = 0
    for count in counts:
        seg = pos[p0:p0 + count]
        placement.append((int(init_sid[p0]), as_index(rows_in(init_sid[seg], seg))))
        p0 += count
    # Outputs.
    out_slab = np.full(L, -1, dtype=np.int64)
    out_row = np.full(L, -1, dtype=np.int64)
    ks = np.flatnonzero(schedule.outputs >= 0)
    if ks.size:
        slots = schedule.outputs[ks]
        out_slab[ks] = slot_sid[slots]
        out_row[ks] = rows_in(out_slab[ks], slots)
    return BoundPlan(schedule, slabs, tuple(placement), tuple(rounds), out_slab, out_row)
