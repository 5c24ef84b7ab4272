"""Models people already have in torch: convert them, or fill their ``.grad`` by a scan.

A torch model that is an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations is exactly a chainprod :class:`~chainprod.Chain`.
:func:`from_torch` converts it (a copy of its parameters);
:func:`torch_backward` replaces ``loss.backward()`` in a training loop,
accumulating every parameter's ``.grad`` as autograd would::

    loss = cp.torch_backward(model, x, y, loss="mse")   # instead of loss.backward(); returns a float
    chain = cp.from_torch(model)                        # a Chain (a copy), for cp.grad & co.

:func:`torch_backward` converts a model once per structure and keeps it (weakly, per module object). Each
call checks the structure (submodules, their order and types, every parameter object, its memory, shape,
strides, dtype and ``requires_grad``, Softplus and Dropout settings), copies the parameters' *current*
values into one flat array (the kernels read one array, the parameters are separate tensors) and writes
the gradients: optimizer steps are seen, changes converted again (or refused).

Supported: ``nn.Linear`` (with or without bias), ``nn.Tanh``, ``nn.ReLU``, ``nn.Sigmoid``,
``nn.Softplus`` (``beta=1``, ``threshold=20``), ``nn.Identity``, ``nn.Dropout`` in eval mode or with
``p=0``, nested ``nn.Sequential``; float32 or float64 CPU parameters (:func:`torch_backward` runs a CUDA
model, or any with ``backend="array"``, in torch on its device: :mod:`chainprod.torch_array`); and
``nn.RNN``, ``nn.GRU``, ``nn.LSTM``, handed to :mod:`chainprod.torch_recurrent`. Anything else is refused,
naming the module's position (``module 1.2 (Conv1d)`` = ``model[1][2]``). An activation folds into the
``nn.Linear`` before it; one that starts the model or follows another becomes ``cp.Diagonal(ones, zeros, activation)``.

Softplus: torch's ``nn.Softplus()`` is ``z`` itself where ``z > 20``, chainprod's ``log(1 + exp(z))``:
they differ there by at most ``exp(-20)`` in value and derivative (float64 gradients then agree with
autograd to about ``1e-9``). Other ``beta``/``threshold`` values are refused.

Differences on purpose: chainprod refuses NaN or infinite inputs and raises
:class:`chainprod.errors.NonFiniteError` where autograd would write ``inf``/``NaN`` gradients; it
computes parameter gradients only (inputs that require a gradient are refused).
"""

from __future__ import annotations

import operator
import threading
import weakref
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

from . import forward_methods, torch_array, torch_recurrent
from ._caches import register_cache
from .errors import UnsupportedModuleError
from .grad import backward, loss_cotangent
from .kernels import LayerGrads
from .layers import Chain, Dense, Diagonal
from .tape import packed_with
from .torch_array import SUPPORTED_MODULES, layer_specs

__all__ = ["from_torch", "torch_backward", "UnsupportedModuleError", "SUPPORTED_MODULES"]

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class _Converted(NamedTuple):
    chain: Chain
    sources: list  # per chain layer: (weight, bias or None) of its nn.Linear, or None for a Diagonal
    params: list  # every parameter of the converted nn.Linear modules, once each
    containers: list  # (Sequential, its children) for every Sequential walked, the model first
    items: list  # the leaves in forward order


def _numpy(p):
    return p.detach().numpy()  # a view of the tensor's memory (Dense/Diagonal copy it)


def _convert(module) -> _Converted:
    """Validate the whole model and build its chain; nothing is written anywhere."""
    containers = []
    items, specs, dtype, _ = layer_specs(module, containers, device="cpu")
    np_dtype = _DTYPES[dtype]
    layers, sources = [], []
    for kind, src, act in specs:
        if kind == "dense":
            b = np.zeros(src.out_features, np_dtype) if src.bias is None else _numpy(src.bias)
            layers.append(Dense(_numpy(src.weight), b, act))
            sources.append((src.weight, src.bias))
        else:
            layers.append(Diagonal(np.ones(src, np_dtype), np.zeros(src, np_dtype), act))
            sources.append(None)
    # Every trainable parameter must belong to a converted nn.Linear (one registered on a
    # Sequential itself is not used by its forward; autograd leaves its .grad alone, so do we).
    params = list({id(p): p for src in sources if src is not None for p in src if p is not None}.values())
    return _Converted(Chain(layers), sources, params, containers, items)


