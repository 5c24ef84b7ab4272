"""``benchmarks/device_check.py``: its ``--quick`` mode runs to the end, says what it timed and checks its results.

The script runs in a subprocess, as a user runs it: exit status, the no-GPU
line, the CSV's columns, every measured row within float64 rounding of its
reference (the CPU's compiled backprop), and skipped rows listed with a
reason. Its budget estimates are checked on their own, without timing.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
COLUMNS = ["device", "problem", "L", "width", "batch", "method", "role", "backend", "workers", "repeats",
           "seconds", "speedup", "max_rel_err", "matched", "checked_against", "status"]
NO_GPU = "no GPU present (torch.cuda.is_available() is False): timing the CPU rows only"


def run_script(tmp_path, *args):
    out = tmp_path / "device_check.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        return proc.stdout, reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    # a small budget: the rows that fit run (more on a quiet machine), the rest are listed as skipped
    return run_script(tmp_path_factory.mktemp("quick"), "--quick", "--budget", "12")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_the_table_and_the_csv(quick):
    stdout, fields, rows = quick
    assert fields == COLUMNS
    assert rows, "the CSV has no rows"
    assert "device" in stdout and "max_rel_err" in stdout, "no table printed"
    if not torch.cuda.is_available():
        assert NO_GPU in stdout
        assert {r["device"] for r in rows} <= {"cpu", "torch-cpu"}


def test_every_measured_row_matches_its_reference(quick):
    _, _, rows = quick
    failed = [(r["device"], r["problem"], r["method"], r["status"]) for r in rows if r["status"].startswith("failed")]
    assert not failed, f"rows failed: {failed}"
    measured = [r for r in rows if r["status"] == "ok"]
    assert measured, "no row was measured"
    for r in measured:
        assert float(r["seconds"]) > 0 and int(r["repeats"]) >= 0  # 0: the warm-up call alone (budget spent)
        assert float(r["max_rel_err"]) < 1e-9, r
        assert r["matched"] == "yes", r
        assert float(r["speedup"]) > 0, r
    # the first row of a case is its reference: the CPU's compiled backprop, checked against itself
    first = measured[0]
    assert (first["device"], first["role"], first["checked_against"]) == ("cpu", "backprop", "itself (the reference)")
    assert {r["role"] for r in measured} >= {"backprop", "scan"}
    against = {r["checked_against"] for r in measured if r["device"] == "torch-cpu"}
    assert against <= {"cpu backprop (compiled)", "cpu sequential (compiled)", "cpu sequential (numpy loop)"}


def test_quick_run_covers_both_devices_and_the_scans(quick):
    _, _, rows = quick
    first = [r for r in rows if r["problem"] == rows[0]["problem"] and r["L"] == rows[0]["L"]]
    ran = {(r["device"], r["method"]) for r in first if r["status"] == "ok"}
    for device in ("cpu", "torch-cpu"):
        for method in ("sklansky", "brent_kung", "chunked", "hillis_steele"):
            assert (device, method) in ran, f"{device} {method} did not run on the first case: {sorted(ran)}"


def test_a_spent_budget_skips_every_row_and_says_so(script, tmp_path, capsys):
    out = tmp_path / "spent.csv"
    assert script.main(["--quick", "--budget", "0", "--problems", "diag_recurrence", "--devices", "cpu",
                        "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"].startswith("skipped: ") for r in rows)
    assert {r["status"] for r in rows if r["L"] == "16"} == {"skipped: the budget is spent"}
    assert {r["status"] for r in rows if r["L"] == "64"} == {"skipped: skipped at a smaller size"}
    assert f"{len(rows)} rows skipped" in stdout
    assert "cpu diag_recurrence L=16 w=16: sklansky: the budget is spent" in stdout


def test_unknown_problem_is_refused_with_the_valid_names(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--problems", "lstm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "lstm" in err and "diag_chain" in err


def test_estimates_scale_with_each_methods_work(script):
    budget = script.Budget(100.0)  # a per-row cap of 100 / 6 s
    key = ("cpu", "diag_chain", 16, "sklansky")
    assert budget.estimate(key, "sklansky", 1024) == 0.0  # no history: nothing to go on, the row runs
    budget.history[key] = (1024, 0.5)  # the row took 0.5 s at L = 1024
    # sklansky does L log2 L / 2 ops: 16x the layers, 14/10 the rounds
    assert budget.estimate(key, "sklansky", 16384) == pytest.approx(0.5 * 16 * 14 / 10)
    assert budget.why_skip(key, "sklansky", 16384) is None
    assert budget.why_skip(key, "sklansky", 2 ** 20).startswith("estimated")
    loop = ("cpu", "diag_chain", 16, "torch autograd")
    budget.history[loop] = (1024, 0.5)
    assert budget.estimate(loop, "loop", 4096) == pytest.approx(0.5 * 4)
    assert "L = 2048" in budget.why_skip(("cpu", "x", 16, "independent"), "independent", 4096)
    budget.dead[loop] = "failed"
    assert budget.why_skip(loop, "loop", 2048) == "failed at a smaller size"
