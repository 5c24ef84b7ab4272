"""Newton forward passes and input gradients of sequences sharded over time, on real embedded Ray and Dask clusters.

``seq.value_and_grad(forward="deer" | "quasi_deer" | "elk")`` must give the
gradients of the sequential sharded step (itself checked against the local
model in ``test_shard_time.py``); DEER's iterations must match the local
``cp.forward(model, x, method="deer")``'s; a diagonal recurrence, linear in
its state, must converge in one iteration; every iteration must move the
bytes of ``docs/distributed.md``'s formula at two sequence lengths 4x apart.
``with_inputs=True`` must give the local ``cp.value_and_grad(...,
with_inputs=True)``'s gradients of ``x``, ``h0`` and ``c0``.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ConvergenceError, NonFiniteError
from chainprod.shard_time import shard_sequence
from chainprod.shard_time_newton import bytes_per_iteration
from chainprod.testing import started_engine

pytest.importorskip("ray")
pytest.importorskip("distributed")


@pytest.fixture(scope="module", params=["ray", "dask"])
def engine(request):
    """An executor on each engine's embedded cluster (started once per process, shared with the other test files)."""
    return started_engine(request.param, timeout=300)


D, H, N = 3, 4, 2


def data(T, out, *, seed=1, batch_first=False):
    rng = np.random.default_rng(seed)
    shape = (N, T, D) if batch_first else (T, N, D)
    return rng.standard_normal(shape), rng.standard_normal(shape[:2] + (out,))


def initial(cls, layers, *, seed=7, one_layer_shape=False):
    h0 = 0.5 * np.random.default_rng(seed).standard_normal((layers, N, H))
    h0 = h0[0] if one_layer_shape else h0
    return (h0, -h0) if cls is cp.LSTM else h0


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def newton_matches_sequential(seq, model, x, layers, h0, forwards=("deer", "quasi_deer", "elk")):
    """Gradients after each Newton forward equal the sequential step's (1e-8); the traces, by forward."""
    ref_value, ref, plain = seq.value_and_grad(return_trace=True)
    traces = {"sequential": plain}
    for forward in forwards:
        value, grads, tr = seq.value_and_grad(return_trace=True, forward=forward)
        assert tr.forward == forward and tr.newton.converged and not tr.newton.fallback
        assert set(tr.newton.solve) == set(range(layers)) and f"forward {forward!r}" in tr.note
        assert value == pytest.approx(ref_value, rel=1e-10)
        assert list(grads) == list(ref)
        for k in ref:
            assert rel(grads[k], ref[k]) < 1e-8, (forward, k, rel(grads[k], ref[k]))
        if forward == "deer" and layers == 1:  # the same iterations as the local pass
            _, local = cp.forward(model, x, method="deer", h0=h0, return_trace=True)
            assert tr.newton.iterations == local.iterations, (tr.newton.residuals, local.residuals)
        traces[forward] = tr
    return traces


def inputs_match_local(seq, model, x, y, h0, layers, plain, forward):
    """with_inputs=True's gradients equal the local model's (1e-10), counted apart in bytes_inputs."""
    local_value, local = cp.value_and_grad(model, x, y, h0=h0, with_inputs=True, kernels="numpy")
    value, grads, tr = seq.value_and_grad(return_trace=True, forward=forward, with_inputs=True)
    assert value == pytest.approx(local_value, rel=1e-10)
    assert list(grads) == list(local)  # "input", "h0" (and "c0") after the parameters, as locally
    for k in local:
        assert grads[k].shape == local[k].shape and rel(grads[k], local[k]) < 1e-10, (forward, k)
    # x's gradient (T-sized) and h0's (c0's), counted apart: the rest is the plain step's
    assert tr.bytes_inputs == x.nbytes + (2 if isinstance(model, cp.LSTM) else 1) * layers * N * H * 8
    assert plain.bytes_inputs == 0 and tr.bytes_reports == plain.bytes_reports


