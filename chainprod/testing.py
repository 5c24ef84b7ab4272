"""Helpers for testing chainprod and code built on it (importable by users).

References here are deliberately naive and independent of the engine: a
plain left fold of matrix products, and a plain per-layer backprop.
"""

from __future__ import annotations

import numpy as np

from ._validate import renamed_argument
from .blocks import Diag
from .check import directional_derivatives
from .errors import GradientCheckError
from .executors import get_executor
from .grad import grad
from .layers import Chain, Dense, Diagonal, mlp
from .products import suffix_products

__all__ = ["random_chain", "random_mats", "left_fold_suffix", "reference_grads", "dense", "assert_grads_close",
           "kill_and_wait", "started_engine"]


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


def reference_grads(chain: Chain, x, cotangent=None, *, seed=None) -> list[tuple]:
    """Gradients of ``sum(chain(x))`` (or of ``<cotangent, chain(x)>``) by plain per-layer backprop.

    Written without the engine: one layer object at a time, its own forward,
    explicit formulas. Used by the tests as an independent reference.
    ``seed=`` is the old name of ``cotangent`` (deprecated; it warns).
    """
    cotangent = renamed_argument("reference_grads", "cotangent", cotangent, "seed", seed)
    x = np.asarray(x)
    x = x[None] if x.ndim == 1 else x
    acts = [x]
    for ly in chain.layers:
        acts.append(ly.forward(acts[-1]))
    g = (np.ones_like(acts[-1]) if cotangent is None
         else np.asarray(cotangent, dtype=acts[-1].dtype).reshape(acts[-1].shape))
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


def assert_grads_close(chain: Chain, x, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
                       rtol=None, directions=3, eps=None, seed=0, **grad_options) -> list[tuple]:
    """Assert that chainprod's gradients agree with central finite differences.

    The gradients of ``chain`` at ``x`` are computed with ``method`` /
    ``backend`` / ``workers``; for each layer, ``directions`` random
    directions ``dw`` of length ``eps`` compare the directional derivative
    ``<g, dw>`` with ``(loss(w + dw) - loss(w - dw)) / 2`` (error ``O(eps^3)``).

    Parameters
    ----------
    rtol : float, optional
        Largest relative error tolerated; default ``1e-6`` (float64) or
        ``5e-2`` (float32, where differences lose about half the digits).
    **grad_options
        Passed on to :func:`chainprod.grad` (e.g. ``kernels=``).

    Returns
    -------
    list of tuples
        The gradients that passed, so a test can go on using them.

    Raises
    ------
    chainprod.errors.GradientCheckError
        Naming every failing layer with the analytic and the numerical
        directional derivative side by side.

    Examples
    --------
    >>> import numpy as np, chainprod as cp
    >>> from chainprod.testing import assert_grads_close
    >>> g = assert_grads_close(cp.mlp([3, 5, 1]), np.ones((2, 3)), method="sklansky")
    """
    grads = grad(chain, x, y, loss=loss, method=method, backend=backend, workers=workers, **grad_options)
    if rtol is None:
        rtol = 1e-6 if chain.dtype == np.float64 else 5e-2
    rows = directional_derivatives(chain, x, y, grads, loss=loss, directions=directions, eps=eps, seed=seed)
    bad = [r for r in rows if r[4] > rtol]
    if bad:
        lines = [f"  layer {l:>4} ({chain.layers[l]!r}), direction {d}: analytic {an:+.12e}  numerical {fd:+.12e}  "
                 f"rel. error {err:.2e}" for l, d, an, fd, err in bad[:20]]
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise GradientCheckError(
            f"gradients of {len(bad)} layer direction(s) disagree with central differences beyond rtol={rtol:g} "
            f"(method={method!r}, backend={backend!r}):\n" + "\n".join(lines) + more)
    return grads


def kill_and_wait(process, timeout=60.0) -> bool:
    """SIGKILL ``process`` (a pid or a ``psutil.Process``) and return once it is dead: True, or False if gone already.

    Dead means a zombie or gone: the process is polled, never reaped, because a
    Dask worker is the child of a nanny in the same process as the caller, and
    the nanny must read its exit itself to start a new one (``wait()`` here
    took the exit status from it, and the worker was never replaced). Needs
    ``psutil`` (the ``test`` extra).
    """
    import time

    import psutil

    try:
        p = process if isinstance(process, psutil.Process) else psutil.Process(process)
        p.kill()
    except psutil.NoSuchProcess:
        return False
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.005)
    raise TimeoutError(f"process {p.pid} still runs {timeout} s after SIGKILL")


def started_engine(backend, *, workers=2, timeout=300):
    """A new executor of ``backend`` (``"ray"`` or ``"dask"``) on its embedded cluster, started if it was not.

    The cluster is the process's shared one (started by one small call on the
    shared executor, then kept for every later caller); the executor returned
    is a new instance with its own ``workers`` and per-call ``timeout``.
    """
    ex = get_executor(backend)
    suffix_products(random_mats(3, 2), method="sequential", backend=ex, workers=workers)  # starts the cluster
    return type(ex)(workers=workers, timeout=timeout)
