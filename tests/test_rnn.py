"""The deprecated Elman RNN aliases (``cp.ElmanRNN``, ``cp.rnn_value_and_grad``): still exact, and they warn.

They now run on :class:`chainprod.RNN` (``tests/test_recurrent.py`` tests the
models themselves); these tests keep the old names and shapes working.

Every method is checked: ``"backprop"`` (backprop through time), every scan
schedule that gives every prefix (the adjoints by ``cp.linear_recurrence``
in reversed time) and ``"auto"``. float64 agrees with torch to 1e-10
relative (the largest difference over the largest entry of each gradient);
float32 runs in float32 and agrees with torch's float64 to 1e-4 relative at
``T = 200``.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import NonFiniteError, UnsupportedModuleError

torch = pytest.importorskip("torch")
# the aliases under test are deprecated (test_deprecated_aliases_warn checks that they say so)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

METHODS = ["backprop"] + [n for n in cp.valid_schedules() if n not in ("tree", "auto")] + ["auto"]
D_IN, D_H = 3, 4
F32_TOL = 1e-4


def _rel(a, b):
    """The largest difference relative to the largest entry of the reference ``b``."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def _torch_ref(module, u, y=None, h0=None, loss="sum"):
    """Value and gradients by torch autograd in float64, keyed as ``rnn_value_and_grad`` keys them."""
    m = module.double()
    for p in m.parameters():
        p.grad = None
    ut = torch.tensor(np.asarray(u, np.float64), requires_grad=True)
    N = u.shape[0] if m.batch_first else u.shape[1]
    h0t = torch.zeros(1, N, m.hidden_size, dtype=torch.float64) if h0 is None else \
        torch.tensor(np.asarray(h0, np.float64)).reshape(1, N, -1)
    h0t.requires_grad_(True)
    out, _ = m(ut, h0t)
    if loss == "sum":
        val = out.sum()
    else:
        val = torch.nn.functional.mse_loss(out, torch.tensor(np.asarray(y, np.float64)))
    val.backward()
    g = {"W_ih": m.weight_ih_l0.grad, "W_hh": m.weight_hh_l0.grad, "u": ut.grad,
         "h0": h0t.grad[0] if h0 is None or np.ndim(h0) == 2 else h0t.grad}
    if m.bias:
        g["b_ih"], g["b_hh"] = m.bias_ih_l0.grad, m.bias_hh_l0.grad
    return val.item(), {k: v.detach().numpy().copy() for k, v in g.items()}, out.detach().numpy()


def _case(nonlinearity, bias, N, T, seed=0, batch_first=False):
    torch.manual_seed(seed)
    module = torch.nn.RNN(D_IN, D_H, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first).double()
    rng = np.random.default_rng(seed)
    shape = (N, T) if batch_first else (T, N)
    u = rng.standard_normal(shape + (D_IN,))
    y = rng.standard_normal(shape + (D_H,))
    h0 = rng.standard_normal((N, D_H)) if N > 1 else None  # a given h0 and the default zeros both
    return module, u, y, h0


@pytest.mark.parametrize("loss", ["sum", "mse"])
@pytest.mark.parametrize("T", [1, 2, 17, 200])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_every_method_equals_torch_autograd_float64(nonlinearity, bias, N, T, loss):
    module, u, y, h0 = _case(nonlinearity, bias, N, T, seed=T + N)
    yy = y if loss == "mse" else None
    value_ref, g_ref, out_ref = _torch_ref(module, u, yy, h0, loss)
    rnn = cp.ElmanRNN.from_torch(module)
    assert _rel(rnn.forward(u, h0), out_ref) < 1e-12
    for method in METHODS:
        value, g = cp.rnn_value_and_grad(rnn, u, yy, loss=loss, h0=h0, method=method)
        assert abs(value - value_ref) <= 1e-12 * max(abs(value_ref), 1.0), method
        assert set(g) == set(g_ref), method
        for k in g_ref:
            assert g[k].shape == g_ref[k].shape and g[k].dtype == np.float64, (method, k)
            assert _rel(g[k], g_ref[k]) < 1e-10, (method, k, _rel(g[k], g_ref[k]))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_float32_runs_in_float32_within_the_documented_tolerance(nonlinearity):
    module, u, y, h0 = _case(nonlinearity, True, 3, 200, seed=7)
    value_ref, g_ref, _ = _torch_ref(module, u, y, h0, "mse")
    rnn = cp.ElmanRNN.from_torch(module.float())
    assert rnn.dtype == np.float32
    u32, y32, h32 = (a.astype(np.float32) for a in (u, y, h0))
    for method in ("backprop", "sklansky", "sequential", "brent_kung"):
        value, g = cp.rnn_value_and_grad(rnn, u32, y32, loss="mse", h0=h32, method=method)
        assert abs(value - value_ref) <= F32_TOL * abs(value_ref)
        for k in g_ref:
            assert g[k].dtype == np.float32, (method, k)
            assert _rel(g[k], g_ref[k]) < F32_TOL, (method, k, _rel(g[k], g_ref[k]))


