"""What a sweep found, in words: the ``auto`` check, wins and losses, the model's accuracy, ``report.md``.

Everything here reads the rows of ``results.csv`` (:func:`chainprod.bench.read_results`)
and the ``results.json`` metadata; nothing is measured. The comparisons are
the sweep's own: every speedup is against the *best backprop* of its problem
(the fastest baseline measured there), for the backward pass and end to end.
A sharded row (``ray-sharded``, ``dask-sharded``) times one training step of
a model resident on P workers (its backward includes the SGD update), and is
compared the same way; a row on ``ray`` or ``dask`` itself is labelled for
what it times, a cluster's per-call latency (:data:`PER_CALL_NOTE`).
:func:`losses` lists every chainprod row slower than a baseline; the
torch-models section is read against torch autograd at the same thread count.
"""

from __future__ import annotations

import os

from .bench import BASELINES, BOUNDS, PER_CALL, SHARDED, TORCH_STRUCTURE
from .report_checks import AUTO_TOLERANCE, auto_check, ok_rows, prediction_summary
from .report_sequences import comparable, sequence_problem, sequence_section, sequence_summary
from .results import markdown_page, write_text_atomic

__all__ = ["AUTO_TOLERANCE", "auto_check", "prediction_summary", "wins_and_losses", "sharded_lines",
           "summary_lines", "results_table", "write_report", "SHARDED_NOTE", "PER_CALL_NOTE", "losses",
           "loss_table", "torch_model_lines", "torch_model_table", "PEERS"]

#: the baselines that are not chainprod: every other row is chainprod's
PEERS = ("jax", "torch")

_BASELINE_NAMES = {"backprop-numpy": "backprop (numpy)", "jax": "JAX jit(grad)", "torch": "torch autograd",
                   "blas": "BLAS floor"}
_METRICS = {"backward": "backward", "total": "end-to-end"}

#: what a sharded row measured, for the report's notes
SHARDED_NOTE = ("sharded rows (`ray-sharded`, `dask-sharded`) time one *training step* of a model resident on P "
                "workers (`chainprod.shard`): `value_and_grad` + `sgd_step`, the median of the timed steps after a "
                "warm-up step (no min/max/IQR). Forward: until the top shard's forward pass ends; backward: the rest "
                "of the step, which includes the SGD update (a few vector ops per shard), so their speedups over "
                "the best backprop (a gradient, no update) are slightly understated. The plan column says what "
                "ran across the shards: `backprop` is the pipeline (at P=2 every scan is that plan). The cost "
                "model does not predict them, and the auto check leaves them out (their auto chooses between the "
                "pipeline and a scan across shards, never a local backprop).")
#: what a per-call row on a cluster measured, for the report's notes
PER_CALL_NOTE = ("rows on `ray` or `dask` themselves (not `-sharded`) ship the whole chain to the cluster on every "
                 "call and run `auto`'s plan there, or backprop on the driver where the cluster cannot win (plan "
                 "`backprop (auto, ran locally)`, the reason in the `note` column): they time *a cluster's per-call "
                 "latency*, which no training loop needs to pay; the sharded rows beside them keep the model on "
                 "the workers.")


def _torch(r) -> bool:
    return r.get("structure") == TORCH_STRUCTURE


def _where(r) -> str:
    """``"auto on threads P=2 (sklansky)"``: a row in words."""
    p = f" P={r['workers']}" if r["backend"] not in ("vectorized", "serial") else ""
    if _torch(r) or r["method"] in BASELINES:
        return baseline_name(r["method"], [r]) + (f" P={r['workers']}" if _torch(r) or sequence_problem(r) else "")
    if r["backend"] in SHARDED:
        return f"a training step by {r['method']} on {r['backend']}{p} (ran {r['schedule']} across the shards)"
    ran = "" if str(r["schedule"]).startswith("backprop") else f" ({r['schedule']})"  # said apart where it matters
    if r["backend"] in PER_CALL:  # a cluster called per call, unless auto kept the gradient on the driver
        ran = (" (ran backprop locally: the cluster could not win)" if "locally" in str(r["schedule"]) else
               f"{ran} per call: a cluster's per-call latency")
    return f"{r['method']} on {r['backend']}{p}{ran}"


