"""The benchmark sweep: where does the parallel scan beat backprop, measured.

:func:`run_sweep` takes a :class:`Sweep` through four steps:

1. **plan** (:func:`plan_sweep`): every *problem* (structure, depth ``L``,
   width ``w``, batch ``N``, dtype) gets its baselines, then every (backend,
   workers, method) scan configuration, each with the cost model's
   prediction; configurations predicted to run too long are skipped (and
   listed), so the progress bar's ETA is the model's estimate. Then the
   *torch-models* section (:attr:`Sweep.torch_models`): per model and
   thread count ``P``, torch autograd, JAX, the BLAS floor and chainprod's
   entry points for torch users; the *sequences* section: :mod:`chainprod.bench_sequences`;
2. **measure** (:func:`chainprod.bench_rows.measure_job`): one untimed
   warm-up run (it binds the plan, lets ``auto`` choose, compiles, starts
   engines, and carries the :class:`~chainprod.Trace`), then ``repeats``
   timed repeats of the forward and the backward pass, and ``repeats`` of the
   one call a training step makes, ``cp.value_and_grad``, for end to end
   (:mod:`chainprod._timing`); an ``auto`` row times the compiled backprop
   too, each repeat right after its own, for the auto check's load drift;
3. **compare** (:func:`compare_to_best_backprop`): every row's speedup is
   against the *best backprop* of its problem, the fastest of the baselines
   measured here, separately for the backward pass and end-to-end (in the
   torch-models section: the fastest peer at the same thread count);
4. **write** (:class:`ResultsWriter`): ``results.csv`` one tidy row per
   measurement, written as each finishes so Ctrl-C keeps them;
   ``results.json`` the machine, library versions, command, sweep and skips;
   ``traces.json.gz`` the traces of parallel runs (for Gantt charts).

Sharded rows (backends ``ray-sharded``, ``dask-sharded``;
:mod:`chainprod.bench_rows`) time one *training step* of a model that lives
on ``P`` workers instead of one gradient, at each worker count ``P >= 2``
of the sweep; one step of the last of them is traced for the sharded Gantt
chart. Rows on ``ray`` or ``dask`` themselves ship the whole model on every
call: they time a cluster's per-call latency. Every row on a cluster runs in
a second pass, after every row on this machine (the torch-models and
sequences sections included), on one cluster per engine held for that pass:
an idle cluster's processes keep polling, and a local row on every core paid
for it (torch autograd at ``P = 2``: 13.9 ms beside idle clusters, 3.1
without, measured).

The baselines (:data:`BASELINES`), where installed: ``backprop`` (the
compiled loop, ``kernels="numba"``), ``backprop-numpy`` (the numpy loop),
``jax`` (``jit(grad)`` of the chain as a ``lax.scan``) and ``torch``
(autograd, eager). No pickle anywhere.

Ctrl-C ends the sweep at any moment, keeping the rows measured so far: an
:class:`~chainprod.results.Interrupts` guard is checked before each problem
and after each measurement, so an interrupt that a gc or weakref callback
swallowed still ends it. For tests of Ctrl-C,
``$CHAINPROD_BENCH_WAIT_AFTER_ROWS=n`` makes the sweep wait (up to a minute,
saying so on stderr) once ``n`` rows are written, so a test interrupts it at
a known point however fast the sweep runs.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import cost
from ._timing import backprop_kernels, library_versions, machine_info, machine_label
from ._timing_steps import load_torch_first
from .bench_rows import (
    BASELINES,
    BOUNDS,
    PER_CALL,
    SHARDED,
    TORCH_MODELS,
    TORCH_STRUCTURE,
    Clusters,
    Job,
    TorchProblem,
    baseline_backends,
    build_chain,
    cheap_row_repeats,
    cluster_engine,
    jacobian_bytes,
    measure_job,
    sharded_available,
    sharded_engine,
    sharded_estimate,
    torch_jobs,
    torch_problems,
)
from .bench_sequences import SEQUENCES_DEFAULT, SEQUENCES_GRID, is_sequence, run_sequence_problem, sequence_jobs
from .executors import EXECUTORS, get_executor
from .results import FIELDS, WAIT_ENV, Interrupts, ResultsWriter, WaitHook, read_meta, read_results, read_traces

__all__ = ["Sweep", "PRESETS", "BASELINES", "BOUNDS", "PER_CALL", "FIELDS", "Job", "problems", "torch_problems",
           "configurations", "plan_sweep", "measure_job", "compare_to_best_backprop", "run_sweep", "build_chain",
           "backend_available", "SHARDED", "TORCH_MODELS", "TORCH_STRUCTURE", "WAIT_ENV",
           # the files of a sweep (chainprod.results), here for convenience
           "ResultsWriter", "read_results", "read_meta", "read_traces"]

#: for tests of Ctrl-C: once this many rows are written the sweep waits for a signal (see the module docstring)


@dataclass
class Sweep:
    """What to measure. Every list is swept as a full product (minus skips)."""

    depths: list = field(default_factory=lambda: [256, 2048, 16384])
    widths: list = field(default_factory=lambda: [8, 32, 128])
    workers: list = field(default_factory=lambda: [1, 2])
    #: ``ray-sharded`` / ``dask-sharded``: a training step of a model resident on P >= 2 workers
    backends: list = field(default_factory=lambda: ["vectorized", "threads", "ray", "ray-sharded"])
    #: scan methods (``"backprop"`` here is moved to the baselines)
    methods: list = field(default_factory=lambda: ["auto"])
    baselines: list = field(default_factory=lambda: list(BASELINES))
    structures: list = field(default_factory=lambda: ["dense", "diagonal"])
    batches: list = field(default_factory=lambda: [1])
    dtypes: list = field(default_factory=lambda: ["float64"])
    #: the torch-models section: ``(width, depth, batch, dtype)`` of ``nn.Linear`` + ``nn.Tanh`` MLPs, each
    #: measured at every worker count (as torch threads); none unless listed (the default preset lists five)
    torch_models: list = field(default_factory=list)
    #: seconds a torch-models row should take: fewer timed repeats (at least 1) where a step is slow
    torch_row_seconds: float = 1.5
    sequences: list = field(default_factory=list)  #: (cell, T, hidden, batch, dtype): chainprod.bench_sequences
    repeats: int = 3
    #: skip a scan configuration whose predicted time x (repeats + 1) exceeds this (seconds)
    max_config_seconds: float = 6.0
    #: skip problems whose Jacobians would exceed this many bytes
    max_jacobian_bytes: float = 1.5e9
    #: skip problems whose forward pass stores more activations (L x N x w numbers): a deep, batched, wide chain
    #: takes seconds per pass in every baseline (the default keeps every batch-1 problem, batch 64 to L = 2048)
    max_activations: float = 2**22
    #: distributed backends only up to this depth (their cost is per-task latency)
    max_distributed_depth: int = 2048
    seed: int = 0

    def __post_init__(self):
        self.torch_models = [(int(w), int(d), int(n), str(dt)) for w, d, n, dt in self.torch_models]
        if "backprop" in self.methods:
            self.methods = [m for m in self.methods if m != "backprop"]
            self.baselines = ["backprop", *[b for b in self.baselines if b != "backprop"]]


PRESETS = {
    # a few minutes on a 2-core machine: wins (long thin / diagonal chains), losses (wide dense, short), one
    # sample and a batch of 64, and the torch users' MLPs (ray-sharded runs at P=2 only: a single shard is
    # no scan over shards)
    "default": Sweep(batches=[1, 64], torch_models=list(TORCH_MODELS), sequences=list(SEQUENCES_DEFAULT)),
    # under a minute: every section of the default, tiny (a smoke test)
    "quick": Sweep(depths=[64, 1024], widths=[8, 32], workers=[1, 2], backends=["vectorized", "threads"],
                   structures=["dense", "diagonal"], batches=[1, 64], torch_models=[(32, 4, 16, "float32")],
                   repeats=2, sequences=[("gru", 200, 8, 4, "float64")]),
    "sequences": Sweep(depths=[], backends=["threads"], sequences=list(SEQUENCES_GRID), max_config_seconds=30.0),
}

# -- 1. plan -----------------------------------------------------------------------------------------
def problems(sweep: Sweep):
    """The (structure, depth, width, batch, dtype) problems of a sweep, cheapest first."""
    out = [(s, int(L), int(w), int(N), str(dt)) for s in sweep.structures for L in sweep.depths
           for w in sweep.widths for N in sweep.batches for dt in sweep.dtypes]
    return sorted(out, key=lambda p: (p[1] * p[2] ** (2 if p[0] == "dense" else 1) * p[3], p))


def configurations(sweep: Sweep, depth: int):
    """``(backend, workers, method)`` of the scans measured on a problem of this depth."""
    out = []
    for backend in sweep.backends:
        for P in (sweep.workers if backend not in ("vectorized", "serial") else [1]):
            distributed = backend in ("ray", "dask") or sharded_engine(backend)
            if (distributed and depth > sweep.max_distributed_depth) or (sharded_engine(backend) and P < 2):
                continue
            out += [(backend, int(P), m) for m in sweep.methods]
    return out


def backend_available(backend) -> str | None:
    """None if ``backend`` can run here, else the reason it cannot."""
    if sharded_engine(backend):
        return sharded_available(backend)
    if backend not in EXECUTORS:
        return f"unknown backend {backend!r}"
    try:
        get_executor(backend)
    except ImportError as e:
        return f"backend {backend!r} not available: {e}"
    return None


#: rough seconds per layer of the peers' gradient, used for the progress ETA only (never reported)
_PEER_SECONDS_PER_LAYER = {"backprop-numpy": 6e-6, "jax": 2e-6, "torch": 6e-5}
def plan_sweep(sweep: Sweep, model=None) -> tuple[list[Job], list[dict]]:
    """The jobs of a sweep in order (per problem: baselines, then scans) and what was skipped, and why."""
    model = model or cost.load_model()
    baselines, skipped = baseline_backends(sweep.baselines)
    unavailable = {b: why for b in sweep.backends if (why := backend_available(b))}
    skipped += [{"backend": b, "reason": why} for b, why in unavailable.items()]
    kernels = (backprop_kernels() or ["numpy"])[0]  # what the scan rows run (grad's default)
    jobs = []
    for prob in problems(sweep):
        s, L, w, N, dt = prob
        if jacobian_bytes(*prob) > sweep.max_jacobian_bytes:
            gb = jacobian_bytes(*prob) / 1e9
            skipped.append({"problem": list(prob), "reason": f"Jacobians would take {gb:.1f} GB"})
            continue
        if L * N * w > sweep.max_activations:
            skipped.append({"problem": list(prob), "reason": f"L x N x w = {L * N * w:,} activations > "
                                                             f"max_activations ({sweep.max_activations:,.0f})"})
            continue
        bp = cost.predict_grad(s, L, w, method="backprop", batch=N, model=model)
        for name, backend in baselines.items():
            pred = bp if name == "backprop" else {}
            flops = 6.0 * N * (w * w if s == "dense" else w)  # per layer, both passes
            est = bp["total"] if name == "backprop" else L * (_PEER_SECONDS_PER_LAYER[name] + flops / 2e9)
            repeats = cheap_row_repeats(sweep.repeats, est)
            jobs.append(Job(prob, name, backend, 1, pred, est * (repeats + 1) + (0.5 if name == "jax" else 0),
                            call=est))
        for backend, P, m in configurations(sweep, L):
            if backend in unavailable:
                continue
            if sharded_engine(backend):  # no cost model of a training step: a rough estimate, never reported
                pred, call = {}, None
                est = sharded_estimate(backend, P, bp["total"], sweep.repeats,
                                       model.latency("task", sharded_engine(backend)))
            else:
                try:
                    pred = cost.predict_grad(s, L, w, method=m, backend=backend, workers=P, batch=N,
                                             kernels=kernels, model=model)
                except (ValueError, KeyError):  # a method the model cannot cost still runs, unpredicted
                    pred = {}
                call = pred.get("total", bp["total"])
                est = call * (cheap_row_repeats(sweep.repeats, call) + 1)
            if est > sweep.max_config_seconds:
                skipped.append({"problem": list(prob), "backend": backend, "workers": P, "method": m,
                                "reason": f"predicted {est:.1f} s > max_config_seconds"})
                continue
            jobs.append(Job(prob, m, backend, P, pred, est, call=call))
    sharded = [j for j in jobs if sharded_engine(j.backend)]
    if sharded:  # trace the first sharded backend's most expensive problem at its largest P
        first = [j for j in sharded if j.backend == sharded[0].backend]
        max(reversed(first), key=lambda j: j.workers).trace = True
    return jobs + torch_jobs(sweep, skipped) + sequence_jobs(sweep, skipped, model), skipped


# -- 3. compare --------------------------------------------------------------------------------------
def compare_to_best_backprop(rows, best=None) -> dict:
    """Fill each row's speedup over the best backprop of its problem; return that best.

    ``best`` maps ``"backward"``/``"total"`` to ``(baseline name, median seconds)``;
    computed from the ok baseline rows in ``rows`` when not given (a bound,
    :data:`BOUNDS`, is never the best: it competes with no row).
    """
    def measured(r, metric):  # a time of 0 is below resolution (JAX's backward estimate can be): no ratio
        return r["status"] == "ok" and (r.get(f"{metric}_median") or 0) > 0

    if best is None:
        best = {}
        for metric in ("backward", "total"):
            ok = [r for r in rows if r["method"] in BASELINES and measured(r, metric)]
            if ok:
                r = min(ok, key=lambda r: r[f"{metric}_median"])
                best[metric] = (r["method"], r[f"{metric}_median"])
    for r in rows:
        for metric, (name, t) in best.items():
            r[f"best_backprop_{metric}"], r[f"best_backprop_{metric}_median"] = name, t
            if measured(r, metric):
                r[f"speedup_{metric}"] = t / r[f"{metric}_median"]
    return best


# -- progress ----------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar on a terminal, one line per finished problem elsewhere, or nothing."""

    def __init__(self, mode, total, n_problems, log):
        self.mode, self.log, self.n, self.done = mode, log, n_problems, 0
        self.bar = None
        if mode == "bar":
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=round(total, 1), unit="s(est)", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| [{elapsed}<{remaining}] {postfix}")
            except ImportError:
                self.mode = "lines"

    def job(self, job: Job):
        if self.bar is not None:
            s, L, w, N, _ = job.problem
            self.bar.set_postfix_str(f"{s} L={L} w={w} N={N} {job.backend} P={job.workers} {job.method}")

    def job_done(self, job: Job):
        if self.bar is not None:
            self.bar.update(job.estimate)

    def problem_done(self, problem, rows, seconds):
        self.done += 1
        if self.mode != "lines":
            return
        s, L, w, N, dt = problem
        torch_model = s == TORCH_STRUCTURE
        metric = "total" if torch_model else "backward"
        parts = []
        for r in rows:
            if r["status"] != "ok":
                parts.append(f"{r['method']} failed")
            elif r["method"] not in BASELINES and r["method"] not in BOUNDS:
                where = r["backend"] + (f" P={r['workers']}" if r["backend"] not in ("vectorized", "serial") else "")
                x = r.get(f"speedup_{metric}")
                parts.append(f"{r['method']} {where} " + (f"{x:.2f}x" if x not in ("", None) else "unmeasured"))
        if torch_model:
            self.log(f"[{self.done}/{self.n}] torch MLP w={w} depth={L} N={N} {dt} ({seconds:.1f} s): a training "
                     f"step vs the fastest peer at the same thread count: {', '.join(parts) or 'no rows'}")
            return
        best = (rows[0].get("best_backprop_backward") or "?") if rows else "?"
        self.log(f"[{self.done}/{self.n}] {s} L={L} w={w} N={N} {dt} ({seconds:.1f} s): backward vs best "
                 f"backprop ({best}): {', '.join(parts) or 'no scans'}")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _progress_mode(progress) -> str:
    if progress not in (False, None, True, "none", "auto", "bar", "lines"):
        raise ValueError(f"progress must be True, False, 'auto', 'bar', 'lines' or 'none', got {progress!r}")
    if progress in (True, "auto"):
        return "bar" if sys.stderr.isatty() else "lines"
    return "none" if progress in (False, None, "none") else progress


