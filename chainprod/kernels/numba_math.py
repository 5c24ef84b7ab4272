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
``tanh``  for ``|x| <= 0.625`` ``x + x^3 P(x^2) / Q(x^2)`` (Cephes' rational fit, no
          cancellation), beyond ``(1 - e) / (1 + e)`` with ``e = e^{-2|x|}`` from
          :func:`exp_neg_f64` (the polynomial by Estrin's scheme, ``2^k`` from a
          float's bits: no int64 conversion, which not every vector unit has);
          both computed, then a select. 1.5 ns a value against 2.8 ns with
          ``-e / (2 + e)``, ``e = expm1(-2|x|)`` (65536 values, one thread)
========  ===========================================================================

float32 takes shorter forms (the same accuracy in its own units, measured
on the development machine over 65536 values, one thread: ``exp`` 0.55 ns
a value against 0.92 ns with the float64 forms computed in float32,
``tanh`` 0.34 ns against 1.43 ns; numpy's ``np.tanh`` 0.36 ns):

========  ===========================================================================
``exp``   the Taylor polynomial to degree 7, and ``2^k`` built from an int32
          (a float32 vector converts to it in one instruction; to an int64,
          which the float64 form uses, not on every vector unit)
``tanh``  an odd rational function of ``x`` (a degree-13 numerator over a
          degree-6 denominator, Eigen's float32 fit) on ``[-7.905, 7.905]``,
          ``±1`` beyond ``|x| = 9``: no ``exp``, one division, within 3 units
          in the last place
========  ===========================================================================

The branch on the dtype (:func:`single`) is a compile-time constant: the
branch not taken is dropped once compiled.

Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["exp", "exp_neg_f64", "expm1", "log1p_unit", "single", "tanh", "tanh_f32", "tanh_f64"]


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


@intrinsic
def single(typingctx, x):
    """True, a compile-time constant, when ``x`` is a float32 (the branch on it is folded away)."""
    if not isinstance(x, types.Float):
        return None
    flag = x == types.float32
    return types.boolean(x), lambda context, builder, sig, args: ir.Constant(ir.IntType(1), int(flag))


@intrinsic
def _pow2_f32(typingctx, e):
    """``2^e`` in float32 for an integer-valued ``e`` within ``[-126, 127]``, from an int32 bit pattern.

    Typed for a float64 ``e`` too: the float64 branch beside its call is typed, then dropped.
    """
    if not isinstance(e, types.Float):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        biased = builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), ir.FloatType())

    return types.float32(e), codegen


@njit(inline="always", error_model="numpy")
def _series(r):
    """``(e^r - 1 - r) / r^2`` as its Taylor polynomial to ``r^11 / 13!`` (Horner, in ``r``'s type).

    float32: to ``r^5 / 7!`` (the next term is below a tenth of a unit in the last place for ``|r| <= ln2/2``).
    """
    T = type(r)
    if single(r):
        q = T(0.0001984126984126984)
        q = q * r + T(0.001388888888888889)
        q = q * r + T(0.008333333333333333)
        q = q * r + T(0.041666666666666664)
        q = q * r + T(0.16666666666666666)
        return q * r + T(0.5)
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
    if single(x):  # 2^k from int32 bit patterns, clamped as below, in float32 (no int64 conversion)
        kf = k if k == k else T(0.0)
        h = np.floor(kf * T(0.5))
        h = T(-126.0) if h < T(-126.0) else (T(127.0) if h > T(127.0) else h)
        g = kf - h
        g = T(-126.0) if g < T(-126.0) else (T(127.0) if g > T(127.0) else g)
        return p * _pow2_f32(h) * _pow2_f32(g)
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
def tanh_f32(x):
    """``tanh(x)`` in float32: an odd rational function of ``x`` on ``[-c, c]``, ``c = 7.905`` (Eigen's fit).

    Within 3e-7 of ``tanh`` (about 2.5 units in the last place of 1, where
    it is largest, near ``|x| = 5.8``; relative error 3e-7 near 0). Beyond
    ``c`` it gives ``tanh(c)``, not ``±1`` (:func:`tanh` rounds there).
    """
    T = np.float32
    c = T(7.90531110763549805)
    x = c if x > c else (-c if x < -c else x)  # a NaN compares false and passes through
    x2 = x * x
    p = T(-2.76076847742355e-16)
    p = p * x2 + T(2.00018790482477e-13)
    p = p * x2 + T(-8.60467152213735e-11)
    p = p * x2 + T(5.12229709037114e-08)
    p = p * x2 + T(1.48572235717979e-05)
    p = p * x2 + T(6.37261928875436e-04)
    p = p * x2 + T(4.89352455891786e-03)
    q = T(1.19825839466702e-06)
    q = q * x2 + T(1.18534705686654e-04)
    q = q * x2 + T(2.26843463243900e-03)
    q = q * x2 + T(4.89352518554385e-03)
    return (p * x) / q


@intrinsic
def _pow2_f64(typingctx, k):
    """``2^k`` for an integer-valued float64 ``k`` in ``[-1022, 0]``, from its bit pattern.

    ``k + 1.5 * 2^52`` holds ``k`` in its low bits: the integer comes out
    by a bit cast and a subtraction, with no float-to-int64 conversion
    (AVX2 has none for vectors: with one, LLVM left every ``exp`` scalar).
    """
    if k != types.float64:
        return None

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        shifted = builder.fadd(args[0], ir.Constant(ir.DoubleType(), 6755399441055744.0))
        ki = builder.sub(builder.bitcast(shifted, i64), ir.Constant(i64, 0x4338000000000000))
        bits = builder.shl(builder.add(ki, ir.Constant(i64, 1023)), ir.Constant(i64, 52))
        return builder.bitcast(bits, ir.DoubleType())

    return types.float64(k), codegen


@njit(inline="always", error_model="numpy")
def exp_neg_f64(x):
    """``e^x`` in float64 for ``x <= 0``: ``e^-708`` below ``-708`` (a normal number where the exact one is
    subnormal: an absolute error under 4e-308), NaN for NaN; ``2^k`` with no float-to-int64 conversion."""
    x = -708.0 if x < -708.0 else x
    k = np.floor(x * 1.4426950408889634 + 0.5)
    r = (x - k * 6.93145751953125e-1) - k * 1.42860682030941723212e-6  # ln2 in two parts: r is exact
    # the Taylor polynomial of e^r to r^13 / 13!, by Estrin's scheme: depth 8 instead of Horner's 26
    r2 = r * r
    r4 = r2 * r2
    s0 = (1.0 + r) + (0.5 + r * 0.16666666666666666) * r2
    s1 = (0.041666666666666664 + r * 0.008333333333333333) + (0.001388888888888889 + r * 0.0001984126984126984) * r2
    s2 = ((2.48015873015873e-05 + r * 2.7557319223985893e-06)
          + (2.755731922398589e-07 + r * 2.505210838544172e-08) * r2)
    s3 = 2.08767569878681e-09 + r * 1.6059043836821613e-10
    return ((s0 + s1 * r4) + (s2 + s3 * r4) * (r4 * r4)) * _pow2_f64(k)


@njit(inline="always", error_model="numpy")
def tanh_f64(x):
    """``tanh(x)`` in float64: a rational fit near 0, ``(1 - e) / (1 + e)`` of ``e = e^{-2|x|}`` beyond."""
    a = abs(x)
    z = a * a
    # |x| <= 0.625: x + x^3 P(x^2) / Q(x^2) (a rational fit to tanh near 0, no cancellation); beyond it
    # (1 - e) / (1 + e) with e = e^{-2|x|}, where 1 - e > 0.7
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    near = a + a * z * (p / q)
    e = exp_neg_f64(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    t = near if a <= 0.625 else far  # both computed, then one chosen: a select, which vectorises; NaN: far
    return -t if x < 0.0 else t


@njit(inline="always", error_model="numpy")
def tanh(x):
    """``tanh(x)`` in ``x``'s type, vectorisable: :func:`tanh_f64` or :func:`tanh_f32`."""
    T = type(x)
    if single(x):
        one = T(1.0) if x > T(0.0) else T(-1.0)
        return one if abs(x) > T(9.0) else T(tanh_f32(x))  # tanh(9) rounds to 1 in float32
    return T(tanh_f64(x))