def from_torch(module) -> Chain:
    """A :class:`~chainprod.Chain` computing the same function as a torch ``nn.Sequential``.

    Parameters
    ----------
    module : torch.nn.Sequential
        Of the supported modules (module docstring); float32 or float64 CPU
        parameters of one dtype, all with ``requires_grad=True``.

    Returns
    -------
    Chain
        A :class:`~chainprod.Dense` per ``nn.Linear`` (a missing bias is
        zeros), a :class:`~chainprod.Diagonal` per unfolded activation. The
        parameters are **copied**: a snapshot, unaffected by later steps.

    Raises
    ------
    UnsupportedModuleError
        A module or parameter chainprod cannot represent, named with its
        position (``module 1.2 (Conv1d)`` is ``model[1][2]``).
    """
    if isinstance(module, nn.RNNBase):
        return torch_recurrent.from_torch(module)
    return _convert(module).chain


# -- the kept conversion -----------------------------------------------------------
#: model -> its _Kept conversion; weak, so a model that is dropped is forgotten with it
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
register_cache(_KEPT.clear)
_SETTINGS = {nn.Softplus: ("beta", "threshold"), nn.Dropout: ("training", "p")}
_GD = operator.attrgetter("grad_dtype") if hasattr(torch.Tensor, "grad_dtype") else lambda p: None


def _param_state(params):
    """What must not change under a parameter for the numpy view of its memory to be its value."""
    return [(p.data_ptr(), p.shape, p.stride(), p.dtype, p.requires_grad, _GD(p)) for p in params]


def _grad_dtype(p):
    return _GD(p) or p.dtype


def _settings(modules):
    return [tuple(m.__dict__.get(a) for a in _SETTINGS[type(m)]) for m in modules]


def _linear_params(linears):
    return [p for m in linears for p in (m._parameters.get("weight"), m._parameters.get("bias"))]


class _Kept:
    """A converted model and what a call checks, reads and writes without converting it again."""

    def __init__(self, module, conv):
        # not the model itself: it is the cache's weak key, and holding it here would keep it alive
        self.conv, self.root_type, self.dtype = conv._replace(containers=None), type(module), conv.params[0].dtype
        self.inner = [c for c, _ in conv.containers[1:]]
        self.kids = [k for _, k in conv.containers]
        self.types = [tuple(map(type, k)) for k in self.kids]
        self.configured = [m for k in self.kids for m in k if type(m) in _SETTINGS]
        self.settings = _settings(self.configured)
        self.linears = [it.module for it in conv.items if it.kind == "linear"]
        self.params, self.state = _linear_params(self.linears), _param_state(conv.params)
        # theta piece by piece (views of the parameters' memory, zeros for a missing bias, ones and zeros
        # for a Diagonal), and stretches of equal Linears, whose gradients are written from one view each
        self.pieces, self.strided, self.stretches, off = [], [], [], 0
        for src, layer in zip(conv.sources, conv.chain):
            if src is not None:
                (d_out, d_in), last = layer.params[0].shape, self.stretches[-1] if self.stretches else None
                if last and last[3] == (d_out, d_in) and last[0] + len(last[1]) * (d_out * d_in + d_out) == off:
                    last[1].append(src[0])
                    last[2].append(src[1])
                else:
                    self.stretches.append((off, [src[0]], [src[1]], (d_out, d_in)))
            for i, arr in enumerate(layer.params):
                view = np.array(arr) if src is None or src[i] is None else _numpy(src[i])
                if not view.flags.c_contiguous:
                    self.strided.append((len(self.pieces), view))
                self.pieces.append(view.reshape(-1))  # a view, but for a strided parameter
                off += arr.size
        self.buffer, self.lock = np.empty(off, _DTYPES[self.dtype]), threading.Lock()
        self.pc = packed_with(conv.chain, self.buffer)  # reads the buffer: made once
        # .grad may be a view of the call's flat gradient where each parameter occurs once and
        # is laid out as autograd lays out a gradient (contiguous, in its own dtype)
        once = sum(len(w) + sum(b is not None for b in bs) for _, w, bs, _ in self.stretches) == len(conv.params)
        self.fast = once and not self.strided and all(_grad_dtype(p) == p.dtype for p in conv.params)

    def current(self, module) -> bool:
        """The model still has the structure and parameters this conversion was made from."""
        try:
            kids = [tuple(c._modules.values()) for c in [module] + self.inner]
            types = [tuple(map(type, k)) for k in kids]
            # modules compare by identity, parameters explicitly so (a tensor's == compares values)
            return (type(module) is self.root_type and kids == self.kids and types == self.types
                    and all(map(operator.is_, _linear_params(self.linears), self.params))
                    and _settings(self.configured) == self.settings and _param_state(self.conv.params) == self.state)
        except Exception:  # e.g. a parameter that became sparse: converting again says what is wrong
            return False

    def packed(self):
        """``(packed chain, release)`` with the current parameters, copied into a buffer kept across calls
        (a new multi-megabyte array per step pays its page faults again); a new one if it is in use."""
        pieces = list(self.pieces)
        for i, view in self.strided:
            pieces[i] = view.reshape(-1)  # a copy: a strided parameter is not one run of memory
        if not self.lock.acquire(blocking=False):
            return packed_with(self.conv.chain, np.concatenate(pieces)), lambda: None
        np.concatenate(pieces, out=self.buffer)
        return self.pc, self.lock.release