# -- the sweep ---------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, out_dir: str, *, progress="auto", command=None, log=print, model=None,
              interrupts=None) -> dict:
    """Run ``sweep``; write ``results.csv``, ``results.json`` and ``traces.json.gz`` to ``out_dir``.

    Parameters
    ----------
    progress : {"auto", "bar", "lines", "none"} or bool
        ``"auto"`` (or True): a progress bar on a terminal, else one line per
        finished problem; ``"none"`` (or False): silent.
    command : str, optional
        Recorded in ``results.json`` (default: this process's command line).
    log : callable
        Receives the sweep's messages (skips, the plan, per-problem lines).
    model : CostModel, optional
        For predictions and estimates (default: the saved calibration).
    interrupts : Interrupts, optional
        An installed Ctrl-C guard to check between measurements (default:
        one installed for the sweep).

    Returns
    -------
    dict
        The contents of ``results.json`` plus ``csv``, ``json``, ``traces``
        (paths). ``meta["interrupted"]`` is True after Ctrl-C: the rows
        measured so far are kept and the files are valid.
    """
    wait = WaitHook()
    with Interrupts() if interrupts is None else contextlib.nullcontext(interrupts) as interrupts:
        return _sweep(sweep, out_dir, progress, command, log, model, wait, interrupts)


