"""torch's recurrent modules: convert ``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, or fill their ``.grad`` by chainprod.

:func:`from_torch` copies a module's parameters into a :class:`chainprod.RNN`,
:class:`chainprod.GRU` or :class:`chainprod.LSTM` (any ``num_layers``,
``bias``, ``batch_first``, ``nonlinearity``); ``bidirectional=True``,
``proj_size > 0`` and ``dropout > 0`` between layers in training mode are
refused with :class:`~chainprod.errors.UnsupportedModuleError` naming the
option. :func:`torch_backward` replaces ``loss.backward()`` for the loss on
the module's output sequence (the first value the module returns)::

    loss = cp.torch_backward(lstm, x, y, loss="mse")   # fills every p.grad; returns the loss as a float

``cp.from_torch`` and ``cp.torch_backward`` (:mod:`chainprod.torch`) send
these modules here. The converted model is kept per module (weakly) and its
parameter values are read again at every call, so a training step does not
convert again; a change of structure (options, parameter objects, shapes,
dtypes) converts again.

A module whose parameters are on an accelerator (CUDA, ...), or any module
with ``backend="array"``, runs in torch on its parameters' device
(:mod:`chainprod.recurrent_array`): the parameters are read as tensors, with
no copy to the host, and the gradients are tensors there too.

Gradients are accumulated as autograd accumulates them: ``p.grad`` is set
when it is None, else added to in place; a parameter with
``requires_grad=False`` is left alone. An input or initial state that
requires a gradient gets it too: its gradient is passed on to torch
(``torch.autograd.backward``), so it reaches a leaf's ``.grad`` or flows on
into the graph that produced it, as ``loss.backward()`` would.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from ._caches import register_cache
from .errors import UnsupportedModuleError
from .grad import value_and_grad
from .recurrent import GRU, LSTM, RNN
from .recurrent_array import RecurrentSpec, check_foreign_options, value_and_grad_spec

__all__ = ["from_torch", "torch_backward"]

_CLASSES = {nn.RNN: RNN, nn.GRU: GRU, nn.LSTM: LSTM}
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def from_torch(module):
    """A :class:`chainprod.RNN`, :class:`chainprod.GRU` or :class:`chainprod.LSTM`: a copy of the module's parameters.

    Raises
    ------
    chainprod.errors.UnsupportedModuleError
        Not exactly ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (a subclass may
        override ``forward``), or an unsupported option (named).
    """
    cls = _CLASSES.get(type(module))
    if cls is None:
        raise UnsupportedModuleError(f"{type(module).__name__} is not supported; chainprod converts nn.RNN, nn.GRU "
                                     "and nn.LSTM (exactly those classes)", "", module)
    return cls.from_torch(module)


# -- the kept conversion -----------------------------------------------------------
#: module -> (signature, model); weak, so a module that is dropped is forgotten with it
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
register_cache(_KEPT.clear)


def _signature(module):
    """What must not change for the kept model to stand for ``module`` (values may change)."""
    options = tuple(getattr(module, a, None) for a in ("mode", "input_size", "hidden_size", "num_layers", "bias",
                                                      "batch_first", "nonlinearity", "bidirectional", "proj_size",
                                                      "dropout", "training"))
    params = tuple((name, id(p), tuple(p.shape), p.dtype, p.device.type, p.layout)
                   for name, p in module.named_parameters())
    return type(module), options, params


def _kept(module):
    """The converted model of ``module`` with its parameters' current values."""
    sig = _signature(module)
    hit = _KEPT.get(module)
    if hit is None or hit[0] != sig:
        hit = _KEPT[module] = (sig, from_torch(module))
        return hit[1]
    model = hit[1]
    # the kept model's arrays belong to this cache alone: refresh them in place from the current values
    for name, p in module.named_parameters():
        arr = model.params[name]
        arr.flags.writeable = True
        try:
            np.copyto(arr, p.detach().numpy())
        finally:
            arr.flags.writeable = False
    return model


