"""``torch_backward`` on the parameters' device: torch in, ``.grad`` out, no numpy and no host copy.

:func:`chainprod.torch.torch_backward` hands a model here when its parameters
are not on the CPU (CUDA), or when ``backend="array"`` is asked for. The
model is walked as :mod:`chainprod.torch` walks it (the walker and the model
checks live here and serve both), its parameters are read as detached torch
tensors on their device (a run of equal ``nn.Linear`` layers is stacked there,
on the device), the gradients are computed by :mod:`chainprod.array_grad` in
torch, and each ``p.grad`` is written as ``loss.backward()`` writes it: set if
None (``p``'s layout, dtype and device), else added in place; a module used
twice gets the sum.

What differs from the CPU path: no kept conversion (nothing is copied to
convert), no compiled kernels (``kernels=None``), and the sequential forward
pass only (``forward="sequential"``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .array_grad import check_array_options, runs_value_and_grad
from .errors import UnsupportedModuleError
from .layers import Dense, Diagonal, Run

__all__ = ["ACTIVATION_MODULES", "SUPPORTED_MODULES", "SUPPORTED_NAMES", "LeafModule", "is_plain_sequential",
           "leaf_modules", "check_param", "layer_specs", "runs_on_device", "torch_backward"]

#: torch activation module -> chainprod activation name
ACTIVATION_MODULES = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Softplus: "softplus"}

#: the module types chainprod converts (exact types: a subclass may override ``forward``)
SUPPORTED_MODULES = (nn.Sequential, nn.Linear, *ACTIVATION_MODULES, nn.Identity, nn.Dropout)

SUPPORTED_NAMES = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_MODULES)
FLOAT_DTYPES = (torch.float32, torch.float64)


# -- walking the model ----------------------------------------------------------
class LeafModule(NamedTuple):
    """One leaf module in forward order: ``kind`` is "linear" or "act"."""
    kind: str
    module: nn.Module
    where: str  # "module 1.2 (Tanh)", for messages
    path: str  # "1.2"
    activation: str | None = None


def is_plain_sequential(module):
    # A subclass that overrides forward may compute anything; only the stock forward is a chain.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def leaf_modules(seq, path=(), names=(), containers=None):
    """Leaf modules of a (nested) Sequential in forward order, checked; Sequentials go to ``containers``."""
    # _modules, not named_children(): the latter skips a module that appears twice,
    # but Sequential.forward runs it twice.
    if containers is not None:
        containers.append((seq, tuple(seq._modules.values())))
    for i, (name, m) in enumerate(seq._modules.items()):
        p, n = path + (str(i),), names + (name,)
        at = ".".join(p)
        # custom child names (Sequential(OrderedDict(...))) are what the user typed: shown too
        where = f"module {at} ({type(m).__name__})" + (f" named {'.'.join(n)!r}" if n != p else "")
        if m is None:
            raise UnsupportedModuleError(f"module {at} is None (model(x) itself would fail on it)", at, m)
        if is_plain_sequential(m):
            yield from leaf_modules(m, p, n, containers)
        elif type(m) is nn.Linear:
            yield LeafModule("linear", m, where, at)
        elif type(m) in ACTIVATION_MODULES:
            if type(m) is nn.Softplus and (m.beta != 1 or m.threshold != 20):
                raise UnsupportedModuleError(f"{where} has beta={m.beta}, threshold={m.threshold}; only "
                                             "nn.Softplus() with the defaults beta=1, threshold=20 is supported", at, m)
            yield LeafModule("act", m, where, at, ACTIVATION_MODULES[type(m)])
        elif type(m) is nn.Dropout and m.training and m.p > 0:
            raise UnsupportedModuleError(
                f"{where} is in training mode with p={m.p}: its random mask is not a fixed chain; "
                "call model.eval() (dropout is then the identity) or set p=0", at, m)
        elif type(m) not in (nn.Identity, nn.Dropout):
            raise UnsupportedModuleError(
                f"{where} is not supported; chainprod.torch converts {SUPPORTED_NAMES} "
                "(dropout only in eval mode or with p=0)", at, m)


def check_param(p, pname, item, dtype, device=None):
    """Refuse a parameter chainprod cannot differentiate; ``device`` "cpu" (numpy views) or one device for all."""
    what = f"{item.where}: parameter {pname!r}"
    if p.device.type == "meta":
        bad = ("is on meta: a meta tensor holds no values to differentiate; put the model on the CPU or a GPU "
               "(model.to_empty(device=...), then load its weights)")
    elif device == "cpu" and p.device.type != "cpu":
        bad = (f"is on {p.device}; from_torch converts CPU parameters only (model.cpu()); torch_backward "
               "computes on the parameters' device")
    elif device is not None and p.device != torch.device(device):
        bad = f"is on {p.device} but earlier parameters are on {device}; put the model on one device (model.to(...))"
    elif p.dtype not in FLOAT_DTYPES:
        bad = f"is {p.dtype}; use torch.float32 or torch.float64"
    elif dtype is not None and p.dtype != dtype:
        bad = (f"is {p.dtype} but earlier parameters are {dtype}; mixed dtypes are not supported "
               "(model.double() or model.float())")
    elif not p.requires_grad:
        bad = ("has requires_grad=False; frozen parameters are not supported (loss.backward() would skip "
               "it, chainprod cannot)")
    elif p.layout != torch.strided:
        bad = f"has layout {p.layout}; only dense parameters are supported"
    else:
        return
    raise UnsupportedModuleError(f"{what} {bad}", item.path, item.module)


def layer_specs(module, containers=None, device=None):
    """``(items, specs, dtype, device)`` of a checked model; nothing is read or written.

    ``specs`` holds ``[kind, nn.Linear or width, activation]`` per chainprod layer: each activation
    folds into the ``nn.Linear`` before it, otherwise it is a ``Diagonal`` of that width. ``device``:
    "cpu" to refuse other devices, None for any one device (the first parameter's).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch nn.Sequential, got {type(module).__name__}")
    if not is_plain_sequential(module):
        what = "an nn.Sequential subclass with its own forward" if isinstance(module, nn.Sequential) else \
            f"a {type(module).__name__}"
        raise UnsupportedModuleError(
            f"the model is {what}; chainprod.torch converts an nn.Sequential (nested Sequentials allowed) "
            f"of {SUPPORTED_NAMES}", "", module)
    items = list(leaf_modules(module, containers=containers))
    linears = [it for it in items if it.kind == "linear"]
    if not linears:
        raise UnsupportedModuleError(
            "the nn.Sequential is empty (or holds only identities): there is nothing to convert" if not items else
            "the nn.Sequential holds no nn.Linear: it has no parameters to differentiate and no width "
            "for its activations", "", module)
    # Parameters (devices, dtypes, requires_grad), then widths: all checked before any array is built.
    dtype = None
    for it in linears:
        for pname, p in (("weight", it.module.weight), ("bias", it.module.bias)):
            if p is not None:
                check_param(p, pname, it, dtype, device)
                dtype, device = p.dtype, device or str(p.device)
    specs = []
    width = linears[0].module.in_features
    for it in items:
        if it.kind == "linear":
            if it.module.in_features != width:
                raise UnsupportedModuleError(f"{it.where} expects in_features={it.module.in_features} but the "
                                             f"module before it outputs width {width}", it.path, it.module)
            specs.append(["dense", it.module, "identity"])
            width = it.module.out_features
        elif specs and specs[-1][0] == "dense" and specs[-1][2] == "identity":
            specs[-1][2] = it.activation
        else:
            specs.append(["diag", width, it.activation])
    return items, specs, dtype, torch.device(device)


# -- torch_backward on the device ---------------------------------------------------
def wants_array(backend) -> bool:
    """Whether ``backend`` names the array backend (``"array"``, or an executor of that name)."""
    return (backend if isinstance(backend, str) else getattr(backend, "name", None)) == "array"


def runs_on_device(module, backend) -> bool:
    """Whether :func:`chainprod.torch.torch_backward` hands ``module`` here: ``backend="array"``, or
    parameters off the CPU."""
    return wants_array(backend) or (isinstance(module, nn.Module) and any(p.device.type != "cpu"
                                                                          for p in module.parameters()))


def _runs(specs, dtype, device):
    """Runs of equal consecutive layers, parameters stacked on the device (detached: no graph, no host)."""
    def params(kind, src, act):
        if kind == "dense":
            b = src.bias.detach() if src.bias is not None else torch.zeros(src.out_features, dtype=dtype,
                                                                           device=device)
            return Dense, act, (src.weight.detach(), b)
        return Diagonal, act, (torch.ones(src, dtype=dtype, device=device),
                               torch.zeros(src, dtype=dtype, device=device))

    layers = [params(*s) for s in specs]
    runs, start = [], 0
    while start < len(layers):
        cls, act, first = layers[start]
        stop = start + 1
        while stop < len(layers) and layers[stop][:2] == (cls, act) and \
                [p.shape for p in layers[stop][2]] == [p.shape for p in first]:
            stop += 1
        # one layer: a view; a run of several: stacked, a copy on the device
        P = tuple(first[j][None] if stop == start + 1 else torch.stack([layers[i][2][j] for i in range(start, stop)])
                  for j in range(len(first)))
        d_in, d_out = (first[0].shape[1], first[0].shape[0]) if cls is Dense else (first[0].shape[0],) * 2
        runs.append(Run(cls, act, start, stop - start, P, tuple(torch.flip(p, (0,)) for p in P), d_in, d_out))
        start = stop
    return runs


def _tensor(a, what, dtype, device):
    """``a`` as a tensor on ``device`` in ``dtype``; refuses what autograd would treat differently."""
    if not isinstance(a, torch.Tensor):
        if device.type != "cpu":
            raise TypeError(f"{what} is a {type(a).__name__} but the model's parameters are on {device}: pass a "
                            f"torch tensor on {device}")
        a = torch.as_tensor(np.asarray(a))
    bad = (f"is on {a.device} but the model's parameters are on {device}; pass {what}.to({str(device)!r})"
           if a.device != device else
           f"requires a gradient: loss.backward() would fill {what}.grad, but torch_backward computes parameter "
           f"gradients only; pass {what}.detach()" if a.requires_grad else
           f"has layout {a.layout}; pass a dense tensor ({what}.to_dense())" if a.layout != torch.strided else None)
    if bad:
        raise ValueError(f"{what} {bad}")
    if a.dtype != dtype:
        raise TypeError(f"{what} is {a.dtype} but the model's parameters are {dtype}; pass {what} as {dtype} "
                        "(torch refuses mixed dtypes too)")
    return a


def torch_backward(module, x, y=None, loss="sum", method="auto", backend="array", workers=None, kernels=None,
                   forward="sequential", forward_options=None) -> float:
    """:func:`chainprod.torch.torch_backward` computed in torch on the parameters' device; returns the loss.

    The arguments and the result are those of :func:`chainprod.torch.torch_backward`; ``backend`` is
    "array" (the default "vectorized" means it too), ``kernels`` None, ``forward`` "sequential".
    Every check runs, and every error is raised, before any ``.grad`` is touched.
    """
    _, specs, dtype, device = layer_specs(module)
    executor = check_array_options("torch", backend=backend, kernels=kernels, forward=forward,
                                   forward_options=forward_options, method=method)
    if not isinstance(loss, str) or loss not in ("sum", "mse"):
        raise ValueError(f"unknown loss {loss!r}; valid losses: 'sum', 'mse'")
    if (loss == "sum") == (y is not None):
        raise ValueError("loss='sum' takes no targets y; use loss='mse' with targets" if y is not None
                         else "loss='mse' needs targets y")
    d_in = specs[0][1].in_features if specs[0][0] == "dense" else specs[0][1]
    d_out = next(s[1].out_features for s in reversed(specs) if s[0] == "dense")
    xt = _tensor(x, "x", dtype, device)
    if xt.ndim == 0 or xt.shape[-1] != d_in:
        raise ValueError(f"x has shape {tuple(xt.shape)} but the model's first layer expects width {d_in} in its "
                         "last dimension")
    # nn.Linear maps over leading dimensions and both losses reduce over all elements: (..., d) is (n, d)
    out_shape, x2, y2 = tuple(xt.shape[:-1]) + (d_out,), xt.reshape(-1, d_in), None
    if loss == "mse":
        yt = _tensor(y, "y", dtype, device)
        if tuple(yt.shape) != out_shape:
            raise ValueError(f"y has shape {tuple(yt.shape)} but the model output has shape {out_shape}; pass "
                             "targets of exactly the output's shape")
        y2 = yt.reshape(x2.shape[0], d_out)
    with torch.no_grad():
        value, grads = runs_value_and_grad(_runs(specs, dtype, device), x2, y2, loss, method=method,
                                           executor=executor, workers=workers)
        # sum per parameter object (a module used twice contributes twice, as in autograd); skip the
        # Diagonals of activations and the zero bias of nn.Linear(bias=False): chainprod's, not torch's
        acc = {}
        for (kind, src, _), g in zip(specs, grads):
            for p, gp in zip((src.weight, src.bias) if kind == "dense" else (), g):
                if p is not None:
                    acc[id(p)] = (acc[id(p)][0], acc[id(p)][1] + gp) if id(p) in acc else (p, gp)
        for p, g in acc.values():
            grad_dtype = getattr(p, "grad_dtype", None) or p.dtype
            old = p.grad
            if old is None:  # empty_like keeps p's layout, as autograd's gradient does
                p.grad = torch.empty_like(p, dtype=grad_dtype).copy_(g)
            elif old.layout == torch.strided:
                old.add_(g)
            else:
                p.grad = g.to(grad_dtype) + old  # a sparse gradient plus a dense one is dense (autograd too)
    return float(value)
