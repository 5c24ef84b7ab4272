"""The chainprod command: every subcommand, in-process and as a console process; Ctrl-C keeps results."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from chainprod import cli, cost
from chainprod.bench import FIELDS
from chainprod.calibrate import _fingerprint
from chainprod.cli import build_parser, main

SUBCOMMANDS = ["bench", "plot", "schedule", "simulate", "calibrate", "demo"]
#: a sweep of a few seconds: two depths of one small dense chain, chainprod's own backprop as the only baseline;
#: per depth 1 baseline + 2 methods x (vectorized, threads P=2) = 5 rows
TINY = ["--depths", "16,64", "--widths", "4", "--workers", "2", "--backends", "vectorized,threads",
        "--methods", "auto,sklansky", "--baselines", "backprop", "--structure", "dense", "--repeats", "1"]
TINY_ROWS = 10


@pytest.fixture
def calibrated_here(tmp_path, monkeypatch):
    """A saved cost model that counts as this machine's calibration (default costs), so bench does not calibrate."""
    path = tmp_path / "cost_model.json"
    here = {"fingerprint": _fingerprint(), "engines": ["threads"]}
    cost.save_model(cost.CostModel(machine=here, source="test: default costs"), str(path))
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(path))
    cost.load_model.cache_clear()
    yield str(path)
    cost.load_model.cache_clear()


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
    assert "chainprod bench --depths 16,64" in report and "| structure | L | w | backend | P |" in report
    assert "![speedup vs depth](plots/speedup_vs_depth.png)" in report and "## Findings" in report
    assert (out / "report.html").read_text().count("<tr>") == TINY_ROWS + 1  # the table, with its header
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


def test_bench_calibrates_first_without_a_calibration(tmp_path, monkeypatch, capsys):
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


def test_ctrl_c_during_the_sweep_keeps_valid_partial_results(tmp_path, calibrated_here):
    out = tmp_path / "r"
    depths = [2**k for k in range(4, 12)]
    args = [sys.executable, "-m", "chainprod.cli", "bench", "--depths", ",".join(map(str, depths)), "--widths", "4",
            "--backends", "vectorized", "--methods", "auto,sklansky", "--baselines", "backprop",
            "--structure", "dense,diagonal", "--repeats", "3", "--out", str(out)]
    total_rows = len(depths) * 2 * 3
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a few rows, then interrupt mid-sweep
        if (out / "results.csv").exists() and (out / "results.csv").read_text().count("\n") > 4:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "partial results kept in" in stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert 4 <= len(rows) < total_rows  # some, not all
    assert all(len(r) == len(FIELDS) and None not in r.values() for r in rows)  # no half-written row
    meta = json.loads((out / "results.json").read_text())
    assert meta["interrupted"] and meta["rows"] == len(rows)
    assert not (out / "plots").exists()


def test_open_prints_the_path_without_a_browser(tmp_path, calibrated_here, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-plots", "--quiet", "--open"]) == 0
    assert f"no browser here; open {tmp_path / 'report.html'}" in capsys.readouterr().out
