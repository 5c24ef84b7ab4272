"""A model that lives on the workers: train where the layers are.

``cp.grad(chain, x, backend="ray")`` ships the whole model to the workers on
every call and brings every gradient back. :func:`shard` instead places one
contiguous chunk of layers on each of ``P`` workers, once (a Ray actor, or a
pinned Dask worker: :mod:`chainprod.executors.sharded_ray`,
:mod:`chainprod.executors.sharded_dask`), and keeps it there::

    with cp.cluster("ray", workers=2) as ex:
        model = cp.shard(chain, ex)
        loss, grads, trace = model.value_and_grad(x, y, loss="mse", return_trace=True)
        model.sgd_step(grads, lr=1e-2)          # in place, on the workers
        grads.gather()                          # per-layer tuples, as cp.grad returns
        model.gather()                          # a local Chain with the current parameters

How a step works
----------------
*Forward*: shard ``b`` runs its chunk with the compiled kernels and passes
only its boundary activation ``(N, w)`` to shard ``b+1``; the tape stays on
the worker. The top shard computes the loss and its seed and backprops its
own chunk at once (the thin row ``seed . T_top`` is just backprop).

*Backward*, two ways to give every shard the row ``u_b = dloss/dy`` entering
its chunk from above:

``method="backprop"`` (the baseline, pipeline order)
    the top shard hands the row leaving its bottom to the shard below, which
    backprops its chunk from it and hands its own bottom row down: ``P-1``
    dependent hops, ``O(w^2)`` per layer.
scan (``"sklansky"``, ``"brent_kung"``, ``"chunked"``, ...)
    every shard ``1 .. P-2`` forms its chunk's Jacobian product
    ``T_b = A_end ... A_start`` (per sample, ``w x w``, ``O(w^3)`` per layer)
    while the others do the same; then a prefix scan over the ``P-1``
    elements ``[row of the top shard, T_{P-2}, ..., T_1]`` (the plan is
    :func:`chainprod.schedule` of that length, ``ceil(log2(P-1))`` rounds)
    gives prefix ``k = u_{P-2-k}``. Each op ``[i,k] (x) [k+1,j]`` runs on the
    shard that needs prefix ``j`` (shard ``P-2-j``), so the last op of every
    chain lands where its result is used. Then every shard backprops its
    chunk from its row, all at once.

``method="auto"`` picks the one with fewer flops on its critical path
(:mod:`chainprod.shard_plan`); with ``P <= 2`` the two are the same plan.

Gradients stay on the workers; ``grads.gather()`` fetches them. SGD updates
are sent with the next call each shard receives (the next step's forward,
or a gather), so an update costs no call of its own and is applied before
anything reads the parameters.

Faults
------
A shard whose process dies is rebuilt on a live worker from a checkpoint and
a replay log kept by the driver, exactly, and the step in flight is run
again. With ``retries=0`` a lost shard raises
:class:`~chainprod.errors.DistributedError` naming it;
:meth:`ShardedModel.gather` still returns the last completed step (replayed
in this process) and :meth:`ShardedModel.restore` replaces the shard.

Where things live
-----------------
This module: :func:`shard`, :class:`ShardedModel` (placing the shards, a
step's call graph, SGD updates, gathering), :class:`ShardedGrads` and
:func:`measure_sharded_step`. :mod:`chainprod.shard_plan`: the pipeline or
a scan across the shards (``method=``). :mod:`chainprod.shard_recovery`: the
checkpoint, the replay log and the replacement of lost shards.
:mod:`chainprod.shard_trace`: :class:`ShardTrace` (re-exported here) and how
a step's reports fill it. The worker's side is
:mod:`chainprod.executors.sharded_worker`.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref

import numpy as np

from ._validate import as_float_array, check_retries, check_timeout
from .errors import NonFiniteError
from .executors.distributed import Deadline, DistributedExecutor
from .executors.sharded_worker import payload_bytes, shard_tables
from .grad import LOSSES
from .kernels import pack, unpack_grads
from .layers import Chain
from .shard_plan import resolve_plan
from .shard_recovery import ShardRecovery
from .shard_trace import ShardTrace, fill_trace
from .tape import resolve_kernels

__all__ = ["shard", "ShardedModel", "ShardedGrads", "ShardTrace", "measure_sharded_step"]


class ShardedGrads:
    """A handle on the gradients of one step; they stay on the workers until :meth:`gather`."""

    def __init__(self, model, step):
        self._model = model
        self.step = step

    def gather(self) -> list[tuple]:
        """Per-layer gradient tuples, exactly as :func:`chainprod.grad` returns them."""
        return self._model._gather_grads(self.step)

    def __repr__(self):
        return f"<ShardedGrads of step {self.step}, on {self._model.shards} shards>"


def _engine_class(name):
    # engine modules import Ray / Dask: only when a model is placed on them
    if name == "ray":
        from .executors.sharded_ray import RayShards

        return RayShards
    from .executors.sharded_dask import DaskShards

    return DaskShards


class ShardedModel:
    """A chain cut into ``P`` contiguous chunks of layers, each resident on one worker.

    Create with :func:`shard`. See the module docstring for how a step runs.

    Attributes
    ----------
    shards : int
        ``P``.
    bounds : list of (int, int)
        Layers ``start .. stop-1`` of each shard.
    step : int
        Steps completed by :meth:`value_and_grad`.
    pids : list
        Process id of each shard (a replaced shard gets a new one).
    retries : int
        Shard replacements per step after a worker died.
    timeout : float or None
        Seconds per step.
    checkpoint_every : int
        Steps between checkpoints of the parameters to the driver.
    """

    def __init__(self, chain, executor, *, shards=None, kernels=None, retries=None, timeout=None,
                 checkpoint_every=1000):
        if not isinstance(chain, Chain):
            raise TypeError(f"shard() expects a chainprod Chain, got {type(chain).__name__}")
        if not isinstance(executor, DistributedExecutor) or executor.name not in ("ray", "dask"):
            raise TypeError(f"shard() needs a Ray or Dask executor (from chainprod.cluster('ray') or "
                            f"chainprod.get_executor('dask')), got {executor!r}")
        if shards is not None and (isinstance(shards, bool) or not isinstance(shards, (int, np.integer))
                                   or shards < 1):
            raise ValueError(f"shards must be an int >= 1, got {shards!r}")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer)) \
                or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
        self.kernels = resolve_kernels(kernels)
        retries = executor.retries if retries is None else check_retries(retries)
        self.timeout = executor.timeout if timeout is None else check_timeout(timeout)
        self.checkpoint_every = int(checkpoint_every)
        self._template = chain
        self._executor = executor
        L = len(chain)
        P = int(shards or executor.workers or 2)
        self.shards = P = max(1, min(P, L))
        edges = [round(b * L / P) for b in range(P + 1)]
        self.bounds = [(edges[b], edges[b + 1]) for b in range(P)]
        self._pc = pc = pack(chain)
        self._tables = [shard_tables(pc, s, e) for s, e in self.bounds]
        self._specs = [dict(index=b, shards=P, first=s, tables=t, kernels=self.kernels,
                            losses=LOSSES if b == P - 1 else None)
                       for b, ((s, _), t) in enumerate(zip(self.bounds, self._tables))]
        self._engine = _engine_class(executor.name)(executor, P)
        # checkpoint, replay log, pending updates and lost shards: all the state recovery needs
        self._recovery = ShardRecovery(self._engine, self._specs, [t.theta for t in self._tables], self.bounds,
                                       engine_name=executor.name, retries=retries)
        self._closed = False
        try:
            self._recovery.place(Deadline(self.timeout))
        except BaseException:
            self._engine.close()
            raise
        self._finalizer = weakref.finalize(self, self._engine.close)

    def __repr__(self):
        state = "closed" if self._closed else f"step {self.step}"
        return (f"<ShardedModel of {len(self._template)} layers on {self.shards} {self._executor.name} shards "
                f"{self.bounds}, {state}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Remove the shards from the workers (the model cannot be used afterwards)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    # the recovery state is the one record of these; the model reads them from there
    @property
    def step(self) -> int:
        return self._recovery.step

    @property
    def pids(self) -> list:
        return self._recovery.pids

    @property
    def retries(self) -> int:
        return self._recovery.retries

    @retries.setter
    def retries(self, value):
        self._recovery.retries = value

    # -- public API ---------------------------------------------------------------
    def value_and_grad(self, x, y=None, *, loss=None, method="auto", return_trace=False, timeout=None):
        """Loss and per-layer gradients of one step; gradients stay on the workers.

        Parameters
        ----------
        x : array, shape ``(N, d_0)`` or ``(d_0,)``
        y, loss
            As in :func:`chainprod.value_and_grad` (``"sum"`` without ``y``, ``"mse"`` with it).
        method : str or Schedule
            ``"backprop"`` (pipeline across shards), a scan name (``"sklansky"``,
            ``"brent_kung"``, ``"chunked"``, ...), a Schedule of length ``P-1``, or
            ``"auto"`` (a flop comparison, :func:`chainprod.shard_plan.auto_plan`).
        return_trace : bool
            Also return the step's :class:`ShardTrace`.
        timeout : float, optional
            Seconds for this step (default: the model's).

        Returns
        -------
        loss : float
        grads : ShardedGrads
        trace : ShardTrace, with ``return_trace=True``
        """
        self._check_open()
        x2, y2, loss = self._check_batch(x, y, loss)
        plan = resolve_plan(method, self._tables, x2.shape[0])
        deadline = Deadline(self.timeout if timeout is None else check_timeout(timeout))
        trace = ShardTrace(backend=f"{self._executor.name}-sharded", workers=self.shards,
                           method=plan if isinstance(plan, str) else plan.name)
        if self.shards > 1 and not isinstance(plan, str):
            trace.schedule = plan
        t_start = time.perf_counter()
        rec = self._recovery
        if rec.lost:
            rec.raise_lost()
        if rec.steps_logged >= self.checkpoint_every:
            trace.bytes_moved += rec.checkpoint(deadline)
            trace.checkpoint = True
        (reports, wall0, clock0, sent), trace.replaced = rec.retrying(
            lambda: self._run_step(x2, y2, loss, plan, deadline, trace), deadline)
        trace.total_seconds = time.perf_counter() - t_start
        step = self.step + 1
        rec.complete(step, x2, reports)
        fill_trace(trace, reports, wall0, clock0, sent, self.shards)
        bad_f = [r["bad_forward"] for r in reports.values() if r["bad_forward"] >= 0]
        if bad_f:
            raise NonFiniteError(f"the forward pass overflowed: the output of layer {min(bad_f)} is NaN or "
                                 "infinite (inputs and parameters are finite)", (min(bad_f), min(bad_f)))
        bad_b = [r["bad_backward"] for r in reports.values() if r["bad_backward"] >= 0]
        if bad_b:
            first = max(bad_b) + 1
            L = len(self._template)
            raise NonFiniteError(f"the backward pass produced a non-finite gradient: the product of the input "
                                 f"Jacobians of layers {min(first, L - 1)}..{L - 1} (0-based) overflowed",
                                 (min(first, L - 1), L - 1))
        value = float(reports[self.shards - 1]["loss"])
        grads = ShardedGrads(self, step)
        return (value, grads, trace) if return_trace else (value, grads)

    def sgd_step(self, grads, lr):
        """``theta -= lr * grads`` on every shard, in place (sent with each shard's next call)."""
        self._check_open()
        if not isinstance(grads, ShardedGrads) or grads._model is not self:
            raise TypeError(f"sgd_step needs the ShardedGrads this model's value_and_grad returned, got {grads!r}")
        if grads.step != self.step:
            raise ValueError(f"these gradients are of step {grads.step}, but the shards hold those of step "
                             f"{self.step} (only the last step's gradients stay on the workers)")
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr):
            raise ValueError(f"lr must be a finite number, got {lr!r}")
        self._recovery.add_update(grads.step, lr)

    def gather(self) -> Chain:
        """A local :class:`~chainprod.layers.Chain` with the current parameters (pending updates applied).

        A lost shard (with retries off) is rebuilt in this process from its
        checkpoint and log: the result is the last completed step either way.
        """
        self._check_open()
        flat = np.concatenate(self._recovery.params(Deadline(self.timeout)))
        params = unpack_grads(self._pc, flat)  # the layout of theta and of a flat gradient is one
        return self._template.with_params(params)

    def restore(self, timeout=None):
        """Replace lost shards (after a :class:`DistributedError` with retries off) on live workers."""
        self._check_open()
        self._recovery.restore(Deadline(self.timeout if timeout is None else check_timeout(timeout)))

    # -- a step ---------------------------------------------------------------------
    def _run_step(self, x2, y2, loss, plan, deadline, trace):
        eng, P = self._engine, self.shards
        step = self.step + 1
        upd = list(self._recovery.pending)
        wall0, clock0 = time.time(), trace.clock()
        sent = x2.nbytes + (0 if y2 is None else y2.nbytes)
        finals = {}
        prev = x2
        for b in range(P - 1):
            prev, _ = eng.call(b, "forward", step, prev, upd)
        top_row, finals[P - 1] = eng.call(P - 1, "forward_top", step, prev, upd, y2, loss)
        consumed = set() if P == 1 else {P - 1}
        if P > 1 and (isinstance(plan, str) or P == 2):
            row = top_row
            for b in range(P - 2, -1, -1):
                row, finals[b] = eng.call(b, "backward", step, row, b > 0)
                if b > 0:
                    consumed.add(b)
        elif P > 1:
            n = P - 1
            slots = [top_row] + [eng.call(P - 1 - p, "product")[0] for p in range(1, n)]
            slots += [None] * (plan.n_slots - n)
            for r, (st, (_, _, j)) in enumerate(zip(plan.steps, plan.intervals())):
                new = {}
                for left, right, out, jj in zip(st.left.tolist(), st.right.tolist(), st.out.tolist(), j.tolist()):
                    new[out] = eng.call(P - 2 - jj, "combine", slots[left], slots[right], r)[0]
                for out, h in new.items():  # every op of a round reads before any writes
                    slots[out] = h
            for b in range(P - 1):
                _, finals[b] = eng.call(b, "backward", step, slots[int(plan.outputs[P - 2 - b])], False)
        reports = eng.reports(finals, deadline)
        if eng.reports_travel_with_values:
            sent += sum(payload_bytes(reports[b]) for b in consumed)
        return reports, wall0, clock0, sent

    # -- gradients ----------------------------------------------------------------------
    def _gather_grads(self, step):
        self._check_open()
        if step != self.step:
            raise ValueError(f"these gradients are of step {step}; the shards now hold those of step {self.step} "
                             "(gather() a step's gradients before the next value_and_grad)")
        flats = self._recovery.gradients(step, Deadline(self.timeout))
        return unpack_grads(self._pc, np.concatenate(flats))

    # -- checks -----------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this sharded model was closed")

    def _check_batch(self, x, y, loss):
        chain = self._template
        x2, one = chain.check_input(x)
        x2 = np.ascontiguousarray(x2)
        if loss is None:
            loss = "sum" if y is None else "mse"
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(LOSSES))}")
        N, d_out = x2.shape[0], chain.d_out
        if loss == "sum":
            if y is not None:
                raise ValueError("loss='sum' takes no targets y; use loss='mse' for targets")
            if d_out != 1:
                raise ValueError(f"grad of the model output needs output width 1, but the last layer has width "
                                 f"{d_out}; pass targets y= with loss='mse' for a vector output")
            return x2, None, loss
        y = as_float_array(y, "y", ndim=(1, 2))
        expect = (d_out,) if one else (N, d_out)
        if not (y.shape == expect or (d_out == 1 and y.shape == (N,) and not one)):
            raise ValueError(f"y has shape {y.shape} but the model output has shape {expect}")
        if y.dtype != chain.dtype:
            raise TypeError(f"y is {y.dtype} but the chain is {chain.dtype}")
        return x2, np.ascontiguousarray(y.reshape(N, d_out)), loss


