"""Recurrent models over time, named and shaped like ``torch.nn.RNN``, ``nn.GRU`` and ``nn.LSTM``.

A model of ``num_layers`` stacked layers runs over inputs ``(T, N, d_in)``
(``(N, T, d_in)`` with ``batch_first``); layer ``l`` takes the states of
layer ``l - 1`` as its inputs. Its parameters are torch's, by name and
shape (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
``..._l1``), with torch's gate order (``(r, z, n)``, ``(i, f, g, o)``).

Each layer's input projections ``X = u W_ih^T + b_ih`` of every step are
one matrix product; only the part that waits for ``h_{t-1}`` runs step by
step, in a recurrent kernel set (:mod:`chainprod.kernels.recurrent`:
compiled, or the numpy reference). Gradients (:func:`chainprod.grad`,
:func:`chainprod.value_and_grad`, through ``__chainprod_value_and_grad__``)
take the loss over every step of the top layer's states and go down the
layers: ``"backprop"`` runs the kernel set's backprop through time; a scan
schedule runs the adjoints as a reverse linear recurrence over the state
Jacobians (:mod:`chainprod.recurrent_grad`). ``docs/recurrences.md`` has the
equations.
"""

from __future__ import annotations

import numpy as np

from . import recurrent_array
from ._validate import as_float_array, check_workers
from ._workspace import scope
from .arrays import is_foreign
from .errors import UnsupportedModuleError
from .executors import TraceEvent
from .forward_methods import add_forward_note, gradient_tape
from .grad import make_trace
from .kernels.recurrent import get_recurrent_kernels
from .recurrent_grad import auto_uses_scan, probe_scan
from .recurrent_io import (
    check_options,
    loss_terms,
    read_sequence,
    read_state,
    resolve_kernels,
    resolve_loss,
)
from .recurrent_layers import backward_layers, run_layers
from .recurrent_quick import try_value_and_grad

__all__ = ["GRU", "LSTM", "RNN", "Recurrent"]

_DTYPES = (np.float32, np.float64)


