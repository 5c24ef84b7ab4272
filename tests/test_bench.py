"""The sweep: tidy results, every speedup against the best backprop, peers that compute the same gradient."""

import csv
import gzip
import importlib.util
import json

import numpy as np
import pytest

import chainprod as cp
from chainprod import _timing
from chainprod.bench import (
    BASELINES,
    FIELDS,
    Sweep,
    compare_to_best_backprop,
    plan_sweep,
    problems,
    read_results,
    read_traces,
    run_sweep,
)
from chainprod.calibrate import _fingerprint, calibration_status
from chainprod.cost import CostModel

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("jax", "torch", "pandas")}


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    sweep = Sweep(depths=[16, 64], widths=[4], workers=[1, 2], backends=["vectorized", "threads", "nosuch"],
                  methods=["auto", "sklansky"], structures=["dense", "diagonal"], repeats=2)
    lines = []
    meta = run_sweep(sweep, str(out), progress="lines", command="test", log=lines.append)
    return out, meta, lines


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_problem_has_its_baselines_and_scans(small_sweep):
    out, meta, _ = small_sweep
    rows = _rows(out)
    assert rows and list(rows[0]) == FIELDS
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    probs = {(r["structure"], r["depth"], r["width"]) for r in rows}
    assert len(probs) == 4
    expected = {"backprop"} | {b for b in ("jax", "torch") if HAVE[b]}
    if len(_timing.backprop_kernels()) > 1:
        expected.add("backprop-numpy")
    for p in probs:
        methods = {r["method"] for r in rows if (r["structure"], r["depth"], r["width"]) == p}
        assert expected <= methods and {"auto", "sklansky"} <= methods
    # threads P=1, P=2 and vectorized, for each of the two scan methods
    assert sum(r["method"] == "sklansky" for r in rows) == 4 * 3


def test_speedups_are_against_the_best_backprop(small_sweep):
    out, _, _ = small_sweep
    rows = read_results(str(out))
    for r in rows:
        for metric in ("backward", "total"):
            best = r[f"best_backprop_{metric}"]
            assert best in BASELINES
            assert r[f"speedup_{metric}"] == pytest.approx(r[f"best_backprop_{metric}_median"] / r[f"{metric}_median"])
            if r["method"] in BASELINES:
                assert r[f"speedup_{metric}"] <= 1 + 1e-12  # no baseline beats the best one
            if r["method"] == best:
                assert r[f"speedup_{metric}"] == 1
        assert r["forward_median"] > 0 and r["total_median"] > 0
        assert r["backward_min"] <= r["backward_median"] <= r["backward_max"]


def test_scan_rows_say_what_ran(small_sweep):
    out, _, _ = small_sweep
    rows = read_results(str(out))
    scans = [r for r in rows if r["method"] not in BASELINES and not r["schedule"].startswith("backprop")]
    assert scans
    assert all(r["measured_rounds"] >= 1 and r["peak_concurrency"] >= 1 for r in scans)
    assert all(r["flops"] > 0 and r["brent_bound"] > 0 and r["predicted_total"] > 0 for r in scans)
    # auto rows where the model chose backprop itself are labelled so
    assert all(r["method"] == "auto" for r in rows if r["schedule"] == "backprop (auto)")
    assert {r["schedule"] for r in rows if r["method"] == "torch"} <= {"autograd, eager"}


def test_results_json_holds_no_traces_and_the_trace_file_does(small_sweep):
    out, meta, _ = small_sweep
    data = json.loads((out / "results.json").read_text())
    assert "traces" not in data and not data["interrupted"]
    assert any(s.get("backend") == "nosuch" for s in data["skipped"])
    assert data["command"] == "test" and "numpy" in data["versions"] and data["machine"]["cpus"]
    with gzip.open(out / "traces.json.gz", "rt") as f:
        traces = json.load(f)
    assert traces == read_traces(str(out)) and traces
    key = next(iter(traces))
    assert "/threads/P=2/" in key and traces[key]["events"][0].keys() >= {"round", "worker", "start", "end"}


def test_one_line_per_finished_problem(small_sweep):
    _, _, lines = small_sweep
    done = [line for line in lines if line.startswith("[")]
    assert len(done) == 4 and done[-1].startswith("[4/4]") and "vs best backprop" in done[-1]


