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
  :func:`chainprod.kernels.numba_math.tanh` (whose ``exp`` builds ``2^k``
  from an int64, which AVX2 cannot convert in vectors);
- float32: the ``tanh`` of Eigen's float32 kernels, an odd rational
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
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["gate", "padded", "sigmoid", "tanh"]


@njit(cache=True, inline="always", error_model="numpy")
def _tanh_f32(x):
    """``tanh(x)`` in float32: an odd rational function of ``x`` on ``[-c, c]``, ``c = 7.905`` (module docstring)."""
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


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f32(z):
    half = np.float32(0.5)
    return half * _tanh_f32(half * z) + half


@njit(cache=True, inline="always", error_model="numpy")
def _gate_f32(v, c):
    h = np.float32(0.5) * c  # 0.5: sigmoid(v) = tanh(v / 2) / 2 + 1 / 2; 1: tanh(v)
    return h * _tanh_f32(h * v) + (np.float32(1.0) - h)


@njit(cache=True, inline="always", error_model="numpy")
def _gate_f64(v, c):
    return c * _sigmoid_f64(c * v) - (c - 1.0)  # c = 2: tanh(v) = 2 sigmoid(2 v) - 1


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


@njit(cache=True, inline="always", error_model="numpy")
def _exp_neg_f64(x):
    """``e^x`` in float64 for ``x <= 0``: ``e^-708`` below ``-708``, NaN for NaN (module docstring)."""
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


@njit(cache=True, inline="always", error_model="numpy")
def _tanh_f64(x):
    a = abs(x)
    z = a * a
    # |x| <= 0.625: x + x^3 P(x^2) / Q(x^2) (a rational fit to tanh near 0, no cancellation); beyond it
    # (1 - e) / (1 + e) with e = e^{-2|x|}, where 1 - e > 0.7
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    near = a + a * z * (p / q)
    e = _exp_neg_f64(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    t = near if a <= 0.625 else far  # both computed, then one chosen: a select, which vectorises; NaN: far
    return -t if x < 0.0 else t


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f64(z):
    e = _exp_neg_f64(-abs(z))
    d = 1.0 / (1.0 + e)
    return d if z >= 0.0 else e * d


@intrinsic
def _single(typingctx, x):
    """True, a compile-time constant, when ``x`` is a float32 (the branch on it is folded away)."""
    if not isinstance(x, types.Float):
        return None
    flag = x == types.float32
    return types.boolean(x), lambda context, builder, sig, args: ir.Constant(ir.IntType(1), int(flag))


# One function per activation for both dtypes: each branch is typed for both, and the one not taken is
# dropped once compiled; the result is cast back to the argument's type (the float64 branch, typed for a
# float32, would return a float64). @overload would do the same, but LLVM then left the float64 bodies as
# calls, one per value (no vector loop), or numba warned while inlining them.
@njit(cache=True, inline="always", error_model="numpy")
def sigmoid(z):
    """``1 / (1 + e^-z)`` in ``z``'s type (compiled code only)."""
    if _single(z):
        return type(z)(_sigmoid_f32(z))
    return type(z)(_sigmoid_f64(z))


@njit(cache=True, inline="always", error_model="numpy")
def tanh(x):
    """``tanh(x)`` in ``x``'s type (compiled code only)."""
    if _single(x):
        return type(x)(_tanh_f32(x))
    return type(x)(_tanh_f64(x))


@njit(cache=True, inline="always", error_model="numpy")
def gate(v, c):
    """An LSTM gate in ``v``'s type: ``sigmoid(v)`` for ``c = 1``, ``tanh(v)`` for ``c = 2`` (compiled code only)."""
    if _single(v):
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