def _positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class Recurrent:
    """What :class:`RNN`, :class:`GRU` and :class:`LSTM` share; use those.

    Attributes
    ----------
    params : dict of numpy.ndarray
        Torch's names and shapes, read-only copies: ``weight_ih_l{k}``
        ``(G*H, d)``, ``weight_hh_l{k}`` ``(G*H, H)`` and, with ``bias``,
        ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``(G*H,)``; ``G`` gates.
    input_size, hidden_size, num_layers, bias, batch_first, dtype
        As in torch.
    cell : str
        The kernel sets' cell name (``"rnn_tanh"``, ``"rnn_relu"``,
        ``"gru"``, ``"lstm"``).
    """

    #: torch's module name, the number of gates, the state width in units of H
    mode, gates, state_factor = "", 1, 1

    def __init__(self, input_size, hidden_size, num_layers=1, *, bias=True, batch_first=False, dtype=np.float64,
                 seed=None, **options):
        input_size = _positive_int(input_size, "input_size")
        H = _positive_int(hidden_size, "hidden_size")
        L = _positive_int(num_layers, "num_layers")
        if np.dtype(dtype) not in _DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
        # torch's initialisation: every parameter uniform in (-1/sqrt(H), 1/sqrt(H)), in registration order
        rng, k = np.random.default_rng(seed), 1 / np.sqrt(H)
        params = {}
        for layer in range(L):
            d = input_size if layer == 0 else H
            shapes = {"weight_ih": (self.gates * H, d), "weight_hh": (self.gates * H, H)}
            if bias:
                shapes.update(bias_ih=(self.gates * H,), bias_hh=(self.gates * H,))
            for name, shape in shapes.items():
                params[f"{name}_l{layer}"] = rng.uniform(-k, k, shape).astype(dtype)
        self._setup(params, bool(batch_first), options)

    @classmethod
    def from_params(cls, params, *, batch_first=False, **options):
        """A model with a copy of ``params``: a dict of torch-named arrays (``weight_ih_l0``, ...).

        ``num_layers``, ``input_size``, ``hidden_size`` and ``bias`` are read
        from the names and shapes; ``batch_first`` (and ``nonlinearity`` for
        :class:`RNN`) are given.

        Raises
        ------
        ValueError
            A missing or unknown name, or a shape that does not fit (the
            message names the parameter and the expected shape).
        TypeError
            Not float32 / float64, or parameters of different dtypes.
        """
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of arrays named as torch names them, got {type(params).__name__}")
        model = cls.__new__(cls)
        model._setup(params, bool(batch_first), options)
        return model

    @classmethod
    def from_torch(cls, module):
        """A model with a copy of the parameters of a ``torch.nn.RNN``, ``nn.GRU`` or ``nn.LSTM``.

        Any ``num_layers``, ``bias``, ``batch_first`` and ``nonlinearity``;
        float32 or float64 parameters.

        Raises
        ------
        chainprod.errors.UnsupportedModuleError
            Another module type, or an option these models cannot represent
            (``bidirectional=True``, ``proj_size > 0``, ``dropout > 0`` in
            training mode with more than one layer); the message names it.
        """
        import torch  # loaded only here: ``import chainprod`` never loads torch

        cls.check_torch(module)
        params = {}
        for name, p in module.named_parameters():
            if p.dtype not in (torch.float32, torch.float64) or p.device.type != "cpu":
                raise UnsupportedModuleError(f"nn.{cls.mode} parameter {name!r} is {p.dtype} on {p.device}; only "
                                             "float32 or float64 CPU parameters are supported", "", module)
            params[name] = p.detach().numpy()
        options = {"nonlinearity": module.nonlinearity} if cls.mode == "RNN" else {}
        return cls.from_params(params, batch_first=module.batch_first, **options)

    @classmethod
    def check_torch(cls, module):
        """Refuse (``UnsupportedModuleError``) a module that is not exactly ``nn.{mode}`` or has an option we lack."""
        import torch

        want = getattr(torch.nn, cls.mode)
        if type(module) is not want:  # a subclass may override forward
            raise UnsupportedModuleError(f"{cls.__name__}.from_torch takes a torch.nn.{cls.mode}, got "
                                         f"{type(module).__name__}", "", module)
        for option, value, ok in (("bidirectional", module.bidirectional, False),
                                  ("proj_size", getattr(module, "proj_size", 0), 0)):
            if value != ok:
                raise UnsupportedModuleError(f"nn.{cls.mode} with {option}={value!r} is not supported (only "
                                             f"{option}={ok!r})", "", module)
        if module.training and module.dropout > 0 and module.num_layers > 1:
            raise UnsupportedModuleError(
                f"nn.{cls.mode} with dropout={module.dropout} in training mode: its random masks between layers "
                "are not a fixed function; call module.eval() or set dropout=0", "", module)

    def _setup(self, params, batch_first, options):
        self._take_options(options)
        first = params.get("weight_ih_l0")
        if first is None:
            raise ValueError(f"params: no 'weight_ih_l0' (got {sorted(params)}); torch's names are expected")
        L = 1 + max(int(k.rsplit("_l", 1)[1]) for k in params if k.startswith("weight_ih_l") and
                    k.rsplit("_l", 1)[1].isdigit())
        bias = "bias_ih_l0" in params
        names = [f"{w}_l{layer}" for layer in range(L)
                 for w in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())]
        missing, unknown = [n for n in names if n not in params], sorted(set(params) - set(names))
        if missing or unknown:
            raise ValueError(f"params: for {L} layer(s) {'with' if bias else 'without'} biases, missing "
                             f"{missing}, unknown {unknown}")
        first = as_float_array(first, "weight_ih_l0", ndim=2)
        GH, d_in = first.shape
        if GH % self.gates:
            raise ValueError(f"weight_ih_l0: {self.mode} has {self.gates} gates, so the first axis must be "
                             f"{self.gates} * hidden_size; got shape {first.shape}")
        H = GH // self.gates
        self.params = {}
        for name in names:
            layer = int(name.rsplit("_l", 1)[1])
            want = (GH,) if name.startswith("bias") else \
                (GH, d_in if layer == 0 else H) if name.startswith("weight_ih") else (GH, H)
            arr = as_float_array(params[name], name)
            if arr.shape != want:
                raise ValueError(f"{name}: expected shape {want} ({self.mode}, {self.gates} gate(s), hidden_size "
                                 f"{H}, input_size {d_in}), got {arr.shape}")
            if arr.dtype != first.dtype:
                raise TypeError(f"{name} is {arr.dtype} but weight_ih_l0 is {first.dtype}; pass every parameter "
                                "in one dtype (float32 or float64)")
            # copies, read-only: the model is a value, and nothing the user holds is aliased or written
            c = np.array(arr, copy=True, order="C")
            c.flags.writeable = False
            self.params[name] = c
        self.input_size, self.hidden_size, self.num_layers = d_in, H, L
        self.bias, self.batch_first, self.dtype = bias, batch_first, first.dtype
        zeros = np.zeros(GH, self.dtype)
        zeros.flags.writeable = False
        self._zero_bias = zeros  # b_hh for the kernels when the model has none

    def _take_options(self, options):
        if options:
            raise TypeError(f"{type(self).__name__} takes no option(s) {sorted(options)}")

    @property
    def cell(self) -> str:
        return self.mode.lower()

    def __repr__(self):
        extra = f", nonlinearity={self.nonlinearity!r}" if self.mode == "RNN" else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
                f"{extra}, bias={self.bias}, batch_first={self.batch_first}, dtype={self.dtype})")

    # -- forward --------------------------------------------------------------------------------------
    def layer_params(self, layer):
        """``(W_ih, W_hh, (b_ih, b_hh))`` of ``layer``: ``b_ih`` None and ``b_hh`` zeros without biases."""
        p = self.params
        b = self._zero_bias if not self.bias else p[f"bias_hh_l{layer}"]
        return p[f"weight_ih_l{layer}"], p[f"weight_hh_l{layer}"], (p.get(f"bias_ih_l{layer}"), b)

    def initial_states(self, h0, N):
        """``(h0, c0, h0's shape, c0's shape)``: each ``(num_layers, N, H)``, ``c0`` None but for the LSTM."""
        kw = dict(num_layers=self.num_layers, N=N, H=self.hidden_size, dtype=self.dtype)
        if self.mode != "LSTM":
            if isinstance(h0, tuple):
                raise TypeError(f"h0: {self.mode} takes one initial state array, got a tuple (only an LSTM takes "
                                "(h0, c0))")
            return (*read_state(h0, name="h0", **kw), None, None)
        if h0 is None:
            h0 = (None, None)
        if not (isinstance(h0, tuple) and len(h0) == 2):
            raise TypeError("h0: an LSTM takes its initial state as a pair (h0, c0), as torch does, or None")
        h, h_shape = read_state(h0[0], name="h0", **kw)
        c, c_shape = read_state(h0[1], name="c0", **kw)
        return h, h_shape, c, c_shape

    def forward(self, x, h0=None, *, kernels=None):
        """Run the model over ``x``, as torch's module does.

        Parameters
        ----------
        x : array, (T, N, input_size)
            ``(N, T, input_size)`` with ``batch_first``. A torch tensor, JAX or
            CuPy array runs in its library, on its device; so do the results.
        h0 : array or pair, optional
            ``(num_layers, N, H)`` (or ``(N, H)`` for one layer); a pair
            ``(h0, c0)`` for an LSTM. Zeros by default.
        kernels : {"numba", "numpy"}, optional
            The recurrent kernel set (default: compiled when available).

        Returns
        -------
        output : array
            The top layer's states ``(T, N, H)`` (``(N, T, H)`` with
            ``batch_first``).
        h_n : array or pair
            The last state of every layer, ``(num_layers, N, H)``; a pair
            ``(h_n, c_n)`` for an LSTM.

        Raises
        ------
        ValueError
            Wrong shapes, a NaN or infinity (naming the step).
        TypeError
            A dtype other than the model's.
        chainprod.errors.NonFiniteError
            A state overflowed (``relu``); the message names the step and the layer.
        """
        if is_foreign(x, h0):  # torch, JAX or CuPy arrays: computed in their library, on their device
            return recurrent_array.forward(self, x, h0, kernels=kernels)
        kern = get_recurrent_kernels(resolve_kernels(kernels))
        u = read_sequence(x, input_size=self.input_size, batch_first=self.batch_first, dtype=self.dtype)
        h0, _, c0, _ = self.initial_states(h0, u.shape[1])
        with scope() as ws:  # only the top layer's states (the output) outlive the call
            tape = run_layers(self, u, h0, c0, kern, ws, fresh_top=not self.batch_first)
            out = tape[-1][2]
            h_n = np.stack([t[2][-1] for t in tape])
            out = out.transpose(1, 0, 2).copy() if self.batch_first else out
            if self.mode == "LSTM":
                H = self.hidden_size
                return out, (h_n, np.stack([t[3][-1, :, 4 * H:] for t in tape]))
            return out, h_n

    def _auto_path(self, kern, kern_name, tape, h0, c0, dH, backend, workers):
        """``(path, note)`` for ``method="auto"``: a scan where the cost model proposes one and a probe confirms it."""
        T, N = dH.shape[:2]
        S = self.state_factor * self.hidden_size
        path = auto_uses_scan(T, N, S, self.dtype, backend, workers) or "backprop"
        note = (f"method 'auto': the cost model predicts no scan of the {T} dense {S}x{S} state Jacobians "
                f"beats the loop on {getattr(backend, 'name', backend)!r} with workers={workers}: backprop "
                "through time ran")
        if path == "backprop":
            return path, note
        _, X, Hs, Z = tape[-1]
        _, W_hh, (_, b_hh) = self.layer_params(self.num_layers - 1)
        c = None if c0 is None else np.ascontiguousarray(c0[-1])
        loop, scan = probe_scan(kern, kern_name, path, (self.cell, X, W_hh, b_hh, np.ascontiguousarray(h0[-1]), c,
                                                        Hs, Z, np.ascontiguousarray(dH)),
                                backend=backend, workers=workers)
        said = (f"the cost model proposed {path!r}; timed here on the first steps it took "
                f"{scan * 1e6:.3g} us per step against backprop through time's {loop * 1e6:.3g} us")
        return (path, f"method 'auto' ran the scan: {said}") if scan < loop else (
            "backprop", f"method 'auto' ran backprop through time: {said}")

    # -- gradients ------------------------------------------------------------------------------------
    def __chainprod_value_and_grad__(self, x, y=None, *, loss=None, method="auto", backend="vectorized",
                                     workers=None, return_trace=False, engine_options=None, kernels=None, h0=None,
                                     with_inputs=False, forward="sequential", forward_options=None):
        """The loss over every step and its gradients; called by :func:`chainprod.value_and_grad`.

        ``loss``: ``"sum"`` (``output.sum()``, the default without ``y``)
        or ``"mse"`` (``mse_loss(output, y)``). ``method``: ``"backprop"``
        (the kernel set's backprop through time), a scan schedule name (the
        adjoints by :func:`chainprod.linear_recurrence` on ``backend``), or
        ``"auto"`` (a scan only where the cost model predicts it beats the
        loop; the trace's note says which ran). Returns ``(value, grads)``
        (and the trace with ``return_trace``): ``grads`` named like
        :attr:`params`, plus ``"input"``, ``"h0"`` (and ``"c0"``) shaped
        like what they differentiate when ``with_inputs``. ``forward``,
        ``forward_options``: the forward pass (:func:`chainprod.grad`). Torch,
        JAX or CuPy inputs: :func:`chainprod.recurrent_array.value_and_grad`.
        """
        done = try_value_and_grad(self, x, y, loss, method, backend, workers, return_trace, engine_options, kernels, h0,
                                  with_inputs, forward, forward_options)
        if done is not None:  # the common call of a training loop, on its short path (why: recurrent_quick)
            return done
        if is_foreign(x, y, h0):  # torch, JAX or CuPy arrays: computed in their library, on their device
            return recurrent_array.value_and_grad(
                self, x, y, loss=loss, method=method, backend=backend, workers=workers, return_trace=return_trace,
                engine_options=engine_options, kernels=kernels, h0=h0, with_inputs=with_inputs, forward=forward,
                forward_options=forward_options)
        loss = resolve_loss(loss, y)
        check_options(method, backend)
        workers = check_workers(workers)
        kern_name = resolve_kernels(kernels)
        kern = get_recurrent_kernels(kern_name)
        u = read_sequence(x, input_size=self.input_size, batch_first=self.batch_first, dtype=self.dtype)
        T, N = u.shape[:2]
        h0, h_shape, c0, c_shape = self.initial_states(h0, N)
        trace = make_trace(return_trace, backend, workers)
        with scope() as ws:  # the call's large temporaries, reused by the next call of the same sizes
            tape, ftrace = gradient_tape(self, u, forward=forward, forward_options=forward_options, h0=(h0, c0),
                                         kernels=kern_name, backend=backend, workers=workers)
            tape = run_layers(self, u, h0, c0, kern, ws) if tape is None else tape
            value, dH = loss_terms(tape[-1][2], y, loss, batch_first=self.batch_first, dtype=self.dtype, ws=ws)
            path, note = method, ""
            if method == "auto":
                path, note = self._auto_path(kern, kern_name, tape, h0, c0, dH, backend, workers)
            t0 = trace.clock() if trace is not None else 0.0
            grads, du, dh0, dc0 = backward_layers(
                self, tape, dH, h0, c0, kern, path, with_inputs=with_inputs, ws=ws, backend=backend,
                workers=workers, trace=trace, engine_options=engine_options, kernels=kern_name)
        if with_inputs:
            grads["input"] = du.transpose(1, 0, 2).copy() if self.batch_first else du
            grads["h0"] = np.stack(dh0).reshape(h_shape)
            if self.mode == "LSTM":
                grads["c0"] = np.stack(dc0).reshape(c_shape)
        if trace is None:
            return value, grads
        if path == "backprop":
            trace.schedule = None
            trace.add(TraceEvent(0, "main", t0, trace.clock(), T * self.num_layers, f"bptt ({kern_name})"))
            note = note or f"method 'backprop': backprop through time by the {kern_name!r} recurrent kernels"
        trace.note = note or trace.note
        return value, grads, add_forward_note(trace, ftrace)


