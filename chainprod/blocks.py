"""Jacobian block types and their algebra.

A *block* is one factor of a chain product. Every block carries a leading
batch axis ``N`` (one chain per sample), so the stored array of a

* ``dense`` block is ``(N, rows, cols)``,
* ``diag`` block is ``(N, d)`` and stands for ``(N, d, d)`` with that
  diagonal (elementwise layers, linear recurrences, state-space models).

The algebra lives in one table, :data:`COMBINE`, one rule per line in the
spirit of autograd's ``defvjp``: for each ordered pair of kinds it gives the
kind of the product, the batched kernel and the flop count. A new structured
Jacobian (banded, low rank, ...) is a kind in :data:`KINDS` and its rows in
:data:`COMBINE`; schedules and executors need no change.

Every kernel works on *stacks* of blocks: any number of leading axes before
the batch axis, so one numpy call combines a whole round of a schedule.
``combine(left, right) == left @ right`` with ``left`` the earlier factor in
scan order; the operation is associative and not commutative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "KINDS",
    "COMBINE",
    "Diag",
    "BlockSpec",
    "Segment",
    "BlockSeq",
    "combine",
    "product_kind",
    "kind_table",
    "op_flops",
]


@dataclass(frozen=True)
class Kind:
    """A block type: its name and how many trailing axes its array has."""

    name: str
    block_ndim: int

    def shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Trailing shape of one stored block with this logical shape."""
        return (rows, cols) if self.block_ndim == 2 else (rows,)


KINDS: dict[str, Kind] = {
    "dense": Kind("dense", 2),
    "diag": Kind("diag", 1),
}


def _dense_dense(a, b, out=None):
    return np.matmul(a, b, out=out)


def _dense_diag(a, b, out=None):  # scale the columns of a
    return np.multiply(a, b[..., None, :], out=out)


def _diag_dense(a, b, out=None):  # scale the rows of b
    return np.multiply(a[..., :, None], b, out=out)


def _diag_diag(a, b, out=None):
    return np.multiply(a, b, out=out)


class Rule(NamedTuple):
    """How to combine a ``left`` block of one kind with a ``right`` of another."""

    out: str
    kernel: Callable
    #: flops per batch element for ``(rows x inner) @ (inner x cols)``
    flops: Callable[[int, int, int], int]
    #: the cost model's op class: ``"matmul"`` (a BLAS product: ``mm``, or ``mv``
    #: for the thin head) or ``"elementwise"`` (memory-bound over the output)
    cost: str = "matmul"


COMBINE: dict[tuple[str, str], Rule] = {
    ("dense", "dense"): Rule("dense", _dense_dense, lambda r, k, c: 2 * r * k * c, "matmul"),
    ("dense", "diag"): Rule("dense", _dense_diag, lambda r, k, c: r * c, "elementwise"),
    ("diag", "dense"): Rule("dense", _diag_dense, lambda r, k, c: r * c, "elementwise"),
    ("diag", "diag"): Rule("diag", _diag_diag, lambda r, k, c: r, "elementwise"),
}


def kind_table():
    """``(names, table)``: kind names in a fixed order and the ``K x K`` array of
    product kind ids, ``table[a, b]`` = id of the kind of ``a @ b``. Lets planners
    follow kinds through a whole schedule with one lookup per round."""
    names = sorted(KINDS)
    table = np.full((len(names), len(names)), -1, dtype=np.int64)
    for (a, b), rule in COMBINE.items():
        table[names.index(a), names.index(b)] = names.index(rule.out)
    return names, table


def product_kind(kinds) -> str:
    """Kind of the product of blocks of the given kinds (in any order)."""
    out = None
    for k in kinds:
        out = k if out is None else COMBINE[(out, k)].out
    if out is None:
        raise ValueError("the product of no blocks has no kind")
    return out


def combine(left_kind: str, left, right_kind: str, right, out=None):
    """``left @ right`` for stacks of blocks of the given kinds."""
    return COMBINE[(left_kind, right_kind)].kernel(left, right, out=out)


def op_flops(left_kind: str, right_kind: str, rows: int, inner: int, cols: int) -> int:
    """Flops of one combine per batch element, from the table."""
    return COMBINE[(left_kind, right_kind)].flops(rows, inner, cols)


