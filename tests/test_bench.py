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
from chainprod.testing import random_mats

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
    older = {k: v for k, v in _fingerprint().items() if k != "cost model format"}  # saved before format 2
    status = calibration_status(CostModel(machine={"fingerprint": older}, source="test"))
    assert "cost model format None -> 2" in status


# -- sharded training rows ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_sweep(tmp_path_factory):
    """A tiny real sweep with ray-sharded and dask-sharded rows, on the embedded clusters the suite shares."""
    pytest.importorskip("ray")
    pytest.importorskip("distributed")
    for name in ("ray", "dask"):  # started as tests/test_sharded.py starts them: kept for the other test files
        cp.suffix_products(random_mats(3, 2), method="sequential", backend=cp.get_executor(name),
                           workers=2)
    out = tmp_path_factory.mktemp("sharded")
    sweep = Sweep(depths=[16, 64], widths=[4], workers=[1, 2], backends=["vectorized", "ray-sharded", "dask-sharded"],
                  methods=["auto"], baselines=["backprop"], structures=["dense"], repeats=1)
    jobs, _ = plan_sweep(sweep)
    meta = run_sweep(sweep, str(out), progress=False, command="test", log=lambda *a: None)
    return out, meta, jobs


def test_sharded_rows_time_a_training_step(sharded_sweep):
    out, _, jobs = sharded_sweep
    assert [(j.backend, j.workers, j.problem[1]) for j in jobs if j.trace] == [("ray-sharded", 2, 64)]
    assert list(_rows(out)[0]) == FIELDS and "bytes_moved" in FIELDS
    rows = read_results(str(out))
    sharded = [r for r in rows if r["backend"].endswith("-sharded")]
    # one row per engine and depth, at P=2 only (a single shard is no scan over shards)
    assert sorted((r["backend"], r["depth"], r["workers"]) for r in sharded) == [
        ("dask-sharded", 16, 2), ("dask-sharded", 64, 2), ("ray-sharded", 16, 2), ("ray-sharded", 64, 2)]
    for r in sharded:
        assert r["status"] == "ok", r["status"]
        assert r["schedule"] == "backprop"  # at P=2 the scan over P-1 = 1 element is the pipeline
        assert r["bytes_moved"] > 0 and r["rounds"] == r["measured_rounds"] == 1
        assert 0 < r["forward_median"] < r["total_median"] and r["backward_median"] > 0
        assert r["speedup_backward"] == pytest.approx(r["best_backprop_backward_median"] / r["backward_median"])
        assert r["speedup_total"] == pytest.approx(r["best_backprop_total_median"] / r["total_median"])
        assert r["predicted_total"] is None  # the cost model does not time training steps


def test_one_sharded_step_is_traced(sharded_sweep):
    out, _, _ = sharded_sweep
    traces = read_traces(str(out))
    sharded = {k: v for k, v in traces.items() if v.get("kind") == "sharded"}
    assert list(sharded) == ["dense/L=64/w=4/N=1/float64/ray-sharded/P=2/auto"]
    tr = sharded[next(iter(sharded))]
    tasks = sorted(e["task"] for e in tr["events"])
    assert tasks == ["s0.backprop", "s0.forward", "s1.backprop", "s1.forward"]
    assert tr["bytes_moved"] > 0 and tr["total_seconds"] >= tr["forward_seconds"] > 0


def test_sharded_backends_are_planned_like_distributed_ones():
    sweep = Sweep(depths=[16, 4096], widths=[4], workers=[1, 2, 4], backends=["ray-sharded"], methods=["auto"],
                  baselines=["backprop"], structures=["dense"], max_distributed_depth=2048)
    jobs, _ = plan_sweep(sweep)
    assert sorted((j.problem[1], j.workers) for j in jobs if not j.baseline) == [(16, 2), (16, 4)]
    assert [j.workers for j in jobs if j.trace] == [4]
    assert "ray-sharded" in Sweep().backends and 2 in Sweep().workers


def test_sharded_rows_in_the_figures_and_the_report(sharded_sweep, tmp_path):
    pytest.importorskip("matplotlib")
    from chainprod import plots
    from chainprod.report import SHARDED_NOTE, summary_lines, write_report

    out, meta, _ = sharded_sweep
    paths = plots.plot_results(str(out), str(tmp_path), log=lambda p: None)
    gantt = [p for p in paths if "gantt_sharded" in p]
    assert sorted(p.rsplit(".", 1)[1] for p in gantt) == ["png", "svg"]
    assert all(500 < (tmp_path / p).stat().st_size < 200_000 for p in gantt)
    svg = open(next(p for p in gantt if p.endswith(".svg"))).read()
    assert "shard 1" in svg and "forward pass ends" in svg and "ray-sharded" in svg
    headline = open(tmp_path / "speedup_vs_depth.svg").read()
    assert "auto: ray-sharded P=2 (train step)" in headline and "auto: dask-sharded P=2 (train step)" in headline
    rows = read_results(str(out))
    lines = summary_lines(rows, meta)
    assert sum("one training step by auto on" in line for line in lines) == 2
    report = open(write_report(str(out), rows, meta)).read()
    assert SHARDED_NOTE in report and "| ray-sharded | 2 | auto | backprop |" in report


def test_the_sharded_flag_adds_the_sharded_backends():
    from chainprod.cli import _sweep_from_args, build_parser

    a = build_parser().parse_args(["bench", "--backends", "vectorized,ray-sharded", "--sharded"])
    assert _sweep_from_args(a).backends == ["vectorized", "ray-sharded", "dask-sharded"]
    a = build_parser().parse_args(["bench", "--quick"])
    assert not any(b.endswith("-sharded") for b in _sweep_from_args(a).backends)
