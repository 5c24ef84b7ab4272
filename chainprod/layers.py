"""Layers and chains: the model ``x_l = f_l(x_{l-1}, theta_l)``.

A layer knows its forward map, the *kind* of its input Jacobian (dense or
diagonal, see :mod:`chainprod.blocks`) and its parameter VJP. A
:class:`Chain` groups consecutive layers of one type and shape into *runs*
with stacked parameters, so Jacobians and parameter gradients of a whole run
are single batched numpy calls; only the forward pass stays a loop.

Every derivative is computed from the layer's *output* ``y`` (``tanh' = 1 -
y^2``, ...), so a forward pass stores outputs only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._validate import as_float_array, check_learning_rate
from .activations import ACTIVATIONS, activation_name, apply_activation, derivative_from_output
from .errors import NonFiniteError

__all__ = ["ACTIVATIONS", "Dense", "Diagonal", "Chain", "mlp", "diagonal_chain", "Layer", "run_forward"]


class Layer:
    """Base class. Subclasses define the class-level run operations below.

    Run operations work on ``n`` stacked layers of the same type and shape:
    ``P`` is the tuple of stacked parameters (each with a leading ``n`` axis),
    ``S`` the derivative stack ``act'(z)`` of shape ``(n, N, d_out)``.
    """

    kind = "dense"  # kind of the input Jacobian block
    params: tuple
    activation: str

    @property
    def d_in(self) -> int:  # pragma: no cover
        raise NotImplementedError

    @property
    def d_out(self) -> int:  # pragma: no cover
        raise NotImplementedError

    @property
    def dtype(self):
        return self.params[0].dtype

    def run_key(self):
        """Layers with equal keys can be stacked into one run."""
        return (type(self), self.activation, tuple(p.shape for p in self.params), self.dtype)

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """``y = f(x)`` for ``x`` of shape ``(N, d_in)`` or ``(d_in,)``."""
        x = np.asarray(x)
        P = tuple(p[None] for p in self.params)
        y = np.empty(x.shape[:-1] + (self.d_out,), dtype=np.result_type(x, self.dtype))
        type(self).step(P, 0, x, y, self.activation)
        return y

    @staticmethod
    def derivs(Y, activation):
        """``act'(z)`` stacked, from the stacked outputs ``Y``."""
        if activation == "identity":
            # a read-only broadcast of 1, no memory (nothing writes into derivatives)
            return np.broadcast_to(np.ones((), Y.dtype), Y.shape)
        return derivative_from_output(activation, Y)


class Dense(Layer):
    """Fully connected layer ``y = act(x @ W.T + b)``.

    ``W`` has shape ``(d_out, d_in)`` (the ``torch.nn.Linear`` convention) and
    ``b`` shape ``(d_out,)``. Input Jacobian: ``diag(act'(z)) W`` (dense).
    """

    kind = "dense"

    def __init__(self, W, b, activation="tanh"):
        W = as_float_array(W, "Dense W", ndim=2)
        b = as_float_array(b, "Dense b", ndim=1)
        if b.shape[0] != W.shape[0]:
            raise ValueError(f"Dense: b has shape {b.shape} but W has {W.shape[0]} rows (d_out)")
        if W.dtype != b.dtype:
            raise TypeError(f"Dense: W is {W.dtype} but b is {b.dtype}; use one dtype")
        self.params = (_frozen(W), _frozen(b))
        self.activation = activation_name(activation)

    @property
    def d_in(self):
        return self.params[0].shape[1]

    @property
    def d_out(self):
        return self.params[0].shape[0]

    def __repr__(self):
        return f"Dense({self.d_in} -> {self.d_out}, {self.activation})"

    # -- run operations ------------------------------------------------
    @staticmethod
    def step(P, l, x, out, activation):
        W, b = P
        np.matmul(x, W[l].T, out=out)  # BLAS takes the transpose as a flag: no copy
        out += b[l]
        apply_activation(activation, out)
        return out

    @staticmethod
    def jacobians(P, S, out=None):
        """``(n, N, d_out, d_in)`` stack of ``diag(S_l) W_l``."""
        W = P[0]
        return np.multiply(S[..., :, None], W[:, None], out=out)

    @staticmethod
    def backprop(P, S, g, D):
        """Backprop through a run: ``D[l] = g_l * S[l]``, ``g_{l-1} = D[l] @ W_l``, last layer first.

        Two numpy calls per layer with preallocated outputs (the fastest
        plain-numpy loop we know); no Jacobian matrix is formed. Returns the
        gradient with respect to the run's input.
        """
        W = P[0]
        buf = np.empty((2,) + S.shape[1:-1] + (W.shape[-1],), dtype=S.dtype)
        for i in range(S.shape[0] - 1, -1, -1):
            np.multiply(g, S[i], out=D[i])
            g = np.matmul(D[i], W[i], out=buf[i & 1])
        return g

    @staticmethod
    def param_grads(P, delta, X):
        """Stacked ``(dW, db)`` from ``delta = g * act'`` ``(n, N, d_out)`` and inputs ``X`` ``(n, N, d_in)``."""
        N = delta.shape[1]
        if N <= 4:
            # A few outer products per layer: broadcasting beats n tiny matmul calls.
            dW = delta[:, 0, :, None] * X[:, 0, None, :]
            for i in range(1, N):
                dW += delta[:, i, :, None] * X[:, i, None, :]
        else:
            dW = np.matmul(delta.transpose(0, 2, 1), X)
        return dW, delta.sum(axis=1)


