"""Measure this machine's costs for the model in :mod:`chainprod.cost`.

``chainprod calibrate`` (or :func:`calibrate`) times, on this machine:

* the fixed cost of one batched numpy call;
* the compiled scan kernel's cost per position and per square op;
* the compiled kernels' crossover between a fused loop and BLAS: for one
  sample's row products (a dense layer's forward step, VJP and next row,
  widths 4-256), a batch's (2-32 rows, widths 4-64), square block products
  (a scan's ``w x w`` ops) and a recurrent cell's step, both ways, in
  float32 and float64; the size from which BLAS wins is saved as
  ``kernel_crossover``, which the kernels read (:mod:`chainprod.kernels.crossover`);
* seconds per op of each op class (``mm`` matrix-matrix, ``mv``
  vector-matrix, ``ew`` elementwise) at widths 2..256, batched and in place
  the way the vectorized executor runs a round;
* per layer, for ``mlp`` and ``diagonal_chain`` layers at batch 1 and 16:
  the forward step, the backprop step, and a scan's preparation (Jacobians
  and parameter VJPs), each as a fixed cost per call plus a cost per layer,
  from chains that fit the caches and from chains far beyond them;
* per installed engine (threads, ray, dask): the latency of a task, of a
  dependent round (hop) and of a whole run, from tiny schedules whose
  compute is negligible; on Ray and Dask also the cost per layer (and per
  byte of a layer) that a run adds to the local model.

About a minute on a 2-core machine.

Every figure is the median of a few repeats; the result is saved as JSON
where :func:`chainprod.cost.load_model` finds it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import statistics
import time

import numpy as np

from ._timing import library_versions, machine_info, measure_chainprod, median_time
from .cost import CostModel, layer_bytes, load_model, predict_grad, save_model
from .executors import Trace, cluster
from .grad import backward, forward, loss_cotangent
from .kernels import pack
from .kernels.crossover import using_crossover
from .kernels.scan import scan_rows
from .layers import diagonal_chain, mlp
from .products import suffix_products
from .schedules import build

__all__ = ["calibrate", "calibration_status", "engine_latency", "engine_layer_cost", "kernel_crossover"]

#: block widths of the calibration grid (the model interpolates log-log between them)
WIDTHS = (2, 4, 8, 16, 32, 64, 128, 256)

#: what a calibration must share with this process to be trusted here
_FINGERPRINT_KEYS = ("hostname", "machine", "cpus")
_FINGERPRINT_PACKAGES = ("chainprod", "numpy", "numba")
#: what a calibration measures; raised when it measures more (2: fixed costs per call, costs in and
#: beyond the caches, compiled scan ops, remote costs per layer; 3: the kernels' loop/BLAS crossover,
#: and costs of the kernels that use it; 4: the recurrent steps' crossovers; 5: one sample's row products'
#: crossover apart from a batch's), so older calibrations are redone
MODEL_FORMAT = 5

#: rows and widths of the row products (form "rows", from two rows), widths of one sample's products
#: (form "row", wider: a matrix-vector product stays a loop further), and widths of the square blocks,
#: the crossovers are measured on
CROSSOVER_ROWS = (2, 4, 8, 16, 32)
CROSSOVER_WIDTHS = (4, 8, 12, 16, 24, 32, 48, 64)
CROSSOVER_ROW_WIDTHS = CROSSOVER_WIDTHS + (96, 128, 192, 256)
CROSSOVER_BLOCKS = (2, 3, 4, 6, 8, 12, 16, 24)
#: cells, hidden sizes and batches of the recurrent steps the step crossovers are measured on
CROSSOVER_CELLS = ("rnn_tanh", "lstm")
CROSSOVER_HIDDEN = (8, 16, 32, 64)
CROSSOVER_BATCHES = (1, 4, 16)


def _fingerprint(info=None, versions=None) -> dict:
    info = machine_info() if info is None else info
    versions = library_versions() if versions is None else versions
    return {**{k: info.get(k) for k in _FINGERPRINT_KEYS},
            **{f"version:{p}": versions.get(p) for p in _FINGERPRINT_PACKAGES},
            "cost model format": MODEL_FORMAT}


def calibration_status(model: CostModel | None = None, engines=()) -> str | None:
    """``None`` when ``model`` (default: the saved one) was calibrated here, else why it does not fit.

    "Here" means the same host name, architecture and core count, the same
    versions of chainprod, numpy and numba (whose kernels set the costs), the
    same :data:`MODEL_FORMAT` (what a calibration measures), and measured
    latencies for every engine in ``engines`` (e.g. ``("threads", "ray")``).
    """
    model = load_model() if model is None else model
    if model.source == "defaults" or not model.machine:
        return "no saved calibration"
    saved = model.machine.get("fingerprint")
    if saved is None:
        return "the saved calibration does not record its machine and library versions"
    now = _fingerprint()
    diff = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]
    if diff:
        return f"the saved calibration is for another setup ({'; '.join(diff)})"
    missing = [e for e in engines if e not in model.machine.get("engines", ())]
    return f"the saved calibration did not time {', '.join(missing)}" if missing else None


def _monotone(ts):
    """Costs do not fall as blocks grow: clip load spikes at small sizes (suffix minimum)."""
    return np.minimum.accumulate(np.asarray(ts, float)[::-1])[::-1].tolist()


_a1 = np.ones(4)


def _op_rates(repeats):
    call = median_time(lambda: np.multiply(_a1, _a1, out=_a1), repeats, 2e-3)
    ops = {}
    for cls in ("mm", "mv", "ew"):
        ts = []
        for w in WIDTHS:
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
        ops[cls] = {"w": list(WIDTHS), "t": _monotone(ts)}
    return call, ops


def _scan_preparation(chain, x, repeats):
    """Median seconds of a scan's backward pass outside its combine ops (Jacobians, VJPs)."""
    preps = []
    for _ in range(repeats):
        tape = forward(chain, x)
        cotangent = loss_cotangent(tape)[1]
        tr = Trace()
        t0 = time.perf_counter()
        backward(tape, cotangent, method="brent_kung", trace=tr)
        total = time.perf_counter() - t0
        preps.append(total - sum(e.end - e.start for e in tr.events))
    return max(statistics.median(preps), 1e-9)


