"""What a sweep found, in words: the ``auto`` check, wins and losses, the model's accuracy, ``report.md``.

Everything here reads the rows of ``results.csv`` (:func:`chainprod.bench.read_results`)
and the ``results.json`` metadata; nothing is measured. The comparisons are
the sweep's own: every speedup is against the *best backprop* of its problem
(the fastest baseline measured there), for the backward pass and end to end.
A sharded row (``ray-sharded``, ``dask-sharded``) times one training step of
a model resident on P workers (its backward includes the SGD update), and is
compared the same way.
"""

from __future__ import annotations

import html
import os
import re

import numpy as np

from .bench import BASELINES, SHARDED

__all__ = ["AUTO_TOLERANCE", "auto_check", "prediction_summary", "wins_and_losses", "sharded_lines",
           "summary_lines", "results_table", "write_report", "SHARDED_NOTE"]

#: ``auto`` may be this much slower than the best backprop (beyond its own noise) before it is flagged
AUTO_TOLERANCE = 0.10

_BASELINE_NAMES = {"backprop-numpy": "backprop (numpy)", "jax": "JAX jit(grad)", "torch": "torch autograd"}


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


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _where(r) -> str:
    """``"auto on threads P=2 (sklansky)"``: a scan row in words."""
    p = f" P={r['workers']}" if r["backend"] not in ("vectorized", "serial") else ""
    if r["backend"] in SHARDED:
        return f"a training step by {r['method']} on {r['backend']}{p} (ran {r['schedule']} across the shards)"
    ran = "" if str(r["schedule"]).startswith("backprop") else f" ({r['schedule']})"  # said apart where it matters
    return f"{r['method']} on {r['backend']}{p}{ran}"


def _problem(r) -> str:
    return f"{r['structure']} L={r['depth']} w={r['width']}" + (f" N={r['batch']}" if r["batch"] != 1 else "") + (
        f" {r['dtype']}" if r["dtype"] != "float64" else "")


def baseline_name(method, rows=()) -> str:
    """A baseline's name for people: ``"backprop (numba)"``, ``"JAX jit(grad)"``.

    ``backprop`` is named by its kernels, read from its rows in ``rows``
    (the compiled loop where numba is installed, else the numpy loop).
    """
    if method == "backprop":
        kernels = next((r["backend"] for r in rows if r.get("method") == "backprop"), None)
        return f"backprop ({kernels})" if kernels else "backprop"
    return _BASELINE_NAMES.get(method, str(method))


def auto_check(rows, tolerance=AUTO_TOLERANCE) -> dict:
    """Is every ``auto`` row within ``tolerance`` of the best backprop, beyond its own noise?

    A row violates the property on a metric (backward, end-to-end) when
    ``median - IQR > (1 + tolerance) x best backprop median``: slower by more
    than the tolerance even after granting it its measured spread. Sharded
    rows are not checked: their ``auto`` chooses between the pipeline and a
    scan across the shards, never a local backprop.

    Returns ``{"checked": n, "tolerance": t, "violations": [{"row": r, "ratios": {metric: ratio}}]}``
    with ``ratio`` = the row's median over the best backprop's median, for each violated metric.
    """
    autos = [r for r in _ok(rows) if r["method"] == "auto" and r["backend"] not in SHARDED]
    out = {"checked": len(autos), "tolerance": tolerance, "violations": []}
    for r in autos:
        ratios = {}
        for metric in ("backward", "total"):
            best = r.get(f"best_backprop_{metric}_median")
            if best and r[f"{metric}_median"] - (r[f"{metric}_iqr"] or 0.0) > (1 + tolerance) * best:
                ratios[metric] = r[f"{metric}_median"] / best
        if ratios:
            out["violations"].append({"row": r, "ratios": ratios})
    return out


