"""The models and peers of the sweep's sequences section: one problem, and the call each row times.

:class:`SequenceProblem` holds a problem's chainprod model (``cp.RNN``,
``cp.GRU``, ``cp.LSTM`` or ``cp.DiagonalRecurrence``), the same parameters
in torch, and the input sequence; :func:`sequence_step` returns the call one
row of :mod:`chainprod.bench_sequences` times: ``cp.value_and_grad``, torch's
module with ``loss.backward()``, or JAX ``jit(value_and_grad)`` of a
``lax.scan`` of the same cell. torch and JAX are imported only when asked for.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SequenceProblem", "jax_states", "sequence_step"]


class SequenceProblem:
    """A problem's model (chainprod and torch, the same parameters) and its input sequence ``(T, N, hidden)``."""

    def __init__(self, cell, T, H, N, dtype, seed=0):
        self.cell, self.T, self.H, self.N, self.dtype = cell, int(T), int(H), int(N), np.dtype(dtype)
        rng = np.random.default_rng(seed)
        self.u = rng.standard_normal((self.T, self.N, self.H)).astype(self.dtype)
        self._torch = None
        if cell == "diag_recurrence":
            from .ssm import DiagonalRecurrence

            self.model = DiagonalRecurrence.random(H, H, H, seed=seed, dtype=self.dtype)
        else:
            from .recurrent import GRU, LSTM, RNN

            cls = {"gru": GRU, "lstm": LSTM}.get(cell, RNN)
            kw = {"nonlinearity": cell[4:]} if cls is RNN else {}
            self.model = cls(H, H, dtype=self.dtype, seed=seed, **kw)

    def torch(self):
        """``(module or params, input tensor)``: torch's module with the same parameters (built once)."""
        if self._torch is None:
            import torch

            tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[self.dtype]
            if self.cell == "diag_recurrence":
                mod = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in self.model.params.items()}
            else:
                make = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}.get(self.cell)
                mod = (make(self.H, self.H) if make else torch.nn.RNN(self.H, self.H, nonlinearity=self.cell[4:]))
                mod = mod.to(tdt)
                with torch.no_grad():
                    for name, p in mod.named_parameters():
                        p.copy_(torch.from_numpy(np.array(self.model.params[name])))
            self._torch = (mod, torch.from_numpy(self.u))
        return self._torch


def _torch_step(prob):
    import torch

    mod, u = prob.torch()
    if prob.cell != "diag_recurrence":
        params = list(mod.parameters())

        def step():
            for p in params:
                p.grad = None
            out, _ = mod(u)
            loss = out.sum()
            loss.backward()
            return float(loss.detach())
        return step
    p = mod

    def step():  # h_t = a * h_{t-1} + B u_t, y_t = C h_t + D u_t: the recurrence as torch users would loop it
        for v in p.values():
            v.grad = None
        X = u @ p["B"].T
        h, hs = torch.zeros_like(X[0]), []
        for t in range(X.shape[0]):
            h = p["a"] * h + X[t]
            hs.append(h)
        y = torch.stack(hs) @ p["C"].T + (u @ p["D"].T if "D" in p else 0)
        loss = y.sum()
        loss.backward()
        return float(loss.detach())
    return step


def jax_states(cell, H, p, u):
    """Every state ``(T, N, H)`` of one layer in JAX: a ``lax.scan`` of the cell over ``u`` ``(T, N, d)``.

    ``p``: the chainprod model's parameters as JAX arrays, by torch's names
    (``a``, ``B`` for the diagonal layer, whose states are returned the same
    way). Traced inside the caller's ``jit``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    sig = jax.nn.sigmoid
    if cell == "diag_recurrence":
        X = u @ p["B"].T
        return lax.scan(lambda h, x: (p["a"] * h + x, p["a"] * h + x), jnp.zeros_like(X[0]), X)[1]
    W, b = p["weight_hh_l0"], p["bias_hh_l0"]
    X = u @ p["weight_ih_l0"].T + p["bias_ih_l0"]

    def rnn(h, x):
        a = x + h @ W.T + b
        h = jnp.tanh(a) if cell == "rnn_tanh" else jnp.maximum(a, 0)
        return h, h

    def gru(h, x):
        gh = h @ W.T + b
        r, z = sig(x[:, :H] + gh[:, :H]), sig(x[:, H:2 * H] + gh[:, H:2 * H])
        h = (1 - z) * jnp.tanh(x[:, 2 * H:] + r * gh[:, 2 * H:]) + z * h
        return h, h

    def lstm(hc, x):
        g = x + hc[0] @ W.T + b
        i, f, o = (sig(g[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        c = f * hc[1] + i * jnp.tanh(g[:, 2 * H:3 * H])
        h = o * jnp.tanh(c)
        return (h, c), h

    h0 = jnp.zeros((u.shape[1], H), u.dtype)
    return lax.scan({"gru": gru, "lstm": lstm}.get(cell, rnn), (h0, h0) if cell == "lstm" else h0, X)[1]


def _jax_step(prob):
    """``jit(value_and_grad)`` of a ``lax.scan`` of the cell, as a call that waits for the gradients."""
    import jax

    if prob.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    H, cell = prob.H, prob.cell
    params = {k: jnp.asarray(np.array(v)) for k, v in prob.model.params.items()}
    u = jnp.asarray(prob.u)

    def loss(p, u):
        hs = jax_states(cell, H, p, u)
        if cell == "diag_recurrence":
            return jnp.sum(hs @ p["C"].T) + (jnp.sum(u @ p["D"].T) if "D" in p else 0.0)
        return jnp.sum(hs)

    f = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(f(params, u))


def _chainprod_step(prob, method, backend, workers):
    from .grad import value_and_grad

    kw = ({"kernels": backend} if method == "backprop" else
          {"backend": backend, "workers": workers if backend == "threads" else None})
    return lambda: value_and_grad(prob.model, prob.u, loss="sum", method=method, **kw)


def sequence_step(method, backend, P, prob):
    """The call one row times: it computes the loss and every parameter's gradient, and returns what it made.

    chainprod: ``(value, grads)`` of ``cp.value_and_grad``; torch: the loss
    (the gradients are in the module's ``.grad``); JAX: ``(value, grads)``,
    the grads named like the chainprod model's parameters.
    """
    if method == "torch":
        return _torch_step(prob)
    if method == "jax":
        return _jax_step(prob)
    return _chainprod_step(prob, "backprop" if method.startswith("backprop") else method, backend, P)
