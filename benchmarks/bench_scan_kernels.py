"""The compiled scan kernels (``chainprod.kernels.scan``) against their Brent bound.

For every case (chain, L) x method x workers P this times one
:func:`~chainprod.kernels.scan.scan_rows` call (plan cached: the kernel call
alone) and prints it beside Brent's bound ``T_P <= W/P + D`` computed from
per-op costs *measured with the same kernel on the same chain*:

* ``form``: forming every block and copying the rows out (a plan with no ops);
* ``thin``: one vector-matrix op per flop (the ops of a ``sequential`` scan);
* ``square``: one matrix-matrix (or diag x diag) op per flop (an extra round
  of interior products added to the sequential scan).

``W`` = form + the sum of every op's cost, ``D`` = the sum over the
schedule's rounds of its most expensive op. The ratio ``T / bound`` is the
figure of merit (target <= 1.5). The numpy backprop backward pass
(``cp.backward(..., method="backprop")``) is printed for orientation.

The square op alone (``test_square_op_vs_numpy_matmul``): one dense ``w x w
@ w x w`` combine op as the kernel runs it (a stack of blocks, one per
batch element; BLAS from the calibrated crossover on) against
``np.matmul`` on the same stacked blocks, at w = 8 .. 128, float64 and
float32, both with BLAS on one thread (as inside the kernel's parallel
stages). Target: never slower than ``np.matmul``.

Run::

    python3 -m pytest benchmarks/bench_scan_kernels.py --benchmark-only \\
        -c benchmarks/pytest.ini --rootdir benchmarks -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.kernels import crossover, pack
from chainprod.kernels.scan import compiled_scan_kernel, plan_for, position_specs, scan_rows
from chainprod.planning.flat import bind_flat
from chainprod.schedules import Round, Schedule

pytest.importorskip("numba")

ACTS = ["tanh", "relu", "sigmoid", "softplus"]


def _hetero(L, seed=0):
    rng = np.random.default_rng(seed)
    w = [(8, 12, 16)[l % 3] for l in range(L)] + [1]
    layers = []
    for l in range(L):
        W = rng.standard_normal((w[l + 1], w[l])) / np.sqrt(w[l])
        layers.append(cp.Dense(W, 0.1 * rng.standard_normal(w[l + 1]), ACTS[l % 4] if l < L - 1 else "identity"))
    return cp.Chain(layers)


CASES = {
    "tanh MLP w=8 L=4096": lambda: cp.mlp([8] * 4096 + [1], activation="tanh"),
    "tanh MLP w=8 L=65536": lambda: cp.mlp([8] * 65536 + [1], activation="tanh"),
    "hetero acts+widths 8/12/16 L=4096": lambda: _hetero(4096),
    "diagonal w=32 L=65536": lambda: cp.diagonal_chain(65535, 32),
}
METHODS = ["sklansky", "brent_kung", "chunked"]
_STATE: dict = {}


def _best(f, repeats=5):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def _case(name):
    """Chain, packed chain, flat tape, cotangent and the measured per-op costs (built once per case)."""
    if name in _STATE:
        return _STATE[name]
    chain = CASES[name]()
    x = np.random.default_rng(1).standard_normal((1, chain.d_in))
    tape = cp.forward(chain, x)
    Y = np.concatenate([o.reshape(-1) for o in tape.outputs])
    cotangent = np.ones((1, chain.d_out))
    pc = pack(chain)
    st = dict(chain=chain, tape=tape, pc=pc, Y=Y, cotangent=cotangent)
    st["costs"] = _measure_costs(pc, Y, cotangent)
    st["backprop"] = _best(lambda: cp.backward(tape, cotangent, method="backprop"), 3)
    _STATE[name] = st
    return st


def _kernel_time(pc, Y, cotangent, plan, workers=1, stage_ptr=None, repeats=5):
    k = compiled_scan_kernel()
    V = np.empty_like(Y)
    sp = plan.stage_ptr if stage_ptr is None else stage_ptr
    rows, blocks = (crossover.blas_crossover(pc.dtype, form) for form in crossover.FORMS)

    def call():
        return k(pc.theta, pc.p_off, pc.kind, pc.act, pc.d_in, pc.d_out, pc.y_off, Y, cotangent,
                 plan.slot_off, plan.op_left, plan.op_right, plan.op_out, plan.op_code, plan.op_m,
                 plan.op_k, plan.op_n, plan.op_tmp, plan.lane_ptr, plan.lane_cum, plan.lane_mid,
                 sp, plan.stage_parallel, plan.out_off, plan.buf_size, plan.max_tmp, workers, False, rows, blocks,
                 V)

    call()
    return _best(call, repeats)


def _op_class(plan):
    """0: thin dense (vector-matrix), 1: square dense (matrix-matrix), 2: elementwise (any diagonal operand)."""
    return np.where(plan.op_code == 0, np.where(plan.op_m == 1, 0, 1), 2)


def _measure_costs(pc, Y, cotangent):
    """Seconds per flop of each op class, and the time to form blocks + copy rows, on one thread."""
    L = pc.L
    seq = cp.schedule("sequential", L - 1)
    plan = plan_for(pc, seq, 1)
    empty = np.zeros(1, dtype=np.int64)
    t_form = _kernel_time(pc, Y, cotangent, plan, stage_ptr=empty)
    t_seq = _kernel_time(pc, Y, cotangent, plan)
    cls = _op_class(plan)
    rate = {}
    # the thin ops of a sequential scan: vector-matrix (dense) or vector * diagonal
    thin_cls = int(np.bincount(cls, weights=plan.op_flops, minlength=3).argmax())
    rate[thin_cls] = (t_seq - t_form) / plan.op_flops.sum()
    # one extra round of interior products [p, p+1] -> scratch, p = 1, 3, 5, ...
    p = np.arange(1, L - 2, 2)
    extra = Round(p, p + 1, L - 1 + np.arange(p.size))
    sq = Schedule("sequential+interior", L - 1, L - 1 + p.size, (extra, *seq.steps), seq.outputs)
    kinds, rows, cols = position_specs(pc)
    plan_sq = bind_flat(sq, kinds, rows, cols, batch=1, parallel_min_flops=np.inf)
    t_sq = _kernel_time(pc, Y, cotangent, plan_sq)
    first = plan_sq.op_round == 0
    sq_cls = int(np.bincount(_op_class(plan_sq)[first], minlength=3).argmax())
    rate[sq_cls] = (t_sq - t_seq) / plan_sq.op_flops[first].sum()
    for c in range(3):  # a class this chain has no ops of costs nothing; fill for completeness
        rate.setdefault(c, max(rate.values()))
    return {"form": t_form, "rate": rate, "per_op_thin": rate[thin_cls] * plan.op_flops.mean(),
            "per_op_sq": rate[sq_cls] * plan_sq.op_flops[first].mean(), "thin_cls": thin_cls, "sq_cls": sq_cls}


def brent_bound(plan, costs, P):
    """``W/P + D`` seconds from the measured per-op costs."""
    cls = _op_class(plan)
    t = plan.op_flops * np.array([costs["rate"][c] for c in range(3)])[cls]
    W = costs["form"] + t.sum()
    D = np.zeros(int(plan.op_round.max()) + 1 if plan.n_ops else 0)
    np.maximum.at(D, plan.op_round, t)
    return W / P + D.sum()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_scan_kernel(benchmark, case, method, workers):
    st = _case(case)
    pc, Y, cotangent = st["pc"], st["Y"], st["cotangent"]
    sched = cp.schedule(method, pc.L - 1, workers=workers)
    plan = plan_for(pc, sched, 1)
    scan_rows(pc, Y, cotangent, sched, workers=workers)  # plan cached, kernel loaded
    benchmark.group = f"scan kernels: {case}"
    benchmark.pedantic(scan_rows, args=(pc, Y, cotangent, sched), kwargs={"workers": workers}, rounds=5,
                       iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.min
    bound = brent_bound(plan, st["costs"], workers)
    c = st["costs"]
    names = ["thin", "square", "elementwise"]
    print(f"\n[{case}] {method:<10} P={workers}: {t * 1e3:8.2f} ms   Brent W/P+D = {bound * 1e3:8.2f} ms   "
          f"ratio {t / bound:5.2f}   | numpy backprop backward {st['backprop'] * 1e3:8.2f} ms   "
          f"| measured: form {c['form'] * 1e3:.2f} ms, {names[c['thin_cls']]} op {c['per_op_thin'] * 1e9:.0f} ns, "
          f"{names[c['sq_cls']]} op {c['per_op_sq'] * 1e9:.0f} ns; {plan.n_ops} ops, {plan.n_stages} stages "
          f"({int(plan.stage_parallel.sum())} parallel)")


_COLD = """
import time, numpy as np, chainprod as cp
t0 = time.perf_counter()
from chainprod.kernels import crossover, pack
from chainprod.kernels.scan import scan_rows
chain = cp.mlp([4, 4, 4, 1], dtype=np.{dt})
tape = cp.forward(chain, np.ones((1, 4), dtype=np.{dt}))
Y = np.concatenate([o.reshape(-1) for o in tape.outputs])
pc = pack(chain)
t1 = time.perf_counter()
scan_rows(pc, Y, np.ones((1, 1), dtype=np.{dt}), "sklansky")
print(time.perf_counter() - t1)
"""


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_compile_and_cached_load(benchmark, dtype):
    """First call in a fresh process: compiling (empty cache dir), then loading what it cached."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        run = lambda: float(subprocess.run([sys.executable, "-c", _COLD.format(dt=dtype)], env=env,  # noqa: E731
                                           capture_output=True, text=True, check=True).stdout.strip())
        compile_s = run()
        load_s = benchmark.pedantic(run, rounds=2, iterations=1)
    print(f"\n[compile] {dtype}: first call compiling {compile_s:.2f} s, first call loading the disk cache "
          f"{load_s:.2f} s (fresh processes)")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("w", [8, 16, 32, 64, 128])
def test_square_op_vs_numpy_matmul(benchmark, w, dtype):
    from chainprod.kernels import numba_blas
    from chainprod.kernels.scan_compiled import block_op_seconds

    batch = int(np.clip(2**21 // w**3, 4, 512))
    x = np.random.default_rng(0).standard_normal((2, batch, w, w)).astype(dtype) / np.sqrt(w)
    out = np.empty((batch, w, w), dtype)
    cross = crossover.blas_crossover(np.dtype(dtype), "blocks")
    with numba_blas.one_blas_thread():
        ours = min(block_op_seconds(w, dtype, cross, batch=batch, repeats=7) for _ in range(3))
        theirs = _best(lambda: np.matmul(x[0], x[1], out=out), 21) / batch
    benchmark.group = "square op vs np.matmul"
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\n[square op] {dtype} w={w}: compiled {ours * 1e9:9.0f} ns, np.matmul {theirs * 1e9:9.0f} ns per block "
          f"({batch} stacked): ratio {ours / theirs:.2f} (target <= 1; {'BLAS' if w ** 3 >= cross else 'loop'})")
