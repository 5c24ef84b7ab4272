"""Newton forward passes on sharded models (``chainprod.shard_newton``) on real embedded Ray and Dask clusters.

Every gradient is checked against ``cp.value_and_grad(..., method="backprop",
kernels="numpy")`` run locally on the sequential forward pass; iteration
counts against the local Newton pass (``cp.forward(..., method=...)``);
bytes against the formula of ``docs/distributed.md``. No timing.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ConvergenceError, NonFiniteError
from chainprod.shard import shard
from chainprod.shard_newton import bytes_per_iteration
from chainprod.testing import kill_and_wait, started_engine

pytest.importorskip("ray")
pytest.importorskip("distributed")

W, N = 8, 3


def contractive_chain(L, seed=0):
    """``3 -> w`` tanh, ``L`` contractive ``w -> w`` tanh layers (``|W|`` about 0.5), ``w -> 1`` readout."""
    rng = np.random.default_rng(seed)
    layers = [cp.Dense(rng.standard_normal((W, 3)), np.zeros(W), "tanh")]
    layers += [cp.Dense(0.5 * rng.standard_normal((W, W)) / np.sqrt(W), 0.1 * rng.standard_normal(W), "tanh")
               for _ in range(L)]
    layers.append(cp.Dense(rng.standard_normal((1, W)), np.zeros(1), "identity"))
    return cp.Chain(layers)


CHAIN = contractive_chain(64)
X = np.random.default_rng(1).standard_normal((N, 3))
Y = np.random.default_rng(2).standard_normal((N, 1))


@pytest.fixture(scope="module", params=["ray", "dask"])
def engine(request):
    """An executor on each engine's embedded cluster (started once, shared with the other test files)."""
    engine = started_engine(request.param, timeout=300)
    if engine.name == "dask":
        # an earlier file's kills may leave the shared local cluster short of a worker: scale it back first
        client = engine.connect(2)
        cluster = getattr(client, "cluster", None)
        if cluster is not None and len(cluster.workers) < 2:
            cluster.scale(2)
        client.wait_for_workers(2, timeout=120)
    return engine


@pytest.fixture(scope="module")
def models(engine):
    """The 64-layer chain on 2 and 3 shards."""
    placed = {P: shard(CHAIN, engine, shards=P, kernels="numpy") for P in (2, 3)}
    yield placed
    for m in placed.values():
        m.close()


def max_rel_err(g, ref):
    worst = 0.0
    for gl, rl in zip(g, ref, strict=True):
        for a, b in zip(gl, rl, strict=True):
            assert a.shape == b.shape
            worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst


@pytest.mark.parametrize("P, forward", [(2, "deer"), (2, "elk"), (3, "deer"), (3, "quasi_deer"), (3, "elk")])
def test_gradients_after_newton_equal_the_sequential_ones(models, P, forward):
    model = models[P]
    chain = model.gather()  # CHAIN, or where an earlier test's training left it
    v_ref, ref = cp.value_and_grad(chain, X, Y, method="backprop", kernels="numpy")
    _, local = cp.forward(chain, X, method=forward, return_trace=True)
    value, g, tr = model.value_and_grad(X, Y, forward=forward, return_trace=True)
    assert abs(value - v_ref) <= 1e-8 * abs(v_ref)
    assert max_rel_err(g.gather(), ref) < 1e-8
    nt = tr.newton
    assert tr.forward == forward and nt.converged and not nt.fallback
    assert nt.residuals[-1] <= nt.tol == 1e-10 and nt.accepted == [True] * nt.iterations
    # the same iteration as the local pass: the same count, up to a residual that lands on tol
    assert abs(nt.iterations - local.iterations) <= 1
    if forward == "deer":
        assert nt.iterations <= 10
    assert f"forward {forward!r}: {nt.iterations} Newton iteration(s)" in tr.note
    # the shards ran their Newton calls and then the ordinary step
    tasks = {e.task.split(".", 1)[1] for e in tr.events}
    assert {"newton.begin", "newton.map", "newton.update", "forward"} <= tasks
    if forward == "deer":  # the other backward plans run after it too
        _, g2 = model.value_and_grad(X, Y, method="sklansky", forward=forward)
        assert max_rel_err(g2.gather(), ref) < 1e-8


