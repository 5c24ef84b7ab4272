"""The activations of the compiled recurrent loops: ``sigmoid`` and ``tanh`` in the argument's type, vectorisable.

:mod:`chainprod.kernels.recurrent_numba_loops` calls :func:`sigmoid` and
:func:`tanh` inside its loops; each compiles to plain arithmetic that LLVM
vectorises (no call into the C library):

- float64: ``e^x`` for ``x <= 0`` (all that ``sigmoid`` and ``tanh`` need:
  ``e^{-|z|}``) as ``2^k e^r``, ``|r| <= ln2 / 2``, the Taylor polynomial
  of ``e^r`` to degree 13 evaluated by Estrin's scheme (its terms in
  parallel: a dependency chain of 8 operations, not 26) and ``2^k`` from
  its bit pattern; ``e^-708`` below ``x = -708`` (a normal number, where
  the exact one is subnormal: an absolute error under 4e-308). ``tanh`` is
  a rational function near 0 (``|x| <= 0.625``, Cephes' fit) and
  ``(1 - e) / (1 + e)``, ``e = e^{-2|x|}``, beyond. Within 4.6e-16
  (relative) of numpy's; 1280 ``tanh`` took 6.5 us against 8.2 us with
  an ``exp`` that builds ``2^k`` from an int64, which AVX2 cannot convert
  in vectors (``exp_neg_f64`` and ``tanh_f64`` of :mod:`.numba_math`, which
  the chain kernels' ``tanh`` uses too);
- float32: the ``tanh`` of Eigen's float32 kernels (``tanh_f32`` of
  :mod:`.numba_math`), an odd rational
  function (a degree-13 numerator over a degree-6 denominator in ``x``)
  of ``x`` clamped to ``[-7.905, 7.905]``: no ``exp``, no integer
  arithmetic, one division; within 3e-7 of ``tanh`` (about 2.5 units in
  the last place of 1, where it is largest, near ``|x| = 5.8``; relative
  error 3e-7 near 0), and ``sigmoid(z) = tanh(z / 2) / 2 + 1 / 2`` from it
  (within 3e-7, absolute). 1280 values took 0.94 us against 1.86 us with
  an ``exp`` of degree 7 (float32, one thread, under load).

LSTM gates use :func:`gate`: ``sigmoid`` or ``tanh`` by a per-gate
coefficient, so the four gates of a step are one loop.

Every function passes a NaN through. Importing this module imports numba.
numba's on-disk cache keys a compiled function on its own file only: after
editing this module, delete the cached loops
(``chainprod/kernels/__pycache__/recurrent_numba_loops.*.nb[ic]``), or
they keep the old code.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import exp_neg_f64, single, tanh_f32, tanh_f64

__all__ = ["gate", "padded", "sigmoid", "tanh"]


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f32(z):
    half = np.float32(0.5)
    return half * tanh_f32(half * z) + half


@njit(cache=True, inline="always", error_model="numpy")
def _gate_f32(v, c):
    h = np.float32(0.5) * c  # 0.5: sigmoid(v) = tanh(v / 2) / 2 + 1 / 2; 1: tanh(v)
    return h * tanh_f32(h * v) + (np.float32(1.0) - h)


@njit(cache=True, inline="always", error_model="numpy")
def _gate_f64(v, c):
    return c * _sigmoid_f64(c * v) - (c - 1.0)  # c = 2: tanh(v) = 2 sigmoid(2 v) - 1


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f64(z):
    e = exp_neg_f64(-abs(z))
    d = 1.0 / (1.0 + e)
    return d if z >= 0.0 else e * d


# One function per activation for both dtypes: each branch is typed for both, and the one not taken is
# dropped once compiled; the result is cast back to the argument's type (the float64 branch, typed for a
# float32, would return a float64). @overload would do the same, but LLVM then left the float64 bodies as
# calls, one per value (no vector loop), or numba warned while inlining them.
@njit(cache=True, inline="always", error_model="numpy")
def sigmoid(z):
    """``1 / (1 + e^-z)`` in ``z``'s type (compiled code only)."""
    if single(z):
        return type(z)(_sigmoid_f32(z))
    return type(z)(_sigmoid_f64(z))


@njit(cache=True, inline="always", error_model="numpy")
def tanh(x):
    """``tanh(x)`` in ``x``'s type (compiled code only)."""
    if single(x):
        return type(x)(tanh_f32(x))
    return type(x)(tanh_f64(x))


@njit(cache=True, inline="always", error_model="numpy")
def gate(v, c):
    """An LSTM gate in ``v``'s type: ``sigmoid(v)`` for ``c = 1``, ``tanh(v)`` for ``c = 2`` (compiled code only)."""
    if single(v):
        return type(v)(_gate_f32(v, c))
    return type(v)(_gate_f64(v, c))


@njit(cache=True, inline="always")
def padded(n):
    """``n`` rounded up to a multiple of 16.

    The loops that compute ``tanh`` run over this many values of a scratch
    array (the extra ones are zeros or stale, finite, and unused): LLVM's
    vector loop takes 16 float32 values at a time and leaves a shorter loop
    (``H = 8`` at ``N = 1``) or a loop's last ``n % 16`` values to scalar
    code, one ``exp`` at a time (forward steps at ``N = 1``, ``H = 20``, float32,
    measured under load: the tanh RNN's 0.28 -> 0.20 us, the LSTM's 0.39 -> 0.34 us).
    """
    sixteen = type(n)(16)  # n's own integer type: an unsigned n stays unsigned
    return (n + (sixteen - type(n)(1))) // sixteen * sixteen
