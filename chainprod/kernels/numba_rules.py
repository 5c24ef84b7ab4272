"""The compiled elementwise rules: each activation and its derivative, by integer code.

The codes are those of :data:`chainprod.kernels.ACT_CODES` (0 identity,
1 tanh, 2 relu, 3 sigmoid, 4 softplus); the rules are the ones tabled in
:mod:`chainprod.activations`, one scalar at a time, so that compiled loops
(:mod:`chainprod.kernels.numba_kernels`, :mod:`chainprod.kernels.scan`) can
inline them. Importing this module imports numba.

numba's on-disk cache keys a compiled function by its own source file only:
after changing a rule here, clear the ``__pycache__`` of this package so the
kernels that inline it are compiled again.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["activate", "derivative"]


@njit(cache=True)
def _softplus(z):
    # logaddexp(0, z) without overflow: max(z, 0) + log1p(exp(-|z|))
    m = z if z > 0.0 else 0.0
    return m + math.log1p(math.exp(-abs(z)))


@njit(cache=True)
def activate(code, z):
    """``f(z)`` for the activation with code ``code``."""
    if code == 1:
        return math.tanh(z)
    if code == 2:
        # `not (z < 0)` keeps NaN a NaN, as np.maximum(z, 0) does
        return z if not (z < 0.0) else 0.0
    if code == 3:
        return math.exp(-_softplus(-z))  # overflow-free for both signs of z
    if code == 4:
        return _softplus(z)
    return z


@njit(cache=True)
def derivative(code, y):
    """``f'(z)`` from the output ``y = f(z)``, for the activation with code ``code``."""
    if code == 1:
        return 1.0 - y * y
    if code == 2:
        return 1.0 if y > 0.0 else 0.0
    if code == 3:
        return y * (1.0 - y)
    if code == 4:
        return -math.expm1(-y)
    return 1.0
