"""Layers and chains: forward maps, activation derivatives, construction helpers."""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.testing import random_chain

ACTS = {
    "tanh": np.tanh,
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "softplus": lambda z: np.log(1.0 + np.exp(z)),
    "identity": lambda z: z,
    None: lambda z: z,
}


@pytest.mark.parametrize("act", list(ACTS), ids=[str(a) for a in ACTS])
def test_dense_forward(act):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(4)
    ly = cp.Dense(W, b, act)
    x = rng.standard_normal((5, 3))
    np.testing.assert_allclose(ly.forward(x), ACTS[act](x @ W.T + b), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ly(x[2]), ACTS[act](W @ x[2] + b), rtol=1e-13, atol=1e-15)
    assert ly.d_in == 3 and ly.d_out == 4 and ly.kind == "dense"
    assert ly.activation == ("identity" if act is None else act)
    assert len(ly.params) == 2 and ly.params[0].shape == (4, 3) and ly.params[1].shape == (4,)


@pytest.mark.parametrize("act", list(ACTS), ids=[str(a) for a in ACTS])
def test_diagonal_forward(act):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(3), rng.standard_normal(3)
    ly = cp.Diagonal(a, b, act)
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(ly.forward(x), ACTS[act](a * x + b), rtol=1e-13, atol=1e-15)
    assert ly.d_in == ly.d_out == 3 and ly.kind == "diag"


