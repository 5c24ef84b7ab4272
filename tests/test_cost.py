"""The cost model: round statistics match the plans, predictions are sane, auto still works."""

import json

import numpy as np
import pytest

import chainprod as cp
from chainprod import cost
from chainprod.schedules import build


def _count(sched):
    out = []
    for i, _k, _j in sched.intervals():
        thin = int(np.sum(i == 0))
        out.append((thin, len(i) - thin))
    return out


@pytest.mark.parametrize("name", ["sequential", "sklansky", "brent_kung", "hillis_steele"])
@pytest.mark.parametrize("L", [2, 3, 5, 8, 13, 16, 17, 100])
def test_round_stats_match_replay(name, L):
    assert cost.round_stats(name, L) == _count(build(name, L))


@pytest.mark.parametrize("L,chunks", [(10, 2), (17, 4), (100, 7), (64, 8), (33, 5)])
def test_round_stats_chunked_match_replay(L, chunks):
    assert cost.round_stats("chunked", L, chunks=chunks) == _count(build("chunked", L, chunks=chunks))


def test_predict_positive_and_monotone_in_width():
    s = build("sklansky", 256)
    t = [cost.predict(s, w) for w in (4, 16, 64)]
    assert all(x > 0 for x in t) and t[0] < t[1] < t[2]


def test_predict_more_workers_not_slower_on_parallel_backend():
    s = build("sklansky", 1024)
    m = cost.CostModel(round_latency={"threads": 0.0}, task_latency={"threads": 0.0})
    assert cost.predict(s, 64, backend="threads", workers=4, model=m) <= \
        cost.predict(s, 64, backend="threads", workers=1, model=m) * 1.0001


def test_predict_grad_fields():
    r = cost.predict_grad("dense", 128, 8, method="auto")
    assert set(r) == {"forward", "backward", "total", "schedule"}
    assert r["total"] == pytest.approx(r["forward"] + r["backward"])
    b = cost.predict_grad("diagonal", 128, 8, method="backprop")
    assert b["schedule"] == "backprop"


def test_choose_schedule_and_auto_still_work():
    s = cost.choose_schedule(100, blocks=16)
    assert isinstance(s, cp.Schedule) and s.length == 100 and s.is_scan
    chain = cp.mlp([4] * 20 + [1])
    x = np.ones((2, 4))
    g = cp.grad(chain, x, method="auto")
    ref = cp.grad(chain, x, method="backprop")
    for a, b in zip(g, ref):
        for p, q in zip(a, b):
            np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


def test_simulate_and_crossover():
    r = cost.simulate(2 ** 20, 64, 4096)
    assert r["scan"] > 0 and r["backprop"] > 0 and r["schedule"] in ("sklansky", "brent_kung", "chunked")
    # with no engine latency and many workers, long thin chains must eventually win
    x = cost.crossover(8, 4096, backend="ideal")
    assert x is not None and 4 <= x <= 2 ** 20
    # more workers never move the crossover later (ideal engine)
    x1 = cost.crossover(8, 64, backend="ideal")
    assert x1 is None or x <= x1


def test_model_roundtrip(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    m = cost.CostModel(call_latency=1.23e-6, source="test")
    cost.save_model(m, str(path))
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(path))
    cost.load_model.cache_clear()
    try:
        got = cost.load_model()
        assert got.call_latency == pytest.approx(1.23e-6) and got.source == "test"
        assert json.loads(path.read_text())["source"] == "test"
    finally:
        monkeypatch.delenv("CHAINPROD_COST_MODEL")
        cost.load_model.cache_clear()
        cost.auto._CHOICES.clear()


def test_loglog_interpolation_exact_at_grid():
    m = cost.DEFAULT_MODEL
    for w, t in zip(m.ops["mm"]["w"], m.ops["mm"]["t"]):
        assert float(m.op_time("mm", w)) == pytest.approx(t)
    with pytest.raises(ValueError, match="unknown structure"):
        m.layer_time("banded", "forward", 8)


def test_distributed_prediction_follows_the_task_graph():
    """Ray/Dask are costed on the tasks the executor submits, not a hop per round."""
    from chainprod.cost import CostModel, predict
    from chainprod.planning.partition import partition

    model = CostModel(round_latency={"ray": 1.0}, task_latency={"ray": 0.0}, run_latency={"ray": 0.0},
                      serial_op_latency=0.0)
    for name in ("sklansky", "brent_kung", "chunked"):
        s = cp.schedule(name, 256, workers=2)
        part = partition(s, 2)
        t = predict(s, 8, backend="ray", workers=2, model=model)
        # hops dominate (1 s each): the prediction counts the cross-worker hops on the
        # longest path, which is far fewer than the schedule's rounds
        assert 1.0 <= t < part.cross_edges + 1.0
        assert t < s.rounds