def _kept(module) -> _Kept:
    """The kept conversion of ``module``, converted (and checked) again if anything changed."""
    hit = _KEPT.get(module) if isinstance(module, nn.Module) else None  # _convert refuses a non-module
    if hit is None or not hit.current(module):
        hit = _KEPT[module] = _Kept(module, _convert(module))
    return hit


# -- torch_backward ---------------------------------------------------------------
def _as_array(a, what, dtype):
    """``a`` (tensor or array-like) as a numpy view in ``dtype``; refuses what autograd would treat differently."""
    if isinstance(a, torch.Tensor):
        bad = (f"is on {a.device}; chainprod.torch runs on CPU tensors only ({what}.cpu())" if a.device.type != "cpu"
               else f"requires a gradient: loss.backward() would fill {what}.grad, but torch_backward computes "
                    f"parameter gradients only; pass {what}.detach()" if a.requires_grad
               else f"has layout {a.layout}; pass a dense tensor ({what}.to_dense())" if a.layout != torch.strided
               else None)
        if bad:
            raise ValueError(f"{what} {bad}")
        if a.dtype not in _DTYPES:
            raise TypeError(f"{what} is {a.dtype}; the model's parameters are {dtype}")
        arr = a.detach().resolve_conj().resolve_neg().numpy()
    else:
        arr = np.asarray(a)
    if arr.dtype != _DTYPES[dtype]:
        raise TypeError(f"{what} is {arr.dtype} but the model's parameters are {dtype}; "
                        f"pass {what} as {dtype} (torch refuses mixed dtypes too)")
    return arr


def _write_grads(kept, grads):
    """Accumulate ``grads`` into every ``p.grad`` as autograd does: set if None, else add in place."""
    if kept.fast and isinstance(grads, LayerGrads):
        # views of this call's own flat gradient (no one else holds it), made per stretch of
        # equal Linears in C: 2 L tensors made one by one would cost more than the backward pass
        flat = torch.from_numpy(grads.flat)
        new = []
        for off, ws, bs, (d_out, d_in) in kept.stretches:
            k = d_out * d_in
            rows = flat[off:off + len(ws) * (k + d_out)].view(len(ws), k + d_out)
            new += zip(ws, rows[:, :k].view(len(ws), d_out, d_in).unbind(0))
            new += [(b, g) for b, g in zip(bs, rows[:, k:].unbind(0)) if b is not None]
    else:
        # Sum per parameter object (a module used twice contributes twice, as in autograd); skip
        # Diagonals of activations and the zero bias of nn.Linear(bias=False): chainprod's, not torch's
        acc = {}
        for src, g in zip(kept.conv.sources, grads):
            for p, gp in zip(src or (), g):
                if p is not None:
                    acc[id(p)] = acc[id(p)] + gp if id(p) in acc else np.array(gp, copy=True)
        new = [(p, torch.from_numpy(acc[id(p)])) for p in kept.conv.params]
    with torch.no_grad():
        for p, g in new:
            old = p.grad
            if old is None:  # fast: laid out as autograd's gradient is; else empty_like keeps p's layout
                p.grad = g if kept.fast else torch.empty_like(p, dtype=_grad_dtype(p)).copy_(g)
            elif old.layout == torch.strided and old.device.type == "cpu" and old.dtype == g.dtype \
                    and not old.requires_grad:
                # in numpy, the same sums: torch's add_ wakes torch's thread pool, which fought BLAS's
                # threads still spinning from the backward pass (width 1024, 2 threads: 30 ms against 0.8)
                np.add(old.numpy(), g.numpy(), out=old.numpy())
            elif old.layout == torch.strided:
                old.add_(g)
            else:
                p.grad = g.to(_grad_dtype(p)) + old  # a sparse gradient plus a dense one is dense (autograd too)


