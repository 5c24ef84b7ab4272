"""The registry of recurrent kernel sets: the sequential part of RNN, GRU and LSTM layers.

A recurrent kernel set is a module providing exactly ``forward`` and
``backward`` (the contract, with the equations and what each array holds, is
the docstring of :mod:`chainprod.kernels.recurrent_numpy`, the numpy
reference). Two are registered by name:

``"numba"``
    Compiled (:mod:`chainprod.kernels.recurrent_numba`); needs
    ``pip install numba``.
``"numpy"``
    The plain reference (:mod:`chainprod.kernels.recurrent_numpy`), the
    fallback without numba.

``import chainprod.kernels.recurrent`` imports neither numba nor the
compiled module; :func:`get_recurrent_kernels` loads a set on first use.
"""

from __future__ import annotations

import importlib
import importlib.util

from .._caches import register_cache

__all__ = ["RECURRENT_KERNELS", "default_recurrent_kernels", "get_recurrent_kernels"]

#: registered recurrent kernel sets, in order of preference
RECURRENT_KERNELS = ("numba", "numpy")

# name -> (module, the package it needs or None)
_MODULES = {"numba": ("chainprod.kernels.recurrent_numba", "numba"),
            "numpy": ("chainprod.kernels.recurrent_numpy", None)}

#: sets already loaded, by name (emptied by ``chainprod.clear_caches()``)
_LOADED: dict = {}
register_cache(_LOADED.clear)
# the default, once known: whether the compiled set imports is asked once per process
_DEFAULT: list = []
register_cache(_DEFAULT.clear)


def get_recurrent_kernels(name: str = "numba"):
    """The recurrent kernel set registered as ``name`` (a module with ``forward`` and ``backward``).

    Raises
    ------
    ValueError
        ``name`` is not registered (the message lists the valid names).
    ImportError
        ``"numba"`` without numba installed (the message says
        ``pip install numba``).
    """
    loaded = _LOADED.get(name) if isinstance(name, str) else None
    if loaded is not None:
        return loaded
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"unknown recurrent kernels {name!r}; valid kernels: {', '.join(RECURRENT_KERNELS)}")
    module, needs = _MODULES[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise ImportError(f"kernels={name!r} needs {needs}, which is not installed: pip install {needs} "
                          f"(or use kernels='numpy')")
    loaded = _LOADED[name] = importlib.import_module(module)
    return loaded


def default_recurrent_kernels() -> str:
    """``"numba"`` when numba is installed and the compiled set imports, else ``"numpy"``.

    Asked once per process (``chainprod.clear_caches()`` asks again).
    """
    if not _DEFAULT:
        try:
            get_recurrent_kernels("numba")
            _DEFAULT.append("numba")
        except ImportError:  # numba missing, or the compiled module is not there
            _DEFAULT.append("numpy")
    return _DEFAULT[0]
