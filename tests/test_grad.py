"""``grad`` against backprop, a hand reference, finite differences; losses and training."""

from __future__ import annotations

import collections.abc
import warnings

import numpy as np
import pytest
from conftest import LOCAL_BACKEND_IDS, LOCAL_BACKENDS, grads_close

import chainprod as cp
from chainprod.testing import random_chain, reference_grads

METHODS = ["sequential", "independent", "hillis_steele", "sklansky", "brent_kung", "blelloch", "chunked", "auto"]


def chains():
    """(id, chain) pairs covering dense / diagonal / mixed, varying widths, every activation."""
    out = [
        ("mlp-tanh", cp.mlp([5, 8, 8, 8, 8, 1], seed=1)),
        ("mlp-widths", cp.mlp([3, 7, 2, 5, 4, 1], activation="sigmoid", seed=2)),
        ("mlp-relu", cp.mlp([4, 6, 6, 6, 1], activation="relu", seed=3)),
        ("dense-softplus", random_chain(6, 5, kind="dense", activation="softplus", seed=4)),
        ("diag", random_chain(9, 4, kind="diag", activation="tanh", seed=5)),
        ("diag-linear", cp.diagonal_chain(12, 4, seed=6)),
        ("mixed-tanh", random_chain(10, 4, kind="mixed", activation="tanh", seed=7, d_in=3)),
        ("mixed-identity", random_chain(8, 3, kind="mixed", activation="identity", seed=8)),
        ("mixed-sigmoid", random_chain(8, 3, kind="mixed", activation="sigmoid", seed=9)),
        ("one-layer", cp.mlp([4, 1], seed=10)),
        ("two-layers", cp.mlp([4, 3, 1], seed=11)),
        ("width-one", cp.Chain([cp.Diagonal(np.array([0.9]), np.array([0.1]), "tanh")] * 5
                               + [cp.Dense(np.array([[1.5]]), np.array([0.2]), None)])),
    ]
    return out


CHAINS = chains()
CHAIN_IDS = [c[0] for c in CHAINS]


def inputs(chain, batch, seed=0):
    rng = np.random.default_rng(seed)
    shape = (chain.d_in,) if batch is None else (batch, chain.d_in)
    return rng.standard_normal(shape).astype(chain.dtype)


@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_scan_methods_match_backprop_and_reference(method, backend, workers):
    for k, (_, chain) in enumerate(CHAINS):
        batch = [None, 1, 4][k % 3]
        x = inputs(chain, batch, seed=k)
        g = cp.grad(chain, x, method=method, backend=backend, workers=workers)
        bp = cp.grad(chain, x, method="backprop")
        ref = reference_grads(chain, x)
        grads_close(g, bp, 1e-10)
        grads_close(g, ref, 1e-10)


@pytest.mark.parametrize("chain", [c[1] for c in CHAINS], ids=CHAIN_IDS)
def test_check_grad_finite_differences(chain):
    x = inputs(chain, 3, seed=1)
    for method in ("backprop", "sklansky", "chunked"):
        errs = cp.check_grad(chain, x, method=method)
        assert errs.shape == (len(chain),)
        assert np.all(errs < 1e-6), (method, errs)
    g = cp.grad(chain, x, method="brent_kung", backend="threads", workers=2)
    assert np.all(cp.check_grad(chain, x, grads=g) < 1e-6)


def test_check_grad_detects_a_wrong_gradient():
    chain = cp.mlp([3, 4, 4, 1], seed=0)
    x = inputs(chain, 2)
    g = cp.grad(chain, x)
    bad = [tuple(p.copy() for p in gl) for gl in g]
    bad[1] = (bad[1][0] * 1.01, bad[1][1])
    errs = cp.check_grad(chain, x, grads=bad)
    assert errs[1] > 1e-4 and errs[0] < 1e-6 and errs[2] < 1e-6


def test_numerical_grad_entrywise():
    chain = random_chain(4, 3, kind="mixed", seed=3, d_in=2)
    x = inputs(chain, 2, seed=3)
    num = cp.numerical_grad(chain, x)
    grads_close(cp.grad(chain, x, method="sklansky"), num, 1e-6, atol=1e-9)


