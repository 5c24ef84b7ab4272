"""Suffix products and total products of a list of matrices (the scan without a model).

``suffix_products(mats)`` returns ``out[k] = mats[L-1] @ ... @ mats[k]`` for
every ``k``: reversed into scan order (``a_0 = mats[L-1]``), these are the
prefixes of one scan, planned by :func:`chainprod.cost.resolve_schedule` and run by any
executor. Input parsing lives here too: lists of matrices and
:class:`~chainprod.blocks.Diag` blocks become stacked segments with one
C-level copy and one value check per segment.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array, check_workers
from .array_inputs import all_finite, array_backend, chain_break, check_finite_stack, read_array_blocks, reverse
from .arrays import is_foreign, library_of
from .blocks import BlockSeq, Diag, Segment
from .cost import resolve_schedule
from .errors import NonFiniteError
from .executors import get_executor
from .grad import make_trace

__all__ = ["suffix_products", "product", "read_blocks"]


def read_blocks(mats, what="mats"):
    """Validate matrices / Diag blocks -> (BlockSeq in scan order, batched?).

    Cheap per-item checks (kind, dtype, shape) in one pass; the value checks
    (finite) run once per stacked segment, so a list of thousands of small
    matrices costs one stacking copy, not thousands of validations. torch,
    JAX and CuPy arrays (and ``Diag`` of them) are read in their library and
    on their device (:func:`chainprod.array_inputs.read_array_blocks`).
    """
    if is_foreign(mats):
        return read_array_blocks(mats, what)
    if isinstance(mats, np.ndarray) and mats.ndim >= 3 and mats.dtype != object:
        return _read_stacked(mats, what)
    if not isinstance(mats, (list, tuple)):
        raise TypeError(f"{what} must be a list of arrays (or chainprod.Diag), got {type(mats).__name__}")
    if not mats:
        raise ValueError(f"{what} is empty: a product needs at least one matrix")
    if all(type(m) is np.ndarray for m in mats) and len({m.dtype for m in mats}) == 1:
        # The common case, plain matrices of one shape: one C-level copy, already in scan order.
        try:
            stacked = np.array(mats[::-1])
        except ValueError:  # shapes differ: the per-item path says where
            stacked = None
        if stacked is not None and stacked.ndim in (3, 4) and stacked.dtype != object:
            return _read_stacked(stacked, what, scan_order=True)
    items = []
    for k, m in enumerate(mats):
        if isinstance(m, Diag):
            a = _cheap_array(m.values, f"{what}[{k}] (Diag)", (1, 2))
            items.append(("diag", a, a.ndim == 2))
        else:
            a = _cheap_array(m, f"{what}[{k}]", (2, 3))
            items.append(("dense", a, a.ndim == 3))
    dtypes = {a.dtype for _, a, _ in items}
    if len(dtypes) > 1:
        k = next(i for i, it in enumerate(items) if it[1].dtype != items[0][1].dtype)
        raise TypeError(f"mixed dtypes: {what}[0] is {items[0][1].dtype} but {what}[{k}] is {items[k][1].dtype}")
    batches = {a.shape[0] for _, a, b in items if b}
    if len(batches) > 1:
        raise ValueError(f"{what}: batched blocks have different batch sizes {sorted(batches)}")
    batched = bool(batches)
    N = batches.pop() if batched else 1

    def rc(kind, a):
        return (a.shape[-1], a.shape[-1]) if kind == "diag" else a.shape[-2:]

    shapes = [rc(kind, a) for kind, a, _ in items]
    for k in range(1, len(items)):
        (r_prev, c_prev), (r, c) = shapes[k - 1], shapes[k]
        if c != r_prev:
            raise ValueError(chain_break(what, k, r, c, r_prev, c_prev))
    # Scan order: position p holds mats[L-1-p]; group runs of one kind and shape.
    L = len(items)
    segments = []
    p = 0
    while p < L:
        kind, first, _ = items[L - 1 - p]
        q = p + 1
        while q < L and items[L - 1 - q][0] == kind and items[L - 1 - q][1].shape[-2:] == first.shape[-2:] \
                and (kind == "dense" or items[L - 1 - q][1].shape[-1] == first.shape[-1]):
            q += 1
        block_shape = first.shape[-2:] if kind == "dense" else first.shape[-1:]
        stack = np.empty((q - p, N, *block_shape), dtype=first.dtype)
        for i in range(p, q):
            stack[i - p] = items[L - 1 - i][1]  # broadcasts an unbatched block over the batch
        check_finite_stack(stack, [L - 1 - i for i in range(p, q)], what + ("" if kind == "dense" else "|Diag"))
        segments.append(Segment(kind, stack))
        p = q
    return BlockSeq(segments, owned=True), batched


def _cheap_array(m, what, ndim):
    if type(m) is not np.ndarray:  # lists, np.matrix, masked arrays: the checked path
        return as_float_array(m, what, ndim=ndim)
    a = m
    if a.dtype.kind != "f" or a.dtype.itemsize not in (4, 8) or not a.dtype.isnative or a.ndim not in ndim \
            or a.size == 0:
        return as_float_array(a, what, ndim=ndim)  # the slow path says exactly what is wrong
    return a


def _read_stacked(mats, what, scan_order=False):
    """A stacked ``(L, r, c)`` or batched ``(L, N, r, c)`` array: one check, one copy in scan order.

    ``scan_order=True``: ``mats`` is already a private copy, last matrix first.
    """
    a = as_float_array(mats, what, ndim=(3, 4), allow_nonfinite=True)
    L = a.shape[0]
    if L > 1 and a.shape[-1] != a.shape[-2]:
        raise ValueError(f"shapes do not chain: a stacked {what} of shape {a.shape} needs square blocks")
    batched = a.ndim == 4
    a = a if batched else a[:, None]
    stack = a if scan_order else np.ascontiguousarray(a[::-1])
    check_finite_stack(stack, list(range(L - 1, -1, -1)), what)
    return BlockSeq([Segment("dense", stack)], owned=True), batched


def suffix_products(mats, *, method="auto", backend="vectorized", workers=None, return_trace=False,
                    engine_options=None):
    """All suffix products of a list of matrices.

    ``out[k] == mats[L-1] @ mats[L-2] @ ... @ mats[k]`` for ``k = 0 .. L-1``.

    Parameters
    ----------
    mats : list of arrays
        ``A_1 .. A_L``: each ``(d_l, d_{l-1})`` or batched ``(N, d_l, d_{l-1})``
        (unbatched ones are broadcast over the batch). Wrap the diagonal of a
        diagonal block in :class:`chainprod.Diag` (``(d,)`` or ``(N, d)``):
        products of diagonal blocks stay diagonal and come back as ``Diag``.
        torch tensors, JAX arrays and CuPy arrays (one library per call) are
        computed on their device and the products come back in their library,
        device and dtype. Inputs are never modified.
    method, backend, workers, return_trace, engine_options
        As in :func:`grad`. Foreign arrays run on ``backend="array"`` (the
        default for them); another built-in backend given for them is a
        ``TypeError``.

    Returns
    -------
    list
        ``L`` arrays (or ``Diag``), unbatched if every input was.
    """
    seq, batched = read_blocks(mats)
    backend = _route(backend, seq)
    workers = check_workers(workers)
    L = len(seq)
    sched = resolve_schedule(method, L, workers=workers, blocks=seq, backend=backend)
    if not sched.is_scan:
        raise ValueError(f"schedule {sched.name!r} computes only the total product; "
                         "use chainprod.product() or a scan schedule")
    trace = make_trace(return_trace, backend, workers)
    if trace is not None:
        trace.schedule = sched
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, with the range
        result = _executor(backend, engine_options).run(sched, seq, workers=workers, trace=trace,
                                                        **(engine_options or {}))
    _check_finite(result, L)
    stacked = result.stack()
    if stacked is not None:  # one shape: views of one array, made in C
        kind, arr = stacked
        arr = reverse(arr if batched else arr[:, 0])
        out = list(arr) if kind != "diag" else [Diag(a) for a in arr]
    else:
        out = [None] * L
        for p in range(L):
            kind, a = result.block(p)
            a = a if batched else a[0]
            out[L - 1 - p] = Diag(a) if kind == "diag" else a
    return (out, trace) if return_trace else out


def product(mats, *, method="tree", backend="vectorized", workers=None, engine_options=None):
    """The total product ``mats[L-1] @ ... @ mats[0]`` (Q3's balanced tree by default).

    Inputs and backends as in :func:`suffix_products`: foreign arrays give a
    result of their library, device and dtype.
    """
    seq, batched = read_blocks(mats)
    backend = _route(backend, seq)
    sched = resolve_schedule(method, len(seq), workers=workers, blocks=seq, backend=backend)
    if sched.outputs[-1] < 0:
        raise ValueError(f"schedule {sched.name!r} does not produce the total product")
    with np.errstate(over="ignore", invalid="ignore"):
        result = _executor(backend, engine_options).run(sched, seq, workers=check_workers(workers),
                                                        **(engine_options or {}))
    _check_finite(result, len(seq), only_last=True)
    kind, a = result.block(len(seq) - 1)
    a = a if batched else a[0]
    return Diag(a) if kind == "diag" else a


def _route(backend, seq):
    """The backend for blocks of ``seq``'s library (see :func:`chainprod.array_inputs.array_backend`)."""
    like = seq.segments[0].array
    return array_backend(backend, library_of(like)) if is_foreign(like) else backend


def _executor(backend, engine_options):
    """The executor, with ``engine_options`` checked first (a clear error, never a raw keyword clash)."""
    executor = get_executor(backend)
    if engine_options:
        executor.check_options(engine_options)
    return executor


def _check_finite(result, L, only_last=False):
    if only_last:
        bad = None if all_finite(result.block(L - 1)[1]) else L - 1
    else:
        bad = result.first_nonfinite()
    if bad is not None:
        raise NonFiniteError(
            f"non-finite value in the product of mats[{L - 1 - bad}..{L - 1}]: the product overflowed "
            "(inputs are finite)", (L - 1 - bad, L - 1))

