"""The chainprod command: every subcommand, in-process and as a console process."""

import subprocess
import sys

import pytest

from chainprod.cli import build_parser, main

SUBCOMMANDS = ["bench", "plot", "schedule", "simulate", "calibrate", "demo"]


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


def test_bench_and_plot_via_subprocess(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r"
    r = subprocess.run([sys.executable, "-m", "chainprod.cli", "bench", "--depths", "16,64", "--widths", "4",
                        "--workers", "1,2", "--backends", "vectorized,threads", "--methods", "auto",
                        "--structure", "dense", "--repeats", "1", "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out / "results.csv").exists() and (out / "plots" / "speedup_vs_depth.png").exists()
    assert "speedup" in r.stdout
    r = subprocess.run([sys.executable, "-m", "chainprod.cli", "plot", str(out), "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "speedup_heatmap.svg").exists()


def test_parser_lists():
    a = build_parser().parse_args(["bench", "--depths", "2^10,64", "--backends", "ray,dask"])
    assert a.depths == [1024, 64] and a.backends == ["ray", "dask"]