class RNN(Recurrent):
    """An Elman RNN, ``torch.nn.RNN``: ``h_t = f(W_ih u_t + b_ih + W_hh h_{t-1} + b_hh)``.

    Parameters
    ----------
    input_size, hidden_size, num_layers
        As in torch.
    nonlinearity : {"tanh", "relu"}
    bias, batch_first
        As in torch.
    dtype : float32 or float64
    seed : int, optional
        For torch's uniform initialisation (``from_params`` and
        ``from_torch`` take given values).

    Examples
    --------
    >>> import numpy as np
    >>> import chainprod as cp
    >>> rnn = cp.RNN.from_params({"weight_ih_l0": np.eye(2), "weight_hh_l0": 0.5 * np.eye(2)})
    >>> out, h_n = rnn.forward(np.ones((3, 1, 2)), kernels="numpy")
    >>> out[:, 0, 0].round(3).tolist(), h_n.shape
    ([0.762, 0.881, 0.894], (1, 1, 2))
    """

    mode, gates, state_factor = "RNN", 1, 1

    def __init__(self, input_size, hidden_size, num_layers=1, *, nonlinearity="tanh", bias=True, batch_first=False,
                 dtype=np.float64, seed=None):
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first, dtype=dtype,
                         seed=seed, nonlinearity=nonlinearity)

    def _take_options(self, options):
        options = dict(options)
        nonlinearity = options.pop("nonlinearity", "tanh")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: unknown {nonlinearity!r}; use 'tanh' or 'relu'")
        super()._take_options(options)
        self.nonlinearity = nonlinearity

    @property
    def cell(self) -> str:
        return f"rnn_{self.nonlinearity}"


class GRU(Recurrent):
    """A gated recurrent unit, ``torch.nn.GRU``, gates ``(r, z, n)`` as torch orders them.

    Parameters as :class:`RNN` without ``nonlinearity``. ``docs/recurrences.md`` has the equations.
    """

    mode, gates, state_factor = "GRU", 3, 1


class LSTM(Recurrent):
    """A long short-term memory, ``torch.nn.LSTM`` (no projection), gates ``(i, f, g, o)``; state ``(h, c)``.

    Parameters as :class:`RNN` without ``nonlinearity``. ``forward`` and the
    gradients take the initial state as a pair ``(h0, c0)``, as torch does.
    """

    mode, gates, state_factor = "LSTM", 4, 2
