"""The sequences section of the report: recurrences over time against torch and JAX, and the predicted crossover.

Reads the rows of :mod:`chainprod.bench_sequences` (``structure`` = the
cell, ``depth`` = T, ``width`` = hidden, ``batch`` = N): per problem and
worker count ``P`` a table of every implementation's gradient time and its
ratio to the fastest backprop peer at that ``P``, every chainprod row slower
than that peer, and per cell, hidden size, T and N the simulator's worker
count at which a scan of the adjoints would beat the measured compiled
backprop through time (:func:`chainprod.bench_sequences.crossover_workers`).
Nothing is measured here.
"""

from __future__ import annotations

from . import cost
from .bench_sequences import PEERS, crossover_workers, is_sequence, state_width

__all__ = ["sequence_problem", "comparable", "sequence_columns", "sequence_table", "slower_rows",
           "crossover_rows", "crossover_table", "sequence_summary", "sequence_section", "SEQUENCES_NOTE"]

#: the table's columns: (method, label)
_COLUMNS = (("backprop", "chainprod BPTT (numba)"), ("backprop-numpy", "chainprod BPTT (numpy)"),
            ("torch", "torch autograd"), ("jax", "JAX jit(grad) lax.scan"), ("auto", "cp auto"),
            ("sklansky", "cp sklansky scan"))
_NAMES = dict(_COLUMNS)

#: what the section measured, for the report
SEQUENCES_NOTE = (
    "One layer over T steps, `input_size = hidden`, a batch of N sequences: `nn.RNN` (`rnn_tanh`, `rnn_relu`), "
    "`nn.GRU`, `nn.LSTM`, or `cp.DiagonalRecurrence` (`diag_recurrence`, d_in = d = d_out = hidden). Each time is one "
    "training step's gradient of the sum of every output with respect to every parameter (forward and backward, "
    "median ms), in brackets its ratio to the fastest backprop peer at the same P (chainprod's compiled BPTT, "
    "torch, JAX; above 1x: slower). chainprod's BPTT loop runs on one thread, BLAS on P; torch on "
    "`torch.set_num_threads(P)`; JAX on XLA's own pool (every core), measured once and compared at every P; "
    "`auto` and `sklansky` on the threads executor with `workers=P` (vectorized at P=1). The diagonal layer's "
    "torch peer is an eager loop over T (torch has no such module).")


def _ms(v):
    return "" if v in (None, "") else f"{v * 1e3:.3g}"


def sequence_problem(r) -> str:
    """``"gru T=1000 H=20 N=16"`` (and the dtype if not float64) for a sequences row, ``""`` for any other row."""
    if not is_sequence(r):
        return ""
    return f"{r['structure']} T={r['depth']} H={r['width']} N={r['batch']}" + (
        f" {r['dtype']}" if r["dtype"] != "float64" else "")


def comparable(r, b) -> bool:
    """Whether baseline row ``b`` may be compared with row ``r``: for sequences rows, only at the same P.

    JAX's one row (XLA's own pool) is compared at every P; rows of other sections always pass.
    """
    return not is_sequence(r) or b["workers"] == r["workers"] or b["method"] == "jax"


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok" and is_sequence(r) and r.get("total_median")]


def _key(r):
    return r["structure"], r["depth"], r["width"], r["batch"], r["dtype"]


def sequence_columns(rows):
    """``[(problem in words, P, {method: row})]`` per problem and P, cheapest problem first; JAX joins every P."""
    groups, jax = {}, {}
    for r in _ok(rows):
        if r["method"] == "jax":
            jax[_key(r)] = r
        else:
            groups.setdefault((_key(r), r["workers"]), {})[r["method"]] = r
    order = sorted(groups, key=lambda k: (k[0][1] * k[0][2] ** 2 * k[0][3], k))
    return [(sequence_problem(next(iter(groups[k].values()))), k[1], {**groups[k], **(
        {"jax": jax[k[0]]} if k[0] in jax else {})}) for k in order]


def sequence_table(rows) -> str:
    """Markdown: per problem and P, each implementation's ms (its ratio to the fastest peer at that P)."""
    lines = ["| problem | P | " + " | ".join(n for _, n in _COLUMNS) + " | BPTT us/step |",
             "|---|---|" + "---|" * (len(_COLUMNS) + 1)]
    for prob, P, g in sequence_columns(rows):
        cells = []
        for m, _ in _COLUMNS:
            r = g.get(m)
            x = r and r.get("speedup_total")
            cells.append("" if r is None else _ms(r["total_median"]) + (f" ({1 / x:.2f}x)" if x else ""))
        bp = g.get("backprop")
        step = f"{bp['total_median'] * 1e6 / bp['depth']:.3g}" if bp else ""
        lines.append(f"| {prob} | {P} | " + " | ".join(cells) + f" | {step} |")
    return "\n".join(lines)


