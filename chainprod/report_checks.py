"""The sweep's checks on its own rows: does ``auto`` hold against backprop, and how well did the model predict.

Read from the rows of ``results.csv``; nothing is measured here.
:mod:`chainprod.report` puts the results in words.
"""

from __future__ import annotations

import numpy as np

from .bench import BASELINES, SHARDED

__all__ = ["AUTO_TOLERANCE", "ESTIMATED_BACKWARD", "auto_check", "ok_rows", "prediction_summary", "reference"]

#: Baselines whose backward time is not a call of its own but end to end less forward (JAX fuses the passes)
ESTIMATED_BACKWARD = ("jax",)

#: ``auto`` may be this much slower than the best backprop (beyond its own noise) before it is flagged
AUTO_TOLERANCE = 0.10


def ok_rows(rows):
    """The rows measured without error."""
    return [r for r in rows if r.get("status") == "ok"]


def reference(r, metric):
    """The best backprop an ``auto`` row ``r`` is checked against, with the compiled one measured beside it.

    A problem's baselines are measured first and its ``auto`` rows later; on
    a shared machine the load moves between the two by more than the
    check's tolerance. An ``auto`` row carries
    ``paired_backprop_{metric}_median``, the compiled backprop timed with
    its repeats interleaved with the row's: that figure stands for the compiled backprop (the best
    backprop where that was the compiled one; else the lesser of the best
    and it). Without it, the best backprop as measured.

    A peer whose backward time is an estimate (:data:`ESTIMATED_BACKWARD`:
    JAX's ``jit(grad)`` minus its ``jit(loss)``, one fused call less
    another) has no call's fixed cost in it, while an ``auto`` row's
    backward is one call of :func:`chainprod.backward`: that backward is
    checked against the compiled backprop's call measured beside it, and
    the peer stays in the end-to-end check, where both sides are one call.
    """
    best = r.get(f"best_backprop_{metric}_median")
    paired = r.get(f"paired_backprop_{metric}_median")
    if not best or not paired:
        return best
    if metric == "backward" and r.get(f"best_backprop_{metric}") in ESTIMATED_BACKWARD:
        return paired
    return paired if r.get(f"best_backprop_{metric}") == "backprop" else min(best, paired)


def auto_check(rows, tolerance=AUTO_TOLERANCE) -> dict:
    """Is every ``auto`` row within ``tolerance`` of the best backprop, beyond its own noise?

    A row violates the property on a metric (backward, end-to-end) when
    ``median - IQR > (1 + tolerance) x reference``: slower by more than the
    tolerance even after granting it its measured spread. ``reference`` is
    the best backprop with the compiled backprop timed beside the row
    (:func:`reference`). Sharded rows are not checked: their ``auto``
    chooses between the pipeline and a scan across the shards, never a
    local backprop.

    Returns ``{"checked": n, "tolerance": t, "violations": [{"row": r, "ratios": {metric: ratio},
    "against": {metric: baseline}}]}`` with ``ratio`` = the row's median over the reference and
    ``baseline`` the method the reference is the time of, for each violated metric.
    """
    autos = [r for r in ok_rows(rows) if r["method"] == "auto" and r["backend"] not in SHARDED]
    out = {"checked": len(autos), "tolerance": tolerance, "violations": []}
    for r in autos:
        ratios, against = {}, {}
        for metric in ("backward", "total"):
            ref = reference(r, metric)
            if not ref or not r.get(f"{metric}_median"):
                continue
            if r[f"{metric}_median"] - (r[f"{metric}_iqr"] or 0.0) > (1 + tolerance) * ref:
                ratios[metric] = r[f"{metric}_median"] / ref
                against[metric] = (r.get(f"best_backprop_{metric}")
                                   if ref == r.get(f"best_backprop_{metric}_median") else "backprop")
        if ratios:
            out["violations"].append({"row": r, "ratios": ratios, "against": against})
    return out


def prediction_summary(rows) -> dict:
    """How well the model predicted the measured times, per backend and worker count."""
    errors = {}
    for r in ok_rows(rows):
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