def _problem(r) -> str:
    if _torch(r):
        return f"torch MLP w={r['width']} depth={r['depth']} N={r['batch']} {r['dtype']}"
    return sequence_problem(r) or (f"{r['structure']} L={r['depth']} w={r['width']}" + (f" N={r['batch']}" if
            r["batch"] != 1 else "") + (f" {r['dtype']}" if r["dtype"] != "float64" else ""))


def baseline_name(method, rows=()) -> str:
    """A baseline's name for people: ``"backprop (numba)"``, ``"JAX jit(grad)"``.

    ``backprop`` is named by its kernels, read from its rows in ``rows``
    (the compiled loop where numba is installed, else the numpy loop).
    """
    if method == "backprop":
        kernels = next((r["backend"] for r in rows if r.get("method") == "backprop"), None)
        return f"backprop ({kernels})" if kernels else "backprop"
    if method in ("torch_backward", "value_and_grad"):  # the torch-models section's chainprod rows
        kernels = next((r["backend"] for r in rows if r.get("method") == method), None)
        return f"cp.{method}" + (f" ({kernels})" if kernels else "")
    return _BASELINE_NAMES.get(method, str(method))


def _key(r):
    return r["structure"], r["depth"], r["width"], r["batch"], r["dtype"]


def _problems(rows):
    out = {}
    for r in ok_rows(rows):
        out.setdefault(_key(r), []).append(r)
    return out


def _ran_backprop(r) -> bool:
    return str(r["schedule"]).startswith("backprop")  # sharded: the pipeline across the shards


def wins_and_losses(rows) -> list[str]:
    """One plain sentence per problem: chainprod's fastest configuration against the best backprop, backward pass.

    The fastest configuration may be ``auto`` having chosen backprop itself;
    the sentence says so, and only a real scan at or above 1x counts as a win.
    """
    out = []
    for _, rs in sorted(_problems(r for r in rows if not _torch(r)).items()):
        tried = [r for r in rs if r["method"] not in BASELINES and r.get("speedup_backward")]
        if not tried:
            continue
        s = max(tried, key=lambda r: r["speedup_backward"])
        bp, t_bp = baseline_name(s["best_backprop_backward"], rs), s["best_backprop_backward_median"]
        x, e2e = s["speedup_backward"], s.get("speedup_total")
        what = _where(s)
        what += ", which ran backprop itself" if _ran_backprop(s) and "backprop" not in what else ""
        times = f"{s['backward_median'] * 1e3:.3g} ms vs {t_bp * 1e3:.3g} ms for {bp}"
        tail = f"; end to end {e2e:.2f}x" if e2e else ""
        if x >= 1 and not _ran_backprop(s):
            out.append(f"{_problem(s)}: the scan wins: {what} ran the backward pass {x:.2f}x faster than the "
                       f"best backprop ({times}){tail}.")
        elif x >= 1:
            out.append(f"{_problem(s)}: a tie at best: the fastest configuration, {what}, ran at {x:.2f}x the "
                       f"best backprop's speed ({times}){tail}.")
        else:
            out.append(f"{_problem(s)}: backprop wins: {bp} ran the backward pass {1 / x:.2f}x faster than the "
                       f"fastest configuration, {what} ({times}){tail}.")
    return out


