"""The diagonal recurrence layer: forward + backward of chainprod against a plain ``@njit`` loop, torch, JAX and scans.

A script (not a pytest-benchmark suite: the target cell alone holds several
GB)::

    python3 benchmarks/bench_ssm.py            # the target (T = 10^6) and the grid, a few minutes on 2 cores
    python3 benchmarks/bench_ssm.py --quick    # T = 10^5 target, small grid, under a minute

Every cell is one training step's gradient of ``mse(y, target)`` for
``h_t = a * h_{t-1} + B u_t``, ``y_t = C h_t + D u_t`` with
``d_in = d_out = d`` ("hidden d": square projections), float64:
the forward pass, the loss and the gradients of ``a, B, C, D``. Rows:

* ``chainprod``: ``cp.value_and_grad(layer, u, y, method="backprop")`` (the
  compiled loops, input checks included);
* ``plain njit``: the straightforward fused loop a user would write for this
  layer (below: one ``@njit`` loop forward, one backward with ``da`` in it,
  the same BLAS projections as chainprod), the yardstick of the target
  "within 1.5x";
* ``torch``: the recurrence as a torch loop, ``loss.backward()`` (capped at
  ``T <= 10^4``: one Python step per time step);
* ``jax``: ``jit(value_and_grad)`` of a ``lax.scan`` (compile time excluded);
* scans: ``cp.value_and_grad`` with ``brent_kung`` and ``chunked`` on the
  vectorized executor and ``brent_kung`` on 2 threads (capped at
  ``T N <= 2 10^5``: seconds per call beyond).

Times are medians of the repeats (``--repeats``), after one warm-up call,
with BLAS and torch on ``--threads`` threads (default 1; JAX keeps its own
thread pool).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from numba import njit

import chainprod as cp


@njit(cache=True)
def _plain_forward(a, X, h0):
    T, N, d = X.shape
    H = np.empty_like(X)
    h = h0.copy()
    for t in range(T):
        for n in range(N):
            for i in range(d):
                h[n, i] = a[i] * h[n, i] + X[t, n, i]
                H[t, n, i] = h[n, i]
    return H


@njit(cache=True)
def _plain_backward(a, G, H, h0):
    T, N, d = G.shape
    L = np.empty_like(G)
    lam = np.zeros((N, d))
    da = np.zeros(d)
    for t in range(T - 1, -1, -1):
        hp = H[t - 1] if t > 0 else h0  # h_{t-1}, chosen once per step so that the inner loop vectorises
        for n in range(N):
            for i in range(d):
                lam[n, i] = a[i] * lam[n, i] + G[t, n, i]
                L[t, n, i] = lam[n, i]
                da[i] += lam[n, i] * hp[n, i]
    return L, da


def plain(a, B, C, D, u, target):
    """What a user would write: BLAS for the projections, two ``@njit`` loops for the recurrences."""
    T, N, d_in = u.shape
    u2 = u.reshape(T * N, d_in)
    h0 = np.zeros((N, a.shape[0]))
    H = _plain_forward(a, (u2 @ B.T).reshape(T, N, -1), h0)
    H2 = H.reshape(T * N, -1)
    y = H2 @ C.T + u2 @ D.T
    diff = y - target.reshape(T * N, -1)
    value = float(np.mean(diff * diff))
    g = diff * (2.0 / diff.size)
    L, da = _plain_backward(a, (g @ C).reshape(T, N, -1), H, h0)
    L2 = L.reshape(T * N, -1)
    return value, {"a": da, "B": L2.T @ u2, "C": g.T @ H2, "D": g.T @ u2}


def torch_step(params, u, target):
    import torch

    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    ut, h = torch.from_numpy(u), torch.zeros(u.shape[1], params["a"].shape[0], dtype=torch.float64)
    hs = []
    # unbind, not X[t]: indexing's backward writes a zero gradient of X's full size at every step (O(T^2))
    for x in (ut @ P["B"].T).unbind(0):
        h = P["a"] * h + x
        hs.append(h)
    y = torch.stack(hs) @ P["C"].T + ut @ P["D"].T
    loss = torch.nn.functional.mse_loss(y, torch.from_numpy(target))
    loss.backward()
    return loss.item(), {k: v.grad.numpy() for k, v in P.items()}


def jax_step():
    """``jit(value_and_grad)`` of the layer written with ``lax.scan``."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def loss(a, B, C, D, u, target):
        def step(h, x):
            h = a * h + x
            return h, h

        _, H = jax.lax.scan(step, jnp.zeros((u.shape[1], a.shape[0]), u.dtype), u @ B.T)
        y = H @ C.T + u @ D.T
        return jnp.mean((y - target) ** 2)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    def run(params, u, target):
        v, g = f(params["a"], params["B"], params["C"], params["D"], u, target)
        jax.block_until_ready(g)
        return float(v), dict(zip("aBCD", (np.asarray(x) for x in g)))

    return run


