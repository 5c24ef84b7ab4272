"""The chainprod command: every subcommand, in-process and as a console process; Ctrl-C keeps results.

No test here reads or writes the user's cache directory: every test runs
on a cost model and an ``auto`` cache of its own (default costs that count
as this machine's calibration, an empty cache), with chainprod's in-process
caches emptied, so none depends on what an earlier run (the main job, a
calibration, a previous test) left behind. Subprocesses inherit that.
"""

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

import chainprod as cp
from chainprod import cli, cost
from chainprod.bench import FIELDS, WAIT_ENV
from chainprod.calibrate import _fingerprint
from chainprod.cli import build_parser, main

SUBCOMMANDS = ["bench", "plot", "schedule", "simulate", "calibrate", "demo"]
#: a sweep of a few seconds: two depths of one small dense chain, batch 1, chainprod's own backprop as the only
#: baseline, no torch models; per depth 1 baseline + 2 methods x (vectorized, threads P=2) = 5 rows
TINY = ["--depths", "16,64", "--widths", "4", "--workers", "2", "--backends", "vectorized,threads",
        "--methods", "auto,sklansky", "--baselines", "backprop", "--structure", "dense", "--batches", "1",
        "--torch-models", "none", "--repeats", "1"]
TINY_ROWS = 10


@pytest.fixture(autouse=True)
def calibrated_here(tmp_path, monkeypatch):
    """A saved cost model that counts as this machine's calibration (default costs), so bench does not calibrate.

    Beside it (where ``auto`` keeps its choices) an empty ``auto`` cache;
    chainprod's in-process caches are emptied before and after.
    """
    path = tmp_path / "cost_model.json"
    here = {"fingerprint": _fingerprint(), "engines": ["threads"]}
    cost.save_model(cost.CostModel(machine=here, source="test: default costs"), str(path))
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(path))
    monkeypatch.delenv("CHAINPROD_AUTO_CACHE", raising=False)
    monkeypatch.delenv(WAIT_ENV, raising=False)
    cp.clear_caches()
    yield str(path)
    cp.clear_caches()


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_for_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: chainprod " + cmd in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "bench" in capsys.readouterr().out


