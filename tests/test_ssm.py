"""The diagonal recurrence layer: gradients against torch autograd, finite differences, every method, errors."""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.kernels import ssm_numpy

torch = pytest.importorskip("torch")

T, N, D_IN, D, D_OUT = 12, 3, 3, 5, 2
SCANS = [m for m in cp.valid_schedules() if m not in ("tree", "auto")]


def make(dtype=np.float64, feedthrough=True, batch_first=False, seed=0):
    layer = cp.DiagonalRecurrence.random(D_IN, D, D_OUT, seed=seed, dtype=dtype, feedthrough=feedthrough,
                                         batch_first=batch_first)
    rng = np.random.default_rng(seed + 1)
    shape = (N, T) if batch_first else (T, N)
    u = rng.standard_normal((*shape, D_IN)).astype(dtype)
    y = rng.standard_normal((*shape, D_OUT)).astype(dtype)
    h0 = rng.standard_normal((N, D)).astype(dtype)
    return layer, u, y, h0


def torch_reference(layer, u, y, h0, loss):
    """The same recurrence as a plain torch loop, float64, differentiated by autograd."""
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in layer.params.items()}
    ut = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    ht = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
    xs = ut.transpose(0, 1) if layer.batch_first else ut
    h, ys = ht, []
    for t in range(xs.shape[0]):
        h = P["a"] * h + xs[t] @ P["B"].T
        ys.append(h @ P["C"].T + (xs[t] @ P["D"].T if "D" in P else 0))
    out = torch.stack(ys)
    out = out.transpose(0, 1) if layer.batch_first else out
    value = out.sum() if loss == "sum" else torch.nn.functional.mse_loss(out, torch.tensor(y, dtype=torch.float64))
    value.backward()
    grads = {k: v.grad.numpy() for k, v in P.items()}
    grads["input"], grads["h0"] = ut.grad.numpy(), ht.grad.numpy()
    return value.item(), grads, out.detach().numpy()


def assert_close(got, want, rtol):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        scale = np.abs(want[k]).max() + 1e-30
        assert np.abs(got[k] - want[k]).max() <= rtol * scale, (k, np.abs(got[k] - want[k]).max() / scale)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("feedthrough", [True, False])
@pytest.mark.parametrize("loss", ["sum", "mse"])
def test_grads_match_torch(dtype, rtol, batch_first, feedthrough, loss):
    layer, u, y, h0 = make(dtype, feedthrough, batch_first)
    want_value, want, want_out = torch_reference(layer, u, y, h0, loss)
    value, got = cp.value_and_grad(layer, u, None if loss == "sum" else y, loss=loss, method="backprop", h0=h0,
                                   with_inputs=True)
    assert all(g.dtype == dtype for g in got.values())  # float32 stays float32
    assert value == pytest.approx(want_value, rel=rtol)
    assert_close(got, want, rtol)
    np.testing.assert_allclose(layer.forward(u, h0), want_out, rtol=rtol, atol=rtol)


def test_parameter_grads_without_inputs_and_grad_drops_the_value():
    layer, u, y, h0 = make()
    g = cp.grad(layer, u, y, loss="mse", method="backprop")
    assert sorted(g) == ["B", "C", "D", "a"]
    _, want, _ = torch_reference(layer, u, y, np.zeros((N, D)), "mse")
    assert_close(g, {k: want[k] for k in g}, 1e-10)


def test_h0_of_shape_d_gets_a_gradient_of_shape_d():
    layer, u, _, h0 = make()
    _, g = cp.value_and_grad(layer, u, h0=h0[0], method="backprop", with_inputs=True)
    _, want, _ = torch_reference(layer, u, None, np.broadcast_to(h0[0], (N, D)), "sum")
    assert g["h0"].shape == (D,)
    np.testing.assert_allclose(g["h0"], want["h0"].sum(axis=0), rtol=1e-10)


