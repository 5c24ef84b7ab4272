"""Chaos: 50 sharded training steps with shard processes killed at random moments, on Ray and Dask.

Every kill is a SIGKILL of a shard's process by PID (psutil), at a moment
drawn from a fixed seed: between steps; during a step, right after the k-th
call of an attempt is submitted (a hook on the engine's ``call``, so no sleep
decides where it lands), once or in two attempts of one step in a row (the
replacement dies too); during a gather, right before the j-th shard is read;
while a lost shard is being replaced (another one dies as its replacement
starts); and the same shard in two consecutive steps. On Dask three shards share two
worker processes, so a kill often takes two shards at once. The run must end
with parameters bit-identical to an uninterrupted run of the same steps and
gathers, and on Ray leave no "Unhandled error" in Ray's log. Loopback
clusters only; each engine's run is bounded by the model's timeout per call.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest

from chainprod.shard import shard
from chainprod.testing import kill_and_wait, random_chain, started_engine

pytest.importorskip("ray")
pytest.importorskip("distributed")
pytest.importorskip("psutil")

STEPS = 50
SHARDS = 3
MOMENTS = ["between", "during", "during-twice", "gather", "twice", "replacing", "during", "gather", "during"]


@pytest.fixture(scope="module", params=["ray", "dask"])
def engine(request):
    """An executor on each engine's embedded cluster (started once, shared with the other test files)."""
    return started_engine(request.param, timeout=120)


def kill_plan(seed=18):
    """``{step: (moment, shard, k)}``: which moment, which shard, after which call (or before which read)."""
    rng = np.random.default_rng(seed)
    at = sorted(int(s) for s in rng.choice(np.arange(1, STEPS - 2), size=len(MOMENTS), replace=False))
    plan = {}
    for step, moment in zip(at, rng.permutation(MOMENTS)):
        if moment == "twice" and (step + 1 in plan or step + 1 in at):
            moment = "between"  # the second kill of "twice" needs the next step free
        plan[step] = (str(moment), int(rng.integers(0, SHARDS)), int(rng.integers(1, 2 * SHARDS + 1)))
    return plan


class Killer:
    """Kills shards of ``model`` by PID, now or from hooks on its engine's ``call`` and ``fetch``."""

    def __init__(self, model):
        self.model, self.engine = model, model._engine
        self.kills = 0
        self.armed = None  # (shard, k, attempts left): kill after the k-th call of an attempt
        self.before_read = None  # (shard, j): kill before the j-th shard is read
        self.on_start = None  # shard: kill it as the next replacement starts
        self.epoch, self.calls, self.reads = None, 0, 0
        call, fetch, start = self.engine.call, self.engine.fetch, self.engine.start

        def hooked_call(b, method, *args):
            out = call(b, method, *args)
            epoch = getattr(self.engine, "epoch", None)  # one per attempt
            if epoch != self.epoch:  # a new attempt: count its calls from 1
                self.epoch, self.calls = epoch, 0
            self.calls += 1
            if self.armed is not None and self.calls == self.armed[1]:
                shard_, k, left = self.armed
                self.armed = (shard_, k, left - 1) if left > 1 else None
                self.now(shard_)
            return out

        def hooked_fetch(b, method, *args, deadline):
            if self.before_read is not None and self.reads == self.before_read[1]:
                shard_, _ = self.before_read
                self.before_read = None
                self.now(shard_)
            self.reads += 1
            return fetch(b, method, *args, deadline=deadline)

        def hooked_start(b, *args, **kwargs):
            if self.on_start is not None:
                other, self.on_start = self.on_start, None
                self.now(other)
            return start(b, *args, **kwargs)

        self.engine.call, self.engine.fetch, self.engine.start = hooked_call, hooked_fetch, hooked_start

    def now(self, b):
        """SIGKILL shard ``b``'s process; return once it is dead (:func:`chainprod.testing.kill_and_wait`)."""
        if kill_and_wait(self.model.pids[b]):  # False: gone already (it shared a process with a killed shard)
            self.kills += 1


