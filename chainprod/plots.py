"""Figures of a sweep, a schedule, a trace and the simulator (matplotlib, Agg).

Every function writes ``<stem>.png`` and ``<stem>.svg`` (each well under
200 KB: 100 dpi, and dense artists rasterised inside the SVG) and returns the
paths. Speedups are against the *best backprop* of each problem (the fastest
baseline measured there, named in the panel), on a log-2 axis labelled
``0.5x, 1x, 2x``. Titles name the machine and the sizes. Every batch size
has its own panels (speedup vs depth, the heatmap) or its own marker
(speedup vs workers, model vs measurement). Sharded rows (``ray-sharded``,
``dask-sharded``: one training step of a model resident on P workers) are
drawn like every backend, dashed with hexagon markers. The torch-models
section has its own figure (:func:`torch_models`).
matplotlib is imported only when a figure is drawn (:mod:`chainprod.gantt`
holds the Gantt charts and the file helpers), so ``import chainprod`` stays light.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .bench import BASELINES, PER_CALL, SHARDED, TORCH_STRUCTURE, read_meta, read_results, read_traces
from .bench_sequences import SEQUENCE_CELLS, is_sequence
from .gantt import DPI, gantt, pyplot, save_figure, sharded_step_gantt, telling_trace
from .plots_sequences import sequences_figure
from .report import baseline_name
from .schedules import build

__all__ = ["speedup_vs_depth", "speedup_vs_workers", "speedup_heatmap", "gantt", "sharded_step_gantt",
           "schedule_diagram", "predicted_vs_measured", "simulation", "torch_models", "plot_results", "DPI"]

#: reference-line styles of the baselines (the best of them is the 1x line)
_BASELINE_STYLE = {"backprop": ("0.15", "--", "s"), "backprop-numpy": ("0.45", ":", "v"),
                   "jax": ("#8c564b", "-.", "D"), "torch": ("#e377c2", (0, (5, 1, 1, 1)), "^")}
_METRICS = {"backward": "backward pass", "total": "end-to-end"}


def _fmt_x(v, _pos=None) -> str:
    """A speedup tick: ``1/8x``, ``0.25x``, ``0.5x``, ``1x``, ``16x`` (never ``2^-3`` or ``9x10^-1``)."""
    if v >= 0.25:
        return f"{v:g}x"
    return f"1/{1 / v:.0f}x"


def _speedup_axis(ax, values, axis="y"):
    """Log-2 speedup axis with plain ticks at powers of two covering ``values`` (at most ~8)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    v = [x for x in values if x and np.isfinite(x) and x > 0] + [1.0]
    lo, hi = math.floor(math.log2(min(v))), math.ceil(math.log2(max(v)))
    step = max(1, math.ceil((hi - lo + 1) / 8))
    ticks = [2.0 ** k for k in range(lo, hi + 1) if (k % step == 0)]
    set_scale, a = (ax.set_yscale, ax.yaxis) if axis == "y" else (ax.set_xscale, ax.xaxis)
    set_scale("log", base=2)
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(FuncFormatter(_fmt_x))
    a.set_minor_locator(NullLocator())
    (ax.set_ylim if axis == "y" else ax.set_xlim)(2.0 ** lo / 1.15, 2.0 ** hi * 1.15)


def _depth_axis(ax, depths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(depths)), [str(d) for d in sorted(set(depths))])
    ax.minorticks_off()


#: a marker per batch size (in the order the batches appear), where a figure tells batches apart by marker
_BATCH_MARKERS = "os^Dv<>p"


def _ok(rows, metric="backward"):
    """The ok rows of the sweep proper (not the torch-models section) with a speedup on ``metric``."""
    return [r for r in rows if r.get("status") == "ok" and r.get(f"speedup_{metric}") is not None
            and r.get("structure") not in (TORCH_STRUCTURE, *SEQUENCE_CELLS)]


def _batch_marker(rows):
    """``{batch: marker}`` over the batch sizes of ``rows``."""
    return {N: _BATCH_MARKERS[i % len(_BATCH_MARKERS)] for i, N in enumerate(sorted({r["batch"] for r in rows}))}


