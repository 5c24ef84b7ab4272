"""The compiled loops of :mod:`chainprod.kernels.recurrent_numba`: every step of a sequence in one call.

All arrays are flat (C order) and of one dtype; ``cell`` is a code (0
``rnn_tanh``, 1 ``rnn_relu``, 2 ``gru``, 3 ``lstm``). The state before
step ``t`` is read from ``Hs`` at step ``t - 1`` (``h0`` at step 0): no copy
of a state is made. Each step's product with ``W_hh`` is a fused loop or one
BLAS ``gemm`` (``blas``), chosen by the caller for the whole call.

A step's elementwise work is cut into short loops that LLVM vectorises:

- the gates are activated straight into ``Z``, one loop per sample over
  all ``G H`` of them (the LSTM's ``g``-gate as
  ``tanh(v) = 2 sigmoid(2 v) - 1``: ``coef`` is 2 there and 1 elsewhere; an
  absolute error of about one unit of 1);
- a ``tanh`` of ``H`` values runs over the whole batch at once (one flat
  loop of ``N H``): a loop of ``H = 20`` float32 values leaves 4 to a
  scalar remainder, which computes its ``exp`` one value at a time;
- each loop touches few arrays: LLVM vectorises a loop only while the
  checks that its arrays do not overlap stay few (8 pairs), and numba's
  slices of one array look to it like distinct arrays (the LSTM's backward
  step is two loops for that reason).

Measured per step (float32, N = 16, H = 20, the LSTM, one thread): forward
5.7 us with per-sample loops and copies into ``Z``, 4.5 us as above, 3.0 us
with the float32 functions below and ``W_hh^T`` handed to BLAS as stored.
Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from . import numba_math
from .numba_blas import NOTRANS, TRANS, gemm
from .numba_rules import sigmoid as sigmoid64

__all__ = ["backward_loop", "forward_loop", "padded", "sigmoid", "tanh"]


# -- float32 activations: numba_math's exp serves both dtypes with a degree-13 polynomial and int64
# exponents; float32 needs degree 7 and int32 exponents (the LSTM's forward step at N = 16, H = 20
# went from 4.5 to 3.4-3.7 us). float64 keeps numba_math's functions.
@intrinsic
def _pow2_f32(typingctx, e):
    """``2^e`` as a float32 from its bit pattern (``e`` an integer within the normal exponents)."""
    if not isinstance(e, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        e32 = builder.trunc(args[0], ir.IntType(32)) if e.bitwidth > 32 else args[0]
        biased = builder.add(e32, ir.Constant(ir.IntType(32), 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(ir.IntType(32), 23)), ir.FloatType())

    return types.float32(e), codegen


@njit(cache=True, inline="always", error_model="numpy")
def _exp_f32(x):
    """``e^x`` in float32: ``x = k ln2 + r``, Taylor polynomial of degree 7 (error below 1e-8), ``2^k``."""
    T = np.float32
    x = T(-104.0) if x < T(-104.0) else (T(89.0) if x > T(89.0) else x)  # NaN passes through
    k = np.floor(x * T(1.4426950408889634) + T(0.5))
    r = (x - k * T(0.693359375)) - k * T(-2.121944400546905827679e-4)
    p = T(1.0 / 5040.0)
    p = p * r + T(1.0 / 720.0)
    p = p * r + T(1.0 / 120.0)
    p = p * r + T(1.0 / 24.0)
    p = p * r + T(1.0 / 6.0)
    p = p * r + T(0.5)
    p = p * r + T(1.0)
    p = p * r + T(1.0)
    ki = np.int32(k) if k == k else np.int32(0)
    h = ki >> np.int32(1)  # 2^k as two halves: each a normal number down to e^-104 (subnormal results)
    return p * _pow2_f32(h) * _pow2_f32(ki - h)


@njit(cache=True, inline="always", error_model="numpy")
def _sigmoid_f32(z):
    one = np.float32(1.0)
    e = _exp_f32(-abs(z))
    return one / (one + e) if z >= np.float32(0.0) else e / (one + e)


@njit(cache=True, inline="always", error_model="numpy")
def _tanh_f32(x):
    one = np.float32(1.0)
    e = _exp_f32(np.float32(-2.0) * abs(x))
    t = (one - e) / (one + e)  # an absolute error of about 1e-7 near 0, as float32 has anyway near 1
    return -t if x < np.float32(0.0) else t


def sigmoid(z):
    """``1 / (1 + e^-z)`` in ``z``'s type (compiled code only)."""
    raise NotImplementedError("compiled code only")


