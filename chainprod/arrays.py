"""Which array library an input belongs to, and the few helpers that let one code path serve them all.

chainprod computes on numpy arrays by default. torch tensors (CPU or CUDA),
JAX arrays and CuPy arrays are *foreign*: they run on the ``"array"``
executor, written once against the array API standard through
``array_api_compat``, and results come back in the input's library, on its
device, in its dtype.

Asking which library an array belongs to imports nothing: the answer comes
from the module of the array's type (``torch``, ``jaxlib``/``jax``,
``cupy``), so ``import chainprod`` never imports torch or JAX. Only
:func:`namespace` and the conversions import an engine, lazily.

>>> import numpy as np
>>> library_of(np.ones(3)), is_foreign(np.ones(3), None, [1.0, 2.0])
('numpy', False)
>>> common_library({"A": np.ones((2, 2)), "h0": None})
'numpy'
"""

from __future__ import annotations

import numpy as np

__all__ = ["FOREIGN", "library_of", "describe", "is_foreign", "common_library", "namespace", "device_of",
           "on_accelerator", "to_device_like", "to_numpy", "is_jax", "set_rows", "dtype_name"]

#: the libraries the array executor serves besides numpy
FOREIGN = ("torch", "jax", "cupy")

_PREFIXES = (("torch", "torch"), ("jaxlib", "jax"), ("jax", "jax"), ("cupy", "cupy"))
_NOUNS = {"numpy": "a numpy array", "torch": "a torch tensor", "jax": "a JAX array", "cupy": "a CuPy array",
          "python": "a Python value"}
_MISSING = "the array path needs the package array-api-compat: pip install 'chainprod[array]'"


def _type_library(x) -> str | None:
    """The library of one object by the module of its type, ``None`` for neutral Python values."""
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    mod = type(x).__module__ or ""
    for prefix, name in _PREFIXES:
        if mod == prefix or mod.startswith(prefix + "."):
            return name
    return None


def _items(x):
    """``x`` with ``Diag``-like wrappers (an object with ``.values``) and lists looked through."""
    if isinstance(x, (list, tuple)):
        for item in x:
            yield from _items(item)
    elif hasattr(x, "values") and not isinstance(x, (np.ndarray, dict)) and _type_library(x) is None:
        yield from _items(x.values)
    else:
        yield x


def library_of(x) -> str:
    """``"numpy"``, ``"torch"``, ``"jax"`` or ``"cupy"``: the library ``x`` computes in.

    numpy arrays and scalars, Python numbers and lists of them are
    ``"numpy"``; a ``chainprod.Diag`` (anything with ``.values``) and a list
    are looked through, and a list is the library of its first foreign item
    (:func:`common_library` is the check that they agree).
    """
    return _first_foreign(x) or "numpy"


def _first_foreign(x):
    """The library of the first torch / JAX / CuPy array in ``x`` (lists and ``Diag`` looked into), else None.

    The plain numpy cases cost a type check each: this runs on every input of every call.
    """
    t = type(x)
    if t is np.ndarray or t is float or t is int or x is None:
        return None
    if isinstance(x, (list, tuple)):
        for item in x:
            if type(item) is not np.ndarray:
                lib = _first_foreign(item)
                if lib is not None:
                    return lib
        return None
    lib = _type_library(x)
    if lib is None and hasattr(x, "values") and not isinstance(x, dict):
        return _first_foreign(x.values)
    return None if lib == "numpy" else lib


def describe(x) -> str:
    """``x``'s library as a noun for messages: ``"a torch tensor"``, ``"a numpy array"``, ..."""
    libs = [_type_library(item) for item in _items(x)]
    lib = next((v for v in libs if v not in (None, "numpy")), "numpy" if "numpy" in libs else "python")
    return _NOUNS[lib]


def is_foreign(*xs) -> bool:
    """True if any argument (``None`` ignored, ``Diag`` and lists looked through) is torch, JAX or CuPy."""
    return any(_first_foreign(x) is not None for x in xs)


