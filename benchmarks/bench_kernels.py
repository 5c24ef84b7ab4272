"""Whole-chain kernels (chainprod.kernels) against a plain hand-written ``@njit`` loop.

The yardstick is the simplest compiled code for one uniform tanh MLP (stacked
``(L, w, w)`` weights, fixed width, one activation): what a person would
write for that one model. The packed kernels run any chain (mixed
activations, widths, Dense/Diagonal) through tables, so the question is what
that generality costs. Targets: forward and backprop within 1.5x of the
yardstick (tanh MLP w=8, N=1, float64, L = 4096 and 65536); heterogeneous
chains within 1.5x of the uniform chain per layer (and per parameter, since
widths cycling 8/12/16 carry ~2.2x the multiply-adds of w=8 per layer).

``test_mixed_activations_cost_their_uniform_parts`` checks the other promise
of the kernels' one-branch-per-layer activations: a chain cycling
tanh/relu/sigmoid/softplus against the mean of the four uniform chains,
per multiply-add (target <= 1.2x), at batch 1 and width 8 (the loops) and at
batch 16 and width 64 (BLAS).

``python3 -m pytest benchmarks/bench_kernels.py --benchmark-only -c benchmarks/pytest.ini --rootdir benchmarks -s``
prints the ratios at the end. The numpy paths (``cp.forward``, ``cp.backward(method="backprop")``
and the numpy reference kernels) are timed at L=4096 for orientation.
"""

import math

import numpy as np
import pytest

import chainprod as cp
from chainprod.kernels import default_kernels, get_kernels, pack

numba = pytest.importorskip("numba")
if default_kernels() != "numba":  # pragma: no cover
    pytest.skip("numba not installed", allow_module_level=True)

from numba import njit  # noqa: E402

W = 8
ACTS = ("tanh", "relu", "sigmoid", "softplus")
RESULTS = {}  # (case, impl) -> best seconds


# -- the yardstick: a plain loop for exactly one uniform tanh MLP --------------------------------
@njit(cache=True)
def plain_forward(Wt, b, x):
    L, w = b.shape
    Y = np.empty((L, w))
    h = x
    for l in range(L):
        for i in range(w):
            s = 0.0
            for j in range(w):
                s += Wt[l, i, j] * h[j]
            Y[l, i] = math.tanh(s + b[l, i])
        h = Y[l]
    return Y


@njit(cache=True)
def plain_backward(Wt, x, Y, cotangent):
    L, w = Y.shape
    dW = np.empty_like(Wt)
    db = np.empty_like(Y)
    g = cotangent.copy()
    gn = np.empty(w)
    d = np.empty(w)
    for l in range(L - 1, -1, -1):
        xin = Y[l - 1] if l > 0 else x
        for i in range(w):
            d[i] = g[i] * (1.0 - Y[l, i] * Y[l, i])
            db[l, i] = d[i]
            for j in range(w):
                dW[l, i, j] = d[i] * xin[j]
        if l > 0:
            gn[:] = 0.0
            for i in range(w):
                for j in range(w):
                    gn[j] += d[i] * Wt[l, i, j]
            g, gn = gn, g
    return dW, db


# -- the yardstick of a diagonal chain: a plain loop of ``y_l = tanh(a_l * y_{l-1} + b_l)`` -------------
@njit(cache=True)
def plain_diag_forward(A, B, x):
    L, w = A.shape
    Y = np.empty((L, w))
    h = x
    for l in range(L):
        for i in range(w):
            Y[l, i] = math.tanh(A[l, i] * h[i] + B[l, i])
        h = Y[l]
    return Y


@njit(cache=True)
def plain_diag_backward(A, x, Y, cotangent):
    L, w = Y.shape
    da = np.empty_like(A)
    db = np.empty_like(A)
    g = cotangent.copy()
    for l in range(L - 1, -1, -1):
        for i in range(w):
            d = g[i] * (1.0 - Y[l, i] * Y[l, i])
            da[l, i] = d * (Y[l - 1, i] if l > 0 else x[i])
            db[l, i] = d
            g[i] = d * A[l, i]
    return da, db