def test_diagonal_default_activation_is_identity():
    assert cp.Diagonal(np.ones(2), np.zeros(2)).activation == "identity"
    assert cp.Dense(np.eye(2), np.zeros(2)).activation == "tanh"


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "softplus", "identity"])
def test_activation_derivative_from_output(act):
    # derivs(y) must equal f'(z) where y = f(z): compare with central differences of f
    z = np.linspace(-4, 4, 41) + 0.013  # avoid relu's kink at 0
    f = ACTS[act]
    y = f(z)
    h = 1e-6
    want = (f(z + h) - f(z - h)) / (2 * h)
    got = cp.Dense.derivs(y, act)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_sigmoid_and_softplus_do_not_overflow():
    ly_s = cp.Diagonal(np.ones(3), np.zeros(3), "sigmoid")
    ly_p = cp.Diagonal(np.ones(3), np.zeros(3), "softplus")
    z = np.array([-1000.0, 0.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
        ys = ly_s.forward(z)
        yp = ly_p.forward(z)
    np.testing.assert_allclose(ys, [0.0, 0.5, 1.0], atol=1e-300)
    np.testing.assert_allclose(yp, [0.0, np.log(2.0), 1000.0], rtol=1e-15, atol=1e-300)


def test_params_are_frozen_copies():
    W = np.eye(3)
    b = np.zeros(3)
    ly = cp.Dense(W, b)
    W[0, 0] = 99.0  # the caller's array changing later does not change the layer
    assert ly.params[0][0, 0] == 1.0
    with pytest.raises(ValueError):
        ly.params[0][0, 0] = 5.0
    ro = np.ones(3)
    ro.setflags(write=False)
    d = cp.Diagonal(ro, ro)
    np.testing.assert_array_equal(d.forward(np.ones(3)), 2 * np.ones(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    ly = cp.Dense(np.eye(2, dtype=dtype), np.zeros(2, dtype=dtype))
    assert ly.dtype == dtype and ly.params[0].dtype == dtype
    chain = cp.mlp([3, 4, 1], dtype=dtype)
    assert chain.dtype == dtype
    out = chain.forward(np.ones((2, 3), dtype=dtype))
    assert out.dtype == dtype


def compose(chain, x):
    h = x
    for ly in chain.layers:
        p0, p1 = ly.params
        z = h @ p0.T + p1 if isinstance(ly, cp.Dense) else p0 * h + p1
        h = ACTS[ly.activation](z)
    return h


def test_chain_basics():
    layers = [cp.Dense(np.ones((4, 3)) / 3, np.zeros(4)), cp.Diagonal(np.ones(4), np.ones(4), "relu"),
              cp.Diagonal(2 * np.ones(4), np.zeros(4), "relu"), cp.Dense(np.ones((1, 4)), np.zeros(1), None)]
    chain = cp.Chain(layers)
    assert len(chain) == 4 and chain[1] is layers[1] and list(chain) == layers
    assert chain.widths == [3, 4, 4, 4, 1] and chain.d_in == 3 and chain.d_out == 1
    assert chain.params == [ly.params for ly in layers]
    assert "Chain" in repr(chain) and "L=4" in repr(chain)
    x = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_allclose(chain.forward(x), compose(chain, x), rtol=1e-13)
    np.testing.assert_allclose(chain(x), chain.forward(x), rtol=0)
    np.testing.assert_allclose(chain.forward(x[0]), compose(chain, x[:1])[0], rtol=1e-13)
    assert chain.forward(x[0]).shape == (1,)


@pytest.mark.parametrize("kind", ["dense", "diag", "mixed"])
def test_chain_forward_matches_layer_by_layer(kind):
    # runs of identical layers are stacked internally; the result must not change
    for seed in range(3):
        chain = random_chain(12, 4, kind=kind, seed=seed, activation=["tanh", "relu", "sigmoid"][seed])
        x = np.random.default_rng(seed).standard_normal((3, 4))
        h = x
        for ly in chain.layers:
            h = ly.forward(h)
        np.testing.assert_allclose(chain.forward(x), h, rtol=1e-13)
        np.testing.assert_allclose(chain.forward(x), compose(chain, x), rtol=1e-12)


def test_forward_does_not_modify_input():
    chain = random_chain(6, 3, kind="mixed", seed=2)
    x = np.random.default_rng(2).standard_normal((2, 3))
    x.setflags(write=False)
    before = x.copy()
    chain.forward(x)
    assert np.array_equal(x, before)


def test_mlp():
    chain = cp.mlp([5, 7, 6, 1], activation="relu", seed=3)
    assert chain.widths == [5, 7, 6, 1]
    assert [ly.activation for ly in chain] == ["relu", "relu", "identity"]
    assert all(isinstance(ly, cp.Dense) for ly in chain)
    same = cp.mlp([5, 7, 6, 1], activation="relu", seed=3)
    other = cp.mlp([5, 7, 6, 1], activation="relu", seed=4)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(chain.params, same.params))
    assert not np.array_equal(chain.params[0][0], other.params[0][0])
    big = cp.mlp([400, 300, 1], seed=0)
    std = big.params[0][0].std()
    assert 0.8 / np.sqrt(400) < std < 1.2 / np.sqrt(400)  # LeCun N(0, 1/d_in)


def test_diagonal_chain():
    chain = cp.diagonal_chain(10, 5, seed=1)
    assert len(chain) == 11 and chain.d_out == 1
    assert all(isinstance(ly, cp.Diagonal) for ly in chain.layers[:10])
    assert isinstance(chain.layers[10], cp.Dense)
    gains = np.stack([ly.params[0] for ly in chain.layers[:10]])
    assert gains.min() >= 0.9 and gains.max() <= 1.0
    bare = cp.diagonal_chain(4, 3, readout=False)
    assert len(bare) == 4 and bare.d_out == 3


def test_random_chain_helper():
    for kind in ("dense", "diag", "mixed"):
        chain = random_chain(7, 4, kind=kind, seed=1, d_in=3)
        assert len(chain) == 7 and chain.d_in == 3 and chain.d_out == 1
    diag = random_chain(7, 4, kind="diag", seed=1)
    assert sum(isinstance(ly, cp.Diagonal) for ly in diag) == 6


def test_with_params():
    chain = random_chain(5, 3, kind="mixed", seed=4)
    doubled = chain.with_params([tuple(2 * p for p in ps) for ps in chain.params])
    assert [type(a) for a in doubled] == [type(b) for b in chain]
    assert [a.activation for a in doubled] == [b.activation for b in chain]
    for a, b in zip(doubled.params, chain.params):
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p, 2 * q)
