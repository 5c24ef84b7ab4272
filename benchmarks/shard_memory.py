"""Memory of a sharded model over many steps, and the time to replace a killed shard.

``python3 benchmarks/shard_memory.py [--steps 4000] [--every 500] [--engines ray,dask]``
trains ``mlp([8] * 64 + [1])`` on one sample, 2 shards on each engine's
embedded loopback cluster (``value_and_grad`` + ``sgd_step`` per step, a
checkpoint every ``--checkpoint-every`` steps, 1000 by default as in
``cp.shard``), and prints every ``--every`` steps:

* the driver's RSS and each shard worker's RSS (MiB, psutil);
* the model's tasks on the Dask scheduler (which runs in the driver), or on
  Ray the object references the driver holds;
* the bytes of the replay log the driver keeps (its rows: ``2 N w`` floats
  per shard and step, reset at every checkpoint).

``--recovery K`` then kills shard 1's worker process by PID (SIGKILL) ``K``
times, 50 steps apart, alternately right before a step and during one (after
all its calls were submitted, before the driver waits), and prints the
seconds from the kill to the replacement shard answering (``start``
returned, its log replayed) and to the end of that step, beside an ordinary
step's time. ``--json FILE`` writes
every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import psutil

import chainprod as cp
from chainprod.shard import shard
from chainprod.testing import kill_and_wait

MiB = 1024 * 1024


def _ray_refs():
    """Object references the driver's Ray core worker holds (-1 if Ray does not say)."""
    try:
        import ray

        return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())
    except Exception:
        return -1


def _log_bytes(model):
    return sum(a.nbytes for entry in model._recovery.log for pair in entry["rows"].values() for a in pair)


def memory_run(engine_name, steps, every, checkpoint_every):
    ex = cp.get_executor(engine_name)
    cp.suffix_products([np.eye(2)] * 3, backend=ex, workers=2)  # start the embedded cluster
    ex = type(ex)(workers=2, timeout=300)
    chain = cp.mlp([8] * 64 + [1], seed=0)
    x = np.ones((1, 8))
    me = psutil.Process()
    rows = []
    with shard(chain, ex, shards=2, checkpoint_every=checkpoint_every) as model:
        workers = [psutil.Process(p) for p in model.pids]
        client = ex.connect(2) if engine_name == "dask" else None
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            _, g = model.value_and_grad(x)
            model.sgd_step(g, 1e-4)
            if i % every == 0 or i == 1:
                if client is not None:
                    held = model._engine.tasks_on_scheduler()
                else:
                    held = _ray_refs()
                row = dict(step=i, seconds=round(time.perf_counter() - t0, 1),
                           driver_mib=round(me.memory_info().rss / MiB, 1),
                           worker_mib=[round(w.memory_info().rss / MiB, 1) for w in workers],
                           held=held, log_kib=round(_log_bytes(model) / 1024, 1))
                rows.append(row)
                what = "scheduler tasks" if client is not None else "driver object refs"
                print(f"{engine_name:5s} step {i:5d} ({row['seconds']:6.1f} s): driver {row['driver_mib']:7.1f} MiB  "
                      f"workers {row['worker_mib']} MiB  {what} {held}  replay log {row['log_kib']} KiB",
                      flush=True)
    return rows


def _arm_kill(model, moment):
    """Kill shard 1's process now (``"between"``) or inside the next step (``"during"``); returns [kill time]."""
    p, kill_at, wait = psutil.Process(model.pids[1]), [], model._engine.reports

    def kill():
        kill_at.append(time.perf_counter())
        kill_and_wait(p)

    def kill_then_wait(finals, deadline):  # every call of the step is submitted, none waited for
        model._engine.reports = wait
        kill()
        return wait(finals, deadline)

    if moment == "during":
        model._engine.reports = kill_then_wait
    else:
        kill()
    return kill_at


def recovery_run(engine_name, kills, steps_before=50):
    ex = cp.get_executor(engine_name)
    cp.suffix_products([np.eye(2)] * 3, backend=ex, workers=2)
    ex = type(ex)(workers=2, timeout=300)
    chain = cp.mlp([8] * 64 + [1], seed=0)
    x = np.ones((1, 8))
    out = []
    with shard(chain, ex, shards=2, retries=2) as model:
        start, started = model._engine.start, []

        def timed_start(*args, **kwargs):
            pid = start(*args, **kwargs)
            started.append(time.perf_counter())
            return pid

        model._engine.start = timed_start
        for k in range(kills):
            normal = []
            for _ in range(steps_before):
                t = time.perf_counter()
                _, g = model.value_and_grad(x)
                model.sgd_step(g, 1e-4)
                normal.append(time.perf_counter() - t)
            moment = "during" if k % 2 else "between"
            started.clear()
            kill_at = _arm_kill(model, moment)
            _, g, tr = model.value_and_grad(x, return_trace=True)
            t_end = time.perf_counter()
            model.sgd_step(g, 1e-4)
            assert tr.replaced, "the killed shard was not replaced"
            row = dict(kill=k + 1, moment=moment, to_replaced=round(started[-1] - kill_at[0], 3),
                       to_step_end=round(t_end - kill_at[0], 3), ordinary_step=round(statistics.median(normal), 4),
                       log_steps=model._recovery.steps_logged)
            out.append(row)
            when = "during a step" if moment == "during" else "between steps"
            print(f"{engine_name:5s} kill {k + 1} ({when}): replaced after {row['to_replaced']:.3f} s, step done "
                  f"after {row['to_step_end']:.3f} s (ordinary step {1e3 * row['ordinary_step']:.1f} ms, "
                  f"{row['log_steps']} steps of log replayed)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--engines", default="ray,dask")
    ap.add_argument("--recovery", type=int, default=0, metavar="K", help="also time K kills per engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {}
    for engine in args.engines.split(","):
        result[engine] = {"memory": memory_run(engine, args.steps, args.every, args.checkpoint_every)}
        if args.recovery:
            result[engine]["recovery"] = recovery_run(engine, args.recovery)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
