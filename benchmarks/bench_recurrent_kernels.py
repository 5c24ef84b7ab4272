"""One training step of an RNN / GRU / LSTM layer: chainprod's compiled backprop through time against torch and JAX.

A script (not a pytest-benchmark suite)::

    python3 benchmarks/bench_recurrent_kernels.py --quick        # H in 8, 20; N in 1, 16; T = 1000; 1 thread
    python3 benchmarks/bench_recurrent_kernels.py --threads 1 2  # also H = 64, every cell, 1 and 2 threads

Every row times the loss ``mse_loss(output, y)`` and its gradient with
respect to every parameter, float32 by default, on the same weights, input
``u`` ``(T, N, H)`` (``input_size = H``) and targets ``y``:

``chainprod``
    ``cp.value_and_grad(model, u, y, loss="mse", method="backprop")`` on
    ``cp.RNN / GRU / LSTM``: the compiled kernels of
    :mod:`chainprod.kernels.recurrent_numba` and the model's numpy around
    them (the input projection, ``dW_ih``, the loss).
``kernels``
    The kernels alone: ``forward`` then ``backward`` on a ready input
    projection ``X`` (what the model adds around them is the difference).
``torch``
    ``torch.nn.RNN / GRU / LSTM`` forward, ``mse_loss(...).backward()``
    (``torch.set_num_threads`` = the thread count).
``jax``
    ``jax.jit(jax.value_and_grad(loss))`` of a ``lax.scan`` of the same
    cell (the input projection before the scan), on XLA's own thread pool.
``floor``
    A lower bound, competing with no row: the step's multiply-adds with a
    weight matrix as five large BLAS products into preallocated arrays
    (numpy's ``matmul``, BLAS on ``P`` threads): the input projection
    ``u W_ih^T``, every step's ``h_{t-1} W_hh^T`` and ``dG_t W_hh`` as one
    ``(T N)``-row product each (one large product runs at least as fast as
    ``T`` small ones of the same total), ``dW_hh = dG^T h_prev`` and
    ``dW_ih = dG^T u``. No activation, no bias, no loss: any implementation
    of the step computes at least these. ``floor/`` is torch's time over
    it: where it is under 2, no code can be twice as fast as torch.

Threads: each ``--threads`` count ``P`` sets numba's threads
(``numba.set_num_threads``), BLAS's (threadpoolctl) and torch's to ``P``.
Timing: every call is run once to compile, then ``--rounds`` rounds each
call every row ``--calls`` times in turn (A, B, C, A, B, C, ...); a row's
time is its fastest call. Interleaving and the minimum are for shared
machines: other jobs slow some calls, and each row meets them alike. The
load average is printed: say "under load" with figures from a loaded
machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")


def chainprod_step(prob, y):
    import chainprod as cp

    return lambda: cp.value_and_grad(prob.model, prob.u, y, loss="mse", method="backprop")


def kernels_step(prob):
    """``forward`` then ``backward`` of the compiled kernels on the model's own input projection."""
    from chainprod.kernels import recurrent_numba as kern

    p = {k: np.asarray(v) for k, v in prob.model.params.items()}
    T, N, H = prob.u.shape
    X = (prob.u.reshape(T * N, H) @ p["weight_ih_l0"].T + p["bias_ih_l0"]).reshape(T, N, -1)
    W, b = p["weight_hh_l0"], p["bias_hh_l0"]
    h0 = np.zeros((N, H), X.dtype)
    c0 = h0 if prob.cell == "lstm" else None

    def step():
        Hs, Z = kern.forward(prob.cell, X, W, b, h0, c0)
        return kern.backward(prob.cell, X, W, b, h0, c0, Hs, Z, Hs)

    return step


def floor_step(prob):
    """The five weight products of one training step as large BLAS products (the ``floor`` column)."""
    T, N, d_in = prob.u.shape
    H = prob.H
    GH = prob.model.params["weight_hh_l0"].shape[0]
    rng = np.random.default_rng(2)
    dtype = prob.u.dtype
    u = np.ascontiguousarray(prob.u.reshape(T * N, d_in))
    W_ih = np.asarray(prob.model.params["weight_ih_l0"])
    W_hh = np.asarray(prob.model.params["weight_hh_l0"])
    Hs = rng.standard_normal((T * N, H)).astype(dtype)
    dG = rng.standard_normal((T * N, GH)).astype(dtype)
    X, R, dH = np.empty((T * N, GH), dtype), np.empty((T * N, GH), dtype), np.empty((T * N, H), dtype)
    dW_hh, dW_ih = np.empty((GH, H), dtype), np.empty((GH, d_in), dtype)

    def step():
        np.matmul(u, W_ih.T, out=X)
        np.matmul(Hs, W_hh.T, out=R)
        np.matmul(dG, W_hh, out=dH)
        np.matmul(dG.T, Hs, out=dW_hh)
        np.matmul(dG.T, u, out=dW_ih)

    return step


