"""The chainprod command: every subcommand, in-process and as a console process; Ctrl-C keeps results.

No test here reads or writes the user's cache directory: every test runs
on a cost model and an ``auto`` cache of its own (default costs that count
as this machine's calibration, an empty cache), with chainprod's in-process
caches emptied, so none depends on what an earlier run (the main job, a
calibration, a previous test) left behind. Subprocesses inherit that.
"""

import csv
import gc
import json
import os
import signal
import subprocess
import sys
import weakref
import xml.etree.ElementTree as ET

import pytest

import chainprod as cp
from chainprod import bench, cli, cost, plots
from chainprod.bench import BASELINES, FIELDS, SHARDED, WAIT_ENV
from chainprod.calibrate import _fingerprint
from chainprod.cli import build_parser, main
from chainprod.results import atomic_path

SUBCOMMANDS = ["bench", "plot", "schedule", "simulate", "calibrate", "demo"]
#: a sweep of a few seconds: two depths of one small dense chain, batch 1, chainprod's own backprop as the only
#: baseline, no torch models; per depth 1 baseline + 2 methods x (vectorized, threads P=2) = 5 rows
TINY = ["--depths", "16,64", "--widths", "4", "--workers", "2", "--backends", "vectorized,threads",
        "--methods", "auto,sklansky", "--baselines", "backprop", "--structure", "dense", "--batches", "1",
        "--torch-models", "none", "--sequences", "none", "--repeats", "1"]
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


# -- every option is checked before anything starts --------------------------------------------------------
def _refused(argv, capsys, monkeypatch=None):
    """Run ``chainprod ARGV`` in-process, expect argparse's refusal (exit 2), return its one-line message."""
    if monkeypatch is not None:  # nothing may start: neither a calibration nor a sweep
        monkeypatch.setattr(cli, "run_sweep", lambda *a, **kw: pytest.fail("the sweep started"))
        monkeypatch.setattr(cli, "calibrate", lambda **kw: pytest.fail("a calibration started"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: chainprod " + argv[0])
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"chainprod {argv[0]}: error: argument ")
    return last


def _valid_list(message):
    return message.split("; valid ", 1)[1].split(": ", 1)[1].split(", ")


@pytest.mark.parametrize("option, value, says", [
    ("--backends", "vectorized,bogus", "invalid backend 'bogus'"),
    ("--methods", "bogus", "invalid method 'bogus'"),
    ("--methods", "tree", "invalid method 'tree'"),  # a total product, no prefix for every layer
    ("--baselines", "backprop,nope", "invalid baseline 'nope'"),
    ("--structure", "dense,nope", "invalid structure 'nope'"),
    ("--dtype", "float16", "invalid dtype 'float16'"),
    ("--backends", ",", "no backend given"),
])
def test_bench_refuses_unknown_names_listing_the_valid_ones(option, value, says, capsys, monkeypatch, tmp_path):
    msg = _refused(["bench", option, value, "--out", str(tmp_path / "r")], capsys, monkeypatch)
    assert f"argument {option}: {says}; valid " in msg
    valid = {"--backends": [*cp.valid_backends(), *SHARDED], "--baselines": list(BASELINES),
             "--structure": list(cost.STRUCTURES), "--dtype": ["float32", "float64"]}.get(option)
    if option == "--methods":  # the registry's scans, with backprop and auto
        assert {"backprop", "auto", "sklansky", "brent_kung", "chunked"} <= set(_valid_list(msg))
        assert "tree" not in _valid_list(msg)
    else:
        assert _valid_list(msg) == valid
    assert not (tmp_path / "r").exists()  # refused before --out was even looked at


@pytest.mark.parametrize("argv, says", [
    (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["--batch", "0"], "argument --batches/--batch: must be >= 1, got 0"),
    (["--batches", "1,0"], "argument --batches/--batch: must be >= 1, got 0"),
    (["--widths", "0"], "argument --widths: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--repeats=-2"], "argument --repeats: must be >= 1, got -2"),
    (["--repeats", "two"], "argument --repeats: expected an integer, got 'two'"),
    (["--depths=-5"], "argument --depths: must be >= 2 (a chain of one layer has no product to scan), got -5"),
    (["--depths", "64,1"], "argument --depths: must be >= 2"),
    (["--depths", "2^-1"], "argument --depths: expected a comma list of integers"),
    (["--max-config-seconds", "0"], "argument --max-config-seconds: must be a positive finite number"),
    (["--max-activations", "nan"], "argument --max-activations: must be a positive finite number"),
])
def test_bench_refuses_bad_numbers(argv, says, capsys, monkeypatch, tmp_path):
    assert says in _refused(["bench", *argv, "--out", str(tmp_path)], capsys, monkeypatch)


