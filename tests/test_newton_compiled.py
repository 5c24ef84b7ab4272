"""Newton forward passes on the compiled kernels against the numpy path, and the kernels against references.

* The affine scan (:mod:`chainprod.kernels.affine_scan`): the numba kernel
  and its numpy twin against a plain loop over the steps written here,
  every scan schedule, dense and diagonal maps, forced parallel stages,
  loops and BLAS.
* The chain linearisation (:mod:`chainprod.kernels.newton_numba`) against
  the numpy rules of :class:`chainprod.newton_models.ChainBody`.
* Whole solves: ``kernels="numba"`` (the compiled steps) against
  ``kernels="numpy"`` (``linear_recurrence`` on the executors): the same
  trajectory to rounding, the same iterations, trace and errors; and both
  against the sequential pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ConvergenceError, NonFiniteError
from chainprod.kernels import pack
from chainprod.kernels.affine_scan import affine_layout, affine_scan, form_blocks, run_affine
from chainprod.kernels.crossover import force_path
from chainprod.newton_models import ChainBody, previous

pytest.importorskip("numba")

METHODS = ("deer", "quasi_deer", "elk", "quasi_elk")
SCANS = sorted(set(cp.valid_schedules()) - {"auto", "tree"})
ACTS = ["tanh", "relu", "sigmoid", "softplus", "identity"]


def plain_loop(A, c, h0):
    """``h_t = A_t h_{t-1} + c_t`` one step after another, in float64."""
    out, h = [], h0.astype(np.float64)
    for t in range(c.shape[0]):
        a = A[t].astype(np.float64)
        h = (a * h if A.ndim == 3 else np.einsum("nij,nj->ni", a, h)) + c[t]
        out.append(h)
    return np.stack(out)


def _recurrence(n, N, d, diag, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.uniform(-0.95, 0.95, (n, N, d)) if diag else 0.9 * rng.standard_normal((n, N, d, d)) / np.sqrt(d)
    return (A.astype(dtype), rng.standard_normal((n, N, d)).astype(dtype),
            rng.standard_normal((N, d)).astype(dtype))


def _rel(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-300)


# -- the affine scan kernel -----------------------------------------------------------------------------
@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64])
def test_affine_scan_matches_a_plain_loop_on_every_schedule(n, diag):
    for N, d in ((1, 1), (3, 4)):
        A, c, h0 = _recurrence(n, N, d, diag, seed=n)
        ref = plain_loop(A, c, h0)
        for schedule in SCANS + [None]:
            if schedule == "independent" and n > 17:
                continue
            got = {k: affine_scan(A, c, h0, schedule, kernels=k, workers=2) for k in ("numba", "numpy")}
            for k, (states, bad) in got.items():
                assert states.shape == (n, N, d) and bad == -1, (schedule, k)
                assert _rel(states, ref) < 1e-12, (schedule, k, n, N, d)
            assert _rel(got["numba"][0], got["numpy"][0]) < 1e-13


@pytest.mark.parametrize("diag", [False, True])
@pytest.mark.parametrize("path", ["loop", "blas"])
@pytest.mark.parametrize("schedule", ["sklansky", "brent_kung", "chunked", "hillis_steele", "sequential"])
def test_affine_scan_parallel_stages_and_both_product_paths(schedule, path, diag):
    n, N, d = 200, 3, 6
    A, c, h0 = _recurrence(n, N, d, diag, seed=7)
    ref = plain_loop(A, c, h0)
    layout = affine_layout(schedule, n, N, d, diag=diag, workers=2, parallel_min_flops=0.0)
    if schedule != "sequential":
        assert layout.plan.stage_parallel.any()  # the prange branch runs
    for workers in (1, 2):
        buf = np.empty(layout.buf_size)
        form_blocks(layout, buf, A, c, np.zeros_like(c))
        with force_path(path):
            states, bad = run_affine(layout, buf, h0, workers=workers)
        assert bad == -1 and _rel(states, ref) < 1e-12, (workers, path)


@pytest.mark.parametrize("diag", [False, True])
def test_affine_scan_float32_and_damped_blocks(diag):
    n, N, d = 300, 2, 5
    A, c, h0 = _recurrence(n, N, d, diag, seed=3, dtype=np.float32)
    ref = plain_loop(A, c, h0)
    for schedule in ("sklansky", "brent_kung", None):
        states, bad = affine_scan(A, c, h0, schedule)
        assert states.dtype == np.float32 and bad == -1
        assert _rel(states, ref) < 1e-4
    # damped blocks (ELK): (J, F - J prev + lam x) / (1 + lam), against the same arithmetic in numpy
    A, F, h0 = _recurrence(n, N, d, diag, seed=4)
    prev, x = np.random.default_rng(5).standard_normal((2, n, N, d))
    lam = 0.75
    J = A / (1 + lam)
    Jp = A * prev if diag else np.einsum("tnij,tnj->tni", A, prev)
    ref = plain_loop(J, (F - Jp + lam * x) / (1 + lam), h0)
    layout = affine_layout("sklansky", n, N, d, diag=diag)
    for k in ("numba", "numpy"):
        buf = np.empty(layout.buf_size)
        form_blocks(layout, buf, A, F, prev, x, lam, kernels=k)
        states, bad = run_affine(layout, buf, h0, kernels=k)
        assert bad == -1 and _rel(states, ref) < 1e-12, k


def test_affine_scan_reports_the_first_state_that_overflows():
    n, N, d = 40, 2, 3
    A = np.full((n, N, d), 1e30)
    c, h0 = np.ones((n, N, d)), np.ones((N, d))
    # h_t grows as 1e30^(t+1): the first infinite state is h_10 (1e330 > the float64 range)
    for schedule in ("sklansky", "brent_kung", None):
        for k in ("numba", "numpy"):
            _, bad = affine_scan(A, c, h0, schedule, kernels=k)
            assert bad == 10, (schedule, k)


def test_affine_scan_arguments_are_checked():
    A, c, h0 = _recurrence(4, 1, 2, False)
    with pytest.raises(ValueError, match="not 'auto'"):
        affine_scan(A, c, h0, "auto")
    with pytest.raises(ValueError, match="does not produce every prefix"):
        affine_scan(A, c, h0, "tree")
    with pytest.raises(ValueError, match=r"is for 3 positions; an affine scan of 4 steps has n \+ 1 = 5"):
        affine_scan(A, c, h0, cp.schedule("sklansky", 3))
    with pytest.raises(ValueError, match=r"A: expected shape \(4, 1, 2, 2\)"):
        affine_scan(A[:, :, :1], c, h0, "sklansky")
    with pytest.raises(ValueError, match="unknown kernels 'fortran'; valid kernels: numba, numpy"):
        affine_scan(A, c, h0, "sklansky", kernels="fortran")
    with pytest.raises(TypeError, match="one dtype"):
        affine_scan(A.astype(np.float32), c, h0, "sklansky")


# -- the chain linearisation ----------------------------------------------------------------------------
def _chain(kind, L, w, seed=0, dtype=np.float64, scale=0.5):
    rng = np.random.default_rng(seed)

    def dense(act):
        return cp.Dense((scale * rng.standard_normal((w, w)) / np.sqrt(w)).astype(dtype),
                        (0.1 * rng.standard_normal(w)).astype(dtype), act)

    def diagonal(act):
        return cp.Diagonal(rng.uniform(-0.9, 0.9, w).astype(dtype), (0.1 * rng.standard_normal(w)).astype(dtype),
                           act)

    if kind == "tanh":
        return cp.Chain([dense("tanh") for _ in range(L)])
    if kind == "diagonal":
        return cp.Chain([diagonal(ACTS[l % 5]) for l in range(L)])
    if kind == "mixed":  # every activation, dense and diagonal layers in runs of several lengths
        return cp.Chain([(diagonal if (l // 3) % 2 else dense)(ACTS[(l // 2) % 5]) for l in range(L)])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["tanh", "diagonal", "mixed"])
def test_chain_linearisation_matches_the_numpy_rules(kind):
    from chainprod.kernels.newton_numba import chain_evaluate, chain_linearise

    n, N, w = 37, 3, 5
    chain = _chain(kind, n, w, seed=1)
    pc = pack(chain)
    rng = np.random.default_rng(2)
    h0, x = rng.standard_normal((N, w)), rng.standard_normal((n, N, w))
    body = ChainBody(chain, 0, n, h0)
    F_ref, point = body.evaluate(previous(h0, x))
    F = np.empty_like(x)
    diff, big, bad = chain_evaluate(pc.theta, pc.p_off, pc.kind, pc.act, 0, h0.reshape(-1), x.reshape(-1),
                                    F.reshape(-1), n, N, w, 1 << 62, False)
    assert bad == -1 and _rel(F, F_ref) < 1e-14
    assert diff == pytest.approx(np.abs(x - F_ref).max(), rel=1e-13) and big == np.abs(x).max()
    for quasi in (False, True):
        diag = quasi or body.diagonal
        J = body.jacobian(point, diag)
        for lam in (0.0, 0.3):
            layout = affine_layout("brent_kung", n, N, w, diag=diag)
            want, got = np.zeros(layout.buf_size), np.zeros(layout.buf_size)
            form_blocks(layout, want, J, F_ref, previous(h0, x), x, lam, kernels="numpy")
            for parallel in (False, True):
                chain_linearise(pc.theta, pc.p_off, pc.kind, pc.act, 0, h0.reshape(-1), x.reshape(-1),
                                F.reshape(-1), lam, diag, got, layout.pos_off, n, N, w, parallel)
                assert np.abs(got - want).max() <= 1e-14 * max(1.0, np.abs(want).max()), (quasi, lam, parallel)


def test_chain_evaluation_names_the_first_layer_that_is_not_finite():
    from chainprod.kernels.newton_numba import chain_evaluate

    n, N, w = 12, 2, 3
    pc = pack(_chain("mixed", n, w))
    x = np.zeros((n, N, w))
    x[6, 1, 2] = np.inf  # layer 7 reads it (relu and identity layers pass infinity on)
    F = np.empty_like(x)
    _, _, bad = chain_evaluate(pc.theta, pc.p_off, pc.kind, pc.act, 0, np.zeros(N * w), x.reshape(-1),
                               F.reshape(-1), n, N, w, 1 << 62, True)
    assert bad == 7


# -- whole solves: compiled against numpy -----------------------------------------------------------------
def _solve_both(chain, x, backend="vectorized", reference_backend=None, **kw):
    """``{kernels: (tape, trace)}``; the numpy reference on ``reference_backend`` (default: ``backend``)."""
    return {k: cp.forward(chain, x, kernels=k, return_trace=True, **kw,
                          backend=backend if k == "numba" else reference_backend or backend)
            for k in ("numpy", "numba")}


def _same_runs(out, what):
    (a, ta), (b, tb) = out["numpy"], out["numba"]
    assert _rel(b.flat, a.flat) < 1e-12, what
    assert (ta.iterations, ta.schedule, ta.rounds, ta.damping, ta.accepted, ta.solve) == \
        (tb.iterations, tb.schedule, tb.rounds, tb.damping, tb.accepted, tb.solve), what
    np.testing.assert_allclose(tb.residuals, ta.residuals, rtol=1e-3, atol=1e-14, err_msg=str(what))
    assert ta.converged and tb.converged and tb.tol == ta.tol and tb.max_iter == ta.max_iter


@pytest.mark.parametrize("method", METHODS)
def test_every_schedule_compiled_as_numpy(method):
    chain = _chain("tanh", 40, 4, seed=3)
    x = np.random.default_rng(3).standard_normal((3, 4))
    ref = cp.forward(chain, x)
    for schedule in SCANS + ["auto"]:
        out = _solve_both(chain, x, method=method, schedule=schedule)
        _same_runs(out, (method, schedule))
        np.testing.assert_allclose(out["numba"][0].flat, ref.flat, rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind", ["diagonal", "mixed"])
@pytest.mark.parametrize("method", METHODS)
def test_diagonal_and_mixed_chains(kind, method):
    chain = _chain(kind, 60, 6, seed=4)
    x = np.random.default_rng(4).standard_normal((3, 6))
    ref = cp.forward(chain, x)
    for schedule in ("sklansky", "sequential", "chunked"):
        out = _solve_both(chain, x, method=method, schedule=schedule)
        _same_runs(out, (kind, method, schedule))
        np.testing.assert_allclose(out["numba"][0].flat, ref.flat, rtol=0, atol=1e-8)


@pytest.mark.parametrize("L, w, N", [(1024, 4, 1), (1024, 8, 3), (256, 16, 3)])
def test_long_chains(L, w, N):
    chain = _chain("tanh", L, w, seed=5)
    x = np.random.default_rng(5).standard_normal((N, w))
    ref = cp.forward(chain, x)
    for method in METHODS:
        for schedule in ("sklansky", "brent_kung"):
            out = _solve_both(chain, x, method=method, schedule=schedule)
            _same_runs(out, (L, w, N, method, schedule))
            np.testing.assert_allclose(out["numba"][0].flat, ref.flat, rtol=0, atol=1e-8)


@pytest.mark.parametrize("L, w, N, methods", [(1024, 8, 3, ("deer", "quasi_elk")), (256, 16, 1, ("elk",))])
def test_threads_backend_with_two_workers(L, w, N, methods):
    """Large enough that the layers, the stages and the copies run in parallel regions."""
    chain = _chain("tanh", L, w, seed=6)
    x = np.random.default_rng(6).standard_normal((N, w))
    ref = cp.forward(chain, x)
    for method in methods:
        for schedule in ("sklansky", "chunked"):
            # the numpy reference on the vectorized executor: the same schedule (for 2 workers), fewer seconds
            out = _solve_both(chain, x, method=method, schedule=schedule, backend="threads", workers=2,
                              reference_backend="vectorized")
            _same_runs(out, (L, w, N, method, schedule))
            assert out["numba"][1].backend == "threads" and out["numba"][1].workers == 2
            np.testing.assert_allclose(out["numba"][0].flat, ref.flat, rtol=0, atol=1e-8)


def test_head_readout_float32_and_the_tape_feeds_backward():
    rng = np.random.default_rng(6)
    body = _chain("mixed", 30, 5, seed=6, dtype=np.float32).layers
    chain = cp.Chain([cp.Dense(rng.standard_normal((5, 3)).astype(np.float32), np.zeros(5, np.float32), "tanh"),
                      *body, cp.Dense(rng.standard_normal((2, 5)).astype(np.float32), np.zeros(2, np.float32))])
    x = rng.standard_normal((4, 3)).astype(np.float32)
    ref = cp.forward(chain, x)
    tape, trace = cp.forward(chain, x, method="deer", schedule="sklansky", return_trace=True)
    assert tape.kernels == "numba" and tape.out.dtype == np.float32 and trace.tol == 1e-5
    np.testing.assert_allclose(tape.out, ref.out, rtol=0, atol=1e-4)
    ct = rng.standard_normal((4, 2)).astype(np.float32)
    for a, b in zip(cp.backward(tape, ct, method="sklansky"), cp.backward(ref, ct, method="backprop")):
        for p, q in zip(a, b):
            np.testing.assert_allclose(p, q, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("cls", [cp.RNN, cp.GRU, cp.LSTM])
def test_recurrent_models_scan_on_the_compiled_kernels(cls):
    model = cls(2, 4, num_layers=2, seed=0)
    u = np.random.default_rng(7).standard_normal((150, 2, 2))
    ref = model.forward(u)[0]
    for method in ("deer", "quasi_elk"):
        (a, _), ta = cp.forward(model, u, method=method, schedule="sklansky", kernels="numpy", return_trace=True)
        (b, _), tb = cp.forward(model, u, method=method, schedule="sklansky", return_trace=True)
        assert _rel(b, a) < 1e-12 and (ta.iterations, ta.rounds, ta.solve) == (tb.iterations, tb.rounds, tb.solve)
        np.testing.assert_allclose(b, ref, rtol=0, atol=1e-8)


# -- the same errors ----------------------------------------------------------------------------------------
def test_the_same_errors_and_fallback():
    rng = np.random.default_rng(8)
    # an expansive chain: DEER's first scan overflows at one layer, named by both paths
    chain = cp.Chain([cp.Dense(3.0 * rng.standard_normal((6, 6)), rng.standard_normal(6), "tanh")
                      for _ in range(600)])
    x = rng.standard_normal((1, 6))
    msgs = {}
    for k in ("numpy", "numba"):
        with pytest.raises(NonFiniteError, match=r"deer iteration 1: the linearised recurrence overflowed at "
                                                 r"layer \d+") as info:
            cp.forward(chain, x, method="deer", schedule="sklansky", kernels=k)
        msgs[k] = (str(info.value).split(" (")[0], info.value.layers)
    assert msgs["numpy"] == msgs["numba"]
    # not converged: the same ConvergenceError; with the fallback, the sequential pass and the same note
    chain = _chain("tanh", 64, 4, seed=11, scale=0.9)
    x = rng.standard_normal((2, 4))
    errs = {}
    for k in ("numpy", "numba"):
        with pytest.raises(ConvergenceError) as info:
            cp.forward(chain, x, method="deer", max_iter=2, kernels=k)
        errs[k] = (info.value.iterations, info.value.tol, round(np.log10(info.value.residual), 6))
        tape, trace = cp.forward(chain, x, method="quasi_deer", max_iter=2, fallback="sequential",
                                 return_trace=True, kernels=k)
        np.testing.assert_array_equal(tape.flat, cp.forward(chain, x, kernels=k).flat)
        assert trace.fallback and "quasi_deer stopped after 2 iteration(s)" in trace.note
    assert errs["numpy"] == errs["numba"]
    # adaptive ELK rejects the steps that overflow (large weights: the Jacobians at the guess expand) and
    # raises its damping, on both paths alike
    chain = cp.Chain([cp.Dense(10.0 * rng.standard_normal((6, 6)), 0.01 * rng.standard_normal(6), "tanh")
                      for _ in range(600)])
    x = 0.01 * rng.standard_normal((1, 6))
    traces = {}
    for k in ("numpy", "numba"):
        with pytest.raises(ConvergenceError) as info:
            cp.forward(chain, x, method="elk", schedule="sklansky", max_iter=4, kernels=k)
        tr = info.value.trace
        traces[k] = (tr.accepted, tr.damping, tr.rounds, tr.residuals)
    assert traces["numpy"][:3] == traces["numba"][:3] and traces["numba"][0][:2] == [False, False]
    np.testing.assert_allclose(traces["numba"][3], traces["numpy"][3], rtol=1e-12)