def _sweep(sweep, out_dir, progress, command, log, model, wait, interrupts):
    if sweep.torch_models or sweep.sequences:
        load_torch_first()  # before the sweep's first compiled call starts numba's threads (why: load_torch_first)
    model = model or cost.load_model()
    info = machine_info()
    label = machine_label(info)
    jobs, skipped = plan_sweep(sweep, model)
    for s in skipped:
        if "problem" not in s:
            log(f"skipping {s.get('backend') or s.get('baseline')}: {s['reason']}")
    meta = {"command": command if command is not None else " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": info, "machine_label": label,
            "versions": library_versions(), "sweep": asdict(sweep), "cost_model": model.source,
            "skipped": skipped, "interrupted": False}
    n_problems = len({j.problem for j in jobs})
    total_est = sum(j.estimate for j in jobs)
    log(f"{len(jobs)} measurements over {n_problems} problems; model estimate {total_est:.0f} s "
        f"({len(skipped)} skipped: see results.json)")
    writer = ResultsWriter(out_dir)
    bar = _Progress(_progress_mode(progress), total_est, n_problems, log)
    rng = np.random.default_rng(sweep.seed)
    clusters = Clusters(max((j.workers for j in jobs if cluster_engine(j.backend)), default=2))
    groups = [(prob, list(pj)) for prob, pj in itertools.groupby(jobs, key=lambda j: j.problem)]
    try:
        # Two passes: every row on this machine first, then the rows on Ray and Dask. A cluster left
        # idle between its rows keeps its processes polling (5-6 % of the cores here), and a row on
        # every core pays for each wake-up: torch autograd at P = 2 took 13.9 ms instead of 3.1 after
        # the per-call cluster rows of the sweep's first problem (measured).
        later = {}
        for prob, prob_jobs in groups:
            interrupts.check()
            if is_sequence(prob):
                run_sequence_problem(prob, prob_jobs, sweep, rng, writer, bar, label, clusters, wait,
                                     interrupts.check)
                continue
            remote = [j for j in prob_jobs if cluster_engine(j.backend)]
            state = _run_problem(prob, [j for j in prob_jobs if not cluster_engine(j.backend)], sweep, rng, writer,
                                 bar, label, clusters, wait, interrupts.check, last=not remote)
            if remote:
                later[prob] = (remote, state)
        for engine in sorted({cluster_engine(j.backend) for remote, _ in later.values() for j in remote}):
            try:
                clusters.get(engine)  # held by the sweep, per-call rows too: closed (if started here) after them
            except Exception as e:  # each row then tries on its own and records its error: the sweep goes on
                log(f"{engine}: could not start a cluster for the sweep's rows on it: {type(e).__name__}: {e}")
        for prob, (remote, state) in later.items():
            interrupts.check()
            _run_problem(prob, remote, sweep, rng, writer, bar, label, clusters, wait, interrupts.check, state=state)
    except KeyboardInterrupt:
        meta["interrupted"] = True
    finally:
        bar.close()
        clusters.close()
        meta.update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), rows=len(writer.rows),
                    interrupted=meta["interrupted"] or interrupts.interrupted)  # one a callback swallowed too
        writer.close(meta)
    if meta["interrupted"]:
        log(f"interrupted: kept the {len(writer.rows)} measurements made so far")
    return {**meta, "csv": writer.csv, "json": writer.json, "traces": writer.traces_path}


