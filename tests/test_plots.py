"""Figures are real files: valid PNG and SVG, each under 200 KB, with plain speedup ticks."""

import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import chainprod as cp  # noqa: E402
import chainprod.testing  # noqa: E402, F401
from chainprod import cost, plots  # noqa: E402
from chainprod.bench import TORCH_STRUCTURE, Sweep, read_results, run_sweep  # noqa: E402
from chainprod.calibrate import _fingerprint  # noqa: E402
from chainprod.schedules import build  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
MAX_BYTES = 200_000


def _check(paths):
    assert {p.rsplit(".", 1)[1] for p in paths} == {"png", "svg"}
    for p in paths:
        data = open(p, "rb").read()
        assert 500 < len(data) < MAX_BYTES, (p, len(data))
        if p.endswith(".png"):
            assert data[:8] == PNG
        else:
            assert b"<svg" in data[:2000] and data.rstrip().endswith(b"</svg>")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A real sweep, on a cost model and an auto cache of its own (nothing the user's cache directory holds)."""
    out = tmp_path_factory.mktemp("res")
    model = out / "model" / "cost_model.json"
    cost.save_model(cost.CostModel(machine={"fingerprint": _fingerprint(), "engines": ["threads"]}, source="t"),
                    str(model))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHAINPROD_COST_MODEL", str(model))
        mp.delenv("CHAINPROD_AUTO_CACHE", raising=False)
        cp.clear_caches()
        _sweep(out)
    cp.clear_caches()
    return out


def _sweep(out):
    run_sweep(Sweep(depths=[16, 128], widths=[4, 8], workers=[1, 2], backends=["vectorized", "threads"],
                    methods=["auto", "sklansky"], baselines=["backprop", "torch"], structures=["dense", "diagonal"],
                    repeats=1), str(out), progress=False, command="t", log=lambda *a: None)


def test_plot_results_writes_every_figure(results, tmp_path):
    paths = plots.plot_results(str(results), str(tmp_path), log=lambda p: None)
    _check(paths)
    names = {os.path.basename(p).rsplit(".", 1)[0] for p in paths}
    assert {"speedup_vs_depth", "speedup_vs_depth_end_to_end", "speedup_vs_workers", "speedup_heatmap",
            "predicted_vs_measured", "gantt", "schedule_sklansky_16"} <= names


@pytest.mark.parametrize("v,label", [(1.0, "1x"), (2.0, "2x"), (4.0, "4x"), (0.5, "0.5x"), (0.25, "0.25x"),
                                     (0.125, "1/8x"), (1 / 64, "1/64x")])
def test_speedup_ticks_are_plain(v, label):
    assert plots._fmt_x(v) == label


def test_speedup_axis_ticks_cover_the_data():
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    plots._speedup_axis(ax, [0.3, 5.0])
    labels = [t.get_text() for t in ax.get_yticklabels()]
    plt.close(fig)
    assert labels == ["0.25x", "0.5x", "1x", "2x", "4x", "8x"]


@pytest.mark.parametrize("workers", [2, 16])
def test_gantt_of_real_traces(tmp_path, workers):
    _, tr = cp.suffix_products(cp.testing.random_mats(256, 4), method="sklansky", backend="threads",
                               workers=workers, return_trace=True)
    assert len({e.worker for e in tr.events}) > 1
    _check(plots.gantt(tr, str(tmp_path / f"g{workers}"), title=f"threads P={workers}"))


def test_gantt_of_many_tasks_stays_small(tmp_path):
    rng = np.random.default_rng(0)
    events = [{"round": r, "worker": f"worker-{w}", "start": r * 1e-3 + w * 1e-5, "end": r * 1e-3 + w * 1e-5 + 5e-4,
               "ops": 1} for r in range(200) for w in range(16)]
    rng.shuffle(events)
    _check(plots.gantt(events, str(tmp_path / "big"), title="3200 tasks on 16 workers"))


def test_schedule_diagram(tmp_path):
    _check(plots.schedule_diagram(build("brent_kung", 13), str(tmp_path / "bk")))
    with pytest.raises(ValueError, match="too wide"):
        plots.schedule_diagram(build("sklansky", 200), str(tmp_path / "x"))


def test_predicted_vs_measured_draws_the_band(results, tmp_path):
    rows = read_results(str(results))
    assert any(r.get("predicted_total") for r in rows)
    _check(plots.predicted_vs_measured(rows, str(tmp_path / "pvm")))


def test_simulation_plot(tmp_path):
    res = [cost.simulate(L, 16, P) for P in (1, 64) for L in (16, 1024)]
    _check(plots.simulation(res, str(tmp_path / "sim")))


def _sharded_step(P, calls_per_shard=16):
    """A synthetic trace of one sharded step: per shard a forward, a product, combines, a backprop (ms apart)."""
    events, t = [], 0.0
    for b in range(P):
        events.append({"round": -1, "worker": f"host/pid{1000 + b}", "start": t, "end": t + 2e-3, "ops": 0,
                       "task": f"s{b}.forward"})
        t += 2.2e-3
    fwd_end = t
    for b in range(P):
        start = fwd_end + 1e-4
        kinds = ["product"] + ["combine"] * (calls_per_shard - 3) + ["backprop"]
        for r, kind in enumerate(kinds):
            d = 3e-3 if kind != "combine" else 4e-4
            events.append({"round": r if kind == "combine" else -1, "worker": f"host/pid{1000 + b}", "start": start,
                           "end": start + d, "ops": 0, "task": f"s{b}.{kind}"})
            start += d + 1e-4
    return events, fwd_end


@pytest.mark.parametrize("P", [2, 16])
def test_gantt_of_a_sharded_step(tmp_path, P):
    events, fwd_end = _sharded_step(P)
    assert len(events) == 16 * P
    paths = plots.gantt(events, str(tmp_path / f"sharded{P}"), title=f"ray-sharded P={P}", forward_seconds=fwd_end)
    _check(paths)
    svg = open(paths[1]).read()
    # drawn by shard and by kind of call, not by round and process
    assert "shard 0" in svg and f"shard {P - 1}" in svg and "forward pass ends" in svg
    assert "backprop of the chunk" in svg and "combine of the scan" in svg and "calls on" in svg


def test_every_batch_gets_its_panels_and_markers(results, tmp_path):
    rows = read_results(str(results))
    rows += [{**r, "batch": 64} for r in rows]  # the same rows as a second batch size
    for fig, title in (("speedup_vs_depth", "{} w=8, N=64"), ("speedup_heatmap", "{} N=64:")):
        _check(getattr(plots, fig)(rows, str(tmp_path / fig)))
        svg = open(tmp_path / f"{fig}.svg").read()
        assert title.format("dense") in svg and title.format("diagonal") in svg, fig
    _check(plots.speedup_vs_workers(rows, str(tmp_path / "w")))
    assert "L=128 N=64" in open(tmp_path / "w.svg").read()
    _check(plots.predicted_vs_measured(rows, str(tmp_path / "p")))
    assert "threads N=64" in open(tmp_path / "p.svg").read()


def test_torch_models_figure(tmp_path):
    rows = []
    for P in (1, 2):
        for i, (m, b) in enumerate([("torch", "torch"), ("blas", "numpy"), ("torch_backward", "numba"),
                                    ("value_and_grad", "numba"), ("value_and_grad", "numpy")]):
            rows.append({"structure": TORCH_STRUCTURE, "depth": 3, "width": 8, "batch": 4, "dtype": "float32",
                         "method": m, "backend": b, "workers": P, "status": "ok", "total_median": 1e-3 * (i + 1) / P})
    rows.append({**rows[0], "method": "jax", "backend": "jax", "workers": 2})
    paths = plots.torch_models(rows, str(tmp_path / "tm"))
    _check(paths)
    svg = open(paths[1]).read()
    assert "w=8 depth=3 N=4 float32" in svg and "cp.torch_backward" in svg and "BLAS floor" in svg


@pytest.mark.parametrize("fail_on", ["png", "svg"])
def test_an_interrupted_save_keeps_the_previous_figure_whole(tmp_path, monkeypatch, fail_on):
    """A Ctrl-C while a figure is half written: the file is the previous figure, whole; no temporary is left."""
    from matplotlib.figure import Figure

    stem = str(tmp_path / "s")
    before = plots.schedule_diagram(build("sklansky", 8), stem)
    _check(before)
    old = {p: open(p, "rb").read() for p in before}
    real = Figure.savefig

    def half_then_interrupt(self, fname, *args, **kwargs):
        if (kwargs.get("format") or str(fname).rsplit(".", 1)[-1]) == fail_on:
            with open(fname, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n" if fail_on == "png" else b"<svg><text>unclosed")
            raise KeyboardInterrupt
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        plots.schedule_diagram(build("brent_kung", 8), stem)
    assert sorted(os.listdir(tmp_path)) == ["s.png", "s.svg"]
    assert open(stem + ".svg", "rb").read() == old[stem + ".svg"]
    if fail_on == "png":
        assert open(stem + ".png", "rb").read() == old[stem + ".png"]
    _check(before)
