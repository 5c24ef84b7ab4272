"""Helpers for testing chainprod and code built on it (importable by users).

References here are deliberately naive and independent of the engine: a
plain left fold of matrix products, and a plain per-layer backprop.
"""

from __future__ import annotations

import numpy as np

from .blocks import Diag
from .layers import Chain, Dense, Diagonal, mlp

__all__ = ["random_chain", "random_mats", "left_fold_suffix", "reference_grads", "dense"]


def dense(m) -> np.ndarray:
    """A block as a dense array (``Diag`` expanded)."""
    return m.todense() if isinstance(m, Diag) else np.asarray(m)


def random_mats(L, width=4, *, kind="dense", batch=None, seed=0, dtype=np.float64, widths=None, scale=None):
    """``L`` random blocks ``A_1..A_L`` that chain; ``kind`` = ``dense``, ``diag`` or ``mixed``.

    ``widths`` (length ``L+1``) gives varying dense shapes ``A_l: widths[l] x widths[l-1]``.
    Entries are scaled by ``1/sqrt(width)`` so long products stay finite.
    """
    rng = np.random.default_rng(seed)
    if widths is None:
        widths = [width] * (L + 1)
    lead = () if batch is None else (batch,)
    mats = []
    for l in range(L):
        r, c = widths[l + 1], widths[l]
        k = kind if kind != "mixed" else ("diag" if rng.random() < 0.5 and r == c else "dense")
        s = scale if scale is not None else 1 / np.sqrt(c)
        if k == "diag":
            if r != c:
                raise ValueError("diagonal blocks need equal widths")
            mats.append(Diag(rng.uniform(0.5, 1.5, lead + (r,)).astype(dtype)))
        else:
            mats.append((s * rng.standard_normal(lead + (r, c)) + (np.eye(r, c) if r == c else 0)).astype(dtype)
                        * (0.7 if r == c else 1.0))
    return mats


def left_fold_suffix(mats) -> list[np.ndarray]:
    """``out[k] = mats[L-1] @ ... @ mats[k]`` by a plain loop of products (dense results)."""
    L = len(mats)
    out = [None] * L
    acc = dense(mats[-1])
    out[L - 1] = acc
    for k in range(L - 2, -1, -1):
        acc = acc @ dense(mats[k])
        out[k] = acc
    return out


def random_chain(L, width=4, *, kind="dense", activation="tanh", seed=0, dtype=np.float64, d_in=None) -> Chain:
    """A random scalar-output chain of ``L`` layers: ``dense`` (an MLP), ``diag`` or ``mixed``."""
    rng = np.random.default_rng(seed)
    d_in = width if d_in is None else d_in
    if kind == "dense":
        return mlp([d_in] + [width] * (L - 1) + [1], activation=activation, seed=seed, dtype=dtype)
    layers = []
    if d_in != width:
        layers.append(Dense((rng.standard_normal((width, d_in)) / np.sqrt(d_in)).astype(dtype),
                            (0.1 * rng.standard_normal(width)).astype(dtype), activation))
    while len(layers) < L - 1:
        diag = kind == "diag" or rng.random() < 0.5
        if diag:
            layers.append(Diagonal(rng.uniform(0.6, 1.2, width).astype(dtype),
                                   (0.1 * rng.standard_normal(width)).astype(dtype), activation))
        else:
            layers.append(Dense((rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype),
                                (0.1 * rng.standard_normal(width)).astype(dtype), activation))
    layers.append(Dense((rng.standard_normal((1, width)) / np.sqrt(width)).astype(dtype),
                        np.zeros(1, dtype=dtype), "identity"))
    return Chain(layers[:L] if L >= 1 else layers)


def reference_grads(chain: Chain, x, seed=None) -> list[tuple]:
    """Gradients of ``sum(chain(x))`` (or of ``<seed, chain(x)>``) by plain per-layer backprop.

    Written without the engine: one layer object at a time, its own forward,
    explicit formulas. Used by the tests as an independent reference.
    """
    x = np.asarray(x)
    x = x[None] if x.ndim == 1 else x
    acts = [x]
    for ly in chain.layers:
        acts.append(ly.forward(acts[-1]))
    g = np.ones_like(acts[-1]) if seed is None else np.asarray(seed, dtype=acts[-1].dtype).reshape(acts[-1].shape)
    grads = [None] * len(chain)
    for l in range(len(chain) - 1, -1, -1):
        ly, xin, y = chain.layers[l], acts[l], acts[l + 1]
        s = ly.derivs(y, ly.activation)
        delta = g * s
        if isinstance(ly, Dense):
            W, _ = ly.params
            grads[l] = (delta.T @ xin, delta.sum(0))
            g = delta @ W
        else:
            a, _ = ly.params
            grads[l] = ((delta * xin).sum(0), delta.sum(0))
            g = delta * a
    return grads
