"""The compiled loops of :mod:`chainprod.kernels.recurrent_numba`: every step of a sequence in one call.

All arrays are flat (C order) and of one dtype; ``cell`` is a code (0
``rnn_tanh``, 1 ``rnn_relu``, 2 ``gru``, 3 ``lstm``). A loop runs the
samples ``n0 .. n1 - 1`` of the batch (``NB`` of them) through every step:
the samples of a batch never meet in a recurrence, so :func:`forward_chunks`
and :func:`backward_chunks` run contiguous groups of them on numba's threads
with no synchronisation between steps (only ``dW_hh`` and ``db_hh``, which
sum over samples, are kept per group and added up at the end). The state
before step ``t`` is read from ``Hs`` at step ``t - 1`` (``h0`` at step 0): no
copy of a state is made. A group's rows of one step are contiguous in every
``(T, N, .)`` array (rows ``t N + n0 .. t N + n1 - 1``), so its step is a
block of ``X``, ``Hs``, ``Z``, ``dX``: one register-blocked product
(:func:`~.recurrent_numba_simd.rows_times`) or one BLAS ``gemm`` (``blas``,
chosen by the caller for the whole call). The step's gate pre-activations
(forward) and the adjoint ``dh`` (backward) are kept in rows padded to
whole vectors, the layout those products take.

How a step is kept fast (measured per step, float32, one thread, under load;
before / after each change):

- **indices, not slices**: every array is read at ``offset + j``; a numba
  slice inside the loop takes and drops a reference (two atomic operations),
  which at ``N = 16`` was hundreds per step (the tanh RNN's forward step at
  ``N = 1``, ``H = 8``: 0.117 -> 0.071 us);
- **unsigned indices** (``_U``): numba then drops its check for a negative
  index, a select per access that hid consecutive addresses from LLVM (the
  LSTM's forward step at ``N = 16``, ``H = 20``: 10.7 us with signed
  indices, 5.1 unsigned);
- the gates are activated straight into ``Z``, one loop per sample over all
  ``G H`` of them (the LSTM's by :func:`~.recurrent_numba_act.gate`:
  ``coef`` is 2 on the ``g``-gate, ``tanh``, and 1 elsewhere, ``sigmoid``);
  a ``tanh`` of ``H`` values runs over the whole group at once, on
  ``padded(NB H)`` values of scratch, so it never falls to scalar code;
- each loop touches few arrays (the LSTM's backward step is six loops of
  one output each): LLVM vectorises a loop only while the checks that its
  arrays do not overlap stay few;
- the backward loop asks for the next step's rows of ``Z``, ``Hs``, ``dHs``
  and ``dX`` one step ahead (:func:`~.recurrent_numba_simd.prefetch_range`):
  it walks them from the last step to the first (the LSTM's backward step
  at ``N = 16``, ``H = 20``, ``T = 1000``: 5.8 -> 4.5 us).

Importing this module imports numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_blas import NOTRANS, TRANS, gemm
from .recurrent_numba_act import gate, padded, sigmoid, tanh
from .recurrent_numba_simd import PANEL_VECTORS, lanes, prefetch_range, rows_times, to_panels

__all__ = ["backward_call", "backward_chunks", "backward_loop", "forward_call", "forward_chunks", "forward_loop"]

# every size, offset and index of the loops is unsigned: numba then indexes an array without the check
# for a negative index (a select per access that keeps LLVM from seeing consecutive addresses)
_U = np.uint64

#: ``pw`` for a matrix in C order (one panel as wide as any row): the layout BLAS reads
C_ORDER = _U(1 << 62)


@njit(cache=True, inline="always")
def _sizes(cell, H):
    """``(G, K)``: gates per cell and the width of a row of ``Z``."""
    if cell < 2:
        return _U(1), _U(0)
    if cell == 2:
        return _U(3), (H + H) + (H + H)
    return _U(4), (H + H) + (H + H) + H


@njit(cache=True, inline="always")
def _whole_vectors(n, L):
    """``n`` rounded up to a multiple of ``L`` (a row's length in the products' padded layout)."""
    return (n + (L - _U(1))) // L * L


@njit(cache=True, error_model="numpy", boundscheck=False)
def forward_loop(cell, X, W, WTp, pw, b, h0, c0, Hs, Z, coef, T, N, H, n0, n1, blas):
    """Every state of samples ``n0 .. n1 - 1`` into ``Hs`` and their saved gates into ``Z``.

    ``WTp`` is ``W_hh^T`` with its rows padded to whole vectors (``H x
    GHp``, zeros beyond ``G H``) in panels of ``pw`` columns
    (:func:`~.recurrent_numba_simd.panels`; C order for BLAS); ``coef`` (``G H``) is the LSTM's: 2 on the
    ``g``-gate, 1 elsewhere. The gates of a step are kept in rows of ``GHp``.
    """
    G, K = _sizes(cell, H)
    GH = G * H
    GHp = _whole_vectors(GH, lanes(Hs))
    NB = n1 - n0
    NH = NB * H
    H2 = H + H
    H3 = H2 + H
    H4 = H2 + H2
    one = Hs.dtype.type(1.0)
    zero = Hs.dtype.type(0.0)
    gh = np.zeros(padded(NB * GHp), Hs.dtype)  # the step's gate pre-activations (zeros: the padding is computed)
    ab = np.zeros(padded(NH), Hs.dtype)
    tb = np.zeros(padded(NH), Hs.dtype)
    for t in range(T):
        r0 = t * N + n0  # the group's first row at step t
        xo = r0 * GH
        for n in range(NB):
            go = n * GHp
            xn = xo + n * GH
            if cell == 2:  # the GRU adds X_t after the product (r scales the product's n-chunk only)
                for j in range(GH):
                    gh[go + j] = b[j]
            else:
                for j in range(GH):
                    gh[go + j] = X[xn + j] + b[j]
        hp = Hs if t > 0 else h0
        ho = (r0 - N) * H if t > 0 else n0 * H
        if blas:
            # which operand BLAS reads as stored matters: with W^T as stored (NOTRANS) a 16 x 64 x 256
            # float32 step took 3.3 us, with W transposed 11.9 us; a single row is the other way (0.9 / 0.7)
            if NB > 1:
                gemm(NOTRANS, NOTRANS, NB, GH, H, hp, ho, H, WTp, 0, GHp, 1.0, gh, 0, GHp)
            else:
                gemm(NOTRANS, TRANS, NB, GH, H, hp, ho, H, W, 0, H, 1.0, gh, 0, GHp)
        else:
            rows_times(gh, _U(0), GHp, hp, ho, H, _U(1), H, WTp, pw, GHp, NB, True)
        so = r0 * H  # the group's states at step t
        if cell == 0:
            for k in range(padded(NB * GHp)):
                gh[k] = tanh(gh[k])
            for n in range(NB):
                for j in range(H):
                    Hs[so + n * H + j] = gh[n * GHp + j]
        elif cell == 1:
            for n in range(NB):
                for j in range(H):
                    v = gh[n * GHp + j]
                    Hs[so + n * H + j] = v if not (v < zero) else zero  # keeps a NaN a NaN, as np.maximum does
        elif cell == 2:
            for n in range(NB):
                zo = (r0 + n) * K
                xn = xo + n * GH
                go = n * GHp
                for j in range(H2):  # r and z straight into Z
                    Z[zo + j] = sigmoid(X[xn + j] + gh[go + j])
                for j in range(H):
                    g = gh[go + H2 + j]
                    ab[n * H + j] = X[xn + H2 + j] + Z[zo + j] * g
                    Z[zo + H3 + j] = g
            for k in range(padded(NH)):  # over the whole group: per sample, H = 20 leaves a scalar remainder
                ab[k] = tanh(ab[k])
            for n in range(NB):
                zo = (r0 + n) * K
                po = ho + n * H
                for j in range(H):
                    zz = Z[zo + H + j]
                    a = ab[n * H + j]
                    Z[zo + H2 + j] = a
                    Hs[so + n * H + j] = (one - zz) * a + zz * hp[po + j]
        else:
            for n in range(NB):
                zo = (r0 + n) * K
                go = n * GHp
                for j in range(GH):  # the four gates straight into Z
                    Z[zo + j] = gate(gh[go + j], coef[j])
                if t > 0:
                    cpo = (r0 - N + n) * K + H4
                    for j in range(H):
                        c = Z[zo + H + j] * Z[cpo + j] + Z[zo + j] * Z[zo + H2 + j]
                        Z[zo + H4 + j] = c
                        ab[n * H + j] = c
                else:
                    cpo = (n0 + n) * H
                    for j in range(H):
                        c = Z[zo + H + j] * c0[cpo + j] + Z[zo + j] * Z[zo + H2 + j]
                        Z[zo + H4 + j] = c
                        ab[n * H + j] = c
            for k in range(padded(NH)):
                tb[k] = tanh(ab[k])
            for n in range(NB):
                zo = (r0 + n) * K + H3
                for j in range(H):
                    Hs[so + n * H + j] = Z[zo + j] * tb[n * H + j]


@njit(cache=True, parallel=True, error_model="numpy")
def forward_chunks(cell, X, W, WTp, pw, b, h0, c0, Hs, Z, coef, T, N, H, nchunks, blas):
    """:func:`forward_loop` on ``nchunks`` contiguous groups of the batch, one per thread."""
    for c in prange(nchunks):
        g = _U(c)  # prange's index is signed
        forward_loop(cell, X, W, WTp, pw, b, h0, c0, Hs, Z, coef, T, N, H, g * N // nchunks,
                     (g + _U(1)) * N // nchunks, blas)


@njit(cache=True, error_model="numpy", boundscheck=False)
def backward_loop(cell, W, Wp, pw, h0, c0, Hs, Z, dHs, dX, dWp, db, dh_all, dc_all, dGn, T, N, H, n0, n1, blas,
                  blas_dw):
    """Backprop of samples ``n0 .. n1 - 1`` through all steps, last to first: ``dX``, ``db`` and ``dW``.

    ``Wp`` is ``W_hh`` with rows padded to whole vectors (``G H x Hp``) in
    panels of ``pw`` columns (:func:`~.recurrent_numba_simd.panels`).
    ``dh_all`` (``dc_all``), ``(N, H)``: the adjoint arriving at the last
    state on entry, ``dh0`` (``dc0``) on return (the group's rows).
    ``dWp`` (``G H x Hp``, the same padding) and ``db`` (float64) are added to;
    ``dWp`` only without ``blas_dw``: then the caller forms ``dW_hh``
    after the loop, and the GRU's ``n``-chunk gradients ``r * dn`` are kept
    in ``dGn``, ``(T, N, H)``.
    """
    G, K = _sizes(cell, H)
    GH = G * H
    Hp = _whole_vectors(H, lanes(Hs))
    NB = n1 - n0
    NH = NB * H
    gru = cell == 2
    dt = Hs.dtype
    dh = np.zeros(NB * Hp, dt)  # the group's adjoints, rows of Hp (the product's layout)
    NC = NH if cell == 3 else _U(0)
    dc = np.empty(NC, dt)
    for n in range(NB):
        for j in range(H):
            dh[n * Hp + j] = dh_all[(n0 + n) * H + j]
    for k in range(NC):
        dc[k] = dc_all[n0 * H + k]
    dG = np.empty(NB * GH if gru else _U(0), dt)  # the GRU's gate gradients (its n-chunk differs from dX's)
    tb = np.zeros(padded(NH), dt)
    hq = np.zeros(NB * Hp, dt)  # h_{t-1} in rows of Hp, for dW_hh in the loop
    beta = 1.0 if gru else 0.0  # the GRU's dh already holds z * dh_t, which does not pass through W_hh
    keep_gn = blas_dw and gru
    H2 = H + H
    H3 = H2 + H
    H4 = H2 + H2
    one = dt.type(1.0)
    zero = dt.type(0.0)
    for s in range(T):
        t = T - _U(1) - s
        r0 = t * N + n0
        hp = Hs if t > 0 else h0
        ho = (r0 - N) * H if t > 0 else n0 * H
        so = r0 * H
        if t > 0:  # the rows of the step after this one, back in time (why: prefetch)
            prefetch_range(Z, (r0 - N) * K, NB * K, False)
            prefetch_range(Hs, (r0 - N) * H, NB * H, False)
            prefetch_range(dHs, (r0 - N) * H, NB * H, False)
            prefetch_range(dX, (r0 - N) * GH, NB * GH, True)
        for n in range(NB):
            for j in range(H):
                dh[n * Hp + j] += dHs[so + n * H + j]
        # step t's gate gradients into dX (and dG for the GRU) from dh, the adjoint of h_t; left in dh (dc):
        # the part of the adjoint of h_{t-1} (c_{t-1}) that does not pass through W_hh (nothing for the RNN
        # and the LSTM: the product then overwrites dh). Written here, not in a function of its own: inlined
        # from one, its dozen array arguments cost about 100 ns a step in references taken and dropped (the
        # tanh RNN's backward step at N = 1, H = 8: 185 -> 85 ns)
        xo = r0 * GH
        if cell == 0:
            for n in range(NB):
                for j in range(H):
                    h = Hs[so + n * H + j]
                    dX[xo + n * H + j] = dh[n * Hp + j] * (one - h * h)
        elif cell == 1:
            for n in range(NB):
                for j in range(H):
                    dX[xo + n * H + j] = dh[n * Hp + j] if Hs[so + n * H + j] > zero else zero  # relu'(0) = 0
        elif cell == 2:
            for n in range(NB):
                zo = (r0 + n) * K
                xn = xo + n * GH
                po = ho + n * H
                do = n * Hp
                for j in range(H):
                    rr = Z[zo + j]
                    zz = Z[zo + H + j]
                    nn = Z[zo + H2 + j]
                    d = dh[do + j]
                    dan = d * (one - zz) * (one - nn * nn)
                    dX[xn + j] = dan * Z[zo + H3 + j] * (rr * (one - rr))
                    dX[xn + H + j] = d * (hp[po + j] - nn) * (zz * (one - zz))
                    dX[xn + H2 + j] = dan
                    dh[do + j] = d * zz
                go = n * GH
                for j in range(H2):
                    dG[go + j] = dX[xn + j]
                for j in range(H):  # the n-chunk of h W_hh^T + b_hh enters scaled by r
                    dG[go + H2 + j] = dX[xn + H2 + j] * Z[zo + j]
                if keep_gn:
                    for j in range(H):
                        dGn[so + n * H + j] = dG[go + H2 + j]
        else:
            for n in range(NB):
                zo = (r0 + n) * K + H4
                for j in range(H):
                    tb[n * H + j] = Z[zo + j]
            for k in range(padded(NH)):
                tb[k] = tanh(tb[k])
            for n in range(NB):
                zo = (r0 + n) * K
                xn = xo + n * GH
                do = n * Hp
                co = n * H
                # one output per loop: each loop then has few pairs of arrays whose overlap LLVM must rule out
                # before it vectorises (the LSTM's vjp at N = 16, H = 20: 0.71 -> 0.51 us a step, in the cache)
                for j in range(H):
                    oo = Z[zo + H3 + j]
                    dX[xn + H3 + j] = dh[do + j] * tb[co + j] * (oo * (one - oo))
                for j in range(H):
                    tc = tb[co + j]
                    dc[co + j] += dh[do + j] * Z[zo + H3 + j] * (one - tc * tc)
                for j in range(H):
                    ii = Z[zo + j]
                    dX[xn + j] = dc[co + j] * Z[zo + H2 + j] * (ii * (one - ii))
                if t > 0:  # the f-gate, from c_{t-1}: the previous step's row of Z, or c0
                    cpo = (r0 - N + n) * K + H4
                    for j in range(H):
                        ff = Z[zo + H + j]
                        dX[xn + H + j] = dc[co + j] * Z[cpo + j] * (ff * (one - ff))
                else:
                    cpo = (n0 + n) * H
                    for j in range(H):
                        ff = Z[zo + H + j]
                        dX[xn + H + j] = dc[co + j] * c0[cpo + j] * (ff * (one - ff))
                for j in range(H):
                    gg = Z[zo + H2 + j]
                    dX[xn + H2 + j] = dc[co + j] * Z[zo + j] * (one - gg * gg)
                for j in range(H):
                    dc[co + j] *= Z[zo + H + j]  # the adjoint of c_{t-1}
        # the gate gradients that meet W_hh: dX's own rows, but the GRU's n-chunk is scaled by r (dG)
        src = dG if gru else dX
        go = _U(0) if gru else r0 * GH
        for n in range(NB):  # db in float64: a sum over T N terms, for b_hh and (the same sum) b_ih
            for j in range(GH):
                db[j] += src[go + n * GH + j]
        if blas:
            gemm(NOTRANS, NOTRANS, NB, H, GH, src, go, GH, W, 0, H, beta, dh, 0, Hp)
            if not blas_dw:
                gemm(TRANS, NOTRANS, GH, H, NB, src, go, GH, hp, ho, H, 1.0, dWp, 0, Hp)
            continue
        if not blas_dw:  # dW_hh[j, :] += sum_n dG[n, j] h_{t-1}[n, :], before dh is overwritten
            for n in range(NB):
                for j in range(H):
                    hq[n * Hp + j] = hp[ho + n * H + j]
            rows_times(dWp, _U(0), Hp, src, go, _U(1), GH, NB, hq, Hp, Hp, GH, True)
        rows_times(dh, _U(0), Hp, src, go, GH, _U(1), GH, Wp, pw, Hp, NB, gru)
    for n in range(NB):
        for j in range(H):
            dh_all[(n0 + n) * H + j] = dh[n * Hp + j]
    for k in range(NC):
        dc_all[n0 * H + k] = dc[k]


@njit(cache=True, parallel=True, error_model="numpy")
def backward_chunks(cell, W, Wp, pw, h0, c0, Hs, Z, dHs, dX, dWs, dbs, dh, dc, dGn, T, N, H, nchunks, blas, blas_dw):
    """:func:`backward_loop` on ``nchunks`` contiguous groups of the batch, one per thread.

    ``dWs`` ``(nchunks, G H Hp)`` and ``dbs`` ``(nchunks, G H)``: zeros on
    entry, each group's sums on return (the caller adds them up).
    """
    for c in prange(nchunks):
        g = _U(c)
        backward_loop(cell, W, Wp, pw, h0, c0, Hs, Z, dHs, dX, dWs[c], dbs[c], dh, dc, dGn, T, N, H, g * N // nchunks,
                      (g + _U(1)) * N // nchunks, blas, blas_dw)


@njit(cache=True, error_model="numpy", boundscheck=False)
def _panel_cols(a, blas):
    """The panel width the step's products read ``W_hh`` in: C order for BLAS, else :data:`PANEL_VECTORS` vectors."""
    return C_ORDER if blas else _U(PANEL_VECTORS) * lanes(a)


@njit(cache=True, error_model="numpy", boundscheck=False)
def forward_call(cell, X, W, b, h0, c0, Hs, Z, nchunks, blas):
    """The forward pass from the checked arrays of :func:`chainprod.kernels.recurrent_numba.forward`, all in one call.

    ``X`` ``(T, N, G H)``, ``W`` ``(G H, H)``, ``h0`` and ``c0`` ``(N, H)``
    (``c0`` ``(0, H)`` but for the LSTM), ``Hs`` and ``Z`` the outputs; C
    order, one dtype. Lays out ``W_hh^T`` for the products and the LSTM's
    ``coef``, then runs :func:`forward_loop` (or :func:`forward_chunks` on
    ``nchunks`` groups): what the Python wrapper did in about 20 us a call.
    """
    T, N, GH = X.shape
    H = W.shape[1]
    pw = _panel_cols(X, blas)
    WTp = to_panels(W, True, pw)
    coef = np.ones(GH, X.dtype)
    if cell == 3:
        coef[H + H:H + H + H] = 2  # the g-gate's tanh(v) = 2 sigmoid(2 v) - 1, in the sigmoid gates' loop
    args_X, args_W, args_h0, args_c0 = X.reshape(-1), W.reshape(-1), h0.reshape(-1), c0.reshape(-1)
    if nchunks == 1:
        forward_loop(cell, args_X, args_W, WTp, pw, b, args_h0, args_c0, Hs.reshape(-1), Z.reshape(-1), coef, _U(T),
                     _U(N), _U(H), _U(0), _U(N), blas)
    else:
        forward_chunks(cell, args_X, args_W, WTp, pw, b, args_h0, args_c0, Hs.reshape(-1), Z.reshape(-1), coef, _U(T),
                       _U(N), _U(H), _U(nchunks), blas)


@njit(cache=True, error_model="numpy", boundscheck=False)
def backward_call(cell, W, h0, c0, Hs, Z, dHs, dX, dh, dc, dGn, nchunks, blas, blas_dw):
    """Backprop through time from :func:`chainprod.kernels.recurrent_numba.backward`'s checked arrays: ``(dW, db)``.

    Shapes as :func:`forward_call`'s; ``dX`` the output, ``dh`` and ``dc``
    the adjoints arriving at the last state (``dc`` ``(0, H)`` but for the
    LSTM), overwritten with ``dh0`` and ``dc0``; ``dGn`` as
    :func:`backward_loop` takes it. Returns ``dW_hh`` ``(G H, H)``, C order
    (without ``blas_dw``: else zeros, for the caller's products) and
    ``db_hh`` in float64.
    """
    T, N, H = Hs.shape
    GH = W.shape[0]
    pw = _panel_cols(Hs, False)  # a step's BLAS reads W as it is stored: the panels serve the loops alone
    Wp = to_panels(W, False, pw)
    L = lanes(Hs)
    Hp = (_U(H) + (L - _U(1))) // L * L
    args = (cell, W.reshape(-1), Wp, pw, h0.reshape(-1), c0.reshape(-1), Hs.reshape(-1), Z.reshape(-1),
            dHs.reshape(-1), dX.reshape(-1))
    if nchunks == 1:
        dWp = np.zeros(GH * Hp, Hs.dtype)
        db = np.zeros(GH)  # summed in float64 over every step and sample (why: the module docstring)
        backward_loop(*args, dWp, db, dh.reshape(-1), dc.reshape(-1), dGn.reshape(-1), _U(T), _U(N), _U(H), _U(0),
                      _U(N), blas, blas_dw)
    else:
        dWs = np.zeros((nchunks, GH * Hp), Hs.dtype)  # each group's sums, added up below
        dbs = np.zeros((nchunks, GH))
        backward_chunks(*args, dWs, dbs, dh.reshape(-1), dc.reshape(-1), dGn.reshape(-1), _U(T), _U(N), _U(H),
                        _U(nchunks), blas, blas_dw)
        dWp = dWs.sum(axis=0)
        db = dbs.sum(axis=0)
    return dWp.reshape(GH, Hp)[:, :H].copy(), db
