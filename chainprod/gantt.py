"""Gantt charts of traces, and the file helpers every chainprod figure uses (matplotlib, Agg).

:func:`gantt` draws the tasks of a traced run by worker over time, coloured
by round. Given the trace of a *sharded training step* (one event per call
on a shard, tasks named ``s<b>.forward``, ``s<b>.backprop``, ``s<b>.product``
and ``s<b>.combine``) it draws one lane per shard instead, coloured by what
each call did (the chunk's forward pass, its backprop, its Jacobian product,
a combine round of the scan across shards), with the end of the forward pass
marked. :func:`telling_trace` picks the traces of a sweep worth drawing.

:func:`save_figure` writes ``<stem>.png`` (re-saved with a 256-colour
palette: plots have few colours, and it is a third of the size) and
``<stem>.svg`` (text as text), 100 dpi, each well under 200 KB, each to a
temporary name renamed when complete, so an interrupted plot never leaves a
half-written figure.
:func:`pyplot` imports matplotlib (Agg) on first use, so ``import
chainprod`` stays light.
"""

from __future__ import annotations

import os
import re

from .results import atomic_path

__all__ = ["DPI", "pyplot", "save_figure", "gantt", "sharded_step_gantt", "telling_trace"]

DPI = 100
#: above this many tasks a Gantt chart's bars are rasterised in the SVG (one path per bar is too heavy)
_RASTERIZE_ABOVE = 300
#: the calls of a sharded step (task ``s<b>.<kind>``): colour, legend entry, label inside a wide bar
_CALLS = {"forward": ("#4c78a8", "forward: the shard's chunk", "fwd"),
          "backprop": ("#f58518", "backward: backprop of the chunk from its row", "bwd"),
          "product": ("#54a24b", "backward: the chunk's Jacobian product", "prod"),
          "combine": ("#b279a2", "backward: a combine of the scan across shards", "r")}