# -- chains ---------------------------------------------------------------------------------------
def uniform_mlp(L, seed=0):
    rng = np.random.default_rng(seed)
    return cp.Chain([cp.Dense(rng.standard_normal((W, W)) / np.sqrt(W), 0.1 * rng.standard_normal(W), "tanh")
                     for _ in range(L)])


def mixed_acts(L, seed=0):
    rng = np.random.default_rng(seed)
    return cp.Chain([cp.Dense(rng.standard_normal((W, W)) / np.sqrt(W), 0.1 * rng.standard_normal(W), ACTS[l % 4])
                     for l in range(L)])


def mixed_widths(L, seed=0):
    rng = np.random.default_rng(seed)
    ws = (8, 12, 16)
    return cp.Chain([cp.Dense(rng.standard_normal((ws[(l + 1) % 3], ws[l % 3])) / np.sqrt(ws[l % 3]),
                              0.1 * rng.standard_normal(ws[(l + 1) % 3]), ACTS[l % 4]) for l in range(L)])


def mixed_dense_diag(L, seed=0):
    rng = np.random.default_rng(seed)
    return cp.Chain([cp.Dense(rng.standard_normal((W, W)) / np.sqrt(W), 0.1 * rng.standard_normal(W), ACTS[l % 4])
                     if l % 2 == 0 else cp.Diagonal(rng.uniform(0.6, 1.2, W), 0.1 * rng.standard_normal(W),
                                                    ACTS[l % 4]) for l in range(L)])


CHAINS = {"uniform": uniform_mlp, "acts": mixed_acts, "widths": mixed_widths, "dense_diag": mixed_dense_diag}


def _problem(name, L):
    chain = CHAINS[name](L)
    pc = pack(chain)
    x = np.full((1, chain.d_in), 0.5)
    cotangent = np.ones((1, chain.d_out))
    Y, bad = get_kernels("numba").forward(pc, x)
    assert bad == -1
    return chain, pc, x, cotangent, Y


def _record(benchmark, case, impl, L, n_params):
    RESULTS[(case, impl)] = (benchmark.stats.stats.min, L, n_params)


# -- yardstick -----------------------------------------------------------------------------------
@pytest.mark.parametrize("L", [4096, 65536])
def test_plain_njit_forward(benchmark, L):
    chain, pc, x, cotangent, Y = _problem("uniform", L)
    Wt = np.stack([ly.params[0] for ly in chain.layers])
    b = np.stack([ly.params[1] for ly in chain.layers])
    Yp = plain_forward(Wt, b, x[0])
    np.testing.assert_allclose(Yp.reshape(-1), Y, rtol=1e-12, atol=1e-14)  # same math as the kernels
    benchmark.group = f"forward tanh MLP w=8 L={L} N=1"
    benchmark(plain_forward, Wt, b, x[0])
    _record(benchmark, f"forward L={L}", "plain", L, pc.n_params)


@pytest.mark.parametrize("L", [4096, 65536])
def test_plain_njit_backward(benchmark, L):
    chain, pc, x, cotangent, Y = _problem("uniform", L)
    Wt = np.stack([ly.params[0] for ly in chain.layers])
    Y2 = Y.reshape(L, W)
    dW, db = plain_backward(Wt, x[0], Y2, cotangent[0].repeat(W))
    assert np.isfinite(dW).all()
    benchmark.group = f"backprop tanh MLP w=8 L={L} N=1"
    benchmark(plain_backward, Wt, x[0], Y2, cotangent[0].repeat(W))
    _record(benchmark, f"backprop L={L}", "plain", L, pc.n_params)


# -- the packed kernels --------------------------------------------------------------------------
CASES = [("uniform", 4096), ("uniform", 65536), ("acts", 4096), ("widths", 4096), ("dense_diag", 4096)]