@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_batch_first_follows_torch(method):
    module, u, y, h0 = _case("tanh", True, 3, 9, seed=3, batch_first=True)
    value_ref, g_ref, out_ref = _torch_ref(module, u, y, h0, "mse")
    rnn = cp.ElmanRNN.from_torch(module)
    assert rnn.batch_first
    assert _rel(rnn.forward(u, h0), out_ref) < 1e-12
    value, g = cp.rnn_value_and_grad(rnn, u, y, loss="mse", h0=h0, method=method)
    assert abs(value - value_ref) < 1e-12
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-10, k


def test_h0_in_torch_layout_and_threads_backend():
    module, u, y, h0 = _case("relu", True, 3, 17, seed=5)
    h0_t = h0[None]  # torch's (num_layers, N, d_h)
    _, g_ref, _ = _torch_ref(module, u, None, h0_t)
    rnn = cp.ElmanRNN.from_torch(module)
    _, g = cp.rnn_value_and_grad(rnn, u, h0=h0_t, method="brent_kung", backend="threads", workers=2)
    assert g["h0"].shape == (1, 3, D_H)
    for k in g_ref:
        assert _rel(g[k], g_ref[k]) < 1e-10, k


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_central_finite_differences_on_a_tiny_case(nonlinearity):
    rng = np.random.default_rng(11)
    T, N, d_in, d_h = 3, 2, 2, 3
    P = {"W_ih": rng.standard_normal((d_h, d_in)), "W_hh": 0.5 * rng.standard_normal((d_h, d_h)),
         "b_ih": rng.standard_normal(d_h), "b_hh": rng.standard_normal(d_h),
         "u": rng.standard_normal((T, N, d_in)), "h0": rng.standard_normal((N, d_h))}
    y = rng.standard_normal((T, N, d_h))

    def f(Q):
        rnn = cp.ElmanRNN(Q["W_ih"], Q["W_hh"], Q["b_ih"], Q["b_hh"], nonlinearity=nonlinearity)
        return cp.rnn_value_and_grad(rnn, Q["u"], y, loss="mse", h0=Q["h0"], method="sklansky")

    _, g = f(P)
    eps = 1e-6
    for k, arr in P.items():
        num = np.empty_like(arr)
        for idx in np.ndindex(arr.shape):
            Qp = {**P, k: arr.copy()}
            Qm = {**P, k: arr.copy()}
            Qp[k][idx] += eps
            Qm[k][idx] -= eps
            num[idx] = (f(Qp)[0] - f(Qm)[0]) / (2 * eps)
        assert _rel(g[k], num) < 1e-7, (k, _rel(g[k], num))


def _small():
    rng = np.random.default_rng(2)
    rnn = cp.ElmanRNN(rng.standard_normal((4, 3)), rng.standard_normal((4, 4)), np.zeros(4), np.zeros(4))
    return rnn, rng.standard_normal((6, 2, 3))


