"""Backprop through time of one RNN / GRU / LSTM layer: chainprod's recurrent kernels against torch and JAX.

A script (not a pytest-benchmark suite)::

    python3 benchmarks/bench_recurrent_kernels.py --quick     # under a minute: H = 20, T = 1000
    python3 benchmarks/bench_recurrent_kernels.py             # H in 8, 20, 64; N in 1, 16; T in 1000, 10000

Every row times the whole gradient of ``loss = sum of all outputs`` with
respect to every parameter and the input sequence ``u`` ``(T, N, d_in)``:

``numba`` / ``numpy``
    chainprod's pipeline, written out here: the input projection
    ``X = u W_ih^T + b_ih`` (one BLAS product), the kernel set's
    ``forward``, its ``backward``, then ``dW_ih = dX^T u``,
    ``db_ih = sum dX``, ``du = dX W_ih`` (numpy). ``numba`` is
    :mod:`chainprod.kernels.recurrent_numba`, ``numpy`` the reference
    :mod:`chainprod.kernels.recurrent_numpy` (``n/a`` where it is missing).
``torch``
    ``torch.nn.RNN / GRU / LSTM`` with the same weights: forward, then
    ``output.sum().backward()`` (the input requires grad).
``jax``
    ``jax.jit(jax.value_and_grad(loss))`` of a ``lax.scan`` of the same cell
    (the input projection before the scan), gradients for the parameters
    and the input.

Every timing is the median of ``--repeats`` calls after one warm-up call
(which compiles). torch runs on ``--threads`` threads (2 by default), JAX
on its own thread pool (all cores), the ``numba`` row's kernels on one
thread and its numpy products on ``--numba-threads`` BLAS threads (1 by
default: on a loaded 2-core machine a 2-thread BLAS product of a few
million multiply-adds was measured stalling for 7-8 ms, once 300 ms, where
it takes 0.1-1 ms on one thread). The load average is printed: on a shared
machine, say "under load" with the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}


def problem(cell, H, N, T, d_in, dtype, seed=0):
    """Random ``u``, torch-initialised-like weights and zero initial states."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    s = 1.0 / np.sqrt(H)
    p = {"u": rng.standard_normal((T, N, d_in)),
         "W_ih": rng.uniform(-s, s, (G * H, d_in)), "b_ih": rng.uniform(-s, s, G * H),
         "W_hh": rng.uniform(-s, s, (G * H, H)), "b_hh": rng.uniform(-s, s, G * H),
         "h0": np.zeros((N, H))}
    p["c0"] = np.zeros((N, H)) if cell == "lstm" else None
    return {k: (None if v is None else np.ascontiguousarray(v, dtype)) for k, v in p.items()}


def chainprod_bptt(kern, cell, p):
    """The loss and every gradient by the kernel set ``kern`` (forward, backward) and numpy glue."""
    u, W_ih, b_ih, W_hh, b_hh, h0, c0 = (p[k] for k in ("u", "W_ih", "b_ih", "W_hh", "b_hh", "h0", "c0"))
    T, N, d_in = u.shape
    u2 = u.reshape(T * N, d_in)
    X = u2 @ W_ih.T
    X += b_ih
    X = X.reshape(T, N, -1)
    Hs, Z = kern.forward(cell, X, W_hh, b_hh, h0, c0)
    loss = Hs.sum()
    dX, dW_hh, db_hh, dh0, dc0 = kern.backward(cell, X, W_hh, b_hh, h0, c0, Hs, Z, np.ones_like(Hs))
    dX2 = dX.reshape(T * N, -1)
    grads = {"W_ih": dX2.T @ u2, "b_ih": dX2.sum(0), "W_hh": dW_hh, "b_hh": db_hh, "u": (dX2 @ W_ih).reshape(u.shape),
             "h0": dh0, "c0": dc0}
    return loss, grads


def torch_runner(cell, p):
    import torch

    T, N, d_in = p["u"].shape
    H = p["W_hh"].shape[1]
    dtype = torch.float64 if p["u"].dtype == np.float64 else torch.float32
    if cell in ("rnn_tanh", "rnn_relu"):
        mod = torch.nn.RNN(d_in, H, nonlinearity=cell[4:])
    else:
        mod = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](d_in, H)
    mod = mod.to(dtype)
    with torch.no_grad():
        for name in ("W_ih", "b_ih", "W_hh", "b_hh"):
            tname = {"W_ih": "weight_ih_l0", "b_ih": "bias_ih_l0", "W_hh": "weight_hh_l0", "b_hh": "bias_hh_l0"}[name]
            getattr(mod, tname).copy_(torch.from_numpy(p[name]))
    u = torch.from_numpy(p["u"]).requires_grad_(True)

    def run():
        mod.zero_grad(set_to_none=True)
        u.grad = None
        out, _ = mod(u)
        loss = out.sum()
        loss.backward()
        return float(loss.detach())

    return run


