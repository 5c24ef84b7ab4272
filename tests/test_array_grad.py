"""Chains on torch and JAX arrays: gradients computed in that library, checked against numpy and torch autograd.

``cp.grad`` / ``cp.value_and_grad`` of a :class:`~chainprod.Chain` take a torch
tensor or a JAX array (CPU here; CUDA when torch sees one) and return the
gradients, and the value, in the same library, dtype and device
(:mod:`chainprod.array_grad`); ``cp.torch_backward(..., backend="array")``
fills ``.grad`` in torch (:mod:`chainprod.torch_array`). The references are
the numpy path on the numpy reference kernels, and torch autograd on the
same parameters (a plain torch forward pass written here, not chainprod's).
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest

import chainprod as cp

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("array_api_compat")

from torch import nn  # noqa: E402

from chainprod import array_grad  # noqa: E402
from chainprod.activations import ACTIVATIONS  # noqa: E402

TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPE_IDS = {np.float64: "f64", np.float32: "f32"}
LIBS = ["torch", "jax"]
#: every schedule that produces all prefixes (so not "tree"), "auto", and backprop
METHODS = [m for m in cp.valid_schedules() if m != "tree" and cp.schedule(m, 5).is_scan] + ["backprop"]
TORCH_ACTS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
              "softplus": torch.nn.functional.softplus, "identity": lambda z: z}


# -- chains, arrays, references ------------------------------------------------------
def _dense(rng, d_in, d_out, act, dtype, gain=1.0):
    W = gain * rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    return cp.Dense(W.astype(dtype), (0.2 * rng.standard_normal(d_out)).astype(dtype), act)


def _diag(rng, d, act, dtype):
    return cp.Diagonal(rng.uniform(0.6, 1.2, d).astype(dtype), (0.2 * rng.standard_normal(d)).astype(dtype), act)


def mixed_chain(dtype, d_out=2, seed=0):
    """Dense and Diagonal runs, every activation, widths that change (prefixes of several widths)."""
    rng = np.random.default_rng(seed)
    return cp.Chain([_diag(rng, 3, "tanh", dtype), _dense(rng, 3, 5, "relu", dtype, 1.4),
                     _dense(rng, 5, 5, "relu", dtype, 1.4), _diag(rng, 5, "softplus", dtype),
                     _diag(rng, 5, "softplus", dtype), _dense(rng, 5, 5, "sigmoid", dtype, 2.0),
                     _diag(rng, 5, "identity", dtype), _dense(rng, 5, 4, "tanh", dtype),
                     _dense(rng, 4, d_out, "identity", dtype)])


def square_chain(act, kind, dtype, L=6, w=4, seed=1):
    """``L`` layers of one kind and activation at width ``w`` (one run: every prefix one shape), then a readout."""
    rng = np.random.default_rng(seed)
    make = (lambda: _dense(rng, w, w, act, dtype, 1.3)) if kind == "dense" else (lambda: _diag(rng, w, act, dtype))
    return cp.Chain([make() for _ in range(L)] + [_dense(rng, w, 1, "identity", dtype)])


@contextlib.contextmanager
def _x64(lib):
    """JAX computes in float32 unless x64 is on: on for every JAX case (float32 arrays stay float32)."""
    with jax.enable_x64(True) if lib == "jax" else contextlib.nullcontext():
        yield


def _to(lib, a):
    return None if a is None else torch.tensor(a) if lib == "torch" else jnp.asarray(a)


def _host(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _data(chain, N=4, seed=2, one=False):
    rng = np.random.default_rng(seed)
    shape = (chain.d_in,) if one else (N, chain.d_in)
    x = rng.standard_normal(shape).astype(chain.dtype)
    y = rng.standard_normal(shape[:-1] + (chain.d_out,)).astype(chain.dtype)
    return x, y


def assert_close(got, want, tol, what=""):
    """Per-array relative error (max-norm) against the reference, shapes equal."""
    assert len(got) == len(want), what
    for l, (gs, ws) in enumerate(zip(got, want)):
        assert len(gs) == len(ws), (what, l)
        for g, w in zip(gs, ws):
            g, w = _host(g), np.asarray(w)
            assert g.shape == w.shape, (what, l, g.shape, w.shape)
            err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
            assert err <= tol, f"{what} layer {l}: relative error {err:.3g} > {tol}"


def autograd_reference(chain, x, y, loss):
    """``(value, grads)`` by torch autograd on leaf tensors holding the chain's parameters."""
    params = [[torch.tensor(p, requires_grad=True) for p in layer.params] for layer in chain.layers]
    h = torch.tensor(x)
    for layer, (a, b) in zip(chain.layers, params):
        h = TORCH_ACTS[layer.activation](h @ a.T + b if isinstance(layer, cp.Dense) else h * a + b)
    value = h.sum() if loss == "sum" else torch.nn.functional.mse_loss(h, torch.tensor(y).reshape(h.shape))
    value.backward()
    return value.item(), [tuple(p.grad.numpy() for p in ps) for ps in params]


