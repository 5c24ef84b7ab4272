"""Sharded training steps on Ray and Dask: bytes moved, per-step overhead, speed, many steps.

Run (not part of the unit tests; a few minutes on a 2-core machine)::

    python benchmarks/bench_sharded.py [--quick] [--json out.json]

What it measures (dense ``mlp([8] * L + [1])``, tanh, float64, batch 1, P=2
shards unless stated; one step = ``value_and_grad`` + ``sgd_step``):

1. ``trace.bytes_moved`` per step at L = 4096 and 65536 (Ray and Dask).
2. Per-step overhead: step time minus the time the trace records a shard
   computing (median over steps), L = 4096, on embedded Ray and Dask.
3. At L = 65536 on Ray: the sharded step against today's
   ``cp.grad(chain, x, backend="ray")`` + ``Chain.sgd_step`` and against the
   same step run locally with the same kernels (one
   :class:`~chainprod.executors.sharded_worker.ShardState` of the whole chain
   in this process).
4. 200 consecutive steps: driver and worker RSS growth, and the step time of
   the first and last 50 steps.

Every figure is printed as it is measured; ``--json`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import chainprod as cp
from chainprod.executors.sharded_worker import ShardState, shard_tables
from chainprod.grad import LOSSES
from chainprod.kernels import pack
from chainprod.shard import measure_sharded_step, shard


def chain_of(L, w=8):
    return cp.mlp([w] * L + [1], seed=0)


def local_step_seconds(chain, x, repeats=7):
    """The same step in this process: forward, loss seed, compiled backprop, SGD, one shard of everything."""
    pc = pack(chain)
    spec = dict(index=0, shards=1, first=0, tables=shard_tables(pc, 0, pc.L), kernels="numba", losses=LOSSES)
    st = ShardState(spec, pc.theta)
    times, seq = [], 0
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        updates = [(seq, i, 1e-4)] if seq else []
        st.forward_top(i + 1, x, updates, None, "sum")
        seq += 1
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def today_step_seconds(chain, x, repeats=2):
    """``cp.grad(..., backend="ray")`` + ``Chain.sgd_step``: the model travels every step."""
    times = []
    cp.grad(chain, x, backend="ray", workers=2)  # warm up
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = cp.grad(chain, x, backend="ray", workers=2)
        chain.sgd_step(g, 1e-4)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def many_steps(engine_name, L=4096, steps=200):
    import psutil

    chain = chain_of(L)
    x = np.ones((1, 8))
    me = psutil.Process()
    ex = type(cp.get_executor(engine_name))(workers=2)
    with shard(chain, ex, shards=2) as model:
        workers = [psutil.Process(p) for p in model.pids]
        times = []
        for i in range(20 + steps):
            if i == 20:
                rss0 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
            t0 = time.perf_counter()
            _, g = model.value_and_grad(x)
            model.sgd_step(g, 1e-4)
            if i >= 20:
                times.append(time.perf_counter() - t0)
        rss1 = [me.memory_info().rss] + [w.memory_info().rss for w in workers]
    growth = [round(100 * (b - a) / a, 2) for a, b in zip(rss0, rss1)]
    return {"rss_growth_percent": {"driver": growth[0], "workers": growth[1:]},
            "first50_ms": round(1e3 * statistics.median(times[:50]), 3),
            "last50_ms": round(1e3 * statistics.median(times[-50:]), 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip the 200-step run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    reps = 5 if args.quick else 15
    out = {}
    x = np.ones((1, 8))
    for engine in ("ray", "dask"):
        ex = cp.get_executor(engine)
        cp.suffix_products([np.eye(2)] * 3, backend=ex, workers=2)  # start the embedded cluster
        ex2 = type(ex)(workers=2)
        for L in (4096, 65536):
            m = measure_sharded_step(chain_of(L), x, shards=2, method="backprop", repeats=reps, warmup=3,
                                     executor=ex2)
            out[f"{engine}-L{L}"] = m
            print(f"{engine:5s} L={L:6d} P=2: total {1e3 * m['total']:8.2f} ms  forward {1e3 * m['forward']:8.2f} "
                  f"backward {1e3 * m['backward']:8.2f}  compute {1e3 * m['compute']:8.2f}  overhead "
                  f"{1e3 * m['overhead']:6.2f} ms  bytes_moved {m['bytes_moved']:.0f}  rounds {m['rounds']}",
                  flush=True)
    chain = chain_of(65536)
    local = local_step_seconds(chain, x)
    today = today_step_seconds(chain, x, repeats=1 if args.quick else 2)
    sharded = out["ray-L65536"]["total"]
    out["L65536"] = {"local_same_kernels_s": local, "today_ray_grad_plus_sgd_s": today, "sharded_ray_s": sharded,
                     "speedup_vs_today": today / sharded, "ratio_to_local": sharded / local}
    print(f"L=65536 w=8 P=2 Ray: sharded step {1e3 * sharded:.2f} ms, local same kernels {1e3 * local:.2f} ms "
          f"(ratio {sharded / local:.2f}x), today's grad(backend='ray') + sgd_step {today:.3f} s "
          f"(sharded is {today / sharded:.0f}x faster)", flush=True)
    if not args.quick:
        for engine in ("ray", "dask"):
            r = many_steps(engine)
            out[f"{engine}-200-steps"] = r
            print(f"{engine:5s} 200 steps L=4096: RSS growth {r['rss_growth_percent']}  step time first 50 "
                  f"{r['first50_ms']} ms, last 50 {r['last50_ms']} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