def jax_runner(cell, p):
    import jax
    import jax.numpy as jnp
    from jax import lax

    H = p["W_hh"].shape[1]

    def step(W_hh, b_hh):
        def rnn(h, x):
            a = x + h @ W_hh.T + b_hh
            h = jnp.tanh(a) if cell == "rnn_tanh" else jnp.maximum(a, 0)
            return h, h

        def gru(h, x):
            gh = h @ W_hh.T + b_hh
            r = jax.nn.sigmoid(x[:, :H] + gh[:, :H])
            z = jax.nn.sigmoid(x[:, H:2 * H] + gh[:, H:2 * H])
            n = jnp.tanh(x[:, 2 * H:] + r * gh[:, 2 * H:])
            h = (1 - z) * n + z * h
            return h, h

        def lstm(hc, x):
            h, c = hc
            g = x + h @ W_hh.T + b_hh
            i, f, o = (jax.nn.sigmoid(g[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
            c = f * c + i * jnp.tanh(g[:, 2 * H:3 * H])
            h = o * jnp.tanh(c)
            return (h, c), h

        return {"gru": gru, "lstm": lstm}.get(cell, rnn)

    def loss(params, u, h0, c0):
        W_ih, b_ih, W_hh, b_hh = params
        X = u @ W_ih.T + b_ih
        carry = (h0, c0) if cell == "lstm" else h0
        _, hs = lax.scan(step(W_hh, b_hh), carry, X)
        return hs.sum()

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    params = tuple(jnp.asarray(p[k]) for k in ("W_ih", "b_ih", "W_hh", "b_hh"))
    u, h0 = jnp.asarray(p["u"]), jnp.asarray(p["h0"])
    c0 = jnp.asarray(p["c0"]) if cell == "lstm" else h0

    def run():
        value, grads = f(params, u, h0, c0)
        jax.block_until_ready(grads)
        return float(value)

    return run


def median_seconds(run, repeats):
    run()  # warm-up: compiles (numba's cache, XLA, torch's first call)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="H = 20, N in 1 and 16, T = 1000 (under a minute)")
    ap.add_argument("--cells", nargs="+", default=list(GATES), choices=list(GATES))
    ap.add_argument("--hidden", nargs="+", type=int, default=[8, 20, 64])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", nargs="+", type=int, default=[1000, 10000])
    ap.add_argument("--d-in", type=int, default=0, help="input width (0: the hidden size)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch's threads (and numpy's BLAS's for the numpy row)")
    ap.add_argument("--numba-threads", type=int, default=1,
                    help="numpy's BLAS threads for the numba row's products (its kernels run on one)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["numpy", "torch", "jax"])
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.repeats = [20], [1000], min(args.repeats, 3)
    dtype = np.dtype(args.dtype)

    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    from chainprod.kernels import recurrent_numba

    kernels = {"numba": recurrent_numba}
    try:
        from chainprod.kernels import recurrent_numpy

        kernels["numpy"] = recurrent_numpy
    except ImportError:
        kernels["numpy"] = None
    have = {name: name not in args.skip for name in ("numpy", "torch", "jax")}
    if have["torch"]:
        import torch

        torch.set_num_threads(args.threads)
    if have["jax"] and dtype == np.float64:
        import jax

        jax.config.update("jax_enable_x64", True)

    print(f"# {args.dtype}, median of {args.repeats}, threads: torch {args.threads}, numba row's BLAS "
          f"{args.numba_threads}, jax its own pool; load average "
          f"{os.getloadavg()[0]:.2f} at start; times in ms; ratios = baseline / numba")
    head = f"{'cell':9} {'H':>3} {'N':>3} {'T':>6} | {'numba':>8} {'numpy':>8} {'torch':>8} {'jax':>8} | " \
           f"{'numpy/':>7} {'torch/':>7} {'jax/':>7}"
    print(head)
    print("-" * len(head))
    for cell in args.cells:
        for H in args.hidden:
            for N in args.batch:
                for T in args.steps:
                    p = problem(cell, H, N, T, args.d_in or H, dtype)
                    with threadpool_limits(args.numba_threads, user_api="blas"):
                        ms = {"numba": median_seconds(functools.partial(chainprod_bptt, recurrent_numba, cell, p),
                                                      args.repeats)}
                    if have["numpy"] and kernels["numpy"] is not None:
                        ms["numpy"] = median_seconds(functools.partial(chainprod_bptt, kernels["numpy"], cell, p),
                                                     args.repeats)
                    if have["torch"]:
                        ms["torch"] = median_seconds(torch_runner(cell, p), args.repeats)
                    if have["jax"]:
                        ms["jax"] = median_seconds(jax_runner(cell, p), args.repeats)
                    ms = {k: 1e3 * v for k, v in ms.items()}
                    cols = " ".join(f"{ms[k]:8.2f}" if k in ms else f"{'n/a':>8}"
                                    for k in ("numba", "numpy", "torch", "jax"))
                    ratios = " ".join(f"{ms[k] / ms['numba']:7.1f}" if k in ms else f"{'n/a':>7}"
                                      for k in ("numpy", "torch", "jax"))
                    print(f"{cell:9} {H:3d} {N:3d} {T:6d} | {cols} | {ratios}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