# -- the numpy reference and torch autograd ------------------------------------------------
#: every method on torch in both dtypes and on JAX in float64; JAX float32 on two (a compiled program each)
METHOD_CASES = [(m, "torch", d) for m in METHODS for d in (np.float64, np.float32)] + \
    [(m, "jax", np.float64) for m in METHODS] + [(m, "jax", np.float32) for m in ("backprop", "sklansky")]


@pytest.mark.parametrize("method, lib, dtype", METHOD_CASES,
                         ids=[f"{m}-{lib}-{DTYPE_IDS[d]}" for m, lib, d in METHOD_CASES])
def test_every_method_matches_the_numpy_path(method, lib, dtype):
    chain = mixed_chain(dtype)
    x, y = _data(chain)
    value_ref, ref = cp.value_and_grad(chain, x, y, kernels="numpy", method="backprop")
    with _x64(lib):
        value, got = cp.value_and_grad(chain, _to(lib, x), _to(lib, y), method=method)
        assert_close(got, ref, TOL[dtype], f"{lib} {method}")
        assert abs(float(value) - value_ref) <= TOL[dtype] * abs(value_ref)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", ["dense", "diag"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_each_activation_and_kind_matches_torch_autograd(method, act, kind, dtype):
    chain = square_chain(act, kind, dtype)
    x, _ = _data(chain)
    value_ref, ref = autograd_reference(chain, x, None, "sum")
    value, got = cp.value_and_grad(chain, torch.tensor(x), method=method)
    assert_close(got, ref, TOL[dtype], f"{act} {kind} {method}")
    assert abs(value.item() - value_ref) <= TOL[dtype] * abs(value_ref)


#: both losses with and without a batch axis, backprop and a scan, on torch; on JAX one scan per loss
LOSS_CASES = [(m, loss, one, "torch") for m in ("backprop", "brent_kung") for loss in ("sum", "mse")
              for one in (False, True)] + [("brent_kung", "sum", True, "jax"), ("brent_kung", "mse", False, "jax")]


@pytest.mark.parametrize("method, loss, one, lib", LOSS_CASES,
                         ids=[f"{m}-{loss}-{'one' if one else 'batch'}-{lib}" for m, loss, one, lib in LOSS_CASES])
def test_losses_and_batch_axis_match_numpy_and_autograd(method, loss, one, lib):
    chain = mixed_chain(np.float64, d_out=1 if loss == "sum" else 2)
    x, y = _data(chain, one=one)
    y = None if loss == "sum" else y
    value_ref, ref = cp.value_and_grad(chain, x, y, loss=loss, kernels="numpy")
    _, torch_ref = autograd_reference(chain, x[None] if one else x, y, loss)
    with _x64(lib):
        value, got = cp.value_and_grad(chain, _to(lib, x), _to(lib, y), loss=loss, method=method)
        assert_close(got, ref, 1e-12, "numpy")
        assert_close(got, torch_ref, 1e-12, "autograd")
        assert abs(float(value) - value_ref) <= 1e-12 * abs(value_ref)
        only = cp.grad(chain, _to(lib, x), _to(lib, y), loss=loss, method=method)
        assert_close(only, ref, 1e-12, "grad")