def test_central_finite_differences():
    layer, u, y, h0 = make(seed=3)
    _, g = cp.value_and_grad(layer, u, y, method="backprop", h0=h0)
    eps = 1e-6
    for name in ("a", "B", "C", "D"):
        p = layer.params
        for idx in [(0,) * p[name].ndim, tuple(s - 1 for s in p[name].shape)]:
            vals = []
            for sign in (1, -1):
                moved = {k: v.copy() for k, v in p.items()}
                moved[name][idx] += sign * eps
                other = cp.DiagonalRecurrence(moved["a"], moved["B"], moved["C"], moved["D"])
                vals.append(cp.value_and_grad(other, u, y, method="backprop", h0=h0)[0])
            assert g[name][idx] == pytest.approx((vals[0] - vals[1]) / (2 * eps), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_loops_equal_the_numpy_reference(dtype):
    from chainprod.kernels import ssm_numba

    rng = np.random.default_rng(5)
    a = rng.uniform(-0.99, 0.99, D).astype(dtype)
    X, G = (rng.standard_normal((40, N, D)).astype(dtype) for _ in range(2))
    h0 = rng.standard_normal((N, D)).astype(dtype)
    out = {}
    for name, k in (("numba", ssm_numba), ("numpy", ssm_numpy)):
        H = X.copy()
        assert k.states(a, H, h0, H) == -1  # in place: H starts as X
        L, da = G.copy(), np.empty(D, dtype)
        k.adjoint(a, L, H, h0, L, da)
        out[name] = (H, L, da)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for x, y in zip(out["numba"], out["numpy"]):
        assert x.dtype == dtype
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)
    layer, u, y, h0 = make()
    a_ = cp.value_and_grad(layer, u, y, method="backprop", kernels="numba", h0=h0, with_inputs=True)
    b_ = cp.value_and_grad(layer, u, y, method="backprop", kernels="numpy", h0=h0, with_inputs=True)
    assert_close(a_[1], b_[1], 1e-12)


def test_the_states_kernels_name_the_first_non_finite_step():
    from chainprod.kernels import ssm_numba

    X = np.ones((10, 2, 3))
    X[6, 1, 2] = np.inf
    for k in (ssm_numba, ssm_numpy):
        assert k.states(np.full(3, 0.5), X, np.zeros((2, 3)), np.empty_like(X)) == 6


@pytest.mark.parametrize("method", SCANS + ["auto"])
def test_every_scan_method_equals_backprop(method):
    layer, u, y, h0 = make(seed=7)
    want = cp.value_and_grad(layer, u, y, method="backprop", h0=h0, with_inputs=True)
    got = cp.value_and_grad(layer, u, y, method=method, h0=h0, with_inputs=True)
    assert got[0] == pytest.approx(want[0], rel=1e-12)
    assert_close(got[1], want[1], 1e-10)


@pytest.mark.parametrize("backend", ["serial", "vectorized", "threads"])
def test_scan_backends_equal_backprop(backend):
    layer, u, y, h0 = make(np.float32, batch_first=True, seed=9)
    want = cp.value_and_grad(layer, u, y, method="backprop", h0=h0, with_inputs=True)[1]
    got = cp.value_and_grad(layer, u, y, method="brent_kung", backend=backend, workers=2, h0=h0, with_inputs=True)[1]
    assert all(g.dtype == np.float32 for g in got.values())
    assert_close(got, want, 1e-4)


def test_auto_says_what_it_ran():
    layer, u, _, _ = make()
    _, g, trace = cp.value_and_grad(layer, u, method="auto", return_trace=True)
    assert trace.note.startswith("auto ran")
    _, g2, trace2 = cp.value_and_grad(layer, u, method="backprop", return_trace=True)
    assert "loops" in trace2.note and trace2.events
    assert_close(g, g2, 1e-10)