def median_time(f, repeats):
    f()  # warm-up: compiles, binds plans, faults the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def problem(T, N, d, seed=0):
    layer = cp.DiagonalRecurrence.random(d, d, d, seed=seed)
    rng = np.random.default_rng(seed + 1)
    return layer, rng.standard_normal((T, N, d)), rng.standard_normal((T, N, d))


def check(got, want, what):
    for k in want:
        err = np.abs(got[k] - want[k]).max() / (np.abs(want[k]).max() + 1e-300)
        if err > 1e-8:
            raise AssertionError(f"{what}: gradient {k} differs from the plain loop's by {err:.2e} relative")


def target(T, d, repeats):
    layer, u, y = problem(T, 1, d)
    p = layer.params
    a, B, C, D = p["a"], p["B"], p["C"], p["D"]
    check(cp.value_and_grad(layer, u, y, method="backprop")[1], plain(a, B, C, D, u, y)[1], "chainprod")
    t_cp = median_time(lambda: cp.value_and_grad(layer, u, y, method="backprop"), repeats)
    t_plain = median_time(lambda: plain(a, B, C, D, u, y), repeats)
    print(f"\n## Target: T = {T}, d = d_in = d_out = {d}, N = 1, float64, forward + backward\n")
    print("| chainprod backprop (s) | plain @njit loop (s) | ratio |")
    print("|---|---|---|")
    print(f"| {t_cp:.3f} | {t_plain:.3f} | {t_cp / t_plain:.2f}x |")


def cells(layer, u, y, jax_run, *, torch, scans):
    """The runs of one cell, by column name."""
    p = layer.params
    runs = {"chainprod": lambda: cp.value_and_grad(layer, u, y, method="backprop"),
            "plain njit": lambda: plain(p["a"], p["B"], p["C"], p["D"], u, y)}
    if torch:
        runs["torch"] = lambda: torch_step(p, u, y)
    runs["jax"] = lambda: jax_run(p, u, y)
    if scans:
        runs["brent_kung"] = lambda: cp.value_and_grad(layer, u, y, method="brent_kung")
        runs["chunked"] = lambda: cp.value_and_grad(layer, u, y, method="chunked")
        runs["brent_kung 2 threads"] = lambda: cp.value_and_grad(layer, u, y, method="brent_kung",
                                                                   backend="threads", workers=2)
    return runs


def grid(lengths, batches, d, repeats, scan_cap, torch_cap):
    jax_run = jax_step()
    cols = ["chainprod", "plain njit", "torch", "jax", "brent_kung", "chunked", "brent_kung 2 threads"]
    print(f"\n## Grid: d = d_in = d_out = {d}, float64, seconds per forward + backward (median of {repeats})\n")
    print("| T | N | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for T in lengths:
        for N in batches:
            layer, u, y = problem(T, N, d)
            p = layer.params
            want = plain(p["a"], p["B"], p["C"], p["D"], u, y)[1]
            runs = cells(layer, u, y, jax_run, torch=T <= torch_cap, scans=T * N <= scan_cap)
            row = []
            for c in cols:
                if c not in runs:
                    row.append("—")
                    continue
                out = runs[c]()
                check(out[1], want, c)
                row.append(f"{median_time(runs[c], repeats):.4f}")
            print(f"| {T} | {N} | " + " | ".join(row) + " |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 10^5 target, T in 10^3, 10^4: under a minute")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per cell (median); default 5, quick 3")
    ap.add_argument("--width", type=int, default=64, help="d = d_in = d_out (default 64)")
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS and torch threads for every row (default 1: on a shared machine, BLAS threads that "
                         "spin while others run make timings meaningless)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        run(args, repeats)


def run(args, repeats):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_ssm on {platform.machine()}, {os.cpu_count()} cores, {args.threads} BLAS/torch thread(s), "
          f"load average {load:.2f} at start"
          f"{' (shared: under load)' if load > 0.5 else ''}")
    target(10 ** 5 if args.quick else 10 ** 6, args.width, repeats)
    lengths = [10 ** 3, 10 ** 4] if args.quick else [10 ** 3, 10 ** 4, 10 ** 5]
    grid(lengths, [1, 16], args.width, repeats, scan_cap=10 ** 4 if args.quick else 2 * 10 ** 5,
         torch_cap=10 ** 3 if args.quick else 10 ** 4)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.2f} at the end")


if __name__ == "__main__":
    main()
