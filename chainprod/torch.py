"""Models people already have in torch: convert them, or fill their ``.grad`` by a scan.

A torch model that is an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations is exactly a chainprod :class:`~chainprod.Chain`.
Two entry points:

* :func:`from_torch` converts the model into a ``Chain`` (a copy of its
  parameters), for :func:`chainprod.grad`, schedules and benchmarks;
* :func:`torch_backward` replaces ``loss.backward()`` in a training loop: it
  computes the loss and the per-layer gradients with chainprod's scan and
  accumulates them into every parameter's ``.grad`` as autograd would.

Usage::

    import chainprod.torch as cpt
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    loss = cpt.torch_backward(model, x, y, loss="mse")   # instead of loss.backward(); returns a float
    chain = cpt.from_torch(model)                        # a chainprod Chain (a copy), for cp.grad & co.

Supported modules: ``nn.Linear`` (with or without bias), ``nn.Tanh``,
``nn.ReLU``, ``nn.Sigmoid``, ``nn.Softplus`` (``beta=1``, ``threshold=20``
only), ``nn.Identity``, ``nn.Dropout`` in eval mode or with ``p=0`` (an
identity), and nested ``nn.Sequential``. float32 or float64 parameters on the
CPU. Anything else is refused with an error naming the module and its
position, e.g. ``module 1.2 (Conv1d)`` = ``model[1][2]``.

How the model maps to layers: an activation folds into the ``nn.Linear``
before it (``cp.Dense(W, b, activation)``); an activation that starts the
model or follows another activation becomes ``cp.Diagonal(ones, zeros,
activation)`` (no trainable parameters on the torch side; its gradient is
discarded). ``nn.Identity`` and inactive ``nn.Dropout`` vanish.

Softplus: torch's ``nn.Softplus()`` returns ``z`` itself where ``z > 20``
(its ``threshold``) and has derivative exactly 1 there; chainprod's softplus
is ``log(1 + exp(z))`` everywhere. The two differ there by
``log(1 + exp(-z)) <= exp(-20) ~ 2.1e-9`` in value and in derivative, and
agree to rounding for ``z <= 20``. Pre-activations above 20 are rare in practice;
where they occur, float64 gradients agree with autograd to about ``1e-9``
relative instead of ``1e-12`` (float32 cannot see the difference). Other
``beta``/``threshold`` values are refused rather than approximated.

Where autograd and chainprod differ on purpose: chainprod refuses NaN or
infinite inputs and raises :class:`chainprod.errors.NonFiniteError` where
autograd would write ``inf``/``NaN`` gradients; it computes parameter
gradients only (``x.grad`` is never written, so inputs or targets that
require a gradient are refused).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "chainprod.torch needs torch, which is not installed; install the CPU build with "
        "`pip install torch==2.13.0` (a CPU build; an unpinned torch may pull a multi-GB GPU build)"
    ) from e

from .errors import UnsupportedModuleError
from .grad import value_and_grad
from .layers import Chain, Dense, Diagonal

__all__ = ["from_torch", "torch_backward", "UnsupportedModuleError", "SUPPORTED_MODULES"]

#: torch activation module -> chainprod activation name
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus"}

#: the module types :func:`from_torch` converts (exact types: a subclass may override ``forward``)
SUPPORTED_MODULES = (nn.Sequential, nn.Linear, *_ACTIVATIONS, nn.Identity, nn.Dropout)

_SUPPORTED_NAMES = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_MODULES)
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


# -- walking the model ----------------------------------------------------------
class _Item(NamedTuple):
    """One leaf module in forward order: ``kind`` is "linear" or "act"."""

    kind: str
    module: nn.Module
    where: str  # "module 1.2 (Tanh)", for messages
    path: str  # "1.2"
    activation: str | None = None


def _describe(path, names, module):
    where = f"module {'.'.join(path)} ({type(module).__name__})"
    # Custom child names (Sequential(OrderedDict(...))) are what the user typed; show them too.
    if names != path:
        where += f" named {'.'.join(names)!r}"
    return where


def _is_plain_sequential(module):
    # A subclass that overrides forward may compute anything; only the stock forward is a chain.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(seq, path=(), names=()):
    """Leaf modules of a (nested) Sequential in forward order, checked one by one."""
    # _modules, not named_children(): the latter skips a module that appears twice,
    # but Sequential.forward runs it twice.
    for i, (name, m) in enumerate(seq._modules.items()):
        p, n = path + (str(i),), names + (name,)
        where = _describe(p, n, m)
        if m is None:
            raise UnsupportedModuleError(f"module {'.'.join(p)} is None (model(x) itself would fail on it)",
                                         ".".join(p), m)
        if _is_plain_sequential(m):
            yield from _flatten(m, p, n)
        elif type(m) is nn.Linear:
            yield _Item("linear", m, where, ".".join(p))
        elif type(m) in _ACTIVATIONS:
            if type(m) is nn.Softplus and (m.beta != 1 or m.threshold != 20):
                raise UnsupportedModuleError(
                    f"{where} has beta={m.beta}, threshold={m.threshold}; only nn.Softplus() with the "
                    "defaults beta=1, threshold=20 is supported", ".".join(p), m)
            yield _Item("act", m, where, ".".join(p), _ACTIVATIONS[type(m)])
        elif type(m) is nn.Identity:
            continue
        elif type(m) is nn.Dropout:
            if m.training and m.p > 0:
                raise UnsupportedModuleError(
                    f"{where} is in training mode with p={m.p}: its random mask is not a fixed chain; "
                    "call model.eval() (dropout is then the identity) or set p=0", ".".join(p), m)
            continue
        else:
            raise UnsupportedModuleError(
                f"{where} is not supported; chainprod.torch converts {_SUPPORTED_NAMES} "
                "(dropout only in eval mode or with p=0)", ".".join(p), m)


class _Converted(NamedTuple):
    chain: Chain
    #: per chain layer: (weight, bias or None) of the nn.Linear it came from, or None for a Diagonal
    sources: list
    #: every parameter of the converted nn.Linear modules, once each
    params: list


def _check_param(p, pname, item, dtype):
    where = item.where
    if p.device.type != "cpu":
        raise UnsupportedModuleError(
            f"{where}: parameter {pname!r} is on {p.device}; chainprod.torch runs on CPU tensors only "
            "(model.cpu())", item.path, item.module)
    if p.dtype not in _DTYPES:
        raise UnsupportedModuleError(
            f"{where}: parameter {pname!r} is {p.dtype}; use torch.float32 or torch.float64", item.path, item.module)
    if dtype is not None and p.dtype != dtype:
        raise UnsupportedModuleError(
            f"{where}: parameter {pname!r} is {p.dtype} but earlier parameters are {dtype}; mixed dtypes are "
            "not supported (model.double() or model.float())", item.path, item.module)
    if not p.requires_grad:
        raise UnsupportedModuleError(
            f"{where}: parameter {pname!r} has requires_grad=False; frozen parameters are not supported "
            "(loss.backward() would skip it, chainprod cannot)", item.path, item.module)
    if p.layout != torch.strided:
        raise UnsupportedModuleError(f"{where}: parameter {pname!r} has layout {p.layout}; only dense "
                                     "parameters are supported", item.path, item.module)


def _numpy(p):
    # A view of the tensor's memory; Dense/Diagonal copy it into read-only arrays.
    return p.detach().numpy()


def _convert(module) -> _Converted:
    """Validate the whole model and build its chain; nothing is written anywhere."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch nn.Sequential, got {type(module).__name__}")
    if not _is_plain_sequential(module):
        what = "an nn.Sequential subclass with its own forward" if isinstance(module, nn.Sequential) else \
            f"a {type(module).__name__}"
        raise UnsupportedModuleError(
            f"the model is {what}; chainprod.torch converts an nn.Sequential (nested Sequentials allowed) "
            f"of {_SUPPORTED_NAMES}", "", module)
    items = list(_flatten(module))
    if not items:
        raise UnsupportedModuleError("the nn.Sequential is empty (or holds only identities): there is "
                                     "nothing to convert", "", module)
    linears = [it for it in items if it.kind == "linear"]
    if not linears:
        raise UnsupportedModuleError(
            "the nn.Sequential holds no nn.Linear: it has no parameters to differentiate and no width "
            "for its activations", "", module)

    # Parameters: devices, dtypes, requires_grad -- every one before any array is built.
    dtype = None
    for it in linears:
        for pname, p in (("weight", it.module.weight), ("bias", it.module.bias)):
            if p is not None:
                _check_param(p, pname, it, dtype)
                dtype = p.dtype
    np_dtype = _DTYPES[dtype]

    # Widths must chain from Linear to Linear (activations keep the width).
    width = linears[0].module.in_features
    for it in linears:
        lin = it.module
        if lin.in_features != width:
            raise UnsupportedModuleError(
                f"{it.where} expects in_features={lin.in_features} but the module before it outputs "
                f"width {width}", it.path, lin)
        width = lin.out_features

    # Fold each activation into the Linear before it; otherwise it is a Diagonal layer.
    specs = []  # [kind, linear module or width, activation]
    width = linears[0].module.in_features
    for it in items:
        if it.kind == "linear":
            specs.append(["dense", it.module, "identity"])
            width = it.module.out_features
        elif specs and specs[-1][0] == "dense" and specs[-1][2] == "identity":
            specs[-1][2] = it.activation
        else:
            specs.append(["diag", width, it.activation])

    layers, sources = [], []
    for kind, src, act in specs:
        if kind == "dense":
            W = _numpy(src.weight)
            b = np.zeros(src.out_features, np_dtype) if src.bias is None else _numpy(src.bias)
            layers.append(Dense(W, b, act))
            sources.append((src.weight, src.bias))
        else:
            layers.append(Diagonal(np.ones(src, np_dtype), np.zeros(src, np_dtype), act))
            sources.append(None)
    # Every trainable parameter must belong to a converted nn.Linear (one registered on a
    # Sequential itself is not used by its forward; autograd would leave its .grad alone,
    # and so do we).
    params = list({id(p): p for src in sources if src is not None for p in src if p is not None}.values())
    return _Converted(Chain(layers), sources, params)


