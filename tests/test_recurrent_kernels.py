"""The compiled recurrent kernels (``kernels.recurrent_numba``) against torch autograd and the numpy reference.

The pipeline under test is the one the models run: ``X = u W_ih^T + b_ih``
(one product), the kernels' ``forward`` and ``backward``, then
``dW_ih = dX^T u``, ``db_ih = sum dX``, ``du = dX W_ih``. The reference is
torch's ``nn.RNN / nn.GRU / nn.LSTM`` in float64 with the same weights and
a loss with a term on every output *and* on the last state (so ``dhT`` and
``dcT`` are not zero): every output, every parameter gradient, ``du``,
``dh0`` and ``dc0`` are compared. float64 agrees to 1e-10 and float32
(computed in float32 on the rounded inputs) to 1e-4, relative to the
largest entry. Every cell runs every path of the kernels: fused loops, BLAS
per step, and ``dW_hh`` after the loop.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

from chainprod.kernels import recurrent_numba as kn  # noqa: E402

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
D_IN, H, T = 3, 4, 7
TOL = {np.float64: 1e-10, np.float32: 1e-4}
#: (STEP_BLAS_MIN and _BATCH, DW_BLAS_MIN): every product a loop; every product in BLAS; loops per step, dW_hh after
PATHS = {"loops": (1 << 62, 1 << 62), "blas": (0, 0), "loops+dw_after": (1 << 62, 0)}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    step, dw = PATHS[request.param]
    monkeypatch.setattr(kn, "STEP_BLAS_MIN", step)
    monkeypatch.setattr(kn, "STEP_BLAS_MIN_BATCH", step)
    monkeypatch.setattr(kn, "DW_BLAS_MIN", dw)
    return request.param


def _problem(cell, N, dtype, seed=0, T=T):
    rng = np.random.default_rng(seed)
    G = kn.GATES[cell]
    p = {"u": rng.standard_normal((T, N, D_IN)), "W_ih": 0.6 * rng.standard_normal((G * H, D_IN)),
         "b_ih": 0.3 * rng.standard_normal(G * H), "W_hh": 0.6 * rng.standard_normal((G * H, H)),
         "b_hh": 0.3 * rng.standard_normal(G * H), "h0": 0.5 * rng.standard_normal((N, H)),
         "dHs": rng.standard_normal((T, N, H)), "dhT": rng.standard_normal((N, H))}
    if cell == "lstm":
        p["c0"], p["dcT"] = 0.5 * rng.standard_normal((N, H)), rng.standard_normal((N, H))
    return {k: v.astype(dtype) for k, v in p.items()}


def _ours(kern, cell, p, dhT=True):
    """Outputs and gradients by the kernel set ``kern`` and the numpy glue around it."""
    u, W_ih = p["u"], p["W_ih"]
    T_, N, _ = u.shape
    X = (u.reshape(T_ * N, D_IN) @ W_ih.T + p["b_ih"]).reshape(T_, N, -1)
    Hs, Z = kern.forward(cell, X, p["W_hh"], p["b_hh"], p["h0"], p.get("c0"))
    dX, dW_hh, db_hh, dh0, dc0 = kern.backward(cell, X, p["W_hh"], p["b_hh"], p["h0"], p.get("c0"), Hs, Z,
                                               p["dHs"], p["dhT"] if dhT else None, p.get("dcT") if dhT else None)
    dX2 = dX.reshape(T_ * N, -1)
    out = {"Hs": Hs, "weight_ih": dX2.T @ u.reshape(T_ * N, D_IN), "bias_ih": dX2.sum(0), "weight_hh": dW_hh,
           "bias_hh": db_hh, "u": (dX2 @ W_ih).reshape(u.shape), "h0": dh0}
    if cell == "lstm":
        out["c0"] = dc0
    else:
        assert dc0 is None
    return out


def _torch(cell, p):
    """The same quantities by torch autograd in float64: loss = sum(dHs * output) + sum(dhT * h_n) (+ dcT * c_n)."""
    if cell.startswith("rnn"):
        m = torch.nn.RNN(D_IN, H, nonlinearity=cell[4:])
    else:
        m = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](D_IN, H)
    m = m.double()
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in p.items()}
    with torch.no_grad():
        for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"):
            getattr(m, name + "_l0").copy_(t[{"weight_ih": "W_ih", "bias_ih": "b_ih", "weight_hh": "W_hh",
                                                "bias_hh": "b_hh"}[name]])
    u, h0 = t["u"].requires_grad_(), t["h0"][None].requires_grad_()
    if cell == "lstm":
        c0 = t["c0"][None].requires_grad_()
        out, (hn, cn) = m(u, (h0, c0))
        loss = (out * t["dHs"]).sum() + (hn[0] * t["dhT"]).sum() + (cn[0] * t["dcT"]).sum()
    else:
        out, hn = m(u, h0)
        loss = (out * t["dHs"]).sum() + (hn[0] * t["dhT"]).sum()
    loss.backward()
    ref = {"Hs": out, "u": u.grad, "h0": h0.grad[0]}
    ref.update({name: getattr(m, name + "_l0").grad for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")})
    if cell == "lstm":
        ref["c0"] = c0.grad[0]
    return {k: v.detach().numpy() for k, v in ref.items()}


def _assert_close(ours, ref, tol, what=""):
    assert set(ours) == set(ref)
    for k in ref:
        a, b = np.asarray(ours[k], np.float64), np.asarray(ref[k], np.float64)
        assert a.shape == b.shape, (what, k, a.shape, b.shape)
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)
        assert err <= tol, f"{what} {k}: relative difference {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_autograd(cell, N, dtype, path):
    p = _problem(cell, N, dtype)
    ours = _ours(kn, cell, p)
    for k, v in ours.items():
        assert v.dtype == dtype, (k, v.dtype)  # float32 stays float32
    p64 = {k: v.astype(np.float64) for k, v in p.items()}  # torch on the same (rounded) inputs
    _assert_close(ours, _torch(cell, p64), TOL[dtype], f"{cell} N={N} {np.dtype(dtype).name} {path}")


@pytest.mark.parametrize("cell", CELLS)
def test_chunks_in_time_equal_the_whole(cell, path):
    """Two halves, the second one's dh0 (dc0) fed as the first one's dhT (dcT), give the whole sequence's."""
    p = _problem(cell, 2, np.float64, seed=1, T=8)
    X = np.random.default_rng(2).standard_normal((8, 2, kn.GATES[cell] * H))
    W, b, h0, c0 = p["W_hh"], p["b_hh"], p["h0"], p.get("c0")
    Hs, Z = kn.forward(cell, X, W, b, h0, c0)
    whole = kn.backward(cell, X, W, b, h0, c0, Hs, Z, p["dHs"], p["dhT"], p.get("dcT"))
    Hs1, Z1 = kn.forward(cell, X[:5], W, b, h0, c0)
    h_mid, c_mid = Hs1[-1], (Z1[-1, :, 4 * H:] if cell == "lstm" else None)
    Hs2, Z2 = kn.forward(cell, X[5:], W, b, h_mid, c_mid)
    np.testing.assert_allclose(np.concatenate([Hs1, Hs2]), Hs, rtol=0, atol=1e-14)
    dX2, dW2, db2, dh_mid, dc_mid = kn.backward(cell, X[5:], W, b, h_mid, c_mid, Hs2, Z2, p["dHs"][5:], p["dhT"],
                                                p.get("dcT"))
    dX1, dW1, db1, dh0, dc0 = kn.backward(cell, X[:5], W, b, h0, c0, Hs1, Z1, p["dHs"][:5], dh_mid, dc_mid)
    for a, b_ in ((np.concatenate([dX1, dX2]), whole[0]), (dW1 + dW2, whole[1]), (db1 + db2, whole[2]),
                  (dh0, whole[3])):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(dc0, whole[4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_numpy_reference(cell, dtype, path):
    kr = pytest.importorskip("chainprod.kernels.recurrent_numpy")
    p = _problem(cell, 3, dtype, seed=3)
    tol = {np.float64: 1e-12, np.float32: 1e-5}[dtype]
    _assert_close(_ours(kn, cell, p), _ours(kr, cell, p), tol, f"{cell} {np.dtype(dtype).name} {path}")
    _assert_close(_ours(kn, cell, p, dhT=False), _ours(kr, cell, p, dhT=False), tol, "dhT=None")


@pytest.mark.parametrize("cell", CELLS)
def test_inputs_are_never_written(cell, path):
    p = _problem(cell, 2, np.float64, seed=4)
    X = np.random.default_rng(5).standard_normal((T, 2, kn.GATES[cell] * H))
    args = [X, p["W_hh"], p["b_hh"], p["h0"], p.get("c0")]
    before = [None if a is None else a.copy() for a in args]
    Hs, Z = kn.forward(cell, *args)
    rest = [Hs, Z, p["dHs"], p["dhT"], p.get("dcT")]
    before_rest = [None if a is None else a.copy() for a in rest]
    kn.backward(cell, *args, *rest)
    for a, b in zip(args + rest, before + before_rest):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_one_step_and_non_contiguous_inputs(cell):
    """T = 1 (no product over earlier states), and inputs that are views: the same as contiguous copies."""
    p = _problem(cell, 2, np.float64, seed=6, T=1)
    _assert_close(_ours(kn, cell, p), _torch(cell, p), 1e-10, "T=1")
    G = kn.GATES[cell]
    X = np.random.default_rng(7).standard_normal((3, 2, 2 * G * H))[:, :, ::2]
    W = np.asfortranarray(p["W_hh"])
    a = kn.forward(cell, X, W, p["b_hh"], p["h0"], p.get("c0"))
    b = kn.forward(cell, X.copy(), p["W_hh"], p["b_hh"], p["h0"], p.get("c0"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_bad_arguments_are_named():
    X, W, b, h0 = np.zeros((2, 1, 8)), np.zeros((8, 2)), np.zeros(8), np.zeros((1, 2))
    with pytest.raises(ValueError, match="cell must be one of"):
        kn.forward("elman", X, W, b, h0, None)
    with pytest.raises(ValueError, match="X's last axis"):
        kn.forward("gru", X, W, b, h0, None)
    with pytest.raises(ValueError, match=r"h0 has shape \(2, 2\)"):
        kn.forward("lstm", X, W, b, np.zeros((2, 2)), h0)
    with pytest.raises(ValueError, match="c0 is only for 'lstm'"):
        kn.forward("rnn_tanh", np.zeros((2, 1, 2)), np.zeros((2, 2)), np.zeros(2), h0, h0)
    with pytest.raises(TypeError, match="W_hh has dtype float32"):
        kn.forward("lstm", X, W.astype(np.float32), b, h0, h0)
    with pytest.raises(TypeError, match="float32 or float64"):
        kn.forward("lstm", X.astype(np.int64), W, b, h0, h0)
    Hs, Z = kn.forward("lstm", X, W, b, h0, h0)
    with pytest.raises(ValueError, match=r"dHs has shape \(1, 1, 2\)"):
        kn.backward("lstm", X, W, b, h0, h0, Hs, Z, Hs[:1])
    with pytest.raises(ValueError, match=r"Z has shape"):
        kn.backward("lstm", X, W, b, h0, h0, Hs, Z[:, :, :4], Hs)
