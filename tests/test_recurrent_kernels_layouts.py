"""The compiled recurrent kernels' own layouts against plain references.

The kernels pad rows to whole vectors, block their products two rows at a
time, cut the batch into groups run on numba's threads and use float32
activations of their own (:mod:`chainprod.kernels.recurrent_numba_loops`,
``_simd``, ``_act``). Each of those is checked here where its edge cases are:
hidden sizes that are not a whole number of vectors (1, 7, 9, 20, 70), odd
batches, uneven groups of the batch, and every cell, against the numpy
reference kernels (``recurrent_numpy``) and numpy's own products and
functions.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from chainprod.kernels import recurrent_numba as kn  # noqa: E402
from chainprod.kernels import recurrent_numpy as kr  # noqa: E402

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _problem(cell, T, N, H, dtype, seed):
    rng = np.random.default_rng(seed)
    G = kn.GATES[cell]
    p = {"X": rng.standard_normal((T, N, G * H)), "W": 0.6 * rng.standard_normal((G * H, H)),
         "b": 0.3 * rng.standard_normal(G * H), "h0": 0.5 * rng.standard_normal((N, H)),
         "dHs": rng.standard_normal((T, N, H)), "dhT": rng.standard_normal((N, H)),
         "c0": 0.5 * rng.standard_normal((N, H)), "dcT": rng.standard_normal((N, H))}
    p = {k: v.astype(dtype) for k, v in p.items()}
    if cell != "lstm":
        p["c0"] = p["dcT"] = None
    return p


def _run(kern, cell, p):
    Hs, Z = kern.forward(cell, p["X"], p["W"], p["b"], p["h0"], p["c0"])
    grads = kern.backward(cell, p["X"], p["W"], p["b"], p["h0"], p["c0"], Hs, Z, p["dHs"], p["dhT"], p["dcT"])
    return [Hs, Z, *grads]


def _assert_same(ours, ref, tol, what):
    names = ["Hs", "Z", "dX", "dW_hh", "db_hh", "dh0", "dc0"]
    for name, a, b in zip(names, ours, ref):
        if b is None:
            assert a is None, (what, name)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name, a.shape, b.shape, a.dtype, b.dtype)
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0)) / scale
        assert err <= tol, f"{what} {name}: relative difference {err:.2e} > {tol:.0e}"


@pytest.fixture(params=["loops", "blas", "loops+dw_after"])
def path(request, monkeypatch):
    step, dw = {"loops": (1 << 62, 1 << 62), "blas": (0, 0), "loops+dw_after": (1 << 62, 0)}[request.param]
    monkeypatch.setattr(kn, "STEP_BLAS_MIN", step)
    monkeypatch.setattr(kn, "STEP_BLAS_MIN_BATCH", step)
    monkeypatch.setattr(kn, "DW_BLAS_MIN", dw)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("H", [1, 7, 9, 20, 70])
@pytest.mark.parametrize("cell", CELLS)
def test_hidden_sizes_that_are_not_whole_vectors(cell, H, dtype, path):
    """Rows padded to 8 (float32) or 4 (float64) values; batches of 1, 2 (one pair of rows) and 3 (a pair and one).

    From ``H = 70`` ``W_hh`` is in more than one panel in both loops (64 columns a panel in float32, 32 in float64);
    the tolerance grows with the terms of a sum (float32 at ``H = 70``: up to 3.6e-5).
    """
    tol = TOL[dtype] * max(1, H // 20)
    for N in (1, 2, 3):
        p = _problem(cell, 6, N, H, dtype, seed=10 * H + N)
        _assert_same(_run(kn, cell, p), _run(kr, cell, p), tol, f"{cell} H={H} N={N} {path}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_groups_of_the_batch_on_threads(cell, dtype, path, monkeypatch):
    """Five samples cut into three groups (2, 1, 2 rows... as ``c N // 3`` gives): the same as the reference."""
    monkeypatch.setattr(kn, "_chunks", lambda T, N, GH, H: min(3, N))
    p = _problem(cell, 9, 5, 6, dtype, seed=7)
    _assert_same(_run(kn, cell, p), _run(kr, cell, p), TOL[dtype], f"{cell} 3 groups {path}")


def test_chunks_follow_threads_and_work(monkeypatch):
    assert kn._chunks(1000, 16, 80, 20) == 1  # off by default (kn.PARALLEL_MIN_WORK)
    monkeypatch.setattr(kn, "PARALLEL_MIN_WORK", 1 << 18)
    monkeypatch.setattr(kn.numba, "get_num_threads", lambda: 4)
    assert kn._chunks(1000, 16, 80, 20) == 4
    assert kn._chunks(1000, 3, 80, 20) == 3  # at most one group per sample
    assert kn._chunks(1000, 1, 80, 20) == 1
    assert kn._chunks(2, 16, 4, 1) == 1  # too little work to wake threads
    monkeypatch.setattr(kn.numba, "get_num_threads", lambda: 1)
    assert kn._chunks(1000, 16, 80, 20) == 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout", ["panels", "C"])
def test_rows_times_against_numpy(dtype, accumulate, layout):
    """``out[n, :w] (+)= sum_k a[n, k] B[k, :w]`` for widths of 1 to 19 vectors and 1 to 5 rows, strided ``a``.

    ``B`` in panels (up to three of them, the last one narrower) or in C order.
    """
    from chainprod.kernels.recurrent_numba_simd import padded_width, panel_width, panels, rows_times

    rng = np.random.default_rng(3)
    L = padded_width(1, dtype)
    u = np.uint64
    for nvec in (1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 19):
        for NB in (1, 2, 3, 5):
            K, width = 7, nvec * L
            a = rng.standard_normal((NB, 2 * K)).astype(dtype)  # a[n, k] at a[n, 2 k]: astep = 2
            B = rng.standard_normal((K, width)).astype(dtype)
            out = rng.standard_normal((NB, width + L)).astype(dtype)
            want = a[:, ::2].astype(np.float64) @ B.astype(np.float64)
            if accumulate:
                want += out[:, :width]
            before_tail = out[:, width:].copy()
            Bl, pw = (panels(B), panel_width(dtype)) if layout == "panels" else (B.reshape(-1), 1 << 62)
            rows_times(out.reshape(-1), u(0), u(width + L), a.reshape(-1), u(0), u(2 * K), u(2), u(K), Bl, u(pw),
                       u(width), u(NB), accumulate)
            np.testing.assert_allclose(out[:, :width], want, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
            np.testing.assert_array_equal(out[:, width:], before_tail)  # nothing written beyond a row's width


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_panels_layout_and_alignment(dtype):
    """Column ``c`` of row ``k`` at ``(c // pw) pw K + k w_p + c % pw``, zeros in the padding, from a cache line."""
    from chainprod.kernels.recurrent_numba_simd import padded_width, panel_width, panels

    rng = np.random.default_rng(5)
    pw = panel_width(dtype)
    for K, cols in ((3, 1), (5, pw), (4, pw + 3), (2, 2 * pw + 1)):
        b = rng.standard_normal((K, cols)).astype(dtype)
        flat = panels(b)
        width = padded_width(cols, dtype)
        assert flat.shape == (K * width,) and flat.dtype == dtype
        assert flat.ctypes.data % 64 == 0
        full = np.zeros((K, width), dtype)
        full[:, :cols] = b
        for k in range(K):
            for c in range(width):
                p0 = c // pw * pw
                w = min(pw, width - p0)
                assert flat[p0 * K + k * w + c - p0] == full[k, c], (K, cols, k, c)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_to_panels_of_a_transpose_and_in_c_order(dtype):
    """``to_panels(b, True, pw)`` is ``panels(b.T)``; a ``pw`` at least the width gives C order, rows padded."""
    from chainprod.kernels.recurrent_numba_simd import padded_width, panel_width, panels, to_panels

    rng = np.random.default_rng(6)
    pw = panel_width(dtype)
    for R, C in ((1, 1), (3, pw + 5), (2 * pw + 1, 4), (20, 80)):
        b = rng.standard_normal((R, C)).astype(dtype)
        np.testing.assert_array_equal(to_panels(b, True, np.uint64(pw)), panels(b.T))
        c_order = to_panels(b, True, np.uint64(1 << 62))
        assert c_order.ctypes.data % 64 == 0
        full = np.zeros((C, padded_width(R, dtype)), dtype)
        full[:, :R] = b.T
        np.testing.assert_array_equal(c_order.reshape(C, -1), full)


def test_float32_activations():
    """The float32 ``sigmoid`` and ``tanh`` within 4e-7 of float64 numpy over their whole range, NaN kept."""
    from numba import njit

    from chainprod.kernels.recurrent_numba_act import sigmoid, tanh

    @njit
    def both(x, s, t):
        for i in range(x.size):
            s[i] = sigmoid(x[i])
            t[i] = tanh(x[i])

    x = np.concatenate([np.linspace(-120, 120, 20001), np.linspace(-1e-3, 1e-3, 101), [0.0, -0.0, np.nan]])
    x = x.astype(np.float32)
    s, t = np.empty_like(x), np.empty_like(x)
    both(x, s, t)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        s_ref = 1 / (1 + np.exp(-x64))
    ok = ~np.isnan(x)
    assert np.max(np.abs(s[ok] - s_ref[ok])) < 4e-7
    assert np.max(np.abs(t[ok] - np.tanh(x64[ok]))) < 4e-7
    assert np.isnan(s[-1]) and np.isnan(t[-1])
    assert s.dtype == t.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lstm_gate_is_sigmoid_or_tanh(dtype):
    from numba import njit

    from chainprod.kernels.recurrent_numba_act import gate

    @njit
    def gates(x, c, out):
        for i in range(x.size):
            out[i] = gate(x[i], c[i])

    x = np.linspace(-40, 40, 4001).astype(dtype)
    for c, ref in ((1, 1 / (1 + np.exp(-x.astype(np.float64)))), (2, np.tanh(x.astype(np.float64)))):
        out = np.empty_like(x)
        gates(x, np.full_like(x, c), out)
        assert np.max(np.abs(out - ref)) < (4e-7 if dtype == np.float32 else 1e-15), c
