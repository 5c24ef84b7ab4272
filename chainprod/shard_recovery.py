"""Recovery of a sharded model: checkpoints, the replay log, and replacing lost shards.

The driver keeps, per shard, a checkpoint of its parameters (the initial ones,
refreshed every ``checkpoint_every`` steps) and a log of what each shard
consumed since: its input activation and the row its backprop started from,
``(N, w)`` each, and the learning rates of the updates. A shard whose process
dies is rebuilt on a live worker by replaying that log from the checkpoint
with the same kernels (exact: bit for bit), and the call in flight is run
again; updates carry sequence numbers, so a shard never applies one twice.

Every call of the model that talks to the shards (a step, a checkpoint, a
gather, the check of an SGD update) runs through :meth:`ShardRecovery.guarded`:
a lost shard found at any moment (before the call, during it, or while a lost
shard is being replaced) is replaced and the call runs again, at most
``retries`` times per call; one process that held two shards costs one. When
the retries are spent the shards stay *lost*: a step raises
:class:`~chainprod.errors.DistributedError` naming exactly them, a read
(gather, gradients) answers for them from a replay in this process, and the
next call replaces them if its retries allow (:meth:`ShardRecovery.restore`
does it on demand). :class:`~chainprod.executors.sharded_worker.ShardLost`,
which the engines raise, never leaves this module.

:class:`ShardRecovery` owns that state and the shards' placement (their
process ids), and is the only door to the engine for calls that must survive
a lost shard. :mod:`chainprod.shard` builds one per model and runs the steps;
the worker's side of a replay is
:class:`~chainprod.executors.sharded_worker.ShardState`.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import DistributedError
from .executors.sharded_worker import ShardLost, ShardState

__all__ = ["ShardRecovery", "engine_class"]


def engine_class(name):
    """The engine class of resident shards on ``"ray"`` or ``"dask"`` (imported only when a model is placed)."""
    if name == "ray":
        from .executors.sharded_ray import RayShards

        return RayShards
    from .executors.sharded_dask import DaskShards

    return DaskShards


def _max_abs(a) -> float:
    return float(max(a.max(), -a.min())) if a.size else 0.0


class ShardRecovery:
    """Checkpoint, replay log, pending updates and lost shards of one sharded model.

    Parameters
    ----------
    engine : RayShards or DaskShards
        The engine the shards live on (:mod:`chainprod.executors.sharded_ray`,
        :mod:`chainprod.executors.sharded_dask`).
    specs : list of dict
        Each shard's :class:`~chainprod.executors.sharded_worker.ShardState` spec.
    thetas : list of ndarray
        Each shard's initial parameters: the first checkpoint.
    bounds : list of (int, int)
        Layers ``start .. stop-1`` of each shard (named in errors).
    engine_name : str
        ``"ray"`` or ``"dask"`` (named in errors).
    retries : int
        Replacements of lost shards one call may make before a lost shard is an error.

    Attributes
    ----------
    step : int
        The last completed step (0 before the first).
    grads_step : int or None
        The step whose gradients every shard holds: ``step`` after a step
        completed, ``None`` once a later step was sent (it may have replaced
        them on some shards) and did not complete.
    pids : list
        Process id of each shard.
    lost : set
        Shards lost and not replaced (only with retries exhausted).
    pending : list of (seq, step, lr)
        SGD updates not yet delivered to every shard.
    retries : int
    """

    def __init__(self, engine, specs, thetas, bounds, *, engine_name, retries):
        self.engine = engine
        self.specs = specs
        self.bounds = bounds
        self.engine_name = engine_name
        self.retries = retries
        self.checkpoint_thetas = list(thetas)
        self.checkpoint_applied = 0  # sequence number of the last update the checkpoint includes
        self.log: list = []  # per step: {"step", "rows": {b: (x_in, u_in)}, "updates": [(seq, lr)]}
        self.step = 0
        self.grads_step = None
        self.seq = 0
        self.pending: list = []
        self.lost: set = set()
        self.pids = [None] * len(specs)
        self.cause = None  # why the last shard was lost (named in errors)
        # what sgd_step checks without a call: an upper bound of |theta| per shard, and the
        # largest |gradient| of grads_step (from the step's reports)
        self.theta_bound = [_max_abs(t) for t in thetas]
        self.grad_max = [math.nan] * len(specs)
        dtype = np.asarray(thetas[0]).dtype if thetas else np.dtype(np.float64)
        self.largest = float(np.finfo(dtype).max)

    # -- placing and replacing shards ----------------------------------------------------
    def place(self, deadline):
        """Start every shard from its checkpoint (a new model: the log is empty)."""
        self.lost = set(range(len(self.specs)))
        self.restore(deadline)

    def replace(self, b, deadline):
        """Start shard ``b`` afresh on a live worker, rebuilt from its checkpoint and log.

        May raise :class:`ShardLost` (for ``b`` or another shard); ``b`` stays lost until it succeeds.
        """
        self.lost.add(b)
        self.pids[b] = self.engine.start(b, self.specs[b], self.checkpoint_thetas[b], self.checkpoint_applied,
                                         self.shard_log(b), deadline)
        self.lost.discard(b)

    def restore(self, deadline):
        """Replace every lost shard (allowed even with ``retries=0``: it is asked for)."""
        if self.lost and not self._recover(set(), [self.retries + 1], [], deadline):
            self.raise_lost()

    def mark_lost(self, shards, cause=None):
        """``shards`` are gone: forget their placement; the next call replaces them."""
        if cause is not None:
            self.cause = cause
        for b in set(shards):
            self.lost.add(b)
            self.engine.forget(b)  # idempotent: an engine never names a forgotten shard lost again

    def guarded(self, attempt, deadline, give_up=None):
        """``attempt()``, run again after replacing the shards lost in it, at most ``retries`` times.

        Shards already lost are replaced first (same budget). Returns
        ``(what attempt returned, shards replaced)``. Once the retries are
        spent the shards stay lost, and ``give_up()`` answers instead, or,
        without one, a :class:`~chainprod.errors.DistributedError` names them.
        Every attempt starts a new epoch on the engine.
        """
        budget, replaced = [self.retries], []
        if self.lost and not self._recover(set(), budget, replaced, deadline):
            return self._give_up(give_up), tuple(replaced)
        while True:
            self.engine.new_epoch()
            try:
                return attempt(), tuple(replaced)
            except ShardLost as e:
                if not self._recover(set(e.shards), budget, replaced, deadline, e.cause):
                    return self._give_up(give_up), tuple(replaced)

    def _recover(self, shards, budget, replaced, deadline, cause=None):
        """Replace ``shards`` and every lost one, one budget unit per round; False once it is spent."""
        self.mark_lost(shards, cause)
        while self.lost:
            if budget[0] <= 0:
                return False
            budget[0] -= 1
            self.engine.new_epoch()
            try:
                for b in sorted(self.lost):
                    self.replace(b, deadline)
                    replaced.append(b)
            except ShardLost as e:  # a replacement, or a shard beside it, died meanwhile
                self.mark_lost(e.shards, e.cause)
        return True

    def _give_up(self, give_up):
        if give_up is None:
            self.raise_lost()
        return give_up()

    def raise_lost(self):
        """Raise the :class:`~chainprod.errors.DistributedError` that names the lost shards."""
        parts = []
        for b in sorted(self.lost):
            s, e = self.bounds[b]
            parts.append(f"shard {b} (layers {s}..{e - 1})")
        why = f" ({self.cause})" if self.cause else ""
        spent = ("retries=0, so it was not replaced" if self.retries == 0 else
                 f"retries={self.retries}, all spent on replacing lost shards in this call")
        raise DistributedError(
            f"{self.engine_name}: {', '.join(parts)} of this sharded model was lost{why}; {spent}. "
            f"model.gather() returns the parameters of the last completed step (step {self.step}); "
            "the next call, or model.restore(), places the lost shard on a live worker.",
            self.engine_name, ", ".join(parts))

    # -- the log ---------------------------------------------------------------------------
    @property
    def steps_logged(self) -> int:
        """Steps in the log (since the last checkpoint)."""
        return len(self.log)

    def start_step(self):
        """A step is about to be sent: from here on the shards may drop the last step's gradients."""
        self.grads_step = None

    def update_is_safe(self, b, lr) -> bool:
        """Whether ``theta - lr * grads`` on shard ``b`` is certainly finite, from the bounds alone.

        ``|theta - lr g| <= |theta| + |lr| |g|``; half the largest float leaves
        room for the rounding of both operations. NaN bounds compare False.
        """
        lr = abs(lr)
        return lr < self.largest and self.theta_bound[b] + lr * self.grad_max[b] <= self.largest / 2

    def bad_update_layer(self, step, lr, deadline):
        """The first layer whose parameters ``theta - lr * grads of step`` would be non-finite, or None.

        Asks only the shards whose bound is in doubt (none in ordinary
        training); a lost shard answers from its replay here.
        """
        doubt = [b for b in range(len(self.specs)) if not self.update_is_safe(b, lr)]
        if not doubt:
            return None
        pending = list(self.pending)
        found = self.fetch_each("check_update", lambda b: (pending, step, lr),
                                lambda st: st.check_update([], step, lr)[0], deadline, shards=doubt)
        bad = [v for v in found.values() if v >= 0]
        return min(bad) if bad else None

    def add_update(self, step, lr):
        """Queue ``theta -= lr * grads of step`` for every shard and log it; returns its sequence number."""
        self.seq += 1
        self.pending.append((self.seq, step, float(lr)))
        self.log[-1]["updates"].append((self.seq, float(lr)))
        self.theta_bound = [t + abs(lr) * g for t, g in zip(self.theta_bound, self.grad_max)]
        return self.seq

    def complete(self, step, x, reports):
        """Step ``step`` ran on every shard: log what each consumed; the pending updates are delivered.

        ``x`` is the step's input; ``reports`` ``{shard: report}`` carry the
        other shards' inputs and every shard's row. Both are copied: the caller
        may reuse ``x``, and a report's arrays may be views of the engine's
        buffer of the whole report (Ray), which the log would keep alive.
        """
        # every shard ran this step's forward: pending updates are in every theta now
        self.pending = []
        rows = {}
        for b, rep in reports.items():
            x_in = np.array(x if b == 0 else rep["x_in"])
            rows[b] = (x_in, np.array(rep["u_in"]))
            self.grad_max[b] = float(rep["grad_max"])
        self.log.append({"step": step, "rows": rows, "updates": []})
        self.step = self.grads_step = step

    def shard_log(self, b):
        """Shard ``b``'s replay entries ``(step, x_in, u_in, updates)`` since the checkpoint."""
        out = []
        for entry in self.log:
            x_in, u_in = entry["rows"][b]
            out.append((entry["step"], x_in, u_in, list(entry["updates"])))
        return out

    def local_shard(self, b):
        """Shard ``b`` rebuilt in this process (checkpoint + replay): the last completed step."""
        return ShardState(self.specs[b], self.checkpoint_thetas[b], self.checkpoint_applied, self.shard_log(b))

    def checkpoint(self, deadline):
        """Fetch every shard's parameters as the new checkpoint; the log restarts empty.

        Returns ``(bytes moved, shards replaced)``.
        """
        thetas, replaced = self.params(deadline, with_replaced=True)
        self.checkpoint_thetas = [np.array(t) for t in thetas]
        self.checkpoint_applied = self.seq
        self.log = []
        self.theta_bound = [_max_abs(t) for t in self.checkpoint_thetas]
        return sum(t.nbytes for t in thetas), replaced

    # -- reading the shards ------------------------------------------------------------------
    def params(self, deadline, with_replaced=False):
        """Every shard's flat parameters, pending updates applied; a lost shard's from a local replay."""
        pending = list(self.pending)
        out, replaced = self.fetch_each("params", lambda b: (pending,), lambda st: st.params([])[0], deadline,
                                        with_replaced=True)
        self.pending = []  # delivered (a lost shard's replay holds them: they are in the log)
        thetas = [out[b] for b in range(len(self.specs))]
        return (thetas, replaced) if with_replaced else thetas

    def gradients(self, step, deadline):
        """Every shard's flat gradients of ``step``; a lost shard's from a local replay."""
        out = self.fetch_each("gradients", lambda b: (step,), lambda st: st.gradients(step)[0], deadline)
        return [out[b] for b in range(len(self.specs))]

    def fetch_each(self, method, args, local, deadline, shards=None, with_replaced=False):
        """``{b: method(*args(b))}`` on each shard ``b`` (all by default), guarded.

        With the retries spent, each shard still lost answers ``local(its replay)``.
        """
        shards = range(len(self.specs)) if shards is None else list(shards)
        out = {}

        def attempt():
            for b in shards:
                if b not in out and b not in self.lost:
                    out[b] = self.engine.fetch(b, method, *args(b), deadline=deadline)
            return out

        def give_up():
            # no replacing any more: read the live shards, and replay the lost ones here
            for _ in range(len(self.specs) + 1):
                self.engine.new_epoch()
                try:
                    attempt()
                    break
                except ShardLost as e:
                    self.mark_lost(e.shards, e.cause)
            for b in shards:
                if b not in out:
                    out[b] = local(self.local_shard(b))
            return out

        out, replaced = self.guarded(attempt, deadline, give_up)
        return (out, replaced) if with_replaced else out