def sharded_lines(rows) -> list[str]:
    """One sentence per structure, sharded backend, P and method: its step at the deepest, widest problem it ran.

    Beside it, the per-call row of the same problem on the same engine, P and
    method, where measured: the same cluster shipping the whole chain every call.
    """
    out, per_call = [], {(*_key(r), r["backend"], r["workers"], r["method"]): r for r in ok_rows(rows)
                         if r["backend"] in PER_CALL}
    for (_, backend, P, method), rs in sorted(_groups_of(r for r in ok_rows(rows) if r["backend"] in SHARDED).items()):
        r = max(rs, key=lambda r: (r["depth"], r["width"], r["batch"]))
        bp = baseline_name(r.get("best_backprop_total") or "backprop", rows)
        vs = f"{r['speedup_total']:.2f}x the best backprop's gradient ({bp})" if r.get("speedup_total") else ""
        pc = per_call.get((*_key(r), SHARDED[backend], P, method))
        how = ("auto kept the gradient on the driver: the cluster could not win" if pc and "locally" in
               str(pc["schedule"]) else f"a cluster's per-call latency: the chain shipped every call, ran "
               f"{pc and pc['schedule']}")
        beside = (f" Per call on {pc['backend']} P={P} ({how}), the same gradient took {_ms(pc['total_median'])} ms "
                  "end to end." if pc else "")
        out.append(f"{_problem(r)}: one training step by {method} on {backend} P={P} (ran {r['schedule']}) took "
                   f"{_ms(r['total_median'])} ms (forward {_ms(r['forward_median'])}, backward and SGD "
                   f"{_ms(r['backward_median'])}), {r.get('bytes_moved') or 0:,.0f} bytes moved, "
                   f"{_count(r.get('measured_rounds') or 0)} cross-shard round(s) in the backward pass; end to end "
                   f"{vs}.{beside}")
    return out


# -- where chainprod loses -----------------------------------------------------------------------------
def _slower(r, b, metric):
    """``(ratio, beyond noise)`` of row ``r`` against baseline ``b`` on ``metric``, or None where not both measured."""
    t, tb = r.get(f"{metric}_median"), b.get(f"{metric}_median")
    if not t or not tb:
        return None
    beyond = t - (r.get(f"{metric}_iqr") or 0.0) > tb + (b.get(f"{metric}_iqr") or 0.0)
    return t / tb, beyond


def losses(rows) -> list[dict]:
    """Every chainprod row slower than a baseline: ``[{"row": r, metric: (ratio, winning row, beyond noise)}]``.

    chainprod's rows are all but the peers (:data:`PEERS`) and the bounds
    (:data:`BOUNDS`). A scan, ``auto``, sharded or per-call row meets every
    baseline of its problem, chainprod's own backprop the peers, a
    torch-models row the peers at its thread count; per metric measured on
    both sides the fastest of them wins; ``beyond``: the gap exceeds both IQRs.
    """
    out = []
    for _, rs in sorted(_problems(rows).items()):
        for r in rs:
            if r["method"] in PEERS or r["method"] in BOUNDS:
                continue
            rivals = [b for b in rs if b is not r and b["method"] in (PEERS if r["method"] in BASELINES else BASELINES)
                      and (not _torch(r) or b["workers"] == r["workers"]) and comparable(r, b)]
            entry = {}
            for metric in ("backward", "total"):
                found = [(x, b) for b in rivals if (x := _slower(r, b, metric)) and x[0] > 1]
                if found:
                    (ratio, beyond), b = max(found, key=lambda f: f[0][0])
                    entry[metric] = (ratio, b, beyond)
            if entry:
                out.append({"row": r, **entry})
    return out


def loss_table(rows) -> str:
    """The report's "Where chainprod loses": one line per row of :func:`losses`, the worst first per problem."""
    head = "| problem | chainprod row | backward: slower than | end-to-end: slower than | beyond noise |"
    lines = [head, "|---|---|---|---|---|"]
    for e in losses(rows):
        r = e["row"]
        cells = [f"{e[m][0]:.2f}x {_where(e[m][1])} ({_ms(r[f'{m}_median'])} vs {_ms(e[m][1][f'{m}_median'])} ms)"
                 if m in e else "" for m in _METRICS]
        beyond = ", ".join(_METRICS[m] for m in _METRICS if e.get(m, (0, 0, False))[2]) or "no"
        lines.append(f"| {_problem(r)} | {_where(r)} | {cells[0]} | {cells[1]} | {beyond} |")
    return "\n".join(lines)


