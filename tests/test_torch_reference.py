"""``grad`` against torch autograd on a torch model with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import LOCAL_BACKEND_IDS, LOCAL_BACKENDS, grads_close

import chainprod as cp
from chainprod.testing import random_chain

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

METHODS = ["backprop", "sequential", "independent", "hillis_steele", "sklansky", "brent_kung", "blelloch",
           "chunked", "auto"]

TORCH_ACT = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "identity": lambda z: z,
}


class Elementwise(torch.nn.Module):
    """A diagonal layer ``a * x + b`` (before its activation)."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return self.a * x + self.b


def torch_model(chain):
    """(modules, forward fn) with chainprod's weights copied in."""
    mods = []
    for ly in chain.layers:
        p0, p1 = (np.array(p, copy=True) for p in ly.params)
        if isinstance(ly, cp.Dense):
            m = torch.nn.Linear(ly.d_in, ly.d_out, dtype=torch.float64 if p0.dtype == np.float64 else torch.float32)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(p0))
                m.bias.copy_(torch.from_numpy(p1))
        else:
            m = Elementwise(p0, p1)
        mods.append((m, TORCH_ACT[ly.activation]))

    def fwd(x):
        h = x
        for m, act in mods:
            h = act(m(h))
        return h

    return mods, fwd


def torch_grads(chain, x, y=None):
    mods, fwd = torch_model(chain)
    out = fwd(torch.from_numpy(np.array(x, copy=True)))
    if y is None:
        loss = out.sum()
    else:
        loss = torch.nn.functional.mse_loss(out, torch.from_numpy(np.array(y, copy=True)))
    loss.backward()
    grads = []
    for m, _ in mods:
        if isinstance(m, torch.nn.Linear):
            grads.append((m.weight.grad.numpy().copy(), m.bias.grad.numpy().copy()))
        else:
            grads.append((m.a.grad.numpy().copy(), m.b.grad.numpy().copy()))
    return float(loss.detach()), out.detach().numpy(), grads


def cases():
    rng = np.random.default_rng(0)
    out = []
    specs = [
        ("mlp-tanh", cp.mlp([5, 8, 8, 8, 1], seed=1)),
        ("mlp-relu-widths", cp.mlp([3, 9, 4, 6, 1], activation="relu", seed=2)),
        ("mlp-sigmoid", cp.mlp([4, 6, 6, 1], activation="sigmoid", seed=3)),
        ("mlp-softplus", cp.mlp([4, 6, 6, 1], activation="softplus", seed=4)),
        ("mlp-identity", cp.mlp([4, 5, 5, 1], activation=None, seed=5)),
        ("dense", random_chain(7, 5, kind="dense", activation="tanh", seed=6)),
        ("diag", random_chain(10, 4, kind="diag", activation="tanh", seed=7)),
        ("diag-softplus", random_chain(8, 4, kind="diag", activation="softplus", seed=8)),
        ("mixed-sigmoid", random_chain(9, 4, kind="mixed", activation="sigmoid", seed=9, d_in=3)),
        ("mixed-relu", random_chain(9, 4, kind="mixed", activation="relu", seed=10)),
        ("diagonal-chain", cp.diagonal_chain(15, 3, seed=11)),
        ("one-layer", cp.mlp([3, 1], seed=12)),
    ]
    for k, (name, chain) in enumerate(specs):
        batch = [None, 1, 5][k % 3]
        shape = (chain.d_in,) if batch is None else (batch, chain.d_in)
        x = rng.standard_normal(shape)
        out.append((name, chain, x))
    return out


CASES = cases()
_REF: dict = {}


def ref(name, chain, x):
    if name not in _REF:
        _REF[name] = torch_grads(chain, x)
    return _REF[name]


@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_sum_loss_matches_torch(method, backend, workers):
    for name, chain, x in CASES:
        value, out, want = ref(name, chain, x)
        np.testing.assert_allclose(chain.forward(x), out, rtol=1e-12, atol=1e-14)
        g = cp.grad(chain, x, method=method, backend=backend, workers=workers)
        grads_close(g, want, 1e-10)
        v, _ = cp.value_and_grad(chain, x, method=method, backend=backend, workers=workers)
        assert v == pytest.approx(value, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("backend,workers", [("serial", None), ("vectorized", None), ("threads", 2)],
                         ids=["serial", "vectorized", "threads-w2"])
@pytest.mark.parametrize("method", ["backprop", "sklansky", "brent_kung", "chunked", "hillis_steele", "auto"])
def test_mse_matches_torch(method, backend, workers):
    rng = np.random.default_rng(1)
    for name, chain, x in CASES:
        y = rng.standard_normal(x.shape[:-1] + (1,))
        value, _, want = torch_grads(chain, x, y)
        v, g = cp.value_and_grad(chain, x, y, loss="mse", method=method, backend=backend, workers=workers)
        assert v == pytest.approx(value, rel=1e-12), name
        grads_close(g, want, 1e-10)


def test_mse_vector_output_matches_torch():
    chain = cp.mlp([4, 7, 7, 3], seed=3)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4))
    y = rng.standard_normal((6, 3))
    value, _, want = torch_grads(chain, x, y)
    for method in ("backprop", "sklansky", "sequential"):
        v, g = cp.value_and_grad(chain, x, y, loss="mse", method=method)
        assert v == pytest.approx(value, rel=1e-12)
        grads_close(g, want, 1e-10)


def test_float32_matches_torch():
    c64 = random_chain(12, 6, kind="mixed", seed=4)
    c32 = c64.with_params([tuple(p.astype(np.float32) for p in ps) for ps in c64.params])
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    _, _, want = torch_grads(c32, x)
    for method in ("backprop", "sklansky", "chunked"):
        g = cp.grad(c32, x, method=method)
        grads_close(g, want, 1e-4)


def test_training_step_matches_torch_sgd():
    chain = cp.mlp([3, 8, 8, 1], seed=5)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 3))
    y = np.cos(x[:, :1])
    mods, fwd = torch_model(chain)
    params = [p for m, _ in mods for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(fwd(tx), ty)
        loss.backward()
        opt.step()
        v, g = cp.value_and_grad(chain, x, y, loss="mse", method="sklansky")
        assert v == pytest.approx(float(loss.detach()), rel=1e-10)
        losses.append(v)
        chain = chain.sgd_step(g, 0.05)
    assert losses[-1] < losses[0]
    for ly, (m, _) in zip(chain.layers, mods):
        np.testing.assert_allclose(ly.params[0], m.weight.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ly.params[1], m.bias.detach().numpy(), rtol=1e-10, atol=1e-12)
