"""The *sequences* section of the sweep: recurrences over time, a training step's gradient by every implementation.

A problem is ``(cell, T, hidden, batch, dtype)`` (:attr:`chainprod.bench.Sweep.sequences`)
with ``cell`` one of :data:`SEQUENCE_CELLS`: a one-layer ``nn.RNN`` (tanh or
relu), ``nn.GRU`` or ``nn.LSTM`` with ``input_size = hidden`` run over ``T``
steps of a batch of ``N`` sequences, or a :class:`chainprod.DiagonalRecurrence`
with ``d_in = d = d_out = hidden``. Every row times the gradient of the sum
of every output with respect to every parameter (``loss="sum"``), at each
worker count ``P`` of the sweep (:data:`SEQUENCE_METHODS`):

``backprop`` (backend ``numba``), ``backprop-numpy`` (``numpy``)
    ``cp.value_and_grad(model, u, loss="sum", method="backprop", kernels=...)``:
    compiled backprop through time, and the numpy reference loop; the loop
    runs on one thread, BLAS (the input projections) on ``P``;
``torch``
    the torch module's forward and ``output.sum().backward()`` with
    ``torch.set_num_threads(P)`` (for ``diag_recurrence``, which torch has no module
    for, the recurrence as an eager loop, only up to :data:`TORCH_LOOP_STEPS`);
``jax``
    ``jax.jit(jax.value_and_grad(loss))`` of a ``lax.scan`` of the same cell,
    measured once on XLA's own pool (every core) and compared at every ``P``;
``auto``, ``sklansky`` (backend ``threads`` with ``workers=P``; ``vectorized`` at ``P = 1``)
    ``cp.value_and_grad(..., method=...)``: ``auto`` runs a scan only where
    the cost model predicts it beats the loop; ``sklansky`` runs the adjoints
    as a scan of the state Jacobians (dense ``S x S`` with ``S = H``, ``2H``
    for an LSTM: ``S^3`` flops per op), skipped with its reason where the
    simulator (:func:`chainprod.cost.simulate`) predicts it beyond the
    sweep's ``max_config_seconds`` or its Jacobians beyond
    ``max_jacobian_bytes``.

Each row is compared with the fastest *backprop peer* at its ``P``
(:data:`PEERS`: chainprod's compiled backprop, torch, JAX), in the
``best_backprop_total`` and ``speedup_total`` columns; CSV columns as
everywhere (``structure`` = the cell, ``depth`` = T, ``width`` = hidden,
``batch`` = N). :func:`crossover_workers` gives the simulator's worker
count at which a scan of the adjoints would beat the measured backprop.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import numpy as np

from . import cost
from ._timing import Timing, median_time, summarize
from ._timing_steps import thread_limit
from .bench_rows import Job, budget_repeats
from .bench_sequence_models import SequenceProblem, sequence_step
from .results import FIELDS

__all__ = ["SEQUENCE_CELLS", "SEQUENCE_METHODS", "SEQUENCES_DEFAULT", "SEQUENCES_GRID", "PEERS", "TORCH_LOOP_STEPS",
           "available", "is_sequence", "sequence_jobs", "run_sequence_problem", "SequenceProblem", "sequence_step",
           "sequence_timing",
           "crossover_workers", "scan_seconds_estimate", "state_width", "parse_sequences",
           "add_sequence_arguments", "compare_at_workers"]

#: the cells of the section (the structure column of its rows)
SEQUENCE_CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm", "diag_recurrence")
#: (method, backend at P = 1, backend at P > 1) of each row: references first, then the scans
SEQUENCE_METHODS = (("backprop", "numba", "numba"), ("backprop-numpy", "numpy", "numpy"), ("torch", "torch", "torch"),
                    ("jax", "jax", "jax"), ("auto", "vectorized", "threads"), ("sklansky", "vectorized", "threads"))
#: the rows every other row is compared with: the fastest of them at the same P
PEERS = ("backprop", "torch", "jax")
#: the default preset's section: under a minute on 2 cores
SEQUENCES_DEFAULT = tuple((c, 1000, 20, n, "float64") for c in ("rnn_tanh", "gru", "lstm") for n in (1, 16))
#: the ``sequences`` preset: T in 10^3..10^5 (10^6 for the diagonal layer), hidden 8, 20, 64, batch 1 and 16
SEQUENCES_GRID = (tuple((c, T, H, n, "float64") for c in ("rnn_tanh", "gru", "lstm") for T in (1000, 10_000, 100_000)
                        for H in (8, 20, 64) for n in (1, 16))
                  + tuple(("diag_recurrence", T, H, n, "float64") for T in (1000, 10_000, 100_000, 1_000_000)
                          for H in (8, 20, 64) for n in (1, 16)))
#: the torch peer of the diagonal layer is an eager loop (one Python step per time step): up to this T
TORCH_LOOP_STEPS = 10_000

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4, "diag_recurrence": 1}
#: rough seconds per step and sample (fixed, per state number): ETA and skips only, never reported
_STEP_SECONDS = {"backprop": (5e-7, 3e-9), "backprop-numpy": (3e-5, 3e-9), "torch": (1e-4, 5e-9),
                 "jax": (3e-6, 3e-9), "auto": (5e-7, 3e-9)}


def available(name) -> bool:
    """Whether ``name`` (``"torch"``, ``"jax"``, ``"numba"``) can be imported here (it is not imported)."""
    return importlib.util.find_spec(name) is not None


def is_sequence(problem_or_row) -> bool:
    """Whether a problem tuple or a CSV row belongs to the sequences section."""
    s = problem_or_row.get("structure") if isinstance(problem_or_row, dict) else problem_or_row[0]
    return s in SEQUENCE_CELLS


def state_width(cell, hidden) -> int:
    """``S``: the numbers of state per sample (``2H`` for an LSTM's ``(h, c)``)."""
    return 2 * hidden if cell == "lstm" else hidden


# -- plan --------------------------------------------------------------------------------------------
def _estimate(method, cell, T, H, N):
    fixed, per = _STEP_SECONDS[method]
    work = _GATES[cell] * H * (H if cell != "diag_recurrence" else 3)
    return T * (fixed + per * N * work)


#: flops per second of a scan's dense block products (numpy, one core), and seconds per step around them:
#: within 2x of the measured sklansky rows on the 2-core VM (T = 1000, hidden 20, batch 1 and 16)
_SCAN_FLOPS, _SCAN_STEP_SECONDS = 2e9, 2e-6


def scan_seconds_estimate(cell, T, H, N) -> float:
    """Rough seconds of one gradient by the ``sklansky`` scan at P = 1: its block products' flops, plus per step.

    ``(T/2) log2 T`` ops of ``S x S`` blocks (``2 S^3`` flops each per sample;
    the diagonal layer's, memory-bound, as ``50 S``), counted by
    :func:`chainprod.cost.round_stats`.
    """
    S = state_width(cell, H)
    ops = sum(thin + sq for thin, sq in cost.round_stats("sklansky", T + 1))
    per_op = 50 * S if cell == "diag_recurrence" else 2 * S ** 3  # diagonal ops: memory-bound, ~1.5 us at S = 64
    return ops * N * per_op / _SCAN_FLOPS + T * _SCAN_STEP_SECONDS


def sequence_jobs(sweep, skipped: list, model=None) -> list:
    """The :class:`~chainprod.bench_rows.Job` list of a sweep's sequences section, each problem's peers first.

    What cannot run here (no torch, no JAX, no numba, no diagonal layer) or
    is predicted too slow is added to ``skipped`` with its reason.
    """
    problems = sorted({(str(c), int(T), int(H), int(N), str(dt)) for c, T, H, N, dt in sweep.sequences},
                      key=lambda p: (p[1] * p[2] ** 2 * p[3], p))
    if not problems:
        return []
    have = {name: available(name) for name in ("torch", "jax", "numba")}
    for name in ("torch", "jax"):
        if not have[name]:
            skipped.append({"baseline": f"{name} (sequences)", "reason": f"{name} is not installed"})
    jobs = []
    for prob in problems:
        cell, T, H, N, dt = prob
        if cell not in SEQUENCE_CELLS:
            raise ValueError(f"sequences: unknown cell {cell!r}; valid: {', '.join(SEQUENCE_CELLS)}")
        S, budget = state_width(cell, H), sweep.max_config_seconds
        states = T * N * S * np.dtype(dt).itemsize
        if states > sweep.max_jacobian_bytes / 2:  # every implementation keeps several arrays of this size
            skipped.append({"problem": list(prob), "reason": f"its T x N x S = {T * N * S:,} states take "
                            f"{states / 1e9:.1f} GB per array > max_jacobian_bytes / 2"})
            continue
        for method, b1, bP in SEQUENCE_METHODS:
            for P in ([os.cpu_count() or 1] if method == "jax" else sweep.workers):
                backend = b1 if P == 1 else bP
                why = None
                if method in ("torch", "jax") and not have[method]:
                    continue  # said once above
                if method == "backprop" and not have["numba"]:
                    why = "numba is not installed: backprop-numpy is the loop here"
                elif method == "torch" and cell == "diag_recurrence" and T > TORCH_LOOP_STEPS:
                    why = f"torch has no diagonal recurrence module; its eager loop is run up to T={TORCH_LOOP_STEPS}"
                if method == "sklansky":
                    jac = T * N * S * S * np.dtype(dt).itemsize * (1 if cell != "diag_recurrence" else 1 / S)
                    est = scan_seconds_estimate(cell, T, H, N) + _estimate("backprop", cell, T, H, N)
                    if jac > sweep.max_jacobian_bytes:
                        why = f"its {T} state Jacobians ({S}x{S}, N={N}) would take {jac / 1e9:.1f} GB"
                    elif est * 2 > budget:
                        why = (f"predicted {est:.1f} s per call ({S}x{S} blocks, {2 * S ** 3:,} flops per op and "
                               "sample) > max_config_seconds / 2")
                else:
                    est = _estimate(method, cell, T, H, N) + (1.5 if method == "jax" else 0.0)
                    if why is None and est * 2 > budget and method != "backprop":
                        why = f"predicted {est:.1f} s per call > max_config_seconds / 2"
                if why:
                    skipped.append({"problem": list(prob), "backend": backend, "workers": P, "method": method,
                                    "reason": why})
                    continue
                jobs.append(Job(prob, method, backend, int(P), {}, min(est * (sweep.repeats + 1), est + 2 * budget)))
    return jobs


# -- measure -----------------------------------------------------------------------------------------
def sequence_timing(method, backend, P, prob, repeats, budget=None, paired=False):
    """``(Timing, schedule, note)`` of one row at ``P`` threads: total seconds of a gradient, per repeat.

    One untimed call first (compiling, JIT, binding, auto's choice), then a
    timed one sizes the repeats to ``budget`` seconds
    (:func:`~chainprod.bench_rows.budget_repeats`); each
    repeat of a call under 2 ms is the mean of enough calls to last 2 ms.
    With ``paired`` the Timing carries ``paired``, the Timing of the compiled
    backprop through time at ``P``, each of its repeats right after the row's.
    """
    steps = [sequence_step(method, backend, P, prob)]
    if paired:
        steps.append(sequence_step("backprop", "numba", P, prob))
    with thread_limit(P):
        firsts = []
        for step in steps:
            step()
            t0 = time.perf_counter()
            step()
            firsts.append(time.perf_counter() - t0)
        n = budget_repeats(repeats, budget, sum(firsts))  # the paired backprop's calls counted in the budget
        ts = [[f] for f in firsts]
        if n > 1:
            ts = [[] for _ in steps]
            for _ in range(n):
                for step, t in zip(steps, ts):
                    t.append(median_time(step, 1, 2e-3))
    timing = Timing([], [], ts[0], paired=Timing([], [], ts[1]) if paired else None)
    threads = f"{P} thread{'s' if P > 1 else ''}"
    schedule, note = {
        "backprop": ("backprop", f"compiled backprop through time (one thread), BLAS on {threads}"),
        "backprop-numpy": ("backprop", f"the numpy reference loop, BLAS on {threads}"),
        "torch": ("autograd, eager", f"torch.set_num_threads({P})" + (", an eager loop over T" if
                                                                       prob.cell == "diag_recurrence" else "")),
        "jax": ("jit(value_and_grad) of lax.scan", f"XLA's own thread pool ({os.cpu_count()} cores)"),
    }.get(method, (method, f"cp.value_and_grad(method={method!r}) on {backend}, {threads}"))
    return timing, schedule, note


def _row(job, repeats):
    cell, T, H, N, dt = job.problem
    row = dict.fromkeys(FIELDS, "")
    row.update(structure=cell, depth=T, width=H, batch=N, dtype=dt, backend=job.backend, workers=job.workers,
               method=job.method, repeats=repeats, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def _measure(job, prob, repeats, budget):
    row = _row(job, repeats)
    try:
        t, row["schedule"], row["note"] = sequence_timing(job.method, job.backend, job.workers, prob, repeats, budget,
                                                          paired=job.method == "auto")
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # one bad configuration must not lose the sweep
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        return row
    row.update(status="ok", repeats=len(t.total), **{f"total_{k}": v for k, v in summarize(t.total).items()})
    if job.method == "auto":  # the compiled BPTT timed beside it (why: bench_rows.paired_fields)
        row["paired_backprop_total_median"] = float(np.median(t.paired.total))
    return row


def compare_at_workers(rows, peers=None):
    """Fill ``best_backprop_total`` and ``speedup_total`` of each row from the fastest peer at its ``P``.

    ``peers``: the ok peer rows (default: those in ``rows``); JAX's one row
    (XLA's own pool) counts at every ``P``.
    """
    peers = [r for r in (rows if peers is None else peers) if r["status"] == "ok" and r["method"] in PEERS
             and r.get("total_median")]
    for r in rows:
        at = [b for b in peers if b["workers"] == r["workers"] or b["method"] == "jax"]
        if at and r["status"] == "ok" and r.get("total_median"):
            b = min(at, key=lambda b: b["total_median"])
            r.update(best_backprop_total=b["method"], best_backprop_total_median=b["total_median"],
                     speedup_total=b["total_median"] / r["total_median"])
    return rows


def run_sequence_problem(problem, jobs, sweep, rng, writer, bar, label, clusters=None, wait=None, check=None):
    """Measure one sequences problem: its peers and references (written together), then ``auto`` and the scan.

    The signature is :func:`chainprod.bench`'s per-problem runner's.
    """
    t0 = time.perf_counter()
    prob = SequenceProblem(*problem, seed=sweep.seed)
    rows = []

    def run(job):
        bar.job(job)
        row = _measure(job, prob, sweep.repeats, sweep.torch_row_seconds)
        if check is not None:
            check()
        row["machine"] = label
        bar.job_done(job)
        return row

    try:
        for job in (j for j in jobs if j.reference):
            rows.append(run(job))
    finally:  # after Ctrl-C too: the references measured so far are kept
        compare_at_workers(rows)
        for r in rows:
            writer.write(r)
    peers = list(rows)
    if wait:
        wait(writer)
    for job in (j for j in jobs if not j.reference):
        row = run(job)
        compare_at_workers([row], peers)
        writer.write(row)
        rows.append(row)
        if wait:
            wait(writer)
    bar.done += 1
    if bar.mode == "lines":
        cell, T, H, N, dt = problem
        parts = [f"{r['method']} P={r['workers']} " + (f"{r['speedup_total']:.2f}x" if r.get("speedup_total")
                                                       else r["status"]) for r in rows if r["method"] not in PEERS]
        bar.log(f"[{bar.done}/{bar.n}] sequences {cell} T={T} H={H} N={N} {dt} ({time.perf_counter() - t0:.1f} s): "
                f"vs the fastest backprop peer at the same P: {', '.join(parts) or 'no rows'}")


# -- the crossover ---------------------------------------------------------------------------------------
def crossover_workers(cell, T, H, N, bptt_seconds=None, scan_seconds=None, *, model=None,
                      max_log2_workers=16) -> dict:
    """The smallest worker count ``P = 2^k`` at which the simulator predicts a scan beating backprop through time.

    The simulator (:func:`chainprod.cost.simulate`: the best of sklansky,
    brent_kung and chunked; the threads executor's latencies; the blocks'
    preparation spread over the P workers) costs the adjoint recurrence's
    ``T + 1`` blocks (dense ``S x S``, diagonal for the diagonal layer) at
    each P. Its level is set by one measurement: its sklansky time at P = 1
    is scaled to ``scan_seconds`` (the measured ``sklansky`` row at P = 1),
    or to :func:`scan_seconds_estimate` where that was not measured; every P
    keeps that factor. Backprop is ``bptt_seconds`` (the measured compiled
    gradient at P = 1; a rough estimate when not given). A scan also needs
    the forward pass, which this leaves out: the crossover is optimistic.

    Returns
    -------
    dict
        ``P`` (None: no ``P <= 2^max_log2_workers`` wins), ``scan`` (the
        scaled scan seconds at ``P``), ``best_P``, ``best_scan`` (the fastest
        scaled scan), ``backprop`` (the seconds compared with), ``factor``
        and ``basis`` (``"measured"`` or ``"estimated"``).
    """
    model = model or cost.load_model()
    S = state_width(cell, H)
    kw = {"structure": "diagonal" if cell == "diag_recurrence" else "dense", "batch": N, "backend": "threads",
          "model": model}
    level = scan_seconds or scan_seconds_estimate(cell, T, H, N)
    factor = level / cost.simulate(T + 1, S, 1, methods=("sklansky",), **kw)["scan"]
    out = {"P": None, "scan": None, "best_P": None, "best_scan": None, "factor": factor,
           "backprop": bptt_seconds or _estimate("backprop", cell, T, H, N),
           "basis": "measured" if scan_seconds else "estimated"}
    for k in range(max_log2_workers + 1):
        t = factor * cost.simulate(T + 1, S, 2 ** k, **kw)["scan"]
        if out["best_scan"] is None or t < out["best_scan"]:
            out.update(best_P=2 ** k, best_scan=t)
        if t < out["backprop"]:
            out.update(P=2 ** k, scan=t)
            break
    return out


# -- the command line ----------------------------------------------------------------------------------
def parse_sequences(s):
    """``"gru:1000:20:16,lstm:100:8:1:float32"`` (CELL:T:HIDDEN:BATCH[:DTYPE]) -> problem tuples.

    ``"none"`` -> ``[]``; ``"default"`` and ``"grid"``: :data:`SEQUENCES_DEFAULT`, :data:`SEQUENCES_GRID`.
    """
    named = {"none": (), "default": SEQUENCES_DEFAULT, "grid": SEQUENCES_GRID}
    if s.strip().lower() in named:
        return list(named[s.strip().lower()])
    out = []
    for part in (p.strip() for p in s.split(",") if p.strip()):
        bits = part.split(":")
        try:
            cell, T, H, N = bits[0], *(int(v) for v in bits[1:4])
            dt = bits[4] if len(bits) > 4 else "float64"
            assert len(bits) in (4, 5)
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"sequence {part!r}: expected CELL:T:HIDDEN:BATCH[:DTYPE], e.g. "
                                             "gru:1000:20:16 or lstm:100:8:1:float32") from None
        if cell not in SEQUENCE_CELLS or dt not in ("float32", "float64") or min(T, H, N) < 1:
            raise argparse.ArgumentTypeError(f"sequence {part!r}: the cell must be one of {', '.join(SEQUENCE_CELLS)}, "
                                             "the sizes positive and the dtype float32 or float64")
        out.append((cell, T, H, N, dt))
    return out


def add_sequence_arguments(parser, presets):
    """Add ``--preset`` and ``--sequences`` to ``chainprod bench``'s parser; return the parser."""
    parser.add_argument("--preset", choices=sorted(presets),
                        help="a named sweep: default, quick (a smoke test), sequences (the recurrences' grid alone: "
                             "T up to 10^5, 10^6 for the diagonal layer)")
    parser.add_argument("--sequences", type=parse_sequences, metavar="PROBLEMS",
                        help="the sequences section: comma list of CELL:T:HIDDEN:BATCH[:DTYPE] (cells "
                             f"{', '.join(SEQUENCE_CELLS)}), or default, grid, none (default: the preset's; "
                             "the default preset: rnn_tanh, gru, lstm at T=1000, hidden 20, batch 1 and 16)")
    return parser