# -- the torch-models section ------------------------------------------------------------------------
_TORCH_COLUMNS = (("torch", "torch"), ("jax", "jax"), ("torch_backward", "numba"), ("value_and_grad", "numba"),
                  ("value_and_grad", "numpy"), ("blas", "numpy"))


def _torch_rows(rows):
    """``[(model in words, P, cells)]``: per torch model and P, ``(row, ratio to torch)`` or None per column.

    JAX runs on XLA's own pool (every core), so its one row joins every P.
    """
    groups, jax = {}, {}
    for r in (r for r in ok_rows(rows) if _torch(r)):
        if r["method"] == "jax":
            jax[_key(r)] = r
        else:
            groups.setdefault((_key(r), r["workers"]), {})[(r["method"], r["backend"])] = r
    out = []
    for (prob, P), g in sorted(groups.items()):
        g[("jax", "jax")], ref = jax.get(prob), g.get(("torch", "torch"))
        cells = [(g[k], g[k]["total_median"] / ref["total_median"] if ref else None) if g.get(k) else None
                 for k in _TORCH_COLUMNS]
        out.append((_problem(ref or next(iter(g.values()))), P, cells))
    return out


def torch_model_lines(rows) -> list[str]:
    """One sentence per torch model and thread count: a training step's gradient by each implementation."""
    return [f"{prob}, P={P}: a training step's gradient (forward and backward) took " + ", ".join(
        f"{_where(r)} {_ms(r['total_median'])} ms" + (f" ({x:.3g}x torch)" if x and r["method"] != "torch" else "")
        for r, x in filter(None, cells)) + "." for prob, P, cells in _torch_rows(rows)]


