"""Sharded models on real embedded Ray and Dask clusters (``chainprod.shard``).

Every gradient is checked against ``cp.grad(..., method="backprop",
kernels="numpy")`` (the numpy reference, run locally); training runs against
a local loop of ``cp.value_and_grad`` + ``Chain.sgd_step``. Faults: a shard's
process is killed by PID between and during steps; the run must end with
exactly the parameters of an uninterrupted run, and with retries off the
error must name the shard while ``gather()`` still returns the last step.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import DistributedError
from chainprod.shard import ShardedGrads, ShardTrace, shard
from chainprod.testing import random_chain, random_mats

pytest.importorskip("ray")
pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

ENGINES = ["ray", "dask"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    """An executor on each engine's embedded cluster (started once, shared with the other test files)."""
    ex = cp.get_executor(request.param)
    cp.suffix_products(random_mats(3, 2), method="sequential", backend=ex, workers=2)  # start it
    return type(ex)(workers=2, timeout=300)


@pytest.fixture(scope="module")
def mixed_models(engine):
    """One model per P on an uneven, mixed (dense + diagonal) chain with a vector output."""
    chain = random_chain(23, 4, kind="mixed", seed=4)
    chain = cp.Chain(list(chain.layers[:-1]) + [cp.Dense(np.ones((2, 4)) / 4, np.zeros(2), "identity")])
    models = {P: shard(chain, engine, shards=P) for P in (1, 2, 3)}
    yield chain, models
    for m in models.values():
        m.close()


def max_rel_err(g, ref):
    assert len(g) == len(ref)
    worst = 0.0
    for gl, rl in zip(g, ref):
        assert len(gl) == len(rl)
        for a, b in zip(gl, rl):
            assert a.shape == b.shape
            worst = max(worst, float(np.abs(a - b).max() / (np.abs(b).max() + 1e-300)))
    return worst


def params_diff(c1, c2):
    return max(float(np.abs(a - b).max()) for l1, l2 in zip(c1.params, c2.params) for a, b in zip(l1, l2))


# -- exactness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 2, 3])
def test_gradients_equal_backprop_for_every_method(mixed_models, P):
    chain, models = mixed_models
    model = models[P]
    rng = np.random.default_rng(P)
    x = rng.standard_normal((3, 4))
    y = rng.standard_normal((3, 2))
    ref_value, ref = cp.value_and_grad(chain, x, y, loss="mse", method="backprop", kernels="numpy")
    for method in ("backprop", "sklansky", "brent_kung", "chunked", "auto"):
        value, g, tr = model.value_and_grad(x, y, loss="mse", method=method, return_trace=True)
        assert isinstance(g, ShardedGrads) and isinstance(tr, ShardTrace)
        assert abs(value - ref_value) <= 1e-12 * abs(ref_value)
        assert max_rel_err(g.gather(), ref) < 1e-10, method
        assert 1 <= tr.peak_concurrency() <= P
        assert tr.rounds == (0 if P == 1 else 1 if P == 2 or tr.method != "backprop" else 2)
        if P == 3 and method in ("sklansky", "brent_kung", "chunked"):
            assert tr.method == method and any(e.task.endswith(".product") for e in tr.events)
        # one process per shard (Dask's two workers host three shards: two share one)
        assert min(P, 2) <= len({e.worker for e in tr.events}) <= P


def test_one_sample_and_sum_loss(engine):
    chain = random_chain(11, 3, kind="dense", seed=1)
    x = np.linspace(-1, 1, 3)
    ref = cp.grad(chain, x, method="backprop", kernels="numpy")
    with shard(chain, engine, shards=2, kernels="numpy") as model:
        value, g = model.value_and_grad(x)
        assert max_rel_err(g.gather(), ref) < 1e-10
        assert value == pytest.approx(float(chain(x)[0]), rel=1e-12)


def test_training_matches_a_local_loop_and_nothing_is_modified(mixed_models):
    chain, models = mixed_models
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 4)), rng.standard_normal((4, 2))
    x0, y0 = x.copy(), y.copy()
    with shard(chain, models[3]._executor, shards=3) as model:
        local = chain
        for i in range(4):
            v, g = model.value_and_grad(x, y, method="sklansky" if i % 2 else "backprop")
            model.sgd_step(g, lr=0.05)
            v_ref, g_ref = cp.value_and_grad(local, x, y, method="backprop", kernels="numpy")
            assert v == pytest.approx(v_ref, rel=1e-10)
            local = local.sgd_step(g_ref, 0.05)
        got = model.gather()
    assert params_diff(got, local) < 1e-10
    assert np.array_equal(x, x0) and np.array_equal(y, y0)
    # the chain the model started from is untouched
    assert params_diff(chain, mixed_models[0]) == 0.0


# -- what moves -------------------------------------------------------------------------------------
def test_bytes_moved_do_not_grow_with_depth(engine):
    moved = {}
    for L in (256, 4096):
        chain = cp.mlp([8] * L + [1], seed=0)
        x = np.ones((1, 8))
        with shard(chain, engine, shards=2) as model:
            for _ in range(2):
                _, g, tr = model.value_and_grad(x, return_trace=True)
                model.sgd_step(g, 1e-3)
        moved[L] = tr.bytes_moved
        assert tr.rounds == 1 and tr.peak_concurrency() <= 2
        assert 0 < tr.compute_seconds <= tr.total_seconds
    assert moved[256] == moved[4096] <= 64 * 1024, moved


