"""Recovery of a sharded model: checkpoints, the replay log, and replacing lost shards.

The driver keeps, per shard, a checkpoint of its parameters (the initial ones,
refreshed every ``checkpoint_every`` steps) and a log of what each shard
consumed since: its input activation and the row its backprop started from,
``(N, w)`` each, and the learning rates of the updates. A shard whose process
dies is rebuilt on a live worker by replaying that log from the checkpoint
with the same kernels (exact: bit for bit), and the step in flight is run
again; updates carry sequence numbers, so a shard never applies one twice.
With ``retries=0`` a lost shard raises :class:`~chainprod.errors.DistributedError`
naming it; the last completed step can still be read (a lost shard is
replayed in the driver) and :meth:`ShardRecovery.restore` replaces the shard.

:class:`ShardRecovery` owns that state and the shards' placement (their
process ids), and is the only door to the engine for calls that must survive
a lost shard. :mod:`chainprod.shard` builds one per model and runs the steps;
the worker's side of a replay is
:class:`~chainprod.executors.sharded_worker.ShardState`.
"""

from __future__ import annotations

import numpy as np

from .errors import DistributedError
from .executors.sharded_worker import ShardLost, ShardState

__all__ = ["ShardRecovery"]


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
        Shard replacements per step before a lost shard is an error.

    Attributes
    ----------
    step : int
        The last completed step (0 before the first).
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
        self.seq = 0
        self.pending: list = []
        self.lost: set = set()
        self.pids = [None] * len(specs)

    # -- placing shards ------------------------------------------------------------------
    def place(self, deadline):
        """Start every shard from its checkpoint (a new model: the log is empty)."""
        for b in range(len(self.specs)):
            self.replace(b, deadline)

    def replace(self, b, deadline):
        """Start shard ``b`` afresh on a live worker, rebuilt from its checkpoint and log."""
        self.pids[b] = self.engine.start(b, self.specs[b], self.checkpoint_thetas[b], self.checkpoint_applied,
                                         self.shard_log(b), deadline)
        self.lost.discard(b)

    def restore(self, deadline):
        """Replace every lost shard."""
        for b in sorted(self.lost):
            self.replace(b, deadline)
        self.lost.clear()

    def retrying(self, attempt, deadline):
        """``attempt()``, run again after replacing the shards lost in it, at most ``retries`` times.

        Returns ``(what attempt returned, shards replaced)``; once the retries
        are spent the lost shards are marked lost and a
        :class:`~chainprod.errors.DistributedError` names them.
        """
        replaced, attempts = [], 0
        while True:
            try:
                return attempt(), tuple(replaced)
            except ShardLost as e:
                if attempts >= self.retries:
                    self.lost.update(e.shards)
                    self.raise_lost(e.cause)
                attempts += 1
                for b in e.shards:
                    self.replace(b, deadline)
                    replaced.append(b)

    def raise_lost(self, cause=None):
        """Raise the :class:`~chainprod.errors.DistributedError` that names the lost shards."""
        parts = []
        for b in sorted(self.lost):
            s, e = self.bounds[b]
            parts.append(f"shard {b} (layers {s}..{e - 1})")
        why = f" ({cause})" if cause else ""
        raise DistributedError(
            f"{self.engine_name}: {', '.join(parts)} of this sharded model was lost{why}; retries="
            f"{self.retries}, so it was not replaced. model.gather() returns the parameters of the last "
            f"completed step (step {self.step}); model.restore() places the lost shard on a live worker.",
            self.engine_name, ", ".join(parts))

    # -- the log ---------------------------------------------------------------------------
    @property
    def steps_logged(self) -> int:
        """Steps in the log (since the last checkpoint)."""
        return len(self.log)

    def add_update(self, step, lr):
        """Queue ``theta -= lr * grads of step`` for every shard and log it; returns its sequence number."""
        self.seq += 1
        self.pending.append((self.seq, step, float(lr)))
        self.log[-1]["updates"].append((self.seq, float(lr)))
        return self.seq

    def complete(self, step, x, reports):
        """Step ``step`` ran on every shard: log what each consumed; the pending updates are delivered.

        ``x`` is the step's input (copied: the caller may reuse it); ``reports``
        ``{shard: report}`` carry the other shards' inputs and every shard's row.
        """
        # every shard ran this step's forward: pending updates are in every theta now
        self.pending = []
        rows = {}
        for b, rep in reports.items():
            x_in = np.array(x) if b == 0 else rep["x_in"]
            rows[b] = (x_in, rep["u_in"])
        self.log.append({"step": step, "rows": rows, "updates": []})
        self.step = step

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
        """Fetch every shard's parameters as the new checkpoint; the log restarts empty. Returns the bytes moved."""
        thetas = self.fetch_each("params", lambda b: (self.pending,), None, deadline)
        self.pending = []
        self.checkpoint_thetas = [np.array(t) for t in thetas]
        self.checkpoint_applied = self.seq
        self.log = []
        return sum(t.nbytes for t in thetas)

    # -- reading the shards ------------------------------------------------------------------
    def params(self, deadline):
        """Every shard's flat parameters, pending updates applied; a lost shard's from a local replay."""
        thetas = self.fetch_each("params", lambda b: (self.pending,), lambda st: st.params([])[0], deadline)
        self.pending = []
        return thetas

    def gradients(self, step, deadline):
        """Every shard's flat gradients of ``step``; a lost shard's from a local replay."""
        return self.fetch_each("gradients", lambda b: (step,), lambda st: st.gradients(step)[0], deadline)

    def fetch_each(self, method, args, local, deadline):
        """``method(*args(b))`` on every shard ``b``; a lost shard answers ``local(its replay)`` if given."""
        out = []
        for b in range(len(self.specs)):
            if b not in self.lost:
                try:
                    out.append(self.engine.fetch(b, method, *args(b), deadline=deadline))
                    continue
                except ShardLost as e:
                    self.lost.update(e.shards)
                    if local is None:
                        self.raise_lost(e.cause)
            if local is None:
                self.raise_lost()
            out.append(local(self.local_shard(b)))
        return out