def torch_step(prob, y):
    import torch

    mod, u = prob.torch()
    yt = torch.from_numpy(y)
    params = list(mod.parameters())

    def step():
        for p in params:
            p.grad = None
        out, _ = mod(u)
        loss = torch.nn.functional.mse_loss(out, yt)
        loss.backward()
        return float(loss.detach())

    return step


def jax_step(prob, y):
    import jax
    import jax.numpy as jnp

    from chainprod.bench_sequence_models import jax_states

    H, cell = prob.H, prob.cell
    params = {k: jnp.asarray(np.asarray(v)) for k, v in prob.model.params.items()}
    u, yj = jnp.asarray(prob.u), jnp.asarray(y)

    def loss(p, u):
        return jnp.mean((jax_states(cell, H, p, u) - yj) ** 2)

    f = jax.jit(jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(f(params, u))


def interleaved_min(calls, rounds, repeats):
    """The fastest of ``rounds * repeats`` timed calls of each, taken in turn; ``{name: seconds}``."""
    for call in calls.values():
        call()  # compiles: numba's cache, XLA, torch's first call
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def set_threads(P):
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(P, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(P)
    try:
        import torch

        torch.set_num_threads(P)
    except ImportError:
        pass


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="H in 8, 20; N in 1, 16; T = 1000; one thread")
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--hidden", nargs="+", type=int, default=[8, 20, 64])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--steps", nargs="+", type=int, default=[1000])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=3, help="calls of a row in a row, per round")
    ap.add_argument("--skip", nargs="*", default=[], choices=["kernels", "torch", "jax", "floor"])
    args = ap.parse_args(argv)
    if "torch" not in args.skip:
        from chainprod._timing_steps import load_torch_first

        load_torch_first()  # before numba's threads start (set_threads): torch's P = 2 steps were 8x slower
    if args.quick:
        args.hidden, args.steps, args.threads = [8, 20], [1000], [1]
    dtype = np.dtype(args.dtype)
    if "jax" not in args.skip and dtype == np.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    from chainprod.bench_sequence_models import SequenceProblem

    print(f"# {args.dtype}, loss mse, fastest of {args.rounds} x {args.calls} interleaved calls, ms; ratios = "
          f"peer / chainprod (above 1: chainprod faster); load average {os.getloadavg()[0]:.2f} at start")
    names = ["chainprod"] + [n for n in ("kernels", "torch", "jax", "floor") if n not in args.skip]
    head = f"{'cell':9} {'H':>3} {'N':>3} {'T':>6} {'P':>2} | " + " ".join(f"{n:>9}" for n in names) + " | " + \
        " ".join(f"{n + '/':>7}" for n in names[1:] if n != "kernels") + \
        (" torch/floor" if {"torch", "floor"} <= set(names) else "")
    print(head)
    print("-" * len(head))
    for P in args.threads:
        set_threads(P)
        for cell in args.cells:
            for H in args.hidden:
                for N in args.batch:
                    for T in args.steps:
                        prob = SequenceProblem(cell, T, H, N, dtype)
                        y = np.random.default_rng(1).standard_normal((T, N, H)).astype(dtype)
                        calls = {"chainprod": chainprod_step(prob, y)}
                        if "kernels" in names:
                            calls["kernels"] = kernels_step(prob)
                        if "torch" in names:
                            calls["torch"] = torch_step(prob, y)
                        if "jax" in names:
                            calls["jax"] = jax_step(prob, y)
                        if "floor" in names:
                            calls["floor"] = floor_step(prob)
                        ms = {k: 1e3 * v for k, v in interleaved_min(calls, args.rounds, args.calls).items()}
                        cols = " ".join(f"{ms[n]:9.3f}" for n in names)
                        ratios = " ".join(f"{ms[n] / ms['chainprod']:7.2f}" for n in names[1:] if n != "kernels")
                        if "torch" in ms and "floor" in ms:
                            ratios += f" {ms['torch'] / ms['floor']:11.2f}"
                        print(f"{cell:9} {H:3d} {N:3d} {T:6d} {P:2d} | {cols} | {ratios}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
