"""RNN, GRU, LSTM: kernels and gradients through time against torch autograd, finite differences, bad input.

References are independent of chainprod: torch autograd in float64 (every
gradient, the input's and the initial state's too) and central finite
differences. float64 agrees to 1e-10 relative (the largest difference over
the largest entry of each gradient), float32 (computed in float32) to 1e-4.
Sizes are small (T <= 7, H = 4) so the whole file runs in seconds.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import NonFiniteError
from chainprod.kernels.recurrent import get_recurrent_kernels

torch = pytest.importorskip("torch")

HAVE_NUMBA = (importlib.util.find_spec("numba") is not None
              and importlib.util.find_spec("chainprod.kernels.recurrent_numba") is not None)
KERNELS = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(not HAVE_NUMBA, reason="numba kernels absent"))]
CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]
SCANS = [n for n in cp.valid_schedules() if n not in ("tree", "auto")]
D_IN, H = 3, 4


def _rel(a, b):
    """The largest difference relative to the largest entry of the reference ``b``."""
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-300))


def _module(cell, layers=1, bias=True, batch_first=False, seed=0):
    torch.manual_seed(seed)
    mode = "RNN" if cell.startswith("rnn") else cell.upper()
    kw = {"nonlinearity": cell[4:]} if mode == "RNN" else {}
    return getattr(torch.nn, mode)(D_IN, H, num_layers=layers, bias=bias, batch_first=batch_first, **kw).double()


def _data(module, T, N, seed=0):
    rng = np.random.default_rng(seed)
    shape = (N, T) if module.batch_first else (T, N)
    L = module.num_layers
    h0 = rng.standard_normal((L, N, H))
    h0 = (h0, rng.standard_normal((L, N, H))) if isinstance(module, torch.nn.LSTM) else h0
    return rng.standard_normal(shape + (D_IN,)), rng.standard_normal(shape + (H,)), h0


def _torch_ref(module, x, y=None, h0=None, loss="sum"):
    """Loss and every gradient by torch autograd in float64, keyed as chainprod keys them."""
    m = module.double()
    m.zero_grad(set_to_none=True)
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    lstm = isinstance(m, torch.nn.LSTM)
    states = ([] if h0 is None else [torch.tensor(np.asarray(h, np.float64), requires_grad=True)
                                     for h in (h0 if lstm else (h0,))])
    out, _ = m(xt, (tuple(states) if lstm else states[0]) if states else None)
    val = out.sum() if loss == "sum" else torch.nn.functional.mse_loss(out, torch.tensor(np.asarray(y, np.float64)))
    val.backward()
    g = {n: p.grad.numpy().copy() for n, p in m.named_parameters()}
    g["input"] = xt.grad.numpy().copy()
    for k, s in zip(("h0", "c0"), states):
        g[k] = s.grad.numpy().copy()
    return val.item(), g, out.detach().numpy()


def _check(got, ref, tol, keys=None):
    for k in keys or ref:
        assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
        assert _rel(got[k], ref[k]) < tol, (k, _rel(got[k], ref[k]))


# -- the kernel sets, on their contract --------------------------------------------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("cell", CELLS)
def test_kernel_set_equals_torch_with_incoming_adjoints(kernels, cell):
    """forward and backward (with dhT, dcT) of one layer against autograd; inputs are never written."""
    k = get_recurrent_kernels(kernels)
    m = _module(cell)
    T, N = 6, 3
    rng = np.random.default_rng(1)
    x, _, h0 = _data(m, T, N)
    lstm = cell == "lstm"
    W_ih, W_hh, b_ih, b_hh = (getattr(m, n).detach().numpy() for n in ("weight_ih_l0", "weight_hh_l0",
                                                                          "bias_ih_l0", "bias_hh_l0"))
    h, c = (h0[0][0], h0[1][0]) if lstm else (h0[0], None)
    X = np.ascontiguousarray(x @ W_ih.T + b_ih)
    args = [cell, X, W_hh, b_hh, h, c]
    before = [None if a is None else np.array(a) for a in args[1:]]
    Hs, Z = k.forward(*args)
    # torch with a weight on every output and on the last state (and cell state): dHs, dhT, dcT
    dHs, dhT, dcT = rng.standard_normal((T, N, H)), rng.standard_normal((N, H)), rng.standard_normal((N, H))
    xt = torch.tensor(x, requires_grad=True)
    ht = torch.tensor(h[None], requires_grad=True)
    ct = torch.tensor(c[None], requires_grad=True) if lstm else None
    out, last = m(xt, (ht, ct) if lstm else ht)
    val = (out * torch.tensor(dHs)).sum() + ((last[0] if lstm else last)[0] * torch.tensor(dhT)).sum()
    if lstm:
        val = val + (last[1][0] * torch.tensor(dcT)).sum()
    val.backward()
    assert _rel(Hs, out.detach().numpy()) < 1e-12
    dX, dW, db, dh0, dc0 = k.backward(*args, Hs, Z, dHs, dhT, dcT if lstm else None)
    assert _rel(dX @ W_ih, xt.grad.numpy()) < 1e-10
    assert _rel(dX.reshape(-1, X.shape[2]).T @ x.reshape(-1, D_IN), m.weight_ih_l0.grad.numpy()) < 1e-10
    assert _rel(dW, m.weight_hh_l0.grad.numpy()) < 1e-10 and _rel(db, m.bias_hh_l0.grad.numpy()) < 1e-10
    assert _rel(dh0, ht.grad.numpy()[0]) < 1e-10
    assert (dc0 is None) == (not lstm) and (not lstm or _rel(dc0, ct.grad.numpy()[0]) < 1e-10)
    for a, b in zip(args[1:], before):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_kernel_registry_names_what_is_valid():
    with pytest.raises(ValueError, match="numba, numpy"):
        get_recurrent_kernels("fortran")
    with pytest.raises(ValueError, match="unknown 'lstn'"):
        get_recurrent_kernels("numpy").forward("lstn", np.ones((1, 1, 4)), np.ones((4, 1)), np.ones(4),
                                               np.ones((1, 1)), None)


# -- models: backprop through time, every model x layers x bias x batch_first --------------------------
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tnd", "ntd"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_backprop_equals_torch_float64(cell, layers, bias, batch_first, kernels):
    m = _module(cell, layers, bias, batch_first)
    model = cp.from_torch(m)
    x, y, h0 = _data(m, T=5, N=2)
    loss = "mse" if (layers + bias) % 2 else "sum"
    ref_v, ref, out = _torch_ref(m, x, y if loss == "mse" else None, h0, loss)
    value, g = cp.value_and_grad(model, x, y if loss == "mse" else None, loss=loss, h0=h0, method="backprop",
                                 kernels=kernels, with_inputs=True)
    assert abs(value - ref_v) <= 1e-10 * abs(ref_v)
    assert list(g)[:len(model.params)] == list(model.params) == [n for n, _ in m.named_parameters()]
    _check(g, ref, 1e-10)
    fwd = model.forward(x, h0, kernels=kernels)[0]
    assert _rel(fwd, out) < 1e-12


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("cell", CELLS)
def test_float32_runs_in_float32_within_1e4(cell, kernels):
    m = _module(cell, layers=2)
    x, y, _ = _data(m, T=7, N=2)
    _, ref, _ = _torch_ref(m, x, y, None, "mse")
    model = cp.from_torch(m.float())
    for method in ("backprop", "sklansky"):
        _, g = cp.value_and_grad(model, x.astype(np.float32), y.astype(np.float32), method=method, kernels=kernels,
                                 with_inputs=True)
        assert all(v.dtype == np.float32 for v in g.values())
        _check(g, ref, 1e-4)


# -- every scan method, and the local executors ---------------------------------------------------------
@pytest.mark.parametrize("method", SCANS + ["auto"])
@pytest.mark.parametrize("cell", CELLS)
def test_every_scan_method_equals_torch(cell, method):
    m = _module(cell, layers=2, bias=CELLS.index(cell) % 2 == 0, batch_first=cell == "gru", seed=3)
    x, y, h0 = _data(m, T=6, N=2, seed=3)
    _, ref, _ = _torch_ref(m, x, y, h0, "mse")
    _, g = cp.value_and_grad(cp.from_torch(m), x, y, h0=h0, method=method, kernels="numpy", with_inputs=True)
    _check(g, ref, 1e-10)


@pytest.mark.parametrize("backend,workers", [("serial", None), ("vectorized", None), ("threads", 2)])
@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_scans_on_every_local_executor(cell, backend, workers):
    m = _module(cell, layers=2, seed=4)
    x, _, _ = _data(m, T=5, N=3, seed=4)
    _, ref, _ = _torch_ref(m, x)
    for method in ("brent_kung", "chunked"):
        g, trace = cp.grad(cp.from_torch(m), x, method=method, backend=backend, workers=workers, kernels="numpy",
                           return_trace=True)
        _check(g, ref, 1e-10, keys=list(g))
        assert trace.schedule.name == method and trace.num_tasks > 0


def test_auto_runs_backprop_where_the_scan_loses_and_says_so():
    m = _module("lstm", layers=1)
    x, _, _ = _data(m, T=7, N=2)
    g, trace = cp.grad(cp.from_torch(m), x, kernels="numpy", return_trace=True)
    assert trace.schedule is None and "backprop through time ran" in trace.note
    g_bp, trace_bp = cp.grad(cp.from_torch(m), x, method="backprop", kernels="numpy", return_trace=True)
    assert "backprop through time by the 'numpy'" in trace_bp.note and trace_bp.num_tasks == 1
    for k in g:
        np.testing.assert_array_equal(g[k], g_bp[k])


def test_central_finite_differences_two_layer_gru():
    model = cp.GRU(2, 3, num_layers=2, seed=5)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 2, 2)), rng.standard_normal((4, 2, 3))
    _, g = cp.value_and_grad(model, x, y, method="backprop", kernels="numpy")

    def f(params):
        return cp.value_and_grad(cp.GRU.from_params(params), x, y, method="backprop", kernels="numpy")[0]

    eps = 1e-6
    for name, p in model.params.items():
        num = np.zeros(p.shape)
        for idx in np.ndindex(p.shape):
            up, dn = dict(model.params), dict(model.params)
            up[name], dn[name] = p.copy(), p.copy()
            up[name][idx] += eps
            dn[name][idx] -= eps
            num[idx] = (f(up) - f(dn)) / (2 * eps)
        assert _rel(g[name], num) < 1e-7, name


# -- models: construction, forward, copies -----------------------------------------------------------
def test_constructor_follows_torch_init_and_shapes():
    model = cp.LSTM(3, 5, num_layers=2, batch_first=True, dtype=np.float32, seed=0)
    ref = torch.nn.LSTM(3, 5, num_layers=2)
    assert {n: p.shape for n, p in model.params.items()} == {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert all(v.dtype == np.float32 and np.abs(v).max() <= 1 / np.sqrt(5) for v in model.params.values())
    assert all(not v.flags.writeable for v in model.params.values())
    again = cp.LSTM(3, 5, num_layers=2, batch_first=True, dtype=np.float32, seed=0)
    assert all(np.array_equal(model.params[k], again.params[k]) for k in model.params)
    rnn = cp.RNN(2, 3, nonlinearity="relu", bias=False)
    assert rnn.cell == "rnn_relu" and list(rnn.params) == ["weight_ih_l0", "weight_hh_l0"]
    assert "nonlinearity='relu'" in repr(rnn)


def test_forward_returns_torch_outputs_and_last_states():
    m = _module("lstm", layers=2, batch_first=True)
    x, _, (h0, c0) = _data(m, T=4, N=3)
    out, (h_n, c_n) = cp.from_torch(m).forward(x, (h0, c0), kernels="numpy")
    ref_out, (ref_h, ref_c) = m(torch.tensor(x), (torch.tensor(h0), torch.tensor(c0)))
    for a, b in ((out, ref_out), (h_n, ref_h), (c_n, ref_c)):
        assert _rel(a, b.detach().numpy()) < 1e-12
    g = _module("gru")
    x, _, h0 = _data(g, T=4, N=3)
    out, h_n = cp.from_torch(g).forward(x, h0[0], kernels="numpy")  # (N, H) for one layer
    assert h_n.shape == (1, 3, H) and _rel(out, g(torch.tensor(x), torch.tensor(h0))[0].detach().numpy()) < 1e-12


def test_nothing_passed_in_is_modified_and_the_model_is_a_copy():
    m = _module("lstm", layers=2)
    params = {n: p.detach().numpy().copy() for n, p in m.named_parameters()}
    kept = {n: v.copy() for n, v in params.items()}
    model = cp.LSTM.from_params(params)
    x, y, (h0, c0) = _data(m, T=4, N=2)
    inputs = [x, y, h0, c0]
    copies = [a.copy() for a in inputs]
    for method in ("backprop", "sklansky"):
        cp.value_and_grad(model, x, y, h0=(h0, c0), method=method, kernels="numpy", with_inputs=True)
    assert all(np.array_equal(a, b) for a, b in zip(inputs, copies))
    params["weight_hh_l0"][:] = 7.0  # the model holds a copy
    assert not np.array_equal(model.params["weight_hh_l0"], params["weight_hh_l0"])
    assert all(np.array_equal(model.params[k], kept[k]) for k in kept)


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_says_what_and_where():
    model = cp.GRU(3, 4, num_layers=2, seed=0)
    x = np.zeros((5, 2, 3))
    with pytest.raises(ValueError, match=r"d_in = input_size = 3"):
        cp.grad(model, np.zeros((5, 2, 4)))
    with pytest.raises(ValueError, match="without a batch axis"):
        cp.grad(model, np.zeros((5, 3)))
    with pytest.raises(ValueError, match="T=0"):
        cp.grad(model, np.zeros((0, 2, 3)))
    bad = x.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"step t=3 \(sample n=1, feature 2\)"):
        cp.grad(model, bad)
    with pytest.raises(ValueError, match=r"h0: expected shape \(num_layers, N, H\) = \(2, 2, 4\)"):
        cp.grad(model, x, h0=np.zeros((2, 4)))
    with pytest.raises(TypeError, match="float32 but the model is float64"):
        cp.grad(model, x.astype(np.float32))
    h0 = np.zeros((2, 2, 4))
    h0[1, 0, 3] = np.inf
    with pytest.raises(ValueError, match=r"h0: contains NaN or infinity for layer 1 \(sample n=0, unit 3\)"):
        cp.grad(model, x, h0=h0)
    with pytest.raises(ValueError, match=r"y: expected the output's shape"):
        cp.grad(model, x, np.zeros((5, 2, 3)))
    with pytest.raises(ValueError, match="method 'tree'"):
        cp.grad(model, x, method="tree")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        cp.grad(model, x, method="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        cp.grad(model, x, method="backprop", backend="gpu")
    with pytest.raises(ValueError, match="loss='sum' takes no targets"):
        cp.grad(model, x, np.zeros((5, 2, 4)), loss="sum")
    lstm = cp.LSTM(3, 4, seed=0)
    with pytest.raises(TypeError, match=r"pair \(h0, c0\)"):
        cp.grad(lstm, x, h0=np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match="c0: expected shape"):
        cp.grad(lstm, x, h0=(np.zeros((1, 2, 4)), np.zeros((1, 3, 4))))
    with pytest.raises(TypeError, match="only an LSTM"):
        cp.grad(model, x, h0=(np.zeros((2, 2, 4)), np.zeros((2, 2, 4))))
    with pytest.raises(ValueError, match="missing"):
        cp.RNN.from_params({"weight_ih_l0": np.eye(2)})
    with pytest.raises(ValueError, match=r"weight_hh_l0: expected shape \(16, 4\).*got \(12, 4\)"):
        cp.LSTM.from_params({"weight_ih_l0": np.ones((16, 2)), "weight_hh_l0": np.ones((12, 4))})
    with pytest.raises(ValueError, match="nonlinearity"):
        cp.RNN(2, 3, nonlinearity="gelu")
    with pytest.raises(ValueError, match="hidden_size"):
        cp.GRU(2, 0)


def test_relu_overflow_names_the_step_and_the_layer():
    params = {"weight_ih_l0": np.eye(2), "weight_hh_l0": 1e200 * np.eye(2),
              "weight_ih_l1": np.eye(2), "weight_hh_l1": np.eye(2)}
    model = cp.RNN.from_params(params, nonlinearity="relu")
    with pytest.raises(NonFiniteError, match="layer 0 at step t=2") as e:
        cp.grad(model, np.ones((4, 1, 2)), kernels="numpy")
    assert e.value.step == 2 and e.value.layers == (0, 0)

