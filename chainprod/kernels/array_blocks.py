"""The combine rules of every block kind, written once against the array API.

The same algebra as :data:`chainprod.blocks.COMBINE` (one rule per ordered
pair of kinds; see :mod:`chainprod.blocks` for the layouts and the math),
but each kernel takes the array namespace ``xp`` first and returns a new
array: no ``out=``, no in-place update of an operand, so one body serves
numpy, torch, CuPy and JAX (immutable arrays, and traceable by ``jax.jit``).
``combine(left, right) == left @ right`` with ``left`` the earlier factor in
scan order; for the affine kinds that is the map ``right o left``::

    (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2)

Operands are stacks: any leading axes before the batch axis, so one call
combines every op of a round of a schedule.

>>> import numpy as np
>>> a, b = np.ones((1, 2, 2)), np.full((1, 2), 3.0)
>>> ARRAY_COMBINE[("dense", "diag")](np, a, b)[0].tolist()
[[3.0, 3.0], [3.0, 3.0]]
"""

from __future__ import annotations

from collections.abc import Callable

from ..arrays import is_jax

__all__ = ["ARRAY_COMBINE", "array_kernel"]


def _add_last(xp, res, v):
    """``res`` with ``v`` added to its last column; ``res`` is a fresh array, so mutable ones change in place."""
    if is_jax(xp):
        return res.at[..., -1].add(v)
    res[..., -1] += v
    return res


def dense_dense(xp, a, b):
    return a @ b


def dense_diag(xp, a, b):  # scale the columns of a
    return a * b[..., None, :]


def diag_dense(xp, a, b):  # scale the rows of b
    return a[..., :, None] * b


def diag_diag(xp, a, b):
    return a * b


def affine_affine(xp, a, b):  # b o a: A2 [A1 | b1] = [A2 A1 | A2 b1], then + b2
    return _add_last(xp, b[..., :-1] @ a, b[..., -1])


def affine_affine_diag(xp, a, b):  # b o a with b diagonal: scale the rows of [A1 | b1], then + b2
    d = b.shape[-1] // 2
    return _add_last(xp, b[..., :d, None] * a, b[..., d:])


def affine_diag_affine(xp, a, b):  # b o a with a diagonal: [A2 diag(a1) | A2 b1 + b2]
    d = a.shape[-1] // 2
    A2 = b[..., :-1]
    scaled = A2 * a[..., None, :d]
    shift = (A2 @ a[..., d:, None])[..., 0] + b[..., -1]
    return xp.concat([scaled, shift[..., None]], axis=-1)


def affine_diag_affine_diag(xp, a, b):  # (a2 a1, a2 b1 + b2)
    d = a.shape[-1] // 2
    a2 = b[..., :d]
    return xp.concat([a2 * a[..., :d], a2 * a[..., d:] + b[..., d:]], axis=-1)


#: (left kind, right kind) -> ``kernel(xp, left, right)``; the kinds and products of
#: :data:`chainprod.blocks.COMBINE`, whose flop counts and cost classes apply unchanged
ARRAY_COMBINE: dict[tuple[str, str], Callable] = {
    ("dense", "dense"): dense_dense,
    ("dense", "diag"): dense_diag,
    ("diag", "dense"): diag_dense,
    ("diag", "diag"): diag_diag,
    ("affine", "affine"): affine_affine,
    ("affine", "affine_diag"): affine_affine_diag,
    ("affine_diag", "affine"): affine_diag_affine,
    ("affine_diag", "affine_diag"): affine_diag_affine_diag,
}


def array_kernel(left_kind: str, right_kind: str) -> Callable:
    """The array-API kernel for ``left_kind @ right_kind``; a pair with no rule is a ``ValueError``."""
    try:
        return ARRAY_COMBINE[(left_kind, right_kind)]
    except KeyError:
        raise ValueError(f"no array-API kernel for blocks of kinds {left_kind!r} and {right_kind!r}; kinds with "
                         f"one: {sorted(ARRAY_COMBINE)} (a new kind in chainprod.blocks.COMBINE needs its rule "
                         "here too)") from None
