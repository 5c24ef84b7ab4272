"""Flops of a schedule, counted from real block shapes, and its printable summary.

A schedule itself knows only slots and intervals; the block shapes and
kinds (a :class:`~chainprod.blocks.BlockSeq`, specs, or a width ``w`` for
the usual gradient chain) turn each op ``[i, k] (x) [k+1, j]`` into flops
by the rule of the combine table. :class:`~chainprod.schedules.Schedule`'s
cost methods and the cost model read these helpers; they take a schedule as
any object with ``length``, ``n_slots``, ``steps`` and ``intervals()``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..blocks import COMBINE, BlockSeq, BlockSpec, check_kinds, kind_table

__all__ = ["BlockSpecArrays", "ScheduleInfo", "block_spec", "kinded_rounds", "prefix_kind_ids", "round_flops",
           "sequential_flops"]


class BlockSpecArrays(NamedTuple):
    """Per position: kind name, rows, cols and kind id (an index into ``blocks.kind_table()[0]``)."""

    kind_names: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    kind_ids: np.ndarray


def kinded_rounds(s, spec: BlockSpecArrays):
    """Kinds followed through the schedule's intervals: per round ``(i, k, j, left_kind_id, right_kind_id)``."""
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
    """Per-position kinds and shapes of ``length`` factors from any form of ``blocks``.

    ``blocks`` is a :class:`~chainprod.blocks.BlockSeq`, a list of
    :class:`~chainprod.blocks.BlockSpec` (or ``(kind, rows, cols)`` tuples),
    or an int ``w`` meaning the usual gradient chain: a thin ``1 x w`` head
    followed by dense ``w x w`` blocks. ``None`` uses ``w = 64``.
    """
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
    check_kinds(set(np.unique(kinds).tolist()))  # unknown kinds, and kinds with no product (dense beside affine)
    kind_ids = np.searchsorted(np.array(names, dtype=object), kinds).astype(np.int64)
    return BlockSpecArrays(kinds, rows, cols, kind_ids)


def round_flops(spec: BlockSpecArrays, i, k, j, kl, kr) -> np.ndarray:
    """Flops of each op ``[i,k] (x) [k+1,j]`` from the combine table.

    ``kl``/``kr`` are the kind ids of the two operands (from :func:`kinded_rounds`).
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
    """What a schedule costs, printable: depth, width, work, flops and Brent's bound."""

    def __init__(self, sched, blocks=None, workers=None):
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