def my_backprop(chain, x, seed):
    """A from-scratch backprop using only the layers' public parameters."""
    act = {"tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
           "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0),
           "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
           "softplus": (lambda z: np.log1p(np.exp(z)), lambda z: 1 / (1 + np.exp(-z))),
           "identity": (lambda z: z, lambda z: np.ones_like(z))}
    h, cache = np.atleast_2d(x).astype(np.float64), []
    for ly in chain.layers:
        p0, p1 = (np.asarray(p, dtype=np.float64) for p in ly.params)
        z = h @ p0.T + p1 if isinstance(ly, cp.Dense) else h * p0 + p1
        cache.append((h, z))
        h = act[ly.activation][0](z)
    g = np.asarray(seed, dtype=np.float64).reshape(h.shape)
    out = [None] * len(chain)
    for l in reversed(range(len(chain))):
        ly, (hin, z) = chain.layers[l], cache[l]
        delta = g * act[ly.activation][1](z)
        p0 = np.asarray(ly.params[0], dtype=np.float64)
        if isinstance(ly, cp.Dense):
            out[l] = (delta.T @ hin, delta.sum(0))
            g = delta @ p0
        else:
            out[l] = ((delta * hin).sum(0), delta.sum(0))
            g = delta * p0
    return h, out


@pytest.mark.parametrize("chain", [c[1] for c in CHAINS], ids=CHAIN_IDS)
def test_against_my_backprop_sum_and_mse(chain):
    x = inputs(chain, 5, seed=2)
    out, ref = my_backprop(chain, x, np.ones((5, 1)))
    grads_close(cp.grad(chain, x, method="sklansky"), ref, 1e-10)
    np.testing.assert_allclose(chain.forward(x), out, rtol=1e-12)
    y = np.random.default_rng(9).standard_normal((5, 1))
    seed = 2 * (out - y) / out.size  # d/dout of mean((out - y)^2)
    _, ref_mse = my_backprop(chain, x, seed)
    for method in ("backprop", "brent_kung", "chunked"):
        grads_close(cp.grad(chain, x, y, loss="mse", method=method), ref_mse, 1e-10)
    v, g = cp.value_and_grad(chain, x, y, loss="mse", method="sklansky")
    assert v == pytest.approx(np.mean((out - y) ** 2), rel=1e-12)
    grads_close(g, ref_mse, 1e-10)
    # y without loss= means mse
    grads_close(cp.grad(chain, x, y), ref_mse, 1e-10)


@pytest.mark.parametrize("backend,workers", [("serial", None), ("vectorized", None), ("threads", 2)],
                         ids=["serial", "vectorized", "threads-w2"])
def test_vector_output_with_mse(backend, workers):
    # output width > 1: dense MLP, and a purely diagonal chain (diagonal last Jacobian)
    for chain in (cp.mlp([3, 6, 6, 4], seed=5), cp.diagonal_chain(6, 3, activation="tanh", readout=False)):
        x = inputs(chain, 3, seed=5)
        y = np.random.default_rng(1).standard_normal((3, chain.d_out))
        out, _ = my_backprop(chain, x, np.zeros((3, chain.d_out)))
        _, ref = my_backprop(chain, x, 2 * (out - y) / out.size)
        for method in ("backprop", "sklansky", "sequential", "hillis_steele", "chunked"):
            g = cp.grad(chain, x, y, loss="mse", method=method, backend=backend, workers=workers)
            grads_close(g, ref, 1e-10)


def test_batch_gradient_is_sum_of_sample_gradients():
    for _, chain in CHAINS[:8]:
        x = inputs(chain, 4, seed=7)
        g = cp.grad(chain, x, method="sklansky")
        parts = [cp.grad(chain, x[n], method="brent_kung") for n in range(4)]
        summed = [tuple(sum(p[l][i] for p in parts) for i in range(len(g[l]))) for l in range(len(g))]
        grads_close(g, summed, 1e-10)


def test_one_dim_x_equals_batch_of_one():
    chain = random_chain(7, 4, kind="mixed", seed=1)
    x = inputs(chain, None, seed=1)
    for method in ("backprop", "sklansky", "chunked"):
        a = cp.grad(chain, x, method=method)
        b = cp.grad(chain, x[None], method=method)
        grads_close(a, b, 0.0)


