"""Transcendental functions the compiler can vectorise: ``exp``, ``expm1``, ``log1p`` (of ``[0, 1]``), ``tanh``.

numba compiles ``math.tanh`` and ``math.exp`` to calls into the C library,
one value per call: about 15 ns per ``tanh`` here, against 1 ns for
numpy's vectorised ``np.tanh`` (0.3 ns in float32), so on a layer of
``128 x 256`` outputs the activation cost more than its BLAS product. The
functions below are plain arithmetic (a range reduction, a polynomial, a
select, and a bit pattern for ``2^k``), which LLVM vectorises in a loop.

Accuracy (measured against extended precision, ``tests/test_kernel_paths.py``
checks it): within 1-4 units in the last place of the result's dtype over
their whole range, NaN in gives NaN out, overflow gives ``inf`` and
underflow ``0`` as in the C library. One code serves float64 and float32:
every constant takes the argument's type (a float32 argument is computed in
float32, the polynomials then longer than float32 needs), and the bit
patterns of ``2^k`` come from the type (:func:`_pow2`).

========  ===========================================================================
``exp``   ``x = k ln2 + r`` (``|r| <= ln2/2``), Taylor polynomial of ``e^r``
          (degree 13), times ``2^k`` built as two powers of two from their
          bit patterns (so results down to the subnormals come out right)
``expm1`` the Taylor polynomial itself for ``|x| <= ln2/2`` (no cancellation),
          ``exp(x) - 1`` beyond
``log1p`` for ``t`` in ``[0, 1]`` (what ``softplus`` needs): ``u = 1 + t``
          (halved above ``sqrt 2``), ``2 atanh((u-1)/(u+1))`` by its series,
          plus the rounding of ``1 + t`` (``(t - (u - 1)) / u``)
``tanh``  ``-e / (2 + e)`` with ``e = expm1(-2|x|)``, sign restored
========  ===========================================================================

Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["exp", "expm1", "log1p_unit", "tanh"]


_FLOATS = {types.float64: (ir.DoubleType(), ir.IntType(64), 52, 1023),
           types.float32: (ir.FloatType(), ir.IntType(32), 23, 127)}


@intrinsic
def _emax(typingctx, x):
    """The largest binary exponent of a normal number of ``x``'s type (1023 or 127), a constant."""
    if x not in _FLOATS:
        return None
    emax = _FLOATS[x][3]
    return types.int64(x), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), emax)


@intrinsic
def _pow2(typingctx, x, e):
    """``2^e`` in ``x``'s type, built from its bit pattern (``e`` an int64 within the normal exponents)."""
    if x not in _FLOATS or e != types.int64:
        return None
    fty, ity, shift, bias = _FLOATS[x]

    def codegen(context, builder, sig, args):
        biased = builder.add(args[1], ir.Constant(ir.IntType(64), bias))
        bits = builder.shl(builder.trunc(biased, ity) if ity.width < 64 else biased, ir.Constant(ity, shift))
        return builder.bitcast(bits, fty)

    return x(x, e), codegen


@njit(inline="always", error_model="numpy")
def _series(r):
    """``(e^r - 1 - r) / r^2`` as its Taylor polynomial to ``r^11 / 13!`` (Horner, in ``r``'s type)."""
    T = type(r)
    p = T(1.6059043836821613e-10)
    p = p * r + T(2.08767569878681e-09)
    p = p * r + T(2.505210838544172e-08)
    p = p * r + T(2.755731922398589e-07)
    p = p * r + T(2.7557319223985893e-06)
    p = p * r + T(2.48015873015873e-05)
    p = p * r + T(0.0001984126984126984)
    p = p * r + T(0.001388888888888889)
    p = p * r + T(0.008333333333333333)
    p = p * r + T(0.041666666666666664)
    p = p * r + T(0.16666666666666666)
    p = p * r + T(0.5)
    return p


@njit(inline="always", error_model="numpy")
def exp(x):
    """``e^x`` in ``x``'s type, vectorisable (see the module docstring)."""
    T = type(x)
    # clamp (NaN passes through: both comparisons are false) so k stays an int64 of a few bits
    x = T(-746.0) if x < T(-746.0) else (T(710.0) if x > T(710.0) else x)
    k = np.floor(x * T(1.4426950408889634) + T(0.5))  # a float (math.floor would give an int)
    r = (x - k * T(0.693359375)) - k * T(-2.121944400546905827679e-4)  # ln2 in two parts: k * 0.693359375 exact
    p = _series(r)  # Taylor polynomial of e^r, 1/13! .. 1/0!
    p = p * r + T(1.0)
    p = p * r + T(1.0)
    ki = np.int64(k) if k == k else np.int64(0)  # NaN: any k (the result is NaN), but a defined one
    emax = _emax(x)
    # 2^k as 2^h 2^(k-h), each clamped to a normal number: results down to the subnormals come out
    # right, and beyond the type's range the product overflows to inf or underflows to 0
    h = min(max(ki >> 1, 1 - emax), emax)
    return p * _pow2(x, h) * _pow2(x, min(max(ki - h, 1 - emax), emax))


@njit(inline="always", error_model="numpy")
def expm1(x):
    """``e^x - 1`` in ``x``'s type, accurate near 0, vectorisable."""
    T = type(x)
    p = _series(x)  # x + x^2/2! + ... + x^13/13!: no cancellation near 0
    small = (p * x) * x + x
    big = exp(x) - T(1.0)
    return small if abs(x) <= T(0.34657359027997264) else big


@njit(inline="always", error_model="numpy")
def log1p_unit(t):
    """``log(1 + t)`` in ``t``'s type for ``t`` in ``[0, 1]`` (or NaN), vectorisable."""
    T = type(t)
    u = T(1.0) + t
    c = (t - (u - T(1.0))) / u  # what rounding 1 + t lost: log1p(t) = log(u) + c to first order
    half = u > T(1.4142135623730951)
    m = u * T(0.5) if half else u  # in [sqrt(1/2), sqrt(2)]: the series below converges fast
    f = m - T(1.0)  # exact (Sterbenz)
    s = f / (T(2.0) + f)
    z = s * s  # <= 0.0295
    q = T(1.0 / 23.0)  # 2 atanh(s) = 2 (s + s^3/3 + ... + s^23/23)
    q = q * z + T(1.0 / 21.0)
    q = q * z + T(1.0 / 19.0)
    q = q * z + T(1.0 / 17.0)
    q = q * z + T(1.0 / 15.0)
    q = q * z + T(1.0 / 13.0)
    q = q * z + T(1.0 / 11.0)
    q = q * z + T(1.0 / 9.0)
    q = q * z + T(1.0 / 7.0)
    q = q * z + T(1.0 / 5.0)
    q = q * z + T(1.0 / 3.0)
    lg = T(2.0) * s + T(2.0) * s * (z * q)
    return ((T(0.6931471805599453) if half else T(0.0)) + lg) + c


@njit(inline="always", error_model="numpy")
def tanh(x):
    """``tanh(x)`` in ``x``'s type from one :func:`expm1`, vectorisable."""
    T = type(x)
    e = expm1(T(-2.0) * abs(x))
    t = -e / (T(2.0) + e)
    return -t if x < T(0.0) else t
