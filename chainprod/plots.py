"""Figures of a sweep, a schedule, a trace and the simulator (matplotlib, Agg).

Every function writes ``<stem>.png`` and ``<stem>.svg`` and returns the
paths. Titles name the machine and the sizes; a speedup of 1 (backprop) is
always drawn. matplotlib is imported here only, so ``import chainprod``
stays light.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["speedup_vs_depth", "speedup_vs_workers", "speedup_heatmap", "gantt", "schedule_diagram",
           "predicted_vs_measured", "simulation", "plot_results"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem):
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        p = f"{stem}.{ext}"
        fig.savefig(p, dpi=110, bbox_inches="tight")
        paths.append(p)
    _plt().close(fig)
    return paths


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r.get("speedup_backward") is not None
            and r.get("method") != "backprop"]


def _groups(rows, keys):
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _machine(rows, machine):
    return machine or next((r.get("machine") for r in rows if r.get("machine")), "this machine")


def _best(rows):
    """Per (structure, width, batch, dtype, backend, workers, depth): the fastest method."""
    best = {}
    for r in rows:
        k = (r["structure"], r["width"], r["batch"], r["dtype"], r["backend"], r["workers"], r["depth"])
        if k not in best or r["speedup_backward"] > best[k]["speedup_backward"]:
            best[k] = r
    return list(best.values())


def _panel_grid(plt, panels, cols_max=3):
    """A grid of at most ``cols_max`` columns for ``panels`` panels: ``(n, fig, axes)``."""
    n = max(panels, 1)
    cols = min(n, cols_max)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    return n, fig, axes


def speedup_vs_depth(rows, stem, *, machine=None, metric="speedup_backward"):
    """One panel per (structure, width, backend): speedup over backprop vs depth, a line per worker count."""
    plt = _plt()
    rows = _best(_ok(rows))
    panels = _groups(rows, ("structure", "width", "batch", "dtype", "backend"))
    n, fig, axes = _panel_grid(plt, len(panels))
    for ax, (key, rs) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for P, line in sorted(_groups(rs, ("workers",)).items()):
            line = sorted(line, key=lambda r: r["depth"])
            ax.plot([r["depth"] for r in line], [r[metric] for r in line], "o-", label=f"P={P[0]}")
        ax.axhline(1.0, color="k", lw=1, ls="--", label="backprop")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        s, w, N, dt, b = key
        ax.set_title(f"{s} w={w} N={N} {dt}, {b}", fontsize=9)
        ax.set_xlabel("depth L (layers)")
        ax.set_ylabel("speedup over backprop" + (" (backward)" if "backward" in metric else " (end-to-end)"))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Scan vs backprop by depth - {_machine(rows, machine)} (best method per point)", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def speedup_vs_workers(rows, stem, *, machine=None, metric="speedup_backward"):
    """One panel per (structure, width, backend): speedup vs workers, a line per depth."""
    plt = _plt()
    rows = [r for r in _best(_ok(rows)) if r["backend"] not in ("vectorized", "serial")]
    panels = _groups(rows, ("structure", "width", "batch", "dtype", "backend"))
    n, fig, axes = _panel_grid(plt, len(panels))
    for ax, (key, rs) in zip(axes.flat, sorted(panels.items(), key=lambda kv: str(kv[0]))):
        for L, line in sorted(_groups(rs, ("depth",)).items()):
            line = sorted(line, key=lambda r: r["workers"])
            ax.plot([r["workers"] for r in line], [r[metric] for r in line], "o-", label=f"L={L[0]}")
        ax.axhline(1.0, color="k", lw=1, ls="--", label="backprop")
        ax.set_yscale("log")
        s, w, N, dt, b = key
        ax.set_title(f"{s} w={w} N={N} {dt}, {b}", fontsize=9)
        ax.set_xlabel("workers P")
        ax.set_ylabel("speedup over backprop")
        ax.legend(fontsize=7)
    if not panels:
        axes.flat[0].text(0.5, 0.5, "no parallel-backend rows", ha="center", va="center")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Scan vs backprop by worker count - {_machine(rows, machine)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def speedup_heatmap(rows, stem, *, machine=None, backend="vectorized", metric="speedup_backward"):
    """Heatmap of the best speedup over (depth, width), one panel per structure."""
    plt = _plt()
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    rows = [r for r in _best(_ok(rows)) if r["backend"] == backend]
    structs = sorted({r["structure"] for r in rows}) or ["(none)"]
    fig, axes = plt.subplots(1, len(structs), figsize=(4.8 * len(structs), 3.8), squeeze=False)
    for ax, s in zip(axes.flat, structs):
        rs = [r for r in rows if r["structure"] == s]
        Ls = sorted({r["depth"] for r in rs})
        ws = sorted({r["width"] for r in rs})
        M = np.full((len(ws), len(Ls)), np.nan)
        for r in rs:
            i, j = ws.index(r["width"]), Ls.index(r["depth"])
            M[i, j] = np.nanmax([M[i, j], r[metric]])
        if rs:
            lo, hi = np.nanmin(M), np.nanmax(M)
            norm = TwoSlopeNorm(1.0, min(lo, 0.99), max(hi, 1.01)) if lo < 1 < hi else LogNorm(lo, hi)
            im = ax.imshow(M, cmap="RdBu", norm=norm, origin="lower", aspect="auto")
            for i in range(len(ws)):
                for j in range(len(Ls)):
                    if np.isfinite(M[i, j]):
                        ax.text(j, i, f"{M[i, j]:.2g}x", ha="center", va="center", fontsize=8)
            fig.colorbar(im, ax=ax, label="speedup over backprop (>1 = scan wins)")
        ax.set_xticks(range(len(Ls)), [str(L) for L in Ls])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("depth L")
        ax.set_ylabel("width w")
        ax.set_title(f"{s}, {backend} (blank = skipped)", fontsize=9)
    fig.suptitle(f"Best scan vs backprop, backward pass - {_machine(rows, machine)}", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def gantt(events, stem, *, title="", machine=None):
    """Tasks by worker over time, coloured by round, from a Trace's records (or a Trace)."""
    plt = _plt()
    if hasattr(events, "to_records"):
        events = events.to_records()
    events = list(events)
    workers = sorted({str(e["worker"]) for e in events})
    rounds = sorted({int(e["round"]) for e in events}) or [0]
    cmap = plt.get_cmap("viridis", max(len(rounds), 2))
    t0 = min((e["start"] for e in events), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(workers) + 1.8))
    for e in events:
        y = workers.index(str(e["worker"]))
        ax.barh(y, (e["end"] - e["start"]) * 1e3, left=(e["start"] - t0) * 1e3, height=0.7,
                color=cmap(rounds.index(int(e["round"]))), edgecolor="k", lw=0.3)
    ax.set_yticks(range(len(workers)), [w[-28:] for w in workers], fontsize=7)
    ax.set_xlabel("time since first task (ms)")
    ax.set_ylabel("worker")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(rounds), max(rounds)))
    fig.colorbar(sm, ax=ax, label="round")
    ax.set_title(f"{title} - {machine or 'this machine'}: {len(events)} tasks, {len(rounds)} rounds", fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)