class Diag:
    """Marks an array as the diagonal of a diagonal block.

    ``Diag(a)`` with ``a`` of shape ``(d,)`` stands for ``np.diag(a)``;
    ``(N, d)`` is a batch of ``N`` such blocks. Pass it wherever a matrix
    is accepted (for example in :func:`chainprod.suffix_products`); products
    of diagonal blocks come back as :class:`Diag` too.
    """

    __slots__ = ("values",)

    def __init__(self, values):
        self.values = values

    @property
    def shape(self):
        """Logical shape: ``(d, d)`` or ``(N, d, d)``."""
        s = np.shape(self.values)
        return (*s, s[-1]) if len(s) else s

    def todense(self) -> np.ndarray:
        """The full matrix (or stack of matrices) this block stands for."""
        v = np.asarray(self.values)
        eye = np.eye(v.shape[-1], dtype=v.dtype)
        return v[..., :, None] * eye

    def __array__(self, dtype=None, copy=None):
        d = self.todense()
        return d if dtype is None else d.astype(dtype)

    def __repr__(self):
        return f"Diag({self.values!r})"


class BlockSpec(NamedTuple):
    """Logical description of one block: kind and ``rows x cols``."""

    kind: str
    rows: int
    cols: int


class Segment(NamedTuple):
    """``n`` consecutive blocks of one kind and shape, stacked.

    ``array`` has shape ``(n, N, rows, cols)`` (dense) or ``(n, N, d)`` (diag).
    """

    kind: str
    array: np.ndarray

    @property
    def count(self) -> int:
        return self.array.shape[0]

    @property
    def spec(self) -> BlockSpec:
        if KINDS[self.kind].block_ndim == 2:
            return BlockSpec(self.kind, self.array.shape[-2], self.array.shape[-1])
        d = self.array.shape[-1]
        return BlockSpec(self.kind, d, d)


class BlockSeq:
    """The factors of a chain product in scan order, as stacked segments.

    This is what executors consume: a few big arrays rather than ``L`` small
    ones, so a vectorised executor can work on them without restacking.
    ``owned=True`` says the arrays belong to chainprod and may be
    overwritten in place (never set for arrays a user passed in).
    """

    def __init__(self, segments, *, owned: bool = False):
        self.segments = list(segments)
        if not self.segments:
            raise ValueError("a chain product needs at least one block")
        batch = {s.array.shape[1] for s in self.segments}
        dtypes = {s.array.dtype for s in self.segments}
        if len(batch) != 1:
            raise ValueError(f"all blocks need the same batch size, got {sorted(batch)}")
        if len(dtypes) != 1:
            raise TypeError(f"all blocks need the same dtype, got {sorted(map(str, dtypes))}")
        self.batch = batch.pop()
        self.dtype = dtypes.pop()
        self.owned = owned
        self.length = sum(s.count for s in self.segments)

    def _per_position(self, field):
        counts = [s.count for s in self.segments]
        values = [getattr(s.spec, field) for s in self.segments]
        return np.repeat(np.array(values, dtype=object if field == "kind" else np.int64), counts)

    # Per-position logical description, as arrays for vectorised planning
    # (built on demand: executors only need the segment-level signature).
    @property
    def kinds(self) -> np.ndarray:
        return self._per_position("kind")

    @property
    def rows(self) -> np.ndarray:
        return self._per_position("rows")

    @property
    def cols(self) -> np.ndarray:
        return self._per_position("cols")

    def __len__(self):
        return self.length

    def signature(self) -> tuple:
        """Hashable description of kinds and shapes (not values), for caching plans."""
        return tuple((s.kind, s.count, s.spec.rows, s.spec.cols) for s in self.segments)

    def specs(self) -> list[BlockSpec]:
        return [s.spec for s in self.segments for _ in range(s.count)]

    def block(self, p: int) -> tuple[str, np.ndarray]:
        """Kind and ``(N, ...)`` array of the block at scan position ``p``."""
        for s in self.segments:
            if p < s.count:
                return s.kind, s.array[p]
            p -= s.count
        raise IndexError(p)
