"""Gradients after a Newton forward pass (``forward="deer"`` & co.) against those after the sequential pass.

The references are the same gradient functions with the default
``forward="sequential"`` (tested elsewhere against torch autograd and
finite differences), and ``loss.backward()`` for ``cp.torch_backward``.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ConvergenceError
from chainprod.forward_methods import FORWARD_METHODS, valid_forward_methods
from chainprod.newton import model_lyapunov
from chainprod.newton_models import DiagonalStates, lyapunov_exponent

torch = pytest.importorskip("torch")

FORWARDS = ("deer", "quasi_deer", "elk")
#: a tight solve: the gradients then agree with the sequential forward's to about 1e-12
TIGHT = {"tol": 1e-13}


def close(got, ref, rtol=1e-8):
    """Every array of ``got`` within ``rtol`` of ``ref``, relative to the largest entry of each."""
    flat = (lambda g: [a for t in g for a in t]) if not isinstance(ref, dict) else (lambda g: [g[k] for k in ref])
    if isinstance(ref, dict):
        assert list(got) == list(ref)
    for a, b in zip(flat(got), flat(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, float(np.max(np.abs(b)))))


def contractive_chain(L=40, w=4, seed=0):
    rng = np.random.default_rng(seed)
    layers = [cp.Dense(rng.standard_normal((w, 3)), np.zeros(w), "tanh")]
    layers += [cp.Dense(0.5 * rng.standard_normal((w, w)) / np.sqrt(w), 0.1 * rng.standard_normal(w), "tanh")
               for _ in range(L)]
    layers.append(cp.Dense(rng.standard_normal((1, w)), np.zeros(1), "identity"))
    return cp.Chain(layers), rng.standard_normal((3, 3))


# -- chains ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_chain_grads_after_newton_equal_sequential(kernels, forward, method):
    chain, x = contractive_chain()
    ref = cp.grad(chain, x, method=method, kernels=kernels)
    g, trace = cp.grad(chain, x, method=method, kernels=kernels, forward=forward, forward_options=TIGHT,
                       return_trace=True)
    close(g, ref)
    assert f"forward {forward!r}" in trace.note and "Newton iteration(s)" in trace.note
    y = np.ones((3, 1))
    v_ref, g_ref = cp.value_and_grad(chain, x, y, method=method, kernels=kernels)
    v, g = cp.value_and_grad(chain, x, y, method=method, kernels=kernels, forward=forward,
                             forward_options=dict(TIGHT, schedule="hillis_steele"))
    assert abs(v - v_ref) <= 1e-10 * max(1.0, abs(v_ref))
    close(g, g_ref)


def test_forward_options_run_on_their_own_backend():
    chain, x = contractive_chain(L=12)
    ref = cp.grad(chain, x, method="backprop")
    g = cp.grad(chain, x, method="backprop", forward="quasi_elk",
                forward_options={"tol": 1e-13, "backend": "threads", "workers": 2, "schedule": "blelloch"})
    close(g, ref)


# -- recurrent models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [cp.RNN, cp.GRU, cp.LSTM])
@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_recurrent_grads_after_newton_equal_sequential(cls, forward, method):
    model = cls(3, 5, num_layers=2, seed=0)
    rng = np.random.default_rng(1)
    u = rng.standard_normal((24, 2, 3))
    h0 = 0.1 * rng.standard_normal((2, 2, 5))
    h0 = (h0, 0.1 * rng.standard_normal((2, 2, 5))) if cls is cp.LSTM else h0
    v_ref, g_ref = cp.value_and_grad(model, u, h0=h0, method=method, with_inputs=True)
    v, g, trace = cp.value_and_grad(model, u, h0=h0, method=method, with_inputs=True, forward=forward,
                                    forward_options=TIGHT, return_trace=True)
    assert abs(v - v_ref) <= 1e-10 * max(1.0, abs(v_ref))
    close(g, g_ref)
    assert f"forward {forward!r}" in trace.note
    close(cp.grad(model, u, h0=h0, method=method, forward=forward, forward_options=TIGHT, kernels="numpy"),
          cp.grad(model, u, h0=h0, method=method, kernels="numpy"))


@pytest.mark.parametrize("forward", FORWARDS)
def test_diagonal_recurrence_grads_after_newton(forward):
    layer = cp.DiagonalRecurrence.random(3, 4, 2, seed=0)
    u = np.random.default_rng(2).standard_normal((40, 2, 3))
    for method in ("backprop", "blelloch"):
        v_ref, g_ref = cp.value_and_grad(layer, u, method=method, with_inputs=True)
        v, g, trace = cp.value_and_grad(layer, u, method=method, with_inputs=True, forward=forward,
                                        return_trace=True)
        assert abs(v - v_ref) <= 1e-10 * max(1.0, abs(v_ref))
        close(g, g_ref)
        assert "1 Newton iteration(s)" in trace.note  # a linear recurrence: one exact Newton step


# -- torch ----------------------------------------------------------------------------------------------
def test_torch_backward_sequential_after_newton_matches_autograd():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                *[m for _ in range(20) for m in (torch.nn.Linear(4, 4), torch.nn.Tanh())],
                                torch.nn.Linear(4, 2)).double()
    with torch.no_grad():
        for m in model[2:-1:2]:
            m.weight.mul_(0.5)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    torch.nn.functional.mse_loss(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    for forward in FORWARDS:
        model.zero_grad(set_to_none=True)
        value = cp.torch_backward(model, x, y, loss="mse", method="sklansky", forward=forward,
                                  forward_options=TIGHT)
        assert abs(value - torch.nn.functional.mse_loss(model(x), y).item()) <= 1e-12
        for p, r in zip(model.parameters(), ref):
            np.testing.assert_allclose(p.grad.numpy(), r.numpy(), rtol=0, atol=1e-10)
    with torch.no_grad():  # an optimizer step: the Newton pass reads the current values
        for p in model.parameters():
            p.mul_(0.9)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    cp.torch_backward(model, x, y, loss="mse", forward="deer", forward_options=TIGHT)
    for p, r in zip(model.parameters(), ref):
        np.testing.assert_allclose(p.grad.numpy(), r.numpy(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("mod", ["GRU", "LSTM"])
def test_torch_backward_recurrent_after_newton_matches_autograd(mod):
    torch.manual_seed(1)
    module = getattr(torch.nn, mod)(3, 4, num_layers=2).double()
    x = torch.randn(15, 2, 3, dtype=torch.float64)
    module(x)[0].sum().backward()
    ref = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    cp.torch_backward(module, x, forward="elk", forward_options=TIGHT, method="backprop")
    for n, p in module.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), ref[n].numpy(), rtol=0, atol=1e-10)


# -- errors ---------------------------------------------------------------------------------------------
def test_unknown_forward_and_misplaced_options():
    chain, x = contractive_chain(L=4)
    assert valid_forward_methods() == ("sequential", "deer", "quasi_deer", "elk", "quasi_elk")
    assert set(FORWARD_METHODS) == set(valid_forward_methods())
    with pytest.raises(ValueError, match="unknown forward method 'newton'.*sequential, deer, quasi_deer, elk"):
        cp.grad(chain, x, forward="newton")
    with pytest.raises(ValueError, match="unknown forward method"):
        cp.value_and_grad(cp.GRU(3, 2, seed=0), np.ones((4, 1, 3)), forward="Deer")
    with pytest.raises(ValueError, match=r"forward_options \['tol'\] are for a parallel forward pass"):
        cp.grad(chain, x, forward_options={"tol": 1e-9})
    with pytest.raises(ValueError, match="forward_options"):
        cp.value_and_grad(cp.RNN(3, 2, seed=0), np.ones((4, 1, 3)), forward_options={"max_iter": 3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tolerance'\]"):
        cp.grad(chain, x, forward="deer", forward_options={"tolerance": 1e-9})
    with pytest.raises(TypeError, match="forward_options must be a dict"):
        cp.grad(chain, x, forward="deer", forward_options=[("tol", 1e-9)])
    with pytest.raises(ValueError, match="damping is for method 'elk'"):
        cp.grad(chain, x, forward="deer", forward_options={"damping": 1.0})
    with pytest.raises(ValueError, match="unknown forward method"):
        cp.torch_backward(torch.nn.Sequential(torch.nn.Linear(3, 1)).double(), torch.ones(2, 3,
                          dtype=torch.float64), forward="nope")


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_a_plan_holds_its_forward_pass(kernels):
    chain, x = contractive_chain(L=64)
    want = cp.grad(chain, x, method="backprop", kernels="numpy")
    p = cp.plan(chain, method="sklansky", kernels=kernels, forward="deer", forward_options={"tol": 1e-13})
    g, trace = p.grad(x, return_trace=True)
    assert "forward 'deer'" in trace.note and "Newton iteration" in trace.note
    for a, b in zip(g, want):
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-8, atol=1e-12)
    # new parameters, the same plan and forward pass
    chain2 = chain.sgd_step(want, lr=1e-2)
    value, g2 = p.value_and_grad(x, params=chain2)
    value_seq, want2 = cp.value_and_grad(chain2, x, method="backprop", kernels="numpy")
    assert value == pytest.approx(value_seq, rel=1e-10)
    for a, b in zip(g2, want2):
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-8, atol=1e-12)


def test_a_plan_checks_its_forward_pass_when_made():
    chain, _ = contractive_chain(L=4)
    with pytest.raises(ValueError, match="unknown forward method 'nope'"):
        cp.plan(chain, forward="nope")
    with pytest.raises(ValueError, match="unknown key"):
        cp.plan(chain, forward="deer", forward_options={"tolerance": 1})
    with pytest.raises(ValueError, match="product of matrices"):
        cp.plan(16, method="sklansky", forward="deer")


def test_sharded_models_take_a_forward_keyword():
    # the Newton forward across shards runs on Ray and Dask in tests/test_shard_newton.py
    params = inspect.signature(cp.ShardedModel.value_and_grad).parameters
    assert params["forward"].default == "sequential" and params["forward_options"].default is None


def test_non_convergence_propagates_and_fallback_finishes_sequentially():
    chain, x = contractive_chain(L=60)
    with pytest.raises(ConvergenceError, match="did not converge in 1 iteration"):
        cp.grad(chain, x, forward="quasi_deer", forward_options={"max_iter": 1})
    rnn = cp.RNN(3, 4, seed=0)
    u = np.random.default_rng(0).standard_normal((30, 1, 3))
    with pytest.raises(ConvergenceError):
        cp.value_and_grad(rnn, u, forward="deer", forward_options={"max_iter": 1})
    ref = cp.grad(chain, x)
    g, trace = cp.grad(chain, x, forward="quasi_deer", forward_options={"max_iter": 1, "fallback": "sequential"},
                       return_trace=True)
    close(g, ref, rtol=1e-14)
    assert "the sequential pass ran instead" in trace.note
    v_ref, g_ref = cp.value_and_grad(rnn, u)
    v, g, trace = cp.value_and_grad(rnn, u, forward="deer", forward_options={"max_iter": 1, "fallback": "sequential"},
                                    return_trace=True)
    assert v == v_ref and "fallback='sequential'" in trace.note
    close(g, g_ref, rtol=1e-14)


# -- the Lyapunov exponent ------------------------------------------------------------------------------
def test_lyapunov_exponent_of_a_linear_diagonal_recurrence_is_log_a():
    rng = np.random.default_rng(0)
    for a in (0.5, -0.8, 1.2):
        layer = cp.DiagonalRecurrence(np.full(3, a), rng.standard_normal((3, 2)), rng.standard_normal((1, 3)))
        assert model_lyapunov(layer, rng.standard_normal((30, 2, 2))) == pytest.approx(np.log(abs(a)), abs=1e-12)
    # several rates: the largest wins, up to a transient of order 1/n
    a = np.array([0.3, -0.9, 0.6])
    Bu = rng.standard_normal((4000, 2, 3))
    states = np.empty_like(Bu)
    s = np.zeros((2, 3))
    for t in range(len(Bu)):
        s = states[t] = a * s + Bu[t]
    got = lyapunov_exponent(DiagonalStates(a, Bu, np.zeros((2, 3))), states)
    assert got == pytest.approx(np.log(0.9), abs=2e-3)


def test_lyapunov_exponent_sign_of_models():
    chain, x = contractive_chain(L=50)
    assert model_lyapunov(chain, x) < 0
    assert model_lyapunov(cp.GRU(3, 4, num_layers=2, seed=0), np.ones((20, 2, 3))) < 0
    rng = np.random.default_rng(1)  # a wide tanh RNN with large recurrent weights: chaotic
    rnn = cp.RNN.from_params({"weight_ih_l0": rng.standard_normal((32, 2)),
                              "weight_hh_l0": 3.0 * rng.standard_normal((32, 32)) / np.sqrt(32)})
    assert model_lyapunov(rnn, 0.1 * rng.standard_normal((300, 1, 2)), h0=np.full((1, 32), 0.5)) > 0.1
    linear = cp.Chain([cp.Diagonal(np.full(3, -1.5), np.ones(3), "identity") for _ in range(20)])
    assert model_lyapunov(linear, np.ones(3)) == pytest.approx(np.log(1.5), abs=1e-12)
    with pytest.raises(TypeError, match="model_lyapunov takes"):
        model_lyapunov(object(), x)