def _array(a, what, dtype):
    """``a`` (tensor or array-like) as a numpy array in the model's dtype."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu" or a.layout != torch.strided:
            raise ValueError(f"{what} is a {a.layout} tensor on {a.device}; pass a dense CPU tensor")
        if a.dtype not in _DTYPES:
            raise TypeError(f"{what} is {a.dtype} but the module's parameters are {dtype}")
        a = a.detach().resolve_conj().resolve_neg().numpy()
    arr = np.asarray(a)
    if arr.dtype != dtype:
        raise TypeError(f"{what} is {arr.dtype} but the module's parameters are {np.dtype(dtype)}; pass {what} in "
                        "the parameters' dtype (torch refuses mixed dtypes too)")
    return arr


def _needs_grad(a):
    return isinstance(a, torch.Tensor) and a.requires_grad


def torch_backward(module, x, y=None, loss="sum", h0=None, method="auto", backend="vectorized", workers=None,
                   kernels=None, forward="sequential", forward_options=None) -> float:
    """``loss.backward()`` for an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``; returns the loss as a float.

    Parameters
    ----------
    module : torch.nn.RNN, torch.nn.GRU or torch.nn.LSTM
        See :func:`from_torch`.
    x : torch.Tensor or array
        The input sequence as the module takes it (batched, 3-D).
    y : torch.Tensor or array, optional
        Targets of the output's exact shape, for ``loss="mse"``.
    loss : {"sum", "mse"}
        ``output.sum()`` or ``mse_loss(output, y)``, ``output`` the first
        value the module returns (the top layer's states at every step).
    h0 : torch.Tensor or array, or a pair for nn.LSTM, optional
        The initial state as the module takes it; zeros by default.
    method, backend, workers, kernels
        As in :func:`chainprod.grad` (``"backprop"``, a scan schedule, or
        ``"auto"``). A module on an accelerator, or ``backend="array"``,
        runs in torch on the module's device (``backend`` the default or
        ``"array"``, ``kernels`` None).
    forward, forward_options
        The forward pass (``"sequential"``, or a Newton method such as
        ``"deer"``), as in :func:`chainprod.grad`.

    Returns
    -------
    float

    Raises
    ------
    UnsupportedModuleError, TypeError, ValueError, NonFiniteError
        Before any ``.grad`` is touched.
    """
    if not isinstance(module, nn.RNNBase):
        raise ValueError(f"torch_backward here takes nn.RNN, nn.GRU or nn.LSTM, got a {type(module).__name__}; "
                         "only these take an initial state h0")
    if backend == "array" or getattr(backend, "name", None) == "array" or any(
            p.device.type != "cpu" for p in module.parameters()):
        return _backward_in_torch(module, x, y, loss, h0, method, backend, workers, kernels, forward,
                                  forward_options)
    model = _kept(module)
    dtype = model.dtype
    pair = isinstance(model, LSTM)
    if pair and h0 is not None and not (isinstance(h0, tuple) and len(h0) == 2):
        raise TypeError("h0: nn.LSTM takes its initial state as a pair (h0, c0)")
    states = () if h0 is None else tuple(h0) if pair else (h0,)
    h = None if h0 is None else tuple(_array(s, n, dtype) for s, n in zip(states, ("h0", "c0"))) if pair \
        else _array(h0, "h0", dtype)
    xa = _array(x, "x", dtype)
    ya = None if y is None else _array(y, "y", dtype)
    tracked = [(a, k) for a, k in zip((x, *states), ("input", "h0", "c0")) if _needs_grad(a)]
    value, grads = value_and_grad(model, xa, ya, loss=loss, h0=h, method=method, backend=backend, workers=workers,
                                  kernels=kernels, with_inputs=bool(tracked), forward=forward,
                                  forward_options=forward_options)
    _write_grads(module, {name: torch.from_numpy(grads[name]) for name, _ in module.named_parameters()})
    if tracked:
        torch.autograd.backward([a for a, _ in tracked], [torch.from_numpy(np.ascontiguousarray(grads[k]))
                                                          for _, k in tracked])
    return value


def _write_grads(module, grads):
    """Accumulate ``grads`` (tensors, named as the parameters) into every ``p.grad`` as autograd does."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue  # autograd leaves a frozen parameter's .grad alone
            g = grads[name]
            if p.grad is None:
                p.grad = g if p.is_contiguous() and g.is_contiguous() else torch.empty_like(p).copy_(g)
            else:
                p.grad.add_(g)


def _backward_in_torch(module, x, y, loss, h0, method, backend, workers, kernels, forward, forward_options):
    """:func:`torch_backward` in torch on the parameters' device, reading them as tensors (no host copy)."""
    cls = _CLASSES.get(type(module))
    if cls is None:
        raise UnsupportedModuleError(f"{type(module).__name__} is not supported; chainprod runs nn.RNN, nn.GRU and "
                                     "nn.LSTM (exactly those classes)", "", module)
    cls.check_torch(module)
    check_foreign_options("torch", method=method, backend=backend, kernels=kernels, forward=forward,
                          forward_options=forward_options)
    params = {name: p.detach() for name, p in module.named_parameters()}
    kinds = {(p.dtype, p.device) for p in params.values()}
    first = next(iter(params.values()))
    if len(kinds) > 1 or first.dtype not in _DTYPES:
        said = ", ".join(f"{n} is {p.dtype} on {p.device}" for n, p in params.items())
        raise UnsupportedModuleError(f"nn.{module.mode} needs float32 or float64 parameters of one dtype on one "
                                     f"device: {said}", "", module)
    cell = f"rnn_{module.nonlinearity}" if cls is RNN else module.mode.lower()
    spec = RecurrentSpec(cell, module.num_layers, module.input_size, module.hidden_size, bool(module.bias),
                         bool(module.batch_first), params)
    pair = cls is LSTM
    if pair and h0 is not None and not (isinstance(h0, tuple) and len(h0) == 2):
        raise TypeError("h0: nn.LSTM takes its initial state as a pair (h0, c0)")
    states = () if h0 is None else tuple(h0) if pair else (h0,)

    def tensor(a):  # what the module itself would take: a tensor (an array-like is placed beside the parameters)
        if a is None:
            return None
        return a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(a, device=first.device)

    hs = tuple(tensor(s) for s in states)
    tracked = [(a, k) for a, k in zip((x, *states), ("input", "h0", "c0")) if _needs_grad(a)]
    value, grads = value_and_grad_spec(spec, tensor(x), tensor(y), loss=loss, method=method, backend=backend,
                                       workers=workers, h0=(hs if pair else hs[0]) if hs else None,
                                       with_inputs=bool(tracked))
    _write_grads(module, grads)
    if tracked:
        torch.autograd.backward([a for a, _ in tracked], [grads[k] for _, k in tracked])
    return value
