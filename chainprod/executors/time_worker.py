"""What lives on a worker of a sequence sharded over time: one chunk of steps and its state.

:class:`TimeChunk` holds steps ``t0 .. t1-1`` of the inputs (and targets)
of a recurrent model, placed once; it imports no engine. A Ray actor is this
class (:mod:`chainprod.executors.time_ray`); on Dask an instance lives in a
pinned worker process (:mod:`chainprod.executors.time_dask`). The driver,
which plans a step and sends these calls, is :mod:`chainprod.shard_time`.

A step is one :meth:`TimeChunk.forward` call per layer (from the state the
previous chunk hands over), then one :meth:`TimeChunk.backward` call per
layer, top layer first (from the adjoint the next chunk hands back), then
:meth:`TimeChunk.report`. The sequential part of each call is the recurrent
kernel contract (:mod:`chainprod.kernels.recurrent`): ``forward(cell, X,
W_hh, b_hh, h0, c0)`` and ``backward(..., dHs, dhT, dcT)``; the input
projections ``X = u W_ih^T + b_ih`` and the input-side gradients
``dW_ih = sum_t dX_t^T u_t`` are one BLAS product each over the chunk.

A :class:`~chainprod.DiagonalRecurrence` (``cell="diag"``) runs instead
:meth:`TimeChunk.diag_local`, :meth:`TimeChunk.diag_finish` and
:meth:`TimeChunk.diag_grads`, every chunk at once (see their comment), on
the layer's own loops (:mod:`chainprod.kernels.ssm_numba`, ``ssm_numpy``).
A Newton forward pass over time replaces the forward calls by the
``newton_*`` calls of :mod:`chainprod.executors.time_newton`.

What crosses a process boundary per step (what :func:`payload_bytes`
counts, where it is sent): a layer's parameters once per chunk, one
boundary state ``h`` (and ``c`` for an LSTM) ``(N, H)`` per layer forward
and one boundary adjoint backward, and the chunk's partial parameter
gradients and loss at the end. The inputs and every layer's outputs stay
on the worker. Nothing depends on the chunk's length, but the gradients of
the chunk's inputs, reported when asked (``inputs=True``; kept apart in the
report, ``"inputs"``).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from .sharded_worker import payload_bytes
from .time_newton import TimeChunkNewton

__all__ = ["TimeChunk", "CALLS", "CELLS", "param_names"]

#: the calls :meth:`TimeChunk.run` accepts
CALLS = frozenset({"forward", "backward", "report", "diag_local", "diag_finish", "diag_grads",
                   "newton_begin", "newton_map", "newton_update", "newton_finish"})

#: recurrent cell -> gates (blocks of ``H`` rows in ``W_ih``, ``W_hh``), as the kernel contract has them
CELLS = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def param_names(layer: int, bias: bool) -> tuple:
    """torch's names of a layer's parameters: ``weight_ih_l{k}``, ``weight_hh_l{k}`` (and the two biases)."""
    names = (f"weight_ih_l{layer}", f"weight_hh_l{layer}")
    return names + ((f"bias_ih_l{layer}", f"bias_hh_l{layer}") if bias else ())


class TimeChunk(TimeChunkNewton):
    """Steps ``t0 .. t1-1`` of a sequence and every layer's states over them, resident in one process.

    Parameters
    ----------
    spec : dict
        ``index``, ``chunks`` (``P``), ``t0``, ``t1`` (global steps), ``cell``
        (a key of :data:`CELLS`, or ``"diag"``), ``layers``, ``hidden``, ``bias``,
        ``kernels`` (``"numba"`` or ``"numpy"``), ``loss`` (``"sum"`` or
        ``"mse"``) and ``count`` (elements of the whole output: the mean of
        ``"mse"`` divides by it).
    x : ndarray, ``(t1 - t0, N, d_in)``
        The chunk's inputs, time first.
    y : ndarray or None
        The chunk's targets (shaped like its outputs) for ``"mse"``.
    """

    def __init__(self, spec, x, y=None):
        self.index, self.chunks = int(spec["index"]), int(spec["chunks"])
        self.t0, self.t1 = int(spec["t0"]), int(spec["t1"])
        self.cell, self.L, self.H = spec["cell"], int(spec["layers"]), int(spec["hidden"])
        self.bias, self.loss, self.count = bool(spec["bias"]), spec["loss"], int(spec["count"])
        # the kernel sets load on the worker, where they run
        kernels = spec.get("kernels", "numpy")
        if self.cell == "diag":
            if kernels == "numpy":
                from ..kernels import ssm_numpy as ssm
            else:
                from ..kernels import ssm_numba as ssm
            self.ssm = ssm
        else:
            from ..kernels.recurrent import get_recurrent_kernels

            self.kernels = get_recurrent_kernels(kernels)
        self.x = np.ascontiguousarray(x)
        self.y = None if y is None else np.ascontiguousarray(y)
        self.epoch = -1
        self.lock = threading.Lock()  # one call at a time, even on a worker with several threads
        self.reset()

    def reset(self):
        """Forget the last step (a new one starts)."""
        L = self.L
        self.p = [None] * L  # (W_ih, W_hh, b_ih, b_hh) of each layer, as sent this step
        self.X, self.Hs, self.Z = [None] * L, [None] * L, [None] * L
        self.h0, self.c0 = [None] * L, [None] * L
        self.grads: dict = {}
        self.inputs: dict = {}  # the gradients of the chunk's inputs (and of h0, c0 on the first chunk), if asked
        self.newton = None  # a layer's Newton pass in progress (chainprod.executors.time_newton)
        self.dU = None  # dloss/d(input of the layer above), on its way down
        self.dtop = None
        self.value = 0.0
        self.bad = None  # (layer, global step) of the first non-finite state
        self.sent = 0
        self.seconds = 0.0

    # -- bookkeeping --------------------------------------------------------------
    def pid(self):
        return os.getpid()

    def run(self, epoch, method, *args):
        """``method(*args)`` for the driver's attempt ``epoch``; ``(None, None)`` if a newer attempt came first."""
        if method not in CALLS:
            raise ValueError(f"time chunk {self.index}: unknown call {method!r}")
        with self.lock:
            if epoch < self.epoch:
                return None, None  # a call of an abandoned step, overtaken by a newer one
            if epoch > self.epoch:
                self.epoch = epoch
                self.reset()
            t0 = time.perf_counter()
            value, report = getattr(self, method)(*args)
            self.seconds += time.perf_counter() - t0
            self.sent += payload_bytes(value)
            return value, report

    # -- a step ---------------------------------------------------------------------
    def _input(self, l):
        return self.x if l == 0 else self.Hs[l - 1]

    def project(self, l, params):
        """``(X, W_hh, b_hh)`` of layer ``l``: the input projections of every step, in one product."""
        W_ih, W_hh, b_ih, b_hh = params
        u = self._input(l)
        T, N, _ = u.shape
        GH = W_hh.shape[0]
        X = (u.reshape(T * N, -1) @ W_ih.T).reshape(T, N, GH)
        if b_ih is not None:
            X += b_ih
        b_hh = np.zeros(GH, u.dtype) if b_hh is None else b_hh
        return X, np.ascontiguousarray(W_hh), b_hh

    def forward(self, l, params, state, hand_on=True):
        """Layer ``l`` over the chunk from ``state = (h, c)`` (``None``: zeros); returns the last ``(h, c)``.

        ``params`` is ``(W_ih, W_hh, b_ih, b_hh)`` (biases ``None`` without
        bias). The last chunk returns ``None``: no one consumes its state
        (nor does anyone without ``hand_on``). On the top layer the chunk's
        loss terms and their cotangents are formed here, from its own targets.
        """
        W_ih, b_ih = params[0], params[2]
        X, W_hh, b_hh = self.project(l, params)
        T, N, _ = X.shape
        dt = X.dtype
        h0, c0 = (None, None) if state is None else state
        h0 = np.zeros((N, self.H), dt) if h0 is None else np.ascontiguousarray(h0, dtype=dt)
        if self.cell == "lstm":
            c0 = np.zeros((N, self.H), dt) if c0 is None else np.ascontiguousarray(c0, dtype=dt)
        else:
            c0 = None
        with np.errstate(over="ignore", invalid="ignore"):
            Hs, Z = self.kernels.forward(self.cell, np.ascontiguousarray(X), W_hh, b_hh, h0, c0)
        self.p[l] = (W_ih, W_hh, b_ih, b_hh)
        self.X[l], self.Hs[l], self.Z[l], self.h0[l], self.c0[l] = X, Hs, Z, h0, c0
        fin = np.isfinite(Hs).reshape(T, -1).all(axis=1)
        if not fin.all() and (self.bad is None or l < self.bad[0]):
            self.bad = (l, self.t0 + int(np.argmin(fin)))
        if l == self.L - 1:
            self._loss(Hs)
        if self.index == self.chunks - 1 or not hand_on:
            return None, None
        return (Hs[-1].copy(), Z[-1, :, 4 * self.H:].copy() if self.cell == "lstm" else None), None

    def _loss(self, out):
        with np.errstate(over="ignore", invalid="ignore"):
            if self.loss == "sum":
                self.value = float(out.sum(dtype=np.float64))
                self.dtop = np.ones_like(out)
            else:
                r = out - self.y
                self.value = float((r * r).sum(dtype=np.float64)) / self.count
                self.dtop = np.ascontiguousarray(r * out.dtype.type(2.0 / self.count))

    def backward(self, l, adjoint, inputs=False):
        """Backprop of layer ``l`` over the chunk from ``adjoint = (dh, dc)`` at its last step (``None``: zeros).

        Keeps the layer's partial parameter gradients and the cotangent of its
        input (for layer ``l-1``; with ``inputs``, of ``x`` too, and the first
        chunk keeps ``dh0, dc0``); returns ``(dh0, dc0)`` for the chunk before
        (the first chunk returns ``None``).
        """
        W_ih, W_hh, b_ih, b_hh = self.p[l]
        dHs = self.dtop if l == self.L - 1 else self.dU
        dhT, dcT = (None, None) if adjoint is None else adjoint
        with np.errstate(over="ignore", invalid="ignore"):
            dX, dW_hh, db_hh, dh0, dc0 = self.kernels.backward(
                self.cell, self.X[l], W_hh, b_hh, self.h0[l], self.c0[l], self.Hs[l], self.Z[l],
                np.ascontiguousarray(dHs), dhT, dcT)
            u = self._input(l)
            T, N, GH = dX.shape
            dX2 = dX.reshape(T * N, GH)
            names = param_names(l, self.bias)
            g = [dX2.T @ u.reshape(T * N, -1), dW_hh]
            if self.bias:
                g += [dX2.sum(axis=0), db_hh]
            self.grads.update(zip(names, g))
            self.dU = (dX2 @ W_ih).reshape(T, N, -1) if l > 0 or inputs else None
        if inputs:
            if l == 0:
                self.inputs["input"] = self.dU
            if self.index == 0:
                for name, d in (("h0", dh0), ("c0", dc0)):
                    if d is not None:
                        self.inputs.setdefault(name, [None] * self.L)[l] = d
        if self.index == 0:
            return None, None
        return (dh0, dc0), None

    # -- the diagonal linear recurrence: every chunk at once --------------------------------------
    # h_t = a * h_{t-1} + B u_t is linear in the state it starts from, so each chunk runs from zero,
    # the driver carries the P boundary states across (h_in of chunk b+1 = a^len_b * h_in_b + its
    # end state from zero), and each chunk runs again from its true h_in; the adjoints the same way
    # backwards. Three rounds of P independent calls, whatever P.
    def diag_project(self, params):
        """Keep ``params = (a, B, C, D)`` and ``B u_t`` of every step."""
        B = params[1]
        self.p = params
        T, N, d_in = self.x.shape
        self.BU = (self.x.reshape(T * N, d_in) @ B.T).reshape(T, N, -1)

    def diag_local(self, params):
        """Keep ``params = (a, B, C, D)``; returns ``(None, the chunk's last state run from zero)``."""
        self.diag_project(params)
        a, N = params[0], self.x.shape[1]
        Hs = np.empty_like(self.BU)
        with np.errstate(over="ignore", invalid="ignore"):
            self.ssm.states(a, self.BU, np.zeros((N, a.shape[0]), a.dtype), Hs)
        return None, Hs[-1].copy()

    def diag_finish(self, h_in):
        """States from the true ``h_in``, outputs, loss terms; returns ``(None, first step's adjoint from zero)``."""
        a, B, C, D = self.p
        T, N, d_in = self.x.shape
        self.h0[0] = h_in = np.ascontiguousarray(h_in)
        Hs = self.Hs[0] = np.empty_like(self.BU)
        with np.errstate(over="ignore", invalid="ignore"):
            bad = self.ssm.states(a, self.BU, h_in, Hs)
            Y = (Hs.reshape(T * N, -1) @ C.T).reshape(T, N, -1)
            if D is not None:
                Y += (self.x.reshape(T * N, d_in) @ D.T).reshape(T, N, -1)
            fin = np.isfinite(Y).reshape(T, -1).all(axis=1)
            if bad >= 0 or not fin.all():
                self.bad = (0, self.t0 + (bad if bad >= 0 else int(np.argmin(fin))))
            self._loss(Y)
            self.G = (self.dtop.reshape(T * N, -1) @ C).reshape(T, N, -1)  # dloss/dh_t from the outputs
            mu = np.empty_like(self.G)
            self.ssm.adjoint(a, self.G, Hs, h_in, mu, np.empty_like(a))
        return None, mu[0].copy()

    def diag_grads(self, g, inputs=False):
        """The adjoints from ``g`` (arriving at the last state from later) and the partial gradients.

        With ``inputs``, also the gradient of the chunk's inputs (and of ``h0`` on the first chunk).
        """
        a, B, C, D = self.p
        T, N, d_in = self.x.shape
        G = self.G.copy()
        G[-1] += g
        lam, da = np.empty_like(G), np.empty_like(a)
        with np.errstate(over="ignore", invalid="ignore"):
            self.ssm.adjoint(a, G, self.Hs[0], self.h0[0], lam, da)
            u2, dY2 = self.x.reshape(T * N, d_in), self.dtop.reshape(T * N, -1)
            self.grads = {"a": da, "B": lam.reshape(T * N, -1).T @ u2, "C": dY2.T @ self.Hs[0].reshape(T * N, -1)}
            if D is not None:
                self.grads["D"] = dY2.T @ u2
            if inputs:
                du = lam.reshape(T * N, -1) @ B + (0 if D is None else dY2 @ D)
                self.inputs["input"] = du.reshape(T, N, d_in)
                if self.index == 0:
                    self.inputs["h0"] = a * lam[0]
        return self.report()

    def report(self):
        """The end of a step: ``(None, report)``: partial gradients, loss terms, input gradients, what was sent."""
        rep = {"chunk": self.index, "loss": self.value, "grads": self.grads, "bad": self.bad,
               "seconds": self.seconds, "pid": os.getpid(), "inputs": self.inputs}
        rep["sent"] = self.sent + payload_bytes(rep)
        return None, rep
