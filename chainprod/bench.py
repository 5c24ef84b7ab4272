"""The benchmark sweep: where does the parallel scan beat backprop, measured.

:func:`run_sweep` measures, for every *problem* (structure, depth ``L``,
width ``w``, batch, dtype), the backprop baseline and then every (backend,
workers, method) configuration. Each repeat times the forward pass
(:func:`chainprod.forward`) and the backward pass (:func:`chainprod.backward`)
of the same iteration separately; end-to-end is their sum. Repeats are
summarised as median, min, max and inter-quartile range. One untimed warm-up
run per configuration (it binds the plan, starts engines) carries a
:class:`~chainprod.Trace`, which gives the measured rounds and peak
concurrency.

Results go to ``results.csv`` (one tidy row per measurement, written as each
one finishes, so Ctrl-C keeps them) and ``results.json`` (machine, library
versions, command line, sweep parameters, and the traces of parallel runs).
No pickle anywhere.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["Sweep", "PRESETS", "run_sweep", "problems", "FIELDS", "read_results", "library_versions"]


@dataclass
class Sweep:
    """What to measure. Every list is swept as a full product (minus skips)."""

    depths: list = field(default_factory=lambda: [256, 2048, 16384])
    widths: list = field(default_factory=lambda: [8, 32, 128])
    workers: list = field(default_factory=lambda: [1, 2])
    backends: list = field(default_factory=lambda: ["vectorized", "threads", "ray"])
    methods: list = field(default_factory=lambda: ["backprop", "auto"])
    structures: list = field(default_factory=lambda: ["dense", "diagonal"])
    batches: list = field(default_factory=lambda: [1])
    dtypes: list = field(default_factory=lambda: ["float64"])
    repeats: int = 3
    #: skip a configuration whose predicted time x (repeats + 1) exceeds this (seconds)
    max_config_seconds: float = 6.0
    #: skip problems whose Jacobians would exceed this many bytes
    max_jacobian_bytes: float = 1.5e9
    #: distributed backends only up to this depth (their cost is per-task latency)
    max_distributed_depth: int = 2048
    seed: int = 0


PRESETS = {
    # about 3 minutes on a 2-core machine: wins (long thin / diagonal chains), losses (wide dense, short)
    "default": Sweep(),
    # seconds: for smoke tests and CI
    "quick": Sweep(depths=[64, 1024], widths=[8, 32], workers=[1, 2], backends=["vectorized", "threads"],
                   methods=["backprop", "auto"], structures=["dense", "diagonal"], repeats=2),
}

#: CSV columns, in order
FIELDS = [
    "structure", "depth", "width", "batch", "dtype", "backend", "workers", "method", "schedule",
    "repeats", "status",
    "forward_median", "forward_min", "forward_max", "forward_iqr",
    "backward_median", "backward_min", "backward_max", "backward_iqr",
    "total_median", "total_min", "total_max", "total_iqr",
    "backprop_backward_median", "backprop_total_median", "speedup_backward", "speedup_total",
    "rounds", "peak_width", "num_ops", "measured_rounds", "peak_concurrency", "tasks",
    "flops", "sequential_flops", "brent_bound", "jacobian_bytes",
    "predicted_forward", "predicted_backward", "predicted_total", "prediction_error_backward",
    "prediction_error_total", "machine", "timestamp",
]


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("chainprod", "numpy", "ray", "dask", "distributed", "torch", "jax", "matplotlib", "tqdm"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # pragma: no cover
            out[name] = "?"
    return out


def machine_label(info=None) -> str:
    from .calibrate import machine_info

    info = info or machine_info()
    return f"{info.get('cpus')}-core {info.get('machine')} ({info.get('hostname', '')})".strip()


def problems(sweep: Sweep):
    """The (structure, depth, width, batch, dtype) problems of a sweep, cheapest first."""
    out = []
    for s in sweep.structures:
        for L in sweep.depths:
            for w in sweep.widths:
                for N in sweep.batches:
                    for dt in sweep.dtypes:
                        out.append((s, int(L), int(w), int(N), str(dt)))
    return sorted(out, key=lambda p: (p[1] * p[2] ** (2 if p[0] == "dense" else 1) * p[3], p))


def configurations(sweep: Sweep, depth: int):
    """(backend, workers, method) for one problem; backprop first."""
    out = [("vectorized", 1, "backprop")] if "backprop" in sweep.methods else []
    for backend in sweep.backends:
        for P in (sweep.workers if backend not in ("vectorized", "serial") else [1]):
            if backend in ("ray", "dask") and depth > sweep.max_distributed_depth:
                continue
            for m in sweep.methods:
                if m != "backprop":
                    out.append((backend, int(P), m))
    return out


def _build_chain(structure, L, w, dtype, seed):
    import chainprod as cp

    if structure == "dense":
        return cp.mlp([w] * L + [1], dtype=np.dtype(dtype), seed=seed)
    if structure == "diagonal":
        return cp.diagonal_chain(L - 1, w, dtype=np.dtype(dtype), seed=seed)
    raise ValueError(f"unknown structure {structure!r}; valid: dense, diagonal")


def _jacobian_bytes(structure, L, w, N, dtype):
    per = w * w if structure == "dense" else w
    return float(L * N * per * np.dtype(dtype).itemsize)


def _summary(ts):
    ts = sorted(ts)
    q = np.percentile(ts, [25, 75]) if len(ts) > 1 else (ts[0], ts[0])
    return {"median": statistics.median(ts), "min": ts[0], "max": ts[-1], "iqr": float(q[1] - q[0])}


def backend_available(backend) -> str | None:
    """None if ``backend`` can run here, else the reason it cannot."""
    from .executors import EXECUTORS, get_executor

    if backend not in EXECUTORS:
        return f"unknown backend {backend!r}"
    try:
        get_executor(backend)
    except ImportError as e:
        return f"backend {backend!r} not available: {e}"
    return None


def _measure(chain, x, method, backend, workers, repeats, trace_it):
    import chainprod as cp

    from .grad import loss_seed

    kw = {} if method == "backprop" else {"backend": backend, "workers": workers}
    trace = cp.Trace(backend=backend, workers=workers) if (trace_it and method != "backprop") else None
    # warm-up: binds the plan, chooses "auto", starts engines; carries the trace
    t0 = time.perf_counter()
    tape = cp.forward(chain, x)
    _, seed = loss_seed(tape, None, None)
    cp.backward(tape, seed, method=method, trace=trace, **kw)
    warm = time.perf_counter() - t0
    fw, bw, tot = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tape = cp.forward(chain, x)
        t1 = time.perf_counter()
        _, seed = loss_seed(tape, None, None)
        t2 = time.perf_counter()
        cp.backward(tape, seed, method=method, **kw)
        t3 = time.perf_counter()
        fw.append(t1 - t0)
        bw.append(t3 - t2)
        tot.append((t1 - t0) + (t3 - t2))
    return fw, bw, tot, trace, warm


def _plan(structure, L, w, N, method, backend, workers, blocks):
    from .cost import choose_schedule
    from .schedules import schedule

    if method == "backprop":
        return None
    if method == "auto":
        return choose_schedule(L - 1, blocks=blocks, workers=workers, backend=backend)
    return schedule(method, L - 1, workers=workers, backend=backend)


def run_sweep(sweep: Sweep, out_dir: str, *, progress=True, command=None, log=print) -> dict:
    """Run ``sweep``, writing ``results.csv`` and ``results.json`` to ``out_dir``; return the JSON dict."""
    from . import cost
    from .calibrate import machine_info
    from .schedules import _sequential_flops, _spec_arrays

    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "results.csv")
    json_path = os.path.join(out_dir, "results.json")
    info = machine_info()
    label = machine_label(info)
    model = cost.load_model()
    meta = {
        "command": command if command is not None else " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info, "machine_label": label,
        "versions": library_versions(), "sweep": asdict(sweep), "cost_model": model.source,
        "skipped": [], "traces": {}, "interrupted": False,
    }
    rng = np.random.default_rng(sweep.seed)
    probs = problems(sweep)
    unavailable = {}
    for b in sweep.backends:
        why = backend_available(b)
        if why:
            unavailable[b] = why
            log(f"skipping {why}")
            meta["skipped"].append({"backend": b, "reason": why})
    # Plan the whole sweep first so the progress bar's ETA is the model's estimate.
    work = []
    for prob in probs:
        s, L, w, N, dt = prob
        if _jacobian_bytes(s, L, w, N, dt) > sweep.max_jacobian_bytes:
            why = f"Jacobians would take {_jacobian_bytes(s, L, w, N, dt) / 1e9:.1f} GB"
            meta["skipped"].append({"problem": list(prob), "reason": why})
            continue
        for backend, P, m in configurations(sweep, L):
            if backend in unavailable:
                continue
            try:
                pred = cost.predict_grad(s, L, w, method=m, backend=backend, workers=P, batch=N, model=model)
            except Exception:
                pred = {"total": float("nan"), "forward": float("nan"), "backward": float("nan"), "schedule": m}
            est = pred["total"] * (sweep.repeats + 1)
            if m != "backprop" and np.isfinite(est) and est > sweep.max_config_seconds:
                meta["skipped"].append({"problem": list(prob), "backend": backend, "workers": P, "method": m,
                                        "reason": f"predicted {est:.1f} s > max_config_seconds"})
                continue
            work.append((prob, backend, P, m, pred, est if np.isfinite(est) else 1.0))
    total_est = sum(w_[-1] for w_ in work) + 0.5 * len(probs)
    log(f"{len(work)} measurements over {len(probs)} problems; model estimate {total_est:.0f} s "
        f"({len(meta['skipped'])} skipped: see results.json)")
    bar = _progress(total_est, progress)
    rows = []
    fcsv = open(csv_path, "w", newline="")
    writer = csv.DictWriter(fcsv, fieldnames=FIELDS)
    writer.writeheader()
    chains = {}
    baseline = {}
    try:
        for prob, backend, P, m, pred, est in work:
            s, L, w, N, dt = prob
            bar.set_postfix_str(f"{s} L={L} w={w} N={N} {backend} P={P} {m}")
            if prob not in chains:
                chains.clear()
                chains[prob] = (_build_chain(s, L, w, dt, sweep.seed),
                                rng.standard_normal((N, w)).astype(dt))
            chain, x = chains[prob]
            row = {k: "" for k in FIELDS}
            row.update(structure=s, depth=L, width=w, batch=N, dtype=dt, backend=backend, workers=P,
                       method=m, repeats=sweep.repeats, machine=label,
                       timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                       jacobian_bytes=_jacobian_bytes(s, L, w, N, dt))
            t_start = time.perf_counter()
            try:
                blocks = cost.chain_blocks(s, L, w) if L > 1 else None
                sched = _plan(s, L, w, N, m, backend, P, blocks) if L > 1 else None
                fw, bw, tot, trace, _ = _measure(chain, x, m, backend, P, sweep.repeats,
                                                 trace_it=True)
                row["status"] = "ok"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad configuration must not lose the sweep
                row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                writer.writerow(row)
                fcsv.flush()
                rows.append(row)
                bar.update(est)
                continue
            for name, ts in (("forward", fw), ("backward", bw), ("total", tot)):
                for k, v in _summary(ts).items():
                    row[f"{name}_{k}"] = v
            ran_backprop = trace is not None and trace.schedule == "backprop"  # auto chose backprop
            if m == "backprop" or ran_backprop:
                if m == "backprop":
                    baseline[prob] = (row["backward_median"], row["total_median"])
                row["schedule"] = "backprop" if m == "backprop" else "backprop (auto)"
                row.update(rounds=max(L - 1, 0), peak_width=1, num_ops=max(L - 1, 0))
            else:
                if trace is not None and trace.schedule is not None:
                    sched = trace.schedule  # what really ran (auto decides on the real blocks)
                row["schedule"] = sched.name + (f"(chunks={sched.options['chunks']})"
                                                if "chunks" in sched.options else "")
                spec_flops = sched.flops(blocks)
                row.update(rounds=sched.rounds, peak_width=sched.peak_width, num_ops=sched.num_ops,
                           flops=spec_flops * N, brent_bound=sched.brent_bound(P, blocks) * N,
                           sequential_flops=_sequential_flops(_spec_arrays(blocks, L - 1)) * N)
                if trace is not None:
                    row.update(measured_rounds=trace.rounds, peak_concurrency=trace.peak_concurrency(),
                               tasks=trace.num_tasks)
                    if P > 1 or backend in ("ray", "dask"):
                        key = f"{s}/L={L}/w={w}/N={N}/{dt}/{backend}/P={P}/{m}"
                        meta["traces"][key] = {"schedule": row["schedule"], "events": trace.to_records()}
            bp = baseline.get(prob)
            if bp:
                row["backprop_backward_median"], row["backprop_total_median"] = bp
                row["speedup_backward"] = bp[0] / row["backward_median"]
                row["speedup_total"] = bp[1] / row["total_median"]
            row["predicted_forward"] = pred["forward"]
            row["predicted_backward"] = pred["backward"]
            row["predicted_total"] = pred["total"]
            row["prediction_error_backward"] = pred["backward"] / row["backward_median"] - 1
            row["prediction_error_total"] = pred["total"] / row["total_median"] - 1
            writer.writerow(row)
            fcsv.flush()
            rows.append(row)
            # advance by the estimate, but show real elapsed time in the ETA
            bar.update(est)
            _ = time.perf_counter() - t_start
    except KeyboardInterrupt:
        meta["interrupted"] = True
        log(f"\ninterrupted: keeping the {len(rows)} measurements made so far")
    finally:
        bar.close()
        fcsv.close()
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        meta["rows"] = len(rows)
        meta["prediction"] = prediction_summary(rows)
        with open(json_path, "w") as f:
            json.dump(meta, f, indent=2, default=_json_default)
    meta["csv"], meta["json"] = csv_path, json_path
    return meta


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def prediction_summary(rows) -> dict:
    """How well the model predicted the measured times, per backend and worker count."""
    out = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("prediction_error_total") in ("", None):
            continue
        key = f"{r['backend']}/P={r['workers']}" if r["method"] != "backprop" else "backprop"
        out.setdefault(key, {"total": [], "backward": []})
        out[key]["total"].append(abs(float(r["prediction_error_total"])))
        out[key]["backward"].append(abs(float(r["prediction_error_backward"])))
    summary = {}
    for k, v in out.items():
        t, b = np.array(v["total"]), np.array(v["backward"])
        summary[k] = {"n": int(t.size), "median_abs_error_total": float(np.median(t)),
                      "within_25pct_total": float(np.mean(t <= 0.25)),
                      "median_abs_error_backward": float(np.median(b)),
                      "within_25pct_backward": float(np.mean(b <= 0.25))}
    return summary


class _NoBar:
    def __init__(self, total):
        self.total = total

    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar(total)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar(total)
    return tqdm(total=round(total, 1), unit="s(est)", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| [{elapsed}<{remaining}] {postfix}")


def read_results(path) -> list[dict]:
    """Rows of a ``results.csv`` (or a directory holding one), numbers converted."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.csv")
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if v in ("", None):
                    r[k] = None
                    continue
                try:
                    r[k] = int(v) if k in ("depth", "width", "batch", "workers", "repeats") else float(v) \
                        if k not in ("structure", "dtype", "backend", "method", "schedule", "status", "machine",
                                     "timestamp") else v
                except ValueError:
                    pass
            out.append(r)
    return out
