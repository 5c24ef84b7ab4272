"""What lives on a worker of a sharded model: one chunk of layers and its state.

:class:`ShardState` is plain Python on top of the whole-chain kernels
(:mod:`chainprod.kernels`); it imports no engine. A Ray actor is this class
(:mod:`chainprod.executors.sharded_ray`); on Dask an instance lives in the
worker process (:mod:`chainprod.executors.sharded_dask`). The driver side,
which plans a step and sends these calls, is :mod:`chainprod.shard`.

State kept between calls: the chunk's parameters (a flat ``theta``, updated
in place by SGD), the last forward tape (input and outputs of every layer of
the chunk), the last gradients and the sequence number of the last update
applied. Every call returns ``(value, report)``: ``value`` is what the next
shard or the driver consumes (a boundary activation, a row, a Jacobian
product); ``report`` is ``None`` except on a shard's last call of a step,
where it carries that step's trace events, the rows the shard consumed (the
driver logs them so a lost shard can be rebuilt by replay), the loss and the
largest gradient magnitude (the driver bounds an SGD update's result with it).
The calls of a Newton forward pass (``newton_*``, the chunk's side in
:mod:`chainprod.executors.sharded_newton`) report a small dict of numbers the
driver decides by: the chunk's part of the residual, the first non-finite layer.

The engines send every call through :meth:`ShardState.run`, which carries
the driver's *epoch*: one number per attempt of a step or fetch. A call of an
abandoned attempt (a step that timed out or lost a shard) that reaches the
shard after a call of a newer attempt does nothing, so abandoned calls still
queued on a worker can never overwrite the state a newer attempt built.

Replay is exact: a step replayed on a fresh process runs the same kernels on
the same inputs in the same order, so the rebuilt parameters equal the lost
ones bit for bit (given the same number of numba threads: the compiled
backprop cuts a large batch into one chunk of samples per thread).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace

import numpy as np

from ..kernels import get_kernels
from ..kernels.pack import PackedChain
from .sharded_newton import ChunkNewton

__all__ = ["ShardState", "ShardLost", "Reply", "CALLS", "payload_bytes", "shard_tables"]


#: the calls :meth:`ShardState.run` accepts (everything a step, a fetch or a check sends)
CALLS = frozenset({"forward", "forward_top", "product", "combine", "backward", "params", "gradients",
                   "check_update", "newton_begin", "newton_map", "newton_update"})


class ShardLost(Exception):
    """Shards whose process died: raised by an engine's wait, never by the public API.

    :class:`chainprod.shard_recovery.ShardRecovery` catches every one and
    replaces the shards, or raises :class:`~chainprod.errors.DistributedError`
    naming them.
    """

    def __init__(self, shards, cause):
        super().__init__(f"shards {sorted(shards)} lost: {cause}")
        self.shards = sorted(shards)
        self.cause = cause


class Reply:
    """A call's result as it travels on Dask: ``value`` for the consumer, ``report`` for the driver."""

    __slots__ = ("value", "report")

    def __init__(self, value, report=None):
        self.value = value
        self.report = report


def shard_tables(pc: PackedChain, start: int, stop: int) -> PackedChain:
    """Layers ``start .. stop-1`` of a packed chain as a packed chain of their own (offsets from 0)."""
    p0, y0 = int(pc.p_off[start]), int(pc.y_off[start])
    return PackedChain(L=stop - start, dtype=pc.dtype, kind=pc.kind[start:stop], act=pc.act[start:stop],
                       d_in=pc.d_in[start:stop], d_out=pc.d_out[start:stop],
                       p_off=pc.p_off[start:stop + 1] - p0, theta=pc.theta[p0:int(pc.p_off[stop])],
                       y_off=pc.y_off[start:stop + 1] - y0)


def _where() -> str:
    return f"{socket.gethostname()}/pid{os.getpid()}"