def _run_problem(problem, jobs, sweep, rng, writer, bar, label, clusters=None, wait=None, check=None, *,
                 state=None, last=True):
    """Measure one problem: its baselines (written together, compared among themselves), then the rest.

    A torch-models problem compares each row with the peers measured at its
    own thread count. ``check`` runs after each measurement (a Ctrl-C lost
    during it drops that row and ends the sweep). Returns the problem's
    state: given back as ``state`` with more of its jobs (the sweep's second
    pass, on the clusters), they run on the same input, against the same
    baselines; the problem is reported done after a call with ``last``.
    """
    t0 = time.perf_counter()
    s, L, w, N, dt = problem
    tp = TorchProblem.build(w, L, N, dt, sweep.seed) if s == TORCH_STRUCTURE else None
    chain = tp.chain if tp else build_chain(s, L, w, dt, sweep.seed)  # the same chain again from the seed
    if state is None:
        state = {"x": tp.x if tp else rng.standard_normal((N, w)).astype(dt), "rows": [], "best": {},
                 "seconds": 0.0}
    x, rows, best = state["x"], state["rows"], state["best"]
    group = (lambda r: r["workers"]) if tp else (lambda r: None)

    def run(job):
        bar.job(job)
        row, trace = measure_job(job, chain, x, sweep.repeats, clusters, tp, sweep.torch_row_seconds)
        if check is not None:
            check()
        row["machine"] = label
        bar.job_done(job)
        return row, trace

    refs = [j for j in jobs if j.reference]
    if refs:
        try:
            for job in refs:
                rows.append(run(job)[0])
        finally:  # after Ctrl-C too: the baselines measured so far are kept
            groups = {}
            for r in rows:
                groups.setdefault(group(r), []).append(r)
            best.update({k: compare_to_best_backprop(rs) for k, rs in groups.items()})
            for r in rows:
                writer.write(r)
        if wait:
            wait(writer)
    for job in (j for j in jobs if not j.reference):
        row, trace = run(job)
        compare_to_best_backprop([row], best.get(group(row), {}))
        writer.write(row, trace)
        rows.append(row)
        if wait:
            wait(writer)
    state["seconds"] += time.perf_counter() - t0
    if last:
        bar.problem_done(problem, rows, state["seconds"])
    return state