@pytest.mark.parametrize("name,L", CASES, ids=[f"{n}-L{L}" for n, L in CASES])
def test_kernel_forward(benchmark, name, L):
    chain, pc, x, cotangent, Y = _problem(name, L)
    k = get_kernels("numba")
    benchmark.group = f"forward tanh MLP w=8 L={L} N=1" if name == "uniform" else f"forward {name} L={L} N=1"
    benchmark(k.forward, pc, x)
    _record(benchmark, f"forward L={L}" if name == "uniform" else f"forward {name} L={L}", "numba", L, pc.n_params)


@pytest.mark.parametrize("name,L", CASES, ids=[f"{n}-L{L}" for n, L in CASES])
def test_kernel_backprop(benchmark, name, L):
    chain, pc, x, cotangent, Y = _problem(name, L)
    k = get_kernels("numba")
    cotangent = np.ones((1, chain.d_out))
    benchmark.group = f"backprop tanh MLP w=8 L={L} N=1" if name == "uniform" else f"backprop {name} L={L} N=1"
    benchmark(k.backprop, pc, x, Y, cotangent)
    _record(benchmark, f"backprop L={L}" if name == "uniform" else f"backprop {name} L={L}", "numba", L,
            pc.n_params)


@pytest.mark.parametrize("L", [4096, 65536])
def test_kernel_param_grads(benchmark, L):
    """The VJP step of a scan path: every layer independent, ``prange`` over layers (2 threads here)."""
    chain, pc, x, cotangent, Y = _problem("uniform", L)
    V = np.ones_like(Y)
    k = get_kernels("numba")
    benchmark.group = f"param_grads tanh MLP w=8 L={L} N=1"
    benchmark(k.param_grads, pc, x, Y, V)
    _record(benchmark, f"param_grads L={L}", "numba", L, pc.n_params)


# -- numpy paths, for orientation ----------------------------------------------------------------
@pytest.mark.parametrize("impl", ["cp.forward", "numpy kernels"])
def test_numpy_forward(benchmark, impl):
    chain, pc, x, cotangent, Y = _problem("uniform", 4096)
    benchmark.group = "forward tanh MLP w=8 L=4096 N=1"
    if impl == "cp.forward":
        benchmark(cp.forward, chain, x)
    else:
        benchmark(get_kernels("numpy").forward, pc, x)
    _record(benchmark, "forward L=4096", impl, 4096, pc.n_params)


@pytest.mark.parametrize("impl", ["cp.backward", "numpy kernels"])
def test_numpy_backprop(benchmark, impl):
    chain, pc, x, cotangent, Y = _problem("uniform", 4096)
    benchmark.group = "backprop tanh MLP w=8 L=4096 N=1"
    if impl == "cp.backward":
        tape = cp.forward(chain, x)
        benchmark(cp.backward, tape, cotangent, method="backprop")
    else:
        benchmark(get_kernels("numpy").backprop, pc, x, Y, cotangent)
    _record(benchmark, "backprop L=4096", impl, 4096, pc.n_params)


@pytest.mark.parametrize("L", [4096, 65536])
def test_interleaved_ratios(benchmark, L):
    """The headline ratios measured back to back (kernel, yardstick, kernel, ...), best of each.

    On a shared machine the load changes between two benchmark groups; taking
    both timings in alternation gives both the same conditions.
    """
    import time

    chain, pc, x, cotangent, Y = _problem("uniform", L)
    k = get_kernels("numba")
    Wt = np.stack([ly.params[0] for ly in chain.layers])
    b = np.stack([ly.params[1] for ly in chain.layers])
    Y2, s8 = Y.reshape(L, W), cotangent[0].repeat(W)
    pairs = {"forward": (lambda: k.forward(pc, x), lambda: plain_forward(Wt, b, x[0])),
             "backprop": (lambda: k.backprop(pc, x, Y, cotangent), lambda: plain_backward(Wt, x[0], Y2, s8))}
    reps = 30 if L <= 4096 else 8
    for what, (ours, plain) in pairs.items():
        best = [np.inf, np.inf]
        for _ in range(reps):
            for i, fn in enumerate((ours, plain)):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t0)
        RESULTS[(f"{what} L={L} (alternating)", "numba")] = (best[0], L, pc.n_params)
        RESULTS[(f"{what} L={L} (alternating)", "plain")] = (best[1], L, pc.n_params)
    benchmark.group = "alternating"
    benchmark.pedantic(lambda: None, rounds=1)  # the figures are in the printed table


