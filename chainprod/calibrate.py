"""Measure this machine's costs for the model in :mod:`chainprod.cost`.

``chainprod calibrate`` (or :func:`calibrate`) times, on this machine:

* the fixed cost of one batched numpy call;
* seconds per op of each op class (``mm`` matrix-matrix, ``mv``
  vector-matrix, ``ew`` elementwise) at widths 2..256, batched and in place
  the way the vectorized executor runs a round;
* per layer, for ``mlp`` and ``diagonal_chain`` layers at batch 1 and 16:
  the forward step, the backprop step, and a scan's preparation (Jacobians
  and parameter VJPs);
* per installed engine (threads, ray, dask): the latency of a task, of a
  dependent round (hop) and of a whole run, from tiny schedules whose
  compute is negligible.

Every figure is the median of a few repeats; the result is saved as JSON
where :func:`chainprod.cost.load_model` finds it.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time

import numpy as np

from .cost import _W, CostModel, save_model

__all__ = ["calibrate", "machine_info", "median_time"]


def median_time(fn, repeats=5, min_time=0.0, stat=statistics.median):
    """Median (or ``stat``) seconds of ``fn()`` over ``repeats`` runs (each loops until ``min_time``)."""
    out = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        out.append(dt / n)
    return stat(out)


def _monotone(ts):
    """Costs do not fall as blocks grow: clip load spikes at small sizes (suffix minimum)."""
    return np.minimum.accumulate(np.asarray(ts, float)[::-1])[::-1].tolist()


def machine_info() -> dict:
    import os

    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "system": platform.system(), "release": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "hostname": platform.node()}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # pragma: no cover - older numpy
        info["blas"] = "?"
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return info


def _op_rates(repeats):
    call = median_time(lambda: np.multiply(_a1, _a1, out=_a1), repeats, 2e-3)
    ops = {}
    for cls in ("mm", "mv", "ew"):
        ts = []
        for w in _W:
            if cls == "mm":
                n = int(np.clip(2**21 // w**3, 8, 4096))
                x = np.random.default_rng(0).standard_normal((2 * n, 1, w, w)) / np.sqrt(w)
                a, b = x[0::2], x[1::2]
                fn = lambda a=a, b=b: np.matmul(a, b, out=b)  # noqa: E731  (in place, as sklansky)
            elif cls == "mv":
                n = int(np.clip(2**21 // w**2, 8, 8192))
                a = np.random.default_rng(0).standard_normal((n, 1, 1, w)) / np.sqrt(w)
                b = np.random.default_rng(1).standard_normal((n, 1, w, w)) / np.sqrt(w)
                out = np.empty_like(a)
                fn = lambda a=a, b=b, out=out: np.matmul(a, b, out=out)  # noqa: E731
            else:
                n = int(np.clip(2**20 // w, 8, 8192))
                x = np.random.default_rng(0).uniform(0.9, 1.0, (2 * n, 1, w))
                a, b = x[0::2], x[1::2]
                fn = lambda a=a, b=b: np.multiply(a, b, out=b)  # noqa: E731
            t = median_time(fn, repeats, 2e-3)
            ts.append(max((t - call) / n, 1e-11))
        ops[cls] = {"w": list(_W), "t": _monotone(ts)}
    return call, ops


_a1 = np.ones(4)


def _layer_costs(repeats, widths=_W, batches=(1, 16)):
    """Per-layer forward, backprop and scan-preparation seconds (median), per structure."""
    import chainprod as cp
    from chainprod.grad import loss_seed

    out = {}
    for structure in ("dense", "diagonal"):
        rows = {"forward": [], "backprop": [], "prep": []}
        for N in batches:
            f_row, b_row, p_row = [], [], []
            for w in widths:
                L = int(np.clip(2**19 // (N * w * w), 32, 512)) if structure == "dense" else 512
                chain = cp.mlp([w] * L + [1]) if structure == "dense" else cp.diagonal_chain(L - 1, w)
                x = np.random.default_rng(0).standard_normal((N, w))
                tape = cp.forward(chain, x)
                _, seed = loss_seed(tape, None, None)
                # the bench's own protocol: fresh forward then backward each repeat, medians
                from .bench import _measure

                fw, bw, _, _, _ = _measure(chain, x, "backprop", "vectorized", 1, repeats, False)
                f, b = statistics.median(fw), statistics.median(bw)
                preps = []
                for _ in range(repeats):
                    tape = cp.forward(chain, x)
                    _, seed = loss_seed(tape, None, None)
                    tr = cp.Trace()
                    t0 = time.perf_counter()
                    cp.backward(tape, seed, method="brent_kung", trace=tr)
                    total = time.perf_counter() - t0
                    preps.append(total - sum(e.end - e.start for e in tr.events))
                f_row.append(f / L)
                b_row.append(b / L)
                p_row.append(max(statistics.median(preps), 1e-9) / L)
            rows["forward"].append(_monotone(f_row))
            rows["backprop"].append(_monotone(b_row))
            rows["prep"].append(_monotone(p_row))
        out[structure] = {"w": list(widths), "batch": list(batches), **rows}
    return out


def engine_latency(backend, workers=2, repeats=3):
    """(round latency, task latency, run latency) of ``backend`` from tiny schedules, or None."""
    import chainprod as cp
    from chainprod.schedules import build

    mats = [np.eye(2) * 1.0 for _ in range(65)]
    try:
        cp.suffix_products(mats[:4], method="sequential", backend=backend, workers=workers)  # warm up
    except ImportError:
        return None

    def run(method, L):
        s = build(method, L)
        return median_time(lambda: cp.suffix_products(mats[:L], method=s, backend=backend, workers=workers),
                           repeats), s

    t2, _ = run("sequential", 2)  # one round, one task
    t17, s17 = run("sequential", 17)  # 16 dependent rounds, one task each
    hop = max((t17 - t2) / (s17.rounds - 1), 0.0)
    t_wide, sw = run("hillis_steele", 64)  # rounds of min(P, ops) tasks
    tasks = sum(min(workers, w) for w in sw.widths)
    task = max((t_wide - t2 - (sw.rounds - 1) * hop) / max(tasks - 1, 1), 0.0)
    return hop, task, max(t2 - hop, 0.0)


def calibrate(*, quick=False, engines=("threads", "ray", "dask"), save=True, path=None, progress=print) -> CostModel:
    """Measure this machine and return (and by default save) a :class:`CostModel`."""
    repeats = 3 if quick else 5
    t0 = time.perf_counter()
    progress("calibrate: numpy kernels (call latency, mm / mv / ew per-op times) ...")
    call, ops = _op_rates(repeats)
    progress(f"  call latency {call * 1e6:.2f} us; mm at w=64: {ops['mm']['t'][5] * 1e6:.2f} us/op")
    progress("calibrate: per-layer forward / backprop / scan preparation ...")
    layers = _layer_costs(3 if quick else 5, widths=_W)
    model = CostModel(call_latency=call, ops=ops, layers=layers, machine=machine_info(),
                      source=f"chainprod calibrate ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    ser = median_time(lambda: [np.multiply(_a1, _a1) for _ in range(100)], repeats) / 100
    model.serial_op_latency = ser * 3
    for backend in engines:
        if backend in ("ray", "dask") and importlib.util.find_spec(backend) is None:
            progress(f"calibrate: {backend} not installed; keeping default latencies")
            continue
        progress(f"calibrate: {backend} latencies (task, dependent hop, run) ...")
        try:
            lat = engine_latency(backend, repeats=3 if quick else 5)
        except Exception as e:  # an engine that cannot start must not lose the rest
            progress(f"  {backend} failed ({type(e).__name__}: {e}); keeping default latencies")
            continue
        if lat is None:
            progress(f"  {backend} is not available; keeping default latencies")
            continue
        model.round_latency[backend], model.task_latency[backend], model.run_latency[backend] = lat
        progress(f"  {backend}: hop {lat[0] * 1e3:.3f} ms, task {lat[1] * 1e3:.3f} ms, run {lat[2] * 1e3:.3f} ms")
    progress(f"calibrate: done in {time.perf_counter() - t0:.1f} s")
    if save:
        where = save_model(model, path)
        progress(f"calibrate: saved {where}")
    return model