def run(chain, engine, xs, plan, kill=True):
    """The steps and gathers of the chaos run; ``kill=False``: the same steps and gathers, uninterrupted."""
    gather_at = {i for i in range(STEPS) if i % 10 == 9} | {i for i, (m, _, _) in plan.items() if m == "gather"}
    with shard(chain, engine, shards=SHARDS, retries=3) as model:
        killer = Killer(model) if kill else None
        plan = plan if kill else {}
        gathered = []
        for i, x in enumerate(xs):
            moment, b, k = plan.get(i, (None, 0, 0))
            if moment in ("between", "twice"):
                killer.now(b)
            elif moment == "replacing":
                killer.now(b)
                killer.on_start = (b + 1) % SHARDS
            elif moment in ("during", "during-twice"):
                killer.armed = (b, k, 2 if moment == "during-twice" else 1)
            if i - 1 in plan and plan[i - 1][0] == "twice":
                killer.now(plan[i - 1][1])  # the shard replaced in the last step dies again
            _, g = model.value_and_grad(x, method="sklansky" if i % 2 else "backprop")
            model.sgd_step(g, 0.05)
            if i in gather_at:
                if moment == "gather":
                    killer.reads, killer.before_read = 0, (b, k % SHARDS)
                gathered.append(model.gather())
        final = model.gather()
        return final, gathered, (killer.kills if killer else 0)


def test_fifty_steps_with_kills_end_bit_identical(engine):
    chain = random_chain(30, 4, kind="mixed", seed=7)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 4)) for _ in range(STEPS)]
    plan = kill_plan()
    assert set(MOMENTS) <= {m for m, _, _ in plan.values()} | {"between"}
    want, want_gathered, _ = run(chain, engine, xs, plan, kill=False)
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    ray_log = logging.getLogger("ray._private.worker")  # where Ray logs errors no one read
    ray_log.addHandler(handler)
    try:
        got, got_gathered, kills = run(chain, engine, xs, plan)
        gc.collect()
    finally:
        ray_log.removeHandler(handler)
    assert kills >= len(plan), kills
    assert len(got_gathered) == len(want_gathered)
    for a, b in zip([got] + got_gathered, [want] + want_gathered):
        for la, lb in zip(a.params, b.params):
            for pa, pb in zip(la, lb):
                assert np.array_equal(pa, pb)
    assert not [r for r in records if "Unhandled error" in r], records[:3]


def test_a_worker_lost_while_a_replacement_is_sent_to_it_is_one_more_lost_shard(engine):
    """Dask: the worker chosen for a replacement dies as the shard is sent to it (the scatter's connection
    closes). That is a lost shard, replaced again within the retries, not an engine error for the user."""
    if type(engine).__name__ != "DaskExecutor":
        pytest.skip("the scatter to a chosen worker is Dask's")
    from distributed.comm.core import CommClosedError

    chain = random_chain(8, 3, kind="mixed", seed=2)
    x = np.random.default_rng(0).standard_normal((2, 3))
    with shard(chain, engine, shards=2, retries=3) as model:
        want = model.value_and_grad(x)[1].gather()
        client = model._engine.client
        scatter, failures = client.scatter, []

        def failing_once(*args, **kwargs):
            if not failures:
                failures.append(kwargs.get("workers"))
                raise CommClosedError("in <TCP (closed) ConnectionPool.scatter>: Stream is closed")
            return scatter(*args, **kwargs)

        client.scatter = failing_once
        try:
            assert kill_and_wait(model.pids[0])
            got = model.value_and_grad(x)[1].gather()
        finally:
            client.scatter = scatter
    assert failures  # the replacement did meet the closed connection
    for la, lb in zip(got, want):
        for ga, gb in zip(la, lb):
            assert np.array_equal(ga, gb)
