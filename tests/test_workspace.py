"""Reused buffers for a call's temporaries: what a scope hands out, what it keeps, and that no result aliases it.

The recurrent models take their large temporaries from a workspace scope.
A result that came from the pool would be overwritten by the next call:
these tests make every temporary pooled (``MIN_BYTES = 0``), call twice
with different data and check the first call's results are still torch
autograd's (float64, 1e-10).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import chainprod as cp
from chainprod import _workspace
from chainprod.kernels.recurrent import get_recurrent_kernels

HAVE_NUMBA = (importlib.util.find_spec("numba") is not None
              and importlib.util.find_spec("chainprod.kernels.recurrent_numba") is not None)
KERNELS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba kernels absent"))]


def _address(a):
    return a.__array_interface__["data"][0]


@pytest.fixture
def pool_everything(monkeypatch):
    monkeypatch.setattr(_workspace, "MIN_BYTES", 0)
    cp.clear_caches()
    yield
    cp.clear_caches()


def test_scope_hands_out_c_contiguous_arrays_and_reuses_them(pool_everything):
    with _workspace.scope() as ws:
        a = ws.empty((3, 5), np.float32)
        b = ws.zeros(7, np.float64)
        assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert b.shape == (7,) and not b.any()
        first = _address(a), _address(b)
        assert first[0] != first[1]
    with _workspace.scope() as ws:  # the same sizes again: the same memory
        assert {_address(ws.empty((3, 5), np.float32)), _address(ws.empty(7, np.float64))} == set(first)


def test_nested_scopes_never_share_a_buffer(pool_everything):
    with _workspace.scope() as outer:
        a = outer.empty(100, np.float64)
        with _workspace.scope() as inner:
            b = inner.empty(100, np.float64)
            assert _address(a) != _address(b)
        c = outer.empty(100, np.float64)  # b's buffer is back in the pool, a's is still taken
        assert _address(c) == _address(b) and _address(c) != _address(a)


def test_limit_small_arrays_and_clear_caches(monkeypatch, pool_everything):
    with _workspace.scope() as ws:
        a = _address(ws.empty(1000, np.float64))
    cp.clear_caches()  # frees the pool: the next buffer is a new one (its address may repeat, so only count)
    assert _workspace._pool().kept == 0
    monkeypatch.setattr(_workspace, "LIMIT_BYTES", 4096)
    with _workspace.scope() as ws:
        ws.empty(10_000, np.float64)  # over the limit: not kept
    assert _workspace._pool().kept == 0
    monkeypatch.setattr(_workspace, "MIN_BYTES", 1 << 20)
    with _workspace.scope() as ws:
        small = ws.empty(10, np.float64)  # below MIN_BYTES: a plain array, never pooled
    assert _workspace._pool().kept == 0 and small.base is None and isinstance(a, int)


@pytest.mark.parametrize("kernels", KERNELS)
def test_kernels_write_into_out_and_refuse_a_wrong_one(kernels):
    k = get_recurrent_kernels(kernels)
    rng = np.random.default_rng(0)
    T, N, H = 5, 2, 3
    X = rng.standard_normal((T, N, 4 * H))
    W, b, h0, c0 = rng.standard_normal((4 * H, H)), rng.standard_normal(4 * H), np.zeros((N, H)), np.zeros((N, H))
    Hs, Z = k.forward("lstm", X, W, b, h0, c0)
    out = (np.empty_like(Hs), np.empty_like(Z))
    Hs2, Z2 = k.forward("lstm", X, W, b, h0, c0, out=out)
    assert Hs2 is out[0] and Z2 is out[1]
    np.testing.assert_array_equal(Hs2, Hs)
    np.testing.assert_array_equal(Z2, Z)
    dHs = rng.standard_normal(Hs.shape)
    ref = k.backward("lstm", X, W, b, h0, c0, Hs, Z, dHs)
    dX = np.empty_like(X)
    got = k.backward("lstm", X, W, b, h0, c0, Hs, Z, dHs, out=dX)
    assert got[0] is dX
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)
    with pytest.raises(ValueError, match=r"out\[0\].*float64.*\(5, 2, 3\)"):
        k.forward("lstm", X, W, b, h0, c0, out=(np.empty((5, 2, 3), np.float32), Z2))
    with pytest.raises(ValueError, match=r"out\[0\].*\(5, 2, 12\)"):
        k.backward("lstm", X, W, b, h0, c0, Hs, Z, dHs, out=np.empty((5, 2, 11)))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_results_of_one_call_survive_the_next(pool_everything, kernels, cell, batch_first):
    torch = pytest.importorskip("torch")
    mode = "RNN" if cell.startswith("rnn") else cell.upper()
    torch.manual_seed(0)
    module = getattr(torch.nn, mode)(3, 4, num_layers=2, batch_first=batch_first).double()
    model = getattr(cp, mode).from_torch(module)
    rng = np.random.default_rng(1)
    shape = (2, 6, 3) if batch_first else (6, 2, 3)
    x1, x2 = rng.standard_normal(shape), rng.standard_normal(shape)
    y1, y2 = rng.standard_normal(shape[:2] + (4,)), rng.standard_normal(shape[:2] + (4,))

    def torch_ref(x, y):
        module.zero_grad(set_to_none=True)
        xt = torch.tensor(x, requires_grad=True)
        out, _ = module(xt)
        torch.nn.functional.mse_loss(out, torch.tensor(y)).backward()
        g = {n: p.grad.numpy().copy() for n, p in module.named_parameters()}
        g["input"] = xt.grad.numpy().copy()
        return out.detach().numpy().copy(), g

    out1 = model.forward(x1, kernels=kernels)[0]
    v1, g1 = cp.value_and_grad(model, x1, y1, loss="mse", method="backprop", kernels=kernels, with_inputs=True)
    snapshot = {k: v.copy() for k, v in g1.items()}
    model.forward(x2, kernels=kernels)
    cp.value_and_grad(model, x2, y2, loss="mse", method="backprop", kernels=kernels, with_inputs=True)
    ref_out, ref = torch_ref(x1, y1)
    np.testing.assert_allclose(out1, ref_out, rtol=0, atol=1e-12)
    for name, r in ref.items():
        np.testing.assert_array_equal(g1[name], snapshot[name])  # not overwritten by the second call
        np.testing.assert_allclose(g1[name], r, rtol=1e-10, atol=1e-12, err_msg=name)
