"""Newton forward passes (DEER, quasi-DEER, ELK, quasi-ELK) against the sequential pass.

A script (not a pytest-benchmark suite)::

    python3 benchmarks/bench_newton.py --quick     # under a minute on 2 cores
    python3 benchmarks/bench_newton.py             # L up to 4096, T = 1000, widths 8, 32, 64

It prints six markdown tables:

1. **iterations against L**: contractive tanh chains (``w -> w`` layers,
   weights ``0.5 randn / sqrt(w)``), every method, with the *work ratio*:
   the Newton pass's flops over the sequential pass's (below);
2. **iterations against contractivity**: the same chain with the weights
   scaled, and its largest Lyapunov exponent estimated along the sequential
   trajectory (:func:`chainprod.newton.model_lyapunov`, per layer);
3. **times on 1 and 2 cores**: the sequential pass (compiled kernels) and
   every Newton method on the threads backend with ``workers = P`` and
   numba's and BLAS's threads limited to ``P``;
4. **the predicted crossover in workers P**: per method, cell (tanh chain,
   RNN, GRU) and width, the smallest ``P = 2^k`` at which the simulator
   (:func:`chainprod.bench_sequences.crossover_workers`, which scales
   :func:`chainprod.cost.simulate` to one measurement) predicts the Newton
   pass beating the sequential pass: ``iterations x scan(P) < sequential``,
   with the scan's level set by the measured time of one iteration at P = 1;
   dense blocks for DEER/ELK, diagonal blocks for the quasi methods;
5. **the divergent case**: a chaotic tanh RNN (positive Lyapunov exponent)
   on which DEER overflows and ELK's damping converges;
6. **compiled against numpy** (``--section compiled`` prints it alone): each
   method's pass and time per iteration with ``kernels="numpy"`` (the
   problem's numpy rules and :func:`chainprod.linear_recurrence` on the
   executors) and ``kernels="numba"`` (:mod:`chainprod.newton_steps`: one
   compiled linearisation and one compiled affine scan per iteration),
   beside the sequential compiled pass; ``"vectorized"`` at ``P = 1``,
   ``"threads"`` with ``workers = 2`` at ``P = 2``. The runs are
   interleaved (every variant once per round) and the minimum kept, since
   on a shared machine every other run is the same work plus interference.

Tables 1-5 run on the default kernels (compiled).

Work model (flops, multiply-adds counted as 2): the sequential pass is ``n``
steps of ``f`` (``2 N G S^2``, ``G`` gates; the input projections, the same
in both, left out). One Newton iteration evaluates every ``f`` (the same
flops), forms the Jacobians (``N G S^2`` dense, ``N G S`` diagonal) and runs
the affine scan of ``n + 1`` blocks, counted by
:func:`chainprod.cost.round_stats`: an interior op composes two affine maps
(``2 S^3 + 2 S^2`` per lane dense, ``4 S`` diagonal), a thin op applies one
to a state (``2 S^2``, ``2 S``). Timings are medians of ``--repeats`` runs
after a warm-up; the load average is printed (a shared machine: say "under
load").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import chainprod as cp  # noqa: E402
from chainprod import cost  # noqa: E402
from chainprod._timing import median_time  # noqa: E402
from chainprod._timing_steps import thread_limit  # noqa: E402
from chainprod.bench_sequences import crossover_workers  # noqa: E402
from chainprod.errors import ConvergenceError, NonFiniteError  # noqa: E402
from chainprod.newton import model_lyapunov  # noqa: E402

METHODS = ("deer", "quasi_deer", "elk", "quasi_elk")
GATES = {"chain": 1, "rnn": 1, "gru": 3}


def tanh_chain(L, w, scale=0.5, seed=0):
    """``L`` tanh layers ``w -> w`` with weights ``scale * randn / sqrt(w)``, biases ``0.1 randn``."""
    rng = np.random.default_rng(seed)
    return cp.Chain([cp.Dense(scale * rng.standard_normal((w, w)) / np.sqrt(w), 0.1 * rng.standard_normal(w),
                              "tanh") for _ in range(L)])


def model_for(cell, n, w, N, seed=0):
    """``(model, x)``: a tanh chain of ``n`` layers, or a one-layer RNN / GRU over ``n`` steps (hidden ``w``)."""
    rng = np.random.default_rng(seed)
    if cell == "chain":
        return tanh_chain(n, w, seed=seed), rng.standard_normal((N, w))
    model = (cp.RNN if cell == "rnn" else cp.GRU)(w, w, seed=seed)
    return model, rng.standard_normal((n, N, w))


def run(model, x, method, **kw):
    """``(trace, seconds)`` of one Newton forward pass, or ``(reason, seconds)`` where it failed."""
    t0 = time.perf_counter()
    try:
        _, trace = cp.forward(model, x, method=method, return_trace=True, **kw)
    except ConvergenceError as e:
        return f"not converged ({e.iterations} it)", time.perf_counter() - t0
    except NonFiniteError:
        return "overflow", time.perf_counter() - t0
    return trace, time.perf_counter() - t0


def sequential(model, x):
    return cp.forward(model, x)


def seq_flops(cell, n, N, S):
    return n * 2 * N * GATES[cell] * S * S


def iter_flops(cell, method, n, N, S, schedule):
    quasi = method.startswith("quasi")
    jac = N * GATES[cell] * (S if quasi else S * S)
    stats = cost.round_stats(schedule if schedule in ("sklansky", "brent_kung", "hillis_steele") else "sequential",
                             n + 1)
    thin, inner = sum(s[0] for s in stats), sum(s[1] for s in stats)
    per_thin, per_inner = (2 * S, 4 * S) if quasi else (2 * S * S, 2 * S ** 3 + 2 * S * S)
    return seq_flops(cell, n, N, S) + n * jac + N * (thin * per_thin + inner * per_inner)


def table(title, head, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def iterations_vs_L(Ls, w, N, schedule):
    rows = []
    for L in Ls:
        chain, x = model_for("chain", L, w, N)
        row = [L]
        for m in METHODS:
            tr, _ = run(chain, x, m, schedule=schedule)
            if isinstance(tr, str):
                row += [tr, "-"]
            else:
                ratio = tr.iterations * iter_flops("chain", m, L, N, w, schedule) / seq_flops("chain", L, N, w)
                row += [tr.iterations, f"{ratio:.0f}"]
        rows.append(row)
    head = ["L"] + [c for m in METHODS for c in (f"{m} it", f"{m} work")]
    table(f"Iterations and work ratio against L (tanh chain, w = {w}, N = {N}, schedule {schedule}, tol 1e-10)",
          head, rows)


def iterations_vs_contractivity(L, w, N, scales, schedule):
    rows = []
    for s in scales:
        chain = tanh_chain(L, w, scale=s)
        x = np.random.default_rng(1).standard_normal((N, w))
        row = [s, f"{model_lyapunov(chain, x):+.3f}"]
        for m in METHODS:
            tr, _ = run(chain, x, m, schedule=schedule)
            row.append(tr if isinstance(tr, str) else tr.iterations)
        rows.append(row)
    table(f"Iterations against contractivity (tanh chain, L = {L}, w = {w}, N = {N}; lambda: largest Lyapunov "
          "exponent per layer)", ["weight scale", "lambda"] + list(METHODS), rows)


def interleaved_minima(fns, repeats):
    """``{key: best seconds}`` of each ``fns[key]()`` over ``repeats`` rounds that run every function once."""
    for fn in fns.values():
        fn()  # warm-up: compiles, binds plans
    best = dict.fromkeys(fns, np.inf)
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def compiled_vs_numpy(cases, N, repeats, schedule):
    rows = []
    for L, w in cases:
        chain, x = model_for("chain", L, w, N)
        for P in (1, 2):
            backend = "vectorized" if P == 1 else "threads"
            with thread_limit(P):
                fns, its = {"seq": lambda chain=chain, x=x: sequential(chain, x)}, {}
                for m in METHODS:
                    tr, _ = run(chain, x, m, schedule=schedule, backend=backend, workers=P)
                    its[m] = tr if isinstance(tr, str) else tr.iterations
                    for k in ("numpy", "numba"):
                        fns[m, k] = lambda chain=chain, x=x, m=m, k=k, backend=backend, P=P: cp.forward(
                            chain, x, method=m, schedule=schedule, backend=backend, workers=P, kernels=k)
                best = interleaved_minima(fns, repeats)
            ts = best["seq"]
            for m in METHODS:
                tn, tc, it = best[m, "numpy"], best[m, "numba"], its[m]
                per = [f"{t / it * 1e3:.2f}" if isinstance(it, int) and it else "-" for t in (tn, tc)]
                rows.append([L, w, P, f"{ts * 1e3:.2f}", m, it, f"{tn * 1e3:.1f}", f"{tc * 1e3:.1f}", *per,
                             f"{tn / tc:.1f}x", f"{tc / ts:.0f}x"])
    table(f"Compiled Newton iterations against numpy (tanh chain, N = {N}, schedule {schedule}; P = 1: vectorized, "
          f"P = 2: threads, workers = 2; minima of {repeats} interleaved runs, ms)",
          ["L", "w", "P", "sequential (compiled)", "method", "iterations", "numpy pass", "compiled pass",
           "numpy / iteration", "compiled / iteration", "numpy / compiled", "compiled / sequential"], rows)


def ideal_workers(sim_cell, n, w, N, seq_seconds, iter_seconds, max_log2=16):
    """As :func:`crossover_workers`, on the simulator's ``"ideal"`` backend (no round or task latency)."""
    S = 2 * w if sim_cell == "lstm" else w
    kw = {"structure": "diagonal" if sim_cell == "diag_recurrence" else "dense", "batch": N, "backend": "ideal"}
    factor = iter_seconds / cost.simulate(n + 1, S, 1, methods=("sklansky",), **kw)["scan"]
    for k in range(max_log2 + 1):
        if factor * cost.simulate(n + 1, S, 2 ** k, **kw)["scan"] < seq_seconds:
            return 2 ** k
    return None