def test_grad_shapes_and_dtypes_follow_params():
    for dtype in (np.float64, np.float32):
        chain = random_chain(6, 3, kind="mixed", seed=2, dtype=dtype, d_in=5)
        g = cp.grad(chain, inputs(chain, 2), method="sklansky")
        # a list on the numpy path; on the compiled one a sequence whose tuples are views of one array
        assert isinstance(g, collections.abc.Sequence) and len(g) == len(chain)
        for gl, ly in zip(g, chain.layers):
            assert isinstance(gl, tuple) and len(gl) == len(ly.params)
            for a, p in zip(gl, ly.params):
                assert a.shape == p.shape and a.dtype == p.dtype


@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
def test_float32_chains(backend, workers):
    for kind in ("dense", "diag", "mixed"):
        c64 = random_chain(20, 6, kind=kind, seed=3)
        c32 = c64.with_params([tuple(p.astype(np.float32) for p in ps) for ps in c64.params])
        x = inputs(c64, 3, seed=3)
        ref = reference_grads(c64, x)
        for method in ("sklansky", "brent_kung", "chunked", "auto"):
            g = cp.grad(c32, x.astype(np.float32), method=method, backend=backend, workers=workers)
            grads_close(g, ref, 1e-4)
    c32 = random_chain(6, 3, kind="mixed", seed=4, dtype=np.float32)
    assert np.all(cp.check_grad(c32, inputs(c32, 2)) < 5e-2)  # eps = 1e-2 in float32


def test_long_chains():
    # long enough for chunked / auto to split into real chunks
    for chain in (cp.diagonal_chain(300, 6, activation="tanh", seed=1),
                  random_chain(150, 5, kind="mixed", seed=2), cp.mlp([4] + [6] * 120 + [1], seed=3)):
        x = inputs(chain, 2, seed=4)
        ref = reference_grads(chain, x)
        for method in ("sequential", "hillis_steele", "sklansky", "brent_kung", "chunked", "auto"):
            grads_close(cp.grad(chain, x, method=method), ref, 1e-9)
        grads_close(cp.grad(chain, x, method="chunked", backend="threads", workers=2), ref, 1e-9)


def test_ready_schedule_as_method():
    chain = cp.mlp([3, 5, 5, 5, 5, 1], seed=4)
    x = inputs(chain, 2)
    s = cp.schedule("chunked", len(chain) - 1, chunks=2)
    grads_close(cp.grad(chain, x, method=s), reference_grads(chain, x), 1e-10)
    with pytest.raises(ValueError):
        cp.grad(chain, x, method=cp.schedule("sklansky", len(chain)))


def test_value_and_grad_sum():
    chain = random_chain(7, 4, kind="mixed", seed=5)
    x = inputs(chain, 3, seed=5)
    v, g = cp.value_and_grad(chain, x, method="brent_kung")
    assert v == pytest.approx(float(chain.forward(x).sum()), rel=1e-12)
    grads_close(g, reference_grads(chain, x), 1e-10)
    v2, g2, trace = cp.value_and_grad(chain, x, method="sklansky", return_trace=True)
    assert v2 == v and isinstance(trace, cp.Trace) and trace.num_tasks >= 1


def test_forward_loss_cotangent_backward_equals_grad():
    chain = random_chain(7, 4, kind="mixed", seed=5)
    x = inputs(chain, 3, seed=5)
    y = np.zeros((3, chain.d_out))
    tape = cp.forward(chain, x)
    value, cotangent = cp.loss_cotangent(tape, y, "mse")
    assert cotangent.shape == (3, chain.d_out)
    v, ref = cp.value_and_grad(chain, x, y, loss="mse", method="sklansky")
    assert value == v
    grads_close(cp.backward(tape, cotangent, method="sklansky"), ref, 1e-12)
    grads_close(cp.backward(tape, cotangent=cotangent, method="backprop"), ref, 1e-10)


def test_deprecated_seed_names_still_work_and_warn():
    chain = random_chain(7, 4, kind="mixed", seed=5)
    x = inputs(chain, 3, seed=5)
    tape = cp.forward(chain, x)
    with pytest.warns(DeprecationWarning, match="loss_cotangent"):
        value, seed = cp.loss_seed(tape)
    value2, cotangent = cp.loss_cotangent(tape)
    assert value == value2 and np.array_equal(seed, cotangent)
    assert "loss_seed" in cp.__all__ and "loss_cotangent" in cp.__all__
    with pytest.warns(DeprecationWarning, match="cotangent"):
        g = cp.backward(tape, seed=cotangent, method="sklansky")
    grads_close(g, cp.backward(tape, cotangent, method="sklansky"), 0.0)
    with pytest.raises(TypeError, match="cotangent"):
        cp.backward(tape, cotangent, seed=cotangent)
    with pytest.raises(TypeError, match="cotangent"):
        cp.backward(tape)


