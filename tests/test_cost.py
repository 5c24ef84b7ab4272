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


# -- fixed costs per call, remote costs per layer, compiled auto --------------------------------------
def _with_fixed(fixed_dense_backprop):
    m = cost.CostModel()
    layers = json.loads(json.dumps(m.layers))
    tab = layers["dense"]
    tab["fixed"] = {k: [[0.0] * len(tab["w"]) for _ in tab["batch"]] for k in ("forward", "backprop", "prep")}
    tab["fixed"]["backprop"] = [[fixed_dense_backprop] * len(tab["w"]) for _ in tab["batch"]]
    return cost.CostModel(layers=layers)


def test_run_time_is_a_fixed_cost_plus_a_cost_per_layer():
    m = _with_fixed(1e-4)
    per = m.layer_time("dense", "backprop", 8)
    for L in (1, 100, 10000):
        assert m.run_time("dense", "backprop", 8, L) == pytest.approx(1e-4 + L * per)
    # a model saved without fixed costs (the defaults, an older calibration): L per-layer costs
    d = cost.CostModel()
    assert d.run_time("dense", "backprop", 8, 300) == pytest.approx(300 * d.layer_time("dense", "backprop", 8))
    assert cost.CostModel.from_dict(json.loads(m.to_json())).run_time("dense", "backprop", 8, 7) == \
        pytest.approx(m.run_time("dense", "backprop", 8, 7))
    assert cost.predict_backprop(500, 8, model=m) == pytest.approx(1e-4 + 500 * per)