def test_a_one_layer_chain_and_a_width_one_target():
    chain = cp.Chain([_dense(np.random.default_rng(0), 3, 1, "tanh", np.float64)])
    x, y = _data(chain)
    ref = cp.grad(chain, x, y[:, 0], kernels="numpy")
    assert_close(cp.grad(chain, torch.tensor(x), torch.tensor(y[:, 0]), method="sklansky"), ref, 1e-12)


# -- what comes back, what is left alone ---------------------------------------------------------
@pytest.mark.parametrize("lib", LIBS)
def test_results_keep_library_dtype_device_and_inputs_stay_unmodified(lib):
    chain = mixed_chain(np.float32)
    before = [tuple(np.array(p) for p in ps) for ps in chain.params]
    x, y = _data(chain)
    with _x64(lib):
        xa, ya = _to(lib, x), _to(lib, y)
        value, grads = cp.value_and_grad(chain, xa, ya, method="sklansky")
        for a in [value] + [g for gs in grads for g in gs]:
            assert cp.arrays.library_of(a) == lib
            assert cp.arrays.dtype_name(a.dtype) == "float32"
            assert str(cp.arrays.device_of(a)) == str(cp.arrays.device_of(xa))
        assert tuple(value.shape) == ()
        assert [tuple(tuple(g.shape) for g in gs) for gs in grads] == [tuple(p.shape for p in ps)
                                                                        for ps in chain.params]
        np.testing.assert_array_equal(_host(xa), x)
        np.testing.assert_array_equal(_host(ya), y)
        cp.grad(chain, xa, ya, method="sklansky")  # a second call reuses the parameters kept on the device
    for ps, bs in zip(chain.params, before):
        for p, b in zip(ps, bs):
            np.testing.assert_array_equal(p, b)


def test_a_trace_holds_the_schedule_and_the_rounds():
    chain = mixed_chain(np.float64)
    x, y = _data(chain)
    g, trace = cp.grad(chain, torch.tensor(x), torch.tensor(y), method="sklansky", return_trace=True)
    assert trace.backend == "array" and trace.schedule.name == "sklansky"
    assert len(trace.events) == trace.schedule.rounds
    given = cp.Trace(backend="array")
    assert cp.value_and_grad(chain, torch.tensor(x), torch.tensor(y), method="backprop", return_trace=given)[2] is given
    assert given.schedule == "backprop"
    assert_close(g, cp.grad(chain, x, y, kernels="numpy"), 1e-12)
    small = square_chain("tanh", "dense", np.float64, L=3)  # JAX with a trace runs op by op (rounds timed)
    xs = _data(small)[0]
    with _x64("jax"):
        g, trace = cp.grad(small, jnp.asarray(xs), method="sklansky", return_trace=True)
    assert len(trace.events) == trace.schedule.rounds
    assert_close(g, cp.grad(small, xs, kernels="numpy"), 1e-12)


def test_parameters_are_converted_once_per_device_and_dtype():
    chain = mixed_chain(np.float64)
    x = torch.tensor(_data(chain)[0])
    assert array_grad.device_runs(chain, x) is array_grad.device_runs(chain, x)
    run = array_grad.device_runs(chain, x)[1]
    assert isinstance(run.params[0], torch.Tensor) and tuple(run.params[0].shape) == chain.runs[1].params[0].shape
    np.testing.assert_array_equal(run.reversed[0].numpy(), chain.runs[1].reversed[0])


def test_a_tensor_that_requires_grad_gets_no_graph_and_no_grad():
    chain = mixed_chain(np.float64)
    x, y = _data(chain)
    xt = torch.tensor(x, requires_grad=True)
    grads = cp.grad(chain, xt, torch.tensor(y))
    assert xt.grad is None and not any(g.requires_grad for gs in grads for g in gs)


def test_every_activation_and_layer_kind_has_an_array_rule():
    assert set(array_grad.ARRAY_ACTIVATIONS) == set(ACTIVATIONS)
    assert set(array_grad.ARRAY_LAYERS) == {cp.Dense.kind, cp.Diagonal.kind}


# -- method="auto" -------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", [mixed_chain(np.float64), square_chain("tanh", "diag", np.float64, L=40)],
                         ids=["mixed", "diag40"])
