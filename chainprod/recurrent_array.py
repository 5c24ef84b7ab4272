"""Recurrent models (RNN, GRU, LSTM) on torch, JAX or CuPy arrays, computed in the arrays' own library.

``cp.grad``, ``cp.value_and_grad`` and ``model.forward`` of
:class:`chainprod.RNN`, :class:`chainprod.GRU` and :class:`chainprod.LSTM`
send a foreign input sequence here (:func:`chainprod.arrays.is_foreign`);
:func:`chainprod.torch_backward` sends an ``nn.RNN``, ``nn.GRU`` or
``nn.LSTM`` whose parameters are on an accelerator (or ``backend="array"``).
Everything runs in ``x``'s library, on its device, in its dtype, written
once against the array API standard (:mod:`chainprod.recurrent_array_cells`):

1. the model's parameters are converted to ``x``'s library, device and dtype
   once and kept per model (weakly), library, device and dtype;
2. the forward pass, layer after layer: every step's input projection in one
   product, then the cells step by step, as the numpy path does;
3. the losses ``"sum"`` and ``"mse"`` with the numpy path's checks;
4. the adjoints going down the layers: ``"backprop"`` is backprop through
   time in ``xp``; a scan schedule runs the reverse recurrence
   ``lambda_t = J_{t+1}^T lambda_{t+1} + g_t`` over the dense state Jacobians
   with :func:`chainprod.linear_recurrence`, which takes foreign arrays to the
   ``"array"`` executor; ``"auto"`` is :func:`auto_path`.

Gradients come back as a dict named like the parameters (and ``"input"``,
``"h0"``, ``"c0"`` with ``with_inputs``), arrays of ``x``'s library, device
and dtype; the value is a Python float (one host synchronisation). The other
host synchronisations are the finiteness checks of the inputs and of each
layer's states. JAX arrays are immutable and every step is a separate
dispatch from Python: correct, but slow for long sequences (``jax.lax.scan``
under ``jit`` is the fast way there).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import numpy as np

from . import recurrent_array_cells as cells
from ._caches import register_cache
from ._validate import check_workers
from .arrays import common_library, device_of, dtype_name, namespace, on_accelerator, to_device_like, to_numpy
from .cost.auto import ACCELERATOR
from .errors import NonFiniteError
from .executors import Executor, TraceEvent, valid_backends
from .grad import make_trace
from .recurrence import linear_recurrence
from .recurrent_io import check_options, resolve_loss

__all__ = ["ACCELERATOR_COSTS", "RecurrentSpec", "auto_path", "check_foreign_options", "check_finite", "detached",
           "forward",
           "params_like", "read_array", "spec_of", "value_and_grad", "value_and_grad_spec"]

_NOUNS = {"torch": "torch tensors", "jax": "JAX arrays", "cupy": "CuPy arrays"}


# -- options -------------------------------------------------------------------------------------
def check_foreign_options(library, *, method="auto", backend="vectorized", kernels=None, forward="sequential",
                          forward_options=None):
    """Refuse what the array path cannot honour for ``library`` arrays, before any work.

    ``backend``: ``"array"`` or the default ``"vectorized"`` (an explicit one
    cannot be told from the default, and means "the default" here); another
    backend runs on numpy arrays only: ``TypeError``. ``kernels``: ``None``
    (the compiled and numpy kernel sets compute on numpy arrays).
    ``forward``: ``"sequential"`` (the Newton passes run on numpy arrays).
    """
    noun = _NOUNS.get(library, f"{library} arrays")
    name = backend.name if isinstance(backend, Executor) else backend
    if isinstance(name, str) and name in valid_backends() and name not in ("array", "vectorized"):
        raise TypeError(f"backend {name!r} runs on numpy arrays; {noun} run on backend='array' (the default for "
                        "them)")
    check_options(method, "array" if name == "vectorized" else backend)
    if kernels is not None:
        raise ValueError(f"kernels={kernels!r} computes on numpy arrays; {noun} compute in their own library: pass "
                         "kernels=None, or convert the inputs to numpy for the kernel sets")
    if not (isinstance(forward, str) and forward == "sequential") or forward_options:
        raise ValueError(f"forward={forward!r} (forward_options={forward_options!r}): the Newton forward passes run "
                         f"on numpy arrays only; {noun} take forward='sequential' (the default)")


# -- inputs --------------------------------------------------------------------------------------
def detached(a):
    """A torch tensor without its autograd history (the array path takes values); anything else as it is."""
    if isinstance(a, tuple):
        return tuple(detached(v) for v in a)
    return a.detach() if type(a).__module__.startswith("torch") and hasattr(a, "detach") else a


def check_finite(xp, arr):
    """``None`` when ``arr`` is finite (one host synchronisation), else the first bad index as a tuple."""
    if bool(xp.all(xp.isfinite(arr))):
        return None
    return tuple(int(i) for i in np.argwhere(~np.isfinite(to_numpy(arr)))[0])


def read_array(xp, a, what, *, shapes, dtype, device, layout=""):
    """``a`` checked: a shape of ``shapes``, ``dtype`` (a name), on ``device``, finite."""
    shape = tuple(a.shape)
    if shape not in shapes:
        raise ValueError(f"{what}: expected shape {' or '.join(map(str, shapes))}{layout}, got {shape}")
    if dtype_name(a.dtype) != dtype:
        raise TypeError(f"{what} is {dtype_name(a.dtype)} but the model is {dtype}: pass {what} in the model's dtype")
    if str(device_of(a)) != str(device):
        raise ValueError(f"{what} is on {device_of(a)} but the input is on {device}: pass every array on one device")
    bad = check_finite(xp, a)
    if bad is not None:
        raise ValueError(f"{what}: contains NaN or infinity at index {bad} (shape {shape}{layout})")
    return a


def _read_sequence(xp, x, spec, dtype):
    """``x`` time-first ``(T, N, d_in)`` (a view), checked as :func:`chainprod.recurrent_io.read_sequence` does."""
    layout = "(N, T, d_in)" if spec.batch_first else "(T, N, d_in)"
    shape = tuple(x.shape)
    if len(shape) != 3 or 0 in shape or shape[2] != spec.input_size:
        raise ValueError(f"input: expected shape {layout} with d_in = input_size = {spec.input_size} and T, N >= 1, "
                         f"got {shape} (one sequence without a batch axis: add a batch axis of size 1)")
    if dtype_name(x.dtype) != dtype:
        raise TypeError(f"input is {dtype_name(x.dtype)} but the model is {dtype}: pass input in the model's dtype")
    u = xp.permute_dims(x, (1, 0, 2)) if spec.batch_first else x  # time first from here on
    bad = check_finite(xp, u)
    if bad is not None:
        raise ValueError(f"input: contains NaN or infinity at step t={bad[0]} (sample n={bad[1]}, feature {bad[2]})")
    return u


# -- the model as arrays of one library ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RecurrentSpec:
    """A recurrent model's structure and its parameters as arrays of one library, device and dtype.

    ``params`` are named as torch names them (``weight_ih_l0``, ...); ``cell``
    is ``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"`` or ``"lstm"``.
    """

    cell: str
    num_layers: int
    input_size: int
    hidden_size: int
    bias: bool
    batch_first: bool
    params: dict

    @property
    def lstm(self) -> bool:
        return self.cell == "lstm"

    def layer(self, xp, k):
        """``(W_ih, W_hh, b_ih or None, b_hh)`` of layer ``k``; ``b_hh`` zeros for a model without biases."""
        p = self.params
        W_ih, W_hh = p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"]
        b_hh = p[f"bias_hh_l{k}"] if self.bias else xp.zeros((W_hh.shape[0],), dtype=W_hh.dtype,
                                                             device=device_of(W_hh))
        return W_ih, W_hh, p.get(f"bias_ih_l{k}"), b_hh


#: model -> {(library, device, dtype): parameters there}; weak, so a dropped model is forgotten with it
_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
register_cache(_CONVERTED.clear)


def params_like(model, like) -> dict:
    """``model.params`` as arrays of ``like``'s library, device and dtype: converted once, then kept.

    A model's parameters are read-only copies (a model is a value), so what
    was converted stays right; at most four placements are kept per model.
    """
    key = (type(like).__module__, str(device_of(like)), dtype_name(like.dtype))
    kept = _CONVERTED.setdefault(model, {})
    got = kept.get(key)
    if got is None:
        if len(kept) >= 4:
            kept.clear()
        # a writable copy: torch would share (and warn about) the read-only memory of the model itself
        got = kept[key] = {name: to_device_like(np.array(p), like) for name, p in model.params.items()}
    return got


def spec_of(model, like) -> RecurrentSpec:
    """The :class:`RecurrentSpec` of a :class:`chainprod.recurrent.Recurrent` model, parameters like ``like``.

    Raises ``TypeError`` when ``like``'s dtype is not the model's (for JAX,
    float64 needs ``jax.config.update("jax_enable_x64", True)``).
    """
    want, got = dtype_name(model.dtype), dtype_name(like.dtype)
    if got != want:
        hint = " (JAX computes in float32 unless jax_enable_x64 is set)" if type(like).__module__.startswith(
            ("jax", "jaxlib")) else ""
        raise TypeError(f"input is {got} but the model is {want}: pass input in the model's dtype{hint}")
    return RecurrentSpec(model.cell, model.num_layers, model.input_size, model.hidden_size, model.bias,
                         model.batch_first, params_like(model, like))


def _initial_states(xp, spec, h0, N, like):
    """``(h0, h0's shape, c0, c0's shape)``, each ``(num_layers, N, H)`` (zeros when not given)."""
    L, H = spec.num_layers, spec.hidden_size
    full = (L, N, H)
    if spec.lstm:
        if h0 is None:
            h0 = (None, None)
        if not (isinstance(h0, tuple) and len(h0) == 2):
            raise TypeError("h0: an LSTM takes its initial state as a pair (h0, c0), as torch does, or None")
    elif isinstance(h0, tuple):
        raise TypeError("h0: this model takes one initial state array, got a tuple (only an LSTM takes (h0, c0))")
    out = []
    for name, s in zip(("h0", "c0"), h0 if spec.lstm else (h0,)):
        if s is None:
            out += [xp.zeros(full, dtype=like.dtype, device=device_of(like)), full]
            continue
        shapes = (full, (N, H)) if L == 1 else (full,)
        s = read_array(xp, s, name, shapes=shapes, dtype=dtype_name(like.dtype), device=device_of(like),
                       layout=" (num_layers, N, H), N from the input")
        out += [xp.reshape(s, full), tuple(s.shape)]
    return tuple(out) if spec.lstm else (*out, None, None)


# -- forward ---------------------------------------------------------------------------------------
def _run(xp, spec, u, h0, c0):
    """The forward pass, layer after layer: per layer ``(u, X, Hs, Z)``, as the numpy path keeps it."""
    tape = []
    for k in range(spec.num_layers):
        W_ih, W_hh, b_ih, b_hh = spec.layer(xp, k)
        X = u @ W_ih.T  # every step's input projection in one product: only W_hh waits for h_{t-1}
        if b_ih is not None:
            X = X + b_ih
        Hs, Z = cells.forward(xp, spec.cell, X, W_hh, b_hh, h0[k, ...], None if c0 is None else c0[k, ...])
        bad = check_finite(xp, Hs)
        if bad is not None:
            err = NonFiniteError(f"state h_t of layer {k} at step t={bad[0]} is not finite (sample n={bad[1]}, unit "
                                 f"{bad[2]}): the forward pass overflowed (inputs and parameters are finite); a relu "
                                 "RNN grows without bound when its recurrent weights are large", (k, k))
            err.step = bad[0]
            raise err
        tape.append((u, X, Hs, Z))
        u = Hs
    return tape


def forward(model, x, h0=None, *, kernels=None):
    """``model.forward(x, h0)`` for a foreign ``x``: ``(output, h_n)`` (``(output, (h_n, c_n))`` for an LSTM).

    Arrays of ``x``'s library, device and dtype; the checks of the numpy path.
    """
    library = common_library({"x": x, "h0": h0})
    check_foreign_options(library, kernels=kernels)
    xp = namespace(x)
    spec = spec_of(model, x)
    u = _read_sequence(xp, x, spec, dtype_name(x.dtype))
    h, _, c, _ = _initial_states(xp, spec, h0, u.shape[1], x)
    tape = _run(xp, spec, u, h, c)
    out = tape[-1][2]
    out = xp.permute_dims(out, (1, 0, 2)) if spec.batch_first else out
    h_n = xp.stack([t[2][-1, ...] for t in tape], axis=0)
    if spec.lstm:
        H = spec.hidden_size
        return out, (h_n, xp.stack([t[3][-1, :, 4 * H:] for t in tape], axis=0))
    return out, h_n


# -- losses and gradients --------------------------------------------------------------------------
def _loss_terms(xp, Hs, y, loss, spec, like):
    """The loss of the top layer's states ``(T, N, H)`` as a float, and ``dloss/dh_t`` of every step."""
    if loss == "sum":
        return float(xp.sum(Hs)), xp.ones_like(Hs)
    T, N, H = Hs.shape
    want = (N, T, H) if spec.batch_first else (T, N, H)
    # torch's mse_loss would broadcast (with a warning) and average a different quantity
    yy = read_array(xp, y, "y", shapes=(want,), dtype=dtype_name(like.dtype), device=device_of(like),
                    layout=" (the output's shape)")
    diff = Hs - (xp.permute_dims(yy, (1, 0, 2)) if spec.batch_first else yy)
    return float(xp.mean(diff * diff)), diff * (2.0 / math.prod(diff.shape))