class Diagonal(Layer):
    """Elementwise layer ``y = act(a * x + b)``; its input Jacobian is diagonal.

    ``a`` and ``b`` have shape ``(d,)``. With ``activation=None`` this is the
    linear diagonal recurrence of state-space models.
    """

    kind = "diag"

    def __init__(self, a, b, activation=None):
        a = as_float_array(a, "Diagonal a", ndim=1)
        b = as_float_array(b, "Diagonal b", ndim=1)
        if a.shape != b.shape:
            raise ValueError(f"Diagonal: a has shape {a.shape} but b has {b.shape}")
        if a.dtype != b.dtype:
            raise TypeError(f"Diagonal: a is {a.dtype} but b is {b.dtype}; use one dtype")
        self.params = (_frozen(a), _frozen(b))
        self.activation = activation_name(activation)

    @property
    def d_in(self):
        return self.params[0].shape[0]

    d_out = d_in

    def __repr__(self):
        return f"Diagonal({self.d_in}, {self.activation})"

    @staticmethod
    def step(P, l, x, out, activation):
        a, b = P
        np.multiply(x, a[l], out=out)
        out += b[l]
        apply_activation(activation, out)
        return out

    @staticmethod
    def jacobians(P, S, out=None):
        """``(n, N, d)`` stack of the diagonals ``S_l * a_l``."""
        return np.multiply(S, P[0][:, None], out=out)

    @staticmethod
    def backprop(P, S, g, D):
        """Backprop through a run of diagonal layers: one numpy call per layer.

        The diagonal Jacobians ``S * a`` are formed in one batched call first
        (they are no bigger than ``S``), then ``g_{l-1} = g_l * J_l``.
        """
        J = Diagonal.jacobians(P, S)
        n = S.shape[0]
        D[n - 1] = g
        for i in range(n - 1, 0, -1):
            np.multiply(D[i], J[i], out=D[i - 1])
        g = D[0] * J[0]
        np.multiply(D, S, out=D)  # delta_l = v_l * act'
        return g

    @staticmethod
    def param_grads(P, delta, X):
        return (delta * X).sum(axis=1), delta.sum(axis=1)


