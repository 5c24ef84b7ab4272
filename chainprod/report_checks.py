"""The sweep's checks on its own rows: does ``auto`` hold against backprop, and how well did the model predict.

Read from the rows of ``results.csv``; nothing is measured here.
:mod:`chainprod.report` puts the results in words.
"""

from __future__ import annotations

import numpy as np

from .bench import BASELINES, SHARDED

__all__ = ["AUTO_TOLERANCE", "auto_check", "prediction_summary"]

#: ``auto`` may be this much slower than the best backprop (beyond its own noise) before it is flagged
AUTO_TOLERANCE = 0.10


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _problem_key(r):
    return r["structure"], r["depth"], r["width"], r["batch"], r["dtype"]


def load_drift(r, compiled, metric) -> float:
    """How much slower the compiled backprop ran beside the ``auto`` row ``r`` than in its problem's own row.

    ``compiled`` maps ``(problem, workers)`` (and ``(problem, None)``) to
    the problem's compiled backprop rows. An ``auto`` row carries
    ``paired_backprop_{metric}_median``, the compiled backprop re-measured
    right after it; their ratio is the load that moved between the two
    measurements (1 where either is missing).
    """
    paired = r.get(f"paired_backprop_{metric}_median")
    key = _problem_key(r)
    own = compiled.get((key, r["workers"])) or compiled.get((key, None))
    t = own.get(f"{metric}_median") if own else None
    return paired / t if paired and t else 1.0


def auto_check(rows, tolerance=AUTO_TOLERANCE) -> dict:
    """Is every ``auto`` row within ``tolerance`` of the best backprop, beyond its own noise?

    A row violates the property on a metric (backward, end-to-end) when
    ``median - IQR > (1 + tolerance) x best backprop median x drift``:
    slower by more than the tolerance even after granting it its measured
    spread. ``drift`` (:func:`load_drift`) is how much slower the compiled
    backprop ran when re-measured beside the row than in the problem's own
    row, measured earlier: on a shared machine the load moves between the
    two by more than the tolerance, which is no fault of ``auto``'s choice.
    Sharded rows are not checked: their ``auto`` chooses between the
    pipeline and a scan across the shards, never a local backprop.

    Returns ``{"checked": n, "tolerance": t, "violations": [{"row": r, "ratios": {metric: ratio}}]}``
    with ``ratio`` = the row's median over the best backprop's median (times
    the drift), for each violated metric.
    """
    ok = _ok(rows)
    compiled = {}
    for r in ok:
        if r["method"] == "backprop":
            compiled.setdefault((_problem_key(r), r["workers"]), r)
            compiled.setdefault((_problem_key(r), None), r)
    autos = [r for r in ok if r["method"] == "auto" and r["backend"] not in SHARDED]
    out = {"checked": len(autos), "tolerance": tolerance, "violations": []}
    for r in autos:
        ratios = {}
        for metric in ("backward", "total"):
            best = r.get(f"best_backprop_{metric}_median")
            if not best or not r.get(f"{metric}_median"):
                continue
            best *= load_drift(r, compiled, metric)
            if r[f"{metric}_median"] - (r[f"{metric}_iqr"] or 0.0) > (1 + tolerance) * best:
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
