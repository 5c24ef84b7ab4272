"""The sweep: tidy results, every speedup against the best backprop, peers that compute the same gradient.

The sweeps here run on a cost model and an ``auto`` cache of their own
(:func:`isolated`), never the user's calibration or cached choices, so no
result depends on what an earlier run left on disk.
"""

import csv
import gzip
import importlib.util
import json
import signal

import numpy as np
import pytest

import chainprod as cp
from chainprod import _timing, _timing_steps, cost
from chainprod.bench import (
    BASELINES,
    FIELDS,
    PRESETS,
    TORCH_MODELS,
    TORCH_STRUCTURE,
    ResultsWriter,
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


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory):
    """This module's own cost model (default costs, counted as this machine's) and ``auto`` cache."""
    path = tmp_path_factory.mktemp("model") / "cost_model.json"
    cost.save_model(CostModel(machine={"fingerprint": _fingerprint(), "engines": ["threads"]}, source="test"),
                    str(path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAINPROD_COST_MODEL", str(path))
        mp.delenv("CHAINPROD_AUTO_CACHE", raising=False)
        cp.clear_caches()
        yield
    cp.clear_caches()


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


def test_auto_rows_carry_the_compiled_backprop_measured_beside_them(small_sweep):
    out, _, _ = small_sweep
    rows = read_results(str(out))
    autos = [r for r in rows if r["method"] == "auto"]
    assert autos and all(r["paired_backprop_backward_median"] > 0 and r["paired_backprop_total_median"] > 0
                         for r in autos)
    assert all(r["paired_backprop_total_median"] is None for r in rows if r["method"] != "auto")


def test_a_cheap_row_takes_more_repeats_and_an_expensive_one_the_sweeps():
    from chainprod.bench_rows import CHEAP_ROW_REPEATS, Job, cheap_row_repeats, measure_job

    chain = cp.diagonal_chain(16, 4, seed=0)
    x = np.ones((1, 4))
    prob = ("diagonal", 16, 4, 1, "float64")
    assert CHEAP_ROW_REPEATS > 3 and cheap_row_repeats(3, 1e-5) == CHEAP_ROW_REPEATS
    assert cheap_row_repeats(3, 1.0) == 3 and cheap_row_repeats(20, 1e-5) == 20  # never fewer than asked
    # the count tapers with the call: a row just past where eleven fit still takes more than the sweep's
    tapered = [cheap_row_repeats(3, c) for c in (0.010, 0.012, 0.02, 0.04)]
    assert tapered == sorted(tapered, reverse=True) and 3 < tapered[1] < CHEAP_ROW_REPEATS and tapered[-1] == 3
    cheap, _ = measure_job(Job(prob, "auto", "vectorized", 1, {}, 1e-4, call=1e-5), chain, x, 3)
    dear, _ = measure_job(Job(prob, "auto", "vectorized", 1, {}, 4.0, call=1.0), chain, x, 3)
    baseline, _ = measure_job(Job(prob, "backprop", "numba", 1, {}, 1e-4, call=1e-5), chain, x, 3)
    unsized, _ = measure_job(Job(prob, "backprop", "numba", 1, {}, 4.0), chain, x, 3)  # 1 s a call, from the estimate
    assert {r["status"] for r in (cheap, dear, baseline, unsized)} == {"ok"}
    assert [r["repeats"] for r in (cheap, dear, baseline, unsized)] == [CHEAP_ROW_REPEATS, 3, CHEAP_ROW_REPEATS, 3]
    assert cheap["paired_backprop_backward_median"] > 0 and cheap["backward_min"] <= cheap["backward_median"]


def test_the_sweeps_plan_gives_each_timed_row_its_predicted_call():
    from chainprod.bench_rows import cheap_row_repeats

    jobs, _ = plan_sweep(Sweep(depths=[16, 4096], widths=[4], structures=["dense"], backends=["vectorized"],
                               workers=[1], methods=["auto"], repeats=3))
    assert jobs and all(j.call is not None and j.call > 0 for j in jobs if j.problem[0] != "torch-mlp")
    for j in jobs:
        if j.call is not None and j.method in ("auto", "backprop"):
            # the ETA counts the repeats the row will take, and a warm-up
            assert j.estimate == pytest.approx(j.call * (cheap_row_repeats(3, j.call) + 1))


def test_a_paired_timing_interleaves_its_repeats_with_the_compiled_backprops(monkeypatch):
    """Each repeat of the row is followed by one of the backprop: both see the same load."""
    calls = []
    real = _timing.backward
    monkeypatch.setattr(_timing, "backward", lambda *a, method, **k: calls.append(method) or real(*a, method=method,
                                                                                                   **k))
    chain = cp.diagonal_chain(40, 4, seed=0)
    timing = _timing.measure_chainprod(chain, np.ones((1, 4)), method="auto", repeats=3, paired=True)
    backprop = timing.paired
    assert len(timing.backward) == len(backprop.backward) == 3 and len(timing.total) == len(backprop.total) == 3
    assert min(timing.backward + backprop.backward) > 0
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    assert set(calls) == {"auto", "backprop"} and switches >= 2 * 3 - 1  # warm-ups, then alternating repeats


def test_auto_check_takes_the_compiled_backprop_from_its_measurement_beside_the_row():
    from chainprod.report_checks import auto_check, reference

    prob = {"structure": "dense", "depth": 64, "width": 4, "batch": 1, "dtype": "float64", "status": "ok"}

    def auto(paired, best="backprop", best_t=1.0):
        return {**prob, "method": "auto", "backend": "threads", "workers": 2, "backward_median": 1.3,
                "backward_iqr": 0.0, "total_median": 2.0, "total_iqr": 0.0, "best_backprop_backward": best,
                "best_backprop_backward_median": best_t, "best_backprop_total": best,
                "best_backprop_total_median": 2.0, "paired_backprop_backward_median": paired,
                "paired_backprop_total_median": None}

    loaded, quiet, missing = auto(1.25), auto(1.0), auto(None)
    assert reference(loaded, "backward") == 1.25 and reference(missing, "backward") == 1.0
    assert reference(loaded, "total") == 2.0  # nothing re-measured end to end: the best as measured
    # another baseline was best: the compiled one beside the row counts only where it is faster still
    assert reference(auto(1.25, "torch", 1.1), "backward") == 1.1
    assert reference(auto(0.9, "torch", 1.1), "backward") == 0.9
    # JAX's backward is its gradient call less its forward call, no call of its own: a backward call is held
    # to the compiled backprop's call beside it, and to JAX end to end (both one call)
    assert reference(auto(1.25, "jax", 1.1), "backward") == 1.25
    assert reference(auto(1.25, "jax", 1.1), "total") == 2.0
    assert reference(auto(None, "jax", 1.1), "backward") == 1.1  # nothing measured beside it: as measured
    chk = auto_check([loaded, quiet, missing])
    assert chk["checked"] == 3
    # 1.3 against 1.25 is within 10%; against 1.0 it is not
    assert [v["row"]["paired_backprop_backward_median"] for v in chk["violations"]] == [1.0, None]
    assert all(list(v["ratios"]) == ["backward"] for v in chk["violations"])
    assert [v["against"] for v in chk["violations"]] == [{"backward": "backprop"}] * 2
    # a row slower than its compiled backprop beside it but not than JAX's estimate is flagged, named so
    (v,) = auto_check([auto(1.0, "jax", 1.25)])["violations"]
    assert v["against"] == {"backward": "backprop"} and v["ratios"] == {"backward": 1.3}


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
    older = {k: v for k, v in _fingerprint().items() if k != "cost model format"}  # saved before formats existed
    status = calibration_status(CostModel(machine={"fingerprint": older}, source="test"))
    assert f"cost model format None -> {_fingerprint()['cost model format']}" in status


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


def test_every_row_on_this_machine_is_measured_before_the_cluster_rows(sharded_sweep):
    """An idle cluster slows the rows beside it: the sweep measures the local rows of every problem first."""
    from chainprod.bench_rows import cluster_engine

    out, _, _ = sharded_sweep
    assert [cluster_engine(b) for b in ("ray", "dask-sharded", "threads", "numba")] == ["ray", "dask", None, None]
    on_cluster = [cluster_engine(r["backend"]) is not None for r in read_results(str(out))]
    assert True in on_cluster and False in on_cluster
    assert on_cluster == sorted(on_cluster)  # the local rows (False) first, of both problems


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


# -- the batch axis ----------------------------------------------------------------------------------
def test_the_default_sweep_has_batch_1_and_64_and_the_torch_models():
    assert PRESETS["default"].batches == [1, 64] and PRESETS["default"].torch_models == list(TORCH_MODELS)
    assert 1 in PRESETS["quick"].batches and 64 in PRESETS["quick"].batches
    assert len(PRESETS["quick"].torch_models) == 1  # --quick keeps the section tiny
    assert Sweep().torch_models == []  # a Sweep measures what it lists


def test_deep_batched_wide_problems_are_skipped_with_the_reason():
    sweep = Sweep(depths=[16, 1024], widths=[8], backends=["vectorized"], baselines=["backprop"],
                  structures=["diagonal"], batches=[1, 64], max_activations=2**16)
    jobs, skipped = plan_sweep(sweep)
    assert sorted({j.problem[1:4] for j in jobs}) == [(16, 8, 1), (16, 8, 64), (1024, 8, 1)]
    assert skipped == [{"problem": ["diagonal", 1024, 8, 64, "float64"],
                        "reason": "L x N x w = 524,288 activations > max_activations (65,536)"}]


def test_every_batch_is_a_problem_of_its_own(tmp_path):
    sweep = Sweep(depths=[16], widths=[4], workers=[2], backends=["threads"], methods=["auto"],
                  baselines=["backprop"], structures=["dense"], batches=[1, 3], repeats=1)
    meta = run_sweep(sweep, str(tmp_path), progress=False, command="test", log=lambda *a: None)
    rows = read_results(str(tmp_path))
    assert sorted((r["batch"], r["method"]) for r in rows) == [(1, "auto"), (1, "backprop"), (3, "auto"),
                                                              (3, "backprop")]
    for N in (1, 3):  # each batch against its own baseline
        bp = next(r for r in rows if r["batch"] == N and r["method"] == "backprop")
        auto = next(r for r in rows if r["batch"] == N and r["method"] == "auto")
        assert auto["best_backprop_backward_median"] == bp["backward_median"]
    assert json.loads(open(meta["json"]).read())["sweep"]["batches"] == [1, 3]
    assert all("/N=1/" in k or "/N=3/" in k for k in read_traces(str(tmp_path)))


# -- the torch-models section ------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE["torch"], reason="needs torch")
def test_torch_models_rows_each_say_their_baseline(tmp_path):
    sweep = Sweep(depths=[], torch_models=[(8, 3, 4, "float32")], workers=[1, 2], repeats=1)
    lines = []
    run_sweep(sweep, str(tmp_path), progress="lines", command="test", log=lines.append)
    rows = read_results(str(tmp_path))
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {r["structure"] for r in rows} == {TORCH_STRUCTURE}
    got = sorted((r["method"], r["backend"], r["workers"]) for r in rows if r["method"] != "jax")
    assert got == sorted((m, b, P) for m, b in [("torch", "torch"), ("blas", "numpy"), ("torch_backward", "numba"),
                                                ("value_and_grad", "numba"), ("value_and_grad", "numpy")]
                         for P in (1, 2))
    assert sum(r["method"] == "jax" for r in rows) == (1 if HAVE["jax"] else 0)
    for r in rows:
        assert r["note"] and r["schedule"] and r["total_median"] > 0 and r["repeats"] >= 1
        best = [b for b in rows if b["method"] == r["best_backprop_total"]
                and (b["method"] == "jax" or b["workers"] == r["workers"])]
        assert r["best_backprop_total"] in ("torch", "jax") and best  # a peer, never the BLAS floor
        assert r["speedup_total"] == pytest.approx(r["best_backprop_total_median"] / r["total_median"])
    tb = [r for r in rows if r["method"] == "torch_backward"]
    assert all(r["forward_median"] is None and r["backward_median"] is None for r in tb)  # one call, end to end
    assert any(line.startswith("[1/1] torch MLP w=8 depth=3 N=4 float32") for line in lines)


@pytest.mark.skipif(not HAVE["torch"], reason="needs torch")
def test_torch_mlp_is_what_torch_users_write():
    from chainprod.bench_rows import torch_mlp

    model = torch_mlp(16, 3, "float64")
    assert [type(m).__name__ for m in model] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    chain = cp.from_torch(model)
    assert len(chain) == 3 and chain.dtype == np.float64 and chain.layers[-1].activation == "identity"


@pytest.mark.skipif(not HAVE["torch"], reason="needs torch")
@pytest.mark.parametrize("method", ["torch", "torch_backward"])
def test_torch_rows_time_steps_from_cleared_gradients(method):
    """Each timed step of torch and of cp.torch_backward starts from .grad = None, as after zero_grad().

    A step into existing gradients adds to them in place (one more pass over every parameter): the two
    rows would then time different work. After the row, .grad holds one step's gradient, not a sum of
    the warm-up and timed steps'.
    """
    import torch

    from chainprod.bench_rows import TorchProblem, torch_timing

    prob = TorchProblem.build(8, 3, 4, "float64")
    t, _, _ = torch_timing(method, "numba", 1, prob, repeats=3)
    assert len(t.total) == 3
    got = [p.grad.clone() for p in prob.model.parameters()]
    prob.model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(prob.model(prob.xt), prob.yt).backward()
    for g, p in zip(got, prob.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_a_torch_row_takes_more_repeats_where_its_budget_allows():
    from chainprod.bench_rows import CHEAP_ROW_REPEATS, TorchProblem, torch_timing

    prob = TorchProblem.build(8, 3, 4, "float64")
    assert CHEAP_ROW_REPEATS > 3
    assert len(torch_timing("torch_backward", "numba", 1, prob, repeats=3, budget=60.0)[0].total) == CHEAP_ROW_REPEATS
    assert len(torch_timing("torch_backward", "numba", 1, prob, repeats=3, budget=1e-9)[0].total) == 1
    assert len(torch_timing("torch_backward", "numba", 1, prob, repeats=3)[0].total) == 3  # no budget: as asked


def test_the_blas_floor_needs_dense_layers():
    with pytest.raises(ValueError, match="Dense layers"):
        _timing_steps.measure_matmuls(cp.diagonal_chain(3, 4), np.ones((2, 4)))
    t = _timing_steps.measure_matmuls(cp.mlp([4, 5, 3]), np.ones((2, 4)), repeats=2)
    assert len(t.forward) == len(t.backward) == 2


# -- the report: where chainprod loses, per-call rows -------------------------------------------------
def _row(method, backend, workers, backward, total, structure="dense", iqr=0.0, schedule="backprop"):
    return {"structure": structure, "depth": 64, "width": 8, "batch": 1, "dtype": "float64", "method": method,
            "backend": backend, "workers": workers, "status": "ok", "schedule": schedule, "backward_median": backward,
            "total_median": total, "backward_iqr": iqr, "total_iqr": iqr, "forward_median": total - backward}


def test_losses_name_every_slower_chainprod_row_and_its_winner():
    from chainprod.report import loss_table, losses

    rows = [_row("backprop", "numba", 1, 1.0, 2.0), _row("backprop-numpy", "numpy", 1, 3.0, 5.0),
            _row("jax", "jax", 1, 2.0, 1.5), _row("torch", "torch", 1, 9.0, 20.0),
            _row("auto", "threads", 2, 1.5, 2.5, schedule="sklansky"), _row("auto", "vectorized", 1, 0.9, 1.4)]
    found = {(e["row"]["method"], e["row"]["backend"]): e for e in losses(rows)}
    # compiled backprop: slower than JAX end to end only (it is never compared with itself or the numpy loop)
    assert set(found[("backprop", "numba")]) == {"row", "total"}
    ratio, winner, beyond = found[("backprop", "numba")]["total"]
    assert ratio == pytest.approx(2.0 / 1.5) and winner["method"] == "jax" and beyond
    assert found[("backprop-numpy", "numpy")]["backward"][1]["method"] == "jax"  # peers only
    ratio, winner, _ = found[("auto", "threads")]["backward"]  # a scan row meets every baseline: the fastest wins
    assert ratio == pytest.approx(1.5) and winner["method"] == "backprop"
    assert ("auto", "vectorized") not in found and ("jax", "jax") not in found and ("torch", "torch") not in found
    table = loss_table(rows)
    assert "| dense L=64 w=8 | auto on threads P=2 (sklansky) | 1.50x backprop (numba) (1.5e+03 vs 1e+03 ms)" in table


def test_torch_model_losses_compare_at_the_same_thread_count_and_never_with_the_floor():
    from chainprod.report import losses, torch_model_table

    t = TORCH_STRUCTURE
    rows = [_row("torch", "torch", 1, 1.0, 2.0, t), _row("torch", "torch", 2, 0.6, 1.0, t),
            _row("blas", "numpy", 1, 0.1, 0.2, t), _row("value_and_grad", "numba", 1, 0.8, 1.5, t),
            _row("value_and_grad", "numba", 2, 0.8, 1.5, t)]
    lost = {e["row"]["workers"]: e for e in losses(rows)}
    assert list(lost) == [2]  # P=1 beats torch at P=1 (faster torch at P=2 and the floor do not count)
    assert lost[2]["total"][0] == pytest.approx(1.5) and lost[2]["total"][1]["workers"] == 2
    table = torch_model_table(rows)
    assert "| torch MLP w=8 depth=64 N=1 float64 | 1 | 2e+03 |" in table and "(0.75x)" in table


def test_per_call_rows_are_labelled_as_a_clusters_latency(tmp_path):
    from chainprod.report import PER_CALL_NOTE, sharded_lines, summary_lines, write_report

    rows = [_row("backprop", "numba", 1, 1.0, 2.0), _row("auto", "ray", 2, 30.0, 31.0, schedule="sequential"),
            _row("auto", "ray", 1, 3.0, 4.0, schedule="backprop (auto, ran locally)"),
            {**_row("auto", "ray-sharded", 2, 6.0, 8.0), "bytes_moved": 328, "measured_rounds": 1}]
    compare_to_best_backprop(rows)
    text = "\n".join(summary_lines(rows))
    assert "auto on ray P=2 (sequential) per call: a cluster's per-call latency" in text
    assert "auto on ray P=1 (ran backprop locally: the cluster could not win)" in text
    assert "auto on ray P=1 (ran backprop locally: the cluster could not win) per call" not in text
    (line,) = sharded_lines(rows)
    assert "Per call on ray P=2 (a cluster's per-call latency" in line and "3.1e+04 ms end to end" in line
    report = open(write_report(str(tmp_path), rows, {})).read()
    assert PER_CALL_NOTE in report


def test_a_ctrl_c_held_during_a_write_still_counts_the_row(tmp_path, monkeypatch):
    w = ResultsWriter(str(tmp_path))
    row = dict.fromkeys(FIELDS, "")
    real = w._writer.writerow

    def writerow(r):  # Ctrl-C arrives while the row is being written: held, raised when the write is done
        real(r)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(w._writer, "writerow", writerow)
    # Python's own Ctrl-C handler outside the held block, whatever an earlier test or engine installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            w.write(row)
    finally:
        signal.signal(signal.SIGINT, previous)
    w.close({})
    assert len(w.rows) == len(read_results(str(tmp_path))) == 1


def test_a_thread_limit_entered_first_in_a_process_reaches_numba_and_every_blas():
    """Entered before any compiled call, the limit must still hold numba and the BLAS its kernels load."""
    import subprocess
    import sys

    pytest.importorskip("numba")
    pytest.importorskip("threadpoolctl")
    code = ("import numpy as np\n"
            "from chainprod._timing_steps import thread_limit\n"
            "from threadpoolctl import threadpool_info\n"
            "with thread_limit(1):\n"
            "    import numba\n"
            "    blas = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
            "    print(numba.get_num_threads(), len(blas), max(blas))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    numba_threads, libraries, most = map(int, out.stdout.split())
    assert numba_threads == 1 and most == 1, out.stdout + out.stderr
    assert libraries >= 1


def test_a_sweep_with_torch_rows_loads_torch_before_numba_starts_its_threads(tmp_path):
    """A sweep whose chain rows start numba's threads before its torch rows has torch loaded by then.

    numba's ``omp`` layer started before torch loads made torch's two-thread steps 8x slower
    (``_timing_steps.load_torch_first``). The first start of numba's threads is watched in a fresh process.
    """
    import subprocess
    import sys

    pytest.importorskip("torch")
    pytest.importorskip("numba")
    code = ("import sys\n"
            "import numba.np.ufunc.parallel as par\n"
            "seen, launch = [], par._launch_threads\n"
            "def watch():\n"
            "    seen.append('torch' in sys.modules)\n"
            "    launch()\n"
            "par._launch_threads = watch\n"
            "from chainprod.bench import Sweep, run_sweep\n"
            "sweep = Sweep(depths=[16], widths=[8], workers=[2], backends=['threads'], structures=['dense'],\n"
            "              baselines=['backprop'], torch_models=[(8, 2, 4, 'float32')], repeats=1)\n"
            "run_sweep(sweep, sys.argv[1], progress='none', log=lambda *a: None)\n"
            "print(seen[:1])\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[True]"], out.stdout