def prediction_summary(rows) -> dict:
    """How well the model predicted the measured times, per backend and worker count."""
    errors = {}
    for r in _ok(rows):
        if r.get("prediction_error_total") is None:
            continue
        key = "backprop" if r["method"] in BASELINES else f"{r['backend']}/P={r['workers']}"
        e = errors.setdefault(key, {"total": [], "backward": []})
        e["total"].append(abs(r["prediction_error_total"]))
        e["backward"].append(abs(r["prediction_error_backward"]))
    out = {}
    for k, v in sorted(errors.items()):
        t, b = np.array(v["total"]), np.array(v["backward"])
        out[k] = {"n": int(t.size), "median_abs_error_total": float(np.median(t)),
                  "within_25pct_total": float(np.mean(t <= 0.25)),
                  "median_abs_error_backward": float(np.median(b)),
                  "within_25pct_backward": float(np.mean(b <= 0.25))}
    return out


def _problems(rows):
    out = {}
    for r in _ok(rows):
        out.setdefault((r["structure"], r["depth"], r["width"], r["batch"], r["dtype"]), []).append(r)
    return out


def _ran_backprop(r) -> bool:
    return str(r["schedule"]).startswith("backprop")  # sharded: the pipeline across the shards


def wins_and_losses(rows) -> list[str]:
    """One plain sentence per problem: chainprod's fastest configuration against the best backprop, backward pass.

    The fastest configuration may be ``auto`` having chosen backprop itself;
    the sentence says so, and only a real scan at or above 1x counts as a win.
    """
    out = []
    for _, rs in sorted(_problems(rows).items()):
        tried = [r for r in rs if r["method"] not in BASELINES and r.get("speedup_backward")]
        if not tried:
            continue
        s = max(tried, key=lambda r: r["speedup_backward"])
        bp, t_bp = baseline_name(s["best_backprop_backward"], rs), s["best_backprop_backward_median"]
        x, e2e = s["speedup_backward"], s.get("speedup_total")
        what = _where(s) + (", which ran backprop itself" if _ran_backprop(s) and s["backend"] not in SHARDED else "")
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
    """One sentence per structure, sharded backend, P and method: its step at the deepest, widest problem it ran."""
    out = []
    for (_, backend, P, method), rs in sorted(_groups_of(r for r in _ok(rows) if r["backend"] in SHARDED).items()):
        r = max(rs, key=lambda r: (r["depth"], r["width"], r["batch"]))
        bp = baseline_name(r.get("best_backprop_total") or "backprop", rows)
        vs = f"{r['speedup_total']:.2f}x the best backprop's gradient ({bp})" if r.get("speedup_total") else ""
        out.append(f"{_problem(r)}: one training step by {method} on {backend} P={P} (ran {r['schedule']}) took "
                   f"{_ms(r['total_median'])} ms (forward {_ms(r['forward_median'])}, backward and SGD "
                   f"{_ms(r['backward_median'])}), {r.get('bytes_moved') or 0:,.0f} bytes moved, "
                   f"{_count(r.get('measured_rounds') or 0)} cross-shard round(s) in the backward pass; end to end "
                   f"{vs}.")
    return out


def _groups_of(rows):
    out = {}
    for r in rows:
        out.setdefault((r["structure"], r["backend"], r["workers"], r["method"]), []).append(r)
    return out


