"""Gradient checks by central finite differences.

For a random direction ``dw`` of length ``eps`` the correct gradient ``J``
satisfies ``|(L(w + dw) - L(w - dw)) / 2 - <J, dw>| = O(eps^3)``, far below
the ``O(eps^2)`` of one-sided differences, so the check works with limited
floating-point precision.
"""

from __future__ import annotations

import numpy as np

from .grad import LOSSES, forward, grad, loss_cotangent
from .layers import Chain

__all__ = ["check_grad", "numerical_grad", "directional_derivatives"]


def _loss(chain, x, y, loss, layer=None, params=None):
    if layer is not None:
        layers = list(chain.layers)
        ly = layers[layer]
        layers[layer] = type(ly)(*params, activation=ly.activation)
        chain = Chain(layers)
    # The numpy reference forward: the differences stay independent of the
    # compiled kernels whose gradients they check.
    tape = forward(chain, x, kernels="numpy")
    value, _ = loss_cotangent(tape, y, loss)
    return value


def check_grad(chain: Chain, x, y=None, *, loss=None, grads=None, method="backprop", backend="vectorized",
               eps=None, directions=3, seed=0) -> np.ndarray:
    """Worst relative error per layer between ``grads`` and central differences.

    Parameters
    ----------
    grads : list of tuples, optional
        Gradients to check; computed with ``method``/``backend`` if omitted.
    eps : float, optional
        Length of each random direction; default ``1e-5`` (float64) or
        ``1e-2`` (float32).
    directions : int
        Random directions per layer.

    Returns
    -------
    ndarray, shape ``(len(chain),)``
        ``max |fd - <g, dw>| / max(|fd|, |<g, dw>|, tiny)`` over directions.
    """
    if grads is None:
        grads = grad(chain, x, y, loss=loss, method=method, backend=backend)
    errs = np.zeros(len(chain))
    for l, _, _, _, err in directional_derivatives(chain, x, y, grads, loss=loss, directions=directions, eps=eps,
                                                   seed=seed):
        errs[l] = max(errs[l], err)
    return errs


def directional_derivatives(chain: Chain, x, y, grads, *, loss=None, directions=3, eps=None, seed=0):
    """Per layer and random direction ``dw``: ``(layer, direction, <g, dw>, fd, relative error)``.

    ``fd = (loss(w + dw) - loss(w - dw)) / 2`` with ``|dw| = eps`` (default
    ``1e-5`` for float64, ``1e-2`` for float32); the relative error is
    ``|fd - <g, dw>| / max(|fd|, |<g, dw>|, tiny)``.
    """
    if eps is None:
        eps = 1e-5 if chain.dtype == np.float64 else 1e-2
    rng = np.random.default_rng(seed)
    tiny = np.finfo(chain.dtype).tiny
    rows = []
    for l, (ly, g) in enumerate(zip(chain.layers, grads)):
        for d_i in range(directions):
            dirs = [rng.standard_normal(p.shape) for p in ly.params]
            norm = np.sqrt(sum(float((d * d).sum()) for d in dirs))
            dirs = [(eps * d / norm).astype(chain.dtype) for d in dirs]
            plus = _loss(chain, x, y, loss, l, [p + d for p, d in zip(ly.params, dirs)])
            minus = _loss(chain, x, y, loss, l, [p - d for p, d in zip(ly.params, dirs)])
            fd = (plus - minus) / 2
            an = sum(float((gi.astype(np.float64) * d).sum()) for gi, d in zip(g, dirs))
            rows.append((l, d_i, an, fd, abs(fd - an) / max(abs(fd), abs(an), tiny)))
    return rows


def numerical_grad(chain: Chain, x, y=None, *, loss=None, eps=1e-6) -> list[tuple]:
    """Entry-by-entry central differences of the loss (small chains only: 2 passes per entry)."""
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(LOSSES))}")
    out = []
    for l, ly in enumerate(chain.layers):
        gs = []
        for i, p in enumerate(ly.params):
            g = np.zeros(p.shape)
            for idx in np.ndindex(p.shape):
                ps = [q.copy() for q in ly.params]
                ps[i][idx] += eps
                plus = _loss(chain, x, y, loss, l, ps)
                ps[i][idx] -= 2 * eps
                minus = _loss(chain, x, y, loss, l, ps)
                g[idx] = (plus - minus) / (2 * eps)
            gs.append(g)
        out.append(tuple(gs))
    return out