def slower_rows(rows) -> list[str]:
    """One sentence per chainprod row slower than the fastest backprop peer at its P."""
    out = []
    for prob, P, g in sequence_columns(rows):
        for m, r in g.items():
            x = r.get("speedup_total")
            if m in ("torch", "jax") or not x or x >= 1:
                continue
            best = r["best_backprop_total"]
            out.append(f"{prob}, P={P}: {_NAMES.get(m, m)} took {_ms(r['total_median'])} ms, {1 / x:.2f}x the "
                       f"{_NAMES.get(best, best)}'s {_ms(r['best_backprop_total_median'])} ms")
    return out


def crossover_rows(rows, model=None) -> list[dict]:
    """Per (cell, T, hidden, N) measured: the predicted crossover worker count against the measured BPTT.

    Each is :func:`~chainprod.bench_sequences.crossover_workers`'s dict with
    ``"problem"``, ``"S"``, ``"bptt"`` (the compiled BPTT's seconds at
    P = 1) and ``"sklansky"`` (the measured sklansky row at P = 1), either
    None where not measured.
    """
    model = model or cost.load_model()
    seen = {}
    for r in _ok(rows):
        got = seen.setdefault(_key(r), {"bptt": None, "sklansky": None})
        if r["workers"] == 1 and r["method"] in ("backprop", "sklansky"):
            got["bptt" if r["method"] == "backprop" else "sklansky"] = r["total_median"]
    out = []
    for key, got in sorted(seen.items()):
        cell, T, H, N, _ = key
        c = crossover_workers(cell, T, H, N, got["bptt"], got["sklansky"], model=model)
        out.append({**c, **got, "S": state_width(cell, H),
                    "problem": sequence_problem(dict(zip(("structure", "depth", "width", "batch", "dtype"), key)))})
    return out


def crossover_table(rows, model=None) -> str:
    """Markdown: per problem, the predicted worker count at which a scan would beat backprop through time."""
    lines = ["| problem | state S | BPTT ms (P=1) | sklansky ms (P=1) | a scan beats BPTT from P = | scan ms "
             "there | fastest predicted scan |", "|---|---|---|---|---|---|---|"]
    for c in crossover_rows(rows, model):
        where = f"{c['P']:,}" if c["P"] else f"never below P={2 ** 16:,}"
        bptt = _ms(c["bptt"]) if c["bptt"] else f"{_ms(c['backprop'])} (estimated)"
        scan = _ms(c["sklansky"]) if c["sklansky"] else "not measured (estimated)"
        lines.append(f"| {c['problem']} | {c['S']} | {bptt} | {scan} | {where} | {_ms(c['scan'])} | "
                     f"{_ms(c['best_scan'])} ms at P={c['best_P']:,} |")
    return "\n".join(lines)


def sequence_summary(rows) -> list[str]:
    """The terminal summary's lines for the section (none without sequences rows)."""
    cols = sequence_columns(rows)
    if not cols:
        return []
    out = ["sequences (a training step's gradient; ratios to the fastest backprop peer at the same P):"]
    for prob, P, g in cols:
        out.append(f"  {prob}, P={P}: " + ", ".join(
            f"{_NAMES.get(m, m)} {_ms(r['total_median'])} ms" + (f" ({1 / r['speedup_total']:.2f}x)" if
                                                               r.get("speedup_total") else "")
            for m, r in sorted(g.items(), key=lambda kv: [c for c, _ in _COLUMNS].index(kv[0])
                               if kv[0] in _NAMES else 99)) + ".")
    return out


def sequence_section(rows, model=None) -> list[str]:
    """The report's "Sequences" section as markdown lines (none without sequences rows)."""
    if not _ok(rows):
        return []
    slower = slower_rows(rows)
    parts = ["", "## Sequences", "", SEQUENCES_NOTE, "", sequence_table(rows), "",
             f"chainprod rows slower than the fastest backprop peer ({', '.join(PEERS)}) at the same P: "
             f"{len(slower)}" + (":" if slower else "."), ""]
    parts += [f"- {s}" for s in slower]
    parts += ["", "### Predicted crossover: workers at which a scan would beat backprop through time", "",
              "The simulator (`chainprod.cost.simulate`: the best of sklansky, brent_kung and chunked, threads "
              "latencies, each worker one core) costs the adjoint recurrence over the T+1 state Jacobians (dense "
              "S x S; diagonal for the diagonal layer) at P = 1, 2, 4, ... workers, scaled so that its sklansky "
              "time at P=1 equals the measured sklansky row (or, where that was skipped, an estimate from its "
              "flops), and compared with the measured compiled BPTT at P=1. A scan would also need the forward "
              "pass, left out here: the crossover is optimistic.", "", crossover_table(rows, model)]
    return parts