def _act_chain(acts, L, w, seed=0):
    rng = np.random.default_rng(seed)
    return cp.Chain([cp.Dense(rng.standard_normal((w, w)) / np.sqrt(w), 0.1 * rng.standard_normal(w),
                              acts[l % len(acts)]) for l in range(L)])


@pytest.mark.parametrize("w,N", [(8, 1), (64, 16)], ids=["w8-N1-loops", "w64-N16-blas"])
def test_mixed_activations_cost_their_uniform_parts(benchmark, w, N):
    """A chain cycling tanh/relu/sigmoid/softplus against the mean of the four uniform chains (target <= 1.2x).

    Every layer has the same multiply-adds, so per layer is per multiply-add.
    Timed alternately (each chain once per round, best of the rounds) so the
    load on a shared machine falls on all of them alike.
    """
    import time

    L = 4096 if w == 8 else 256
    k = get_kernels("numba")
    probs = {}
    for name, acts in [(a, (a,)) for a in ACTS] + [("mixed", ACTS)]:
        pc = pack(_act_chain(acts, L, w))
        x = np.full((N, w), 0.5)
        Y, _ = k.forward(pc, x)
        probs[name] = (pc, x, Y, np.ones((N, w)))
    best = {(name, what): np.inf for name in probs for what in ("forward", "backprop")}
    for _ in range(15):
        for name, (pc, x, Y, ct) in probs.items():
            for what, fn in (("forward", lambda: k.forward(pc, x)),  # noqa: B023
                             ("backprop", lambda: k.backprop(pc, x, Y, ct))):  # noqa: B023
                t0 = time.perf_counter()
                fn()
                best[name, what] = min(best[name, what], time.perf_counter() - t0)
    benchmark.group = "mixed activations"
    benchmark.pedantic(lambda: None, rounds=1)
    for what in ("forward", "backprop"):
        mean = float(np.mean([best[a, what] for a in ACTS]))
        r = best["mixed", what] / mean
        parts = ", ".join(f"{a} {best[a, what] * 1e3:.3f}" for a in ACTS)
        print(f"\n  {what} w={w} N={N} L={L}: mixed {best['mixed', what] * 1e3:.3f} ms vs mean of uniform "
              f"{mean * 1e3:.3f} ms ({parts}): {r:.2f}x (target <= 1.2x)")
        RESULTS[(f"{what} mixed/uniform-mean w={w} N={N}", "numba")] = (best["mixed", what], L, 1)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    print("\n\nchainprod.kernels (numba) vs a plain @njit tanh-MLP loop; float64, N=1, best of rounds")
    for case in sorted({c for c, _ in RESULTS}):
        row = {impl: v for (c, impl), v in RESULTS.items() if c == case}
        line = "  ".join(f"{impl} {t * 1e3:8.3f} ms" for impl, (t, _, _) in sorted(row.items()))
        extra = ""
        if "plain" in row and "numba" in row:
            extra = f"   numba/plain = {row['numba'][0] / row['plain'][0]:.2f}x (target <= 1.5x)"
        print(f"  {case:28s} {line}{extra}")
    for what in ("forward", "backprop"):
        base = RESULTS.get((f"{what} L=4096", "numba"))
        if base is None:
            continue
        t0, L0, p0 = base
        for name in ("acts", "widths", "dense_diag"):
            r = RESULTS.get((f"{what} {name} L=4096", "numba"))
            if r is None:
                continue
            t, L, p = r
            print(f"  {what} {name:10s} per layer {t / L * 1e6:6.3f} us vs uniform {t0 / L0 * 1e6:6.3f} us: "
                  f"{(t / L) / (t0 / L0):.2f}x; per parameter {(t / p) / (t0 / p0):.2f}x (target <= 1.5x)")