def test_auto_on_a_cpu_device_chooses_as_the_numpy_reference(chain):
    x, y = _data(chain)
    y = y if chain.d_out > 1 else None
    _, want = cp.grad(chain, x, y, kernels="numpy", method="auto", return_trace=True)
    got, trace = cp.grad(chain, torch.tensor(x), None if y is None else torch.tensor(y), return_trace=True)
    assert str(trace.schedule) == str(want.schedule)
    assert_close(got, cp.grad(chain, x, y, kernels="numpy"), 1e-12)


def test_auto_on_an_accelerator_weighs_launches_against_flops():
    shapes = array_grad.scan_shapes
    long_diag = square_chain("tanh", "diag", np.float32, L=200)
    wide_dense = cp.mlp([512] * 5 + [1], dtype=np.float32)
    pick = array_grad.accelerator_auto(shapes(long_diag.runs, 8, np.float32), len(long_diag.runs))
    assert pick != "backprop" and pick.name == "sklansky"
    pick = array_grad.accelerator_auto(shapes(wide_dense.runs, 64, np.float32), 1)
    assert pick == "backprop"


# -- torch_backward in torch ---------------------------------------------------------------------------
def _model(dtype=torch.float64):
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Tanh(), nn.Linear(3, 4), nn.Sigmoid(), shared, nn.ReLU(), nn.Sequential(shared),
                         nn.Softplus(), nn.Linear(4, 2, bias=False), nn.Tanh(), nn.Tanh()).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["backprop", "sklansky", "auto"])
def test_torch_backward_on_the_array_backend_equals_loss_backward(method, dtype):
    model, ref = _model(dtype), _model(dtype)
    x, y = torch.randn(2, 5, 3, dtype=dtype), torch.randn(2, 5, 2, dtype=dtype)
    xc, yc = x.clone(), y.clone()
    values = [p.detach().clone() for p in model.parameters()]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for _ in range(2):  # the second call accumulates into .grad
        value = cp.torch_backward(model, x, y, loss="mse", method=method, backend="array")
        want = torch.nn.functional.mse_loss(ref(x), y)
        want.backward()
        assert abs(value - want.item()) <= tol * abs(want.item())
        for p, q in zip(model.parameters(), ref.parameters()):
            assert p.grad.dtype == p.dtype and p.grad.device == p.device and p.grad.shape == p.shape
            assert float((p.grad - q.grad).abs().max()) <= tol * float(q.grad.abs().max())
    assert torch.equal(x, xc) and torch.equal(y, yc)
    assert all(torch.equal(p.detach(), v) for p, v in zip(model.parameters(), values))


