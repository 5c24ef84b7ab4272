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
Shard ``b`` runs its chunk forward with the compiled kernels and passes only
its boundary activation ``(N, w)`` to shard ``b+1``; the tape stays on the
worker. The top shard computes the loss and its cotangent and backprops its
own chunk at once. Every shard then receives the row entering its chunk from
above, in pipeline order (``method="backprop"``) or by a prefix scan over the
shards' Jacobian products (:mod:`chainprod.shard_plan` says how, and which
``method="auto"`` picks), and backprops its chunk from it. ``forward="deer"``
(or another Newton method) finds the states entering the shards by Newton
iterations, the chunks staying put (:mod:`chainprod.shard_newton`); every
shard then runs its chunk forward from its own, all at once.

Gradients stay on the workers; ``grads.gather()`` fetches them. SGD updates
are sent with the next call each shard receives (the next step's forward,
or a gather), so an update costs no call of its own and is applied before
anything reads the parameters.

Faults and timeouts
-------------------
A shard whose process dies, at any moment, is rebuilt on a live worker from a
checkpoint and a replay log kept by the driver, exactly, and the call in
flight (a step, a gather, an update's check) runs again, up to ``retries``
times per call (:mod:`chainprod.shard_recovery`). With the retries spent, a
step raises :class:`~chainprod.errors.DistributedError` naming exactly the
lost shards; :meth:`ShardedModel.gather` still returns the last completed
step (replayed in this process); the next call, or
:meth:`ShardedModel.restore`, replaces them. Only chainprod's errors leave
this module.

A step that fails (:class:`~chainprod.errors.DistributedTimeoutError`, a lost
shard with the retries spent, a Newton pass that does not converge, an
interrupt) did not happen: the parameters
are those before it. Its calls may still run on the workers, so the
gradients of the step before it are no longer trusted: ``sgd_step`` and
``gather`` with them raise ``ValueError`` (run ``value_and_grad`` again);
:meth:`ShardedModel.gather`, ``value_and_grad`` and ``restore`` go on
working, and calls of the failed step that run late change nothing (each call
carries the attempt it belongs to).

Where things live
-----------------
This module: :func:`shard`, :class:`ShardedModel` (placing the shards, a
step's call graph, SGD updates, gathering), :class:`ShardedGrads`,
:func:`measure_sharded_step`. ``shard_plan``: the pipeline or a scan across
the shards (``method=``); ``shard_newton``: the Newton forward
(``forward=``); ``shard_recovery``: checkpoint, replay log, replacing lost
shards; ``shard_trace``: :class:`ShardTrace` (re-exported here). The
worker's side: :mod:`chainprod.executors.sharded_worker`.
"""

from __future__ import annotations

import functools
import statistics
import time
import weakref

import numpy as np

from ._validate import check_learning_rate, check_retries, check_timeout
from .errors import DistributedError, NonFiniteError
from .executors.distributed import Deadline, DistributedExecutor
from .executors.sharded_worker import ShardLost, payload_bytes, shard_tables
from .forward_methods import add_forward_note
from .grad import LOSSES
from .kernels import pack, unpack_grads
from .layers import Chain
from .shard_newton import sharded_newton
from .shard_plan import check_batch, resolve_plan, submit_step
from .shard_recovery import ShardRecovery, engine_class
from .shard_trace import ShardTrace, check_finite, fill_trace
from .tape import resolve_kernels

__all__ = ["shard", "ShardedModel", "ShardedGrads", "ShardTrace", "measure_sharded_step"]


def _chainprod_errors_only(method):
    # recovery turns every lost shard into a replacement or a DistributedError; this keeps the
    # engines' internal signal off the public API even if a path were ever missed
    @functools.wraps(method)
    def public(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except ShardLost as e:
            name = self._executor.name
            raise DistributedError(f"{name}: shards {e.shards} of this sharded model were lost ({e.cause})",
                                   name, f"shards {e.shards}") from None

    return public


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
        Replacements of lost shards one call (a step, a gather) may make.
    timeout : float or None
        Seconds per call.
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
        self._engine = engine_class(executor.name)(executor, P)
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
    @_chainprod_errors_only
    def value_and_grad(self, x, y=None, *, loss=None, method="auto", forward="sequential", forward_options=None,
                       return_trace=False, timeout=None):
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
        forward, forward_options
            ``"sequential"`` (the pipeline) or a Newton method (``"deer"``,
            ``"quasi_deer"``, ``"elk"``, ``"quasi_elk"``: :mod:`chainprod.shard_newton`),
            and a dict of ``tol``, ``max_iter``, ``damping``, ``fallback``, ``init``.
        return_trace : bool
            Also return the step's :class:`ShardTrace`.
        timeout : float, optional
            Seconds for this step (default: the model's), replacing lost shards included.

        Returns
        -------
        loss : float
        grads : ShardedGrads
        trace : ShardTrace, with ``return_trace=True``

        Raises
        ------
        DistributedTimeoutError
            The step did not finish in time. It did not happen: the parameters
            are those before it, and the previous step's gradients are no
            longer usable (see the module docstring); call again.
        DistributedError
            A shard was lost and the retries are spent; names exactly the lost shards.
        NonFiniteError
            The forward or backward pass overflowed (names the layers).
        ConvergenceError
            The Newton forward pass did not converge (without ``fallback="sequential"``).
        """
        self._check_open()
        x2, y2, loss = check_batch(self._template, x, y, loss)
        plan = resolve_plan(method, self._tables, x2.shape[0])
        newton = sharded_newton(self._template, self.bounds, forward, forward_options, x2.shape[0])
        deadline = Deadline(self.timeout if timeout is None else check_timeout(timeout))
        trace = ShardTrace(backend=f"{self._executor.name}-sharded", workers=self.shards,
                           method=plan if isinstance(plan, str) else plan.name, forward=forward)
        if self.shards > 1 and not isinstance(plan, str):
            trace.schedule = plan
        t_start = time.perf_counter()
        rec = self._recovery
        replaced = ()
        if rec.steps_logged >= self.checkpoint_every:
            moved, replaced = rec.checkpoint(deadline)
            trace.bytes_moved += moved
            trace.checkpoint = True
        (reports, wall0, clock0, sent), more = rec.guarded(
            lambda: self._run_step(x2, y2, loss, plan, deadline, trace, newton), deadline)
        trace.replaced = replaced + more
        trace.total_seconds = time.perf_counter() - t_start
        step = self.step + 1
        rec.complete(step, x2, reports)
        fill_trace(trace, reports, wall0, clock0, sent, self.shards)
        add_forward_note(trace, trace.newton)
        check_finite(reports, len(self._template))
        value = float(reports[self.shards - 1]["loss"])
        grads = ShardedGrads(self, step)
        return (value, grads, trace) if return_trace else (value, grads)

    @_chainprod_errors_only
    def sgd_step(self, grads, lr):
        """``theta -= lr * grads`` on every shard, in place (sent with each shard's next call).

        An update whose result would not be finite is refused before it is
        applied or logged, and the model stays as it was. The driver bounds
        ``|theta| + |lr| |grads|`` per shard from each step's report, so an
        ordinary update costs no call; only a shard whose bound reaches half
        the largest float is asked to try the update exactly.

        Raises
        ------
        NonFiniteError
            The new parameters of a layer (named, 0-based) would be NaN or infinite.
        ValueError
            ``lr`` is not a finite number (``chainprod._validate.check_learning_rate``),
            or ``grads`` are not the last step's, or a later step failed
            (timed out, was interrupted) after them: its calls may have
            replaced them on the workers; run ``value_and_grad`` again.
        """
        self._check_open()
        if not isinstance(grads, ShardedGrads) or grads._model is not self:
            raise TypeError(f"sgd_step needs the ShardedGrads this model's value_and_grad returned, got {grads!r}")
        lr = check_learning_rate(lr)
        self._check_grads_held(grads.step)
        layer = self._recovery.bad_update_layer(grads.step, lr, Deadline(self.timeout))
        if layer is not None:
            raise NonFiniteError(f"sgd_step: the new parameters of layer {layer} would be NaN or infinite "
                                 f"(theta - lr * grad with lr={lr!r} overflowed, or the gradient is not "
                                 "finite); the update was not applied", (layer, layer))
        self._recovery.add_update(grads.step, lr)

    @_chainprod_errors_only
    def gather(self) -> Chain:
        """A local :class:`~chainprod.layers.Chain` with the current parameters (pending updates applied).

        A lost shard is replaced if the retries allow; otherwise it is rebuilt
        in this process from its checkpoint and log (the next call replaces
        it): the result is the last completed step either way.
        """
        self._check_open()
        flat = np.concatenate(self._recovery.params(Deadline(self.timeout)))
        params = unpack_grads(self._pc, flat)  # the layout of theta and of a flat gradient is one
        return self._template.with_params(params)

    @_chainprod_errors_only
    def restore(self, timeout=None):
        """Replace lost shards on live workers now (the next call would, if its retries allow)."""
        self._check_open()
        self._recovery.restore(Deadline(self.timeout if timeout is None else check_timeout(timeout)))

    # -- a step ---------------------------------------------------------------------
    def _run_step(self, x2, y2, loss, plan, deadline, trace, newton):
        eng, upd = self._engine, list(self._recovery.pending)
        self._recovery.start_step()
        wall0, clock0 = time.time(), trace.clock()
        sent = x2.nbytes + (0 if y2 is None else y2.nbytes)
        states = None
        if newton is not None:  # the states entering the shards, by Newton iterations (None: the pipeline)
            states, trace.newton, moved, trace.newton_bytes = newton.run(eng, self.step + 1, x2, upd, deadline)
            sent += moved + payload_bytes(states)
        finals, consumed = submit_step(eng, plan, self.step + 1, x2, y2, loss, upd, states)
        reports = eng.reports(finals, deadline)
        if eng.reports_travel_with_values:
            sent += sum(payload_bytes(reports[b]) for b in consumed)
        return reports, wall0, clock0, sent

    @_chainprod_errors_only
    def _gather_grads(self, step):
        self._check_open()
        self._check_grads_held(step)
        flats = self._recovery.gradients(step, Deadline(self.timeout))
        return unpack_grads(self._pc, np.concatenate(flats))

    # -- checks -----------------------------------------------------------------------
    def _check_grads_held(self, step):
        if step != self.step:
            raise ValueError(f"these gradients are of step {step}, but the shards hold those of step {self.step} "
                             "(only the last step's gradients stay on the workers)")
        if self._recovery.grads_step != step:
            raise ValueError(f"the gradients of step {step} are no longer on the workers: a value_and_grad after "
                             "them did not finish (it timed out, failed or was interrupted) and its calls may "
                             "have replaced them; the parameters are those of step "
                             f"{step} with the updates accepted so far. Run value_and_grad again.")

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this sharded model was closed")


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
        Replacements of lost shards one call may make (default: the executor's).
        ``0``: a lost shard makes a step raise :class:`~chainprod.errors.DistributedError`.
    timeout : float, optional
        Seconds per call, replacements included (default: the executor's).
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
                         repeats=5, warmup=2, executor=None, forward="sequential", forward_options=None) -> dict:
    """Time one sharded training step (``value_and_grad`` + ``sgd_step``) of ``chain`` on ``x``.

    Opens ``chainprod.cluster(backend, workers=shards)`` unless an ``executor``
    is given, places the chain, runs ``warmup`` steps, then ``repeats`` timed
    steps. Returns the medians over the timed steps: ``forward``,
    ``backward``, ``total`` (seconds, from the trace), ``compute`` (seconds
    with a shard computing), ``overhead`` (``total - compute``),
    ``bytes_moved``, ``rounds``; plus ``method`` (what ran) and ``shards``.
    ``forward``, ``forward_options``: as :meth:`ShardedModel.value_and_grad` takes them.
    """
    from .executors import cluster

    def run(ex):
        with shard(chain, ex, shards=shards) as model:
            rows = []
            for i in range(warmup + repeats):
                _, g, tr = model.value_and_grad(x, y, loss=loss, method=method, forward=forward,
                                                forward_options=forward_options, return_trace=True)
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