def _groups(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _machine(rows, machine):
    return machine or next((r.get("machine") for r in rows if r.get("machine")), "this machine")


def _config_label(backend, workers, method):
    """``"auto: threads P=2"``; ``"auto: ray-sharded P=2 (train step)"``; ``"auto: ray P=2 (per call)"``."""
    return (f"{method}: {backend}" + (f" P={workers}" if backend not in ("vectorized", "serial") else "")
            + (" (train step)" if backend in SHARDED else " (per call)" if backend in PER_CALL else ""))


def _best_backprop_note(rows, metric):
    """``"numba at every L"`` or ``"JAX (L=64), numba (L=1024)"``: which baseline was the best, where."""
    short = {"backprop": next((r["backend"] for r in rows if r["method"] == "backprop"), "backprop"),
             "backprop-numpy": "numpy", "jax": "JAX", "torch": "torch"}
    by = {}
    for r in rows:
        by.setdefault(r[f"best_backprop_{metric}"], set()).add(r["depth"])
    if len(by) == 1:
        return f"{short.get(next(iter(by)), '?')} at every L"
    return ", ".join(f"{short.get(b, b)} (L={', '.join(map(str, sorted(Ls)))})"
                     for b, Ls in sorted(by.items(), key=lambda kv: min(kv[1])))


def speedup_vs_depth(rows, stem, *, machine=None, metric="backward"):
    """The headline: speedup over the best backprop vs depth, one panel per (structure, width).

    Every scan configuration (backend, workers, method) is a coloured line;
    the other baselines are grey/brown/pink reference lines, relative to the
    best backprop (the 1x line; the panel says which baseline that is).
    Panels of one structure share their y axis.
    """
    plt = pyplot()
    rows = _ok(rows, metric)
    scans = [r for r in rows if r["method"] not in BASELINES]
    configs = sorted({(r["backend"], r["workers"], r["method"]) for r in scans})
    colors = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(configs)}
    grid = sorted({(r["structure"], r["batch"], r["dtype"]) for r in rows}) or [("(no rows)", 1, "")]
    widths = {g: sorted({r["width"] for r in rows if (r["structure"], r["batch"], r["dtype"]) == g}) for g in grid}
    ncols = max((len(w) for w in widths.values()), default=1) or 1
    fig, axes = plt.subplots(len(grid), ncols, figsize=(3.9 * ncols, 3.0 * len(grid) + 0.9), squeeze=False,
                             sharey="row")
    handles = {}
    for i, g in enumerate(grid):
        row_values = [r[f"speedup_{metric}"] for r in rows if (r["structure"], r["batch"], r["dtype"]) == g]
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(widths[g]):
                ax.axis("off")
                continue
            w = widths[g][j]
            rs = [r for r in rows if (r["structure"], r["batch"], r["dtype"], r["width"]) == (*g, w)]
            h = ax.axhline(1.0, color="k", lw=1.2, zorder=1)
            handles.setdefault("best backprop (= 1x; named in each panel)", h)
            for b in BASELINES:
                line = sorted((r for r in rs if r["method"] == b), key=lambda r: r["depth"])
                if line:
                    color, ls, marker = _BASELINE_STYLE[b]
                    (h,) = ax.plot([r["depth"] for r in line], [r[f"speedup_{metric}"] for r in line], color=color,
                                   ls=ls, marker=marker, ms=3.5, lw=1.1, zorder=2)
                    handles.setdefault(baseline_name(b, line), h)
            for c in configs:
                line = sorted((r for r in rs if (r["backend"], r["workers"], r["method"]) == c),
                              key=lambda r: r["depth"])
                if not line:
                    continue
                sharded = c[0] in SHARDED  # a training step on P shards: dashed, hexagons
                (h,) = ax.plot([r["depth"] for r in line], [r[f"speedup_{metric}"] for r in line],
                               "h--" if sharded else "o-", color=colors[c], ms=5, lw=1.8, zorder=3)
                handles.setdefault(_config_label(*c), h)
                ran_bp = [r for r in line if str(r["schedule"]).startswith("backprop")]
                if ran_bp:  # hollow: no scan ran, auto chose backprop itself (sharded: the pipeline)
                    h = ax.scatter([r["depth"] for r in ran_bp], [r[f"speedup_{metric}"] for r in ran_bp], s=22,
                                   marker="h" if sharded else "o", facecolors="white", edgecolors=[colors[c]],
                                   linewidths=1.3, zorder=4)
                    handles.setdefault("hollow marker: no scan ran (auto chose backprop; sharded: the pipeline)",
                                       ax.scatter([], [], s=22, facecolors="white", edgecolors="0.3", linewidths=1.3))
            _depth_axis(ax, [r["depth"] for r in rs])
            _speedup_axis(ax, row_values)
            ax.grid(True, which="major", color="0.9", lw=0.6)
            extra = (f", N={g[1]}" if g[1] != 1 else "") + (f", {g[2]}" if g[2] != "float64" else "")
            ax.set_title(f"{g[0]} w={w}{extra}\nbest backprop: {_best_backprop_note(rs, metric)}", fontsize=8.5)
            ax.set_xlabel("depth L (layers)", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"speedup, {_METRICS[metric]}", fontsize=8)
            ax.tick_params(labelsize=7.5)
    names = ", ".join(baseline_name(b, rows) for b in BASELINES if any(r["method"] == b for r in rows))
    fig.suptitle(f"{_METRICS[metric].capitalize()}: speedup of the scan over the best backprop - "
                 f"{_machine(rows, machine)}\nbest backprop = the fastest of {names}, per problem", fontsize=10)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    legend_inches = 0.25 + 0.2 * math.ceil(len(handles) / 4)  # the legend's height, whatever the figure's
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    return save_figure(fig, stem)