def test_training_with_deer_matches_a_local_loop(models):
    model = models[3]
    local = model.gather()
    for _ in range(2):
        v, g = model.value_and_grad(X, Y, forward="deer", forward_options={"tol": 1e-12})
        model.sgd_step(g, lr=0.1)  # applied by the next step's first Newton call
        v_ref, g_ref = cp.value_and_grad(local, X, Y, method="backprop", kernels="numpy")
        assert v == pytest.approx(v_ref, rel=1e-10)
        local = local.sgd_step(g_ref, 0.1)
    got = model.gather()
    assert max(float(np.abs(a - b).max()) for la, lb in zip(got.params, local.params)
               for a, b in zip(la, lb)) < 1e-9


def test_bytes_per_iteration_do_not_grow_with_depth(engine, models):
    """L and 4L layers: every iteration moves the same bytes, those of the formula (docs/distributed.md)."""
    small = shard(contractive_chain(16), engine, shards=3, kernels="numpy")
    try:
        for forward, diagonal in (("deer", False), ("quasi_deer", True)):
            per = {}
            for L, model in ((16, small), (64, models[3])):
                # three iterations say it (quasi-DEER's thirty would not say more): then the pipeline
                _, _, tr = model.value_and_grad(X, Y, forward=forward, return_trace=True,
                                                forward_options={"max_iter": 3, "fallback": "sequential"})
                assert len(tr.newton_bytes) == tr.newton.iterations == 3
                per[L] = set(tr.newton_bytes)
            want = bytes_per_iteration(3, N, W, 8, diagonal=diagonal)
            assert per[16] == per[64] == {want}, (forward, per, want)
        assert bytes_per_iteration(3, N, W) == 8 * N * (2 * 2 * W + W * W)
    finally:
        small.close()


def test_not_converging_raises_and_fallback_runs_the_pipeline(models):
    model = models[3]
    _, ref = cp.value_and_grad(model.gather(), X, Y, method="backprop", kernels="numpy")
    with pytest.raises(ConvergenceError, match="deer did not converge in 1 iteration") as info:
        model.value_and_grad(X, Y, forward="deer", forward_options={"max_iter": 1})
    assert info.value.iterations == 1 and info.value.residual > 1e-10 and info.value.trace.iterations == 1
    _, g, tr = model.value_and_grad(X, Y, forward="deer", forward_options={"max_iter": 1, "fallback": "sequential"},
                                    return_trace=True)
    assert tr.newton.fallback and not tr.newton.converged
    assert "the sequential pass ran instead (fallback='sequential')" in tr.note
    assert max_rel_err(g.gather(), ref) < 1e-12  # the pipeline's own gradients
    # ELK with a fixed, large damping converges too slowly for its max_iter
    with pytest.raises(ConvergenceError, match="elk did not converge in 3 iteration"):
        model.value_and_grad(X, Y, forward="elk", forward_options={"max_iter": 3, "damping": 100.0})