def timed(fn, repeats):
    fn()  # warm-up: compiles, fills caches
    return median_time(fn, repeats)


def times(cases, repeats, schedule):
    rows = []
    for cell, n, w, N in cases:
        model, x = model_for(cell, n, w, N)
        for P in (1, 2):
            with thread_limit(P):
                ts = timed(lambda model=model, x=x: sequential(model, x), repeats)
                row = [cell, n, w, N, P, f"{ts * 1e3:.2f}"]
                for m in METHODS:
                    tr, _ = run(model, x, m, schedule=schedule)
                    t = timed(lambda model=model, x=x, m=m, P=P: cp.forward(
                        model, x, method=m, schedule=schedule, backend="threads", workers=P), repeats)
                    its = tr.iterations if not isinstance(tr, str) else tr
                    row.append(f"{t * 1e3:.1f} ({its})")
                rows.append(row)
    table(f"Forward-pass times in ms on 1 and 2 cores (sequential: compiled kernels; Newton: threads backend, "
          f"workers = P, schedule {schedule}; iterations in brackets)",
          ["cell", "L or T", "width", "N", "P", "sequential"] + list(METHODS), rows)


def crossover(cells, widths, n, N, repeats, schedule):
    rows = []
    for cell in cells:
        for w in widths:
            model, x = model_for(cell, n, w, N)
            with thread_limit(1):
                ts = timed(lambda model=model, x=x: sequential(model, x), repeats)
                row = [cell, w, f"{ts * 1e3:.2f}"]
                for m in METHODS:
                    tr, _ = run(model, x, m, schedule=schedule)
                    if isinstance(tr, str):
                        row.append(tr)
                        continue
                    t = timed(lambda model=model, x=x, m=m: cp.forward(
                        model, x, method=m, schedule=schedule, backend="threads", workers=1), repeats)
                    sim = "diag_recurrence" if m.startswith("quasi") else ("gru" if cell == "gru" else "rnn_tanh")
                    it = tr.iterations
                    c = crossover_workers(sim, n, w, N, bptt_seconds=ts / it, scan_seconds=t / it)
                    threads = c["P"] or f"none ({c['best_scan'] * it / ts:.0f}x at P={c['best_P']})"
                    row.append(f"{t / ts:.0f}x; {threads}; {ideal_workers(sim, n, w, N, ts / it, t / it) or 'none'}")
                rows.append(row)
    table(f"Predicted crossover in workers P (L or T = {n}, N = {N}). Per method: the measured Newton time at P = 1 "
          "over the sequential pass's; the smallest P = 2^k <= 65536 at which the simulator predicts Newton "
          "faster on the threads backend (else its best ratio and P); the same without latencies (backend "
          "'ideal')", ["cell", "width", "sequential ms"] + list(METHODS), rows)