def test_bad_input_says_what_and_where():
    rnn, u = _small()
    with pytest.raises(ValueError, match=r"d_in = input_size = 3.*\(6, 2, 5\)"):
        rnn.forward(np.ones((6, 2, 5)))
    with pytest.raises(ValueError, match="T=0"):
        cp.rnn_value_and_grad(rnn, np.ones((0, 2, 3)))
    with pytest.raises(ValueError, match="batch axis"):
        rnn.forward(np.ones((6, 3)))
    bad = u.copy()
    bad[4, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"step t=4 \(sample n=1, feature 2\)"):
        cp.rnn_value_and_grad(rnn, bad)
    with pytest.raises(ValueError, match=r"h0: expected shape .*\(N, H\) = \(2, 4\)"):
        rnn.forward(u, np.zeros((3, 4)))
    h0 = np.zeros((2, 4))
    h0[1, 0] = np.inf
    with pytest.raises(ValueError, match="h0: contains NaN"):
        rnn.forward(u, h0)
    with pytest.raises(ValueError, match="nonlinearity"):
        cp.ElmanRNN(np.ones((4, 3)), np.ones((4, 4)), nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="weight_hh_l0: expected shape"):
        cp.ElmanRNN(np.ones((4, 3)), np.ones((3, 3)))  # W_hh, torch's weight_hh_l0
    with pytest.raises(ValueError, match="both biases or neither"):
        cp.ElmanRNN(np.ones((4, 3)), np.ones((4, 4)), np.ones(4))
    with pytest.raises(ValueError, match="loss: unknown 'l1'"):
        cp.rnn_value_and_grad(rnn, u, loss="l1")
    with pytest.raises(ValueError, match="method: unknown 'bptt'"):
        cp.rnn_value_and_grad(rnn, u, method="bptt")
    with pytest.raises(ValueError, match="'tree'"):
        cp.rnn_value_and_grad(rnn, u, method="tree")
    with pytest.raises(ValueError, match="needs targets"):
        cp.rnn_value_and_grad(rnn, u, loss="mse")
    with pytest.raises(ValueError, match="takes no targets"):
        cp.rnn_value_and_grad(rnn, u, np.zeros((6, 2, 4)))
    with pytest.raises(ValueError, match=r"y: expected .*\(6, 2, 4\)"):
        cp.rnn_value_and_grad(rnn, u, np.zeros((6, 2, 3)), loss="mse")
    with pytest.raises(TypeError, match="float32"):
        rnn.forward(u.astype(np.float32))
    with pytest.raises(TypeError, match="one-layer chainprod.RNN"):
        cp.rnn_value_and_grad("rnn", u)


def test_relu_overflow_names_the_step():
    rnn = cp.ElmanRNN(np.ones((2, 1)), 1e200 * np.eye(2), nonlinearity="relu")
    with pytest.raises(NonFiniteError, match="step t=2"):
        rnn.forward(np.ones((5, 1, 1)))


def test_from_torch_refuses_what_it_cannot_represent():
    with pytest.raises(TypeError, match="one-layer"):  # stacked layers: cp.RNN and cp.value_and_grad
        cp.rnn_value_and_grad(cp.ElmanRNN.from_torch(torch.nn.RNN(3, 4, num_layers=2)), np.ones((2, 1, 3)))
    with pytest.raises(UnsupportedModuleError, match="bidirectional=True"):
        cp.ElmanRNN.from_torch(torch.nn.RNN(3, 4, bidirectional=True))
    with pytest.raises(UnsupportedModuleError, match="GRU"):
        cp.ElmanRNN.from_torch(torch.nn.GRU(3, 4))
    rnn = cp.ElmanRNN.from_torch(torch.nn.RNN(3, 4, bias=False, nonlinearity="relu"))
    assert (rnn.bias, rnn.nonlinearity, rnn.input_size, rnn.hidden_size) == (False, "relu", 3, 4)


def test_nothing_passed_in_is_modified_and_the_model_is_a_copy():
    rng = np.random.default_rng(4)
    W_ih, W_hh = rng.standard_normal((4, 3)), 0.5 * rng.standard_normal((4, 4))
    b_ih, b_hh = rng.standard_normal(4), rng.standard_normal(4)
    u, y, h0 = rng.standard_normal((8, 2, 3)), rng.standard_normal((8, 2, 4)), rng.standard_normal((2, 4))
    given = [W_ih, W_hh, b_ih, b_hh, u, y, h0]
    before = [a.copy() for a in given]
    rnn = cp.ElmanRNN(W_ih, W_hh, b_ih, b_hh)
    for method in ("backprop", "sklansky", "sequential"):
        rnn.forward(u, h0)
        cp.rnn_value_and_grad(rnn, u, y, loss="mse", h0=h0, method=method)
    for a, b in zip(given, before):
        np.testing.assert_array_equal(a, b)
    out = rnn.forward(u, h0)
    W_hh[:] = 0  # the model keeps its own copy
    np.testing.assert_array_equal(rnn.forward(u, h0), out)
    assert not rnn.params["weight_hh_l0"].flags.writeable


def test_deprecated_aliases_warn_and_say_what_replaces_them():
    with pytest.warns(DeprecationWarning, match="cp.RNN.from_params"):
        rnn = cp.ElmanRNN(np.ones((4, 3)), 0.5 * np.eye(4))
    with pytest.warns(DeprecationWarning, match="cp.value_and_grad"):
        _, g = cp.rnn_value_and_grad(rnn, np.ones((2, 1, 3)))
    assert isinstance(rnn, cp.RNN) and sorted(g) == ["W_hh", "W_ih", "h0", "u"]
    _, g_new = cp.value_and_grad(rnn, np.ones((2, 1, 3)), method="backprop", with_inputs=True)
    np.testing.assert_array_equal(g["W_hh"], g_new["weight_hh_l0"])
