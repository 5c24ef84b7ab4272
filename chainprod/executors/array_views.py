"""Row patterns that are views: a round's gathers and scatters without a copy, in any array library.

A bound plan gives each group of a round its row indices as slices
(arithmetic progressions) or integer arrays. Many of the arrays are regular
in two levels: Sklansky's round ``r`` writes rows in blocks of ``2^r``
consecutive rows every ``2^(r+1)`` rows, and reads, for each block, one row
that precedes it. Seen as a grid of ``nblk`` blocks by ``blk`` rows, such
rows are views of the slab:

* :class:`Grid`: rows ``base + off + j * stride + k`` (block ``j``, row ``k``)
  are ``slab[base : base + nblk * stride]`` reshaped to ``(nblk, stride, ...)``
  and cut to ``[:, off : off + blk]``;
* :class:`Bcast`: one row per block, ``start + j * stride``, is a strided
  slice with an axis of length 1 that broadcasts over the block.

A group whose out rows form a grid then runs as one kernel on
``(nblk, blk, N, ...)`` operands (the combine kernels take any leading axes)
and writes its result into the out slab's view: no gather, no scatter, as the
vectorized executor's ``out=`` does for slices. :func:`split_group` finds
these patterns once per plan; what does not fit (the rows of a last, shorter
block) stays a separate op with plain rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..planning.bind import as_index

__all__ = ["Grid", "Bcast", "split_group", "operand"]


class Grid(NamedTuple):
    """Rows ``base + off + j * stride + k`` for ``j < nblk``, ``k < blk``, as a view ``(nblk, blk, ...)``."""

    base: int
    nblk: int
    stride: int
    off: int
    blk: int

    def view(self, xp, slab):
        part = slab[self.base:self.base + self.nblk * self.stride]
        return xp.reshape(part, (self.nblk, self.stride, *part.shape[1:]))[:, self.off:self.off + self.blk]


class Bcast(NamedTuple):
    """One row ``start + j * stride`` per block ``j < nblk``, as a view ``(nblk, 1, ...)``."""

    start: int
    nblk: int
    stride: int

    def view(self, xp, slab):
        return slab[self.start:self.start + (self.nblk - 1) * self.stride + 1:self.stride][:, None]


def _rows(ix, n):
    if isinstance(ix, slice):
        step = ix.step or 1
        return np.arange(ix.start, ix.start + n * step, step)
    return np.asarray(ix)


def _pattern(rows, nblk, blk, length):
    """``rows`` (``nblk * blk`` of them) as a :class:`Grid` or :class:`Bcast` of a slab of ``length`` rows, or None."""
    x = rows.reshape(nblk, blk)
    starts = x[:, 0]
    stride = int(starts[1] - starts[0])
    if stride <= 0 or np.any(np.diff(starts) != stride):
        return None
    if np.all(x == starts[:, None]):
        return Bcast(int(starts[0]), nblk, stride)
    if stride < blk or not np.all(x == starts[:, None] + np.arange(blk)):
        return None
    base = min(int(starts[0]), length - nblk * stride)  # the view's rows must lie inside the slab
    off = int(starts[0]) - base
    if base < 0 or off + blk > stride:
        return None
    return Grid(base, nblk, stride, off, blk)


def split_group(li, ri, oi, n, lengths):
    """One group's rows as ops ``(li, ri, oi, shape, size)``: a grid part and the rest.

    ``lengths`` are the row counts of the left, right and out slabs. When the
    out rows open with blocks of consecutive rows at a regular stride, the
    first ``nblk * blk`` ops become one op on views (``shape = (nblk, blk)``;
    a left or right operand that is no view keeps its rows, gathered and
    reshaped to the grid) and the remaining rows, if any, one more op with
    plain rows (``shape = None``). Otherwise the group is one plain op.
    """
    plain = [(li, ri, oi, None, n)]
    if isinstance(oi, slice) or n < 4:
        return plain
    o = np.asarray(oi)
    breaks = np.flatnonzero(np.diff(o) != 1)
    blk = int(breaks[0]) + 1 if breaks.size else n
    nblk = n // blk
    if blk < 2 or nblk < 2:
        return plain
    m = nblk * blk
    out = _pattern(o[:m], nblk, blk, lengths[2])
    if not isinstance(out, Grid):
        return plain
    specs = []
    for ix, length in ((li, lengths[0]), (ri, lengths[1])):
        rows = _rows(ix, n)[:m]
        specs.append(_pattern(rows, nblk, blk, length) or rows)
    ops = [(specs[0], specs[1], out, (nblk, blk), m)]
    if m < n:
        ops.append((as_index(_rows(li, n)[m:]), as_index(_rows(ri, n)[m:]), as_index(o[m:]), None, n - m))
    return ops


def operand(xp, slab, spec, shape, take):
    """The operand ``spec`` selects from ``slab``: a view (slice, :class:`Grid`, :class:`Bcast`) or gathered
    rows (``take(slab, rows)``), reshaped to the grid ``shape`` when there is one."""
    if isinstance(spec, (Grid, Bcast)):
        return spec.view(xp, slab)
    a = slab[spec] if isinstance(spec, slice) else take(slab, spec)
    return a if shape is None else xp.reshape(a, (*shape, *a.shape[1:]))