def payload_bytes(obj) -> int:
    """numpy payload bytes in a value or report (what the trace counts as moved)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(payload_bytes(o) for o in obj.values())
    return 0


class ShardState:
    """Layers ``first .. first+L-1`` of a model, resident in one process.

    Parameters
    ----------
    spec : dict
        ``index``, ``shards``, ``first`` (global index of the first layer),
        ``tables`` (a :class:`~chainprod.kernels.PackedChain` of the chunk; its
        ``theta`` is ignored), ``kernels`` (``"numba"`` or ``"numpy"``),
        ``losses`` (name -> ``(value(out, y), cotangent(out, y))``, for the top shard).
    theta : ndarray
        The chunk's parameters at the checkpoint (copied: the shard owns its copy).
    applied : int
        Sequence number of the last SGD update ``theta`` includes.
    log : list, optional
        Steps to replay on top of ``theta``: ``(step, x_in, u_in, updates)``
        each, ``u_in`` the row the chunk's backprop started from, ``updates`` a
        list of ``(seq, lr)`` applied to that step's gradients.
    """

    def __init__(self, spec, theta, applied=0, log=()):
        self.index = int(spec["index"])
        self.shards = int(spec["shards"])
        self.first = int(spec["first"])
        self.top = self.index == self.shards - 1
        self.losses = spec.get("losses") or {}
        self._theta = np.array(theta, copy=True)
        view = self._theta.view()
        view.flags.writeable = False  # the kernels see what they always see: read-only parameters
        self.pc = replace(spec["tables"], theta=view)
        self.kernel_name = spec.get("kernels", "numba")
        self.kernels = get_kernels(self.kernel_name)
        self.applied = int(applied)
        self.x_in = self.Y = self.grads = None
        self.grad_step = -1
        self.epoch = 0
        # one call at a time, even on a worker with several threads (a call of an abandoned
        # attempt may still be running when a newer one arrives)
        self._lock = threading.Lock()
        self._events: list = []
        self._sent = 0
        self._u_in = None
        self._bad = [-1, -1]
        self._loss = None
        self._opened = None  # (step, epoch) whose bookkeeping the shard is keeping
        self.newton = None  # the chunk's part of a Newton forward pass in progress
        log = list(log)
        for i, (step, x_in, u_in, updates) in enumerate(log):
            # a step changes theta only through its updates; the last one also
            # leaves the gradients a later sgd_step or gather() may ask for
            if updates or i == len(log) - 1:
                self._replay(step, x_in, u_in, updates)

    # -- bookkeeping ----------------------------------------------------------
    def pid(self):
        return os.getpid()

    def run(self, epoch, method, *args):
        """``method(*args)`` for the driver's attempt ``epoch``; ``(None, None)`` if a newer attempt came first.

        Parameters
        ----------
        epoch : int
            The attempt this call belongs to (the driver counts up, one per
            attempt of a step, a fetch or a check).
        method : str
            One of :data:`CALLS`.
        """
        if method not in CALLS:
            raise ValueError(f"shard {self.index}: unknown call {method!r}")
        with self._lock:
            if epoch < self.epoch:
                return None, None  # abandoned by the driver; a newer attempt already touched this shard
            self.epoch = epoch
            return getattr(self, method)(*args)

    def _open(self, step):
        """Start the bookkeeping of ``step`` (events, bytes sent, flags) unless this attempt already did."""
        if self._opened != (step, self.epoch):
            self._opened = (step, self.epoch)
            self._events, self._sent, self._bad, self._loss, self._u_in = [], 0, [-1, -1], None, None

    def _event(self, name, t0, rnd=-1):
        self._events.append((rnd, _where(), t0, time.time(), 0, f"s{self.index}.{name}"))

    def _out(self, value, final=False):
        self._sent += payload_bytes(value)
        if not final:
            return value, None
        report = {"shard": self.index, "events": self._events, "u_in": self._u_in,
                  "x_in": self.x_in if self.index > 0 else None, "loss": self._loss,
                  "bad_forward": self._bad[0], "bad_backward": self._bad[1], "step": self.grad_step,
                  "grad_max": self.grad_max()}
        report["sent"] = self._sent + payload_bytes(report)
        return value, report

    def apply(self, updates):
        """SGD updates ``(seq, step, lr)`` not yet in ``theta``, in order: ``theta -= lr * grads``."""
        for seq, step, lr in updates:
            if seq <= self.applied:
                continue  # already applied (a step re-run after a lost shard sends them again)
            if step != self.grad_step or self.grads is None:
                raise RuntimeError(f"shard {self.index}: update {seq} is for the gradients of step {step}, "
                                   f"but this shard holds those of step {self.grad_step}")
            self._theta -= lr * self.grads
            self.applied = seq

    # -- a training step --------------------------------------------------------
    def forward(self, step, x_in, updates, want_out=True):
        """Apply pending updates, run the chunk forward; returns the boundary activation ``(N, w)``.

        ``want_out=False``: returns None (the next shard's input came from
        the driver: a Newton forward pass found it).
        """
        self._open(step)
        self.newton = None  # a Newton pass before this one is done: its arrays can go
        t0 = time.time()
        self.apply(updates)
        self._forward(x_in)
        self._event("forward", t0)
        return self._out(self._last_output().copy() if want_out else None)

    def forward_top(self, step, x_in, updates, y, loss):
        """The top shard: forward, loss and its cotangent, backprop of the chunk; returns the row leaving it."""
        self._open(step)
        self.newton = None
        t0 = time.time()
        self.apply(updates)
        self._forward(x_in)
        self._event("forward", t0)
        t1 = time.time()
        out = self._last_output()
        value_fn, cotangent_fn = self.losses[loss]
        with np.errstate(over="ignore", invalid="ignore"):
            self._loss = float(value_fn(out, y))
            cotangent = np.ascontiguousarray(cotangent_fn(out, y))
        row = self._backward(step, cotangent)
        self._event("backprop", t1)
        return self._out(row if self.index > 0 else None, final=True)

    def product(self):
        """The chunk's Jacobian product ``(N, d_out, d_in)`` from the current tape."""
        t0 = time.time()
        T = self.kernels.chunk_product(self.pc, self.Y, self.x_in.shape[0])
        self._event("product", t0)
        return self._out(T)

    def combine(self, left, right, rnd):
        """One op of the scan across shards: ``left @ right`` per sample (a row or a matrix on the left)."""
        t0 = time.time()
        with np.errstate(over="ignore", invalid="ignore"):
            if left.ndim == 2:
                out = np.matmul(left[:, None, :], right)[:, 0, :]
            else:
                out = np.matmul(left, right)
        self._event("combine", t0, rnd)
        return self._out(out)

    def backward(self, step, u, want_row):
        """Backprop of the chunk from the row ``u`` entering it from above; returns the row leaving it."""
        t0 = time.time()
        row = self._backward(step, np.ascontiguousarray(u))
        self._event("backprop", t0)
        return self._out(row if want_row else None, final=True)

    # -- a Newton forward pass (:mod:`chainprod.executors.sharded_newton`) ----------------
    def newton_begin(self, step, x_in, updates, body, s_in, init):
        """Apply pending updates and start the chunk's Newton pass at its initial guess.

        ``body`` is ``(lo, hi)``, the chunk's solved layers; the first shard
        takes the chain's input ``x_in`` (its first layer runs directly when
        it is not solved), the others the guess ``s_in`` of the state entering
        the chunk. Returns ``(value, residual parts)``: the first shard's value
        is the state leaving its chunk at the guess.
        """
        self._open(step)
        t0 = time.time()
        self.apply(updates)
        lo, hi = body
        if self.index == 0:
            s_in = np.ascontiguousarray(x_in)
            if lo > 0:  # the first layer changes the width: its input is known, so it just runs
                with np.errstate(over="ignore", invalid="ignore"):
                    Y, _ = self.kernels.forward(shard_tables(self.pc, 0, lo), s_in)
                s_in = Y[-s_in.shape[0] * int(self.pc.d_out[lo - 1]):].reshape(s_in.shape[0], -1)
        self.newton = ChunkNewton(self.pc, lo, hi, self.first, s_in, init, fixed=self.index == 0)
        parts = self.newton.begin_parts()
        self._event("newton.begin", t0)
        nw = self.newton
        out = (nw.x[-1] if nw.n else nw.s).copy() if self.index == 0 else None
        return self._out(out)[0], parts

    def newton_map(self, quasi, lam, promote):
        """Step 1 of an iteration (``ChunkNewton.linearize``); returns ``(map or state, info)``."""
        t0 = time.time()
        value, info = self.newton.linearize(quasi, lam, promote, want_map=not self.top)
        self._event("newton.map", t0)
        return self._out(value)[0], info

    def newton_update(self, s_in):
        """Step 2 of an iteration (``ChunkNewton.update``); returns ``(None, residual parts)``."""
        t0 = time.time()
        info = self.newton.update(s_in)
        self._event("newton.update", t0)
        return None, info

    # -- explicit fetches ---------------------------------------------------------
    def params(self, updates):
        """Apply pending updates; returns ``(copy of theta, None)``."""
        self.apply(updates)
        return self._theta.copy(), None

    def gradients(self, step):
        """``(copy of the gradients of step, None)``."""
        self._check_grads(step)
        return self.grads.copy(), None

    def check_update(self, updates, step, lr):
        """Apply pending updates, then try ``theta - lr * grads of step`` without keeping it.

        Returns ``(layer, None)``: the global index of the first layer whose
        new parameters would be NaN or infinite, or ``-1`` when all are finite.
        The same expression as :meth:`apply`, so the answer is exact.
        """
        self.apply(updates)
        self._check_grads(step)
        with np.errstate(over="ignore", invalid="ignore"):
            bad = np.flatnonzero(~np.isfinite(self._theta - lr * self.grads))
        if not bad.size:
            return -1, None
        return self.first + int(np.searchsorted(self.pc.p_off, bad[0], side="right")) - 1, None

    def grad_max(self) -> float:
        """Largest magnitude of the gradients held (NaN if one is NaN; 0 with none)."""
        if self.grads is None or not self.grads.size:
            return 0.0
        with np.errstate(invalid="ignore"):
            return float(max(self.grads.max(), -self.grads.min()))

    # -- internals ----------------------------------------------------------------
    def _check_grads(self, step):
        if self.grad_step != step or self.grads is None:
            raise RuntimeError(f"shard {self.index} holds the gradients of step {self.grad_step}, not {step}")

    def _forward(self, x_in):
        self.x_in = np.ascontiguousarray(x_in)
        with np.errstate(over="ignore", invalid="ignore"):
            self.Y, bad = self.kernels.forward(self.pc, self.x_in)
        self._bad[0] = -1 if bad < 0 else self.first + bad

    def _last_output(self):
        N = self.x_in.shape[0]
        return self.Y[N * int(self.pc.y_off[-2]):].reshape(N, self.pc.width_out)

    def _backward(self, step, u):
        self._u_in = u
        with np.errstate(over="ignore", invalid="ignore"):
            self.grads, row, bad = self.kernels.backprop_with_row(self.pc, self.x_in, self.Y, u)
        self.grad_step = step
        self._bad[1] = -1 if bad < 0 else self.first + bad
        return row

    def _replay(self, step, x_in, u_in, updates):
        self._forward(x_in)
        self._backward(step, np.ascontiguousarray(u_in))
        for seq, lr in updates:
            if seq > self.applied:
                self._theta -= lr * self.grads
                self.applied = seq