def torch_model_table(rows) -> str:
    """The torch-models section as a markdown table: total ms per implementation, its ratio to torch autograd."""
    names = [baseline_name(m, [{"method": m, "backend": b}]) for m, b in _TORCH_COLUMNS]
    lines = ["| model | P | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for prob, P, cells in _torch_rows(rows):
        lines.append(f"| {prob} | {P} | " + " | ".join(
            "" if c is None else _ms(c[0]["total_median"]) + (f" ({c[1]:.3g}x)" if c[1] and i else "")
            for i, c in enumerate(cells)) + " |")
    return "\n".join(lines)


def _groups_of(rows):
    out = {}
    for r in rows:
        out.setdefault((r["structure"], r["backend"], r["workers"], r["method"]), []).append(r)
    return out


def summary_lines(rows, meta=None) -> list[str]:
    """The terminal summary of a sweep: the ``auto`` check, wins and losses, the model's accuracy."""
    meta = meta or {}
    ok = ok_rows(rows)
    lines = [f"{len(ok)} of {len(rows)} measurements ok"
             + (" (interrupted: partial results)" if meta.get("interrupted") else "")]
    chk = auto_check(rows)
    if chk["checked"]:
        n = len(chk["violations"])
        lines.append(f"auto check (no auto row more than {chk['tolerance']:.0%} slower than the best backprop, "
                     "beyond its own IQR and the load drift measured beside it; JAX's backward, an estimate, "
                     "end to end only): "
                     + (f"holds for all {chk['checked']} auto rows" if not n else
                        f"VIOLATED by {n} of {chk['checked']} auto rows:"))
        for v in chk["violations"]:
            r = v["row"]
            what = ", ".join(f"{_METRICS[m]} {r[f'{m}_median'] * 1e3:.3g} ms (IQR {r[f'{m}_iqr'] * 1e3:.2g}) = "
                             f"{ratio:.2f}x {baseline_name(v['against'][m], rows)}"
                             for m, ratio in v["ratios"].items())
            where = _where(r)
            where += " (ran backprop)" if _ran_backprop(r) and "backprop" not in where else ""
            lines.append(f"  {_problem(r)} {where}: {what}")
    wl = wins_and_losses(rows)
    wins = sum(": the scan wins:" in s for s in wl)
    lines.append(f"scan vs best backprop, backward pass: a scan beats the best backprop in {wins} of {len(wl)} "
                 "problems (per problem, chainprod's fastest configuration):")
    lines += [f"  {s}" for s in wl]
    sharded = sharded_lines(rows)
    if sharded:
        lines.append("sharded training (one step on P shards, the model resident on the workers):")
        lines += [f"  {s}" for s in sharded]
    torch_lines = torch_model_lines(rows)
    if torch_lines:
        lines.append("torch models (nn.Linear + nn.Tanh, mse loss; ratios to torch autograd at the same threads):")
        lines += [f"  {s}" for s in torch_lines]
    lines += sequence_summary(rows)
    lost = [(max(e.get(m, (0,))[0] for m in _METRICS), e) for e in losses(rows)]
    lines.append(f"where chainprod loses: {len(lost)} chainprod rows are slower than a baseline "
                 f"({sum(any(e.get(m, (0, 0, 0))[2] for m in _METRICS) for _, e in lost)} beyond their IQRs); "
                 "report.md lists every one" + (", the worst:" if lost else ""))
    for _, e in sorted(lost, key=lambda x: -x[0])[:5]:
        m = max(_METRICS, key=lambda m: e.get(m, (0,))[0])
        lines.append(f"  {_problem(e['row'])} {_where(e['row'])}: {_METRICS[m]} {e[m][0]:.2f}x {_where(e[m][1])}")
    for k, v in prediction_summary(rows).items():
        lines.append(f"model vs measured [{k}]: median |error| {v['median_abs_error_total']:.0%} end-to-end, "
                     f"{v['within_25pct_total']:.0%} within 25% (n={v['n']})")
    return lines


def _ms(v):
    return "" if v is None else f"{v * 1e3:.3g}"


def _count(v):
    return "" if v is None else f"{v:.0f}"


def _x(v):
    return "" if v is None else f"{v:.2f}x"


#: the results table: (header, column, format)
_TABLE = (("structure", "structure", str), ("L", "depth", str), ("w", "width", str), ("N", "batch", str),
          ("dtype", "dtype", str), ("backend", "backend", str), ("P", "workers", str), ("method", "method", str),
          ("plan run", "schedule", str), ("forward ms", "forward_median", _ms), ("backward ms", "backward_median", _ms),
          ("end-to-end ms", "total_median", _ms), ("backward vs best backprop", "speedup_backward", _x),
          ("end-to-end vs best backprop", "speedup_total", _x), ("model: backward ms", "predicted_backward", _ms),
          ("model: end-to-end ms", "predicted_total", _ms), ("bytes moved", "bytes_moved", _count))


def results_table(rows) -> str:
    """The results as a markdown table, one line per measurement (a failed one: its error as the plan)."""
    lines = ["| " + " | ".join(h for h, _, _ in _TABLE) + " |", "|" + "---|" * len(_TABLE)]
    for r in rows:
        cells = [fmt(r.get(col)) if r.get(col) not in (None, "") else "" for _, col, fmt in _TABLE]
        if r["status"] != "ok":
            cells = cells[:8] + [r["status"].replace("|", "/")] + [""] * (len(_TABLE) - 9)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir, rows, meta, figures=(), *, notes=()) -> str:
    """Write ``report.md`` in ``out_dir``: command, machine, versions, findings, figures, table. Returns its path."""
    path = os.path.join(out_dir, "report.md")
    machine = meta.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    measured = [b for b in BASELINES if any(r["method"] == b for r in rows)]
    parts = ["# chainprod benchmark report", ""]
    if meta.get("interrupted"):
        parts += ["**Interrupted**: these are the measurements made before Ctrl-C.", ""]
    parts += ["```", meta.get("command", "?"), "```", "",
              f"- machine: {meta.get('machine_label', '?')}: {machine.get('processor', '?')}, "
              f"{machine.get('cpus', '?')} cores, {machine.get('memory_gb', '?')} GB, {machine.get('system', '?')} "
              f"{machine.get('release', '')}, BLAS {machine.get('blas', '?')}",
              f"- versions: {versions}",
              f"- run: {meta.get('started', '?')} to {meta.get('finished', '?')}; cost model: "
              f"{meta.get('cost_model', '?')}",
              "- every speedup is against the *best backprop* of its problem: the fastest of the baselines "
              "measured there (" + ", ".join(baseline_name(b, rows) for b in measured) + ")."]
    parts.append("- end to end: one call of `cp.value_and_grad` (what a training step calls) for chainprod's "
                 "local rows, one call of `jit(grad)` for JAX, the forward pass and `loss.backward()` for torch; "
                 "forward and backward: chainprod's two passes timed apart (`cp.forward`, `cp.backward`).")
    if "jax" in measured:
        parts.append("- JAX: `jit(grad)` fuses the two passes, so its backward time is its end-to-end time minus "
                     "its forward time (`jit` of the loss alone): an estimate.")
    if any(r["backend"] in SHARDED for r in rows):
        parts.append(f"- {SHARDED_NOTE}")
    if any(r["backend"] in PER_CALL for r in rows):
        parts.append(f"- {PER_CALL_NOTE}")
    parts += [f"- {n}" for n in notes]
    parts += ["", "## Findings", ""] + [f"- {line.strip()}" for line in summary_lines(rows, meta)]
    if any(_torch(r) for r in rows):
        parts += ["", "## Torch models", "", "`nn.Sequential` of `nn.Linear` + `nn.Tanh` (`depth` linear layers of "
                  "width `w`), one training step's gradient with the mean squared error: end-to-end ms (forward "
                  "and backward), in brackets the ratio to torch autograd at the same thread count P. JAX runs on "
                  "XLA's own pool (every core); the BLAS floor is the step's matrix products alone, a bound no "
                  "row can beat, not a competitor.", "", torch_model_table(rows)]
    parts += sequence_section(rows)
    parts += ["", "## Where chainprod loses", "", "Every chainprod row slower than a baseline it is compared "
              "with (scan, `auto`, sharded and per-call rows: every baseline of the problem; chainprod's own "
              "backprop: JAX and torch; torch models: the peers at the same P), against the fastest such baseline, "
              "per metric; *beyond noise*: the gap exceeds both rows' IQRs.", "", loss_table(rows)]
    if figures:
        parts += ["", "## Figures", ""]
        for p in figures:
            rel = os.path.relpath(p, out_dir)
            name = os.path.splitext(os.path.basename(p))[0].replace("_", " ")
            parts.append(f"![{name}]({rel})" if rel.endswith(".png") else f"- [{name} (SVG)]({rel})")
    skipped = meta.get("skipped") or []
    if skipped:
        parts += ["", f"## Skipped ({len(skipped)})", ""]
        parts += [f"- {s.get('problem') or s.get('backend') or s.get('baseline')}"
                  + (f" {s['backend']} P={s['workers']} {s['method']}" if "problem" in s and "backend" in s else "")
                  + f": {s['reason']}" for s in skipped]
    parts += ["", "## Results", "", results_table(rows), ""]
    # whole or not at all: a Ctrl-C while writing leaves the previous report, never half of one
    text = "\n".join(parts)
    write_text_atomic(path, text)
    write_text_atomic(os.path.splitext(path)[0] + ".html", markdown_page(text, "chainprod benchmark report"))
    return path
