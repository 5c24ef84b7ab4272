"""The short path of a recurrent model's gradient for the calls made in a training loop.

:meth:`chainprod.recurrent.Recurrent.__chainprod_value_and_grad__` reads
every option a call can take (foreign arrays, traces, the parallel forward
passes, scans, ``batch_first`` copies, gradients for the inputs and the
initial states) before its work. On a short sequence that reading is a
large part of the call: the tanh RNN at ``T = 1000``, ``N = 1``, ``H = 8``
took about 0.1 ms around 0.23 ms of compiled loops. :func:`try_value_and_grad`
serves the common call directly: a time-first, C-contiguous numpy input of
the model's dtype, the ``"sum"`` loss or the ``"mse"`` loss against a
numpy target, no initial state, ``method="backprop"`` (or ``"auto"`` once
it has chosen backprop through time for this problem: the cost model kept
it, or the general path's probe timed it faster than the proposed scan),
the default backend and workers, no trace, the sequential forward pass, no
gradients for the inputs. It runs the general path's own layer passes
(:mod:`chainprod.recurrent_layers`) and loss (:func:`~chainprod.recurrent_io.loss_terms`),
so its gradients equal the general path's bit for bit
(``tests/test_recurrent_quick.py``).

It never raises on its own account: a call it does not serve, and an input
holding a NaN or infinity, return ``None``, and the caller runs the general
path, which says what is wrong and where. (The layer passes and the loss
raise the general path's own errors for states that overflow and targets
that are not finite.)
"""

from __future__ import annotations

import numpy as np

from ._workspace import scope
from .kernels.recurrent import get_recurrent_kernels
from .recurrent_grad import auto_uses_scan, probed_loop_wins
from .recurrent_io import all_finite_steps, loss_terms, resolve_kernels
from .recurrent_layers import backward_layers, run_layers

__all__ = ["try_value_and_grad"]


def _served(model, x, y, loss, method, backend, workers, return_trace, engine_options, h0, with_inputs, forward,
            forward_options):
    """The loss name when the call is one :func:`try_value_and_grad` serves, else None."""
    if (return_trace is not False or engine_options is not None or h0 is not None or with_inputs
            or forward_options is not None or workers is not None or model.batch_first
            or x.__class__ is not np.ndarray or backend.__class__ is not str or backend != "vectorized"
            or forward.__class__ is not str or forward != "sequential"
            or method.__class__ is not str or method not in ("backprop", "auto")):
        return None
    if (x.dtype != model.dtype or x.ndim != 3 or x.shape[2] != model.input_size or x.shape[0] == 0
            or x.shape[1] == 0 or not x.flags.c_contiguous):
        return None
    if loss is None:
        loss = "sum" if y is None else "mse"
    if loss == "sum" and y is None:
        return loss
    if (loss == "mse" and y.__class__ is np.ndarray and y.dtype == model.dtype
            and y.shape == (*x.shape[:2], model.hidden_size)):
        return loss
    return None


def try_value_and_grad(model, x, y, loss, method, backend, workers, return_trace, engine_options, kernels, h0,
                       with_inputs, forward, forward_options):
    """``(value, grads)`` of the general path for the calls it serves (the module docstring), else None."""
    loss = _served(model, x, y, loss, method, backend, workers, return_trace, engine_options, h0, with_inputs,
                   forward, forward_options)
    if loss is None:
        return None
    T, N = x.shape[:2]
    H = model.hidden_size
    try:
        kern_name = resolve_kernels(kernels)
        kern = get_recurrent_kernels(kern_name)
    except (ValueError, ImportError):
        return None
    if method == "auto":
        sched = auto_uses_scan(T, N, model.state_factor * H, model.dtype, backend, workers)
        if sched is not None and not probed_loop_wins(model.cell, sched, (T, N, model.gates * H), H, model.dtype,
                                                      backend, workers, kern_name):
            return None  # a scan proposed and not yet timed against the loop: the general path probes it
    if not all_finite_steps(x):
        return None
    shape = (model.num_layers, N, model.hidden_size)
    h0 = np.zeros(shape, model.dtype)
    c0 = np.zeros(shape, model.dtype) if model.mode == "LSTM" else None
    with scope() as ws:  # the general path's temporaries, reused call after call
        tape = run_layers(model, x, h0, c0, kern, ws)
        value, dH = loss_terms(tape[-1][2], y, loss, batch_first=False, dtype=model.dtype, ws=ws)
        grads = backward_layers(model, tape, dH, h0, c0, kern, "backprop", with_inputs=False, ws=ws)[0]
    return value, grads