def _frozen(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


class Run(NamedTuple):
    """``count`` consecutive layers ``start .. start+count-1`` of one type and shape.

    Parameters are stacked once, last layer first (``reversed``, contiguous):
    that is scan order, so the Jacobians of a run come out contiguous in the
    order the executors read them. ``params`` are layer-order views of the
    same memory.
    """

    cls: type
    activation: str
    start: int
    count: int
    params: tuple  # stacked, leading axis = count, layer order (views of ``reversed``)
    reversed: tuple  # the same, last layer first, contiguous
    d_in: int
    d_out: int


class Chain:
    """A sequential model ``x_L = f_L(... f_1(x))``; validated at construction.

    Parameters
    ----------
    layers : sequence of Layer
        Widths must chain: ``layers[l].d_in == layers[l-1].d_out``. All
        parameters must share one dtype (float32 or float64).
    """

    def __init__(self, layers):
        if isinstance(layers, Layer) or not hasattr(layers, "__iter__"):
            raise TypeError(f"Chain needs a sequence of layers (Dense, Diagonal), got {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError("Chain needs at least one layer, got an empty list")
        for l, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {l} is {type(layer).__name__}, expected a chainprod Layer (Dense, Diagonal)")
        for l in range(1, len(layers)):
            if layers[l].d_in != layers[l - 1].d_out:
                raise ValueError(
                    f"widths do not chain at layer {l}: layer {l - 1} outputs width "
                    f"{layers[l - 1].d_out} but layer {l} expects input width {layers[l].d_in}"
                )
        dtypes = {layer.dtype for layer in layers}
        if len(dtypes) > 1:
            first = next(l for l, layer in enumerate(layers) if layer.dtype != layers[0].dtype)
            raise TypeError(
                f"mixed dtypes: layer 0 is {layers[0].dtype} but layer {first} is {layers[first].dtype}; "
                "use one dtype for all parameters"
            )
        self.layers = tuple(layers)
        self.dtype = layers[0].dtype
        self.runs = tuple(self._make_runs())
        #: True once :meth:`sgd_step` made a successor: a plan still holding this chain says so when used
        self.superseded = False

    def _make_runs(self):
        start = 0
        layers = self.layers
        while start < len(layers):
            stop = start + 1
            key = layers[start].run_key()
            while stop < len(layers) and layers[stop].run_key() == key:
                stop += 1
            group = layers[start:stop]
            cls = type(group[0])
            rev = tuple(np.stack([ly.params[i] for ly in reversed(group)]) for i in range(len(group[0].params)))
            for p in rev:
                p.setflags(write=False)
            yield Run(cls, group[0].activation, start, stop - start, tuple(p[::-1] for p in rev), rev,
                      group[0].d_in, group[-1].d_out)
            start = stop

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        parts = [f"{r.count}x {r.cls.__name__}({r.d_in}->{r.d_out}, {r.activation})" for r in self.runs]
        return f"Chain(L={len(self)}: " + ", ".join(parts) + ")"

    @property
    def d_in(self):
        return self.layers[0].d_in

    @property
    def d_out(self):
        return self.layers[-1].d_out

    @property
    def widths(self) -> list[int]:
        """``[d_0, d_1, ..., d_L]``."""
        return [self.layers[0].d_in] + [ly.d_out for ly in self.layers]

    @property
    def params(self) -> list[tuple]:
        return [ly.params for ly in self.layers]

    def check_input(self, x, what="x"):
        """Validate ``x``; returns ``(x2d, was_1d)`` without copying a good array."""
        x = as_float_array(x, what, ndim=(1, 2))
        if x.shape[-1] != self.d_in:
            raise ValueError(f"{what} has width {x.shape[-1]} (shape {x.shape}) but layer 0 expects {self.d_in}")
        if x.dtype != self.dtype:
            raise TypeError(f"{what} is {x.dtype} but the chain's parameters are {self.dtype}; "
                            f"pass x.astype(np.{self.dtype})")
        return (x[None] if x.ndim == 1 else x), x.ndim == 1

    def forward(self, x):
        """The model output for ``x`` of shape ``(N, d_0)`` or ``(d_0,)``."""
        x2, one = self.check_input(x)
        for run in self.runs:
            Y = np.empty((run.count, x2.shape[0], run.d_out), dtype=self.dtype)
            run_forward(run, x2, Y)
            x2 = Y[-1]
        return x2[0] if one else x2

    __call__ = forward

    def with_params(self, params) -> Chain:
        """A new chain of the same architecture with ``params`` (one tuple per layer)."""
        params = list(params)
        if len(params) != len(self):
            raise ValueError(f"expected {len(self)} parameter tuples, got {len(params)}")
        return Chain(type(ly)(*p, activation=ly.activation) for ly, p in zip(self.layers, params))

    def sgd_step(self, grads, lr: float) -> Chain:
        """``theta - lr * grad`` for every parameter: one step of plain gradient descent.

        Returns a new chain (this one is unchanged, and marked
        :attr:`superseded`); ``lr`` is any finite real number.
        """
        lr = check_learning_rate(lr)
        grads = list(grads)
        if len(grads) != len(self):
            raise ValueError(f"expected {len(self)} gradient tuples (one per layer), got {len(grads)}")
        for l, (ps, gs) in enumerate(zip(self.params, grads)):
            shapes = tuple(np.shape(g) for g in gs)
            if shapes != tuple(p.shape for p in ps):
                raise ValueError(f"gradient of layer {l} has shapes {shapes}, the parameters have "
                                 f"{tuple(p.shape for p in ps)}")
        new = []
        with np.errstate(over="ignore", invalid="ignore"):  # reported below with the layer
            for l, (ps, gs) in enumerate(zip(self.params, grads)):
                step = tuple(p - lr * np.asarray(g) for p, g in zip(ps, gs))
                if not all(np.isfinite(q).all() for q in step):
                    raise NonFiniteError(f"sgd_step: the new parameters of layer {l} are NaN or infinite "
                                         f"(theta - lr * grad with lr={lr!r} overflowed, or the gradient is "
                                         "not finite)", (l, l))
                new.append(step)
        successor = self.with_params(new)
        self.superseded = True
        return successor


def run_forward(run, x, Y):
    """Forward through one run of stacked layers (a :class:`Run` of :attr:`Chain.runs`).

    Parameters
    ----------
    run : Run
    x : ndarray, shape ``(N, run.d_in)``
        The run's input. Not modified.
    Y : ndarray, shape ``(run.count, N, run.d_out)``
        Receives the outputs: ``Y[i]`` is layer ``run.start + i``'s.

    Returns
    -------
    Y : ndarray
    """
    step, P, act = run.cls.step, run.params, run.activation
    for i in range(run.count):
        step(P, i, x, Y[i], act)
        x = Y[i]
    return Y


def _check_widths(widths) -> list[int]:
    """``widths`` as a list of ints; a float, a bool or a non-sequence is refused, never truncated."""
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise TypeError(f"mlp widths must be a sequence of ints [d_0, d_1, ..., d_L], got {widths!r}")
    out = []
    for i, w in enumerate(widths):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"mlp widths must be ints, got {w!r} ({type(w).__name__}) at position {i} "
                            f"of {list(widths)}")
        out.append(int(w))
    return out


def mlp(widths, activation="tanh", seed=0, dtype=np.float64, bias_scale=0.1) -> Chain:
    """A random :class:`Chain` of :class:`Dense` layers; the last is ``"identity"``.

    ``widths = [d_0, d_1, ..., d_L]``; ``widths[-1] == 1`` gives a scalar
    model. Weights are ``N(0, 1/d_in)`` (LeCun), biases ``N(0, bias_scale^2)``.
    """
    activation = activation_name(activation)
    widths = _check_widths(widths)
    if len(widths) < 2:
        raise ValueError(f"mlp needs at least two widths (input and output), got {widths}")
    if min(widths) < 1:
        raise ValueError(f"mlp widths must be >= 1, got {widths}")
    rng = np.random.default_rng(seed)
    layers = []
    n = len(widths) - 1
    for l in range(n):
        W = rng.standard_normal((widths[l + 1], widths[l])) / np.sqrt(widths[l])
        b = bias_scale * rng.standard_normal(widths[l + 1])
        layers.append(Dense(W.astype(dtype), b.astype(dtype), "identity" if l == n - 1 else activation))
    return Chain(layers)


def diagonal_chain(L, width, activation=None, seed=0, dtype=np.float64, readout=True) -> Chain:
    """A random chain of ``L`` :class:`Diagonal` layers, plus a ``Dense(width -> 1)`` readout.

    Diagonal gains are drawn near 1 (``U(0.9, 1.0)``), as in a stable linear
    recurrence, so long chains neither explode nor vanish at once.
    """
    rng = np.random.default_rng(seed)
    layers = [Diagonal(rng.uniform(0.9, 1.0, width).astype(dtype),
                       (0.1 * rng.standard_normal(width)).astype(dtype), activation) for _ in range(L)]
    if readout:
        layers.append(Dense((rng.standard_normal((1, width)) / np.sqrt(width)).astype(dtype),
                            np.zeros(1, dtype=dtype), "identity"))
    return Chain(layers)