def test_return_trace_counts_the_schedule_ops():
    chain = cp.mlp([3] + [4] * 10 + [1], seed=6)
    x = inputs(chain, 2)
    g, trace = cp.grad(chain, x, method="sklansky", backend="threads", workers=2, return_trace=True)
    assert sum(e.ops for e in trace.events) == cp.schedule("sklansky", len(chain) - 1).num_ops
    grads_close(g, reference_grads(chain, x), 1e-10)


def test_inputs_not_modified_and_readonly_ok():
    chain = random_chain(9, 4, kind="mixed", seed=7)
    params_before = [tuple(p.copy() for p in ps) for ps in chain.params]
    x = inputs(chain, 3, seed=7)
    y = np.ones((3, 1))
    x.setflags(write=False)
    y.setflags(write=False)
    xb = x.copy()
    for method in ("backprop", "sklansky", "chunked", "independent"):
        for backend in ("serial", "vectorized", "threads"):
            cp.grad(chain, x, y, method=method, backend=backend, workers=2)
            cp.grad(chain, x, method=method, backend=backend, workers=2)
    assert np.array_equal(x, xb)
    for ps, pb in zip(chain.params, params_before):
        for p, q in zip(ps, pb):
            assert np.array_equal(p, q)


def test_gradients_do_not_alias_parameters():
    chain = cp.mlp([3, 4, 4, 1], seed=8)
    g = cp.grad(chain, inputs(chain, 2))
    for gl, ps in zip(g, chain.params):
        for a, p in zip(gl, ps):
            assert not np.shares_memory(a, p)


@pytest.mark.parametrize("method", ["backprop", "sklansky", "chunked", "auto"])
def test_sgd_training_decreases_mse(method):
    rng = np.random.default_rng(0)
    chain = cp.mlp([3, 16, 16, 1], seed=0)
    x = rng.standard_normal((32, 3))
    y = np.sin(x.sum(axis=1, keepdims=True))
    losses = []
    for _ in range(6):
        v, g = cp.value_and_grad(chain, x, y, loss="mse", method=method)
        losses.append(v)
        chain = chain.sgd_step(g, lr=0.1)
    final = float(np.mean((chain.forward(x) - y) ** 2))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert final < losses[0]


def test_sgd_step_is_theta_minus_lr_grad():
    chain = random_chain(4, 3, kind="mixed", seed=1)
    g = cp.grad(chain, inputs(chain, 2))
    new = chain.sgd_step(g, 0.25)
    assert isinstance(new, cp.Chain) and len(new) == len(chain)
    for ps, qs, gs in zip(chain.params, new.params, g):
        for p, q, gg in zip(ps, qs, gs):
            np.testing.assert_allclose(q, p - 0.25 * gg, rtol=0, atol=0)
    assert [ly.activation for ly in new] == [ly.activation for ly in chain]