def test_forward_returns_outputs_and_states():
    layer, u, _, h0 = make(batch_first=True)
    y, h = layer.forward(u, h0, return_states=True)
    assert y.shape == (N, T, D_OUT) and h.shape == (N, T, D)
    p, state = layer.params, h0
    for t in range(T):
        state = p["a"] * state + u[:, t] @ p["B"].T
        np.testing.assert_allclose(h[:, t], state, rtol=1e-12)
        np.testing.assert_allclose(y[:, t], state @ p["C"].T + u[:, t] @ p["D"].T, rtol=1e-12)


def test_nothing_passed_is_modified_and_params_are_read_only_copies():
    layer, u, y, h0 = make()
    a = layer.params["a"].copy()
    B = np.ones((D, D_IN))
    own = cp.DiagonalRecurrence(a, B, np.ones((D_OUT, D)))
    B[0, 0] = 7.0
    assert own.params["B"][0, 0] == 1.0 and not own.params["B"].flags.writeable
    saved = [x.copy() for x in (u, y, h0)]
    for method in ("backprop", "sklansky"):
        cp.value_and_grad(layer, u, y, method=method, h0=h0, with_inputs=True)
    for before, after in zip(saved, (u, y, h0)):
        np.testing.assert_array_equal(before, after)


def test_bad_input_is_refused_naming_what_and_where():
    layer, u, y, h0 = make()
    with pytest.raises(ValueError, match=r"u: expected shape \(T, N, d_in\).*got \(12, 3, 4\)"):
        layer.forward(np.ones((T, N, D_IN + 1)))
    with pytest.raises(ValueError, match=r"u: expected shape"):
        layer.forward(np.ones((T, D_IN)))
    bad = u.copy()
    bad[7, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"u: contains NaN or infinity at step t=7 \(sample n=2, feature 1"):
        cp.value_and_grad(layer, bad, method="backprop")
    with pytest.raises(ValueError, match=r"h0: expected shape \(N, d\) = \(3, 5\).*got \(4, 5\)"):
        layer.forward(u, np.zeros((4, D)))
    with pytest.raises(TypeError, match="u is float32 but the layer is float64"):
        layer.forward(u.astype(np.float32))
    with pytest.raises(TypeError, match="dtype int64"):
        layer.forward(np.ones((T, N, D_IN), dtype=np.int64))
    with pytest.raises(ValueError, match=r"y: expected the output's shape \(T, N, d_out\) = \(12, 3, 2\)"):
        cp.value_and_grad(layer, u, y[:, :, :1], loss="mse")
    with pytest.raises(ValueError, match="loss: unknown"):
        cp.value_and_grad(layer, u, loss="l1")
    with pytest.raises(ValueError, match="only the total product"):
        cp.value_and_grad(layer, u, method="tree")
    with pytest.raises(ValueError, match="method: unknown"):
        cp.value_and_grad(layer, u, method="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        cp.value_and_grad(layer, u, method="backprop", backend="nope")
    with pytest.raises(ValueError, match=r"C: expected shape \(2, 5\)"):
        cp.DiagonalRecurrence(np.ones(5), np.ones((5, 3)), np.ones((2, 4)))
    with pytest.raises(TypeError, match="share one dtype"):
        cp.DiagonalRecurrence(np.ones(5), np.ones((5, 3)), np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        cp.DiagonalRecurrence(np.array([np.nan]), np.ones((1, 1)), np.ones((1, 1)))


@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_overflowing_states_name_the_step(method):
    # |a| = 1e30 and u = 1: h_t ~ 1e30^t, finite up to h_10 ~ 1e300; float64 overflows at step t = 11
    layer = cp.DiagonalRecurrence(np.full(2, 1e30), np.ones((2, 1)), np.ones((1, 2)))
    with pytest.raises(cp.NonFiniteError, match=r"step t=11\b"):
        cp.value_and_grad(layer, np.ones((20, 1, 1)), method=method)