def shard(chain: Chain, executor, *, shards=None, kernels=None, retries=None, timeout=None,
          checkpoint_every=1000) -> ShardedModel:
    """Place ``chain`` on the workers of ``executor``, one contiguous chunk of layers per worker.

    Parameters
    ----------
    chain : Chain
        Not modified; the model starts from a copy of its parameters.
    executor : RayExecutor or DaskExecutor
        From ``chainprod.cluster("ray" | "dask", workers=P)`` (or ``get_executor``).
    shards : int, optional
        ``P``; default the executor's ``workers`` (else 2). At most ``len(chain)``.
        Layers are split as evenly as they go (``round(b * L / P)`` edges).
    kernels : {"numba", "numpy"}, optional
        Kernels the shards run (default: compiled when numba is installed).
    retries : int, optional
        Shard replacements per step after a worker died (default: the executor's).
        ``0``: a lost shard raises :class:`~chainprod.errors.DistributedError`.
    timeout : float, optional
        Seconds per step (default: the executor's).
    checkpoint_every : int
        Steps between checkpoints of the parameters to the driver (each costs
        one transfer of the parameters; between them, recovery replays the log).

    Returns
    -------
    ShardedModel
    """
    return ShardedModel(chain, executor, shards=shards, kernels=kernels, retries=retries, timeout=timeout,
                        checkpoint_every=checkpoint_every)


