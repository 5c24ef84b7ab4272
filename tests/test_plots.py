"""Figures are real files: PNG and SVG, non-empty."""

import pytest

pytest.importorskip("matplotlib")

import chainprod as cp  # noqa: E402
import chainprod.testing  # noqa: E402, F401
from chainprod import cost, plots  # noqa: E402
from chainprod.bench import Sweep, run_sweep  # noqa: E402
from chainprod.schedules import build  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _check(paths):
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "svg"}
    for p in paths:
        data = open(p, "rb").read()
        assert len(data) > 500
        if p.endswith(".png"):
            assert data[:8] == PNG
        else:
            assert b"<svg" in data[:2000]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("res")
    run_sweep(Sweep(depths=[16, 128], widths=[4, 8], workers=[1, 2], backends=["vectorized", "threads"],
                    methods=["backprop", "auto", "sklansky"], structures=["dense"], repeats=1),
              str(out), progress=False, command="t", log=lambda *a: None)
    return out


def test_plot_results_writes_every_figure(results, tmp_path):
    paths = plots.plot_results(str(results), str(tmp_path), log=lambda p: None)
    _check(paths)
    names = {p.rsplit("/", 1)[1].rsplit(".", 1)[0] for p in paths}
    assert {"speedup_vs_depth", "speedup_vs_workers", "speedup_heatmap", "predicted_vs_measured",
            "gantt", "schedule_sklansky_16"} <= names


def test_schedule_diagram_and_gantt(tmp_path):
    _check(plots.schedule_diagram(build("brent_kung", 13), str(tmp_path / "bk")))
    with pytest.raises(ValueError, match="too wide"):
        plots.schedule_diagram(build("sklansky", 200), str(tmp_path / "x"))
    _, tr = cp.suffix_products(cp.testing.random_mats(32, 4), method="sklansky", backend="threads",
                               workers=2, return_trace=True)
    _check(plots.gantt(tr, str(tmp_path / "g"), title="threads"))


def test_simulation_plot(tmp_path):
    res = [cost.simulate(L, 16, P) for P in (1, 64) for L in (16, 1024)]
    _check(plots.simulation(res, str(tmp_path / "sim")))
