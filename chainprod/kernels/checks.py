"""Argument checks shared by every kernel set: the same errors whatever the implementation.

Each returns a read-only view of a good array (never a copy unless the array
is not C-contiguous), so a kernel cannot write into what the caller passed,
and the compiled kernels always see one array type per dtype (one
specialization, one cache entry).
"""

from __future__ import annotations

import numpy as np

from .pack import PackedChain


def packed(pc):
    if not isinstance(pc, PackedChain):
        raise TypeError(f"expected a PackedChain (from chainprod.kernels.pack(chain)), got {type(pc).__name__}")
    return pc


def _readonly_view(a):
    if not a.flags.writeable and a.flags.c_contiguous:
        return a  # already what a kernel may see (e.g. the tape's own arrays): no new view per call
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v


def _dtype(pc, a, what):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{what} must be a numpy array of dtype {pc.dtype}, got {type(a).__name__}")
    if a.dtype != pc.dtype:
        raise TypeError(f"{what} is {a.dtype} but the chain's parameters are {pc.dtype}; "
                        f"pass {what}.astype(np.{pc.dtype})")


def batch_input(pc, x, what="x"):
    """``x`` of shape ``(N, d_0)`` with ``N >= 1``, the chain's dtype -> read-only C-contiguous view."""
    _dtype(pc, x, what)
    if x.ndim != 2 or x.shape[1] != pc.width_in or x.shape[0] < 1:
        hint = f"; for one sample pass {what}[None]" if x.ndim == 1 else ""
        raise ValueError(f"{what} must have shape (N, {pc.width_in}) with N >= 1 (layer 0 expects input "
                         f"width {pc.width_in}), got {x.shape}{hint}")
    return _readonly_view(x)


def tape(pc, Y, N, what="Y"):
    """A flat tape of a batch of ``N``: 1-D, length ``N * y_off[L]``."""
    _dtype(pc, Y, what)
    if Y.shape != (pc.tape_size(N),):
        raise ValueError(f"{what} must be a flat tape of shape ({pc.tape_size(N)},) for a batch of {N} "
                         f"(N * y_off[L] = {N} * {int(pc.y_off[-1])}), got {Y.shape}")
    return _readonly_view(Y)


def cotangent_rows(pc, cotangent, N, what="cotangent"):
    """``dloss/dy_{L-1}`` of shape ``(N, d_L)``."""
    _dtype(pc, cotangent, what)
    if cotangent.shape != (N, pc.width_out):
        raise ValueError(f"{what} must have shape (N, d_L) = ({N}, {pc.width_out}) (the last layer outputs "
                         f"width {pc.width_out}), got {cotangent.shape}")
    return _readonly_view(cotangent)


def flat_array(a, what="a"):
    """A 1-D float32/float64 numpy array (any length), as given."""
    if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{what} must be a 1-D float32 or float64 numpy array, got "
                        f"{type(a).__name__}{getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}".rstrip())
    return a


def batch_size(N):
    """A batch size: an int ``>= 1`` (numpy integers too; never a bool or a float)."""
    if isinstance(N, (bool, np.bool_)) or not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be the batch size, an int >= 1, got {N!r}")
    return int(N)


def batch_of_tape(pc, Y, what="Y"):
    """The batch size ``N`` a flat tape was made for."""
    _dtype(pc, Y, what)
    size = int(pc.y_off[-1])
    if Y.ndim != 1 or Y.shape[0] == 0 or Y.shape[0] % size:
        raise ValueError(f"{what} must be a flat tape: 1-D with a length that is a positive multiple of "
                         f"y_off[L] = {size}, got shape {Y.shape}")
    return Y.shape[0] // size


def backward_args(pc, x, Y, rows, rows_are="cotangent"):
    """The checked ``(pc, x, N, Y, rows)`` of a backward kernel.

    ``rows`` is the cotangent ``dloss/dy_{L-1}``, ``(N, d_L)``
    (``rows_are="cotangent"``), or a flat tape of rows in the layout of
    ``Y`` (``rows_are="V"``).
    """
    pc = packed(pc)
    x = batch_input(pc, x)
    N = x.shape[0]
    Y = tape(pc, Y, N)
    rows = cotangent_rows(pc, rows, N) if rows_are == "cotangent" else tape(pc, rows, N, what=rows_are)
    return pc, x, N, Y, rows
