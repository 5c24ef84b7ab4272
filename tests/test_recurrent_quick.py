"""The short path of a recurrent model's gradient (:mod:`chainprod.recurrent_quick`) against the general path.

``return_trace=True`` forces the general path (the short path serves no
trace); the two run the same layer passes, so they must agree bit for bit.
torch autograd is the independent reference for the calls it serves, and
each call it does not serve, or whose input holds a NaN, must reach the
general path and its errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod import recurrent_quick
from chainprod.errors import NonFiniteError

torch = pytest.importorskip("torch")

CELLS = ["rnn_tanh", "rnn_relu", "gru", "lstm"]


def _model(cell, layers=1, bias=True, dtype=np.float64, seed=0, batch_first=False):
    kw = {"nonlinearity": cell[4:]} if cell.startswith("rnn") else {}
    cls = {"rnn": cp.RNN, "gru": cp.GRU, "lstm": cp.LSTM}[cell[:4].rstrip("_")]
    return cls(3, 5, num_layers=layers, bias=bias, seed=seed, dtype=dtype, batch_first=batch_first, **kw)


@pytest.fixture
def served(monkeypatch):
    """The number of calls the short path answered, counted."""
    count = []
    real = recurrent_quick.try_value_and_grad

    def counting(*args):
        out = real(*args)
        count.append(out is not None)
        return out

    monkeypatch.setattr("chainprod.recurrent.try_value_and_grad", counting)
    return count


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", ["sum", "mse"])
@pytest.mark.parametrize("layers,bias", [(1, True), (2, False)])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kernels", [None, "numpy"])
def test_short_path_equals_the_general_path_bit_for_bit(cell, layers, bias, loss, dtype, kernels, served):
    model = _model(cell, layers, bias, dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 3, 3)).astype(dtype)
    y = rng.standard_normal((9, 3, 5)).astype(dtype) if loss == "mse" else None
    for method in ("backprop", "auto"):
        # the general path first: for "auto" it settles the choice (a probe where the cost model proposes a scan)
        ref_value, ref, trace = cp.value_and_grad(model, x, y, loss=loss, method=method, kernels=kernels,
                                                  return_trace=True)
        value, g = cp.value_and_grad(model, x, y, loss=loss, method=method, kernels=kernels)
        ran_backprop = trace.schedule is None
        assert ran_backprop or method == "auto"
        assert served[-2:] == [False, ran_backprop]  # the traced call not; the next one where backprop ran
        assert value == ref_value and list(g) == list(ref) == list(model.params)
        for name in g:
            assert g[name].dtype == dtype
            np.testing.assert_array_equal(g[name], ref[name], err_msg=name)
    grads = cp.grad(model, x, y, loss=loss, method="backprop", kernels=kernels)
    assert served[-1] is True and all(np.array_equal(grads[k], g[k]) for k in g)


@pytest.mark.parametrize("cell", CELLS)
def test_short_path_equals_torch_autograd(cell, served):
    torch.manual_seed(0)
    mode = "RNN" if cell.startswith("rnn") else cell.upper()
    kw = {"nonlinearity": cell[4:]} if mode == "RNN" else {}
    module = getattr(torch.nn, mode)(3, 5, num_layers=2, **kw).double()
    model = cp.from_torch(module)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 2, 3)), rng.standard_normal((7, 2, 5))
    value, g = cp.value_and_grad(model, x, y, loss="mse", method="backprop")
    assert served == [True]
    out, _ = module(torch.tensor(x))
    ref = torch.nn.functional.mse_loss(out, torch.tensor(y))
    ref.backward()
    assert abs(value - ref.item()) <= 1e-12 * abs(ref.item())
    for name, p in module.named_parameters():
        want = p.grad.numpy()
        assert np.max(np.abs(g[name] - want)) <= 1e-10 * np.max(np.abs(want)), name


def test_calls_it_does_not_serve_reach_the_general_path(served):
    model = _model("gru", layers=2)
    x = np.random.default_rng(3).standard_normal((6, 2, 3))
    y = np.zeros((6, 2, 5))
    h0 = np.zeros((2, 2, 5))
    calls = [dict(h0=h0), dict(with_inputs=True), dict(method="sklansky"), dict(backend="threads", workers=2),
             dict(forward="deer"), dict(engine_options={}), dict(y=y.astype(np.float32), loss="mse")]
    for kw in calls:
        y_kw = kw.pop("y", None)
        try:
            cp.value_and_grad(model, x, y_kw, **kw)
        except TypeError:  # float32 targets for a float64 model: the general path's own error
            assert y_kw is not None
        assert served[-1] is False, kw
    cp.value_and_grad(model, np.asfortranarray(x))  # not C order
    cp.value_and_grad(model, x, y.tolist(), loss="mse")  # a list of targets
    assert served[-2:] == [False, False]
    cp.value_and_grad(_model("lstm", batch_first=True), x.transpose(1, 0, 2).copy())
    assert served[-1] is False


def test_bad_values_get_the_general_paths_errors(served):
    model = _model("rnn_tanh")
    x = np.zeros((5, 2, 3))
    bad = x.copy()
    bad[3, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"step t=3 \(sample n=1, feature 2\)"):
        cp.value_and_grad(model, bad, method="backprop")
    assert served == [False]
    y = np.zeros((5, 2, 5))
    y[4, 0, 1] = np.inf
    with pytest.raises(ValueError, match="y: contains NaN or infinity at step t=4"):
        cp.value_and_grad(model, x, y, method="backprop")
    params = {"weight_ih_l0": np.eye(2), "weight_hh_l0": 1e200 * np.eye(2)}
    relu = cp.RNN.from_params(params, nonlinearity="relu")
    with pytest.raises(NonFiniteError, match="layer 0 at step t=2"):
        cp.value_and_grad(relu, np.ones((4, 1, 2)), method="backprop")
    assert np.isinf(y[4, 0, 1]) and np.isnan(bad[3, 1, 2]) and not np.any(x)  # nothing passed in was written