_SHARD_TASK = re.compile(r"^s(\d+)\.(\w+)$")


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem):
    """Write ``fig`` to ``<stem>.png`` and ``<stem>.svg``, close it, return the two paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    plt = pyplot()
    paths = [f"{stem}.png", f"{stem}.svg"]
    try:
        with atomic_path(paths[0]) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
            _palette_png(tmp)
        # SVG text as text (not one path per glyph): a third of the size, and searchable
        with plt.rc_context({"svg.fonttype": "none"}), atomic_path(paths[1]) as tmp:
            fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})
    finally:  # closed after an error or Ctrl-C too: pyplot keeps every open figure alive
        plt.close(fig)
    return paths


def _palette_png(path):
    """Re-save a PNG with a 256-colour palette: plots have few colours, and it is a third of the size."""
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, format="PNG", optimize=True)


def gantt(events, stem, *, title="", machine=None, forward_seconds=None):
    """Tasks by worker over time, coloured by round, from a Trace's records (or a Trace).

    The trace of a sharded training step (every task ``s<b>.<kind>``, e.g. a
    :class:`~chainprod.shard.ShardTrace` or its records) is drawn by shard
    and by kind of call instead; ``forward_seconds`` (read from a ShardTrace
    when not given) marks the end of its forward pass, in seconds since the
    step began.
    """
    if forward_seconds is None:
        forward_seconds = getattr(events, "forward_seconds", None)
    if hasattr(events, "to_records"):
        events = events.to_records()
    events = list(events)
    if events and all(_SHARD_TASK.match(str(e.get("task") or "")) for e in events):
        return _sharded_gantt(events, stem, title=title, machine=machine, forward_seconds=forward_seconds)
    plt = pyplot()
    workers = sorted({str(e["worker"]) for e in events}, key=lambda s: (len(s), s))
    rounds = sorted({int(e["round"]) for e in events}) or [0]
    cmap = plt.get_cmap("viridis")
    norm = plt.Normalize(min(rounds), max(max(rounds), min(rounds) + 1))
    t0 = min((e["start"] for e in events), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 1.7 + 0.3 * len(workers)))
    lanes = {}  # one collection per worker (one artist per bar would take seconds to draw)
    for e in events:
        spans, colors = lanes.setdefault(workers.index(str(e["worker"])), ([], []))
        spans.append(((e["start"] - t0) * 1e3, max((e["end"] - e["start"]) * 1e3, 1e-6)))
        colors.append(cmap(norm(int(e["round"]))))
    heavy = len(events) > _RASTERIZE_ABOVE
    for y, (spans, colors) in lanes.items():
        ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=colors, edgecolor="none" if heavy else "k", lw=0.3,
                       rasterized=heavy)
    ax.set_yticks(range(len(workers)), [w[-24:] for w in workers], fontsize=7 if len(workers) > 8 else 8)
    ax.set_ylim(len(workers) - 0.5, -0.5)
    ax.set_xlabel("time since the first task started (ms)")
    ax.set_ylabel(f"worker ({len(workers)})")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=norm), ax=ax, label="round", pad=0.01)
    ax.set_title(f"{title} - {machine or 'this machine'}: {len(events)} tasks, {len(rounds)} rounds", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def _sharded_gantt(events, stem, *, title, machine, forward_seconds):
    """One lane per shard (bottom chunk on top), a bar per call coloured by kind; time from the step's start.

    The gaps between bars are the step's overhead: submitting calls and
    handing activations and rows between processes.
    """
    plt = pyplot()
    calls = [(int(m.group(1)), m.group(2), e) for e in events for m in [_SHARD_TASK.match(str(e["task"]))]]
    shards = sorted({b for b, _, _ in calls})
    where = {b: str(e["worker"]) for b, _, e in calls}
    end = max(e["end"] for e in events) * 1e3
    fig, ax = plt.subplots(figsize=(8, 1.9 + 0.3 * len(shards)))
    lanes = {}  # one collection per (shard, kind): few artists, whatever the number of calls
    heavy = len(events) > _RASTERIZE_ABOVE
    for b, kind, e in calls:
        color, _, label = _CALLS.get(kind, ("0.6", kind, kind))
        x0, width = e["start"] * 1e3, max((e["end"] - e["start"]) * 1e3, 1e-6)
        lanes.setdefault((shards.index(b), kind, color), []).append((x0, width))
        if width >= 0.045 * end and len(shards) <= 16:  # a label only where it fits inside the bar
            text = f"{label}{e['round']}" if kind == "combine" else label
            ax.text(x0 + width / 2, shards.index(b), text, ha="center", va="center", fontsize=6.5, color="white")
    for (y, _kind, color), spans in lanes.items():
        ax.broken_barh(spans, (y - 0.36, 0.72), facecolors=color, edgecolor="none" if heavy else "k", lw=0.3,
                       rasterized=heavy)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=_CALLS[k][0], edgecolor="k", lw=0.3, label=_CALLS[k][1])
               for k in _CALLS if any(kind == k for _, kind, _ in calls)]
    if forward_seconds:
        handles.append(ax.axvline(forward_seconds * 1e3, color="k", ls="--", lw=1,
                                  label=f"forward pass ends ({forward_seconds * 1e3:.3g} ms)"))
    small = len(shards) > 8
    names = [f"shard {b}" + ("" if small else f"\n{where[b][-18:]}") for b in shards]
    ax.set_yticks(range(len(shards)), names, fontsize=7 if small else 7.5)
    ax.set_ylim(len(shards) - 0.5, -0.5)
    ax.set_xlim(0, max(end, (forward_seconds or 0) * 1e3) * 1.02)
    ax.set_xlabel("time since the step began (ms)")
    ax.set_ylabel(f"shard ({len(shards)})")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    ax.set_title(f"{title} - {machine or 'this machine'}: {len(events)} calls on {len(shards)} shards", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def sharded_step_gantt(record, key, stem, *, machine=None):
    """The Gantt chart of one traced sharded training step of a sweep (a ``traces.json.gz`` record)."""
    s, L, w, N, dt, backend, P, method = key.split("/")
    step = (f"forward {record['forward_seconds'] * 1e3:.3g} ms + backward and SGD "
            f"{record['backward_seconds'] * 1e3:.3g} ms, {record['bytes_moved']:,} bytes moved")
    title = (f"One training step, {backend} {P} shards, {method} ran {record['schedule']} across them: "
             f"{s} {L} {w} {N} {dt}\n{step}")
    return gantt(record["events"], stem, title=title, machine=machine, forward_seconds=record["forward_seconds"])


def telling_trace(traces, kind=None):
    """The key of the trace that makes the most telling Gantt chart, or None.

    ``kind=None``: among the traces of gradients (most workers busy, then
    distributed, then most tasks); ``kind="sharded"``: among the traced
    sharded steps (most shards, then Ray, then most calls).
    """
    keys = [k for k in traces if traces[k].get("kind") == kind]

    def score(k):
        events = traces[k]["events"]
        if kind == "sharded":  # shards, not processes: Dask may place two shards on one worker
            lanes = {str(e["task"]).split(".")[0] for e in events}
        else:
            lanes = {e["worker"] for e in events}
        return len(lanes), k.split("/")[5].split("-")[0] in ("ray", "dask"), len(events)

    return max(keys, key=score) if keys else None