def torch_backward(module, x, y=None, loss="sum", method="auto", backend="vectorized", workers=None,
                   kernels=None, h0=None, **newton) -> float:
    """``loss.backward()`` for a torch ``nn.Sequential``, by chainprod's scan; returns the loss.

    Computes the loss of ``module(x)`` and its gradient with respect to every
    parameter as :func:`chainprod.value_and_grad` does, and accumulates them
    into ``p.grad`` as autograd does: set if None, else added in place (a
    parameter used twice gets the sum). The model is converted on the first
    call and kept (module docstring); float32 computes in float32 throughout.

    Parameters
    ----------
    module : torch.nn.Sequential
        See :func:`from_torch` for what it may contain.
    x : torch.Tensor or array, shape ``(..., d_in)``
        Input batch on the parameters' device, in their dtype; leading
        dimensions are batch dimensions (as for ``nn.Linear``).
    y : torch.Tensor or array, optional
        Targets of the model output's exact shape, for ``loss="mse"``.
    loss : {"sum", "mse"}
        ``module(x).sum()`` (one output), or
        ``torch.nn.functional.mse_loss(module(x), y)``.
    method, backend, workers, kernels, forward, forward_options (keywords)
        As in :func:`chainprod.grad` (``forward="deer"``: a Newton forward pass). Parameters
        off the CPU, or ``backend="array"``, compute in torch on their device
        (:func:`chainprod.torch_array.torch_backward`).
    h0 : optional
        The initial state of an nn.RNN, nn.GRU or nn.LSTM (:func:`chainprod.torch_recurrent.torch_backward`).

    Returns
    -------
    float

    Raises
    ------
    UnsupportedModuleError, TypeError, ValueError, NonFiniteError
        Before any ``.grad`` is touched.
    """
    if h0 is not None or isinstance(module, nn.RNNBase):  # recurrent modules, the only ones taking h0
        return torch_recurrent.torch_backward(module, x, y, loss, h0, method, backend, workers, kernels, **newton)
    # A current kept conversion holds CPU parameters only (a parameter moved to a device has new memory);
    # without one, every parameter's device is asked (0.2-0.8 ms a call on a 256-layer model, measured)
    kept = _KEPT.get(module) if isinstance(module, nn.Module) else None
    if kept is None or torch_array.wants_array(backend) or not kept.current(module):
        if torch_array.runs_on_device(module, backend):  # CUDA parameters, or backend="array": computed in torch
            return torch_array.torch_backward(module, x, y, loss, method, backend, workers, kernels, **newton)
        kept = _kept(module)
    chain, dtype = kept.conv.chain, kept.dtype
    if not isinstance(loss, str) or loss not in ("sum", "mse"):
        raise ValueError(f"unknown loss {loss!r}; valid losses: 'sum', 'mse'")
    if (loss == "sum") == (y is not None):
        raise ValueError("loss='sum' takes no targets y; use loss='mse' with targets" if y is not None
                         else "loss='mse' needs targets y")
    xa = _as_array(x, "x", dtype)
    if xa.ndim == 0 or xa.shape[-1] != chain.d_in:
        raise ValueError(f"x has shape {tuple(xa.shape)} but the model's first layer expects "
                         f"width {chain.d_in} in its last dimension")
    # nn.Linear maps over leading dimensions, and both losses sum or average over all
    # elements, so a (..., d) batch is the same problem as an (n, d) one.
    out_shape, x2, y2 = xa.shape[:-1] + (chain.d_out,), xa.reshape(-1, chain.d_in) if xa.ndim > 2 else xa, None
    if loss == "mse":
        ya = _as_array(y, "y", dtype)
        if tuple(ya.shape) != out_shape:
            # torch's mse_loss would broadcast (with a warning) and average a different quantity
            raise ValueError(f"y has shape {tuple(ya.shape)} but the model output has shape {out_shape}; "
                             "pass targets of exactly the output's shape")
        y2 = ya.reshape(x2.shape[:-1] + (chain.d_out,))

    # the structure converted once, the values of this call
    pc, release = kept.packed()
    try:
        tape = forward_methods.chain_tape(chain, x2, kernels, pc, backend, workers, **newton)[0]
        value, cotangent = loss_cotangent(tape, y2, loss)
        grads = backward(tape, cotangent, method=method, backend=backend, workers=workers, kernels=kernels)
    finally:
        release()  # nothing computed from the parameters is kept: the gradients are new arrays
    _write_grads(kept, grads)
    return value
