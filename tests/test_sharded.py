"""Sharded models on real embedded Ray and Dask clusters (``chainprod.shard``).

Every gradient is checked against ``cp.grad(..., method="backprop",
kernels="numpy")`` (the numpy reference, run locally); training runs against
a local loop of ``cp.value_and_grad`` + ``Chain.sgd_step``. Faults: a shard's
process is killed by PID between and during steps; the run must end with
exactly the parameters of an uninterrupted run, and with retries off the
error must name the shard while ``gather()`` still returns the last step.
"""

from __future__ import annotations

import gc
import logging
import re
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import DistributedError, DistributedTimeoutError, NonFiniteError
from chainprod.executors.distributed import Deadline
from chainprod.executors.sharded_worker import ShardLost
from chainprod.shard import ShardedGrads, ShardTrace, shard
from chainprod.testing import kill_and_wait, random_chain, started_engine

pytest.importorskip("ray")
pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

ENGINES = ["ray", "dask"]


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    """An executor on each engine's embedded cluster (started once, shared with the other test files)."""
    return started_engine(request.param, timeout=300)


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


def same_params(c1, c2):
    """Bit-identical parameters."""
    return all(np.array_equal(a, b) for l1, l2 in zip(c1.params, c2.params) for a, b in zip(l1, l2))


def kill(pid):
    """SIGKILL a shard's process by PID; return once it is dead (:func:`chainprod.testing.kill_and_wait`)."""
    kill_and_wait(pid)


