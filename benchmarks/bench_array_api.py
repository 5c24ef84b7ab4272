"""Cost per round of the array executor (numpy, torch CPU, JAX CPU) against the vectorized numpy executor.

One schedule, the same blocks in every library: ``executor.run`` alone
(blocks already stacked, plan already bound and compiled), divided by the
schedule's rounds. The target: the array executor within 1.5x of the
vectorized executor per round on a CPU.

    pytest benchmarks/bench_array_api.py --benchmark-only    # pytest-benchmark
    python benchmarks/bench_array_api.py [--repeats 200]      # a table, min of the repeats
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.blocks import BlockSeq, Segment

#: (name, schedule, L, kind, width, batch)
CASES = [("dense w=8", "sklansky", 1024, "dense", 8, 1), ("diag w=64", "sklansky", 1024, "diag", 64, 1)]
#: (library, backend, torch intra-op threads: None = torch's default)
RUNS = [("numpy", "vectorized", None), ("numpy", "array", None), ("torch", "array", None), ("torch", "array", 1),
        ("jax", "array", None)]


def make_blocks(kind, L, width, batch, library, seed=0):
    """A BlockSeq of ``L`` blocks of one kind in ``library`` (float64), values that keep products finite."""
    rng = np.random.default_rng(seed)
    if kind == "diag":
        arr = rng.uniform(0.9, 1.1, (L, batch, width))
    else:
        arr = np.eye(width) + rng.standard_normal((L, batch, width, width)) / (4 * width)
    if library == "torch":
        import torch
        arr = torch.from_numpy(arr)
    elif library == "jax":
        import jax
        jax.config.update("jax_enable_x64", True)
        arr = jax.numpy.asarray(arr)
    return BlockSeq([Segment(kind, arr)])


def runner(case, library, backend):
    """A zero-argument function that runs the scan once and waits for it; warmed up (plans, compiles)."""
    _, method, L, kind, width, batch = case
    blocks = make_blocks(kind, L, width, batch, library)
    sched = cp.schedule(method, L)
    ex = cp.get_executor(backend)

    def run():
        res = ex.run(sched, blocks)
        if library == "jax":
            for s in res.slabs:
                if s is not None:
                    s.block_until_ready()
        return res

    for _ in range(3):
        run()
    return run, sched.rounds


def torch_threads(n):
    """Set torch's intra-op threads to ``n`` (None: leave them); returns the count to restore."""
    if n is None:
        return None
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


@pytest.mark.parametrize("library,backend,threads", RUNS, ids=[f"{lib}-{b}-t{t or 'default'}" for lib, b, t in RUNS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_cost(benchmark, case, library, backend, threads):
    if library != "numpy":
        pytest.importorskip(library)
    run, rounds = runner(case, library, backend)
    benchmark.group = f"array executor per round: {case[0]} {case[1]} L={case[2]}"
    benchmark.extra_info["rounds"] = rounds
    before = torch_threads(threads)
    try:
        benchmark(run)
    finally:
        torch_threads(before)


def best(fn, repeats):
    """The fastest of ``repeats`` calls (seconds): on a shared machine the others add interference."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    print(f"{'case':<12} {'library':<8} {'backend':<11} {'threads':>7} {'rounds':>6} {'us/round':>9} "
          f"{'vs vectorized':>14}")
    for case in CASES:
        runs = {}
        for library, backend, threads in RUNS:
            try:
                runs[(library, backend, threads)] = runner(case, library, backend)
            except ImportError:
                print(f"{case[0]:<12} {library:<8} {backend:<11} (not installed)")
        # interleaved: each repeat runs every variant once, so a burst of load hits all of them alike
        fastest = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for key, (run, rounds) in runs.items():
                before = torch_threads(key[2])
                fastest[key] = min(fastest[key], best(run, 1) / rounds)
                torch_threads(before)
        base = fastest.get(("numpy", "vectorized", None))
        for (library, backend, threads), per_round in fastest.items():
            rounds = runs[(library, backend, threads)][1]
            print(f"{case[0]:<12} {library:<8} {backend:<11} {threads or 'default':>7} {rounds:>6} "
                  f"{per_round * 1e6:>9.1f} {per_round / base:>13.2f}x")


if __name__ == "__main__":
    main()