def measure_sharded_step(chain, x, y=None, *, shards=2, method="auto", backend="ray", loss=None, lr=1e-3,
                         repeats=5, warmup=2, executor=None) -> dict:
    """Time one sharded training step (``value_and_grad`` + ``sgd_step``) of ``chain`` on ``x``.

    Opens ``chainprod.cluster(backend, workers=shards)`` unless an ``executor``
    is given, places the chain, runs ``warmup`` steps, then ``repeats`` timed
    steps. Returns the medians over the timed steps: ``forward``,
    ``backward``, ``total`` (seconds, from the trace), ``compute`` (seconds
    with a shard computing), ``overhead`` (``total - compute``),
    ``bytes_moved``, ``rounds``; plus ``method`` (what ran) and ``shards``.
    """
    from .executors import cluster

    def run(ex):
        with shard(chain, ex, shards=shards) as model:
            rows = []
            for i in range(warmup + repeats):
                _, g, tr = model.value_and_grad(x, y, loss=loss, method=method, return_trace=True)
                model.sgd_step(g, lr)
                if i >= warmup:
                    rows.append(tr)
        med = {k: statistics.median(getattr(t, a) for t in rows)
               for k, a in (("forward", "forward_seconds"), ("backward", "backward_seconds"),
                            ("total", "total_seconds"), ("compute", "compute_seconds"),
                            ("overhead", "overhead_seconds"), ("bytes_moved", "bytes_moved"),
                            ("rounds", "rounds"))}
        med.update(method=rows[-1].method, shards=model.shards)
        return med

    if executor is not None:
        return run(executor)
    with cluster(backend, workers=shards) as ex:
        return run(ex)
