"""Input checks and block reading for torch, JAX and CuPy arrays (the ``"array"`` backend's boundary).

The numpy readers (:func:`chainprod.products.read_blocks`, the recurrence's
``_read``) call here when an input is foreign (:func:`chainprod.arrays.is_foreign`).
Checks run in the input's library, on its device, and say what numpy's say,
word for word: the argument, the index, the shape, the dtype. Only a failing
check reads anything back to the host (one boolean per check otherwise).
:func:`array_backend` is the routing rule every public entry point applies.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array
from .arrays import (
    common_library,
    device_of,
    dtype_name,
    is_foreign,
    library_of,
    namespace,
    to_device_like,
    to_numpy,
)
from .blocks import BlockSeq, Diag, Segment

__all__ = ["ARRAY_BACKEND", "NUMPY_ONLY_BACKENDS", "array_backend", "float_array", "all_finite",
           "nonfinite_index", "check_finite_stack", "chain_break", "read_array_blocks", "reverse"]

#: the backend that runs torch, JAX and CuPy arrays
ARRAY_BACKEND = "array"
#: the built-in backends that compute on numpy arrays only ("vectorized", the default, is rerouted)
NUMPY_ONLY_BACKENDS = ("serial", "threads", "ray", "dask")
_PLURAL = {"torch": "torch tensors", "jax": "JAX arrays", "cupy": "CuPy arrays"}
_KIND_NAMES = {"b": "bool", "i": "integer", "u": "unsigned integer", "c": "complex"}


def array_backend(backend, library: str):
    """The backend that runs inputs of ``library``: foreign arrays on the default go to ``"array"``.

    ``backend`` is returned unchanged for numpy inputs and for foreign
    inputs on ``"array"`` (or an executor object); the default
    ``"vectorized"`` becomes ``"array"`` for foreign inputs.

    Raises
    ------
    TypeError
        A foreign input with a built-in numpy-only backend given explicitly,
        e.g. ``backend 'threads' runs on numpy arrays; torch tensors run on
        backend='array' (the default for them)``.
    """
    if library == "numpy" or not isinstance(backend, str):
        return backend
    if backend == "vectorized":
        return ARRAY_BACKEND
    if backend in NUMPY_ONLY_BACKENDS:
        raise TypeError(f"backend {backend!r} runs on numpy arrays; {_PLURAL.get(library, library + ' arrays')} "
                        f"run on backend={ARRAY_BACKEND!r} (the default for them)")
    return backend


def float_array(x, what: str, *, ndim=None, allow_nonfinite=False):
    """:func:`chainprod._validate.as_float_array` for any library: foreign arrays are checked where they are.

    numpy inputs (and lists) take the numpy check unchanged. A foreign array
    must be float32 or float64, of the given ``ndim``, with no zero-size
    axis, and finite unless ``allow_nonfinite``; the messages are numpy's.
    """
    if not is_foreign(x):
        return as_float_array(x, what, ndim=ndim, allow_nonfinite=allow_nonfinite)
    if isinstance(x, (list, tuple)):
        raise TypeError(f"{what}: a list of {_PLURAL.get(library_of(x), 'arrays')} is not read as one array; "
                        f"stack it first (e.g. torch.stack / jnp.stack)")
    name = dtype_name(x.dtype)
    if name not in ("float32", "float64"):
        try:
            kind = np.dtype(name).kind
        except TypeError:  # bfloat16 and the like: no numpy twin
            kind = "?"
        label = _KIND_NAMES.get(kind, name)
        raise TypeError(f"{what}: dtype {name} ({label}) is not supported; use float32 or float64 "
                        f"(e.g. x.to(torch.float64) or x.astype(jnp.float64))")
    shape = tuple(int(s) for s in x.shape)
    if ndim is not None and len(shape) not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{what}: expected {ndim} dimension(s), got shape {shape}")
    if 0 in shape:
        raise ValueError(f"{what}: has a zero-size dimension (shape {shape})")
    if not allow_nonfinite:
        bad = nonfinite_index(x)
        if bad is not None:
            raise ValueError(f"{what}: contains NaN or infinity (first at index {bad})")
    return x


def all_finite(x) -> bool:
    """No NaN or infinity in ``x`` (any library); one boolean is read back."""
    if not is_foreign(x):
        return bool(np.isfinite(x).all())
    xp = namespace(x)
    return bool(xp.all(xp.isfinite(x)))


def nonfinite_index(x) -> tuple | None:
    """The first index of a NaN or infinity in ``x`` (any library), ``None`` if it is finite."""
    if all_finite(x):
        return None
    mask = ~np.isfinite(to_numpy(x))  # the failing case only: read back to say where
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_finite_stack(stack, indices, what):
    """A NaN or infinity in a stacked segment ``(n, N, ...)``: name the input ``what[indices[i]]`` and where.

    ``what`` may carry a tag after ``|`` (``"mats|Diag"`` -> ``mats[3] (Diag)``).
    """
    if all_finite(stack):
        return
    host = to_numpy(stack)
    ok = np.isfinite(host.reshape(host.shape[0], -1)).all(axis=1)
    i = int(np.flatnonzero(~ok)[0])
    name, _, tag = what.partition("|")
    where = tuple(int(v) for v in np.argwhere(~np.isfinite(host[i]))[0])
    raise ValueError(f"{name}[{indices[i]}]{' (' + tag + ')' if tag else ''}: contains NaN or infinity "
                     f"(first at index {where} of its (batch, ...) block)")


def chain_break(what, k, r, c, r_prev, c_prev) -> str:
    """The message for factors that do not chain at ``what[k]``."""
    return (f"shapes do not chain at {what}[{k}]: {what}[{k}] is {r}x{c} but {what}[{k - 1}] is "
            f"{r_prev}x{c_prev}; out[k] = {what}[L-1] @ ... @ {what}[k] needs {what}[k].shape[-1] == "
            f"{what}[k-1].shape[-2]")


def reverse(a):
    """``a[::-1]`` along the first axis in any library (torch has no negative steps; it copies)."""
    if not is_foreign(a):
        return a[::-1]
    return namespace(a).flip(a, axis=0)


def read_array_blocks(mats, what="mats"):
    """Foreign matrices / ``Diag`` blocks -> (BlockSeq in scan order, batched?), in their library and device.

    As :func:`chainprod.products.read_blocks`: a stacked ``(L, r, c)`` or
    ``(L, N, r, c)`` array, or a list of ``(r, c)`` / ``(N, r, c)`` arrays and
    ``Diag`` of ``(d,)`` / ``(N, d)``; unbatched blocks are broadcast over the
    batch. The segments are new arrays (owned), so the inputs are never
    written. Python numbers or lists among the items are converted to the
    items' library; a numpy array among torch tensors is a ``TypeError``.
    """
    common_library({what: mats} if not isinstance(mats, (list, tuple)) else {what: list(mats)})
    if not isinstance(mats, (list, tuple)):
        if isinstance(mats, Diag):
            raise TypeError(f"{what} must be a list of arrays (or chainprod.Diag), got Diag")
        a = float_array(mats, what, ndim=(3, 4), allow_nonfinite=True)
        L = a.shape[0]
        if L > 1 and a.shape[-1] != a.shape[-2]:
            raise ValueError(f"shapes do not chain: a stacked {what} of shape {tuple(a.shape)} needs square blocks")
        batched = a.ndim == 4
        stack = reverse(a if batched else a[:, None])
        check_finite_stack(stack, list(range(L - 1, -1, -1)), what)
        return BlockSeq([Segment("dense", stack)], owned=True), batched
    if not mats:
        raise ValueError(f"{what} is empty: a product needs at least one matrix")
    items = []
    for k, m in enumerate(mats):
        if isinstance(m, Diag):
            a = float_array(m.values, f"{what}[{k}] (Diag)", ndim=(1, 2), allow_nonfinite=True)
            items.append(["diag", a, a.ndim == 2])
        else:
            a = float_array(m, f"{what}[{k}]", ndim=(2, 3), allow_nonfinite=True)
            items.append(["dense", a, a.ndim == 3])
    like = next(a for _, a, _ in items if is_foreign(a))
    for it in items:
        if not is_foreign(it[1]):  # Python numbers: one value in the items' library
            it[1] = to_device_like(it[1], like)
    first = items[0][1]
    for k, (_, a, _) in enumerate(items):
        if a.dtype != first.dtype:
            raise TypeError(f"mixed dtypes: {what}[0] is {dtype_name(first.dtype)} but {what}[{k}] is "
                            f"{dtype_name(a.dtype)}")
        if str(device_of(a)) != str(device_of(first)):
            raise ValueError(f"mixed devices: {what}[0] is on {device_of(first)} but {what}[{k}] on "
                             f"{device_of(a)}: pass arrays on one device")
    batches = {int(a.shape[0]) for _, a, b in items if b}
    if len(batches) > 1:
        raise ValueError(f"{what}: batched blocks have different batch sizes {sorted(batches)}")
    batched = bool(batches)
    N = batches.pop() if batched else 1

    def rc(kind, a):
        return (int(a.shape[-1]), int(a.shape[-1])) if kind == "diag" else tuple(int(s) for s in a.shape[-2:])

    shapes = [rc(kind, a) for kind, a, _ in items]
    for k in range(1, len(items)):
        (r_prev, c_prev), (r, c) = shapes[k - 1], shapes[k]
        if c != r_prev:
            raise ValueError(chain_break(what, k, r, c, r_prev, c_prev))
    xp = namespace(like)
    L = len(items)
    segments = []
    p = 0
    while p < L:  # scan order: position p holds mats[L-1-p]; runs of one kind and shape
        kind, a0, _ = items[L - 1 - p]
        q = p + 1
        while q < L and items[L - 1 - q][0] == kind and shapes[L - 1 - q] == shapes[L - 1 - p]:
            q += 1
        block_shape = tuple(a0.shape[-2:]) if kind == "dense" else tuple(a0.shape[-1:])
        stack = xp.stack([xp.broadcast_to(items[L - 1 - i][1], (N, *block_shape)) for i in range(p, q)])
        check_finite_stack(stack, [L - 1 - i for i in range(p, q)], what + ("" if kind == "dense" else "|Diag"))
        segments.append(Segment(kind, stack))
        p = q
    return BlockSeq(segments, owned=True), batched
