"""The sweep's sequences section: its plan, its peers' gradients, a tiny run through the CLI, and its report.

No test here depends on timing: the end-to-end run checks files and columns,
and the report's comparisons are checked on rows written by hand.
"""

import csv
import importlib.util

import numpy as np
import pytest

import chainprod as cp
from chainprod import bench_sequences as bs
from chainprod import cost
from chainprod.bench import PRESETS, Sweep, plan_sweep
from chainprod.calibrate import _fingerprint
from chainprod.cli import main
from chainprod.report import loss_table, losses
from chainprod.report_sequences import crossover_rows, sequence_section, slower_rows

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("jax", "torch", "matplotlib")}
TINY = [("rnn_tanh", 20, 4, 1, "float64"), ("gru", 20, 4, 2, "float64")]


@pytest.fixture(autouse=True)
def calibrated_here(tmp_path, monkeypatch):
    """A cost model of default costs that counts as this machine's, and empty caches (as tests/test_cli.py)."""
    path = tmp_path / "cost_model.json"
    cost.save_model(cost.CostModel(machine={"fingerprint": _fingerprint(), "engines": ["threads"]},
                                   source="test: default costs"), str(path))
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(path))
    monkeypatch.delenv("CHAINPROD_AUTO_CACHE", raising=False)
    cp.clear_caches()
    yield
    cp.clear_caches()


def _jobs(sweep):
    jobs, skipped = plan_sweep(sweep)
    return [j for j in jobs if bs.is_sequence(j.problem)], skipped


def test_the_section_plans_every_row_at_every_worker_count():
    jobs, skipped = _jobs(Sweep(depths=[], workers=[1, 2], sequences=TINY))
    assert {j.problem for j in jobs} == set(TINY)
    for prob in TINY:
        mine = [j for j in jobs if j.problem == prob]
        got = {(j.method, j.backend, j.workers) for j in mine}
        want = {("backprop", "numba", 1), ("backprop", "numba", 2), ("backprop-numpy", "numpy", 1),
                ("backprop-numpy", "numpy", 2), ("auto", "vectorized", 1), ("auto", "threads", 2),
                ("sklansky", "vectorized", 1), ("sklansky", "threads", 2)}
        if HAVE["torch"]:
            want |= {("torch", "torch", 1), ("torch", "torch", 2)}
        assert want <= got
        assert sum(j.method == "jax" for j in mine) == (1 if HAVE["jax"] else 0)  # XLA's pool: once
        refs = [j.reference for j in mine]
        assert refs == sorted(refs, reverse=True)  # the peers and references first, then auto and the scan
    assert not [s for s in skipped if "problem" in s]


def test_presets_default_small_grid_and_quick():
    assert PRESETS["default"].sequences == list(bs.SEQUENCES_DEFAULT)
    assert all(T * H * N <= 1000 * 20 * 16 for _, T, H, N, _ in PRESETS["default"].sequences)
    grid = PRESETS["sequences"]
    assert grid.depths == [] and {p[0] for p in grid.sequences} == {"rnn_tanh", "gru", "lstm", "diag_recurrence"}
    assert {p[1] for p in grid.sequences if p[0] == "diag_recurrence"} == {10**3, 10**4, 10**5, 10**6}
    assert {p[2] for p in grid.sequences} == {8, 20, 64} and {p[3] for p in grid.sequences} == {1, 16}
    assert len(PRESETS["quick"].sequences) == 1
    assert Sweep().sequences == []  # a Sweep measures what it lists
    assert not set(bs.SEQUENCE_CELLS) & set(cost.STRUCTURES)  # the structure column tells the sections apart
    assert not bs.is_sequence(("diagonal", 64, 8, 1, "float64")) and bs.is_sequence({"structure": "gru"})


def test_too_slow_or_too_big_scans_are_skipped_with_the_reason():
    big = ("lstm", 10_000, 64, 4, "float64")  # 10^4 Jacobians of 128 x 128, 4 samples: 5.2 GB
    slow = ("gru", 1000, 64, 16, "float64")
    jobs, skipped = _jobs(Sweep(depths=[], workers=[1], sequences=[big, slow], max_config_seconds=2.0))
    assert not [j for j in jobs if j.method == "sklansky"]
    why = {tuple(s["problem"])[:4]: s["reason"] for s in skipped if s.get("method") == "sklansky"}
    assert "GB" in why[big[:4]] and "predicted" in why[slow[:4]]
    assert [j for j in jobs if j.problem == big and j.method == "backprop"]  # the baseline always runs
    huge = ("diag_recurrence", 100_000, 64, 16, "float64")  # 0.8 GB per array of states: the whole problem is skipped
    jobs, skipped = _jobs(Sweep(depths=[], workers=[1], sequences=[huge]))
    assert not jobs and "GB per array" in next(s["reason"] for s in skipped if s.get("problem") == list(huge))