def schedule_diagram(sched, stem, *, max_positions=64):
    """Classic prefix-circuit drawing: positions across, rounds down, one dot-and-line per combine op."""
    plt = _plt()
    L = sched.length
    if L > max_positions:
        raise ValueError(f"schedule over L={L} positions is too wide to draw (max {max_positions}); "
                         "draw a smaller L")
    ivals = sched.intervals()
    fig, ax = plt.subplots(figsize=(max(4, 0.28 * L + 1.5), 0.55 * max(sched.rounds, 1) + 1.8))
    for p in range(L):
        ax.plot([p, p], [0, sched.rounds + 0.5], color="0.8", lw=0.8, zorder=0)
    for r, (i, k, j) in enumerate(ivals):
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
    return _save(fig, stem)


def predicted_vs_measured(rows, stem, *, machine=None, column="total"):
    """Model prediction vs measured median time, log-log, with the +-25% band."""
    plt = _plt()
    rows = [r for r in rows if r.get("status") == "ok" and r.get(f"predicted_{column}") is not None]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for b, rs in sorted(_groups(rows, ("backend",)).items()):
        meas = np.array([r[f"{column}_median"] for r in rs])
        pred = np.array([r[f"predicted_{column}"] for r in rs])
        ax.loglog(meas, pred, "o", ms=4, alpha=0.8, label=b[0])
    if rows:
        allv = [r[f"{column}_median"] for r in rows] + [r[f"predicted_{column}"] for r in rows]
        lo, hi = min(allv) / 1.5, max(allv) * 1.5
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=1, label="exact")
        ax.fill_between(xs, xs * 0.75, xs * 1.25, color="0.85", label="+-25%")
        err = np.abs(np.array([r[f"predicted_{column}"] / r[f"{column}_median"] - 1 for r in rows]))
        ax.set_title(f"Model vs measurement ({column}) - {_machine(rows, machine)}\n"
                     f"{np.mean(err <= 0.25):.0%} within 25%, median |error| {np.median(err):.0%}, n={len(rows)}",
                     fontsize=9)
    ax.set_xlabel(f"measured {column} time (s, median)")
    ax.set_ylabel(f"predicted {column} time (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, stem)


def simulation(results, stem, *, machine=None):
    """Simulated speedup over backprop vs depth, a line per worker count (from :func:`cost.simulate`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for P, rs in sorted(_groups(results, ("workers",)).items()):
        rs = sorted(rs, key=lambda r: r["L"])
        ax.plot([r["L"] for r in rs], [r["speedup"] for r in rs], "o-", ms=3, label=f"P={P[0]}")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="backprop")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("depth L")
    ax.set_ylabel("predicted speedup of the backward pass")
    r0 = results[0] if results else {}
    ax.set_title(f"Simulated: {r0.get('structure')} w={r0.get('width')} N={r0.get('batch')}, "
                 f"{r0.get('backend')} latencies - model of {machine or 'this machine'}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, stem)


def plot_results(results_dir, out_dir=None, *, log=print):
    """Redraw every figure of a saved sweep (``results.csv`` + ``results.json``)."""
    import json

    from .bench import read_results

    rows = read_results(results_dir)
    out_dir = out_dir or os.path.join(results_dir, "plots")
    meta = {}
    jp = os.path.join(results_dir, "results.json")
    if os.path.exists(jp):
        with open(jp) as f:
            meta = json.load(f)
    machine = meta.get("machine_label")
    paths = []
    paths += speedup_vs_depth(rows, os.path.join(out_dir, "speedup_vs_depth"), machine=machine)
    paths += speedup_vs_workers(rows, os.path.join(out_dir, "speedup_vs_workers"), machine=machine)
    paths += speedup_heatmap(rows, os.path.join(out_dir, "speedup_heatmap"), machine=machine)
    paths += predicted_vs_measured(rows, os.path.join(out_dir, "predicted_vs_measured"), machine=machine)
    traces = meta.get("traces") or {}
    if traces:
        # the distributed run with the most tasks makes the most telling chart
        key = max(traces, key=lambda k: (("/ray/" in k) or ("/dask/" in k), len(traces[k]["events"])))
        paths += gantt(traces[key]["events"], os.path.join(out_dir, "gantt"),
                       title=f"{key} [{traces[key]['schedule']}]", machine=machine)
    from .schedules import build

    paths += schedule_diagram(build("sklansky", 16), os.path.join(out_dir, "schedule_sklansky_16"))
    paths += schedule_diagram(build("brent_kung", 16), os.path.join(out_dir, "schedule_brent_kung_16"))
    for p in paths:
        log(p)
    return paths
