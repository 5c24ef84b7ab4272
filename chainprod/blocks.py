"""Jacobian block types and their algebra.

A *block* is one factor of a chain product. Every block carries a leading
batch axis ``N`` (one chain per sample), so the stored array of a

* ``dense`` block is ``(N, rows, cols)``,
* ``diag`` block is ``(N, d)`` and stands for ``(N, d, d)`` with that
  diagonal (elementwise layers, linear recurrences, state-space models),
* ``affine`` block is ``(N, m, n + 1)`` = ``[A | b]``: the affine map
  ``h -> A h + b`` from ``R^n`` to ``R^m`` (``n = 0``: the constant map
  ``h -> b``, a *state*),
* ``affine_diag`` block is ``(N, 2 d)`` = ``[a | b]``: the affine map
  ``h -> a * h + b`` on ``R^d``.

The two linear kinds stand for the matrices they store. An affine block
stands for the ``(n + 1) x (m + 1)`` matrix ``[[A^T, 0], [b^T, 1]]``, which
acts on the row ``[h^T, 1]`` from the right (the scan's convention: rows
times blocks, earlier factors on the left), so its logical shape is
``rows = n + 1``, ``cols = m + 1``, and ``left @ right`` is the map ``right
o left``: ``(A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2)``. A state is a thin
``1 x (m + 1)`` row, like the head of a gradient chain. Affine and linear
kinds do not mix: :func:`check_kinds` says so when a sequence tries
(``docs/recurrences.md``).

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

from .arrays import device_of, is_foreign, namespace

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
    "check_kinds",
]


@dataclass(frozen=True)
class Kind:
    """A block type: its name, how many trailing axes its array has, and its layout.

    ``layout(rows, cols)`` gives the stored trailing shape of a block that
    stands for a ``rows x cols`` matrix and ``logical(trailing)`` the inverse;
    left out, they are the plain rules: ``(rows, cols)`` for two axes,
    ``(d,)`` for a ``d x d`` block with one axis.
    """

    name: str
    block_ndim: int
    layout: Callable | None = None
    logical: Callable | None = None

    def shape(self, rows: int, cols: int) -> tuple[int, ...]:
        """Trailing shape of one stored block with this logical shape."""
        if self.layout is not None:
            return self.layout(rows, cols)
        return (rows, cols) if self.block_ndim == 2 else (rows,)

    def spec(self, trailing: tuple) -> tuple[int, int]:
        """Logical ``(rows, cols)`` of a stored block with this trailing shape."""
        if self.logical is not None:
            return self.logical(tuple(trailing))
        return (trailing[-2], trailing[-1]) if self.block_ndim == 2 else (trailing[-1], trailing[-1])


# [A | b] of a map R^n -> R^m is (m, n + 1) and stands for an (n + 1) x (m + 1) matrix.
def _affine_layout(rows, cols):
    return (cols - 1, rows)


def _affine_logical(trailing):
    m, n1 = trailing[-2:]
    return (n1, m + 1)


# [a | b] on one axis: a diagonal A costs d numbers, not d * d. One axis (not (2, d)) also tells the
# cost model that its elementwise ops touch about d elements, not (d + 1)^2.
def _affine_diag_layout(rows, cols):
    return (2 * (rows - 1),)


def _affine_diag_logical(trailing):
    d = trailing[-1] // 2
    return (d + 1, d + 1)


KINDS: dict[str, Kind] = {
    "dense": Kind("dense", 2),
    "diag": Kind("diag", 1),
    "affine": Kind("affine", 2, _affine_layout, _affine_logical),
    "affine_diag": Kind("affine_diag", 1, _affine_diag_layout, _affine_diag_logical),
}


def _dense_dense(a, b, out=None):
    return np.matmul(a, b, out=out)


def _dense_diag(a, b, out=None):  # scale the columns of a
    return np.multiply(a, b[..., None, :], out=out)


def _diag_dense(a, b, out=None):  # scale the rows of b
    return np.multiply(a[..., :, None], b, out=out)


def _diag_diag(a, b, out=None):
    return np.multiply(a, b, out=out)


def _into(res, out):
    # Affine kernels take several numpy calls: results are formed first and written last, so an
    # ``out`` that is one of the operands (an in-place circuit) is never read after it is written.
    if out is None:
        return res
    out[...] = res
    return out


def _affine_affine(a, b, out=None):  # b o a: A2 [A1 | b1] = [A2 A1 | A2 b1], then + b2
    if out is not None and not np.may_share_memory(out, b):
        # the common in-place circuit writes over ``a``: matmul buffers that overlap itself
        np.matmul(b[..., :-1], a, out=out)
        out[..., -1] += b[..., -1]
        return out
    res = np.matmul(b[..., :-1], a)
    res[..., -1] += b[..., -1]
    return _into(res, out)


def _affine_affine_diag(a, b, out=None):  # b o a with b diagonal: scale the rows of [A1 | b1], + b2
    d = b.shape[-1] // 2
    res = b[..., :d, None] * a
    res[..., -1] += b[..., d:]
    return _into(res, out)


def _affine_diag_affine(a, b, out=None):  # b o a with a diagonal: [A2 diag(a1) | A2 b1 + b2]
    d = a.shape[-1] // 2
    A2 = b[..., :-1]
    res = np.empty(np.broadcast_shapes(a.shape[:-1], b.shape[:-2]) + b.shape[-2:], np.result_type(a, b))
    np.multiply(A2, a[..., None, :d], out=res[..., :-1])
    res[..., -1] = np.matmul(A2, a[..., d:, None])[..., 0] + b[..., -1]
    return _into(res, out)


def _affine_diag_affine_diag(a, b, out=None):  # (a2 a1, a2 b1 + b2)
    d = a.shape[-1] // 2
    a2 = b[..., :d]
    res = np.concatenate([a2 * a[..., :d], a2 * a[..., d:] + b[..., d:]], axis=-1)
    return _into(res, out)


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
    # Affine blocks: for maps R^n -> R^p (left) and R^p -> R^m (right), (r, k, c) = (n + 1, p + 1, m + 1);
    # the flops of the stored [A | b] arithmetic (a state row, r = 1, costs a matrix-vector product).
    ("affine", "affine"): Rule("affine", _affine_affine,
                               lambda r, k, c: 2 * (c - 1) * (k - 1) * r + (c - 1), "matmul"),
    ("affine", "affine_diag"): Rule("affine", _affine_affine_diag,
                                    lambda r, k, c: (c - 1) * (r + 1), "elementwise"),
    ("affine_diag", "affine"): Rule("affine", _affine_diag_affine,
                                    lambda r, k, c: 3 * (c - 1) * (k - 1) + (c - 1), "elementwise"),
    ("affine_diag", "affine_diag"): Rule("affine_diag", _affine_diag_affine_diag,
                                         lambda r, k, c: 3 * (c - 1), "elementwise"),
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
        out = k if out is None else _rule(out, k).out
    if out is None:
        raise ValueError("the product of no blocks has no kind")
    return out


def _rule(left_kind, right_kind) -> Rule:
    try:
        return COMBINE[(left_kind, right_kind)]
    except KeyError:
        raise ValueError(f"blocks of kinds {left_kind!r} and {right_kind!r} do not combine: the combine table "
                         f"has no rule ({left_kind!r}, {right_kind!r}) (affine and linear kinds do not mix)") from None


def check_kinds(kinds) -> None:
    """Raise ``ValueError`` unless every product of blocks of these kinds has a rule.

    A schedule may combine any interval with any later one, so the kinds
    present and every kind their products make must combine pairwise. This
    refuses, say, a dense block beside an affine one, where a lookup in
    :func:`kind_table` would find no product kind (``-1``).
    """
    have = set(kinds)
    unknown = have - set(KINDS)
    if unknown:
        raise ValueError(f"unknown block kind(s) {sorted(unknown)}; known kinds: {', '.join(sorted(KINDS))}")
    while True:
        made = {_rule(a, b).out for a in sorted(have) for b in sorted(have)}
        if made <= have:
            return
        have |= made


def combine(left_kind: str, left, right_kind: str, right, out=None):
    """``left @ right`` for stacks of blocks of the given kinds (for affine kinds: ``right o left``)."""
    return _rule(left_kind, right_kind).kernel(left, right, out=out)


def op_flops(left_kind: str, right_kind: str, rows: int, inner: int, cols: int) -> int:
    """Flops of one combine per batch element, from the table."""
    return _rule(left_kind, right_kind).flops(rows, inner, cols)


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
        """The full matrix (or stack of matrices) this block stands for, in the values' library and device."""
        if is_foreign(self.values):  # torch / JAX / CuPy values: the matrix stays where they are
            v = self.values
            xp = namespace(v)
            return v[..., :, None] * xp.eye(v.shape[-1], dtype=v.dtype, device=device_of(v))
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

    ``array`` has shape ``(n, N, *KINDS[kind].shape(rows, cols))``: ``(n, N, rows,
    cols)`` (dense), ``(n, N, d)`` (diag), ``(n, N, m, n_in + 1)`` (affine),
    ``(n, N, 2 d)`` (affine_diag).
    """

    kind: str
    array: np.ndarray

    @property
    def count(self) -> int:
        return self.array.shape[0]

    @property
    def spec(self) -> BlockSpec:
        kind = KINDS[self.kind]
        rows, cols = kind.spec(self.array.shape[self.array.ndim - kind.block_ndim:])
        return BlockSpec(self.kind, int(rows), int(cols))


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
        check_kinds({s.kind for s in self.segments})
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