#: what ``method="auto"`` assumes of an accelerator (:data:`chainprod.cost.auto.ACCELERATOR`: seconds per
#: kernel launch, sustained flops, the most bytes of state Jacobians) and the launches of one cell step
ACCELERATOR_COSTS = {**ACCELERATOR, "kernels_per_step": 25}


def auto_path(like, T, N, S):
    """``method="auto"`` on foreign arrays: ``("backprop" or a schedule name, why)``.

    On a CPU device backprop through time: a scan of dense ``S x S`` state
    Jacobians does about ``S`` times its flops, and a CPU has too few lanes
    to repay them (the numpy path's cost model agrees for every size it can
    run). On an accelerator each dependent step of backprop costs a few
    dozen kernel launches whatever ``S``, so the ``"brent_kung"`` scan (work
    under ``2T`` ops, ``2 log2 T`` rounds of a few launches each) runs when
    its extra flops ``4 T N S^3`` at :data:`ACCELERATOR_COSTS` ``["flops"]``
    cost less than the launches it saves, ``T >= 64``, and its ``T N S^2``
    Jacobian entries fit ``ACCELERATOR_COSTS["max_bytes"]`` (three copies).
    The constants are assumptions, not measurements: the trace's note says
    which ran and why.
    """
    if not on_accelerator(like):
        return "backprop", (f"method 'auto' on a CPU device ran backprop through time: a scan of the {T} dense "
                            f"{S}x{S} state Jacobians does about {S} times its flops")
    a = ACCELERATOR_COSTS
    extra = 4 * T * N * S ** 3 / a["flops"]
    saved = T * a["kernels_per_step"] * a["launch_seconds"]
    size = 3 * T * N * S * S * np.dtype(dtype_name(like.dtype)).itemsize
    if T >= 64 and extra < saved and size <= a["max_bytes"]:
        return "brent_kung", (f"method 'auto' on an accelerator ran the scan 'brent_kung': predicted {extra:.3g} s "
                              f"of extra flops against {saved:.3g} s of kernel launches saved")
    return "backprop", (f"method 'auto' on an accelerator ran backprop through time: the scan's predicted "
                        f"{extra:.3g} s of extra flops and {size / 2 ** 20:.4g} MiB of Jacobians against {saved:.3g} s "
                        f"of launches saved (T={T})")