def test_missing_torch_and_jax_are_skipped_with_reasons(monkeypatch):
    monkeypatch.setattr(bs, "available", lambda name: name not in ("torch", "jax"))
    jobs, skipped = _jobs(Sweep(depths=[], workers=[1], sequences=TINY))
    assert not [j for j in jobs if j.method in ("torch", "jax")]
    reasons = {s.get("baseline"): s["reason"] for s in skipped}
    assert "not installed" in reasons["torch (sequences)"] and "not installed" in reasons["jax (sequences)"]


def test_the_diagonal_layer_has_a_torch_loop_only_up_to_its_cap():
    jobs, skipped = _jobs(Sweep(depths=[], workers=[1], sequences=[("diag_recurrence", 20_000, 4, 1, "float64")]))
    assert {j.method for j in jobs} >= {"backprop", "auto", "sklansky"}
    if HAVE["torch"]:
        assert any(s.get("method") == "torch" and "eager loop" in s["reason"] for s in skipped)


@pytest.mark.parametrize("cell", ["rnn_relu", "gru", "lstm", "diag_recurrence"])
def test_every_peer_computes_the_same_gradient(cell):
    prob = bs.SequenceProblem(cell, 7, 3, 2, "float64", seed=1)
    value, g = bs.sequence_step("backprop", "numba", 1, prob)()
    v_np, g_np = bs.sequence_step("backprop-numpy", "numpy", 1, prob)()
    v_sc, g_sc = bs.sequence_step("sklansky", "vectorized", 1, prob)()
    for other, v in ((g_np, v_np), (g_sc, v_sc)):
        assert v == pytest.approx(value, rel=1e-12)
        for k in g:
            np.testing.assert_allclose(other[k], g[k], rtol=1e-9, atol=1e-12)
    if HAVE["torch"]:
        assert bs.sequence_step("torch", "torch", 1, prob)() == pytest.approx(value, rel=1e-12)
        mod, _ = prob.torch()
        named = mod.items() if cell == "diag_recurrence" else mod.named_parameters()
        for k, p in named:
            np.testing.assert_allclose(p.grad.numpy(), g[k], rtol=1e-9, atol=1e-12)
    if HAVE["jax"]:
        v_jax, g_jax = bs.sequence_step("jax", "jax", 2, prob)()
        assert float(v_jax) == pytest.approx(value, rel=1e-12)
        for k in g:
            np.testing.assert_allclose(np.asarray(g_jax[k]), g[k], rtol=1e-9, atol=1e-12)


def test_parse_sequences():
    assert bs.parse_sequences("gru:100:8:4,lstm:10:2:1:float32") == [("gru", 100, 8, 4, "float64"),
                                                                      ("lstm", 10, 2, 1, "float32")]
    assert bs.parse_sequences("none") == [] and bs.parse_sequences("grid") == list(bs.SEQUENCES_GRID)
    for bad in ("gru:100:8", "cnn:10:2:1", "gru:10:0:1", "gru:10:2:1:float16"):
        with pytest.raises(Exception, match="CELL:T:HIDDEN:BATCH|cell must be"):
            bs.parse_sequences(bad)