def two_processes(engine):
    """Dask: wait until both worker processes are up (a nanny restarts a killed one; until then every
    shard placed would land in the survivor).

    A nanny whose restart of a killed worker fails closes and leaves the
    local cluster (seen once in several hundred kills: the cluster then
    holds one worker for good), so a cluster found short of a worker is
    scaled back to two while waiting.
    """
    if engine.name != "dask":
        return
    client = engine.connect(2)
    cluster = getattr(client, "cluster", None)
    deadline = time.monotonic() + 120
    while True:
        if cluster is not None and len(cluster.workers) < 2:
            cluster.scale(2)
        try:
            client.wait_for_workers(2, timeout=5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def named_shards(err):
    return {int(b) for b in re.findall(r"shard (\d+) \(layers", str(err))}


def steps(model, x, n, lr=0.1):
    for _ in range(n):
        _, g = model.value_and_grad(x)
        model.sgd_step(g, lr)


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


@pytest.fixture(scope="module")
def small():
    """A small mixed chain and its batch."""
    chain = random_chain(40, 4, kind="mixed", seed=5)
    x = np.random.default_rng(2).standard_normal((2, 4))
    return chain, x


_REFERENCE: dict = {}


def _reference(chain, engine, x, counts, shards=2):
    """``{n: model.gather()}`` after ``n`` uninterrupted steps (lr 0.1), ``n`` in 0..6; computed once."""
    key = (engine.name, id(chain), shards)
    if key not in _REFERENCE:
        out = {}
        with shard(chain, engine, shards=shards) as model:
            for n in range(7):
                out[n] = model.gather()
                steps(model, x, 1)
        _REFERENCE[key] = (chain, out)  # the chain is kept: its id stays its own
    return {n: _REFERENCE[key][1][n] for n in counts}


# -- faults --------------------------------------------------------------------------------------------
def _train(model, steps, x, y, kill_at=None, during=False):
    """``steps`` SGD steps; at step ``kill_at`` kill shard 1's process (before the step, or in it)."""
    wait = model._engine.reports

    def kill_then_wait(finals, deadline):  # the step's calls are all submitted, none waited for
        model._engine.reports = wait
        kill(model.pids[1])
        return wait(finals, deadline)

    for i in range(steps):
        if i == kill_at:
            if during:
                model._engine.reports = kill_then_wait
            else:
                kill(model.pids[1])
        _, g = model.value_and_grad(x, y, method="backprop")
        model.sgd_step(g, lr=0.01)
    return model.gather()


@pytest.mark.parametrize("during", [False, True], ids=["between-steps", "during-a-step"])
def test_killed_shard_is_replaced_and_training_is_exact(engine, during):
    chain = random_chain(600, 24, kind="dense", seed=3)
    chain = cp.Chain(list(chain.layers[:-1]) + [cp.Dense(np.ones((3, 24)) / 24, np.zeros(3), "identity")])
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((64, 24)), rng.standard_normal((64, 3))
    with shard(chain, engine, shards=2, retries=2) as ref_model:
        want = _train(ref_model, 20, x, y)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    ray_log = logging.getLogger("ray._private.worker")  # Ray logs there the errors no one read
    ray_log.addHandler(handler)
    try:
        with shard(chain, engine, shards=2, retries=2) as model:
            pid = model.pids[1]
            got = _train(model, 20, x, y, kill_at=10, during=during)
            assert model.pids[1] != pid, "shard 1 was not replaced"
        gc.collect()
    finally:
        ray_log.removeHandler(handler)
    assert same_params(got, want)
    assert not [r for r in records if "Unhandled error" in r], records[:2]


def test_retries_off_names_the_shard_and_gather_returns_the_last_step(engine, small):
    chain, x = small
    want = _reference(chain, engine, x, {3})[3]
    with shard(chain, engine, shards=2, retries=0) as model:
        steps(model, x, 3)
        kill(model.pids[0])
        with pytest.raises(DistributedError, match=r"shard 0 \(layers 0\.\.19\).*retries=0"):
            model.value_and_grad(x)
        assert same_params(model.gather(), want)
        with pytest.raises(DistributedError, match="shard 0"):
            model.value_and_grad(x)
        model.restore()
        _, g = model.value_and_grad(x)
        ref = cp.grad(want, x, method="backprop", kernels="numpy")
        assert max_rel_err(g.gather(), ref) < 1e-10


# -- many steps --------------------------------------------------------------------------------------------
def test_two_hundred_steps_no_memory_growth(engine):
    """Flat RSS everywhere; on Dask a bounded number of the model's tasks on the scheduler, sampled
    every 50 steps (each call must not keep the previous one as a dependency: 3 more per step)."""
    chain = cp.mlp([8] * 64 + [1], seed=0)
    x = np.ones((1, 8))
    me = psutil.Process()
    client = engine.connect(2) if engine.name == "dask" else None
    tasks = []
    with shard(chain, engine, shards=2) as model:
        workers = [psutil.Process(p) for p in model.pids]
        tag = model._engine.model if client is not None else None
        steps(model, x, 20, lr=1e-4)
        rss0 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
        for _ in range(6):
            steps(model, x, 50, lr=1e-4)
            if client is not None:
                tasks.append(client.run_on_scheduler(
                    lambda dask_scheduler: sum(tag in str(k) for k in dask_scheduler.tasks)))
        rss1 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
        rows = [a for entry in model._recovery.log for pair in entry["rows"].values() for a in pair]
    grown = [(b - a) / a for a, b in zip(rss0, rss1)]
    assert max(grown) < 0.05, grown
    assert max(tasks, default=0) <= 40, tasks  # 3 calls a step; a few steps' keys may be on their way out
    # the replay log keeps copies: a view would keep the engine's buffer of a whole report alive (Ray)
    assert rows and all(a.base is None and a.flags.owndata for a in rows)


def test_dask_shards_leave_no_keys_when_calls_outlast_a_poll(monkeypatch):
    """Calls longer than the driver's poll interval must not keep their keys alive (no gc needed)."""
    import gc

    from chainprod.executors import sharded_dask

    monkeypatch.setattr(sharded_dask, "POLL_SECONDS", 1e-4)  # every call now outlasts many polls
    engine = started_engine("dask", timeout=300)
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


# -- losses at any moment, overflowing updates, timed-out steps -----------------------------------------
def test_training_goes_on_after_a_kill_and_a_gather(engine, small):
    chain, x = small
    want = _reference(chain, engine, x, {3, 6})
    with shard(chain, engine, shards=2, retries=0) as model:
        steps(model, x, 3)
        kill(model.pids[0])
        assert same_params(model.gather(), want[3])  # retries=0: shard 0 replayed here
        model.retries = 2
        steps(model, x, 3)  # the first step replaces shard 0
        assert same_params(model.gather(), want[6])
    with shard(chain, engine, shards=2, retries=2) as model:
        steps(model, x, 3)
        pid = model.pids[1]
        kill(pid)
        assert same_params(model.gather(), want[3]) and model.pids[1] != pid  # replaced by the gather
        steps(model, x, 3)
        assert same_params(model.gather(), want[6])


class _FakeEngine:
    """Only what ShardRecovery asks of an engine; ``start`` of a shard in ``lose_on_start`` finds others lost."""

    def __init__(self):
        self.epoch, self.started, self.lose_on_start = 0, [], {}

    def new_epoch(self):
        self.epoch += 1

    def forget(self, b):
        pass

    def start(self, b, spec, theta, applied, log, deadline):
        self.started.append(b)
        if b in self.lose_on_start:
            raise ShardLost(self.lose_on_start.pop(b), "gone while shard b was placed")
        return 100 + len(self.started)


@pytest.mark.parametrize("retries", [1, 2])
def test_a_shard_lost_while_another_is_replaced(retries):
    """The recovery logic alone (no cluster): a loss found during a replacement costs one more retry."""
    from chainprod.shard_recovery import ShardRecovery

    eng = _FakeEngine()
    rec = ShardRecovery(eng, [{}] * 3, [np.zeros(2)] * 3, [(0, 2), (2, 4), (4, 6)], engine_name="dask",
                        retries=retries)
    rec.place(Deadline(None))
    tries = []

    def attempt():
        tries.append(eng.epoch)
        if len(tries) == 1:
            raise ShardLost([0], "killed")
        return "done"

    eng.lose_on_start = {0: [2]}  # placing shard 0 again finds shard 2's process gone too
    if retries == 1:
        with pytest.raises(DistributedError) as err:
            rec.guarded(attempt, Deadline(None))
        assert named_shards(err.value) == {0, 2} and rec.lost == {0, 2}
    else:
        assert rec.guarded(attempt, Deadline(None)) == ("done", (0, 2))
        assert not rec.lost and eng.started[3:] == [0, 0, 2] and len(set(tries)) == 2


@pytest.mark.parametrize("retries", [0, 1])
def test_two_shards_lost_at_once_are_both_replaced_or_both_named(engine, small, retries):
    """Dask: 4 shards on 2 workers, one process holds two; Ray: two actor processes killed together."""
    chain, x = small
    want = _reference(chain, engine, x, {2, 4}, shards=4)
    two_processes(engine)
    with shard(chain, engine, shards=4, retries=retries) as model:
        steps(model, x, 2)
        pids = list(model.pids)
        victims = {pids[0]} if engine.name == "dask" else {pids[0], pids[2]}
        lost = {b for b, p in enumerate(pids) if p in victims}
        assert len(lost) == 2
        for p in victims:
            kill(p)
        if retries == 0:
            with pytest.raises(DistributedError) as err:
                model.value_and_grad(x)
            assert type(err.value) is DistributedError and named_shards(err.value) == lost, str(err.value)
            assert same_params(model.gather(), want[2])
        else:
            steps(model, x, 2)
            assert all(model.pids[b] not in victims for b in range(4))
            assert same_params(model.gather(), want[4])


def test_retries_off_names_exactly_the_shard_killed_during_a_step(engine, monkeypatch):
    chain = random_chain(300, 24, kind="dense", seed=3)
    x = np.random.default_rng(1).standard_normal((512, 24))  # shard 0's forward runs a while
    client = engine.connect(2) if engine.name == "dask" else None
    two_processes(engine)
    with shard(chain, engine, shards=2, retries=0) as model:
        assert model.pids[0] != model.pids[1]
        steps(model, x, 1, lr=1e-3)
        wait = model._engine.reports

        def kill_then_wait(finals, deadline):  # every call of the step is submitted; none waited for
            if client is not None:  # kill while the scheduler has shard 0's call running on its worker
                addr, t_end = model._engine.addr[0], time.monotonic() + 60
                while not client.processing().get(addr) and time.monotonic() < t_end:
                    time.sleep(0.001)
            kill(model.pids[0])
            return wait(finals, deadline)

        monkeypatch.setattr(model._engine, "reports", kill_then_wait)
        if client is not None:  # a cluster that allows no failures: the running call and every call
            # that consumes its value fail with KilledWorker at once (a cluster of cp.grad(..., retries=0))
            old = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
            client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
        try:
            with pytest.raises(DistributedError) as err:
                model.value_and_grad(x)
        finally:
            if client is not None:
                client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", old))
        assert type(err.value) is DistributedError and named_shards(err.value) == {0}, str(err.value)


def test_an_overflowing_update_is_refused_and_the_model_stays_usable(engine):
    chain = cp.mlp([4] * 12 + [1], seed=3)
    x = np.random.default_rng(4).standard_normal((4, 4))
    _, g_local = cp.value_and_grad(chain, x, method="backprop", kernels="numpy")
    with pytest.raises(NonFiniteError) as local:
        chain.sgd_step(g_local, 1e308)
    with shard(chain, engine, shards=2, retries=2) as model:
        _, g = model.value_and_grad(x)
        with pytest.raises(NonFiniteError, match=f"layer {local.value.layers[0]} ") as err:
            model.sgd_step(g, 1e308)
        assert err.value.layers == local.value.layers
        with pytest.raises(ValueError, match="lr must be a finite number"):
            model.sgd_step(g, 10**400)
        assert same_params(model.gather(), chain)  # nothing applied
        kill(model.pids[1])  # a replay from the log must not apply the refused update either
        assert same_params(model.gather(), chain)
        model.sgd_step(g, np.int64(1))
        model.sgd_step(g, -1)  # two updates of one step's gradients: back where it started
        steps(model, x, 2, lr=0.01)
        got = model.gather()
    local = chain
    for _ in range(2):
        _, gl = cp.value_and_grad(local, x, method="backprop", kernels="numpy")
        local = local.sgd_step(gl, 0.01)
    assert params_diff(got, local) < 1e-10


@pytest.mark.parametrize("update_first", [False, True], ids=["stale-update", "update-then-timeout"])
def test_a_timed_out_step_does_not_wedge_the_model(engine, update_first):
    chain = random_chain(300, 24, kind="dense", seed=3)
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((32, 24)), rng.standard_normal((32, 24))

    def run(model, timeout_at_step_2):
        _, g1 = model.value_and_grad(x1)
        if update_first:
            model.sgd_step(g1, 1e-3)
        if timeout_at_step_2:
            with pytest.raises(DistributedTimeoutError):
                model.value_and_grad(x2, timeout=1e-9)
            if not update_first:
                with pytest.raises(ValueError, match="no longer on the workers"):
                    model.sgd_step(g1, 1e-3)  # its gradients may be those of the step that timed out
                with pytest.raises(ValueError, match="no longer on the workers"):
                    g1.gather()
            mid = model.gather()
            model.restore()
        else:
            mid = model.gather()
        _, g2 = model.value_and_grad(x2)
        model.sgd_step(g2, 1e-3)
        return mid, g2.gather(), model.gather()

    with shard(chain, engine, shards=2) as model:
        want = run(model, False)
    with shard(chain, engine, shards=2) as model:
        got = run(model, True)
    assert same_params(got[0], want[0]) and same_params(got[2], want[2])
    assert all(np.array_equal(a, b) for ga, gb in zip(got[1], want[1]) for a, b in zip(ga, gb))