def test_sgd_step_takes_any_real_lr_and_refuses_one_too_large_for_a_float():
    chain = random_chain(3, 3, kind="mixed", seed=2)
    g = cp.grad(chain, inputs(chain, 2))
    want = chain.sgd_step(g, 1)
    for lr in (np.int64(1), np.float32(1.0), 1.0, np.int8(1)):
        for a, b in zip(want.params, chain.sgd_step(g, lr).params):
            for p, q in zip(a, b):
                np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="too large for a float"):
        chain.sgd_step(g, 10**400)
    with pytest.raises(ValueError, match="finite"):
        chain.sgd_step(g, float("nan"))
    with pytest.raises(TypeError, match="lr must be a real number"):
        chain.sgd_step(g, "0.1")
    fresh = random_chain(3, 3, kind="mixed", seed=2)
    with pytest.raises(ValueError):
        fresh.sgd_step(g, 10**400)
    assert not fresh.superseded  # a refused step replaces nothing


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_an_overflowing_loss_raises_no_runtime_warning(kernels):
    """Outputs too large to square: numpy's overflow warning never leaks beside chainprod's own answer."""
    one = cp.Chain([cp.Dense(np.array([[1e200]]), np.zeros(1), "identity")])
    two = cp.Chain([one[0], cp.Dense(np.array([[1.0]]), np.zeros(1), "identity")])
    small = cp.Chain([cp.Dense(np.array([[1.0]]), np.zeros(1), "identity")])
    x, y = np.ones((2, 1)), np.zeros((2, 1))
    with warnings.catch_warnings():  # every warning an error here (conftest silences RuntimeWarnings elsewhere)
        warnings.simplefilter("error")
        value, g = cp.value_and_grad(one, x, y, kernels=kernels, method="backprop")  # the square overflows
        assert value == np.inf and g[0][0].tolist() == [[2e200]] and g[0][1].tolist() == [2e200]
        with pytest.raises(cp.NonFiniteError, match="layer 1"):  # then the gradient overflows: said with the layer
            cp.value_and_grad(two, x, y, kernels=kernels, method="backprop")
        # the cotangent is (out - y) * (2 / n): with one output, 2 (out - y) overflows though out - y does not
        with pytest.raises(cp.NonFiniteError, match="cotangent of the mse loss overflowed") as e:
            cp.value_and_grad(small, x[:1], np.full((1, 1), -1.7e308), kernels=kernels)
    assert e.value.layers == (0, 0)
    # with two outputs, (out - y) * (2 / 2) is finite: the gradient's sum over the batch is what overflows
    with pytest.raises(cp.NonFiniteError, match="parameter gradient of layer 0"):
        cp.value_and_grad(small, x, np.full((2, 1), -1.7e308), kernels=kernels)


def test_backprop_does_not_fail_on_unneeded_input_jacobian():
    # layer 0: x -> 1e300 x (x = 1e-300), layer 1: 1e10 h. v_0 = 1e10 is finite; v_0 A_0 = 1e310 is
    # never needed for a parameter gradient.
    chain = cp.Chain([cp.Dense(np.array([[1e300]]), np.zeros(1), "identity"),
                      cp.Dense(np.array([[1e10]]), np.zeros(1), "identity")])
    x = np.array([1e-300])
    want = cp.grad(chain, x, method="sklansky")
    assert np.isfinite(want[0][1]).all() and want[0][1][0] == pytest.approx(1e10)
    got = cp.grad(chain, x, method="backprop")
    grads_close(got, want, 1e-12)


def test_trace_records_the_schedule_auto_chose():
    # On the numpy reference, auto asks the cost model, which picks a scan here.
    chain = cp.mlp([4] * 40 + [1], seed=3)
    g, trace = cp.grad(chain, np.ones((2, 4)), return_trace=True, kernels="numpy")
    assert isinstance(trace.schedule, cp.Schedule) and trace.schedule.length == len(chain) - 1
    g2 = cp.grad(chain, np.ones((2, 4)), method=trace.schedule, kernels="numpy")
    assert all(np.array_equal(a, b) for ga, gb in zip(g, g2) for a, b in zip(ga, gb))
    out, tr = cp.suffix_products([np.eye(3)] * 5, method="sklansky", return_trace=True)
    assert tr.schedule.name == "sklansky"


def test_auto_runs_backprop_when_no_scan_pays():
    """Wide, short chain on one core: the model's best scan is sequential, so auto is backprop."""
    from chainprod.cost import CostModel

    chain = cp.mlp([64] * 12 + [1], seed=5)
    x = np.ones((1, 64))
    g, trace = cp.grad(chain, x, return_trace=True)
    ref = cp.grad(chain, x, method="backprop")
    assert all(np.allclose(a, b, rtol=1e-12, atol=1e-14) for ga, gb in zip(g, ref) for a, b in zip(ga, gb))
    planned = cp.schedule("auto", len(chain) - 1, blocks=64)
    assert (trace.schedule == "backprop") == (planned.name == "sequential")
    assert isinstance(CostModel(), CostModel)