def _compiled_op_rates(repeats, widths=WIDTHS):
    """Per-op seconds of the compiled scan kernel (``CostModel.compiled_ops``), or ``{}`` without numba.

    Per width, on one thread: a ``sequential`` scan over ``n`` positions is
    ``n - 1`` thin ops, each forming its position's block (``pos``,
    ``pos_ew``); a ``sklansky`` scan adds square ops (``mm``, ``ew``), whose
    cost is what it takes beyond its ``n - 1`` thin ops.
    """
    if importlib.util.find_spec("numba") is None:
        return {}
    out = {name: {"w": list(widths), "t": []} for name in ("pos", "mm", "pos_ew", "ew")}
    for w in widths:
        for structure, pos, sq in (("dense", "pos", "mm"), ("diagonal", "pos_ew", "ew")):
            n = int(np.clip(2**24 // w**3, 16, 2048)) if structure == "dense" else 2048
            chain = mlp([w] * (n + 2)) if structure == "dense" else diagonal_chain(n + 1, w)
            tape = forward(chain, np.ones((1, w)))
            pc, Y, cotangent = pack(chain), tape.flat, np.ones((1, chain.d_out))
            seq, sk = build("sequential", len(chain) - 1), build("sklansky", len(chain) - 1)
            t_seq, t_sk = (median_time(lambda s=s: scan_rows(pc, Y, cotangent, s, workers=1), repeats)  # noqa: B023
                           for s in (seq, sk))
            thin = seq.num_ops
            t_pos = t_seq / thin
            out[pos]["t"].append(t_pos)
            out[sq]["t"].append(max((t_sk - thin * t_pos) / max(sk.num_ops - thin, 1), 0.1 * t_pos))
    return {name: {"w": tab["w"], "t": _monotone(tab["t"])} for name, tab in out.items()}


def best_threshold(points):
    """The crossover that loses least over ``points``: ``[(multiply-adds, loop seconds, BLAS seconds)]``.

    A threshold ``T`` sends a product of ``m`` multiply-adds to BLAS when
    ``m >= T``; its loss is the sum over the points of ``log(chosen time /
    faster time)`` (each point counts by its ratio, not its size). Candidates
    are the measured sizes and "never"; the smallest of equal losses wins.

    >>> best_threshold([(64, 1.0, 2.0), (512, 2.0, 1.0), (4096, 8.0, 2.0)])
    512
    """
    from .kernels.crossover import NEVER

    def loss(T):
        return sum(math.log((tl if m < T else tb) / min(tl, tb)) for m, tl, tb in points)

    return min(sorted({m for m, _, _ in points}) + [NEVER], key=loss)


def _row_point(N, w, dtype, repeats):
    """``(multiply-adds, loop seconds, BLAS seconds)`` of a dense layer's row products at ``N`` rows, width ``w``."""
    from .kernels.crossover import NEVER
    from .kernels.numba_layers import row_step_seconds

    return N * w * w, row_step_seconds(N, w, dtype, NEVER, repeats), row_step_seconds(N, w, dtype, 0, repeats)


def kernel_crossover(repeats=5, progress=print) -> dict:
    """``{dtype name: {form: T}, "measured": ...}``: the compiled kernels' loop/BLAS crossovers.

    Times both ways of each product on one thread (BLAS limited to one
    thread, as inside the kernels' parallel regions), inside compiled
    loops: one sample's row products at ``CROSSOVER_ROW_WIDTHS`` (form
    ``"row"``), row products of ``CROSSOVER_ROWS x CROSSOVER_WIDTHS``, square
    blocks of ``CROSSOVER_BLOCKS`` (the scan's ops), and a recurrent cell's
    steps (``CROSSOVER_CELLS x CROSSOVER_HIDDEN x CROSSOVER_BATCHES``, the
    forms ``"step"`` at one sample and ``"step_batch"``); each threshold is
    :func:`best_threshold`. ``{}`` without numba or without BLAS.
    """
    if importlib.util.find_spec("numba") is None:
        return {}
    from .kernels import numba_blas
    from .kernels.crossover import NEVER
    from .kernels.recurrent_numba import GATES, step_seconds
    from .kernels.scan_compiled import block_op_seconds

    if not numba_blas.blas_available():
        return {}
    out, measured = {}, {}
    with numba_blas.one_blas_thread():
        for dt in (np.float32, np.float64):
            row = [_row_point(1, w, dt, repeats) for w in CROSSOVER_ROW_WIDTHS]
            rows = [_row_point(N, w, dt, repeats) for N in CROSSOVER_ROWS for w in CROSSOVER_WIDTHS]
            blocks = [(w ** 3, block_op_seconds(w, dt, NEVER, repeats=repeats),
                       block_op_seconds(w, dt, 0, repeats=repeats)) for w in CROSSOVER_BLOCKS]
            steps = {"step": [], "step_batch": []}
            for cell in CROSSOVER_CELLS:
                G = GATES[cell]
                for H in CROSSOVER_HIDDEN:
                    for N in CROSSOVER_BATCHES:
                        steps["step" if N == 1 else "step_batch"].append(
                            (N * G * H * H, step_seconds(cell, H, N, dt, NEVER, repeats),
                             step_seconds(cell, H, N, dt, 0, repeats)))
            name = np.dtype(dt).name
            out[name] = {"row": best_threshold(row), "rows": best_threshold(rows), "blocks": best_threshold(blocks),
                         **{form: best_threshold(points) for form, points in steps.items()}}
            measured[name] = {"row": row, "rows": rows, "blocks": blocks, **steps}
            progress(f"  {name}: BLAS from {out[name]['row']} multiply-adds (one sample's row products), "
                     f"{out[name]['rows']} (a batch's row products), "
                     f"{out[name]['blocks']} (square blocks), {out[name]['step']} and "
                     f"{out[name]['step_batch']} (a recurrent step, one sample and a batch)")
    return {**out, "measured": measured}


#: depth of the short chain of the three a per-layer cost is fitted from
SHORT_DEPTH = 16
#: bytes of parameters and rows of the middle chain: it fits this machine's caches
CACHED_BYTES = 2**20
#: from here on a chain's parameters are streamed from memory (the model's interpolation ends here)
STREAMED_BYTES = 16 * 2**20
#: bytes of the long chain: well beyond the caches, so its per-layer cost is the one of deep chains
LONG_BYTES = 64 * 2**20


def _depth(structure, w, N, nbytes, lo):
    """Depth of a chain of about ``nbytes`` (at least ``lo`` layers; bounded in flops too)."""
    by_bytes = nbytes // layer_bytes(structure, w, N)
    by_flops = 2**24 // (N * w * w) if structure == "dense" else 2**24
    return int(np.clip(min(by_bytes, by_flops), lo, 16384))


def _prep_depth(structure, w, N):
    """Depth of the long chain for the scan preparation: the scan it runs does ~w x the flops."""
    return int(np.clip(2**19 // (N * w * w), 32, 512)) if structure == "dense" else 512


def _chain_of(structure, w, L):
    return mlp([w] * L + [1]) if structure == "dense" else diagonal_chain(L - 1, w)


def _line(t0, L0, t1, L1):
    """``(fixed, per layer)`` of the line through two timings, both kept >= 0."""
    slope = max((t1 - t0) / (L1 - L0), 0.1 * t1 / L1, 1e-12)
    return max(t0 - slope * L0, 0.0), slope


def _layer_costs(repeats, widths=WIDTHS, batches=(1, 16)):
    """Per-call and per-layer forward, backprop and scan-preparation seconds, per structure.

    Forward and backprop are timed on three chains: a short one, one that
    fits the caches and one far beyond them. The first two give the fixed
    cost of a call and the per-layer cost in the caches (``cached``), the
    last two the per-layer cost of deep chains. They are timed by the
    sweep's own protocol (a fresh forward pass, then the backward pass, each
    repeat) with the default backprop kernels, so the model predicts what
    ``method="backprop"`` runs. The scan preparation is a line through a
    short and a longer chain.
    """
    out = {}
    for structure in ("dense", "diagonal"):
        what = ("forward", "backprop", "prep")
        rows, cached, fixed = ({k: [] for k in what} for _ in range(3))
        for N in batches:
            per, near, once = ({k: [] for k in what} for _ in range(3))
            for w in widths:
                x = np.random.default_rng(0).standard_normal((N, w))
                mid = _depth(structure, w, N, CACHED_BYTES, 2 * SHORT_DEPTH)
                depths = (SHORT_DEPTH, mid, max(_depth(structure, w, N, LONG_BYTES, 64), 2 * mid))
                t = []
                for L in depths:
                    m = measure_chainprod(_chain_of(structure, w, L), x, method="backprop", repeats=repeats)
                    t.append((statistics.median(m.forward), statistics.median(m.backward)))
                for k, i in (("forward", 0), ("backprop", 1)):
                    f, c = _line(t[0][i], depths[0], t[1][i], depths[1])
                    _, deep = _line(t[1][i], depths[1], t[2][i], depths[2])
                    once[k].append(f)
                    near[k].append(c)
                    per[k].append(deep)
                L1 = _prep_depth(structure, w, N)
                p0, p1 = (_scan_preparation(_chain_of(structure, w, L), x, repeats) for L in (SHORT_DEPTH, L1))
                f, slope = _line(p0, SHORT_DEPTH, p1, L1)
                once["prep"].append(f)
                per["prep"].append(slope)
            for k in what:
                rows[k].append(_monotone(per[k]))
                fixed[k].append(once[k])
                if near[k]:
                    cached[k].append(_monotone(near[k]))
        out[structure] = {"w": list(widths), "batch": list(batches), **rows, "fixed": fixed,
                          "cached": {k: v for k, v in cached.items() if v},
                          "bytes": [CACHED_BYTES, STREAMED_BYTES]}
    return out


#: widths of the dense chains a remote per-layer cost is fitted from (the wide one ships ~67 MB)
WIDE = (8, 128)


def engine_layer_cost(backend, model, workers=2, repeats=3):
    """``{"layer", "byte"}``: seconds per layer a run on ``backend`` adds to the local model, or None.

    The backward pass of dense chains (sequential schedule) is timed at two
    depths and two widths; what the local model predicts is taken off, and
    the per-layer rest is fitted as ``layer + byte x bytes of the layer``
    (shipping the layers, forming their Jacobians in the workers' Python).
    """
    rest = {}
    for w in WIDE:
        t = {}
        for L in (64, 512):
            tape = forward(_chain_of("dense", w, L), np.ones((1, w)))
            cotangent = loss_cotangent(tape)[1]
            try:
                backward(tape, cotangent, method="sequential", backend=backend, workers=workers)  # warm up
            except ImportError:
                return None
            t[L] = median_time(lambda tape=tape, cot=cotangent: backward(tape, cot, method="sequential",
                                                                         backend=backend, workers=workers),
                               repeats)
            local = (predict_grad("dense", L, w, method="sequential", backend=backend, workers=workers,
                                  model=model)["backward"] - model.remote_time(backend, "dense", w, L))
            t[L] -= local
        rest[w] = max((t[512] - t[64]) / (512 - 64), 0.0)
    (w0, r0), (w1, r1) = sorted(rest.items())
    b0, b1 = layer_bytes("dense", w0), layer_bytes("dense", w1)
    byte = max((r1 - r0) / (b1 - b0), 0.0)
    return {"layer": max(r0 - byte * b0, 0.0), "byte": byte}


def engine_latency(backend, workers=2, repeats=3):
    """``(round latency, task latency, run latency)`` of ``backend`` from tiny schedules, or None.

    Blocks are 2 x 2, so compute is negligible: a one-op run gives the run
    latency, 16 dependent one-op rounds give the round (hop) latency, and the
    wide rounds of ``hillis_steele`` give the latency of a task.
    """
    mats = [np.eye(2) * 1.0 for _ in range(65)]
    try:
        suffix_products(mats[:4], method="sequential", backend=backend, workers=workers)  # warm up
    except ImportError:
        return None

    def run(method, L):
        s = build(method, L)
        return median_time(lambda: suffix_products(mats[:L], method=s, backend=backend, workers=workers),
                           repeats), s

    t2, _ = run("sequential", 2)  # one round, one task
    t17, s17 = run("sequential", 17)  # 16 dependent rounds, one task each
    hop = max((t17 - t2) / (s17.rounds - 1), 0.0)
    t_wide, sw = run("hillis_steele", 64)  # rounds of min(P, ops) tasks
    tasks = sum(min(workers, w) for w in sw.widths)
    task = max((t_wide - t2 - (sw.rounds - 1) * hop) / max(tasks - 1, 1), 0.0)
    return hop, task, max(t2 - hop, 0.0)


def engine_costs(backend, model, repeats=3):
    """``(latencies, remote layer cost)`` of ``backend`` (:func:`engine_latency`, :func:`engine_layer_cost`).

    A Ray or Dask cluster is held for the measurement (:func:`chainprod.cluster`) and shut down
    after it if this started it: an embedded cluster left up kept its processes through the main
    job's sweep that followed, where their periodic work landed in the rows on this machine (the
    torch-models section, one run each: torch's two-thread steps of the w = 256 and w = 128
    models took 3.88 and 3.33 ms with both clusters left up, 2.53 and 2.01 with none; in one main
    job 19.9 and 40.1). ``(None, None)`` if the engine is not available.
    """
    with cluster(backend, workers=2) if backend in ("ray", "dask") else contextlib.nullcontext():
        lat = engine_latency(backend, repeats=repeats)
        if lat is None:
            return None, None
        rem = engine_layer_cost(backend, model, repeats=repeats) if backend in model.remote_layer else None
        return lat, rem


def calibrate(*, quick=False, engines=("threads", "ray", "dask"), save=True, path=None, progress=print) -> CostModel:
    """Measure this machine and return (and by default save) a :class:`~chainprod.cost.CostModel`.

    Parameters
    ----------
    quick : bool
        Fewer repeats (3 instead of 5): a few seconds less, noisier figures.
    engines : tuple of str
        Parallel backends whose latencies to time; those not installed, or
        failing to start, keep the default latencies (and say so).
    save : bool
        Write the model where :func:`chainprod.cost.load_model` finds it
        (``path``, default :func:`chainprod.cost.model_path`).
    progress : callable
        Receives one line per step.
    """
    repeats = 3 if quick else 5
    t0 = time.perf_counter()
    progress("calibrate: numpy kernels (call latency, mm / mv / ew per-op times) ...")
    call, ops = _op_rates(repeats)
    progress(f"  call latency {call * 1e6:.2f} us; mm at w=64: {ops['mm']['t'][WIDTHS.index(64)] * 1e6:.2f} us/op")
    progress("calibrate: compiled kernels' loop/BLAS crossover ...")
    crossover = kernel_crossover(repeats, progress)
    # every cost below is of kernels that choose by this crossover: they run with it now
    with using_crossover(crossover):
        progress("calibrate: compiled scan kernel (per-position and per-op times) ...")
        compiled = _compiled_op_rates(repeats)
        if compiled:
            i = WIDTHS.index(64)
            progress(f"  at w=64: position {compiled['pos']['t'][i] * 1e6:.2f} us, square op "
                     f"{compiled['mm']['t'][i] * 1e6:.2f} us")
        progress("calibrate: per-layer forward / backprop / scan preparation ...")
        layers = _layer_costs(repeats)
    info = machine_info()
    info["fingerprint"] = _fingerprint(info)
    model = CostModel(call_latency=call, ops=ops, layers=layers, compiled_ops=compiled, machine=info,
                      kernel_crossover=crossover, source=f"chainprod calibrate ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    # Python overhead per op of the serial executor: about three small numpy calls
    model.serial_op_latency = 3 * median_time(lambda: [np.multiply(_a1, _a1) for _ in range(100)], repeats) / 100
    for backend in engines:
        if backend in ("ray", "dask") and importlib.util.find_spec(backend) is None:
            progress(f"calibrate: {backend} not installed; keeping default latencies")
            continue
        progress(f"calibrate: {backend} latencies (task, dependent hop, run) ...")
        try:
            lat, rem = engine_costs(backend, model, repeats)
        except Exception as e:  # an engine that cannot start must not lose the rest
            progress(f"  {backend} failed ({type(e).__name__}: {e}); keeping default latencies")
            continue
        if lat is None:
            progress(f"  {backend} is not available; keeping default latencies")
            continue
        model.round_latency[backend], model.task_latency[backend], model.run_latency[backend] = lat
        info.setdefault("engines", []).append(backend)
        progress(f"  {backend}: hop {lat[0] * 1e3:.3f} ms, task {lat[1] * 1e3:.3f} ms, run {lat[2] * 1e3:.3f} ms")
        if rem is not None:
            model.remote_layer[backend] = rem
            progress(f"  {backend}: {rem['layer'] * 1e6:.1f} us per layer + {rem['byte'] * 1e9:.2f} ns per byte "
                     "beyond the local model")
    progress(f"calibrate: done in {time.perf_counter() - t0:.1f} s")
    if save:
        progress(f"calibrate: saved {save_model(model, path)}")
    return model
