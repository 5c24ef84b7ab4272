"""Input checks at the API boundary: say what is wrong and where, early."""

from __future__ import annotations

import math
import warnings

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_float_array(a, what: str, *, ndim=None, allow_nonfinite=False) -> np.ndarray:
    """``a`` as a float32/float64 array, checked; never copies or modifies a good array."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{what}: masked arrays are not supported (the mask would be ignored); pass "
                        "a.filled(value) or a plain array")
    if isinstance(a, np.matrix):
        arr = np.asarray(a)  # a plain 2-D array: a matrix would turn row slices and products into 2-D
    elif isinstance(a, np.ndarray):
        arr = a
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:  # ragged lists and the like
            raise TypeError(f"{what}: cannot be read as an array ({e})") from None
    if arr.dtype.kind == "f" and not arr.dtype.isnative and arr.dtype.itemsize in (4, 8):
        arr = arr.astype(arr.dtype.newbyteorder("="))  # e.g. '>f8' read from a file
    if arr.dtype == object:
        raise TypeError(f"{what}: dtype object is not supported; use float32 or float64")
    if arr.dtype not in FLOAT_DTYPES:
        names = {"b": "bool", "i": "integer", "u": "unsigned integer", "c": "complex"}
        kind = names.get(arr.dtype.kind, str(arr.dtype))
        raise TypeError(
            f"{what}: dtype {arr.dtype} ({kind}) is not supported; use float32 or float64 "
            f"(e.g. np.asarray(x, dtype=np.float64))"
        )
    if ndim is not None and arr.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{what}: expected {ndim} dimension(s), got shape {arr.shape}")
    if arr.size == 0 or 0 in arr.shape:
        raise ValueError(f"{what}: has a zero-size dimension (shape {arr.shape})")
    if not allow_nonfinite and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{what}: contains NaN or infinity (first at index {tuple(int(i) for i in bad)})")
    return arr


def check_workers(workers, *, allow_none=True):
    """``None`` (when allowed) or a positive int: the one check of every ``workers=`` argument."""
    if workers is None and allow_none:
        return None
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)):
        raise TypeError(f"workers must be a positive int{' or None' if allow_none else ''}, got {workers!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return int(workers)


def check_timeout(timeout):
    """``None`` or ``inf``: no timeout; else a positive number of seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)) \
            or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds (or None / float('inf') for no "
                         f"timeout), got {timeout!r}")
    if math.isinf(timeout):
        return None  # engines take a finite number of seconds; inf means what None means
    return float(timeout)


def check_retries(retries):
    """An int ``>= 0``: how often a task whose worker died is re-run."""
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return int(retries)


def renamed_argument(where: str, new_name: str, new, old_name: str, old):
    """The value of an argument passed under its new name, or under its deprecated old one (warns).

    Passing both is a ``TypeError``; the old name keeps working for one
    release, with a ``DeprecationWarning`` that says what replaces it.
    """
    if old is None:
        return new
    if new is not None:
        raise TypeError(f"{where}() got both {new_name} and its deprecated old name {old_name}; "
                        f"pass {new_name} only")
    warnings.warn(f"{where}({old_name}=...) is deprecated; the argument is now called {new_name}=",
                  DeprecationWarning, stacklevel=3)
    return old


def check_learning_rate(lr):
    """``lr`` as a finite Python float: the one check of every ``sgd_step(..., lr)``.

    Any real number type is accepted (``1``, ``np.int64(1)``, ``np.float32``);
    an int too large for a float, NaN or infinity is a ``ValueError``.
    """
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, (int, float, np.integer, np.floating)):
        raise TypeError(f"lr must be a real number, got {lr!r} ({type(lr).__name__})")
    try:
        value = float(lr)
    except OverflowError:
        raise ValueError(f"lr must be a finite number, got an int of {len(str(abs(int(lr))))} digits, too "
                         "large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"lr must be a finite number, got {lr!r}")
    return value
