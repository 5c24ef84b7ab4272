"""The compiled elementwise rules: each activation and its derivative, by integer code.

The codes are those of :data:`chainprod.kernels.ACT_CODES` (0 identity,
1 tanh, 2 relu, 3 sigmoid, 4 softplus); the rules are the ones tabled in
:mod:`chainprod.activations`. Importing this module imports numba.

Two forms:

- scalar rules :func:`activate` and :func:`derivative` (one value, the code
  tested per call), for loops that need one value at a time;
- block rules :func:`bias_act`, :func:`delta_rows` and :func:`deriv_rows`,
  which test the code *once* and then run a loop specialised to that one
  activation. Every kernel's inner loops use these: a chain whose
  activations change from layer to layer then costs what its uniform parts
  cost (one branch per layer, not per element).

Fewest transcendental functions that keep each rule exact and overflow-free:

==========  ========================================================  ==================
name        ``f(z)``                                                  ``f'`` from ``y``
==========  ========================================================  ==================
tanh        ``tanh(z)`` (1: one ``exp``; float32 0: a rational fit)   ``1 - y^2``
relu        ``z if not z < 0 else 0`` (a select; NaN stays NaN)       ``y > 0``
sigmoid     ``e = exp(-|z|)``; ``1/(1+e)`` or ``e/(1+e)`` (1)         ``y (1 - y)``
softplus    ``max(z, 0) + log1p(exp(-|z|))`` (2)                      ``-expm1(-y)`` (1)
==========  ========================================================  ==================

The transcendental functions are those of :mod:`.numba_math`: plain
arithmetic that LLVM vectorises (the C library's, which numba would call,
take 10-15 ns a value), accurate to a few units in the last place. For the
same reason every function here is compiled with ``error_model="numpy"``
(a division is IEEE arithmetic, not a check that could raise), and
non-finite outputs are counted with a select (``n += 1 if v - v != 0``: an
integer sum vectorises, a floating-point one would not).

Every constant takes the value's own type (``type(z)(1.0)``): a float32
chain is computed in float32 throughout (a bare ``1.0`` would promote each
operation to float64 and back).

numba's on-disk cache keys a compiled function by its own source file only:
after changing a rule here, clear the ``__pycache__`` of this package so the
kernels that inline it are compiled again.
"""

from __future__ import annotations

from numba import njit

from . import numba_math

__all__ = ["activate", "bias_act", "delta_rows", "derivative", "deriv_rows", "sigmoid", "softplus"]


@njit(cache=True, inline="always", error_model="numpy")
def softplus(z):
    """``log(1 + e^z)`` without overflow: ``max(z, 0) + log1p(exp(-|z|))``."""
    zero = type(z)(0.0)
    m = z if z > zero else zero
    return m + numba_math.log1p_unit(numba_math.exp(-abs(z)))


@njit(cache=True, inline="always", error_model="numpy")
def sigmoid(z):
    """``1 / (1 + e^-z)`` with one ``exp`` of ``-|z|`` (never overflows) and a select."""
    one = type(z)(1.0)
    e = numba_math.exp(-abs(z))
    return one / (one + e) if z >= type(z)(0.0) else e / (one + e)


@njit(cache=True, inline="always", error_model="numpy")
def _relu(z):
    zero = type(z)(0.0)
    return z if not (z < zero) else zero  # `not (z < 0)` keeps NaN a NaN, as np.maximum does


@njit(cache=True, inline="always", error_model="numpy")
def activate(code, z):
    """``f(z)`` for the activation with code ``code``."""
    if code == 1:
        return numba_math.tanh(z)
    if code == 2:
        return _relu(z)
    if code == 3:
        return sigmoid(z)
    if code == 4:
        return softplus(z)
    return z


@njit(cache=True, inline="always", error_model="numpy")
def derivative(code, y):
    """``f'(z)`` from the output ``y = f(z)``, for the activation with code ``code``."""
    one = type(y)(1.0)
    zero = type(y)(0.0)
    if code == 1:
        return one - y * y
    if code == 2:
        return one if y > zero else zero
    if code == 3:
        return y * (one - y)
    if code == 4:
        return -numba_math.expm1(-y)
    return one


@njit(cache=True, error_model="numpy")
def bias_act(code, y, b, nr, d):
    """``y <- f(y + b)`` over ``nr`` rows of ``d`` (``y`` flat, ``b`` of length ``d``).

    Returns ``chk``: the number of outputs that are not finite (0 when all are).
    """
    zero = y.dtype.type(0.0)
    chk = 0
    if code == 1:
        for r in range(nr):
            yr = y[r * d:(r + 1) * d]
            for i in range(d):
                v = numba_math.tanh(yr[i] + b[i])
                yr[i] = v
                chk += 1 if v - v != zero else 0
    elif code == 2:
        for r in range(nr):
            yr = y[r * d:(r + 1) * d]
            for i in range(d):
                v = _relu(yr[i] + b[i])
                yr[i] = v
                chk += 1 if v - v != zero else 0
    elif code == 3:
        for r in range(nr):
            yr = y[r * d:(r + 1) * d]
            for i in range(d):
                v = sigmoid(yr[i] + b[i])
                yr[i] = v
                chk += 1 if v - v != zero else 0
    elif code == 4:
        for r in range(nr):
            yr = y[r * d:(r + 1) * d]
            for i in range(d):
                v = softplus(yr[i] + b[i])
                yr[i] = v
                chk += 1 if v - v != zero else 0
    else:
        for r in range(nr):
            yr = y[r * d:(r + 1) * d]
            for i in range(d):
                v = yr[i] + b[i]
                yr[i] = v
                chk += 1 if v - v != zero else 0
    return chk


@njit(cache=True, inline="always", error_model="numpy")  # measured: 13% off batch-1 backprop at w=8
def delta_rows(code, v, y, delta, n):
    """``delta = v * f'(y)`` over ``n`` entries; returns how many are not finite."""
    zero = delta.dtype.type(0.0)
    one = delta.dtype.type(1.0)
    chk = 0
    if code == 1:
        for k in range(n):
            d = v[k] * (one - y[k] * y[k])
            delta[k] = d
            chk += 1 if d - d != zero else 0
    elif code == 2:
        for k in range(n):
            d = v[k] * (one if y[k] > zero else zero)
            delta[k] = d
            chk += 1 if d - d != zero else 0
    elif code == 3:
        for k in range(n):
            d = v[k] * (y[k] * (one - y[k]))
            delta[k] = d
            chk += 1 if d - d != zero else 0
    elif code == 4:
        for k in range(n):
            d = v[k] * -numba_math.expm1(-y[k])
            delta[k] = d
            chk += 1 if d - d != zero else 0
    else:
        for k in range(n):
            d = v[k] * one
            delta[k] = d
            chk += 1 if d - d != zero else 0
    return chk


@njit(cache=True, error_model="numpy")
def deriv_rows(code, y, s, n):
    """``s = f'(y)`` over ``n`` entries."""
    zero = s.dtype.type(0.0)
    one = s.dtype.type(1.0)
    if code == 1:
        for k in range(n):
            s[k] = one - y[k] * y[k]
    elif code == 2:
        for k in range(n):
            s[k] = one if y[k] > zero else zero
    elif code == 3:
        for k in range(n):
            s[k] = y[k] * (one - y[k])
    elif code == 4:
        for k in range(n):
            s[k] = -numba_math.expm1(-y[k])
    else:
        for k in range(n):
            s[k] = one
