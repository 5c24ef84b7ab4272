"""Recurrent models on torch and JAX arrays: computed in that library, checked against numpy and torch autograd.

``cp.RNN`` (tanh, relu), ``cp.GRU``, ``cp.LSTM`` and ``cp.DiagonalRecurrence``
take a torch tensor or a JAX array (CPU here; CUDA when torch sees one) and
return gradients of the same library, dtype and device. The references are
the numpy path with the numpy reference kernels and torch autograd on
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` holding the same parameters.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import chainprod as cp

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("array_api_compat")

RTOL = {np.float64: 1e-10, np.float32: 1e-4}
LIBS = ["torch", "jax"]
SCANS = ["sklansky", "brent_kung"]

#: (class, options, num_layers, bias, batch_first): every cell, 1 and 2 layers, with and without bias and batch_first
MODELS = [
    (cp.RNN, {"nonlinearity": "tanh"}, 1, True, False),
    (cp.RNN, {"nonlinearity": "relu"}, 2, False, True),
    (cp.GRU, {}, 2, True, True),
    (cp.GRU, {}, 1, False, False),
    (cp.LSTM, {}, 1, True, True),
    (cp.LSTM, {}, 2, False, False),
]
MODEL_IDS = [f"{c.__name__}{o.get('nonlinearity', '')}-L{L}-{'bias' if b else 'nobias'}-{'bf' if bf else 'tf'}"
             for c, o, L, b, bf in MODELS]
T, N, D_IN, H = 6, 3, 3, 4


def _x64(lib, dtype):
    """JAX computes in float32 unless x64 is switched on: on for every JAX case (float32 arrays stay float32)."""
    return jax.enable_x64(True) if lib == "jax" else contextlib.nullcontext()


def _to(lib, a):
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_to(lib, v) for v in a)
    return torch.tensor(a) if lib == "torch" else jnp.asarray(a)


def _host(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _close(got, want, rtol, what=""):
    """Normwise relative error, as the rest of the suite measures it."""
    got, want = _host(got).astype(np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


def _model(case, dtype, seed=0):
    cls, opts, L, bias, bf = case
    return cls(D_IN, H, L, bias=bias, batch_first=bf, dtype=dtype, seed=seed, **opts)


def _data(model, dtype, *, mse=False, with_h0=False, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, T, D_IN) if model.batch_first else (T, N, D_IN)).astype(dtype)
    y = rng.standard_normal((N, T, H) if model.batch_first else (T, N, H)).astype(dtype) if mse else None
    h0 = None
    if with_h0:
        h0 = 0.5 * rng.standard_normal((model.num_layers, N, H)).astype(dtype)
        h0 = (h0, 0.5 * rng.standard_normal((model.num_layers, N, H)).astype(dtype)) if model.mode == "LSTM" else h0
    return x, y, h0


def _torch_module(model):
    """``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` holding ``model``'s parameters: the autograd reference."""
    opts = {"nonlinearity": model.nonlinearity} if model.mode == "RNN" else {}
    mod = getattr(torch.nn, model.mode)(model.input_size, model.hidden_size, model.num_layers, bias=model.bias,
                                        batch_first=model.batch_first, **opts)
    mod = mod.to(torch.float64 if model.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            p.copy_(torch.from_numpy(np.array(model.params[name])))
    return mod


def _autograd(model, x, y, h0):
    mod = _torch_module(model)
    xt = torch.tensor(x, requires_grad=True)
    states = None if h0 is None else tuple(torch.tensor(s, requires_grad=True) for s in
                                           (h0 if isinstance(h0, tuple) else (h0,)))
    out = mod(xt, None if states is None else states if model.mode == "LSTM" else states[0])[0]
    loss = out.sum() if y is None else torch.nn.functional.mse_loss(out, torch.tensor(y))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in mod.named_parameters()}
    grads["input"] = xt.grad.numpy()
    for name, s in zip(("h0", "c0"), states or ()):
        grads[name] = s.grad.numpy()
    return loss.item(), grads


def _check_library(grads, lib, dtype):
    for name, g in grads.items():
        if lib == "torch":
            assert isinstance(g, torch.Tensor) and g.device.type == "cpu", name
            assert g.dtype == (torch.float64 if dtype == np.float64 else torch.float32), name
        else:
            assert isinstance(g, jax.Array) and g.dtype == np.dtype(dtype), name
            assert {d.platform for d in g.devices()} == {"cpu"}, name


# -- RNN, GRU, LSTM --------------------------------------------------------------------------------
def _grid(full_torch, jax_subset):
    """torch over the whole grid; JAX (each new shape and dtype compiles its ops once) over a subset."""
    return [pytest.param("torch", *args, id="torch-" + i) for args, i in full_torch] + \
        [pytest.param("jax", *args, id="jax-" + i) for args, i in jax_subset]


_CASES = list(zip(MODELS, MODEL_IDS))
_DT = [(np.float64, "f64"), (np.float32, "f32")]


@pytest.mark.parametrize("lib, case, dtype", _grid(
    [((c, d), f"{i}-{di}") for c, i in _CASES for d, di in _DT],
    [((_CASES[k][0], d), f"{_CASES[k][1]}-{di}") for k, (d, di) in ((1, _DT[0]), (3, _DT[0]), (5, _DT[0]),
                                                                    (4, _DT[1]))]))
def test_backprop_matches_numpy_and_autograd(lib, case, dtype):
    model = _model(case, dtype)
    mse = case[0] is not cp.GRU
    x, y, h0 = _data(model, dtype, mse=mse, with_h0=case[2] == 2)
    v_np, g_np = cp.value_and_grad(model, x, y, h0=h0, method="backprop", kernels="numpy", with_inputs=True)
    v_ag, g_ag = _autograd(model, x, y, h0)
    with _x64(lib, dtype):
        x_in, y_in, h_in = _to(lib, x), _to(lib, y), _to(lib, h0)
        before = [_host(a).copy() for a in (x_in, y_in) if a is not None]
        value, g = cp.value_and_grad(model, x_in, y_in, h0=h_in, method="backprop", with_inputs=True)
    rtol = RTOL[dtype]
    assert isinstance(value, float)
    assert abs(value - v_np) <= rtol * abs(v_np) and abs(value - v_ag) <= rtol * abs(v_ag)
    assert list(g) == list(g_np)
    _check_library(g, lib, dtype)
    for name in g_np:
        _close(g[name], g_np[name], rtol, f"{name} vs numpy")
        if name in g_ag:  # without h0 autograd has no leaf for it
            _close(g[name], g_ag[name], rtol, f"{name} vs autograd")
    for a, b in zip([a for a in (x_in, y_in) if a is not None], before):
        np.testing.assert_array_equal(_host(a), b)  # inputs unmodified


@pytest.mark.parametrize("lib, case, method", _grid(
    [((_CASES[k][0], m), f"{_CASES[k][1]}-{m}") for k in (0, 1, 2, 5) for m in SCANS],
    [((_CASES[0][0], "sklansky"), f"{_CASES[0][1]}-sklansky"), ((_CASES[5][0], "brent_kung"),
                                                                 f"{_CASES[5][1]}-brent_kung")]))
def test_scan_matches_backprop(lib, case, method):
    model = _model(case, np.float64)
    x, y, h0 = _data(model, np.float64, mse=True, with_h0=True)
    _, g_np = cp.value_and_grad(model, x, y, h0=h0, method="backprop", kernels="numpy", with_inputs=True)
    with _x64(lib, np.float64):
        value, g, trace = cp.value_and_grad(model, _to(lib, x), _to(lib, y), h0=_to(lib, h0), method=method,
                                            with_inputs=True, return_trace=True)
    _check_library(g, lib, np.float64)
    for name in g_np:
        _close(g[name], g_np[name], 1e-10, name)
    assert trace.events  # the scan's rounds ran on the array executor and were recorded


def test_scan_float32():
    lib = "torch"
    model = _model(MODELS[4], np.float32)
    x, y, _ = _data(model, np.float32, mse=True)
    ref = _model(MODELS[4], np.float64)  # the same draws in float64: the float32 scan against float64 truth
    _, g64 = cp.value_and_grad(ref, x.astype(np.float64), y.astype(np.float64), method="backprop", kernels="numpy")
    _, g = cp.value_and_grad(model, _to(lib, x), _to(lib, y), method="brent_kung")
    _check_library(g, lib, np.float32)
    for name in g64:
        _close(g[name], g64[name], 1e-4, name)


@pytest.mark.parametrize("case", [MODELS[1], MODELS[4]], ids=[MODEL_IDS[1], MODEL_IDS[4]])
@pytest.mark.parametrize("lib", LIBS)
def test_forward_matches_numpy(lib, case):
    model = _model(case, np.float64)
    x, _, h0 = _data(model, np.float64, with_h0=True)
    out_np, hn_np = model.forward(x, h0, kernels="numpy")
    with _x64(lib, np.float64):
        out, hn = model.forward(_to(lib, x), _to(lib, h0))
    _close(out, out_np, 1e-12, "output")
    for got, want in zip(hn if isinstance(hn, tuple) else (hn,), hn_np if isinstance(hn_np, tuple) else (hn_np,)):
        _close(got, want, 1e-12, "h_n")
    assert type(out) is type(_to(lib, x))


def test_auto_on_cpu_runs_backprop_and_says_so():
    model = _model(MODELS[4], np.float64)
    x, _, _ = _data(model, np.float64)
    _, g, trace = cp.value_and_grad(model, torch.tensor(x), return_trace=True)
    _, g_np = cp.value_and_grad(model, x, method="backprop", kernels="numpy")
    assert "CPU device ran backprop" in trace.note
    for name in g_np:
        _close(g[name], g_np[name], 1e-10, name)


def test_one_layer_h0_of_shape_n_h_and_one_step():
    model = cp.GRU(D_IN, H, seed=3)
    rng = np.random.default_rng(0)
    x, h0 = rng.standard_normal((1, N, D_IN)), rng.standard_normal((N, H))
    _, g_np = cp.value_and_grad(model, x, h0=h0, method="backprop", kernels="numpy", with_inputs=True)
    for method in ("backprop", "sklansky"):
        _, g = cp.value_and_grad(model, torch.tensor(x), h0=torch.tensor(h0), method=method, with_inputs=True)
        assert tuple(g["h0"].shape) == (N, H)
        for name in g_np:
            _close(g[name], g_np[name], 1e-10, f"{method} {name}")


def test_errors_name_what_is_wrong():
    model = _model(MODELS[5], np.float64)
    x, _, _ = _data(model, np.float64)
    xt = torch.tensor(x)
    with pytest.raises(ValueError, match="kernels='numba'"):
        cp.grad(model, xt, kernels="numba")
    with pytest.raises(TypeError, match="backend 'threads' runs on numpy arrays; torch tensors run on backend='array'"):
        cp.grad(model, xt, backend="threads", workers=2)
    with pytest.raises(ValueError, match="forward='deer'"):
        cp.grad(model, xt, forward="deer")
    with pytest.raises(TypeError, match="a numpy array"):
        cp.grad(model, xt, h0=(np.zeros((2, N, H)), np.zeros((2, N, H))))
    with pytest.raises(TypeError, match="float32 but the model is float64"):
        cp.grad(model, xt.float())
    bad = x.copy()
    bad[4, 1, 0] = np.nan
    with pytest.raises(ValueError, match="step t=4"):
        cp.grad(model, torch.tensor(bad))
    with pytest.raises(ValueError, match="expected shape"):
        cp.grad(model, xt, torch.zeros(T, N, H + 1, dtype=torch.float64), loss="mse")
    with pytest.raises(ValueError, match="unknown 'nope'"):
        cp.grad(model, xt, method="nope")
    relu = cp.RNN.from_params({"weight_ih_l0": np.full((2, 1), 1e200), "weight_hh_l0": np.full((2, 2), 1e200)},
                              nonlinearity="relu")
    with pytest.raises(cp.NonFiniteError, match="layer 0 at step t=1"):
        cp.grad(relu, torch.ones((3, 1, 1), dtype=torch.float64))


# -- the diagonal recurrence ---------------------------------------------------------------------------
def _diagonal_reference(layer, u):
    """``y_t = C h_t + D u_t`` with ``h_t = a * h_{t-1} + B u_t`` from zeros: a plain loop in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in layer.params.items()}
    uu = np.swapaxes(u, 0, 1) if layer.batch_first else u
    h, ys = np.zeros((uu.shape[1], layer.d)), []
    for t in range(uu.shape[0]):
        h = p["a"] * h + uu[t] @ p["B"].T
        ys.append(h @ p["C"].T + (uu[t] @ p["D"].T if "D" in p else 0))
    y = np.stack(ys)
    return np.swapaxes(y, 0, 1) if layer.batch_first else y


# -- the diagonal recurrence, gradients ---------------------------------------------------------------
@pytest.mark.parametrize("lib, dtype, method", _grid(
    [((d, m), f"{di}-{m}") for d, di in _DT for m in ("backprop", *SCANS)],
    [((np.float64, "backprop"), "f64-backprop"), ((np.float64, "sklansky"), "f64-sklansky"),
     ((np.float32, "brent_kung"), "f32-brent_kung")]))
def test_diagonal_recurrence(lib, dtype, method):
    rng = np.random.default_rng(2)
    for feedthrough, bf, loss in ((True, False, "mse"), (False, True, "sum")):
        layer = cp.DiagonalRecurrence.random(3, 5, 2, seed=4, dtype=dtype, feedthrough=feedthrough, batch_first=bf)
        u = rng.standard_normal((N, T, 3) if bf else (T, N, 3)).astype(dtype)
        y = rng.standard_normal((N, T, 2) if bf else (T, N, 2)).astype(dtype) if loss == "mse" else None
        h0 = rng.standard_normal(5).astype(dtype)
        v_np, g_np = cp.value_and_grad(layer, u, y, loss=loss, h0=h0, method="backprop", kernels="numpy",
                                       with_inputs=True)
        with _x64(lib, dtype):
            u_in = _to(lib, u)
            value, g = cp.value_and_grad(layer, u_in, _to(lib, y), loss=loss, h0=_to(lib, h0), method=method,
                                         with_inputs=True)
            out = layer.forward(u_in)
        assert abs(value - v_np) <= RTOL[dtype] * abs(v_np)
        assert list(g) == list(g_np)
        _check_library(g, lib, dtype)
        for name in g_np:
            _close(g[name], g_np[name], RTOL[dtype], name)
        _close(out, _diagonal_reference(layer, u), RTOL[dtype], "forward")
        np.testing.assert_array_equal(_host(u_in), u)


def test_diagonal_recurrence_errors():
    layer = cp.DiagonalRecurrence.random(3, 5, 2, seed=4)
    u = torch.zeros((T, N, 3), dtype=torch.float64)
    with pytest.raises(TypeError, match="u is float32 but the layer is float64"):
        cp.grad(layer, u.float())
    with pytest.raises(ValueError, match="kernels='numba'"):
        cp.grad(layer, u, kernels="numba")
    with pytest.raises(TypeError, match="backend 'serial' runs on numpy arrays"):
        cp.grad(layer, u, backend="serial")
    with pytest.raises(ValueError, match=r"h0: expected shape \(3, 5\) or \(5,\)"):
        cp.grad(layer, u, h0=torch.zeros(4, dtype=torch.float64))


# -- torch_backward in torch --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["backprop", "brent_kung"])
@pytest.mark.parametrize("mode", ["RNN", "GRU", "LSTM"])
def test_torch_backward_array_equals_loss_backward(mode, method):
    torch.manual_seed(0)
    mods = [getattr(torch.nn, mode)(D_IN, H, 2, batch_first=True).double() for _ in range(2)]
    mods[1].load_state_dict(mods[0].state_dict())
    mods[0].weight_hh_l0.requires_grad_(False)  # a frozen parameter is left alone
    mods[1].weight_hh_l0.requires_grad_(False)
    x0 = torch.randn(N, T, D_IN, dtype=torch.float64)
    y = torch.randn(N, T, H, dtype=torch.float64)
    xs = [x0.clone().requires_grad_(True) for _ in range(2)]
    for _step in range(2):  # the second step accumulates into .grad
        loss = torch.nn.functional.mse_loss(mods[0](xs[0])[0], y)
        loss.backward()
        value = cp.torch_backward(mods[1], xs[1], y, loss="mse", backend="array", method=method)
        assert abs(value - loss.item()) <= 1e-12 * abs(loss.item())
    for (name, p), q in zip(mods[0].named_parameters(), mods[1].parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        _close(q.grad, p.grad.numpy(), 1e-10, name)
    _close(xs[1].grad, xs[0].grad.numpy(), 1e-10, "x.grad")


def test_torch_backward_array_refuses_what_it_cannot_run():
    mod = torch.nn.GRU(D_IN, H).double()
    x = torch.randn(T, N, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="kernels='numba'"):
        cp.torch_backward(mod, x, backend="array", kernels="numba")
    with pytest.raises(ValueError, match="forward='deer'"):
        cp.torch_backward(mod, x, backend="array", forward="deer")
    with pytest.raises(TypeError, match="float32 but the model is float64"):
        cp.torch_backward(mod, x.float(), backend="array")
    assert all(p.grad is None for p in mod.parameters())  # refused before any .grad is touched


def test_inputs_that_require_grad_give_plain_gradients():
    model = _model(MODELS[2], np.float64)
    x, _, _ = _data(model, np.float64)
    xt = torch.tensor(x, requires_grad=True)
    _, g = cp.value_and_grad(model, xt, method="backprop", with_inputs=True)
    assert not any(v.requires_grad for v in g.values())
    assert xt.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["backprop", "brent_kung", "auto"])
def test_cuda_lstm_stays_on_the_device(method):
    torch.manual_seed(0)
    cpu = torch.nn.LSTM(D_IN, H, 2).double()
    gpu = torch.nn.LSTM(D_IN, H, 2).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x, y = torch.randn(T, N, D_IN, dtype=torch.float64), torch.randn(T, N, H, dtype=torch.float64)
    torch.nn.functional.mse_loss(cpu(x)[0], y).backward()
    cp.torch_backward(gpu, x.cuda(), y.cuda(), loss="mse", method=method)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.grad.device.type == "cuda"
        _close(q.grad, p.grad.numpy(), 1e-10, name)
    model = cp.from_torch(cpu)
    _, g = cp.value_and_grad(model, x.cuda(), y.cuda(), method=method, with_inputs=True)
    assert all(v.device.type == "cuda" for v in g.values())
    layer = cp.DiagonalRecurrence.random(3, 5, 2, seed=0)
    u = np.random.default_rng(0).standard_normal((T, N, 3))
    _, g_np = cp.value_and_grad(layer, u, method="backprop", kernels="numpy")
    _, g = cp.value_and_grad(layer, torch.tensor(u).cuda(), method=method)
    for name in g_np:
        assert g[name].device.type == "cuda"
        _close(g[name], g_np[name], 1e-10, name)