@pytest.mark.parametrize("argv, says", [
    (["simulate", "--backend", "nope"], "argument --backend: invalid choice: 'nope' (choose from 'dask', 'ideal'"),
    (["simulate", "--workers", "0"], "argument --workers: must be >= 1"),
    (["simulate", "--depths", "1"], "argument --depths: must be >= 2"),
    (["simulate", "--batch", "0"], "argument --batch: must be >= 1"),
    (["calibrate", "--engines", "threads,nope"], "argument --engines: invalid engine 'nope'; valid engines: dask"),
    (["demo", "--depth", "1"], "argument --depth: must be >= 2"),
    (["demo", "--backend", "nope"], "argument --backend: invalid choice: 'nope'"),
    (["schedule", "sklansky", "0"], "argument L: must be >= 1, got 0"),
    (["schedule", "sklansky", "8", "--width", "-1"], "argument --width: must be >= 1, got -1"),
])
def test_other_commands_refuse_bad_options(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(cli, "calibrate", lambda **kw: pytest.fail("a calibration started"))
    assert says in _refused(argv, capsys)


def test_bench_refuses_an_unusable_out_up_front(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    msg = _refused(["bench", *TINY, "--out", str(a_file)], capsys, monkeypatch)
    assert msg.endswith(f"argument --out: {str(a_file)!r} is a file, not a directory")
    msg = _refused(["bench", *TINY, "--out", str(a_file / "r" / "s")], capsys, monkeypatch)
    assert msg.endswith(f"cannot create {str(a_file / 'r' / 's')!r}: {str(a_file)!r} is a file, not a directory")
    assert a_file.read_text() == "keep me"
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes where the mode forbids it: let the check see what a user sees
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **kw: False if str(p) == str(read_only) else real(p, m, **kw))
    msg = _refused(["bench", *TINY, "--out", str(read_only / "r")], capsys, monkeypatch)
    assert msg.endswith(f"argument --out: cannot write in {str(read_only)!r}: permission denied")
    assert _refused(["simulate", "--out", str(a_file)], capsys).endswith("is a file, not a directory")
    assert _refused(["calibrate", "--output", str(tmp_path)], capsys).endswith("is a directory; give a file name")


def test_a_refusal_from_the_console_is_one_line_and_exit_2(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for argv, says in ((["--backends", "bogus"], "argument --backends: invalid backend 'bogus'; valid backends: "),
                       (["--out", str(a_file / "r")], "argument --out: cannot create")):
        r = subprocess.run([sys.executable, "-m", "chainprod.cli", "bench", *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
            f"chainprod bench: error: {says}")


# -- Ctrl-C at every moment ---------------------------------------------------------------------------------
def _sigint_inside_a_callback(where):
    """Deliver SIGINT while a gc callback or a weakref finalizer runs (as JAX's and WeakSet's do, often).

    The handler runs inside the callback, so its KeyboardInterrupt is
    printed as "Exception ignored" and dropped: exactly the Ctrl-C that
    used to be lost.
    """
    fired = []

    def send(*_):
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    if where == "gc":
        gc.callbacks.append(send)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(send)
    else:
        class Thing:
            pass

        thing = Thing()
        weakref.finalize(thing, send)
        del thing
    assert fired  # the callback ran, and nothing came out of it


def _figures_are_whole(folder):
    """Every file under ``folder`` is a complete PNG or SVG; no temporary file is left."""
    from PIL import Image

    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        assert not name.startswith(".") and not name.endswith(".tmp"), name
        if name.endswith(".png"):
            with Image.open(os.path.join(folder, name)) as img:
                img.load()
        else:
            ET.parse(os.path.join(folder, name))
    return names


@pytest.mark.parametrize("where", ["gc", "weakref"])
def test_ctrl_c_swallowed_by_a_callback_still_ends_the_sweep(where, tmp_path, calibrated_here, monkeypatch, capsys):
    """SIGINT delivered inside a callback during the third measurement: the sweep ends after it, exit 130."""
    real, calls = bench.measure_job, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            _sigint_inside_a_callback(where)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "measure_job", measure)
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-progress"]) == 130
    assert len(calls) == 3  # nothing measured after the interrupt
    assert "partial results kept in" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == ["backprop", "auto"]  # the interrupted third row is dropped
    assert all(len(r) == len(FIELDS) and None not in r.values() for r in rows)
    meta = json.loads((tmp_path / "results.json").read_text())
    assert meta["interrupted"] and meta["rows"] == 2
    assert not (tmp_path / "plots").exists()


def test_ctrl_c_swallowed_while_plotting_stops_the_figures(tmp_path, calibrated_here, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    real = plots.speedup_vs_workers

    def third_figure(*args, **kwargs):
        _sigint_inside_a_callback("gc")
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "speedup_vs_workers", third_figure)
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-progress"]) == 130
    assert "partial results kept in" in capsys.readouterr().out
    names = _figures_are_whole(tmp_path / "plots")
    assert {n.rsplit(".", 1)[0] for n in names} == {"speedup_vs_depth", "speedup_vs_depth_end_to_end",
                                                    "speedup_vs_workers"}  # the one being drawn is finished
    assert len(list(csv.DictReader(open(tmp_path / "results.csv")))) == TINY_ROWS
    assert "interrupted while drawing the figures" in (tmp_path / "report.md").read_text()


def test_ctrl_c_in_the_middle_of_writing_a_figure_leaves_no_partial_file(tmp_path, calibrated_here, monkeypatch):
    """A KeyboardInterrupt while the second figure's SVG is half written: no such file, no temporary left."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    real, svgs = Figure.savefig, []

    def savefig(self, fname, *args, **kwargs):
        if kwargs.get("format", str(fname).rsplit(".", 1)[-1]) == "svg":
            svgs.append(fname)
            if len(svgs) == 2:
                with open(fname, "w") as f:
                    f.write('<svg xmlns="http://www.w3.org/2000/svg"><text>unclosed')
                raise KeyboardInterrupt
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    assert main(["bench", *TINY, "--out", str(tmp_path), "--no-progress"]) == 130
    names = _figures_are_whole(tmp_path / "plots")
    assert names == ["speedup_vs_depth.png", "speedup_vs_depth.svg", "speedup_vs_depth_end_to_end.png"]


def test_atomic_path_keeps_the_old_file_when_interrupted(tmp_path):
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    with atomic_path(str(path)) as tmp:
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]