#: (id, model class, layers, model options, chunks, h0: None, "full" or "one-layer" (N, H));
#: an LSTM runs in test_bytes_per_iteration_do_not_grow_with_T
CASES = [
    ("rnn-tanh-1-P2-h0NH", cp.RNN, 1, {}, 2, "one-layer"),
    ("gru-1-P3-nobias", cp.GRU, 1, {"bias": False}, 3, None),
    ("gru-2-uneven-batchfirst-h0", cp.GRU, 2, {"batch_first": True}, [4, 5], "full"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_newton_gradients_equal_the_sequential_ones(engine, case):
    """And with_inputs=True's gradients equal the local model's, after either forward pass."""
    _, cls, layers, opts, chunks, h0_kind = case
    model = cls(D, H, layers, seed=0, **opts)
    x, y = data(9, H, batch_first=model.batch_first)
    h0 = None if h0_kind is None else initial(cls, layers, one_layer_shape=h0_kind == "one-layer")
    with shard_sequence(model, engine, x, y, chunks=chunks, h0=h0, kernels="numpy") as seq:
        plain = newton_matches_sequential(seq, model, x, layers, h0)["sequential"]
        for forward in ("sequential", "elk"):
            inputs_match_local(seq, model, x, y, h0, layers, plain, forward)


def test_diagonal_recurrence_converges_in_one_iteration(engine):
    """Linear in its state: one Newton step is exact, for every method, adaptive ELK included."""
    T, d, d_out = 11, 5, 2
    layer = cp.DiagonalRecurrence.random(D, d, d_out, seed=4, feedthrough=True, batch_first=True)
    x, y = data(T, d_out, seed=5, batch_first=True)
    h0 = np.random.default_rng(6).standard_normal(d)  # one state for every sample: its gradient sums the batch
    local_value, local = cp.value_and_grad(layer, x, y, h0=h0, with_inputs=True, kernels="numpy")
    with shard_sequence(layer, engine, x, y, chunks=[3, 1, 7], h0=h0, kernels="numpy") as seq:
        ref_value, ref = seq.value_and_grad()
        for forward in ("deer", "quasi_deer", "elk"):
            value, grads, tr = seq.value_and_grad(return_trace=True, forward=forward, with_inputs=True)
            assert tr.newton.iterations == 1 and tr.newton.converged, tr.newton
            assert tr.newton_bytes == [bytes_per_iteration(3, N, d, 8, diagonal=True)]
            assert value == pytest.approx(ref_value, rel=1e-12)
            for k in ref:
                assert rel(grads[k], ref[k]) < 1e-10, (forward, k)
            assert sorted(grads) == sorted(local)
            for k in local:
                assert grads[k].shape == local[k].shape and rel(grads[k], local[k]) < 1e-10, (forward, k)


def test_bytes_per_iteration_do_not_grow_with_T(engine):
    """An LSTM at T and 4T: every iteration moves e N (2 (P-1) S + (P-2) m) bytes; the gradients are right."""
    P, L, S = 3, 1, 2 * H  # an LSTM's state is (h, c)
    model = cp.LSTM(D, H, L, seed=3)
    theta = sum(v.nbytes for v in model.params.values())
    per = {}
    for T, h0 in ((6, None), (24, initial(cp.LSTM, L))):
        x, y = data(T, H, seed=T)
        with shard_sequence(model, engine, x, y, chunks=P, h0=h0, kernels="numpy") as seq:
            traces = newton_matches_sequential(seq, model, x, L, h0)
            for forward, diagonal in (("deer", False), ("quasi_deer", True), ("elk", False)):
                tr = traces[forward]
                per[T, forward] = set(tr.newton_bytes)
                assert per[T, forward] == {bytes_per_iteration(P, N, S, 8, diagonal)}
                assert tr.bytes_params == P * theta + (0 if h0 is None else 2 * N * H * 8)
                assert tr.bytes_reports == P * theta and tr.bytes_inputs == 0
                # the adjoints handed back, (P-1) L of (dh, dc), and the Newton iterations; no state handed forward
                assert tr.bytes_boundary == (P - 1) * L * 2 * N * H * 8 + sum(tr.newton_bytes)
            if h0 is not None:
                inputs_match_local(seq, model, x, y, h0, L, traces["sequential"], "deer")
    assert per[6, "deer"] == per[24, "deer"] == {N * 8 * (2 * (P - 1) * S + (P - 2) * S * S)}
    assert per[6, "quasi_deer"] == per[24, "quasi_deer"] == {N * 8 * (2 * (P - 1) * S + (P - 2) * S)}


def test_convergence_errors_fallback_and_bad_options(engine):
    model = cp.RNN(D, H, 1, nonlinearity="relu", seed=0)
    x, y = data(9, H)
    with shard_sequence(model, engine, x, y, chunks=2, kernels="numpy") as seq:
        ref_value, ref = seq.value_and_grad()
        with pytest.raises(ConvergenceError, match="deer did not converge in 1 iteration") as err:
            seq.value_and_grad(forward="deer", forward_options={"max_iter": 1})
        assert err.value.iterations == 1 and err.value.residual > err.value.tol
        value, grads, tr = seq.value_and_grad(return_trace=True, forward="deer",
                                              forward_options={"max_iter": 1, "fallback": "sequential"})
        assert tr.newton.fallback and "fallback='sequential'" in tr.note
        assert value == ref_value and all(np.array_equal(grads[k], ref[k]) for k in ref)
        with pytest.raises(ValueError, match="valid keys: tol, max_iter, damping, fallback"):
            seq.value_and_grad(forward="deer", forward_options={"init": np.zeros((9, N, H))})
        with pytest.raises(ValueError, match="valid forward methods: sequential, deer"):
            seq.value_and_grad(forward="newton")
        with pytest.raises(ValueError, match="tol must be"):
            seq.value_and_grad(forward="elk", forward_options={"tol": -1.0})
        # weights so large that the products of Jacobians overflow: named by step and layer
        seq.set_params({k: np.full_like(v, 1e200 if k.startswith("weight") else 0.0) for k, v in seq.params.items()})
        with pytest.raises(NonFiniteError, match=r"deer iteration 1: .* at step t=[0-8] of layer 0") as err:
            seq.value_and_grad(forward="deer")
        assert err.value.layers == (0, 0)
