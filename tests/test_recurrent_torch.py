"""torch's nn.RNN, nn.GRU, nn.LSTM through chainprod: from_torch and torch_backward against loss.backward().

The reference is torch itself: a deep copy of the module, run forward and
``loss.backward()``; ``cp.torch_backward`` must leave every ``.grad`` (the
parameters', and the input's and initial state's where they require one)
as that does, accumulating as autograd accumulates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import UnsupportedModuleError

torch = pytest.importorskip("torch")
from chainprod import torch_recurrent  # noqa: E402  (needs torch)

MODULES = [("RNN", {"nonlinearity": "relu"}), ("RNN", {}), ("GRU", {}), ("LSTM", {})]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _make(mode, layers=2, bias=True, batch_first=False, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return getattr(torch.nn, mode)(3, 4, num_layers=layers, bias=bias, batch_first=batch_first, **kw).to(dtype)


def _reference(module, x, y, h0, loss):
    """loss.backward() on a deep copy: the gradients torch leaves, and the loss."""
    ref = copy.deepcopy(module)
    out = ref(x, h0)[0]
    val = out.sum() if loss == "sum" else torch.nn.functional.mse_loss(out, y)
    val.backward()
    return ref, val.item()


@pytest.mark.parametrize("method", ["backprop", "sklansky"])
@pytest.mark.parametrize("mode,kw", MODULES, ids=["relu", "tanh", "gru", "lstm"])
def test_torch_backward_fills_grad_as_loss_backward(mode, kw, method):
    module = _make(mode, bias=mode != "GRU", batch_first=mode == "LSTM", **kw)
    shape = (2, 5) if module.batch_first else (5, 2)
    x, y = torch.randn(*shape, 3, dtype=torch.float64), torch.randn(*shape, 4, dtype=torch.float64)
    ref, ref_v = _reference(module, x, y, None, "mse")
    for rounds in (1, 2):  # the second call accumulates into .grad, as autograd does
        value = cp.torch_backward(module, x, y, loss="mse", method=method, kernels="numpy")
        assert abs(value - ref_v) <= 1e-10 * abs(ref_v)
        for (name, p), q in zip(module.named_parameters(), ref.parameters()):
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
            assert _rel(p.grad, rounds * q.grad) < 1e-10, name


def test_inputs_and_initial_states_that_require_a_gradient_get_it():
    module = _make("LSTM", layers=2)
    base = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    ref = copy.deepcopy(module)
    rb, rh, rc = (t.detach().clone().requires_grad_(True) for t in (base, h0, c0))
    ref(rb * 2, (rh, rc))[0].sum().backward()
    # x is not a leaf: its gradient flows on into base, as loss.backward() would send it
    cp.torch_backward(module, base * 2, h0=(h0, c0), kernels="numpy")
    for got, want in ((base, rb), (h0, rh), (c0, rc)):
        assert _rel(got.grad, want.grad) < 1e-10
    for p, q in zip(module.parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-10


def test_float32_frozen_parameters_and_the_kept_conversion():
    module = _make("GRU", layers=1, dtype=torch.float32)
    module.bias_hh_l0.requires_grad_(False)
    x = torch.randn(6, 2, 3)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        ref, _ = _reference(module, x, None, None, "sum")
        cp.torch_backward(module, x, method="auto")
        assert module.bias_hh_l0.grad is None  # autograd leaves a frozen parameter alone
        for (name, p), q in zip(module.named_parameters(), ref.parameters()):
            if p.requires_grad:
                assert p.grad.dtype == torch.float32 and _rel(p.grad, q.grad) < 1e-4, name
        kept = torch_recurrent._KEPT[module][1]
        opt.step()  # new values, same structure: the kept model is refreshed, not converted again
    cp.torch_backward(module, x)
    assert torch_recurrent._KEPT[module][1] is kept
    assert np.array_equal(kept.params["weight_hh_l0"], module.weight_hh_l0.detach().numpy())
    module.batch_first = True  # a change of structure converts again
    cp.torch_backward(module, x.transpose(0, 1))
    assert torch_recurrent._KEPT[module][1] is not kept and torch_recurrent._KEPT[module][1].batch_first


def test_from_torch_converts_and_refuses_what_it_cannot_represent():
    for mode, kw in MODULES:
        m = _make(mode, layers=2, bias=False, batch_first=True, **kw)
        model = cp.from_torch(m)
        assert type(model) is getattr(cp, mode) and model.num_layers == 2 and model.batch_first and not model.bias
        assert all(np.array_equal(model.params[n], p.detach().numpy()) for n, p in m.named_parameters())
    for module, option in ((torch.nn.GRU(3, 4, bidirectional=True), "bidirectional=True"),
                           (torch.nn.LSTM(3, 4, proj_size=2), "proj_size=2"),
                           (torch.nn.RNN(3, 4, num_layers=2, dropout=0.5), "dropout=0.5 in training mode")):
        with pytest.raises(UnsupportedModuleError, match=option):
            cp.from_torch(module)
        with pytest.raises(UnsupportedModuleError, match=option):
            cp.torch_backward(module, torch.zeros(2, 1, 3))
    cp.from_torch(torch.nn.RNN(3, 4, num_layers=2, dropout=0.5).eval())  # dropout is off in eval mode

    class MyGRU(torch.nn.GRU):
        pass
    with pytest.raises(UnsupportedModuleError, match="MyGRU"):
        cp.from_torch(MyGRU(3, 4))
    with pytest.raises(UnsupportedModuleError, match="torch.nn.GRU"):
        cp.GRU.from_torch(torch.nn.LSTM(3, 4))


def test_torch_backward_bad_input_touches_no_grad():
    module = _make("LSTM", layers=1)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="y: expected the output's shape"):
        cp.torch_backward(module, x, torch.zeros(4, 2, 3, dtype=torch.float64), loss="mse")
    with pytest.raises(TypeError, match="x is float32"):
        cp.torch_backward(module, x.float())
    with pytest.raises(TypeError, match=r"pair \(h0, c0\)"):
        cp.torch_backward(module, x, h0=torch.zeros(1, 2, 4, dtype=torch.float64))
    bad = x.clone()
    bad[2, 0, 1] = float("inf")
    with pytest.raises(ValueError, match="step t=2"):
        cp.torch_backward(module, bad)
    assert all(p.grad is None for p in module.parameters())
    seq = torch.nn.Sequential(torch.nn.Linear(3, 1)).double()
    with pytest.raises(ValueError, match="only these take an initial state h0"):
        cp.torch_backward(seq, torch.zeros(2, 3, dtype=torch.float64), h0=torch.zeros(1, 2, 1))