def from_torch(module) -> Chain:
    """A :class:`~chainprod.Chain` computing the same function as a torch ``nn.Sequential``.

    Parameters
    ----------
    module : torch.nn.Sequential
        Of ``nn.Linear`` (with or without bias), ``nn.Tanh``, ``nn.ReLU``,
        ``nn.Sigmoid``, ``nn.Softplus()`` (default ``beta``/``threshold``),
        ``nn.Identity``, ``nn.Dropout`` (eval mode or ``p=0``) and nested
        ``nn.Sequential``; float32 or float64 CPU parameters of one dtype,
        all with ``requires_grad=True``.

    Returns
    -------
    Chain
        One :class:`~chainprod.Dense` per ``nn.Linear`` (a missing bias is
        zeros), carrying the activation that follows it, and one
        :class:`~chainprod.Diagonal` ``(ones, zeros, activation)`` per
        activation that starts the model or follows another activation.
        The parameters are **copied**: chainprod freezes its parameters as
        read-only numpy arrays, so the chain is a snapshot, unaffected by later
        optimizer steps on the torch model, and writing to it is impossible.

    Raises
    ------
    UnsupportedModuleError
        A module or parameter chainprod cannot represent, named with its
        position (``module 1.2 (Conv1d)`` is ``model[1][2]``).

    Notes
    -----
    torch's ``nn.Softplus`` is the identity above ``z = 20``; chainprod's is
    ``log(1 + exp(z))`` everywhere: they differ by at most ``exp(-20)`` there
    (see the module docstring).
    """
    return _convert(module).chain


