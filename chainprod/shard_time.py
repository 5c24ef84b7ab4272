"""A sequence sharded over time: train a recurrent model where its time chunks live.

:func:`shard_sequence` cuts a sequence ``x`` of ``T`` steps (and its targets
``y``) into ``P`` contiguous time chunks and places each, once, on one
worker (a Ray actor, or a pinned Dask worker:
:mod:`chainprod.executors.time_ray`, :mod:`chainprod.executors.time_dask`;
the worker's side is :mod:`chainprod.executors.time_worker`)::

    with cp.cluster("ray", workers=2) as ex:
        seq = cp.shard_sequence(model, ex, x, y, loss="mse", chunks=2)
        for _ in range(10):
            loss, grads = seq.value_and_grad()     # the current parameters, sent with the step
            seq.sgd_step(grads, lr=1e-2)
        trained = seq.params                       # a dict named like model.params

How a step works
----------------
Forward, layer by layer: chunk ``b`` runs the layer over its steps from the
last state ``(h, c)`` of chunk ``b-1`` and hands its own last state to chunk
``b+1``; the layer's outputs stay on the chunk's worker as the next layer's
input. The top layer's chunks form their loss terms and cotangents from
their own targets. Backward, top layer first: chunk ``b`` backprops the layer
over its steps from the adjoint ``(dh, dc)`` chunk ``b+1`` hands back, keeps
its partial parameter gradients (``dW_ih = sum_t dX_t^T u_t`` over its
steps, and the kernel's ``dW_hh``, biases), and hands its ``dh0, dc0`` to
chunk ``b-1``. The driver sums the ``P`` partial gradients. Every call of a
step is submitted at once, in an order every worker can run in turn; layer
``l`` of chunk ``b`` overlaps layer ``l+1`` of chunk ``b-1``.

A :class:`~chainprod.DiagonalRecurrence` is linear in its state, so its
chunks run at once: each from zero, then the driver carries the ``P``
boundary states across (and the ``P`` boundary adjoints back), and each
chunk runs again from its true boundary (:func:`chainprod.shard_time_newton.diag_step`).

``forward="deer"`` (or another Newton method) solves each layer over time
with every chunk at once instead (:mod:`chainprod.shard_time_newton`).

What moves per step (:attr:`TimeTrace.bytes_moved`): the parameters to every
chunk (``P |theta|``), ``(P-1) L`` boundary states and as many boundary
adjoints (``N H`` numbers each, ``2 N H`` for an LSTM), ``P`` partial
gradients (``P |theta|``) and ``P`` loss terms. Nothing of it grows with
``T`` (but ``with_inputs``' gradient of ``x``); ``x`` and ``y`` moved once, at placement.

Faults
------
Time chunks are not rebuilt: a chunk whose worker dies makes the step raise
:class:`~chainprod.errors.DistributedError` naming the chunk and its steps
(within the engine's wait, never a hang), and the sequence is closed; shard
it again. A step that times out
(:class:`~chainprod.errors.DistributedTimeoutError`) changes nothing: the
next step starts a new attempt, and calls of the old one are ignored.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from ._validate import as_float_array, check_learning_rate, check_timeout
from .errors import DistributedError, NonFiniteError
from .executors import Trace
from .executors.distributed import Deadline, DistributedExecutor
from .executors.sharded_worker import ShardLost, payload_bytes
from .executors.time_worker import param_names
from .forward_methods import add_forward_note
from .kernels.recurrent import get_recurrent_kernels
from .recurrent import Recurrent
from .recurrent_io import read_sequence, read_state, resolve_kernels, resolve_loss
from .shard_time_newton import diag_step, input_grads, time_newton
from .ssm import DiagonalRecurrence
from .ssm_grad import read_h0, read_u

__all__ = ["shard_sequence", "ShardedSequence", "TimeTrace", "describe_recurrent"]


@dataclass
class TimeTrace(Trace):
    """The record of one step of a sequence sharded over time.

    ``bytes_moved`` counts the numpy payload bytes that crossed a process
    boundary, where they were sent: ``bytes_params`` (the parameters, to
    every chunk, and an initial state), ``bytes_boundary`` (the states
    handed forward and the adjoints handed back between chunks, and a Newton
    pass's maps and states), ``bytes_reports`` (the partial gradients and loss
    terms the driver read) and ``bytes_inputs`` (``with_inputs``: the gradients
    of ``x``, ``T``-sized, and of ``h0``, ``c0``). A Newton forward pass
    (``forward``) leaves its :class:`~chainprod.newton_solve.NewtonTrace` in
    ``newton`` and the bytes of each iteration in ``newton_bytes``.
    """

    chunks: int = 0
    lengths: tuple = ()
    bytes_moved: int = 0
    bytes_params: int = 0
    bytes_boundary: int = 0
    bytes_reports: int = 0
    bytes_inputs: int = 0
    forward: str = "sequential"
    newton: object = None
    newton_bytes: list = field(default_factory=list)
    total_seconds: float = 0.0
    #: the chunks' seconds in their calls, per chunk
    chunk_seconds: list = field(default_factory=list)


def describe_recurrent(model) -> dict:
    """What a time chunk needs of a recurrent model: its cell, sizes and torch-named parameters.

    Parameters
    ----------
    model : chainprod.RNN, GRU, LSTM or DiagonalRecurrence

    Returns
    -------
    dict
        ``cell`` (``"diag"`` for the diagonal recurrence), ``layers``,
        ``hidden`` (the state's width), ``out`` (the outputs'), ``input_size``,
        ``bias``, ``batch_first``, ``dtype``, ``params`` (the model's dict, not copied).
    """
    if isinstance(model, DiagonalRecurrence):
        return dict(cell="diag", layers=1, hidden=model.d, out=model.d_out, input_size=model.d_in, bias=False,
                    batch_first=model.batch_first, dtype=np.dtype(model.dtype), params=model.params)
    if not isinstance(model, Recurrent):
        raise TypeError(f"shard_sequence() expects a chainprod RNN, GRU, LSTM or DiagonalRecurrence, "
                        f"got {type(model).__name__}")
    return dict(cell=model.cell, layers=model.num_layers, hidden=model.hidden_size, out=model.hidden_size,
                input_size=model.input_size, bias=model.bias, batch_first=model.batch_first,
                dtype=np.dtype(model.dtype), params=model.params)


def _engine_class(name):
    # engine modules import Ray / Dask: only when a sequence is placed on them
    if name == "ray":
        from .executors.time_ray import RayTimeChunks

        return RayTimeChunks
    from .executors.time_dask import DaskTimeChunks

    return DaskTimeChunks


def _edges(chunks, T):
    if isinstance(chunks, (list, tuple)):
        lengths = list(chunks)
        if not lengths or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
                              for n in lengths) or sum(lengths) != T:
            raise ValueError(f"chunks: a list of chunk lengths must hold ints >= 1 summing to T={T}, got {chunks!r}")
        return list(np.cumsum([0] + lengths).tolist())
    if isinstance(chunks, bool) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1 or a list of chunk lengths, got {chunks!r}")
    if chunks > T:
        raise ValueError(f"chunks={chunks} is more than the T={T} steps of x: each chunk needs at least one step")
    return [round(b * T / chunks) for b in range(int(chunks) + 1)]


class ShardedSequence:
    """A sequence cut into ``P`` contiguous time chunks, each resident on one worker.

    Create with :func:`shard_sequence`; see the module docstring for a step.

    Attributes
    ----------
    chunks : int
        ``P``.
    bounds : list of (int, int)
        Steps ``t0 .. t1-1`` of each chunk.
    params : dict
        The parameters the next step uses (torch names, like ``model.params``).
    pids : list
        Process id of each chunk.
    bytes_per_step : int
        Bytes the last step moved (``None`` before the first).
    """

    def __init__(self, model, executor, x, y=None, *, loss=None, chunks=None, h0=None, kernels=None, timeout=None):
        d = describe_recurrent(model)
        if not isinstance(executor, DistributedExecutor) or executor.name not in ("ray", "dask"):
            raise TypeError(f"shard_sequence() needs a Ray or Dask executor (from chainprod.cluster('ray') or "
                            f"chainprod.get_executor('dask')), got {executor!r}")
        loss = resolve_loss(loss, y)
        kernels = resolve_kernels(kernels)
        get_recurrent_kernels(kernels)  # an unknown name fails here, not on a worker
        self.timeout = executor.timeout if timeout is None else check_timeout(timeout)
        self._model = model
        self.cell, self.L, self.H, self.bias = d["cell"], d["layers"], d["hidden"], d["bias"]
        self.dtype = dt = d["dtype"]
        bf = d["batch_first"]
        if self.cell == "diag":
            x = read_u(model, x)
        else:
            x = np.ascontiguousarray(read_sequence(x, input_size=d["input_size"], batch_first=bf, dtype=dt,
                                                   what="x"))
        T, N, _ = x.shape
        out = d["out"]
        if y is not None:
            want = (N, T, out) if bf else (T, N, out)
            if np.shape(y) != want:
                raise ValueError(f"y: expected the output's shape {'(N, T, H)' if bf else '(T, N, H)'} = {want}, "
                                 f"got {np.shape(y)}")
            y = np.ascontiguousarray(read_sequence(y, input_size=out, batch_first=bf, dtype=dt, what="y"))
        self.T, self.N = T, N
        self.h0, self.h0_shapes = self._check_h0(h0)
        self.params = {k: np.array(v, copy=True) for k, v in d["params"].items()}
        edges = _edges(min(T, executor.workers or 2) if chunks is None else chunks, T)
        self.chunks = P = len(edges) - 1
        self.bounds = [(edges[b], edges[b + 1]) for b in range(P)]
        self.loss, self.kernels = loss, kernels
        self.bytes_per_step = None
        self._executor, self._closed, self._broken = executor, False, None
        self._engine = _engine_class(executor.name)(executor, P)
        self._finalizer = weakref.finalize(self, self._engine.close)
        try:
            deadline = Deadline(self.timeout)
            self._engine.new_epoch()
            self.pids = []
            for b, (t0, t1) in enumerate(self.bounds):
                spec = dict(index=b, chunks=P, t0=t0, t1=t1, cell=self.cell, layers=self.L, hidden=self.H,
                            bias=self.bias, kernels=kernels, loss=loss, count=T * N * out)
                xb, yb = x[t0:t1], None if y is None else y[t0:t1]
                self.pids.append(self._guard(functools.partial(self._engine.start, b, spec, xb, yb, deadline)))
        except BaseException:
            self.close()
            raise

    def _check_h0(self, h0):
        """``(states or None, the shapes h0 (c0) were given in)``: the input gradients take those shapes."""
        full = (self.N, self.H) if self.cell == "diag" else (self.L, self.N, self.H)
        if h0 is None:
            return None, (full, full)
        if self.cell == "diag":
            h, shape = read_h0(self._model, h0, self.N)
            return [h.copy(), None], (shape, None)
        kw = dict(num_layers=self.L, N=self.N, H=self.H, dtype=self.dtype)
        if self.cell != "lstm":
            if isinstance(h0, tuple):
                raise TypeError("h0: only an LSTM takes a pair (h0, c0); pass one array (num_layers, N, hidden)")
            h, shape = read_state(h0, name="h0", **kw)
            return [np.array(h), None], (shape, None)
        if not (isinstance(h0, tuple) and len(h0) == 2):
            raise TypeError("h0: an LSTM takes its initial state as a pair (h0, c0), as torch does, or None")
        read = [read_state(a, name=n, **kw) for a, n in zip(h0, ("h0", "c0"))]
        return [np.array(r[0]) for r in read], tuple(r[1] for r in read)

    def __repr__(self):
        state = "closed" if self._closed else "open"
        return (f"<ShardedSequence of {self.cell} x{self.L} over T={self.T} on {self.chunks} "
                f"{self._executor.name} chunks {self.bounds}, {state}>")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Remove the chunks from the workers (the sequence cannot be used afterwards)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    # -- errors -------------------------------------------------------------------
    def _guard(self, fn):
        """Run ``fn``; a lost chunk becomes a :class:`DistributedError` naming it, and closes the sequence."""
        try:
            return fn()
        except ShardLost as e:
            name = self._executor.name
            which = ", ".join(f"chunk {b} (steps {self.bounds[b][0]}..{self.bounds[b][1] - 1})" for b in e.shards)
            self._broken = (f"{name}: time {which} of this sharded sequence lost its worker ({e.cause}); "
                            "time chunks are not rebuilt: shard the sequence again")
            self.close()
            raise DistributedError(self._broken, name, f"chunk {e.shards[0]}") from None

    def _check_open(self):
        if self._broken:
            raise DistributedError(self._broken, self._executor.name, "sharded sequence")
        if self._closed:
            raise RuntimeError("this sharded sequence was closed")

    # -- parameters -----------------------------------------------------------------
    def set_params(self, params):
        """Use ``params`` (a dict named like ``model.params``, or a model) from the next step on (copied)."""
        params = getattr(params, "params", params)
        if not isinstance(params, dict) or set(params) != set(self.params):
            raise ValueError(f"set_params: expected the parameters {sorted(self.params)}, got "
                             f"{sorted(params) if isinstance(params, dict) else type(params).__name__}")
        new = {}
        for k, v in params.items():
            v = as_float_array(v, k)
            if v.shape != self.params[k].shape or v.dtype != self.dtype:
                raise ValueError(f"set_params: {k} must be {self.params[k].shape} of {self.dtype}, got "
                                 f"{v.shape} of {v.dtype}")
            new[k] = np.array(v, copy=True)
        self.params = new

    def sgd_step(self, grads, lr):
        """``params[k] -= lr * grads[k]`` for every parameter (new arrays; the next step sends them)."""
        lr = check_learning_rate(lr)
        if not isinstance(grads, dict) or not set(self.params) <= set(grads):
            raise ValueError(f"sgd_step: grads must hold {sorted(self.params)}")
        self.params = {k: (v - lr * np.asarray(grads[k], dtype=self.dtype)).astype(self.dtype)
                       for k, v in self.params.items()}

    def model(self):
        """A local model of the same class and options with the current :attr:`params` (copied)."""
        m = self._model
        if self.cell == "diag":
            p = self.params
            return DiagonalRecurrence(p["a"], p["B"], p["C"], p.get("D"), batch_first=m.batch_first)
        options = {"nonlinearity": m.nonlinearity} if m.cell.startswith("rnn") else {}
        return type(m).from_params(self.params, batch_first=m.batch_first, **options)

    def _layer(self, l):
        return tuple(self.params[n] for n in param_names(l, self.bias)) + (() if self.bias else (None, None))

    # -- a step ---------------------------------------------------------------------
    def value_and_grad(self, return_trace=False, timeout=None, *, forward="sequential", forward_options=None,
                       with_inputs=False):
        """The loss over all ``T`` steps and its parameter gradients, at the current :attr:`params`.

        Parameters
        ----------
        return_trace, timeout
            Also return the step's :class:`TimeTrace`; seconds for this step (default: the sequence's).
        forward, forward_options
            ``"sequential"`` (the chunks of a layer one after another) or a
            Newton method over time (``"deer"``, ``"quasi_deer"``, ``"elk"``,
            ``"quasi_elk"``: :mod:`chainprod.shard_time_newton`), and a dict of
            ``tol``, ``max_iter``, ``damping``, ``fallback``.
        with_inputs : bool
            Also return ``"input"`` (shaped like ``x``), ``"h0"`` (and ``"c0"``),
            as ``cp.value_and_grad(model, x, y, with_inputs=True)`` does.

        Returns
        -------
        value : float
        grads : dict
            Named like ``model.params``, summed over time and batch (the
            ``P`` chunks' partial sums added on the driver).
        trace : TimeTrace, with ``return_trace=True``

        Raises
        ------
        DistributedError
            A chunk's worker was lost (names the chunk and its steps).
        DistributedTimeoutError
            The step did not finish within ``timeout`` (default: the sequence's).
        NonFiniteError
            A state went NaN or infinite (names the layer and the step).
        ConvergenceError
            The Newton forward pass did not converge (without ``fallback="sequential"``).
        """
        self._check_open()
        S = 2 * self.H if self.cell == "lstm" else self.H
        newton = time_newton(forward, forward_options, cell=self.cell, T=self.T, N=self.N, S=S, dtype=self.dtype)
        deadline = Deadline(self.timeout if timeout is None else check_timeout(timeout))
        trace = TimeTrace(backend=f"{self._executor.name}-time", workers=self.chunks, chunks=self.chunks,
                          lengths=tuple(t1 - t0 for t0, t1 in self.bounds), forward=forward)
        t_start = time.perf_counter()
        reports = self._guard(lambda: self._run(trace, deadline, newton, bool(with_inputs)))
        trace.total_seconds = time.perf_counter() - t_start
        trace.chunk_seconds = [reports[b]["seconds"] for b in range(self.chunks)]
        trace.bytes_inputs = sum(payload_bytes(r["inputs"]) for r in reports.values())
        trace.bytes_reports = sum(payload_bytes(r) for r in reports.values()) - trace.bytes_inputs
        sent = sum(r["sent"] for r in reports.values())
        trace.bytes_boundary += sent - trace.bytes_reports - trace.bytes_inputs
        trace.bytes_moved = trace.bytes_params + trace.bytes_boundary + trace.bytes_reports + trace.bytes_inputs
        self.bytes_per_step = trace.bytes_moved
        add_forward_note(trace, trace.newton)
        bad = [r["bad"] for r in reports.values() if r["bad"] is not None]
        if bad:
            l, t = min(bad)
            raise NonFiniteError(f"layer {l}: the state at step {t} is NaN or infinite (inputs and parameters "
                                 "are finite; the recurrence overflowed)", (l, l))
        value = float(sum(reports[b]["loss"] for b in range(self.chunks)))
        grads = {k: sum(reports[b]["grads"][k] for b in range(self.chunks)) for k in self.params}
        if with_inputs:
            grads.update(input_grads(reports, cell=self.cell, layers=self.L, batch_first=self._model.batch_first,
                                     h0_shapes=self.h0_shapes))
        return (value, grads, trace) if return_trace else (value, grads)

    def _run(self, trace, deadline, newton, inputs):
        eng, P = self._engine, self.chunks
        eng.new_epoch()
        if self.cell == "diag":
            p, h0 = self.params, None if self.h0 is None else self.h0[0]
            return diag_step(eng, self.bounds, (p["a"], p["B"], p["C"], p.get("D")), h0, self.N, newton, inputs,
                             trace, deadline)
        h0 = self.h0
        layers = [(self._layer(l), None if h0 is None else (h0[0][l], None if h0[1] is None else h0[1][l]))
                  for l in range(self.L)]
        if newton is None or newton.run(eng, self.bounds, layers, trace, deadline) is None:
            for l, (p, state) in enumerate(layers):
                trace.bytes_params += P * payload_bytes(p) + payload_bytes(state)
                for b in range(P):
                    state = eng.call(b, "forward", l, p, state)[0]  # chunk b's last state goes to chunk b+1
        for l in reversed(range(self.L)):
            adjoint = None
            for b in reversed(range(P)):
                adjoint = eng.call(b, "backward", l, adjoint, inputs)[0]  # chunk b's dh0 goes to chunk b-1
        finals = {b: eng.call(b, "report")[1] for b in range(P)}
        return eng.reports(finals, deadline)


def shard_sequence(model, executor, x, y=None, *, loss=None, chunks=None, h0=None, kernels=None,
                   timeout=None) -> ShardedSequence:
    """Place the time chunks of ``x`` (and ``y``) on the workers of ``executor``, to train ``model`` there.

    Parameters
    ----------
    model : chainprod.RNN, GRU, LSTM or DiagonalRecurrence
        Its parameters are copied (:attr:`ShardedSequence.params`); the model is not modified.
    executor : RayExecutor or DaskExecutor
        From ``chainprod.cluster("ray" | "dask", workers=P)`` (or ``get_executor``).
    x : array ``(T, N, input_size)`` (``(N, T, ...)`` for a batch-first model)
    y : array shaped like the outputs, for ``loss="mse"``
    loss : {"sum", "mse"}, optional
        ``"sum"``: the sum of every output (torch's ``output.sum()``, the
        default without ``y``); ``"mse"``: ``mse_loss(output, y)`` (the
        default with ``y``).
    chunks : int or list of int, optional
        ``P`` (steps split as evenly as they go, ``round(b T / P)`` edges;
        default the executor's ``workers``, else 2), or the length of each chunk.
    h0 : array ``(num_layers, N, hidden)``, or ``(h0, c0)`` for an LSTM, optional
        The initial state (zeros by default).
    kernels : {"numba", "numpy"}, optional
        The recurrent kernel set the chunks run (default: compiled when numba is installed).
    timeout : float, optional
        Seconds per step and for the placement (default: the executor's).

    Returns
    -------
    ShardedSequence
    """
    return ShardedSequence(model, executor, x, y, loss=loss, chunks=chunks, h0=h0, kernels=kernels, timeout=timeout)