def test_torch_backward_on_the_array_backend_sum_loss_and_refusals_write_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    cp.torch_backward(model, x, backend="array", method="brent_kung")
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    before = [p.grad.clone() for p in model.parameters()]
    for kwargs, exc, pattern in [({"x": x.float()}, TypeError, "x is torch.float32"),
                                 ({"x": x.clone().requires_grad_()}, ValueError, "requires a gradient"),
                                 ({"x": x, "kernels": "numba"}, ValueError, "kernels='numba'"),
                                 ({"x": x, "forward": "deer"}, ValueError, "forward='deer'"),
                                 ({"x": x, "y": x[:, :1]}, ValueError, "takes no targets")]:
        with pytest.raises(exc, match=pattern):
            cp.torch_backward(model, backend="array", **kwargs)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_the_array_backend_is_taken_after_a_cpu_call_has_kept_the_model():
    """A kept (current) conversion skips the parameters' device check; backend="array" must still be heard."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    cp.torch_backward(model, x)  # the CPU path: converts the model and keeps it
    cp.torch_backward(model, x)  # served from the kept conversion
    with pytest.raises(ValueError, match="kernels='numba'"):  # only the array path refuses this
        cp.torch_backward(model, x, backend="array", kernels="numba")
    model.zero_grad(set_to_none=True)
    cp.torch_backward(model, x, backend="array")
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    ref(x).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


# -- clear errors ---------------------------------------------------------------------------------
def test_mixing_libraries_is_a_type_error_naming_both():
    chain = mixed_chain(np.float64)
    x, y = _data(chain)
    with pytest.raises(TypeError, match="x is a torch tensor and y a numpy array"):
        cp.grad(chain, torch.tensor(x), y)
    with pytest.raises(TypeError, match="x is a numpy array and y a torch tensor"):
        cp.value_and_grad(chain, x, torch.tensor(y))
    with _x64("jax"), pytest.raises(TypeError, match="x is a JAX array and y a torch tensor"):
        cp.grad(chain, jnp.asarray(x), torch.tensor(y))


@pytest.mark.parametrize("backend", ["threads", "serial", "dask"])
def test_a_numpy_backend_with_a_tensor_is_a_type_error(backend):
    chain = mixed_chain(np.float64)
    x, y = _data(chain)
    with pytest.raises(TypeError, match=f"backend '{backend}' runs on numpy arrays; torch tensors run on "
                                        "backend='array'"):
        cp.grad(chain, torch.tensor(x), torch.tensor(y), backend=backend)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"kernels": "numba"}, ValueError, "kernels='numba' runs on numpy arrays"),
    ({"forward": "deer"}, ValueError, "forward='deer'"),
    ({"method": "nope"}, ValueError, "unknown schedule method 'nope'"),
    ({"method": "tree"}, ValueError, "does not produce every prefix"),
    ({"loss": "l1"}, ValueError, "unknown loss 'l1'"),
    ({"engine_options": {"timeout": 1}}, TypeError, "takes no engine options"),
    ({"x_dtype": np.float32}, TypeError, "x is float32 but the chain's parameters are float64"),
    ({"y_shape": (4, 1)}, ValueError, r"y has shape \(4, 1\) but the model output has shape \(4, 2\)"),
    ({"x_width": 2}, ValueError, "x has width 2"),
    ({"x_nan": True}, ValueError, "NaN or infinity"),
])
def test_bad_arguments_are_refused_with_what_is_wrong(kwargs, exc, pattern):
    chain = mixed_chain(np.float64)
    x, y = _data(chain)
    kwargs = dict(kwargs)
    x = x.astype(kwargs.pop("x_dtype", np.float64))[:, :kwargs.pop("x_width", x.shape[1])]
    y = y[:, :kwargs.pop("y_shape", y.shape)[1]]
    if kwargs.pop("x_nan", False):
        x[0, 0] = np.nan
    with pytest.raises(exc, match=pattern):
        cp.grad(chain, torch.tensor(x), torch.tensor(y), **kwargs)


@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_an_overflow_names_the_layers_as_the_numpy_path_does(method):
    rng = np.random.default_rng(0)
    chain = cp.Chain([cp.Diagonal(np.full(3, 1e80), np.zeros(3)) for _ in range(6)] + [
        _dense(rng, 3, 1, "identity", np.float64)])
    x = np.ones((2, 3)) * 1e-300
    with pytest.raises(cp.errors.NonFiniteError) as want:
        cp.grad(chain, x, kernels="numpy", method=method)
    with pytest.raises(cp.errors.NonFiniteError, match="overflow") as got:
        cp.grad(chain, torch.tensor(x), method=method)
    assert got.value.layers == want.value.layers


# -- CUDA (runs where torch sees a GPU) -------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["backprop", "sklansky", "auto"])
def test_cuda_chains_and_models_compute_on_the_device(method):
    chain = mixed_chain(np.float64)
    x, y = _data(chain, N=16)
    ref = cp.grad(chain, x, y, kernels="numpy")
    value, got = cp.value_and_grad(chain, torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda"),
                                   method=method)
    assert value.device.type == "cuda" and all(g.device.type == "cuda" for gs in got for g in gs)
    assert_close(got, ref, 1e-12, "cuda")
    model, ref_model = _model().cuda(), _model().cuda()
    xt, yt = torch.randn(4, 3, dtype=torch.float64, device="cuda"), torch.randn(4, 2, dtype=torch.float64,
                                                                               device="cuda")
    cp.torch_backward(model, xt, yt, loss="mse", method=method)  # CUDA parameters: the array path by default
    torch.nn.functional.mse_loss(ref_model(xt), yt).backward()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert p.grad.device == p.device
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="backend 'threads' runs on numpy arrays"):
        cp.torch_backward(model, xt, yt, loss="mse", backend="threads")
