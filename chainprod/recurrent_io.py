"""What the recurrent models take and check: input sequences, initial states, targets, losses and options.

Every check names the argument, the step ``t`` or layer where it applies,
and the shape that was expected; nothing passed in is written (arrays are
read through views, and copied only when a layout or dtype must change).
Used by :mod:`chainprod.recurrent`; kept apart so each module reads on its own.
"""

from __future__ import annotations

import os

import numpy as np

from ._validate import as_float_array
from .cost import AUTO, valid_schedules
from .errors import NonFiniteError
from .executors import EXECUTORS, Executor, valid_backends
from .kernels.recurrent import default_recurrent_kernels
from .quick import mse_terms

__all__ = ["LOSSES", "all_finite_steps", "check_finite_states", "check_options", "loss_terms", "read_sequence",
           "read_state", "resolve_kernels", "resolve_loss"]

LOSSES = ("sum", "mse")


def _layout(batch_first):
    return "(N, T, {})" if batch_first else "(T, N, {})"


def _first_bad_step(arr):
    """The first step ``t`` (axis 0) holding a NaN or infinity, and the index inside it; None if all finite."""
    # the common case: np.isfinite over blocks of steps of about 2^20 values (a bounded temporary); a float64
    # sum of the values, tried before, took 103 against 28 us on 320 000 float32 values (the cast)
    if arr.size <= 1 << 20:  # one block: no generator (a few us of a short sequence's call)
        if np.isfinite(arr).all():
            return None
    else:
        k = max(1, (1 << 20) // max(1, arr[:1].size))
        if all(np.isfinite(arr[t:t + k]).all() for t in range(0, arr.shape[0], k)):
            return None
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if not bad.any():
        return None
    t = int(np.flatnonzero(bad)[0])
    return t, tuple(int(i) for i in np.argwhere(~np.isfinite(arr[t]))[0])


def all_finite_steps(arr) -> bool:
    """True when the array ``arr`` (time first) holds no NaN or infinity (checked in blocks of steps)."""
    return _first_bad_step(arr) is None


def read_sequence(x, *, input_size, batch_first, dtype, what="input"):
    """``x`` as a time-first ``(T, N, d_in)`` array (a view where possible), checked.

    Raises
    ------
    ValueError
        Not 3-D (an unbatched ``(T, d_in)`` sequence is refused: add a batch
        axis of size 1), ``T`` or ``N`` zero, a last axis other than
        ``input_size``, or a NaN or infinity (the message names the step
        ``t`` and the sample).
    TypeError
        A dtype other than the model's.
    """
    layout = _layout(batch_first).format("d_in")
    shape = np.shape(x)
    if len(shape) != 3:
        raise ValueError(f"{what}: expected shape {layout} with d_in = {input_size}, got {shape} (one sequence "
                         f"without a batch axis is not supported: add a batch axis of size 1)")
    t_axis = 1 if batch_first else 0
    for axis, name in ((t_axis, "T"), (1 - t_axis, "N")):
        if shape[axis] == 0:
            raise ValueError(f"{what}: has {name}=0 (shape {shape}, layout {layout}); a sequence needs "
                             f"T >= 1 steps of N >= 1 samples")
    if shape[2] != input_size:
        raise ValueError(f"{what}: expected d_in = input_size = {input_size} in the last axis (layout {layout}), "
                         f"got shape {shape}")
    arr = as_float_array(x, what, allow_nonfinite=True)
    if arr.dtype != dtype:
        raise TypeError(f"{what} is {arr.dtype} but the model is {dtype}: pass {what} in the model's dtype")
    arr = arr.transpose(1, 0, 2) if batch_first else arr  # a view: time first from here on
    bad = _first_bad_step(arr)
    if bad is not None:
        t, (n, i) = bad
        raise ValueError(f"{what}: contains NaN or infinity at step t={t} (sample n={n}, feature {i})")
    return arr


def read_state(h, *, name, num_layers, N, H, dtype):
    """An initial state ``(num_layers, N, H)`` (also ``(N, H)`` for one layer), zeros when ``None``.

    Returns ``(state, shape)``: the state as ``(num_layers, N, H)`` and the
    shape it was given in (its gradient is returned in that shape).
    """
    full = (num_layers, N, H)
    if h is None:
        return np.zeros(full, dtype), full
    arr = as_float_array(h, name, allow_nonfinite=True)
    ok = (full, (N, H)) if num_layers == 1 else (full,)
    if arr.shape not in ok:
        also = f" or (N, H) = {(N, H)}" if num_layers == 1 else ""
        raise ValueError(f"{name}: expected shape (num_layers, N, H) = {full}{also} (N from the input), got "
                         f"{arr.shape}")
    if arr.dtype != dtype:
        raise TypeError(f"{name} is {arr.dtype} but the model is {dtype}: pass {name} in the model's dtype")
    arr = arr.reshape(full)
    bad = _first_bad_step(arr)
    if bad is not None:
        layer, (n, i) = bad
        raise ValueError(f"{name}: contains NaN or infinity for layer {layer} (sample n={n}, unit {i})")
    return arr, np.shape(h)


def check_finite_states(Hs, layer):
    """Raise :class:`~chainprod.errors.NonFiniteError` naming the first step whose state is not finite."""
    bad = _first_bad_step(Hs)
    if bad is None:
        return
    t, (n, i) = bad
    err = NonFiniteError(f"state h_t of layer {layer} at step t={t} is not finite (sample n={n}, unit {i}): the "
                         "forward pass overflowed (inputs and parameters are finite); a relu RNN grows without "
                         "bound when its recurrent weights are large", (layer, layer))
    err.step = t
    raise err


def resolve_loss(loss, y):
    """The loss name: ``"mse"`` with targets, ``"sum"`` without, when ``loss`` is None."""
    if loss is None:
        loss = "sum" if y is None else "mse"
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss: unknown {loss!r}; use one of {list(LOSSES)}")
    if loss == "sum" and y is not None:
        raise ValueError("loss='sum' takes no targets y (it is output.sum()); use loss='mse' with targets")
    if loss == "mse" and y is None:
        raise ValueError("loss='mse' needs targets y shaped like the output sequence")
    return loss


def loss_terms(Hs, y, loss, *, batch_first, dtype, ws=None):
    """The loss of the top layer's states ``Hs`` ``(T, N, H)`` and ``dloss/dh_t`` of every step (time first).

    With a workspace scope ``ws`` (:mod:`chainprod._workspace`) the terms are taken from it.
    """
    dH = np.empty(Hs.shape, Hs.dtype) if ws is None else ws.empty(Hs.shape, Hs.dtype)
    if loss == "sum":
        dH.fill(1)
        return float(Hs.sum(dtype=np.float64)), dH
    T, N, H = Hs.shape
    want = (N, T, H) if batch_first else (T, N, H)
    yy = as_float_array(y, "y", allow_nonfinite=True)
    if yy.shape != want:
        # torch's mse_loss would broadcast (with a warning) and average a different quantity
        raise ValueError(f"y: expected the output's shape {_layout(batch_first).format('H')} = {want}, got "
                         f"{yy.shape}")
    if yy.dtype != dtype:
        raise TypeError(f"y is {yy.dtype} but the model is {dtype}: pass y in the model's dtype")
    yy = yy.transpose(1, 0, 2) if batch_first else yy
    with np.errstate(over="ignore", invalid="ignore"):
        value, dH = mse_terms(Hs, yy, into=dH)  # the squares summed per step, the steps' sums in float64
    # the states are finite (checked as they were made): a finite value leaves no NaN or infinity in y, so
    # y is searched for one (the step named) only when the value is not finite
    bad = None if np.isfinite(value) else _first_bad_step(yy)
    if bad is not None:
        raise ValueError(f"y: contains NaN or infinity at step t={bad[0]}")
    return value, dH


def check_options(method, backend):
    """Refuse an unknown method or backend before any work (also where they would not be used)."""
    if not isinstance(method, str):
        raise TypeError(f"method must be 'backprop', 'auto' or a scan schedule name, got {method!r}")
    if method != "backprop" and method != AUTO:  # the names are listed only where they are needed (4 us a call)
        names = valid_schedules()
        scans = [n for n in names if n not in ("tree", AUTO)]
        if method == "tree":
            raise ValueError("method 'tree' forms only the total product, not every adjoint; use 'backprop', "
                             f"'auto' or a scan schedule: {scans}")
        if method not in names:
            raise ValueError(f"method: unknown {method!r}; use 'backprop', 'auto' or a scan schedule: {scans}")
    if not (isinstance(backend, Executor) or (isinstance(backend, str) and backend in EXECUTORS)):
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")


def resolve_kernels(kernels):
    """The recurrent kernel set's name: ``kernels``, else ``$CHAINPROD_KERNELS``, else the installed default."""
    if kernels is None:
        return os.environ.get("CHAINPROD_KERNELS") or default_recurrent_kernels()
    return kernels