# -- errors ------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(mixed_models):
    chain, models = mixed_models
    model = models[2]
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match="width 3"):
        model.value_and_grad(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="y has shape"):
        model.value_and_grad(x, np.ones((2, 3)))
    with pytest.raises(ValueError, match="output width 1"):
        model.value_and_grad(x)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        model.value_and_grad(x, np.ones((2, 2)), method="nope")
    _, g1 = model.value_and_grad(x, np.ones((2, 2)))
    _, g2 = model.value_and_grad(x, np.ones((2, 2)))
    with pytest.raises(ValueError, match="of step"):
        model.sgd_step(g1, 0.1)
    with pytest.raises(ValueError, match="of step"):
        g1.gather()
    with pytest.raises(ValueError, match="lr must be"):
        model.sgd_step(g2, float("nan"))
    with pytest.raises(TypeError, match="ShardedGrads"):
        model.sgd_step(g2.gather(), 0.1)
    with pytest.raises(TypeError, match="Ray or Dask executor"):
        shard(chain, cp.get_executor("threads"))
    with pytest.raises(TypeError, match="Chain"):
        shard([1, 2], models[2]._executor)


# -- faults --------------------------------------------------------------------------------------------
def _train(model, steps, x, y, kill_at=None, during=False):
    """``steps`` SGD steps; at step ``kill_at`` kill shard 1's process (before the step, or in it)."""
    for i in range(steps):
        if i == kill_at and not during:
            psutil.Process(model.pids[1]).kill()
            time.sleep(0.3)
        killer = None
        if i == kill_at and during:
            killer = threading.Timer(0.05, psutil.Process(model.pids[1]).kill)
            killer.start()
        _, g = model.value_and_grad(x, y, method="backprop")
        model.sgd_step(g, lr=0.01)
        if killer is not None:
            killer.join()
    return model.gather()


@pytest.mark.parametrize("during", [False, True], ids=["between-steps", "during-a-step"])
def test_killed_shard_is_replaced_and_training_is_exact(engine, during):
    # heavy enough that a step takes a while (the kill lands inside it)
    chain = random_chain(600, 24, kind="dense", seed=3)
    chain = cp.Chain(list(chain.layers[:-1]) + [cp.Dense(np.ones((3, 24)) / 24, np.zeros(3), "identity")])
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((64, 24)), rng.standard_normal((64, 3))
    with shard(chain, engine, shards=2, retries=2) as ref_model:
        want = _train(ref_model, 20, x, y)
    with shard(chain, engine, shards=2, retries=2) as model:
        pid = model.pids[1]
        got = _train(model, 20, x, y, kill_at=10, during=during)
        assert model.pids[1] != pid, "shard 1 was not replaced"
    assert params_diff(got, want) <= 1e-12


def test_retries_off_names_the_shard_and_gather_returns_the_last_step(engine):
    chain = random_chain(40, 4, kind="mixed", seed=5)
    x = np.random.default_rng(2).standard_normal((2, 4))
    with shard(chain, engine, shards=2) as ref_model:
        for _ in range(3):
            _, g = ref_model.value_and_grad(x)
            ref_model.sgd_step(g, 0.1)
        want = ref_model.gather()
    with shard(chain, engine, shards=2, retries=0) as model:
        for _ in range(3):
            _, g = model.value_and_grad(x)
            model.sgd_step(g, 0.1)
        psutil.Process(model.pids[0]).kill()
        time.sleep(0.3)
        with pytest.raises(DistributedError, match=r"shard 0 \(layers 0\.\.19\).*retries=0"):
            model.value_and_grad(x)
        assert params_diff(model.gather(), want) == 0.0
        with pytest.raises(DistributedError, match="shard 0"):
            model.value_and_grad(x)
        model.restore()
        _, g = model.value_and_grad(x)
        ref = cp.grad(want, x, method="backprop", kernels="numpy")
        assert max_rel_err(g.gather(), ref) < 1e-10


# -- many steps --------------------------------------------------------------------------------------------
def test_two_hundred_steps_no_memory_growth(engine):
    chain = cp.mlp([8] * 64 + [1], seed=0)
    x = np.ones((1, 8))
    me = psutil.Process()
    with shard(chain, engine, shards=2) as model:
        workers = [psutil.Process(p) for p in model.pids]

        def steps(n):
            for _ in range(n):
                _, g = model.value_and_grad(x)
                model.sgd_step(g, 1e-4)

        steps(20)
        rss0 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
        steps(200)
        rss1 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
    grown = [(b - a) / a for a, b in zip(rss0, rss1)]
    assert max(grown) < 0.05, grown


def test_dask_shards_leave_no_keys_when_calls_outlast_a_poll(monkeypatch):
    """Calls longer than the driver's poll interval must not keep their keys alive (no gc needed)."""
    import gc

    from chainprod.executors import sharded_dask

    monkeypatch.setattr(sharded_dask, "POLL_SECONDS", 1e-4)  # every call now outlasts many polls
    ex = cp.get_executor("dask")
    cp.suffix_products(random_mats(3, 2), method="sequential", backend=ex, workers=2)  # start it
    engine = type(ex)(workers=2, timeout=300)
    chain = cp.mlp([4] * 12 + [1], seed=1)
    gc.disable()
    try:
        with shard(chain, engine, shards=2) as model:
            tag = model._engine.model
            for _ in range(3):
                _, g = model.value_and_grad(np.ones((2, 4)))
                model.sgd_step(g, 1e-3)
            g.gather()
        del model, g
        client = engine.connect(2)
        t_end = time.monotonic() + 10
        while True:
            left = [k for k in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
                    if tag in str(k)]
            if not left or time.monotonic() > t_end:
                break
            time.sleep(0.1)
    finally:
        gc.enable()
    assert not left, left[:5]