def tanh(x):
    """``tanh(x)`` in ``x``'s type (compiled code only)."""
    raise NotImplementedError("compiled code only")


@overload(sigmoid)
def _sigmoid_typed(z):
    if z == types.float32:
        return lambda z: _sigmoid_f32(z)
    return lambda z: sigmoid64(z)


@overload(tanh)
def _tanh_typed(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: numba_math.tanh(x)


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
    return (n + 15) // 16 * 16


@njit(cache=True, error_model="numpy")
def _gates(hp, W, WT, b, gh, N, H, GH, blas):
    """``gh = hp W^T + b`` for the ``N`` rows of ``hp`` (``WT`` is ``W^T``, ``(H, GH)``)."""
    for n in range(N):
        g = gh[n * GH:(n + 1) * GH]
        for j in range(GH):
            g[j] = b[j]
    if blas:
        # which operand BLAS reads as stored matters: with W^T as stored (NOTRANS) a 16 x 64 x 256 float32
        # step took 3.3 us, with W transposed 11.9 us; a single row (N = 1) is the other way (0.9 / 0.7)
        if N > 1:
            gemm(NOTRANS, NOTRANS, N, GH, H, hp, 0, H, WT, 0, GH, 1.0, gh, 0, GH)
        else:
            gemm(NOTRANS, TRANS, N, GH, H, hp, 0, H, W, 0, H, 1.0, gh, 0, GH)
        return
    for n in range(N):
        g = gh[n * GH:(n + 1) * GH]
        h = hp[n * H:(n + 1) * H]
        for k in range(H):  # along W^T's rows: the inner loop vectorises without reordering a sum
            a = h[k]
            w = WT[k * GH:(k + 1) * GH]
            for j in range(GH):
                g[j] += a * w[j]


@njit(cache=True, error_model="numpy")
def forward_loop(cell, X, W, WT, b, h0, c0, Hs, Z, work, coef, T, N, H, blas):
    """Every state into ``Hs`` and the saved gates into ``Z`` (layouts: the module docstring of the contract).

    ``work`` is scratch of ``N G H + 2 padded(N H)`` values, zeros on entry; ``coef`` (the LSTM's,
    ``G H``) is 2 on the ``g``-gate and 1 elsewhere.
    """
    G = 1 if cell < 2 else (3 if cell == 2 else 4)
    GH = G * H
    K = 0 if cell < 2 else (4 * H if cell == 2 else 5 * H)
    NH = N * H
    NG = N * GH
    one = Hs.dtype.type(1.0)
    zero = Hs.dtype.type(0.0)
    NP = padded(NH)
    gh = work[0:NG]
    ab = work[NG:NG + NP]
    tb = work[NG + NP:NG + 2 * NP]
    for t in range(T):
        hp = Hs[(t - 1) * NH:t * NH] if t > 0 else h0[0:NH]
        _gates(hp, W, WT, b, gh, N, H, GH, blas)
        x = X[t * NG:(t + 1) * NG]
        h = Hs[t * NH:(t + 1) * NH]
        if cell == 0:
            for k in range(NH):
                ab[k] = x[k] + gh[k]
            for k in range(NP):
                ab[k] = tanh(ab[k])
            for k in range(NH):
                h[k] = ab[k]
        elif cell == 1:
            for k in range(NH):
                v = x[k] + gh[k]
                h[k] = v if not (v < zero) else zero
        elif cell == 2:
            for n in range(N):
                z = Z[(t * N + n) * K:(t * N + n + 1) * K]
                xn = x[n * GH:(n + 1) * GH]
                g = gh[n * GH:(n + 1) * GH]
                a = ab[n * H:(n + 1) * H]
                for j in range(2 * H):  # r and z straight into Z: no copy
                    z[j] = sigmoid(xn[j] + g[j])
                for j in range(H):
                    a[j] = xn[2 * H + j] + z[j] * g[2 * H + j]
                    z[3 * H + j] = g[2 * H + j]
            for k in range(NP):  # tanh over the whole batch: per sample, H = 20 leaves a scalar remainder
                ab[k] = tanh(ab[k])
            for n in range(N):
                z = Z[(t * N + n) * K:(t * N + n + 1) * K]
                a = ab[n * H:(n + 1) * H]
                hpn = hp[n * H:(n + 1) * H]
                hn = h[n * H:(n + 1) * H]
                for j in range(H):
                    zz = z[H + j]
                    z[2 * H + j] = a[j]
                    hn[j] = (one - zz) * a[j] + zz * hpn[j]
        else:
            for n in range(N):
                r = t * N + n
                z = Z[r * K:(r + 1) * K]
                xn = x[n * GH:(n + 1) * GH]
                g = gh[n * GH:(n + 1) * GH]
                for j in range(GH):  # the four gates straight into Z: no copy
                    c = coef[j]
                    z[j] = c * sigmoid(c * (xn[j] + g[j])) - (c - one)
                cp = Z[(r - N) * K + 4 * H:(r - N) * K + 5 * H] if t > 0 else c0[n * H:(n + 1) * H]
                cb = ab[n * H:(n + 1) * H]
                for j in range(H):
                    c = z[H + j] * cp[j] + z[j] * z[2 * H + j]
                    z[4 * H + j] = c
                    cb[j] = c
            for k in range(NP):
                tb[k] = tanh(ab[k])
            for n in range(N):
                z = Z[(t * N + n) * K:(t * N + n + 1) * K]
                tbn = tb[n * H:(n + 1) * H]
                hn = h[n * H:(n + 1) * H]
                for j in range(H):
                    hn[j] = z[3 * H + j] * tbn[j]


@njit(cache=True, error_model="numpy")
def _cell_vjp(cell, t, N, H, hp, c0, Hs, Z, dX, dh, dc, dG, dGn, tb, keep_gn):
    """Step ``t``'s gate gradients into ``dX`` (and ``dG`` for the GRU), from ``dh`` = the adjoint of ``h_t``.

    Leaves in ``dh`` (and ``dc``) the part of the adjoint of ``h_{t-1}``
    (``c_{t-1}``) that does not pass through ``W_hh`` (nothing for the RNN
    and the LSTM: the product then overwrites ``dh``).
    """
    G = 1 if cell < 2 else (3 if cell == 2 else 4)
    GH = G * H
    K = 0 if cell < 2 else (4 * H if cell == 2 else 5 * H)
    NH = N * H
    one = Hs.dtype.type(1.0)
    zero = Hs.dtype.type(0.0)
    dx = dX[t * N * GH:(t + 1) * N * GH]
    h = Hs[t * NH:(t + 1) * NH]
    if cell == 0:
        for k in range(NH):
            dx[k] = dh[k] * (one - h[k] * h[k])
    elif cell == 1:
        for k in range(NH):
            dx[k] = dh[k] if h[k] > zero else zero  # relu'(0) = 0
    elif cell == 2:
        for n in range(N):
            r = t * N + n
            z = Z[r * K:(r + 1) * K]
            hpn = hp[n * H:(n + 1) * H]
            dxn = dx[n * GH:(n + 1) * GH]
            dhn = dh[n * H:(n + 1) * H]
            for j in range(H):
                rr = z[j]
                zz = z[H + j]
                nn = z[2 * H + j]
                d = dhn[j]
                dan = d * (one - zz) * (one - nn * nn)
                dxn[j] = dan * z[3 * H + j] * (rr * (one - rr))
                dxn[H + j] = d * (hpn[j] - nn) * (zz * (one - zz))
                dxn[2 * H + j] = dan
                dhn[j] = d * zz
            dg = dG[n * GH:(n + 1) * GH]
            for j in range(2 * H):
                dg[j] = dxn[j]
            for j in range(H):  # the n-chunk of h W_hh^T + b_hh enters scaled by r
                dg[2 * H + j] = dxn[2 * H + j] * z[j]
            if keep_gn:
                gn = dGn[r * H:(r + 1) * H]
                for j in range(H):
                    gn[j] = dg[2 * H + j]
    else:
        for n in range(N):
            r = t * N + n
            z = Z[r * K:(r + 1) * K]
            tbn = tb[n * H:(n + 1) * H]
            for j in range(H):
                tbn[j] = z[4 * H + j]
        for k in range(padded(NH)):
            tb[k] = tanh(tb[k])
        for n in range(N):
            r = t * N + n
            z = Z[r * K:(r + 1) * K]
            cp = Z[(r - N) * K + 4 * H:(r - N) * K + 5 * H] if t > 0 else c0[n * H:(n + 1) * H]
            dxn = dx[n * GH:(n + 1) * GH]
            dhn = dh[n * H:(n + 1) * H]
            dcn = dc[n * H:(n + 1) * H]
            tbn = tb[n * H:(n + 1) * H]
            for j in range(H):  # two loops, each with few enough arrays to vectorise
                oo = z[3 * H + j]
                tc = tbn[j]
                d = dhn[j]
                dcn[j] += d * oo * (one - tc * tc)
                dxn[3 * H + j] = d * tc * (oo * (one - oo))
            for j in range(H):
                ii = z[j]
                ff = z[H + j]
                gg = z[2 * H + j]
                dcc = dcn[j]
                dxn[j] = dcc * gg * (ii * (one - ii))
                dxn[H + j] = dcc * cp[j] * (ff * (one - ff))
                dxn[2 * H + j] = dcc * ii * (one - gg * gg)
                dcn[j] = dcc * ff


@njit(cache=True, error_model="numpy")
def backward_loop(cell, W, h0, c0, Hs, Z, dHs, dX, dW, db, dh, dc, dG, dGn, work, T, N, H, blas, blas_dw):
    """Backprop through all steps, last to first: ``dX``, ``db`` and (unless ``blas_dw``) ``dW``.

    ``dh`` (``dc``) holds the adjoint arriving at the last state on entry and
    ``dh0`` (``dc0``) on return. ``dW`` and ``db`` are added to. With
    ``blas_dw`` the caller forms ``dW`` after the loop; the GRU's
    ``n``-chunk gradients (``r * dn``) are then kept in ``dGn``. ``work``:
    ``padded(N H)`` values of scratch, zeros on entry.
    """
    G = 1 if cell < 2 else (3 if cell == 2 else 4)
    GH = G * H
    NH = N * H
    gru = cell == 2
    beta = 1.0 if gru else 0.0  # the GRU's dh already holds z * dh_t, which does not pass through W_hh
    for t in range(T - 1, -1, -1):
        hp = Hs[(t - 1) * NH:t * NH] if t > 0 else h0[0:NH]
        dy = dHs[t * NH:(t + 1) * NH]
        for k in range(NH):
            dh[k] += dy[k]
        _cell_vjp(cell, t, N, H, hp, c0, Hs, Z, dX, dh, dc, dG, dGn, work, blas_dw and gru)
        # the gate gradients that meet W_hh: dX's own rows, but the GRU's n-chunk is scaled by r (dG)
        src = dG if gru else dX
        off = 0 if gru else t * N * GH
        for n in range(N):
            s = src[off + n * GH:off + (n + 1) * GH]
            for j in range(GH):
                db[j] += s[j]
        if blas:
            gemm(NOTRANS, NOTRANS, N, H, GH, src, off, GH, W, 0, H, beta, dh, 0, H)
            if not blas_dw:
                gemm(TRANS, NOTRANS, GH, H, N, src, off, GH, hp, 0, H, 1.0, dW, 0, H)
            continue
        if not gru:
            for k in range(NH):
                dh[k] = 0.0
        for n in range(N):
            g = src[off + n * GH:off + (n + 1) * GH]
            dhn = dh[n * H:(n + 1) * H]
            hpn = hp[n * H:(n + 1) * H]
            for j in range(GH):  # along W_hh's rows (and dW_hh's): vectorises without reordering a sum
                a = g[j]
                w = W[j * H:(j + 1) * H]
                for k in range(H):
                    dhn[k] += a * w[k]
                if not blas_dw:
                    dw = dW[j * H:(j + 1) * H]
                    for k in range(H):
                        dw[k] += a * hpn[k]
