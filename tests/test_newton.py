"""Newton forward passes (DEER, quasi-DEER, ELK, quasi-ELK) against the sequential pass.

References are the plain sequential passes (``cp.forward(chain, x)`` and the
recurrent models' ``forward``), which are tested elsewhere against torch.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ConvergenceError, NonFiniteError

METHODS = ("deer", "quasi_deer", "elk", "quasi_elk")
SCANS = [s for s in cp.valid_schedules() if s != "tree"]


def contractive_chain(L, w, *, scale=0.5, seed=0, dtype=np.float64, head=None, readout=None):
    """tanh layers ``w -> w`` whose weights have norm about ``scale`` < 1: a contractive chain."""
    rng = np.random.default_rng(seed)
    layers = []
    if head is not None:
        layers.append(cp.Dense(rng.standard_normal((w, head)).astype(dtype), np.zeros(w, dtype), "tanh"))
    layers += [cp.Dense((scale * rng.standard_normal((w, w)) / np.sqrt(w)).astype(dtype),
                        (0.1 * rng.standard_normal(w)).astype(dtype), "tanh") for _ in range(L)]
    if readout is not None:
        layers.append(cp.Dense(rng.standard_normal((readout, w)).astype(dtype), np.zeros(readout, dtype),
                               "identity"))
    return cp.Chain(layers)


def chaotic_rnn(T=1000, H=8, gain=3.0, seed=1):
    """A tanh RNN with large recurrent weights and small inputs: its state Jacobians expand."""
    rng = np.random.default_rng(seed)
    rnn = cp.RNN.from_params({"weight_ih_l0": rng.standard_normal((H, 2)),
                              "weight_hh_l0": gain * rng.standard_normal((H, H)) / np.sqrt(H)})
    return rnn, 0.1 * rng.standard_normal((T, 1, 2)), np.full((1, H), 0.5)


# -- chains ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_long_contractive_chain_reaches_the_sequential_outputs(method):
    chain = contractive_chain(4096, 4)
    x = np.random.default_rng(1).standard_normal((2, 4))
    ref = cp.forward(chain, x)
    tape, trace = cp.forward(chain, x, method=method, schedule="sklansky", return_trace=True)
    assert isinstance(tape, cp.Tape) and isinstance(trace, cp.NewtonTrace)
    np.testing.assert_allclose(tape.flat, ref.flat, rtol=0, atol=1e-8)
    assert trace.converged and trace.residuals[-1] <= trace.tol == 1e-10
    assert trace.iterations == len(trace.residuals) == len(trace.rounds)
    assert trace.schedule == "sklansky" and set(trace.rounds) == {cp.schedule("sklansky", 4097).rounds}
    if method in ("deer", "elk"):
        assert trace.iterations <= 10


@pytest.mark.parametrize("backend", ["serial", "vectorized", "threads"])
@pytest.mark.parametrize("schedule", SCANS)
def test_every_schedule_and_backend(schedule, backend):
    chain = contractive_chain(12, 3, seed=2)
    x = np.random.default_rng(2).standard_normal((2, 3))
    ref = cp.forward(chain, x)
    for method in ("deer", "quasi_elk"):
        tape, trace = cp.forward(chain, x, method=method, schedule=schedule, backend=backend, workers=2,
                                 return_trace=True)
        np.testing.assert_allclose(tape.flat, ref.flat, rtol=0, atol=1e-8)
        assert trace.backend == backend


def test_mlp_with_head_and_readout_and_the_tape_feeds_backward():
    chain = contractive_chain(30, 5, head=3, readout=2, seed=3)
    x = np.random.default_rng(3).standard_normal((4, 3))
    ref = cp.forward(chain, x)
    ct = np.random.default_rng(4).standard_normal((4, 2))
    g_ref = cp.backward(ref, ct, method="backprop")
    for kernels in ("numba", "numpy"):
        tape = cp.forward(chain, x, method="deer", kernels=kernels)
        assert tape.kernels == kernels
        np.testing.assert_allclose(tape.out, ref.out, rtol=0, atol=1e-8)
        for method in ("backprop", "sklansky"):
            for a, b in zip(cp.backward(tape, ct, method=method), g_ref):
                for p, q in zip(a, b):
                    np.testing.assert_allclose(p, q, rtol=1e-7, atol=1e-9)


def test_one_dimensional_input_and_float32():
    chain = contractive_chain(50, 4, seed=5, dtype=np.float32)
    x = np.random.default_rng(5).standard_normal(4).astype(np.float32)
    ref = cp.forward(chain, x)
    tape, trace = cp.forward(chain, x, method="deer", return_trace=True)
    assert tape.out.dtype == np.float32 and trace.tol == 1e-5
    np.testing.assert_allclose(tape.out, ref.out, rtol=0, atol=1e-4)


def test_linear_chains_converge_in_one_iteration():
    rng = np.random.default_rng(6)
    diag = cp.Chain([cp.Diagonal(rng.uniform(-1, 1, 3), rng.standard_normal(3)) for _ in range(40)])
    dense = cp.Chain([cp.Dense(0.5 * rng.standard_normal((3, 3)), rng.standard_normal(3), None) for _ in range(40)])
    x = rng.standard_normal((2, 3))
    for chain, methods in ((diag, METHODS), (dense, ("deer", "elk"))):
        ref = cp.forward(chain, x)
        for method in methods:
            tape, trace = cp.forward(chain, x, method=method, return_trace=True)
            assert trace.iterations == 1, (method, trace)
            np.testing.assert_allclose(tape.flat, ref.flat, rtol=1e-12, atol=1e-12)


def test_chain_whose_middle_width_changes_is_refused_naming_the_layer():
    chain = cp.mlp([3, 4, 4, 5, 5, 1])
    with pytest.raises(ValueError, match="layer 2 maps 4 -> 5"):
        cp.forward(chain, np.ones((1, 3)), method="deer")


# -- recurrent models -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [cp.RNN, cp.GRU])
@pytest.mark.parametrize("method", METHODS)
def test_long_rnn_and_gru(cls, method):
    model = cls(2, 3, seed=1)
    x = np.random.default_rng(7).standard_normal((10_000, 2, 2))
    out_ref, h_ref = model.forward(x)
    (out, h_n), trace = cp.forward(model, x, method=method, schedule="sklansky", return_trace=True)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(h_n, h_ref, rtol=0, atol=1e-8)
    if method in ("deer", "elk"):
        assert trace.iterations <= 10


@pytest.mark.parametrize("method", METHODS)
def test_stacked_lstm_batch_first_with_initial_state(method):
    model = cp.LSTM(2, 3, num_layers=2, batch_first=True, seed=2)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 300, 2))
    h0 = (0.5 * rng.standard_normal((2, 2, 3)), 0.5 * rng.standard_normal((2, 2, 3)))
    keep = (x.copy(), h0[0].copy(), h0[1].copy())
    out_ref, (h_ref, c_ref) = model.forward(x, h0)
    (out, (h_n, c_n)), trace = cp.forward(model, x, h0=h0, method=method, schedule="brent_kung",
                                          return_trace=True)
    for got, want in ((out, out_ref), (h_n, h_ref), (c_n, c_ref)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
    assert set(trace.solve) == {0, 1}  # one solve per layer
    for before, after in zip(keep, (x, *h0)):
        np.testing.assert_array_equal(before, after)


def test_gru_stacked_and_relu_rnn():
    rng = np.random.default_rng(9)
    for model in (cp.GRU(2, 4, num_layers=2, seed=3), cp.RNN(2, 4, nonlinearity="relu", seed=4)):
        x = rng.standard_normal((200, 3, 2))
        out_ref, _ = model.forward(x)
        out, _ = cp.forward(model, x, method="deer", schedule="chunked", backend="threads", workers=2)
        np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_diagonal_recurrence_converges_in_one_iteration(method):
    layer = cp.DiagonalRecurrence.random(3, 4, 2, seed=0)
    rng = np.random.default_rng(10)
    u, h0 = rng.standard_normal((500, 2, 3)), rng.standard_normal((2, 4))
    y, trace = cp.forward(layer, u, h0=h0, method=method, schedule="hillis_steele", return_trace=True)
    assert trace.iterations == 1
    np.testing.assert_allclose(y, layer.forward(u, h0), rtol=1e-12, atol=1e-12)


# -- divergence, convergence errors, fallback -----------------------------------------------------------
def test_deer_diverges_where_elk_converges():
    rnn, x, h0 = chaotic_rnn()
    out_ref, _ = rnn.forward(x, h0)
    with pytest.raises((NonFiniteError, ConvergenceError), match="elk") as info:
        cp.forward(rnn, x, h0=h0, method="deer", schedule="sklansky")
    assert "iteration 1" in str(info.value) and "step t=" in str(info.value)
    (out, _), trace = cp.forward(rnn, x, h0=h0, method="elk", schedule="sequential", max_iter=2000,
                                 return_trace=True)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-8)
    assert trace.converged and max(trace.damping) > 0


def test_not_converged_is_an_error_or_a_sequential_fallback():
    chain = contractive_chain(64, 4, scale=0.9, seed=11)
    x = np.random.default_rng(11).standard_normal((2, 4))
    with pytest.raises(ConvergenceError, match=r"residual .* > tol .*elk") as info:
        cp.forward(chain, x, method="deer", max_iter=1)
    err = info.value
    assert err.iterations == 1 and err.residual > err.tol and err.trace.iterations == 1
    tape, trace = cp.forward(chain, x, method="deer", max_iter=1, fallback="sequential", return_trace=True)
    np.testing.assert_array_equal(tape.flat, cp.forward(chain, x).flat)
    assert trace.fallback and not trace.converged and "sequential" in trace.note
    # an overflow is finished the same way
    rnn, xs, h0 = chaotic_rnn()
    (out, _), trace = cp.forward(rnn, xs, h0=h0, method="deer", fallback="sequential", return_trace=True)
    np.testing.assert_array_equal(out, rnn.forward(xs, h0)[0])
    assert trace.fallback


def test_init_at_the_answer_needs_no_iteration_and_is_not_modified():
    chain = contractive_chain(20, 3, seed=12)
    x = np.random.default_rng(12).standard_normal((2, 3))
    ref = cp.forward(chain, x)
    init = np.stack([y for o in ref.outputs for y in o])
    keep_x, keep_init = x.copy(), init.copy()
    tape, trace = cp.forward(chain, x, method="quasi_deer", init=init, return_trace=True)
    assert trace.iterations == 0 and trace.converged
    np.testing.assert_array_equal(x, keep_x)
    np.testing.assert_array_equal(init, keep_init)


def test_bad_arguments_say_what_is_wrong():
    chain = contractive_chain(5, 3)
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="valid methods: sequential, deer, quasi_deer, elk, quasi_elk"):
        cp.forward(chain, x, method="newton")
    with pytest.raises(ValueError, match="tol must be"):
        cp.forward(chain, x, method="deer", tol=0)
    with pytest.raises(ValueError, match="tol must be"):
        cp.forward(chain, x, method="deer", tol=-1e-3)
    with pytest.raises(ValueError, match="max_iter must be"):
        cp.forward(chain, x, method="deer", max_iter=0)
    with pytest.raises(ValueError, match=r"init: expected shape \(5, 2, 3\)"):
        cp.forward(chain, x, method="deer", init=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="damping is for method 'elk'"):
        cp.forward(chain, x, method="deer", damping=1.0)
    with pytest.raises(ValueError, match="damping must be"):
        cp.forward(chain, x, method="elk", damping=-1.0)
    with pytest.raises(ValueError, match="'tree' is not one"):
        cp.forward(chain, x, method="deer", schedule="tree")
    with pytest.raises(ValueError, match="fallback must be"):
        cp.forward(chain, x, method="deer", fallback="loop")
    with pytest.raises(ValueError, match="tol: for the Newton methods"):
        cp.forward(chain, x, tol=1e-6)
    with pytest.raises(ValueError, match="packed is for method='sequential'"):
        cp.forward(chain, x, method="deer", packed=object())
    with pytest.raises(TypeError, match="takes a Chain, RNN, GRU, LSTM or DiagonalRecurrence"):
        cp.forward(object(), x, method="deer")
    with pytest.raises(ValueError, match="unknown backend"):
        cp.forward(chain, x, method="deer", backend="nowhere")
    rnn = cp.RNN(2, 3, seed=0)
    with pytest.raises(ValueError, match=r"init: expected shape \(4, 1, 3\)"):
        cp.forward(rnn, np.ones((4, 1, 2)), method="deer", init=np.zeros((4, 3)))


def test_sequential_method_is_the_plain_pass():
    chain = contractive_chain(5, 3)
    x = np.ones((2, 3))
    tape, trace = cp.forward(chain, x, method="sequential", return_trace=True)
    np.testing.assert_array_equal(tape.out, cp.forward(chain, x).out)
    assert trace.iterations == 0 and trace.method == "sequential"
    rnn = cp.GRU(2, 3, seed=0)
    out, h_n = cp.forward(rnn, np.ones((4, 1, 2)))
    np.testing.assert_array_equal(out, rnn.forward(np.ones((4, 1, 2)))[0])


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
def test_cell_jacobians_at_a_guess_match_central_differences(cell):
    from chainprod.newton_models import CellLayer

    rng = np.random.default_rng(13)
    H, G = 3, {"gru": 3, "lstm": 4}.get(cell, 1)
    S = 2 * H if cell == "lstm" else H
    prob = CellLayer(cell, rng.standard_normal((4, 2, G * H)), rng.standard_normal((G * H, H)),
                     rng.standard_normal(G * H), np.zeros((2, H)), np.zeros((2, H)) if cell == "lstm" else None, 0)
    prev = rng.standard_normal((4, 2, S))  # a guess, not a trajectory: s_{t-1} and c_{t-1} are free
    _, point = prob.evaluate(prev)
    J, J_diag = prob.jacobian(point, False), prob.jacobian(point, True)
    num = np.empty_like(J)
    for j in range(S):
        d = np.zeros(S)
        d[j] = 1e-6
        num[..., j] = (prob.evaluate(prev + d)[0] - prob.evaluate(prev - d)[0]) / 2e-6
    np.testing.assert_allclose(J, num, atol=1e-8)
    np.testing.assert_allclose(J_diag, np.diagonal(num, axis1=-2, axis2=-1), atol=1e-8)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
def test_solved_states_give_the_kernel_sets_tape(cell):
    # what a backward pass after a Newton forward needs: the kernel set's (Hs, Z) from the solved states
    from chainprod.kernels.recurrent import get_recurrent_kernels
    from chainprod.newton_models import CellLayer
    from chainprod.newton_solve import SolveOptions, solve

    rng = np.random.default_rng(14)
    H, G = 3, {"gru": 3, "lstm": 4}.get(cell, 1)
    X, W, b = rng.standard_normal((50, 2, G * H)), 0.5 * rng.standard_normal((G * H, H)), rng.standard_normal(G * H)
    h0, c0 = rng.standard_normal((2, H)), (rng.standard_normal((2, H)) if cell == "lstm" else None)
    prob = CellLayer(cell, X, W, b, h0, c0, 0)
    states = solve(prob, SolveOptions("deer", "sklansky", "vectorized", None, None, None, None, None),
                   cp.NewtonTrace("deer"))
    Hs, Z = prob.kernel_tape(states)
    Hs_ref, Z_ref = get_recurrent_kernels("numpy").forward(cell, X, W, b, h0, c0)
    np.testing.assert_allclose(Hs, Hs_ref, atol=1e-10)
    np.testing.assert_allclose(Z, Z_ref, atol=1e-10)