def test_schedule_prints_and_draws(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["schedule", "sklansky", "16", "--validate", "--draw", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "rounds (depth D)        : 4" in out and "validated" in out
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "s.svg").exists()


def test_unknown_schedule_is_a_clear_error(capsys):
    assert main(["schedule", "nosuch", "8"]) == 2
    assert "valid methods" in capsys.readouterr().err


def test_demo(capsys):
    assert main(["demo", "--depth", "12", "--width", "4"]) == 0
    out = capsys.readouterr().out
    assert "relative difference vs backprop" in out and "Schedule 'sklansky'" in out


def test_simulate(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["simulate", "--workers", "1,4096", "--depths", "2^4,2^20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "crossover" in out and (tmp_path / "simulate_dense_w64.png").exists()


def test_parser_lists():
    a = build_parser().parse_args(["bench", "--depths", "2^10,64", "--backends", "ray,dask"])
    assert a.depths == [1024, 64] and a.backends == ["ray", "dask"]


def test_batches_and_torch_models_on_the_command_line(capsys):
    from chainprod.cli import _sweep_from_args

    a = build_parser().parse_args(["bench", "--batches", "1,64", "--torch-models", "256x8x128,32x256x16:float64"])
    sweep = _sweep_from_args(a)
    assert sweep.batches == [1, 64]
    assert sweep.torch_models == [(256, 8, 128, "float32"), (32, 256, 16, "float64")]
    assert _sweep_from_args(build_parser().parse_args(["bench", "--batch", "4"])).batches == [4]  # the old name
    assert _sweep_from_args(build_parser().parse_args(["bench", "--torch-models", "none"])).torch_models == []
    default = _sweep_from_args(build_parser().parse_args(["bench"]))
    assert default.batches == [1, 64] and len(default.torch_models) == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--torch-models", "256x8"])
    assert "expected WIDTHxDEPTHxBATCH[:DTYPE]" in capsys.readouterr().err


def test_bench_plot_and_report_via_subprocess(tmp_path, calibrated_here):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "chainprod.cli", "bench", *TINY, "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrat" not in r.stdout  # a calibration of this machine exists
    assert "auto check" in r.stdout and "report:" in r.stdout
    assert (out / "results.csv").exists() and (out / "traces.json.gz").exists()
    assert "traces" not in json.loads((out / "results.json").read_text())
    for name in ("speedup_vs_depth", "speedup_heatmap", "gantt", "predicted_vs_measured"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size < 200_000
    report = (out / "report.md").read_text()
    assert "chainprod bench --depths 16,64" in report and "| structure | L | w | N | dtype | backend | P |" in report
    assert "![speedup vs depth](plots/speedup_vs_depth.png)" in report and "## Findings" in report
    assert "## Where chainprod loses" in report and "## Torch models" not in report
    results_html = (out / "report.html").read_text().split("<h2>Results</h2>")[1]
    assert results_html.count("<tr>") == TINY_ROWS + 1  # the results table, with its header
    r = subprocess.run([sys.executable, "-m", "chainprod.cli", "plot", str(out), "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "speedup_heatmap.svg").exists()


def test_bench_quiet_prints_only_the_summary(tmp_path, calibrated_here, capsys):
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-plots", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{TINY_ROWS} of {TINY_ROWS} measurements ok")
    assert "measurements over" not in out and "[1/" not in out  # no plan line, no per-problem lines
    assert "auto check" in out


def test_bench_calibrates_first_without_a_calibration(tmp_path, monkeypatch, capsys):  # overrides calibrated_here
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(tmp_path / "none.json"))
    cost.load_model.cache_clear()
    calls = []
    monkeypatch.setattr(cli, "calibrate", lambda **kw: calls.append(kw))
    try:
        assert main(["bench", *TINY, "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    finally:
        cost.load_model.cache_clear()
    out = capsys.readouterr().out
    assert len(calls) == 1 and calls[0]["engines"] == ("threads",)
    assert "calibrating the cost model first (no saved calibration)" in out and "calibration took" in out
    assert "calibrated before the sweep" in (tmp_path / "r" / "report.md").read_text()


def test_interrupt_while_plotting_exits_130_and_keeps_results(tmp_path, calibrated_here, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "plot_results", interrupted)
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-progress"]) == 130
    out = capsys.readouterr().out
    assert "interrupted: partial results kept in" in out
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == TINY_ROWS
    assert "interrupted while drawing the figures" in (tmp_path / "report.md").read_text()


def test_ctrl_c_during_the_sweep_keeps_valid_partial_results(tmp_path):
    """A real SIGINT, sent at a known point: the sweep waits for it after 5 rows ($CHAINPROD_BENCH_WAIT_AFTER_ROWS).

    The sweep cannot run ahead of the signal (it waits), and the test waits
    for the sweep to say so, not for a time: the outcome is the same with
    warm or cold caches (numba's, auto's, a calibration) and on a fast or a
    loaded machine. 4 problems x 3 rows, cheapest first: the wait comes
    after the second problem's baseline and first scan row.
    """
    out = tmp_path / "r"
    args = [sys.executable, "-m", "chainprod.cli", "bench", "--depths", "16,64", "--widths", "4",
            "--backends", "vectorized", "--methods", "auto,sklansky", "--baselines", "backprop",
            "--structure", "dense,diagonal", "--batches", "1", "--torch-models", "none", "--repeats", "2",
            "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", WAIT_ENV: "5"})
    seen = []
    for line in proc.stderr:  # until the sweep says it waits (EOF if it ended without waiting: then the asserts say)
        seen.append(line)
        if "waiting for a signal" in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    stderr = "".join(seen) + stderr
    assert proc.returncode == 130, stderr
    assert "5 rows written; waiting for a signal" in stderr and "Traceback" not in stderr
    assert "partial results kept in" in stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 5  # exactly the rows before the signal, of 12
    assert all(len(r) == len(FIELDS) and None not in r.values() for r in rows)  # no half-written row
    assert [r["method"] for r in rows] == ["backprop", "auto", "sklansky", "backprop", "auto"]
    meta = json.loads((out / "results.json").read_text())
    assert meta["interrupted"] and meta["rows"] == len(rows)
    assert not (out / "plots").exists()
    assert "Interrupted" in (out / "report.md").read_text()


def test_wait_hook_refuses_a_bad_value(tmp_path, monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "soon")
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-plots", "--quiet"]) == 2


def test_open_prints_the_path_without_a_browser(tmp_path, calibrated_here, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-plots", "--quiet", "--open"]) == 0
    assert f"no browser here; open {tmp_path / 'report.html'}" in capsys.readouterr().out