def common_library(named: dict) -> str:
    """The one library of all non-``None`` values of ``named`` (argument name -> value).

    Lists are looked into (their items are named ``name[i]``) and ``Diag``
    looked through. Python numbers and lists of them never count as mixing;
    numpy arrays beside torch tensors do.

    Raises
    ------
    TypeError
        Two libraries in one call, naming both arguments, e.g. ``mats[0] is a
        torch tensor and mats[3] a numpy array: pass arrays of one library``.
    """
    seen: dict[str, str] = {}  # library -> the first argument name that holds it
    for name, value in named.items():
        if value is None:
            continue
        parts = [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) \
            else [(name, value)]
        for part, v in parts:
            for item in _items(v):
                lib = _type_library(item)
                if lib is None or (lib == "numpy" and isinstance(item, np.generic)):
                    continue  # Python and numpy scalars go with any library
                if lib not in seen:
                    seen[lib] = part
                if len(seen) > 1:
                    (l1, n1), (l2, n2) = list(seen.items())[:2]
                    article = _NOUNS[l2].split(" ", 1)
                    raise TypeError(f"{n1} is {_NOUNS[l1]} and {n2} {article[0]} {article[1]}: pass arrays of "
                                    "one library (convert with the library's own asarray / from_numpy)")
    return next(iter(seen), "numpy")


def namespace(x):
    """The array API namespace of ``x`` (``jax.numpy`` for JAX arrays), via ``array_api_compat``.

    Raises ``ImportError`` saying what to ``pip install`` when
    ``array_api_compat`` is missing.
    """
    for item in _items(x):
        if _type_library(item) == "jax":
            import jax.numpy as jnp  # jax.numpy is itself an array API namespace
            return jnp
        if _type_library(item) is not None:
            x = item
            break
    try:
        import array_api_compat
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return array_api_compat.array_namespace(x)


def device_of(x):
    """The device ``x`` lives on (``"cpu"`` for numpy), as its library names it."""
    x = next(iter(_items(x)))
    if _type_library(x) in (None, "numpy"):
        return "cpu"
    try:
        import array_api_compat
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return array_api_compat.device(x)


def on_accelerator(x) -> bool:
    """True if ``x`` lives on a GPU or another accelerator (never for numpy; always for CuPy)."""
    lib = library_of(x)
    if lib == "numpy":
        return False
    if lib == "cupy":
        return True
    dev = device_of(x)
    if lib == "torch":
        return dev.type != "cpu"
    return getattr(dev, "platform", "cpu") != "cpu"


def _xp_dtype(xp, dtype):
    """The namespace's dtype of the same name as numpy ``dtype`` (e.g. ``xp.int64``)."""
    return getattr(xp, np.dtype(dtype).name)


def to_device_like(a, like, dtype=None):
    """``a`` (numpy or any array) as an array of ``like``'s library, on ``like``'s device.

    ``dtype``: a numpy dtype (e.g. ``np.int64`` for index arrays), converted to
    the library's dtype of that name; ``None`` keeps ``like``'s dtype. A numpy
    ``like`` gives a numpy array.
    """
    lib = library_of(like)
    like = next(iter(_items(like)))
    if lib == "numpy":
        return np.asarray(a, dtype=np.asarray(like).dtype if dtype is None else dtype)
    xp = namespace(like)
    dt = like.dtype if dtype is None else _xp_dtype(xp, dtype)
    if lib == "torch":
        import torch
        a = np.asarray(a) if isinstance(a, (list, tuple)) else a
        if isinstance(a, np.ndarray) and (not a.flags.writeable or any(s < 0 for s in a.strides)):
            a = np.array(a)  # torch shares a numpy array's memory: a read-only or reversed view is copied
        return torch.as_tensor(a, dtype=dt, device=like.device)
    if lib == "jax":
        import jax
        return jax.device_put(xp.asarray(a, dtype=dt), device_of(like))
    return xp.asarray(a, dtype=dt, device=device_of(like))


def to_numpy(x) -> np.ndarray:
    """A numpy copy of ``x`` on the host: for error messages and tests, never on a hot path."""
    if library_of(x) == "torch":
        return x.detach().cpu().numpy()
    if library_of(x) == "cupy":
        return x.get()
    return np.asarray(x)


def is_jax(x) -> bool:
    """True for a JAX array or the ``jax.numpy`` namespace: immutable, so updates are functional."""
    name = getattr(x, "__name__", None)
    if isinstance(name, str) and type(x).__name__ == "module":
        return name == "jax.numpy" or name.startswith("jax.")
    return _type_library(x) == "jax"


def set_rows(xp, arr, index, value):
    """``arr[index] = value``, returning the updated array.

    In place for numpy, torch and CuPy; for JAX (immutable) the functional
    ``arr.at[index].set(value)``, a new array. Callers always use the return
    value, so one code path serves both.
    """
    if is_jax(xp):
        return arr.at[index].set(value)
    arr[index] = value
    return arr


def dtype_name(dtype) -> str:
    """``"float64"`` for numpy's, torch's (``torch.float64``) and JAX's float64 alike: for messages."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        return np.dtype(dtype).name
    return str(dtype).rpartition(".")[2]