@pytest.mark.skipif(not HAVE["matplotlib"], reason="matplotlib is not installed")
def test_a_tiny_sweep_through_the_cli_writes_rows_report_and_figure(tmp_path, capsys):
    spec = ",".join(f"{c}:{T}:{H}:{N}" for c, T, H, N, _ in TINY)
    assert main(["bench", "--preset", "sequences", "--sequences", spec, "--workers", "1,2", "--repeats", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert rows and all(r["status"] == "ok" for r in rows)
    assert {(r["structure"], int(r["depth"]), int(r["width"]), int(r["batch"])) for r in rows} == \
        {p[:4] for p in TINY}
    for r in rows:  # every row against the fastest backprop peer at its P
        assert r["best_backprop_total"] in bs.PEERS and float(r["speedup_total"]) > 0 and float(r["total_median"]) > 0
    report = (tmp_path / "report.md").read_text()
    assert "## Sequences" in report and "### Predicted crossover" in report
    assert "gru T=20 H=4 N=2" in report
    png = tmp_path / "plots" / "sequences.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "plots" / "sequences.svg").exists()
    assert not (tmp_path / "plots" / "speedup_vs_depth.png").exists()  # no rows of the sweep proper
    assert "sequences (a training step's gradient" in capsys.readouterr().out


def _row(method, P, ms, backend=None, cell="gru"):
    r = dict.fromkeys(cp.bench.FIELDS, "")
    r.update(structure=cell, depth=100, width=8, batch=4, dtype="float64", method=method, workers=P,
             backend=backend or {"backprop": "numba", "backprop-numpy": "numpy"}.get(method, method), status="ok",
             schedule=method, total_median=ms / 1e3, total_iqr=0.0)
    return r


def test_the_report_names_every_slower_row_against_the_peers_at_its_p():
    rows = [_row("backprop", 1, 1.0), _row("torch", 1, 0.5), _row("jax", 2, 0.8), _row("backprop", 2, 0.9),
            _row("torch", 2, 3.0), _row("auto", 2, 2.0, "threads"), _row("sklansky", 1, 0.2, "vectorized")]
    bs.compare_at_workers(rows)
    bp1, torch1, jax, bp2, _, auto2, scan1 = rows
    assert bp1["best_backprop_total"] == "torch" and bp1["speedup_total"] == pytest.approx(0.5)
    assert auto2["best_backprop_total"] == "jax" and auto2["speedup_total"] == pytest.approx(0.4)
    assert scan1["speedup_total"] == pytest.approx(2.5)
    said = "\n".join(slower_rows(rows))
    assert "gru T=100 H=8 N=4, P=1: chainprod BPTT (numba) took 1 ms, 2.00x the torch autograd" in said
    assert "P=2: cp auto took 2 ms, 2.50x the JAX" in said and "sklansky" not in said
    # the report's loss table compares at the same P: auto at P=2 never meets torch at P=1 (0.5 ms)
    found = {(e["row"]["method"], e["row"]["workers"]): e["total"][1]["method"] for e in losses(rows)}
    assert found[("auto", 2)] in ("jax", "backprop") and found[("backprop", 1)] == "torch"
    assert ("sklansky", 1) not in found
    assert "gru T=100 H=8 N=4" in loss_table(rows)
    section = "\n".join(sequence_section(rows, model=cost.CostModel()))
    assert "## Sequences" in section and "chainprod rows slower than the fastest backprop peer" in section


def test_the_crossover_is_the_simulators_smallest_winning_p():
    model = cost.CostModel()
    never = bs.crossover_workers("gru", 1000, 20, 1, 1e-9, model=model, max_log2_workers=6)
    assert never["P"] is None and never["best_P"] in [2 ** k for k in range(7)] and never["best_scan"] > 0
    at_once = bs.crossover_workers("gru", 1000, 20, 1, 1e6, model=model)
    assert at_once["P"] == 1
    c = bs.crossover_workers("lstm", 100_000, 64, 16, 1.0, model=model)
    assert c["basis"] == "estimated" and c["factor"] > 0
    if c["P"] is not None:  # the first P that wins, and the one before it does not
        assert c["scan"] < 1.0 and (c["P"] == 1 or c["factor"] * cost.simulate(
            100_001, 128, c["P"] // 2, batch=16, backend="threads", model=model)["scan"] >= 1.0)
    measured = bs.crossover_workers("gru", 1000, 20, 1, 1e-3, 0.5, model=model)
    assert measured["basis"] == "measured" and measured["factor"] == pytest.approx(0.5 / cost.simulate(
        1001, 20, 1, batch=1, backend="threads", methods=("sklansky",), model=model)["scan"])
    rows = [_row("backprop", 1, 1.0)]
    (r,) = crossover_rows(rows, model)
    assert r["S"] == 8 and r["bptt"] == pytest.approx(1e-3) and r["problem"] == "gru T=100 H=8 N=4"


def test_a_sequence_row_takes_more_repeats_where_its_budget_allows_its_pair_included():
    from chainprod.bench_rows import CHEAP_ROW_REPEATS

    prob = bs.SequenceProblem("rnn_tanh", 7, 3, 2, "float64", seed=1)
    many, _, _ = bs.sequence_timing("auto", "vectorized", 1, prob, repeats=3, budget=60.0, paired=True)
    assert len(many.total) == len(many.paired.total) == CHEAP_ROW_REPEATS > 3
    assert len(bs.sequence_timing("backprop", "numba", 1, prob, repeats=3, budget=1e-9)[0].total) == 1
    assert len(bs.sequence_timing("backprop", "numba", 1, prob, repeats=3)[0].total) == 3  # no budget: as asked
