"""A stacked recurrent model's passes over its layers: the forward tape, and the gradients down the layers.

:class:`chainprod.recurrent.Recurrent` holds the parameters and reads the
user's arrays; these two functions do the work between. Each layer's input
projections ``X = u W_ih^T + b_ih`` of every step are one matrix product;
the part that waits for ``h_{t-1}`` runs in a recurrent kernel set. Given a
workspace scope (:mod:`chainprod._workspace`), every large temporary
(``X``, the states, what backward keeps, the adjoints) is taken from it, so
a training loop reuses the same memory call after call; what is returned to
the user is never from it.
"""

from __future__ import annotations

import numpy as np

from .kernels.recurrent_numpy import saved_width
from .recurrent_grad import scan_backward
from .recurrent_io import check_finite_states

__all__ = ["backward_layers", "run_layers"]


def _empty(ws, shape, dtype):
    return np.empty(shape, dtype) if ws is None else ws.empty(shape, dtype)


def run_layers(model, u, h0, c0, kern, ws=None, fresh_top=False):
    """The forward pass, layer after layer: per layer ``(u, X, Hs, Z)``.

    ``u`` ``(T, N, d_in)`` time first; ``h0``, ``c0`` ``(num_layers, N, H)``
    (``c0`` None but for the LSTM). With a workspace scope ``ws`` every
    array is taken from it, but the top layer's states with ``fresh_top``
    (they are returned to the user).
    """
    tape = []
    T, N = u.shape[:2]
    for layer in range(model.num_layers):
        W_ih, W_hh, (b_ih, b_hh) = model.layer_params(layer)
        GH, H = W_hh.shape
        X = _empty(ws, (T, N, GH), model.dtype)
        np.matmul(u.reshape(-1, u.shape[2]), W_ih.T, out=X.reshape(-1, GH))  # one 2-D product, all steps
        b = b_hh
        if b_ih is not None and model.gates == 3:
            X += b_ih  # the GRU's n-gate adds b_ih outside r (n = tanh(X_n + r (W_n h + b_hn))): it stays in X
        elif b_ih is not None:
            # RNN, LSTM: the kernel adds one bias to X_t + W_hh h_{t-1}, so b_ih + b_hh there costs no pass
            # over X (a quarter of a millisecond of a 9 ms LSTM step, T = 1000, N = 16, H = 20, measured).
            # Backward never reads X's values for these cells: the tape's X is the product alone.
            b = b_ih + b_hh
        top = fresh_top and layer == model.num_layers - 1
        out = (_empty(None if top else ws, (T, N, H), model.dtype),
               _empty(ws, (T, N, saved_width(model.cell, H)), model.dtype))
        c = None if c0 is None else np.ascontiguousarray(c0[layer])
        Hs, Z = kern.forward(model.cell, X, W_hh, b, np.ascontiguousarray(h0[layer]), c, out=out)
        check_finite_states(Hs, layer)
        tape.append((u, X, Hs, Z))
        u = Hs
    return tape


def backward_layers(model, tape, dH, h0, c0, kern, path, *, with_inputs, ws=None, backend="vectorized",
                    workers=None, trace=None, engine_options=None, kernels=None):
    """The parameters' gradients from the loss terms ``dH`` of the top layer, going down the layers.

    ``path`` is ``"backprop"`` (the kernel set's backprop through time) or a
    scan schedule name (:func:`chainprod.recurrent_grad.scan_backward` on
    ``backend``, run by ``kernels``). Returns ``(grads, du, dh0, dc0)``: ``grads`` by torch's
    names (in the model's order), ``du`` the adjoint of the bottom layer's
    inputs (a new array; None without ``with_inputs``) and per layer the
    initial states' adjoints (``dc0`` entries None but for the LSTM).
    """
    grads, dh0, dc0 = {}, [None] * model.num_layers, [None] * model.num_layers
    for layer in range(model.num_layers - 1, -1, -1):
        uu, X, Hs, Z = tape[layer]
        W_ih, W_hh, (_, b_hh) = model.layer_params(layer)
        c = None if c0 is None else np.ascontiguousarray(c0[layer])
        args = (model.cell, X, W_hh, b_hh, np.ascontiguousarray(h0[layer]), c, Hs, Z, np.ascontiguousarray(dH))
        if path == "backprop":
            dX, dW_hh, db_hh, dh0[layer], dc0[layer] = kern.backward(*args, out=_empty(ws, X.shape, X.dtype))
        else:
            dX, dW_hh, db_hh, dh0[layer], dc0[layer] = scan_backward(
                *args, method=path, backend=backend, workers=workers, trace=trace, engine_options=engine_options,
                kernels=kernels)
        GH = X.shape[2]
        dX2 = dX.reshape(-1, GH)
        # parameters are shared over time: their gradients sum over every step and sample
        grads[f"weight_ih_l{layer}"] = dX2.T @ uu.reshape(-1, uu.shape[2])
        grads[f"weight_hh_l{layer}"] = dW_hh
        if model.bias:
            # the kernels' db_hh is the same sum as bias_ih's where X's gates are the pre-activations
            # themselves (RNN, LSTM), summed once in float64; the GRU's n-gate differs (r scales W_hh's part)
            grads[f"bias_ih_l{layer}"] = db_hh.copy() if model.gates != 3 and path == "backprop" else dX2.sum(axis=0)
            grads[f"bias_hh_l{layer}"] = db_hh
        if layer > 0 or with_inputs:
            # the adjoint of the layer's inputs: the loss terms of the layer below (returned at the bottom)
            dH = _empty(None if layer == 0 else ws, uu.shape, X.dtype)
            np.matmul(dX2, W_ih, out=dH.reshape(-1, W_ih.shape[1]))
    grads = {name: grads[name] for name in model.params}  # torch's order
    return grads, (dH if with_inputs else None), dh0, dc0