def _scan_layer(xp, cell, W_hh, Hs, Z, h0, c0, dHs, *, method, workers, trace, engine_options):
    """One layer's ``(dX, dW_hh, db_hh, dh0, dc0)`` with the adjoints by a scan of the reverse recurrence.

    Reversed time: ``mu_s = lambda_{T-1-s} = J_{T-s}^T mu_{s-1} + g_{T-1-s}``
    from ``mu_0 = g_{T-1}``, by :func:`chainprod.linear_recurrence` on the
    ``"array"`` executor (as :func:`chainprod.recurrent_grad.scan_backward`).
    """
    J = cells.state_jacobians(xp, cell, W_hh, Hs, Z, h0, c0)
    G = xp.flip(dHs, axis=0)
    if cell == "lstm":
        G = xp.concat([G, xp.zeros_like(G)], axis=-1)  # no loss term on c_t
    if Hs.shape[0] > 1:
        out = linear_recurrence(xp.matrix_transpose(xp.flip(J[1:, ...], axis=0)), G[1:, ...], G[0, ...],
                                method=method, backend="array", workers=workers,
                                return_trace=trace if trace is not None else False, engine_options=engine_options)
        G = xp.concat([G[:1, ...], out[0] if trace is not None else out], axis=0)
    return cells.scan_grads(xp, cell, Hs, Z, h0, c0, xp.flip(G, axis=0), J[0, ...])