def test_run_time_uses_the_cached_cost_while_the_layers_fit_the_caches():
    m = _with_fixed(0.0)
    tab = m.layers["dense"]
    tab["cached"] = {"backprop": [[t / 4 for t in row] for row in tab["backprop"]]}
    tab["bytes"] = [2**20, 16 * 2**20]
    deep = m.layer_time("dense", "backprop", 32)
    per_layer_bytes = cost.layer_bytes("dense", 32)
    small = int(2**20 // per_layer_bytes)  # 1 MB of layers: the cached cost
    big = int(16 * 2**20 // per_layer_bytes) + 1  # beyond 16 MB: the deep-chain cost
    assert m.run_time("dense", "backprop", 32, small) == pytest.approx(small * deep / 4)
    assert m.run_time("dense", "backprop", 32, big) == pytest.approx(big * deep)
    mid = int(4 * 2**20 // per_layer_bytes)  # 4 MB: halfway in log bytes, so sqrt(cached x deep)
    assert m.run_time("dense", "backprop", 32, mid) == pytest.approx(mid * deep / 2, rel=1e-3)
    # what has no cached table (here: forward) keeps the deep-chain cost at every depth
    assert m.run_time("dense", "forward", 32, small) == pytest.approx(small * m.layer_time("dense", "forward", 32))


def test_remote_time_only_on_engines_and_grows_with_layer_bytes():
    m = cost.CostModel(remote_layer={"ray": {"layer": 2e-5, "byte": 1e-9}})
    assert m.remote_time("vectorized", "dense", 8, 1000) == 0.0 and m.remote_time("dask", "dense", 8, 1000) == 0.0
    assert m.remote_time("ray", "dense", 8, 1000) == pytest.approx(1000 * (2e-5 + 1e-9 * cost.layer_bytes("dense", 8)))
    assert cost.layer_bytes("dense", 8) == 8 * (64 + 8 + 8) and cost.layer_bytes("diagonal", 8, 2) == 8 * (16 + 16)
    assert m.remote_time("ray", "dense", 64, 10) > m.remote_time("ray", "diagonal", 64, 10)
    near = cost.predict_grad("dense", 512, 8, method="sequential", backend="ray", workers=2,
                             model=cost.CostModel(remote_layer={}))
    far = cost.predict_grad("dense", 512, 8, method="sequential", backend="ray", workers=2, model=m)
    assert far["backward"] - near["backward"] == pytest.approx(m.remote_time("ray", "dense", 8, 512))
    assert far["forward"] == near["forward"]  # the forward pass runs locally


@pytest.mark.parametrize("backend,P", [("vectorized", 1), ("threads", 1), ("threads", 2)])
def test_compiled_auto_predicts_the_faster_of_backprop_and_the_scan(backend, P):
    for structure, L, w in (("dense", 2048, 32), ("diagonal", 16384, 8), ("dense", 64, 4)):
        kw = dict(backend=backend, workers=P)
        bp = cost.predict_grad(structure, L, w, method="backprop")
        ref = cost.predict_grad(structure, L, w, method="auto", kernels="numpy", **kw)  # the model's pick
        got = cost.predict_grad(structure, L, w, method="auto", kernels="numba", **kw)
        assert got["backward"] == pytest.approx(min(bp["backward"], ref["backward"]))
        assert got["schedule"] == ("backprop" if bp["backward"] < ref["backward"] else ref["schedule"])
    # on an engine the choice is between the cluster's best plan and backprop on the driver, whatever the kernels
    r = cost.predict_grad("dense", 2048, 8, method="auto", backend="ray", workers=2, kernels="numba")
    assert r == cost.predict_grad("dense", 2048, 8, method="auto", backend="ray", workers=2, kernels="numpy")


def _remote_model(cluster_free: bool):
    """A model where the cluster costs nothing and local backprop a lot, or the defaults (latencies of ms)."""
    if not cluster_free:
        return cost.CostModel()
    slow = {s: {**t, "backprop": [[1.0] * len(t["w"])] * len(t["batch"]),
                "prep": [[0.0] * len(t["w"])] * len(t["batch"])} for s, t in cost.CostModel().layers.items()}
    zero = {"ray": 0.0, "dask": 0.0}
    return cost.CostModel(layers=slow, round_latency=zero, task_latency=zero, run_latency=zero, remote_layer={},
                          serial_op_latency=0.0)


@pytest.mark.parametrize("backend", ["ray", "dask"])
@pytest.mark.parametrize("cluster_free", [False, True])
def test_auto_on_an_engine_runs_locally_unless_the_cluster_is_predicted_faster(backend, cluster_free):
    m = _remote_model(cluster_free)
    for structure, L, w in (("dense", 64, 8), ("diagonal", 512, 4)):
        pick = cost.remote_auto(structure, L, w, backend=backend, workers=2, batch=3, model=m)
        pred = cost.predict_grad(structure, L, w, method="auto", backend=backend, workers=2, batch=3, model=m)
        bp = cost.predict_grad(structure, L, w, method="backprop", batch=3, model=m)
        assert pick.local == pytest.approx(bp["backward"])
        if cluster_free:  # every plan on the cluster beats a second per layer here
            assert isinstance(pick.schedule, cp.Schedule) and pick.cluster < pick.local
            assert pred["schedule"] == pick.schedule.name and pred["backward"] == pytest.approx(pick.cluster)
            assert "on the cluster" in pick.note
        else:  # a small chain: the engine's latencies alone exceed the whole local backward pass
            assert pick.schedule is None and pick.cluster > pick.local
            assert pred == bp  # grad runs backprop on the driver, and the prediction says so
            assert pick.note.startswith("auto ran locally: the cluster's predicted time")
        # an explicit schedule is costed on the cluster as asked
        sk = cost.predict_grad(structure, L, w, method="sklansky", backend=backend, workers=2, batch=3, model=m)
        assert sk["schedule"] == "sklansky" and sk["backward"] != bp["backward"]


def test_a_known_remote_decision_is_the_saved_models_last_answer(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(tmp_path / "model.json"))  # no file: the defaults
    cp.clear_caches()
    args = ("diagonal", 256, 8, "ray", 2, 1, "numba")
    assert cost.known_remote_auto(*args) is None  # never asked
    pick = cost.remote_auto("diagonal", 256, 8, backend="ray", workers=2, batch=1, kernels="numba")
    assert cost.known_remote_auto(*args) is pick
    assert cost.known_remote_auto("diagonal", 256, 8, "ray", 1, 1, "numba") is None  # other workers: not asked
    # an answer made with another model is not the saved model's
    other = cost.remote_auto("dense", 64, 8, backend="dask", workers=2, batch=3, model=_remote_model(True))
    assert isinstance(other.schedule, cp.Schedule)
    assert cost.known_remote_auto("dense", 64, 8, "dask", 2, 3, "numba") is None
    cost.save_model(_remote_model(True))  # a new calibration: the answers made with the old one are gone
    assert cost.known_remote_auto(*args) is None
    cp.clear_caches()


def test_line_through_two_timings():
    from chainprod.calibrate import _line

    assert _line(2.0, 10, 3.0, 20) == pytest.approx((1.0, 0.1))
    f, s = _line(5.0, 10, 3.0, 20)  # noise made the long chain faster: a small positive slope, no negative cost
    assert f >= 0 and s == pytest.approx(0.1 * 3.0 / 20)


def test_calibrated_layer_tables_have_the_models_layout():
    from chainprod.calibrate import _layer_costs

    tabs = _layer_costs(1, widths=(2, 8), batches=(1,))
    m = cost.CostModel(layers=tabs)
    for structure in ("dense", "diagonal"):
        tab = tabs[structure]
        assert tab["w"] == [2, 8] and tab["batch"] == [1]
        for what in ("forward", "backprop", "prep"):
            assert np.shape(tab[what]) == (1, 2) and np.shape(tab["fixed"][what]) == (1, 2)
            assert min(tab[what][0]) > 0 and min(tab["fixed"][what][0]) >= 0
            assert tab[what][0][0] <= tab[what][0][1]  # per-layer costs do not fall as blocks grow
            assert m.run_time(structure, what, 4, 1000) > m.run_time(structure, what, 4, 10) > 0
        assert tab["bytes"][0] < tab["bytes"][1]
        for what in ("forward", "backprop"):  # measured on a chain in the caches too
            assert np.shape(tab["cached"][what]) == (1, 2) and min(tab["cached"][what][0]) > 0


# -- the compiled scan kernel's costs ----------------------------------------------------------------
def _flat(t):
    return {"w": [2, 256], "t": [t, t]}


COMPILED = {"pos": _flat(3e-7), "mm": _flat(5e-7), "pos_ew": _flat(1e-7), "ew": _flat(2e-8)}


@pytest.mark.parametrize("name", ["sequential", "sklansky", "brent_kung", "hillis_steele"])
@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_compiled_scan_time_is_brents_bound_of_the_ops(name, structure):
    m = cost.CostModel(compiled_ops=COMPILED)
    n = 37
    sched = build(name, n)
    blocks = cost.chain_blocks(structure, n + 1, 8)
    thin_t, sq_t = (3e-7, 5e-7) if structure == "dense" else (1e-7, 2e-8)
    work = depth = 0.0
    for i, _, _ in sched.intervals():  # an independent count: a thin op makes a prefix [0, k]
        t = np.where(i == 0, thin_t, sq_t)
        work += float(t.sum())
        depth += float(t.max()) if name != "sequential" else float(t.sum())
    assert cost.compiled_scan_time(sched, blocks, workers=1, model=m) == pytest.approx(work)
    assert cost.compiled_scan_time(sched, blocks, workers=2, batch=3, model=m) == pytest.approx(3 * (work / 2 + depth))
    assert sum(int(np.sum(i == 0)) for i, _, _ in sched.intervals()) == n - 1  # one thin op per prefix


def test_predict_uses_the_compiled_costs_only_where_the_kernel_runs():
    s = build("sklansky", 200)
    m = cost.CostModel(compiled_ops=COMPILED)
    compiled = cost.compiled_scan_time(s, 8, workers=2, model=m)
    assert cost.predict(s, 8, backend="threads", workers=2, model=m, kernels="numba") == pytest.approx(compiled)
    numpy_way = cost.predict(s, 8, backend="threads", workers=2, model=m)
    assert numpy_way != pytest.approx(compiled)
    assert cost.predict(s, 8, backend="threads", workers=2, model=m, kernels="numpy") == numpy_way
    assert cost.predict(s, 8, backend="ray", workers=2, model=m, kernels="numba") == \
        cost.predict(s, 8, backend="ray", workers=2, model=m)  # Ray runs the numpy tasks
    plain = cost.CostModel()  # not calibrated for the compiled kernel: the numpy costs stand in
    assert cost.predict(s, 8, backend="threads", workers=2, model=plain, kernels="numba") == \
        cost.predict(s, 8, backend="threads", workers=2, model=plain)


def test_calibrated_compiled_op_table_layout():
    pytest.importorskip("numba")
    from chainprod.calibrate import _compiled_op_rates

    tab = _compiled_op_rates(1, widths=(2, 8))
    assert set(tab) == {"pos", "mm", "pos_ew", "ew"}
    for name, t in tab.items():
        assert t["w"] == [2, 8] and len(t["t"]) == 2 and 0 < t["t"][0] <= t["t"][1], name
    m = cost.CostModel(compiled_ops=tab)
    assert cost.compiled_scan_time(build("brent_kung", 50), 4, model=m) > 0