# -- torch_backward ---------------------------------------------------------------
def _as_array(a, what, dtype):
    """``a`` (tensor or array-like) as a numpy view in ``dtype``; refuses what autograd would treat differently."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{what} is on {a.device}; chainprod.torch runs on CPU tensors only ({what}.cpu())")
        if a.requires_grad:
            raise ValueError(f"{what} requires a gradient: loss.backward() would fill {what}.grad, but "
                             f"torch_backward computes parameter gradients only; pass {what}.detach()")
        if a.layout != torch.strided:
            raise ValueError(f"{what} has layout {a.layout}; pass a dense tensor ({what}.to_dense())")
        if a.dtype not in _DTYPES:
            raise TypeError(f"{what} is {a.dtype}; the model's parameters are {dtype}")
        arr = a.detach().resolve_conj().resolve_neg().numpy()
    else:
        arr = np.asarray(a)
    want = np.dtype(_DTYPES[dtype])
    if arr.dtype != want:
        raise TypeError(f"{what} is {arr.dtype} but the model's parameters are {dtype}; "
                        f"pass {what} as {dtype} (torch refuses mixed dtypes too)")
    return arr


def _write_grads(new, params):
    """Accumulate ``new`` (id(p) -> array) into ``p.grad`` as autograd does: set if None, else add."""
    with torch.no_grad():
        for p in params:
            g = torch.from_numpy(new[id(p)])
            gdtype = getattr(p, "grad_dtype", None) or p.dtype
            if p.grad is None:
                # empty_like keeps the parameter's memory layout, as autograd's gradient does
                p.grad = torch.empty_like(p, dtype=gdtype).copy_(g)
            elif p.grad.layout == torch.strided:
                p.grad.add_(g)
            else:
                p.grad = g.to(gdtype) + p.grad  # a sparse gradient plus a dense one is dense (autograd too)


def torch_backward(module, x, y=None, loss="sum", method="auto", backend="vectorized", workers=None) -> float:
    """``loss.backward()`` for a torch ``nn.Sequential``, by chainprod's scan; returns the loss.

    Computes the loss of ``module(x)`` and its gradient with respect to every
    parameter with :func:`chainprod.value_and_grad`, then accumulates the
    gradients into ``p.grad`` exactly as autograd does: ``p.grad is None`` ->
    set, otherwise added in place, in the parameter's dtype and device. A
    parameter used twice (shared ``nn.Linear``) receives the sum. In a
    training loop, ``loss.backward()`` becomes::

        loss = cp.torch_backward(model, x, y, loss="mse")

    Parameters
    ----------
    module : torch.nn.Sequential
        See :func:`from_torch` for what it may contain.
    x : torch.Tensor or array, shape ``(..., d_in)``
        Input batch, CPU, in the parameters' dtype. Leading dimensions are
        batch dimensions (as for ``nn.Linear``).
    y : torch.Tensor or array, optional
        Targets of the model output's exact shape, for ``loss="mse"``.
    loss : {"sum", "mse"}
        ``"sum"``: ``module(x).sum()`` for a model with one output (the sum
        over the batch of the scalar outputs). ``"mse"``:
        ``torch.nn.functional.mse_loss(module(x), y)`` (mean over all elements).
    method, backend, workers
        As in :func:`chainprod.grad`: a scan schedule name, ``"backprop"`` or
        ``"auto"``; an executor name; a worker count.

    Returns
    -------
    float
        The loss value.

    Raises
    ------
    UnsupportedModuleError, TypeError, ValueError
        For an unsupported model or inputs; raised before any ``.grad`` is
        touched. chainprod's own errors (e.g.
        :class:`~chainprod.errors.NonFiniteError`) also leave ``.grad`` as it was.
    """
    conv = _convert(module)
    chain = conv.chain
    dtype = conv.params[0].dtype
    if not isinstance(loss, str) or loss not in ("sum", "mse"):
        raise ValueError(f"unknown loss {loss!r}; valid losses: 'sum', 'mse'")
    if loss == "sum" and y is not None:
        raise ValueError("loss='sum' takes no targets y; use loss='mse' with targets")
    if loss == "mse" and y is None:
        raise ValueError("loss='mse' needs targets y")

    xa = _as_array(x, "x", dtype)
    if xa.ndim == 0 or xa.shape[-1] != chain.d_in:
        raise ValueError(f"x has shape {tuple(xa.shape)} but the model's first layer expects "
                         f"width {chain.d_in} in its last dimension")
    out_shape = xa.shape[:-1] + (chain.d_out,)
    # nn.Linear maps over leading dimensions, and both losses sum or average over all
    # elements, so a (..., d) batch is the same problem as an (n, d) one.
    x2 = xa.reshape(-1, chain.d_in) if xa.ndim > 2 else xa
    y2 = None
    if loss == "mse":
        ya = _as_array(y, "y", dtype)
        if tuple(ya.shape) != out_shape:
            # torch's mse_loss would broadcast (with a warning) and average a different quantity
            raise ValueError(f"y has shape {tuple(ya.shape)} but the model output has shape {out_shape}; "
                             "pass targets of exactly the output's shape")
        y2 = ya.reshape(x2.shape[:-1] + (chain.d_out,))

    value, grads = value_and_grad(chain, x2, y2, loss=loss, method=method, backend=backend, workers=workers)

    # Sum per parameter object: a module used twice contributes twice, as in autograd.
    new = {}
    for src, g in zip(conv.sources, grads):
        if src is None:
            continue  # a Diagonal for a parameter-free activation
        for p, gp in zip(src, g):
            if p is None:
                continue  # nn.Linear(bias=False): the zero bias is chainprod's, not torch's
            new[id(p)] = new[id(p)] + gp if id(p) in new else np.array(gp, copy=True)
    _write_grads(new, conv.params)
    return float(value)