def value_and_grad(model, x, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
                   return_trace=False, engine_options=None, kernels=None, h0=None, with_inputs=False,
                   forward="sequential", forward_options=None):
    """:meth:`chainprod.recurrent.Recurrent.__chainprod_value_and_grad__` for a foreign ``x``.

    Arguments and results as there; arrays of ``x``'s library, device and
    dtype. ``kernels`` must be None and ``forward`` ``"sequential"``.
    """
    library = common_library({"x": x, "y": y, "h0": h0})
    check_foreign_options(library, method=method, backend=backend, kernels=kernels, forward=forward,
                          forward_options=forward_options)
    return value_and_grad_spec(spec_of(model, x), x, y, loss=loss, method=method, backend=backend,
                               workers=workers, return_trace=return_trace, engine_options=engine_options, h0=h0,
                               with_inputs=with_inputs)


def value_and_grad_spec(spec, x, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
                        return_trace=False, engine_options=None, h0=None, with_inputs=False):
    """The loss over every step and its gradients for a :class:`RecurrentSpec` and a foreign ``x``.

    Returns ``(value, grads)`` (and the trace with ``return_trace``):
    ``value`` a float, ``grads`` a dict in ``spec.params``' order plus
    ``"input"``, ``"h0"`` (and ``"c0"``) with ``with_inputs``, arrays of
    ``x``'s library, device and dtype. Nothing passed in is modified.
    """
    loss = resolve_loss(loss, y)
    library = common_library({"x": x, "y": y, "h0": h0, "params": list(spec.params.values())})
    x, y, h0 = detached(x), detached(y), detached(h0)  # gradients come from here, not from autograd
    check_foreign_options(library, method=method, backend=backend)
    workers = check_workers(workers)
    xp = namespace(x)
    W = spec.params["weight_ih_l0"]
    if str(device_of(x)) != str(device_of(W)):
        raise ValueError(f"input is on {device_of(x)} but the parameters are on {device_of(W)}: pass the input on "
                         "the parameters' device")
    u = _read_sequence(xp, x, spec, dtype_name(W.dtype))
    T, N = u.shape[:2]
    h, h_shape, c, c_shape = _initial_states(xp, spec, h0, N, x)
    trace = make_trace(return_trace, "array", workers)
    tape = _run(xp, spec, u, h, c)
    value, dH = _loss_terms(xp, tape[-1][2], y, loss, spec, x)
    path, note = method, f"method {method!r} on {library} arrays"
    if method == "auto":
        S = (2 if spec.lstm else 1) * spec.hidden_size
        path, note = auto_path(x, T, N, S)
    t0 = trace.clock() if trace is not None else 0.0
    grads, dh0, dc0 = {}, [None] * spec.num_layers, [None] * spec.num_layers
    for k in range(spec.num_layers - 1, -1, -1):
        uu, X, Hs, Z = tape[k]
        W_ih, W_hh, _, b_hh = spec.layer(xp, k)
        ck = None if c is None else c[k, ...]
        if path == "backprop":
            dX, dW_hh, db_hh, dh0[k], dc0[k] = cells.backward(xp, spec.cell, X, W_hh, b_hh, h[k, ...], ck, Hs, Z, dH)
        else:
            dX, dW_hh, db_hh, dh0[k], dc0[k] = _scan_layer(xp, spec.cell, W_hh, Hs, Z, h[k, ...], ck, dH,
                                                           method=path, workers=workers, trace=trace,
                                                           engine_options=engine_options)
        rows = xp.reshape(dX, (T * N, X.shape[2]))
        # parameters are shared over time: their gradients sum over every step and sample
        grads[f"weight_ih_l{k}"] = rows.T @ xp.reshape(uu, (T * N, uu.shape[2]))
        grads[f"weight_hh_l{k}"] = dW_hh
        if spec.bias:
            grads[f"bias_ih_l{k}"] = xp.sum(rows, axis=0)
            grads[f"bias_hh_l{k}"] = db_hh
        if k > 0 or with_inputs:
            dH = dX @ W_ih  # the adjoint of the layer's inputs: the loss terms of the layer below
    grads = {name: grads[name] for name in spec.params}  # torch's order
    if with_inputs:
        grads["input"] = xp.permute_dims(dH, (1, 0, 2)) if spec.batch_first else dH
        grads["h0"] = xp.reshape(xp.stack(dh0, axis=0), h_shape)
        if spec.lstm:
            grads["c0"] = xp.reshape(xp.stack(dc0, axis=0), c_shape)
    if trace is None:
        return value, grads
    if path == "backprop":
        trace.schedule = None
        trace.add(TraceEvent(0, "main", t0, trace.clock(), T * spec.num_layers, f"bptt (array: {library})"))
    trace.note = note
    return value, grads, trace