def summary_lines(rows, meta=None) -> list[str]:
    """The terminal summary of a sweep: the ``auto`` check, wins and losses, the model's accuracy."""
    meta = meta or {}
    ok = _ok(rows)
    lines = [f"{len(ok)} of {len(rows)} measurements ok"
             + (" (interrupted: partial results)" if meta.get("interrupted") else "")]
    chk = auto_check(rows)
    if chk["checked"]:
        n = len(chk["violations"])
        lines.append(f"auto check (no auto row more than {chk['tolerance']:.0%} slower than the best backprop, "
                     f"beyond its own IQR): " + (f"holds for all {chk['checked']} auto rows" if not n else
                                                 f"VIOLATED by {n} of {chk['checked']} auto rows:"))
        for v in chk["violations"]:
            r = v["row"]
            what = ", ".join(f"{_METRICS[m]} {r[f'{m}_median'] * 1e3:.3g} ms (IQR {r[f'{m}_iqr'] * 1e3:.2g}) = "
                             f"{ratio:.2f}x {baseline_name(r[f'best_backprop_{m}'], rows)}"
                             for m, ratio in v["ratios"].items())
            lines.append(f"  {_problem(r)} {_where(r)}{' (ran backprop)' if _ran_backprop(r) else ''}: {what}")
    wl = wins_and_losses(rows)
    wins = sum(": the scan wins:" in s for s in wl)
    lines.append(f"scan vs best backprop, backward pass: a scan beats the best backprop in {wins} of {len(wl)} "
                 "problems (per problem, chainprod's fastest configuration):")
    lines += [f"  {s}" for s in wl]
    sharded = sharded_lines(rows)
    if sharded:
        lines.append("sharded training (one step on P shards, the model resident on the workers):")
        lines += [f"  {s}" for s in sharded]
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


def results_table(rows) -> str:
    """The results as a markdown table, one line per measurement."""
    head = ("| structure | L | w | backend | P | method | plan run | forward ms | backward ms | end-to-end ms "
            "| backward vs best backprop | end-to-end vs best backprop | model: backward ms | model: end-to-end ms "
            "| bytes moved |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['structure']} | {r['depth']} | {r['width']} | {r['backend']} | {r['workers']} | "
                         f"{r['method']} | {r['status'].replace('|', '/')} | | | | | | | | |")
            continue
        lines.append(f"| {r['structure']} | {r['depth']} | {r['width']} | {r['backend']} | {r['workers']} | "
                     f"{r['method']} | {r['schedule']} | {_ms(r['forward_median'])} | {_ms(r['backward_median'])} | "
                     f"{_ms(r['total_median'])} | {_x(r.get('speedup_backward'))} | {_x(r.get('speedup_total'))} | "
                     f"{_ms(r.get('predicted_backward'))} | {_ms(r.get('predicted_total'))} | "
                     f"{_count(r.get('bytes_moved'))} |")
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
    if "jax" in measured:
        parts.append("- JAX: `jit(grad)` fuses the two passes, so its backward time is its end-to-end time minus "
                     "its forward time (`jit` of the loss alone): an estimate.")
    if any(r["backend"] in SHARDED for r in rows):
        parts.append(f"- {SHARDED_NOTE}")
    parts += [f"- {n}" for n in notes]
    parts += ["", "## Findings", ""] + [f"- {line.strip()}" for line in summary_lines(rows, meta)]
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
    with open(path, "w") as f:
        f.write("\n".join(parts))
    with open(os.path.splitext(path)[0] + ".html", "w") as f:
        f.write(_html(parts))
    return path


def _inline(text) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
    text = re.sub(r"\[([^]]*)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text))


def _html(parts) -> str:
    """The markdown of :func:`write_report` as a standalone page (only the constructs it writes)."""
    lines, out, i = "\n".join(parts).split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):  # a fenced block, closed by a bare fence
            j = lines.index("```", i + 1)
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if line.startswith(("- ", "|")):  # a list or a table: every following line that starts the same way
            j = i
            while j < len(lines) and lines[j].startswith(line[:2] if line.startswith("- ") else "|"):
                j += 1
            if line.startswith("- "):
                out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            else:
                body = [x for x in lines[i:j] if not set(x) <= {"|", "-"}]  # drop the separator row
                out.append("<table>" + "".join(
                    "<tr>" + "".join(f"<{t}>{_inline(c.strip())}</{t}>" for c in x.strip("|").split(" | ")) + "</tr>"
                    for x, t in zip(body, ["th"] + ["td"] * len(body))) + "</table>")
            i = j
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:80em;margin:auto;padding:1em} table{border-collapse:collapse;"
             "font-size:85%} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} pre{background:#f4f4f4;"
             "padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>chainprod benchmark report</title><style>"
            f"{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
