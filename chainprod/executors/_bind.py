"""Binding a schedule to block shapes: where every value lives, which kernel runs.

A schedule speaks of slots and intervals; arrays have kinds and shapes.
Binding joins the two once per (schedule, shapes) pair and is cached, so
repeated runs pay nothing for it:

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

import functools
from typing import NamedTuple

import numpy as np

from ..blocks import COMBINE, KINDS, BlockSeq, kind_table
from ..schedules import Schedule

__all__ = ["BoundPlan", "Group", "bind", "as_index"]


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
    kind: str
    rows: int  # logical block rows
    cols: int
    count: int  # number of stored blocks

    def shape(self, batch):
        return (self.count, batch, *KINDS[self.kind].shape(self.rows, self.cols))


class BoundPlan(NamedTuple):
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


def bind(schedule: Schedule, blocks: BlockSeq) -> BoundPlan:
    """Bind ``schedule`` to the kinds and shapes of ``blocks`` (cached)."""
    if schedule.length != len(blocks):
        raise ValueError(f"schedule is for L={schedule.length} factors, got {len(blocks)} blocks")
    return _bind_cached(schedule, blocks.signature())


@functools.lru_cache(maxsize=64)
def _bind_cached(schedule: Schedule, signature: tuple) -> BoundPlan:
    kind_names, table = kind_table()
    counts = [count for _, count, _, _ in signature]
    kind_of_pos = np.repeat([kind_names.index(k) for k, _, _, _ in signature], counts)
    rows = np.repeat([r for _, _, r, _ in signature], counts).astype(np.int64)
    cols = np.repeat([c for _, _, _, c in signature], counts).astype(np.int64)
    L = schedule.length
    big = int(max(rows.max(), cols.max())) + 1

    def sig(kind, i, j):  # signature code of an interval [i, j] of the given kind id
        return (kind * big + rows[i]) * big + cols[j]

    # Replay: the kind (via the combine table) and signature each slot holds over time.
    pos = np.arange(L)
    slot_kind = np.full(schedule.n_slots, -1, dtype=np.int64)
    slot_kind[:L] = kind_of_pos
    slot_sig = np.full(schedule.n_slots, -1, dtype=np.int64)
    slot_sig[:L] = slot_sig_init = sig(slot_kind[:L], pos, pos)
    ivals = schedule.intervals()
    per_round = []
    for (i, _, j), st in zip(ivals, schedule.steps):
        ko = table[slot_kind[st.left], slot_kind[st.right]]
        so = sig(ko, i, j)
        per_round.append((slot_sig[st.left], slot_sig[st.right], so))
        slot_kind[st.out] = ko
        slot_sig[st.out] = so
    # Slab keys: (signature, region); region 1 = scratch slots.
    region = (np.arange(schedule.n_slots) >= L).astype(np.int64)

    def key(code, slots):
        return code * 2 + region[slots]

    holders: dict[int, list[np.ndarray]] = {}
    init_keys = key(slot_sig_init, pos)
    for kk in np.unique(init_keys):
        holders.setdefault(int(kk), []).append(np.flatnonzero(init_keys == kk))
    for (_, _, so), st in zip(per_round, schedule.steps):
        ko = key(so, st.out)
        for kk in np.unique(ko):
            holders.setdefault(int(kk), []).append(st.out[ko == kk])
    slot_lists = []
    slabs = []
    for kk in sorted(holders):
        slots = np.unique(np.concatenate(holders[kk]))
        slot_lists.append(slots)
        code = kk // 2
        c, r, kind = code % big, (code // big) % big, kind_names[code // big // big]
        slabs.append(Slab(kind, int(r), int(c), int(slots.size)))

    sorted_keys = np.array(sorted(holders), dtype=np.int64)  # slab id = rank of its key

    def locate(codes, slots):
        sid = np.searchsorted(sorted_keys, key(codes, slots))
        row = np.empty_like(slots)
        for s in np.unique(sid):
            m = sid == s
            row[m] = np.searchsorted(slot_lists[s], slots[m])
        return sid, row

    rounds = []
    for (sl, sr, so), st in zip(per_round, schedule.steps):
        lsid, lrow = locate(sl, st.left)
        rsid, rrow = locate(sr, st.right)
        osid, orow = locate(so, st.out)
        combo = np.stack([lsid, rsid, osid])
        groups = []
        for ls, rs, os_ in np.unique(combo, axis=1).T:
            m = (lsid == ls) & (rsid == rs) & (osid == os_)
            # Sort by out row so that slices come out ascending where possible.
            order = np.argsort(orow[m], kind="stable")
            li, ri, oi = lrow[m][order], rrow[m][order], orow[m][order]
            kernel = COMBINE[(slabs[ls].kind, slabs[rs].kind)].kernel
            aliased = bool((ls == os_ and np.intersect1d(li, oi).size)
                           or (rs == os_ and np.intersect1d(ri, oi).size))
            groups.append(Group(kernel, int(ls), as_index(li), int(rs), as_index(ri),
                                int(os_), as_index(oi), int(oi.size), aliased))
        rounds.append(tuple(groups))
    # Inputs: each segment's positions.
    placement = []
    p0 = 0
    for _kind, count, _r, _c in signature:
        pos = np.arange(p0, p0 + count)
        sid, row = locate(slot_sig_init[pos], pos)
        assert np.all(sid == sid[0]), "a segment has one kind and shape"
        placement.append((int(sid[0]), as_index(row)))
        p0 += count
    # Outputs.
    out_slab = np.full(L, -1, dtype=np.int64)
    out_row = np.full(L, -1, dtype=np.int64)
    ks = np.flatnonzero(schedule.outputs >= 0)
    if ks.size:
        slots = schedule.outputs[ks]
        out_slab[ks], out_row[ks] = locate(slot_sig[slots], slots)
    return BoundPlan(schedule, tuple(slabs), tuple(placement), tuple(rounds), out_slab, out_row)
