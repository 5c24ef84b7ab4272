"""Whole-chain kernels: forward, backprop and parameter VJPs in one call per chain.

A chain is first packed into flat arrays (:func:`pack`, layout in
:mod:`chainprod.kernels.pack`); a *kernel set* then runs the whole chain in
one call, whatever its mix of activations, widths and layer kinds. Two
implementations of exactly the same functions are registered by name:

``"numba"``
    Compiled (``numba.njit``, cached on disk): a fraction of a microsecond
    per layer of a narrow chain. Each dense product runs as a fused loop
    or in BLAS by its size in multiply-adds, from a crossover measured by
    ``chainprod calibrate`` (:mod:`chainprod.kernels.crossover`); float32
    chains are computed in float32. Needs ``pip install numba`` (and scipy,
    whose BLAS numba calls; without it every product is a loop).
``"numpy"``
    The plain reference: numpy calls, one layer at a time. The compiled set
    is tested against it, and it is the fallback without numba.

Every kernel set provides the same functions, with one signature and one
meaning (the full contracts, and the math, are in
:mod:`chainprod.kernels.numpy_kernels`); a worker or an executor needs
nothing else:

- ``forward(pc, x) -> (Y, bad)``: every layer's output, a flat tape
- ``backprop(pc, x, Y, cotangent) -> (grads, bad)``: sequential backprop from
  ``cotangent = dloss/dy_{L-1}``
- ``backprop_with_row(pc, x, Y, cotangent) -> (grads, row_in, bad)``: the same
  loop, also returning the row leaving the chain's bottom, ``dloss/dx``,
  ``(N, d_in[0])``; ``grads`` equal ``backprop``'s bit for bit
- ``chunk_product(pc, Y, N) -> T``: the Jacobian product ``A_{L-1} ... A_0``
  per sample, ``(N, d_out[L-1], d_in[0])``
- ``param_grads(pc, x, Y, V) -> (grads, bad)``: parameter gradients from
  given rows ``V``
- ``derivatives(pc, Y) -> S``: ``act'(y)`` of every layer
- ``all_finite(a) -> bool``: no NaN or infinity in a flat gradient or tape

>>> import numpy as np, chainprod as cp
>>> from chainprod.kernels import get_kernels, pack, unpack_grads
>>> chain = cp.mlp([3, 4, 1])
>>> pc, x = pack(chain), np.ones((2, 3))
>>> k = get_kernels("numpy")
>>> Y, bad = k.forward(pc, x)
>>> grads, bad = k.backprop(pc, x, Y, np.ones((2, 1)))
>>> [g.shape for g in unpack_grads(pc, grads)[0]]
[(4, 3), (4,)]

``import chainprod.kernels`` never imports numba; only ``get_kernels("numba")``
does.
"""

from __future__ import annotations

import importlib
import importlib.util

from .._caches import register_cache
from .pack import (
    ACT_CODES,
    ACT_NAMES,
    KIND_CODES,
    KIND_NAMES,
    LayerGrads,
    PackedChain,
    first_nonfinite_layer,
    layer_rows,
    pack,
    unpack_grads,
    unpack_rows,
)
from .recurrent import get_recurrent_kernels

__all__ = ["ACT_CODES", "ACT_NAMES", "KERNELS", "KERNEL_REVISION", "KIND_CODES", "KIND_NAMES", "LayerGrads",
           "PackedChain", "default_kernels", "first_nonfinite_layer", "get_kernels", "get_recurrent_kernels",
           "layer_rows", "pack", "unpack_grads", "unpack_rows"]

#: Registered kernel sets, in order of preference.
KERNELS = ("numba", "numpy")

#: Raised whenever the compiled kernels' costs change (2: loops or BLAS by size, vectorised
#: activations; 3: runs of diagonal layers in one loop), so that what was measured with older
#: kernels (``auto``'s choices) is measured again.
KERNEL_REVISION = 3

# name -> (module, the package it needs or None)
_MODULES = {"numba": ("chainprod.kernels.numba_kernels", "numba"),
            "numpy": ("chainprod.kernels.numpy_kernels", None)}


def get_kernels(name: str = "numba"):
    """The kernel set registered as ``name`` (a module with the kernel functions).

    Raises
    ------
    ValueError
        ``name`` is not registered (the message lists :data:`KERNELS`).
    ImportError
        The set needs a package that is not installed (the message says what
        to ``pip install``).
    """
    loaded = _LOADED.get(name) if name.__class__ is str else None
    if loaded is not None:
        # asking importlib whether the package is installed costs microseconds: as much as a
        # backward pass on a short chain, so a set is looked up once per process
        return loaded
    if not isinstance(name, str) or name not in _MODULES:
        raise ValueError(f"unknown kernels {name!r}; valid kernels: {', '.join(KERNELS)}")
    module, needs = _MODULES[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise ImportError(f"kernels={name!r} needs {needs}, which is not installed: pip install {needs} "
                          f"(or use kernels='numpy')")
    loaded = _LOADED[name] = importlib.import_module(module)
    return loaded


#: kernel sets already loaded, by name (emptied by ``chainprod.clear_caches()``)
_LOADED: dict = {}
register_cache(_LOADED.clear)


def default_kernels() -> str:
    """``"numba"`` when numba is importable, else ``"numpy"`` (does not import numba)."""
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"