def test_a_first_shard_of_one_layer_a_top_shard_of_the_readout_and_a_non_finite_guess(engine):
    """Layers [0] [1, 2] [3]: the first layer's output enters shard 1; the top shard solves nothing."""
    rng = np.random.default_rng(3)
    a = rng.uniform(1, 4, (2, W)) * rng.choice([-1, 1], (2, W))
    chain = cp.Chain([CHAIN.layers[0], *(cp.Diagonal(a[i], rng.standard_normal(W), "relu") for i in range(2)),
                      CHAIN.layers[-1]])
    _, ref = cp.value_and_grad(chain, X, Y, method="backprop", kernels="numpy")
    with shard(chain, engine, shards=3, kernels="numpy") as model:
        assert model.bounds == [(0, 1), (1, 3), (3, 4)]
        for forward in ("deer", "quasi_deer"):
            _, local = cp.forward(chain, X, method=forward, return_trace=True)
            _, g, tr = model.value_and_grad(X, Y, forward=forward, return_trace=True)
            assert max_rel_err(g.gather(), ref) < 1e-8 and tr.newton.converged
            # layer 1 was linearised at the first layer's output, as the local pass does
            assert tr.newton.initial_residuals == pytest.approx(local.initial_residuals, rel=1e-14)
            assert tr.newton.iterations == local.iterations <= 2
        # an init that is already the answer: 0 iterations, the states entering the shards from it
        init = np.array(cp.forward(chain, X, kernels="numpy").outputs[1])
        _, g, tr = model.value_and_grad(X, Y, forward="deer", forward_options={"init": init}, return_trace=True)
        assert tr.newton.iterations == 0 and max_rel_err(g.gather(), ref) < 1e-12
        # a guess where f overflows: the error names the layer, as the local pass's does
        init = np.full((2, N, W), 1e308)
        with pytest.raises(NonFiniteError, match="at layer 2") as local:
            cp.forward(chain, X, method="deer", init=init)
        with pytest.raises(NonFiniteError, match="deer: f at the initial guess is not finite at layer 2") as err:
            model.value_and_grad(X, Y, forward="deer", forward_options={"init": init})
        assert str(err.value) == str(local.value) and err.value.layers == (2, 2)
        _, g, tr = model.value_and_grad(X, Y, forward="deer", forward_options={"init": init, "fallback": "sequential"},
                                        return_trace=True)
        assert tr.newton.fallback and "not finite at layer 2" in tr.note
        assert max_rel_err(g.gather(), ref) < 1e-12


def test_bad_forward_arguments_are_refused_before_anything_runs(models):
    model = models[2]
    _, g = model.value_and_grad(X, Y)
    with pytest.raises(ValueError, match="unknown forward method 'nope'"):
        model.value_and_grad(X, Y, forward="nope")
    with pytest.raises(ValueError, match=r"\['schedule'\] are not for a sharded model.*valid keys: tol"):
        model.value_and_grad(X, Y, forward="deer", forward_options={"schedule": "sklansky"})
    with pytest.raises(ValueError, match="forward_options"):
        model.value_and_grad(X, Y, forward_options={"tol": 1e-3})
    with pytest.raises(ValueError, match="tol must be"):
        model.value_and_grad(X, Y, forward="deer", forward_options={"tol": -1})
    with pytest.raises(ValueError, match="init: expected shape"):
        model.value_and_grad(X, Y, forward="deer", forward_options={"init": np.zeros((3, N, W))})
    assert len(g.gather()) == len(CHAIN)  # nothing was sent: the last step's gradients are still held


def test_a_shard_lost_before_a_newton_step_is_replaced_and_training_stays_exact():
    """The step's first Newton call finds the shard gone: it is rebuilt by replay and the step runs again.

    On Ray (an actor's process is killed); a killed Dask worker is restarted by its nanny while later
    tests place their shards, so the Dask kills are tests/test_sharded.py's, which wait for it.
    """
    engine = type(cp.get_executor("ray"))(workers=2, timeout=300)
    chain = contractive_chain(16, seed=5)
    with shard(chain, engine, shards=2, kernels="numpy", retries=2) as model:
        local = chain
        for i in range(3):
            if i == 1:
                kill_and_wait(model.pids[1])
            v, g, tr = model.value_and_grad(X, Y, forward="deer", return_trace=True)
            assert tr.replaced == ((1,) if i == 1 else ())
            v_ref, g_ref = cp.value_and_grad(local, X, Y, method="backprop", kernels="numpy")
            assert v == pytest.approx(v_ref, rel=1e-10) and max_rel_err(g.gather(), g_ref) < 1e-8
            model.sgd_step(g, 0.1)
            local = local.sgd_step(g_ref, 0.1)
        got = model.gather()
    assert max(float(np.abs(a - b).max()) for la, lb in zip(got.params, local.params) for a, b in zip(la, lb)) < 1e-9