def test_read_back(small_sweep):
    out, _, _ = small_sweep
    rows = read_results(str(out))
    assert isinstance(rows[0]["depth"], int) and isinstance(rows[0]["backward_median"], float)
    if HAVE["pandas"]:
        import pandas as pd

        df = pd.read_csv(out / "results.csv")
        assert set(FIELDS) <= set(df.columns) and len(df) == len(rows)
        pd.read_json(out / "results.json", typ="series")


def test_problems_order_and_product():
    s = Sweep(depths=[8, 64], widths=[2, 4], structures=["dense"], batches=[1, 2], dtypes=["float64"])
    ps = problems(s)
    assert len(ps) == 8 and ps[0][1] == 8


def test_backprop_as_a_method_is_a_baseline():
    s = Sweep(methods=["backprop", "auto"], baselines=["torch"])
    assert s.methods == ["auto"] and s.baselines[0] == "backprop"
    jobs, _ = plan_sweep(Sweep(depths=[16], widths=[4], structures=["dense"], backends=["vectorized"],
                               baselines=["backprop"]))
    assert [(j.method, j.baseline) for j in jobs] == [("backprop", True), ("auto", False)]
    with pytest.raises(ValueError, match="valid baselines"):
        plan_sweep(Sweep(baselines=["nosuch"]))


def test_compare_picks_the_fastest_baseline_per_metric():
    rows = [{"method": "backprop", "status": "ok", "backward_median": 2.0, "total_median": 3.0},
            {"method": "jax", "status": "ok", "backward_median": 1.0, "total_median": 4.0},
            {"method": "auto", "status": "ok", "backward_median": 0.5, "total_median": 6.0}]
    best = compare_to_best_backprop(rows)
    assert best == {"backward": ("jax", 1.0), "total": ("backprop", 3.0)}
    assert rows[2]["speedup_backward"] == 2.0 and rows[2]["speedup_total"] == 0.5
    assert rows[0]["speedup_backward"] == 0.5 and rows[0]["speedup_total"] == 1.0


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_peers_compute_the_same_gradient(structure):
    chain = cp.mlp([4] * 6 + [1]) if structure == "dense" else cp.diagonal_chain(5, 4, activation="tanh")
    x = np.random.default_rng(0).standard_normal((3, 4))
    ref = cp.grad(chain, x, method="backprop")
    if HAVE["jax"]:
        import jax

        loss, params = _timing.jax_model(chain)
        A, B, Wo, bo = jax.grad(loss)(params, x)
        np.testing.assert_allclose(np.asarray(A), np.stack([g[0] for g in ref[:-1]]), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(B), np.stack([g[1] for g in ref[:-1]]), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(Wo), ref[-1][0], rtol=1e-10)
    if HAVE["torch"]:
        import torch

        loss_fn, tensors = _timing.torch_model(chain)
        loss_fn(torch.from_numpy(x)).backward()
        for ts, g in zip(tensors, ref):
            for t, gp in zip(ts, g):
                np.testing.assert_allclose(t.grad.numpy(), gp, rtol=1e-10)


def test_jax_peer_refuses_a_mixed_chain():
    chain = cp.Chain([cp.Dense(np.eye(3), np.zeros(3), "tanh"), cp.Dense(np.eye(3), np.zeros(3), "relu"),
                      cp.Dense(np.ones((1, 3)), np.zeros(1))])
    with pytest.raises(ValueError, match="uniform body; layer 1"):
        _timing._uniform_body(chain)


def test_timing_helpers():
    s = _timing.summarize([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["iqr"] == pytest.approx(1.5)
    t = _timing.measure_chainprod(cp.mlp([3, 3, 1]), np.ones((1, 3)), repeats=2)
    assert len(t.forward) == len(t.backward) == 2 and t.total[0] == t.forward[0] + t.backward[0]
    assert set(_timing.backprop_kernels()) <= {"numba", "numpy"}
    assert "-core" in _timing.machine_label()


def test_calibration_status():
    assert calibration_status(CostModel()) == "no saved calibration"
    here = CostModel(machine={"fingerprint": _fingerprint(), "engines": ["threads"]}, source="test")
    assert calibration_status(here) is None and calibration_status(here, engines=("threads",)) is None
    assert calibration_status(here, engines=("threads", "ray")) == "the saved calibration did not time ray"
    elsewhere = CostModel(machine={"fingerprint": {**_fingerprint(), "hostname": "other-host"}}, source="test")
    assert "hostname 'other-host'" in calibration_status(elsewhere)