def speedup_vs_workers(rows, stem, *, machine=None, metric="backward"):
    """One panel per (structure, width, dtype, parallel backend): speedup vs workers, a line per (depth, method, batch).

    Batch sizes are told apart by marker (and dash): ``o`` solid for the first, ``s`` dashed for the next.
    """
    plt = pyplot()
    rows = [r for r in _ok(rows, metric) if r["method"] not in BASELINES and r["backend"] not in ("vectorized",
                                                                                                   "serial")]
    panels = _groups(rows, ("structure", "width", "dtype", "backend"))
    marker = _batch_marker(rows)
    n = max(len(panels), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.9 * cols, 3.0 * ((n + cols - 1) // cols)),
                             squeeze=False)
    several = len({r["method"] for r in rows}) > 1
    for ax, (key, rs) in zip(axes.flat, sorted(panels.items())):
        for (L, m, N), line in sorted(_groups(rs, ("depth", "method", "batch")).items()):
            line = sorted(line, key=lambda r: r["workers"])
            first = marker[N] == _BATCH_MARKERS[0]
            ax.plot([r["workers"] for r in line], [r[f"speedup_{metric}"] for r in line], marker[N],
                    ls="-" if first else "--", ms=4, label=f"L={L} N={N}" + (f" {m}" if several else ""))
        ax.axhline(1.0, color="k", lw=1.2, label="best backprop")
        _speedup_axis(ax, [r[f"speedup_{metric}"] for r in rs])
        ax.set_xticks(sorted({r["workers"] for r in rs}))
        s, w, dt, b = key
        ax.set_title(f"{s} w={w} {dt}, {b}", fontsize=8.5)
        ax.set_xlabel("workers P", fontsize=8)
        ax.set_ylabel(f"speedup, {_METRICS[metric]}", fontsize=8)
        ax.legend(fontsize=6.5, ncol=2 if len(marker) > 1 else 1)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no parallel-backend rows", ha="center", va="center")
    for ax in list(axes.flat)[len(panels):]:
        if panels:
            ax.axis("off")
    fig.suptitle(f"Scan vs the best backprop by worker count - {_machine(rows, machine)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


def speedup_heatmap(rows, stem, *, machine=None, metric="backward"):
    """The fastest scan configuration per (depth, width) against the best backprop, one panel per structure and batch.

    Each cell is annotated with the speedup and the configuration that
    achieved it; red: the scan loses, blue: it wins; blank: not measured.
    A row of panels per (batch, dtype), a column per structure.
    """
    plt = pyplot()
    from matplotlib.colors import Normalize

    rows = [r for r in _ok(rows, metric) if r["method"] not in BASELINES]
    structs = sorted({r["structure"] for r in rows}) or ["(none)"]
    sizes = sorted({(r["batch"], r["dtype"]) for r in rows}) or [(1, "float64")]
    fig, axes = plt.subplots(len(sizes), len(structs), figsize=(4.6 * len(structs), 3.8 * len(sizes)),
                             squeeze=False)
    for ax, (s, (N, dt)) in zip(axes.flat, [(s, nd) for nd in sizes for s in structs]):
        rs = [r for r in rows if (r["structure"], r["batch"], r["dtype"]) == (s, N, dt)]
        Ls, ws = sorted({r["depth"] for r in rs}), sorted({r["width"] for r in rs})
        best = {}
        for r in rs:
            k = (r["width"], r["depth"])
            if k not in best or r[f"speedup_{metric}"] > best[k][f"speedup_{metric}"]:
                best[k] = r
        M = np.full((len(ws), len(Ls)), np.nan)
        for (w, L), r in best.items():
            M[ws.index(w), Ls.index(L)] = math.log2(r[f"speedup_{metric}"])
        if rs:
            m = max(1.0, float(np.nanmax(np.abs(M))))
            im = ax.imshow(M, cmap="RdBu", norm=Normalize(-m, m), origin="lower", aspect="auto")
            for (w, L), r in best.items():
                i, j = ws.index(w), Ls.index(L)
                label = _config_label(r["backend"], r["workers"], r["method"]).replace("auto: ", "")
                if str(r["schedule"]).startswith("backprop"):
                    label += "\n(ran backprop)"
                ax.text(j, i, f"{r[f'speedup_{metric}']:.2f}x\n{label}", ha="center", va="center", fontsize=7,
                        color="white" if abs(M[i, j]) > 0.6 * m else "black")
            cb = fig.colorbar(im, ax=ax)
            cb.set_label("speedup over the best backprop", fontsize=8)
            step = max(1, math.ceil((2 * math.floor(m) + 1) / 9))
            ticks = [k for k in range(-math.floor(m), math.floor(m) + 1) if k % step == 0]
            cb.set_ticks(ticks, labels=[_fmt_x(2.0 ** k) for k in ticks])
        ax.set_xticks(range(len(Ls)), [str(L) for L in Ls])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("depth L")
        ax.set_ylabel("width w")
        ax.set_title(f"{s} N={N}" + (f" {dt}" if dt != "float64" else "") + f": fastest scan configuration per "
                     f"cell, {_METRICS[metric]}", fontsize=9)
    fig.suptitle(f"Where the scan beats the best backprop - {_machine(rows, machine)}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, stem)


def schedule_diagram(sched, stem, *, max_positions=64):
    """Classic prefix-circuit drawing: positions across, rounds down, one dot-and-line per combine op."""
    plt = pyplot()
    L = sched.length
    if L > max_positions:
        raise ValueError(f"schedule over L={L} positions is too wide to draw (max {max_positions}); "
                         "draw a smaller L")
    fig, ax = plt.subplots(figsize=(max(4, 0.28 * L + 1.5), 0.55 * max(sched.rounds, 1) + 1.8))
    for p in range(L):
        ax.plot([p, p], [0, sched.rounds + 0.5], color="0.8", lw=0.8, zorder=0)
    for r, (i, k, j) in enumerate(sched.intervals()):
        y = r + 1
        for a, b, c in zip(i.tolist(), k.tolist(), j.tolist()):
            # the op writes position c's slot from the left operand ending at b
            ax.plot([b, c], [y - 0.35, y], color="C0", lw=1)
            ax.plot(c, y, "o", color="C3" if a == 0 else "C0", ms=5, zorder=3)
            ax.plot(b, y - 0.35, ".", color="k", ms=3)
    ax.set_xlim(-0.7, L - 0.3)
    ax.set_ylim(sched.rounds + 0.7, 0.2)
    ax.set_xticks(range(L) if L <= 32 else range(0, L, 4))
    ax.set_yticks(range(1, sched.rounds + 1))
    ax.set_xlabel("position (scan order: 0 = A_L, output end)")
    ax.set_ylabel("round")
    ax.set_title(f"{sched.name}, L={L}: {sched.rounds} rounds, peak width {sched.peak_width}, "
                 f"{sched.num_ops} ops (red = result contains A_L: thin)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def predicted_vs_measured(rows, stem, *, machine=None, column="total"):
    """Model prediction vs measured median time, log-log, with the exact line and the +-25% band."""
    plt = pyplot()
    rows = [r for r in rows if r.get("status") == "ok" and r.get(f"predicted_{column}")]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    marker = _batch_marker(rows)  # colour: the backend; marker: the batch size
    color = {b: f"C{i % 10}" for i, b in enumerate(sorted({r["backend"] for r in rows}))}
    for (b, N), rs in sorted(_groups(rows, ("backend", "batch")).items()):
        ax.loglog([r[f"{column}_median"] for r in rs], [r[f"predicted_{column}"] for r in rs], marker[N],
                  color=color[b], ms=4, alpha=0.8, label=f"{b} N={N}", zorder=3)
    title = f"Model vs measurement ({column}) - {_machine(rows, machine)}"
    if rows:
        allv = [r[f"{column}_median"] for r in rows] + [r[f"predicted_{column}"] for r in rows]
        xs = np.geomspace(min(allv) / 1.5, max(allv) * 1.5, 50)
        ax.fill_between(xs, xs * 0.75, xs * 1.25, color="0.82", label="within 25%", zorder=1)
        ax.plot(xs, xs, "k-", lw=1, label="exact", zorder=2)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(xs[0], xs[-1])
        err = np.abs(np.array([r[f"predicted_{column}"] / r[f"{column}_median"] - 1 for r in rows]))
        title += f"\n{np.mean(err <= 0.25):.0%} within 25%, median |error| {np.median(err):.0%}, n={len(rows)}"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"measured {column} time (s, median)")
    ax.set_ylabel(f"predicted {column} time (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, stem)


def simulation(results, stem, *, machine=None):
    """Simulated speedup over backprop vs depth, a line per worker count (from :func:`cost.simulate`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for (P,), rs in sorted(_groups(results, ("workers",)).items()):
        rs = sorted(rs, key=lambda r: r["L"])
        ax.plot([r["L"] for r in rs], [r["speedup"] for r in rs], "o-", ms=3, label=f"P={P}")
    ax.axhline(1.0, color="k", lw=1.2, label="backprop")
    ax.set_xscale("log", base=2)
    _speedup_axis(ax, [r["speedup"] for r in results])
    ax.set_xlabel("depth L")
    ax.set_ylabel("predicted speedup of the backward pass")
    r0 = results[0] if results else {}
    ax.set_title(f"Simulated: {r0.get('structure')} w={r0.get('width')} N={r0.get('batch')}, "
                 f"{r0.get('backend')} latencies - model of {machine or 'this machine'}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, stem)


_TORCH_BARS = (("torch", "torch", "torch autograd", "#e377c2"), ("jax", "jax", "JAX jit(grad), every core", "#8c564b"),
               ("torch_backward", "numba", "cp.torch_backward", "C0"), ("value_and_grad", "numba",
               "cp.value_and_grad (numba)", "C2"), ("value_and_grad", "numpy", "cp.value_and_grad (numpy)", "C1"),
               ("blas", "numpy", "BLAS floor (matmuls alone)", "0.55"))


def torch_models(rows, stem, *, machine=None):
    """The torch-models section: a panel per model, a bar per implementation and thread count (ms, log axis).

    One training step's gradient (forward and backward, mse loss); the BLAS
    floor is the step's matrix products alone. Each bar is labelled with its
    time; bars of one implementation share a colour, hatched for P > 1.
    """
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r.get("status") == "ok" and r.get("structure") == TORCH_STRUCTURE]
    models = sorted({(r["width"], r["depth"], r["batch"], r["dtype"]) for r in rows}) or [None]
    Ps = sorted({r["workers"] for r in rows if r["method"] != "jax"}) or [1]
    cols = min(len(models), 3)
    fig, axes = plt.subplots((len(models) + cols - 1) // cols, cols, figsize=(4.8 * cols, 3.6 * math.ceil(
        len(models) / cols) + 0.6), squeeze=False)
    for ax, m in zip(axes.flat, models):
        if m is None:
            ax.text(0.5, 0.5, "no torch-models rows", ha="center", va="center")
            continue
        rs = [r for r in rows if (r["width"], r["depth"], r["batch"], r["dtype"]) == m]
        width = 0.8 / len(Ps)
        for i, (meth, backend, _, color) in enumerate(_TORCH_BARS):
            for j, P in enumerate(Ps):
                r = next((r for r in rs if (r["method"], r["backend"]) == (meth, backend)
                          and (meth == "jax" or r["workers"] == P)), None)
                if r is None or (meth == "jax" and j):
                    continue
                x = i + (0 if meth == "jax" else (j - (len(Ps) - 1) / 2) * width)
                ax.bar(x, r["total_median"] * 1e3, width, color=color, hatch="//" if P > 1 and meth != "jax" else "",
                       edgecolor="white", zorder=2)
                ax.text(x, r["total_median"] * 1e3 * 1.08, f"{r['total_median'] * 1e3:.3g}", ha="center",
                        va="bottom", fontsize=6, rotation=90)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(_TORCH_BARS)), [b[2] for b in _TORCH_BARS], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("ms per training step (log)", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="y", color="0.9", lw=0.6, zorder=0)
        ax.set_ylim(top=ax.get_ylim()[1] * 3)
        ax.set_title(f"w={m[0]} depth={m[1]} N={m[2]} {m[3]}", fontsize=8.5)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    fig.suptitle(f"Torch models: one training step's gradient (nn.Linear + nn.Tanh, mse) - {_machine(rows, machine)}"
                 f"\nbars left to right: P = {', '.join(map(str, Ps))} threads (hatched: P > 1); JAX on XLA's own "
                 "pool", fontsize=9.5)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_results(results_dir, out_dir=None, *, log=print, check=None):
    """Redraw every figure of a saved sweep (``results.csv``, ``results.json``, ``traces.json.gz``).

    ``check``, if given, is called before each figure (e.g.
    :meth:`chainprod.results.Interrupts.check`, so a Ctrl-C that a callback
    swallowed still stops the drawing); each figure is complete or absent.
    """
    rows = read_results(results_dir)
    out_dir = out_dir or os.path.join(results_dir, "plots")
    machine = read_meta(results_dir).get("machine_label")
    traces = read_traces(results_dir)
    key, sharded = telling_trace(traces), telling_trace(traces, kind="sharded")
    figures = [] if rows and all(map(is_sequence, rows)) else [(speedup_vs_depth, rows, "speedup_vs_depth", {}),
               (speedup_vs_depth, rows, "speedup_vs_depth_end_to_end", {"metric": "total"}),
               (speedup_vs_workers, rows, "speedup_vs_workers", {}), (speedup_heatmap, rows, "speedup_heatmap", {}),
               (predicted_vs_measured, rows, "predicted_vs_measured", {})]
    if any(r.get("structure") == TORCH_STRUCTURE for r in rows):
        figures.append((torch_models, rows, "torch_models", {}))
    if any(is_sequence(r) for r in rows):
        figures.append((sequences_figure, rows, "sequences", {}))
    if key is not None:
        s, L, w, N, dt, backend, P, method = key.split("/")
        title = f"{backend} {P}, {method} ran {traces[key]['schedule']}: {s} {L} {w} {N} {dt}"
        figures.append((gantt, traces[key]["events"], "gantt", {"title": title}))
    if sharded is not None:
        figures.append((lambda r, stem, **kw: sharded_step_gantt(r, sharded, stem, **kw), traces[sharded],
                        "gantt_sharded", {}))
    paths = []
    for draw, data, name, kw in figures:
        if check is not None:
            check()
        paths += draw(data, os.path.join(out_dir, name), machine=machine, **kw)
    for name in ("sklansky", "brent_kung"):
        if check is not None:
            check()
        paths += schedule_diagram(build(name, 16), os.path.join(out_dir, f"schedule_{name}_16"))
    for p in paths:
        log(p)
    return paths
