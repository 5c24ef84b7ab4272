"""The sequences section's figure: time per step of a gradient through time, chainprod against torch and JAX."""

from __future__ import annotations

import math

from .bench_sequences import SEQUENCE_CELLS, is_sequence
from .gantt import pyplot, save_figure

__all__ = ["sequences_figure"]

#: (method, legend, colour, marker) of each implementation drawn
_SERIES = (("backprop", "chainprod BPTT (numba)", "C0", "o"), ("backprop-numpy", "chainprod BPTT (numpy)", "C1", "s"),
           ("torch", "torch autograd", "#e377c2", "^"), ("jax", "JAX jit(grad) lax.scan", "#8c564b", "D"),
           ("auto", "cp auto", "C2", "v"), ("sklansky", "cp sklansky scan", "C4", "P"))


def sequences_figure(rows, stem, *, machine=None):
    """A panel per cell: microseconds per time step (log) of each implementation, per problem (T, H, N).

    Filled markers at the smallest worker count P of the sweep, hollow at
    the largest (JAX: one row, XLA's own pool). Writes ``<stem>.png`` and
    ``<stem>.svg``; returns their paths.
    """
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r.get("status") == "ok" and is_sequence(r) and r.get("total_median")]
    cells = [c for c in SEQUENCE_CELLS if any(r["structure"] == c for r in rows)] or [None]
    Ps = sorted({r["workers"] for r in rows if r["method"] != "jax"}) or [1]
    cols = min(len(cells), 2)
    fig, axes = plt.subplots(math.ceil(len(cells) / cols), cols, figsize=(6.4 * cols, 3.8 * math.ceil(
        len(cells) / cols) + 0.8), squeeze=False)
    for ax, cell in zip(axes.flat, cells):
        if cell is None:
            ax.text(0.5, 0.5, "no sequences rows", ha="center", va="center")
            continue
        rs = [r for r in rows if r["structure"] == cell]
        probs = sorted({(r["depth"], r["width"], r["batch"], r["dtype"]) for r in rs})
        for i, (method, label, color, marker) in enumerate(_SERIES):
            for P in ([Ps[0]] if method == "jax" else sorted({Ps[0], Ps[-1]})):
                pts = [(j, r["total_median"] * 1e6 / r["depth"]) for j, p in enumerate(probs) for r in rs
                       if (r["depth"], r["width"], r["batch"], r["dtype"]) == p and r["method"] == method
                       and (method == "jax" or r["workers"] == P)]
                if not pts:
                    continue
                hollow = P != Ps[0]
                ax.plot([j + (i - len(_SERIES) / 2) * 0.06 for j, _ in pts], [y for _, y in pts], marker=marker,
                        ls="", color=color, mfc="none" if hollow else color, ms=6,
                        label=None if hollow else label, zorder=3)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xticks(range(len(probs)), [f"T={T:,}\nH={H} N={N}" + ("" if dt == "float64" else f"\n{dt}")
                                          for T, H, N, dt in probs], fontsize=7)
        ax.set_ylabel("us per time step (log)", fontsize=8)
        ax.grid(True, axis="y", color="0.9", lw=0.6, zorder=0)
        ax.set_title(cell, fontsize=9)
        ax.legend(fontsize=6.5, ncol=2)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    where = machine or next((r.get("machine") for r in rows if r.get("machine")), "this machine")
    fig.suptitle(f"Sequences: one gradient through time (loss = sum of outputs), time per step - {where}\nfilled: "
                 f"P={Ps[0]}" + (f", hollow: P={Ps[-1]}" if len(Ps) > 1 else "") + " threads; JAX on XLA's own pool",
                 fontsize=9.5)
    fig.tight_layout()
    return save_figure(fig, stem)
