"""How one row of the sweep is measured: the chain of a problem, the gradient timings, sharded training steps.

:mod:`chainprod.bench` plans the sweep and writes it; this module holds what
one measurement runs:

* :func:`baseline_backends` says which baselines (:data:`BASELINES`) run here;
* :func:`build_chain` builds the chain of a problem;
* :func:`measure_job` measures one job into its CSV row;
* :func:`timing_of` times one gradient (a baseline, a peer or a scan) with
  :mod:`chainprod._timing`;
* the *torch-models* section (structure :data:`TORCH_STRUCTURE`): MLPs as
  torch users write them (:func:`torch_mlp`), one training step's gradient
  by torch autograd, JAX, ``cp.torch_backward``, ``cp.value_and_grad`` on
  the converted chain and BLAS alone (:data:`TORCH_METHODS`,
  :func:`torch_timing`);
* the *sharded* rows (backends :data:`SHARDED`, ``ray-sharded`` and
  ``dask-sharded``) time one training step of a model that lives on ``P``
  workers (:func:`chainprod.shard.shard`): ``value_and_grad`` plus
  ``sgd_step``, by :func:`chainprod.shard.measure_sharded_step`. Their
  forward, backward and total columns are the step's (the backward includes
  the SGD update, a few vector ops per shard), ``bytes_moved`` what crossed
  a process boundary, and the plan column what ran across the shards
  (``backprop`` is the pipeline; at ``P <= 2`` every scan is that plan).
  :class:`Clusters` opens one cluster per engine for the whole sweep.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from dataclasses import dataclass

import numpy as np

from . import cost
from ._timing import MIN_REPEAT_SECONDS, backprop_kernels, measure_chainprod, measure_jax, measure_torch, summarize
from ._timing_steps import grad_clearer, measure_call, measure_matmuls, measure_torch_step, thread_limit
from .executors import cluster
from .layers import diagonal_chain, mlp
from .results import FIELDS
from .schedules import build
from .shard import measure_sharded_step, shard

__all__ = ["BASELINES", "BOUNDS", "SHARDED", "PER_CALL", "baseline_backends", "build_chain", "cluster_engine",
           "timing_of", "CHEAP_ROW_REPEATS", "cheap_row_repeats", "budget_repeats", "measure_job", "jacobian_bytes",
           "sharded_engine", "sharded_available", "sharded_estimate",
           "Clusters", "sharded_row", "measure_sharded", "traced_step", "TORCH_STRUCTURE", "TORCH_MODELS",
           "TORCH_METHODS", "torch_mlp", "TorchProblem", "torch_timing", "Job", "torch_problems", "torch_jobs"]

#: the backprop implementations every problem is measured with, where installed
BASELINES = ("backprop", "backprop-numpy", "jax", "torch")
#: rows that bound every other row from below and compete with none (the torch-models section's BLAS floor)
BOUNDS = ("blas",)
#: backends that ship the whole model to a cluster on every call: their rows time a cluster's per-call latency
PER_CALL = ("ray", "dask")
#: sharded backends of the sweep and the engine each runs on
SHARDED = {"ray-sharded": "ray", "dask-sharded": "dask"}
#: what each engine needs installed
_MODULES = {"ray": "ray", "dask": "distributed"}
#: rough seconds to place a model (start P actors or pinned states, load the kernels there): ETA only
_PLACE_SECONDS = {"ray": 2.5, "dask": 1.5}
#: untimed steps after placing a model (the first loads the kernels on the workers)
WARMUP = 1


def baseline_backends(names) -> tuple[dict, list]:
    """``({baseline: backend label}, [skipped reasons])`` of the baselines that run here."""
    kernels = backprop_kernels()
    run, skipped = {}, []
    for name in names:
        if name == "backprop":
            run[name] = kernels[0] if kernels else "numpy"
        elif name == "backprop-numpy":
            if len(kernels) > 1:
                run[name] = "numpy"
            else:
                skipped.append({"baseline": name, "reason": "backprop already is the numpy loop here "
                                                            "(no compiled kernels)"})
        elif name in ("jax", "torch"):
            if importlib.util.find_spec(name) is None:
                skipped.append({"baseline": name, "reason": f"{name} is not installed"})
            else:
                run[name] = name
        else:
            raise ValueError(f"unknown baseline {name!r}; valid baselines: {', '.join(BASELINES)}")
    return run, skipped



def build_chain(structure, L, w, dtype, seed=0):
    """The chain of a problem: ``mlp([w] * L + [1])`` or ``diagonal_chain(L - 1, w)`` (L layers each)."""
    if structure == "dense":
        return mlp([w] * L + [1], dtype=np.dtype(dtype), seed=seed)
    if structure == "diagonal":
        return diagonal_chain(L - 1, w, dtype=np.dtype(dtype), seed=seed)
    raise ValueError(f"unknown structure {structure!r}; valid: dense, diagonal")


def timing_of(method, backend, workers, chain, x, repeats, *, baseline, paired=False):
    """Time one gradient: a peer (``jax``, ``torch``), a backprop baseline (``backend`` = kernels) or a scan.

    With ``paired`` (a scan row) the Timing carries the compiled backprop's, its repeats interleaved
    with the row's (:attr:`chainprod._timing.Timing.paired`).
    """
    if method == "jax":
        return measure_jax(chain, x, repeats)
    if method == "torch":
        return measure_torch(chain, x, repeats)
    if baseline:  # backprop, backprop-numpy: the backend label is the kernel set
        return measure_chainprod(chain, x, method="backprop", kernels=backend if backprop_kernels() else None,
                                 repeats=repeats, one_call=True)
    return measure_chainprod(chain, x, method=method, backend=backend, workers=workers, repeats=repeats, trace=True,
                             one_call=True, paired=paired)


def paired_fields(backprop) -> dict:
    """The columns of the compiled backprop timed beside an ``auto`` row, under the load that row saw.

    The problem's baselines are measured first and its ``auto`` rows later
    (those on a cluster in the sweep's second pass); on a shared machine the
    load between them moves the times by more than the auto check's
    tolerance. The backprop's repeats run interleaved with the row's, and
    the check rescales the best backprop by how much these differ from the
    problem's own backprop row.
    """
    return {f"paired_backprop_{k}_median": float(np.median(ts)) for k, ts in (("backward", backprop.backward),
                                                                              ("total", backprop.total))}


#: timed repeats of a row of the sweep where :data:`CHEAP_ROW_SECONDS` allows (more than the sweep's
#: ``repeats``). The auto check compares an ``auto`` row's median with the backprop timed between its
#: repeats, and the report every row with its problem's baselines: a median of three moved by 15-30 %
#: on the same call with a Ray or Dask cluster up (auto on Ray ran the local backprop at 1.28x and
#: 1.32x its paired backprop's median in one main job, 0.99x in a loop of 30 interleaved pairs of the
#: same calls; measured), and a baseline's by as much (backprop at 38 us beside an auto row that ran
#: the same backprop in 21 us)
CHEAP_ROW_REPEATS = 11
#: the seconds a row's extra repeats may take (each repeat: the two passes and one call, for an
#: ``auto`` row also its paired backprop's, each at least :data:`chainprod._timing.MIN_REPEAT_SECONDS`)
CHEAP_ROW_SECONDS = 0.5


def cheap_row_repeats(repeats, call_seconds) -> int:
    """Timed repeats of a row whose one call is predicted to take ``call_seconds``.

    As many repeats of an ``auto`` row and its paired backprop (two passes
    and one call each, every one timed for at least ``MIN_REPEAT_SECONDS``)
    as fit :data:`CHEAP_ROW_SECONDS`, at most :data:`CHEAP_ROW_REPEATS`;
    never fewer than the sweep's ``repeats``. The count tapers with the
    call rather than dropping at a cut-off: a 12 ms row (dense L = 2048,
    w = 32, N = 64, ``auto`` on Ray, which runs the local backprop) fell
    just past an all-or-nothing cut-off, took three repeats and was flagged
    by the auto check in one main job (measured).
    """
    per_repeat = 2 * 2 * max(call_seconds, MIN_REPEAT_SECONDS)
    return max(repeats, min(CHEAP_ROW_REPEATS, int(CHEAP_ROW_SECONDS / per_repeat)))


def budget_repeats(repeats, budget, call_seconds) -> int:
    """Timed repeats of a row given a time ``budget`` and one timed call of ``call_seconds``.

    ``repeats`` without a budget; else as many as fit the budget, at least
    one and at most :data:`CHEAP_ROW_REPEATS` (or ``repeats`` if more). The
    torch-models and sequences rows: a median of three single calls of a few
    milliseconds moved with the tail of this VM's per-call times
    (``cp.torch_backward`` at w = 128, float64, P = 2: median 2.2 ms, 90th
    percentile 4.0; in one main job its median of three was 6.6 ms, measured).
    """
    if not budget:
        return repeats
    return max(1, min(max(repeats, CHEAP_ROW_REPEATS), int(budget / max(call_seconds, 1e-9))))


def jacobian_bytes(structure, L, w, N, dtype) -> float:
    """Bytes of the per-layer Jacobians of a problem (what a scan forms; the sweep skips problems above a cap)."""
    return float(L * N * (w * w if structure == "dense" else w) * np.dtype(dtype).itemsize)


_PEER_SCHEDULES = {"jax": "jit(grad) of lax.scan", "torch": "autograd, eager"}


def measure_job(job, chain, x, repeats, clusters=None, torch_problem=None, budget=None) -> tuple[dict, dict | None]:
    """Measure one :class:`Job`: its CSV row (without the comparison) and its trace (or None).

    ``clusters`` (a :class:`Clusters`) holds the clusters of sharded rows;
    without it each sharded row opens its own. ``torch_problem`` (a
    :class:`TorchProblem`) is the model of a torch-models job, whose timed
    repeats are cut (to at least 1) so the row takes about ``budget`` seconds.
    """
    s, L, w, N, dt = job.problem
    row = dict.fromkeys(FIELDS, "")
    row.update(structure=s, depth=L, width=w, batch=N, dtype=dt, backend=job.backend, workers=job.workers,
               method=job.method, repeats=repeats, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
               jacobian_bytes="" if s == TORCH_STRUCTURE else jacobian_bytes(*job.problem))
    try:
        if sharded_engine(job.backend):
            fields, trace = sharded_row(job.backend, job.workers, job.method, chain, x, repeats, clusters, job.trace)
            return {**row, **fields, "status": "ok"}, trace
        if torch_problem is not None:
            t, row["schedule"], row["note"] = torch_timing(job.method, job.backend, job.workers, torch_problem,
                                                           repeats, budget)
            row["repeats"] = len(t.total)
        else:
            paired = job.method == "auto" and L >= 2
            repeats = cheap_row_repeats(repeats, job.call if job.call is not None else job.estimate / (repeats + 1))
            row["repeats"] = repeats
            t = timing_of(job.method, job.backend, job.workers, chain, x, repeats, baseline=job.baseline,
                          paired=paired)
            if paired:
                row.update(paired_fields(t.paired))
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # one bad configuration must not lose the sweep
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        return row, None
    row["status"] = "ok"
    for name, ts in (("forward", t.forward), ("backward", t.backward), ("total", t.total)):
        if ts:  # a call timed as a whole (cp.torch_backward) has no forward/backward split
            row.update({f"{name}_{k}": v for k, v in summarize(ts).items()})
    if torch_problem is not None:
        return row, None
    for k in ("forward", "backward", "total"):
        if k in job.prediction:
            row[f"predicted_{k}"] = job.prediction[k]
            if k != "forward":
                row[f"prediction_error_{k}"] = job.prediction[k] / row[f"{k}_median"] - 1
    trace = t.trace
    # baselines have no trace; auto on a cluster says why it ran (or did not run) there
    note = getattr(trace, "note", "") or None
    if note:
        row["note"] = str(note)
    if job.baseline or L < 2 or trace.schedule == "backprop":  # "backprop": auto chose it
        local = job.backend in PER_CALL and not job.baseline  # auto chose backprop on the driver
        row["schedule"] = _PEER_SCHEDULES.get(job.method, "backprop" if job.baseline else
                                              "backprop (auto, ran locally)" if local else "backprop (auto)")
        row.update(rounds=max(L - 1, 0), peak_width=1, num_ops=max(L - 1, 0))
        return row, None
    sched = (trace.schedule if trace.schedule is not None else
             cost.resolve_schedule(job.method, L - 1, workers=job.workers))
    blocks = cost.chain_blocks(s, L, w)
    row["schedule"] = sched.name + (f"(chunks={sched.options['chunks']})" if "chunks" in sched.options else "")
    row.update(rounds=sched.rounds, peak_width=sched.peak_width, num_ops=sched.num_ops,
               flops=sched.flops(blocks) * N, brent_bound=sched.brent_bound(job.workers, blocks) * N,
               sequential_flops=build("sequential", L - 1).flops(blocks) * N,
               measured_rounds=trace.rounds, peak_concurrency=trace.peak_concurrency(), tasks=trace.num_tasks)
    parallel = job.workers > 1 or job.backend in PER_CALL
    return row, ({"schedule": row["schedule"], "events": trace.to_records()} if parallel else None)


# -- the torch-models section ----------------------------------------------------------------------
#: the structure column of the section's rows
TORCH_STRUCTURE = "torch-mlp"
#: (width, depth, batch, dtype) of the section's models: ``nn.Linear`` + ``nn.Tanh``, ``depth`` linear layers
TORCH_MODELS = ((256, 8, 128, "float32"), (64, 64, 32, "float32"), (1024, 4, 256, "float32"),
                (32, 256, 16, "float64"), (128, 16, 64, "float64"))
#: (method, backend) of each row of the section: peers and bound first, then chainprod; the backend of
#: a chainprod row is its kernel set
TORCH_METHODS = (("torch", "torch"), ("jax", "jax"), ("blas", "numpy"), ("torch_backward", "numba"),
                 ("value_and_grad", "numba"), ("value_and_grad", "numpy"))


@dataclass
class Job:
    """One measurement: a problem, how to run it, the model's prediction and an ETA estimate."""

    problem: tuple
    method: str
    backend: str
    workers: int
    prediction: dict
    estimate: float
    #: keep the trace of one step of this job (a sharded row: the sharded Gantt chart)
    trace: bool = False
    #: the predicted seconds of one call, which size a cheap row's repeats (:func:`cheap_row_repeats`);
    #: None: the estimate over the sweep's repeats and a warm-up
    call: float | None = None

    @property
    def baseline(self) -> bool:
        return self.method in BASELINES

    @property
    def reference(self) -> bool:
        """A baseline or a bound: measured (and written) before the rows compared with them."""
        return self.method in BASELINES or self.method in BOUNDS


def torch_problems(sweep):
    """The problems of the torch-models section, ``(TORCH_STRUCTURE, depth, width, batch, dtype)``, cheapest first."""
    out = [(TORCH_STRUCTURE, d, w, n, dt) for w, d, n, dt in sweep.torch_models]
    return sorted(out, key=lambda p: (p[1] * p[2] ** 2 * p[3], p))


#: rough flops per second of a torch-models step on one thread, and seconds per layer: ETA only
_TORCH_FLOPS, _TORCH_LAYER_SECONDS = 5e9, 6e-5


def torch_jobs(sweep, skipped: list) -> list:
    """The :class:`Job` list of a sweep's torch-models section: peers and the BLAS floor, then chainprod.

    A section that cannot run here (no torch), or a peer missing, is added to ``skipped``.
    """
    if not sweep.torch_models:
        return []
    if importlib.util.find_spec("torch") is None:
        skipped.append({"baseline": "torch models", "reason": "torch is not installed (pip install 'chainprod[test]')"})
        return []
    jax = importlib.util.find_spec("jax") is not None
    if not jax:
        skipped.append({"baseline": "jax (torch models)", "reason": "jax is not installed"})
    jobs = []
    for prob in torch_problems(sweep):
        _, d, w, n, _ = prob
        step = 6.0 * n * w * w * d / _TORCH_FLOPS + 3 * d * _TORCH_LAYER_SECONDS  # forward + backward, one thread
        for method, backend in TORCH_METHODS:
            if method == "jax":  # XLA sizes its own pool: measured once, at every core
                if jax:
                    jobs.append(Job(prob, method, backend, os.cpu_count() or 1, {}, step * 4 + 1.0))
                continue
            for P in sweep.workers:
                est = min(step / P * (sweep.repeats + 3), 2 * sweep.torch_row_seconds + step / P * 3)
                jobs.append(Job(prob, method, backend, int(P), {}, est))
    return jobs


def torch_mlp(width, depth, dtype="float32", seed=0):
    """``nn.Sequential(Linear(w, w), Tanh(), ..., Linear(w, w))``: ``depth`` linear layers, as torch users write it."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mods = []
    for l in range(depth):
        mods += [nn.Linear(width, width)] + ([nn.Tanh()] if l < depth - 1 else [])
    return nn.Sequential(*mods).to({"float32": torch.float32, "float64": torch.float64}[str(dtype)])


@dataclass
class TorchProblem:
    """A torch-models problem: the model, a batch and targets, and the same as a Chain and numpy arrays."""

    model: object
    xt: object
    yt: object
    chain: object
    x: np.ndarray
    y: np.ndarray

    @classmethod
    def build(cls, width, depth, batch, dtype, seed=0):
        import torch

        from .torch import from_torch

        model = torch_mlp(width, depth, dtype, seed)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((batch, width)).astype(dtype)
        y = rng.standard_normal((batch, width)).astype(dtype)
        return cls(model, torch.from_numpy(x), torch.from_numpy(y), from_torch(model), x, y)


def torch_timing(method, backend, P, prob, repeats, budget=None):
    """``(Timing, schedule, note)`` of one row of the torch-models section at ``P`` threads.

    ``torch``: ``mse_loss`` then ``loss.backward()`` with ``torch.set_num_threads(P)``;
    ``jax``: ``jit(grad)`` (XLA's pool: every core); ``blas``: the step's
    matrix products alone; ``torch_backward``: ``cp.torch_backward(model, x,
    y, loss="mse")`` as one call (``.grad`` cleared untimed before each call,
    as before each of torch's steps); ``value_and_grad``: its two halves on the
    converted chain with ``kernels=backend``. BLAS is held to ``P`` threads
    throughout, and chainprod runs on ``threads`` with ``workers=P`` when
    ``P > 1``. One timed step first sizes the repeats to ``budget`` seconds:
    :func:`budget_repeats`.
    """
    from .torch import torch_backward

    ex = {"backend": "threads", "workers": P} if P > 1 else {"backend": "vectorized"}
    run = {"torch": lambda n: measure_torch_step(prob.model, prob.xt, prob.yt, n),
           "jax": lambda n: measure_jax(prob.chain, prob.x, n, y=prob.y),
           "blas": lambda n: measure_matmuls(prob.chain, prob.x, n),
           "torch_backward": lambda n: measure_call(
               lambda: torch_backward(prob.model, prob.xt, prob.yt, loss="mse", **ex), n,
               setup=grad_clearer(prob.model)),
           "value_and_grad": lambda n: measure_chainprod(prob.chain, prob.x, method="auto", kernels=backend,
                                                         repeats=n, y=prob.y, loss="mse", **ex)}
    if method not in run:
        raise ValueError(f"unknown torch-models method {method!r}; valid: {', '.join(sorted(run))}")
    with thread_limit(P):
        t = run[method](1)  # one timed step after the warm-ups (compiling, binding, auto's choice) sizes the rest
        n = budget_repeats(repeats, budget, t.total[0])
        if n > 1:
            t = run[method](n)
    threads = f"{P} thread{'s' if P > 1 else ''}"
    schedule, note = {
        "torch": ("autograd, eager", f"torch.set_num_threads({P})"),
        "jax": ("jit(grad) of lax.scan", f"XLA's own thread pool ({os.cpu_count()} cores)"),
        "blas": ("BLAS matmuls alone", f"the step's matrix products on {threads}: the machine's lower bound"),
        "torch_backward": ("auto", f"cp.torch_backward on {threads}, one call (forward, loss, backward, .grad; "
                                   ".grad cleared untimed before each, as for torch)"),
        "value_and_grad": ("auto", f"cp.value_and_grad on the converted chain, kernels={backend}, {threads}"),
    }[method]
    return t, schedule, note


# -- sharded training steps ------------------------------------------------------------------------
def sharded_engine(backend) -> str | None:
    """``"ray"`` for ``"ray-sharded"``, ``"dask"`` for ``"dask-sharded"``, None for any other backend."""
    return SHARDED.get(backend) if isinstance(backend, str) else None


def cluster_engine(backend) -> str | None:
    """The engine a row runs on, ``"ray"`` or ``"dask"`` (per-call or sharded), or None for a row on this machine."""
    if not isinstance(backend, str):
        return None
    return backend if backend in PER_CALL else SHARDED.get(backend)


def sharded_available(backend) -> str | None:
    """None if the sharded ``backend`` can run here, else the reason it cannot."""
    engine = SHARDED[backend]
    if importlib.util.find_spec(_MODULES[engine]) is None:
        return (f"backend {backend!r} not available: {_MODULES[engine]} is not installed "
                f"(pip install 'chainprod[{engine}]')")
    return None


def sharded_estimate(backend, P, step_seconds, repeats, latency) -> float:
    """Seconds a sharded row should take: placing the model, then ``WARMUP + repeats`` steps.

    A step is estimated as the local gradient (``step_seconds``) plus one
    call latency per call of the pipeline (``2P - 1`` dependent calls).
    """
    engine = SHARDED[backend]
    return _PLACE_SECONDS[engine] + (WARMUP + repeats) * (step_seconds + (2 * P - 1) * latency)


class Clusters:
    """One cluster per engine for a whole sweep, opened when a row on it first needs it.

    ``clusters.get("ray")`` is the executor of ``chainprod.cluster("ray",
    workers=P)`` with ``P`` the largest worker count of the sweep (an
    embedded cluster already running is reused); :meth:`close` leaves every
    cluster this object started.
    """

    def __init__(self, workers=2):
        self.workers = int(workers)
        self._stack = contextlib.ExitStack()
        self._open = {}

    def get(self, engine):
        if engine not in self._open:
            self._open[engine] = self._stack.enter_context(cluster(engine, workers=self.workers))
        return self._open[engine]

    def close(self):
        self._open.clear()
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def measure_sharded(backend, P, method, chain, x, repeats, executor=None) -> dict:
    """The columns of a sharded row: one training step on ``P`` shards, medians of ``repeats`` steps.

    Forward, backward and total are the step's (medians only: ``min``,
    ``max`` and ``iqr`` stay blank); ``schedule`` is what ran across the
    shards; ``rounds`` and ``measured_rounds`` the dependent cross-shard hops
    of the backward pass.
    """
    m = measure_sharded_step(chain, x, shards=P, method=method, backend=SHARDED[backend], repeats=repeats,
                             warmup=WARMUP, executor=executor)
    return {"forward_median": m["forward"], "backward_median": m["backward"], "total_median": m["total"],
            "schedule": m["method"], "rounds": m["rounds"], "measured_rounds": m["rounds"],
            "bytes_moved": m["bytes_moved"], "workers": m["shards"]}


def traced_step(backend, P, method, chain, x, executor) -> dict:
    """The trace record of one training step (after a warm-up step) for ``traces.json.gz``.

    ``{"kind": "sharded", "schedule", "method", "events", "forward_seconds",
    "backward_seconds", "total_seconds", "bytes_moved", "rounds"}``; each
    event is a call on a shard (``task`` = ``s<b>.<forward|backprop|product|combine>``).
    """
    with shard(chain, executor, shards=P) as model:
        for _ in range(WARMUP):
            _, g = model.value_and_grad(x, method=method)
            model.sgd_step(g, 1e-3)
        _, g, tr = model.value_and_grad(x, method=method, return_trace=True)
        model.sgd_step(g, 1e-3)
    return {"kind": "sharded", "schedule": tr.method, "method": tr.method, "backend": backend, "shards": P,
            "events": tr.to_records(), "forward_seconds": tr.forward_seconds,
            "backward_seconds": tr.backward_seconds, "total_seconds": tr.total_seconds,
            "bytes_moved": tr.bytes_moved, "rounds": tr.rounds}


def sharded_row(backend, P, method, chain, x, repeats, clusters=None, trace=False) -> tuple[dict, dict | None]:
    """``(columns, trace record or None)`` of a sharded row, on ``clusters`` (else on a cluster of its own)."""
    engine = SHARDED[backend]
    with contextlib.ExitStack() as stack:
        if clusters is None:
            clusters = stack.enter_context(Clusters(P))
        ex = clusters.get(engine)
        fields = measure_sharded(backend, P, method, chain, x, repeats, executor=ex)
        return fields, (traced_step(backend, P, method, chain, x, ex) if trace else None)