def divergent(T, H, gain):
    rng = np.random.default_rng(1)
    rnn = cp.RNN.from_params({"weight_ih_l0": rng.standard_normal((H, 2)),
                              "weight_hh_l0": gain * rng.standard_normal((H, H)) / np.sqrt(H)})
    x, h0 = 0.1 * rng.standard_normal((T, 1, 2)), np.full((1, H), 0.5)
    lam = model_lyapunov(rnn, x, h0=h0)
    rho = float(np.log(np.max(np.abs(np.linalg.eigvals(rnn.params["weight_hh_l0"])))))
    rows = []
    for m in METHODS:
        tr, t = run(rnn, x, m, h0=h0, schedule="sequential", max_iter=2000)
        rows.append([m, tr if isinstance(tr, str) else "converged", "-" if isinstance(tr, str) else tr.iterations,
                     "-" if isinstance(tr, str) else f"{max(tr.damping):.3g}", f"{t:.2f}"])
    table(f"The divergent case: tanh RNN, T = {T}, H = {H}, recurrent gain {gain}; lambda = {lam:+.3f} per step "
          f"along the trajectory, but log rho(W_hh) = {rho:+.3f}: the Jacobians at the zero initial guess expand",
          ["method", "result", "iterations", "max damping", "seconds"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--schedule", default="sklansky")
    ap.add_argument("--section", choices=("all", "compiled"), default="all",
                    help="'compiled': only table 6, compiled against numpy")
    a = ap.parse_args(argv)
    q = a.quick
    repeats = a.repeats or (3 if q else 5)
    t0 = time.perf_counter()
    print(f"# bench_newton{' --quick' if q else ''}: {os.cpu_count()} cores, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cases = [(L, w) for L in ((256, 1024) if q else (1024, 4096)) for w in (8, 32)]
    if a.section == "compiled":
        compiled_vs_numpy(cases, 4, repeats, a.schedule)
        print(f"\n({time.perf_counter() - t0:.0f} s; load average after: "
              f"{', '.join(f'{v:.2f}' for v in os.getloadavg())})")
        return
    iterations_vs_L((64, 256, 1024) if q else (64, 256, 1024, 4096), 8, 4, a.schedule)
    iterations_vs_contractivity(256 if q else 1024, 8, 4, (0.25, 0.5, 1.0, 1.5, 2.0, 3.0), a.schedule)
    n = 256 if q else 1000
    times([("chain", n, 16, 4), ("rnn", n, 16, 4), ("gru", n, 16, 4)], repeats, a.schedule)
    crossover(("chain", "rnn", "gru"), (8, 32) if q else (8, 32, 64), n, 4, repeats, a.schedule)
    divergent(1000, 8, 3.0)
    compiled_vs_numpy(cases, 4, repeats, a.schedule)
    print(f"\n({time.perf_counter() - t0:.0f} s; load average after: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())})")


if __name__ == "__main__":
    main()