def test_compiled_auto_records_what_it_measured_fastest(tmp_path, monkeypatch):
    """On the compiled kernels auto measures; the trace says what ran, and the choice is remembered."""
    from chainprod import autotune

    monkeypatch.setenv("CHAINPROD_AUTO_CACHE", str(tmp_path / "auto.json"))
    cp.clear_caches()
    chain = cp.diagonal_chain(300, 16, seed=2)
    x = np.ones((1, 16))
    g, trace = cp.grad(chain, x, backend="threads", workers=2, return_trace=True)
    assert trace.schedule == "backprop" or (isinstance(trace.schedule, cp.Schedule) and trace.schedule.is_scan)
    grads_close(g, reference_grads(chain, x), 1e-10)
    assert (tmp_path / "auto.json").exists()
    # a new process (here: emptied caches) reads the choice instead of measuring again
    cp.clear_caches()
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured twice"))
    g2, trace2 = cp.grad(chain, x, backend="threads", workers=2, return_trace=True)
    assert repr(trace2.schedule) == repr(trace.schedule)


@pytest.mark.parametrize("confirmed", [True, False])
def test_compiled_auto_keeps_a_scan_only_if_it_beats_backprop_twice(tmp_path, monkeypatch, confirmed):
    """One disturbed round of backprop's repeats must not keep a slower scan for the process and on disk."""
    from chainprod import autotune

    monkeypatch.setenv("CHAINPROD_AUTO_CACHE", str(tmp_path / "auto.json"))
    cp.clear_caches()
    chain = cp.diagonal_chain(300, 16, seed=4)
    x = np.ones((1, 16))
    rounds = []
    real = autotune._best_time

    def scripted(fn):
        real(fn)  # the real runs, so every candidate is exercised
        rounds.append(fn)
        if fn is not rounds[0]:  # a scan: 0.5 s, so the first one wins the first round
            return 0.5
        # backprop, timed first: disturbed (1 s) in the first round; in the confirmation slower or faster
        return 1.0 if len(rounds) == 1 else (2.0 if confirmed else 0.1)

    monkeypatch.setattr(autotune, "_best_time", scripted)
    g, trace = cp.grad(chain, x, backend="threads", workers=2, return_trace=True)
    if len(rounds) == 1:
        pytest.skip("no scan is a candidate for this chain here")
    assert rounds.count(rounds[0]) == 2  # backprop timed again against the winner
    assert (trace.schedule == "backprop") != confirmed
    grads_close(g, reference_grads(chain, x), 1e-10)


def test_compiled_auto_keeps_its_choice_on_the_chain_until_the_caches_are_cleared(tmp_path, monkeypatch):
    from chainprod import autotune

    monkeypatch.setenv("CHAINPROD_AUTO_CACHE", str(tmp_path / "auto.json"))
    cp.clear_caches()
    chain = cp.diagonal_chain(300, 16, seed=3)
    x = np.ones((1, 16))
    first = cp.grad(chain, x, backend="threads", workers=2)
    looked_up = []
    real = autotune._from_disk
    monkeypatch.setattr(autotune, "_from_disk", lambda *a: looked_up.append(a) or real(*a))
    monkeypatch.setattr(autotune, "_measure", lambda *a, **k: pytest.fail("measured twice"))
    again = cp.grad(chain, x, backend="threads", workers=2)
    assert looked_up == []  # answered from the chain's own record
    cp.clear_caches()
    cp.grad(chain, x, backend="threads", workers=2)
    assert len(looked_up) == 1  # a new generation: asked again (and found on disk)
    for a, b in zip(first, again):
        for ga, gb in zip(a, b):
            assert np.array_equal(ga, gb)


def test_compiled_auto_keeps_backprop_for_dense_chains_on_one_thread():
    # One thread: a scan does strictly more work than backprop in the same thread.
    chain = cp.mlp([8] * 30 + [1], seed=1)
    _, trace = cp.grad(chain, np.ones((1, 8)), return_trace=True)
    assert trace.schedule == "backprop"


@pytest.mark.parametrize("option", [{"h0": np.zeros(3)}, {"with_inputs": True}])
@pytest.mark.parametrize("fn", [cp.grad, cp.value_and_grad])
def test_a_chain_refuses_the_options_of_models_over_time(fn, option):
    chain = cp.mlp([3, 4, 1], seed=0)
    with pytest.raises(ValueError, match="only recurrent models") as info:
        fn(chain, np.ones((2, 3)), **option)
    assert "Chain" in str(info.value)
