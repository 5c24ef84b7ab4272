"""Threads on one machine: each round split into ``workers`` coarse parts.

numpy releases the GIL inside its kernels, so threads give real parallelism
for batched matmuls; each worker is limited to one BLAS thread so that P
workers use P cores, not P times the BLAS pool (oversubscription).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from .._caches import cpu_count
from ..planning.bind import bind
from .base import Executor, SlabResult, TraceEvent, alloc_slabs, run_group


class ThreadsExecutor(Executor):
    """``workers`` threads; every round's ops split into at most ``workers`` contiguous parts."""

    name = "threads"

    def __init__(self):
        self._pools: dict[int, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()

    def _pool(self, workers):
        with self._lock:
            if workers not in self._pools:
                self._pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"chainprod-{workers}")
            return self._pools[workers]

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):
        self.check_options(options)
        workers = workers or cpu_count()
        plan = bind(schedule, blocks)
        slabs = alloc_slabs(plan, blocks)
        pool = self._pool(workers)

        def task(r, parts):
            t0 = trace.clock() if trace else 0.0
            for g, lo, hi in parts:
                run_group(g, slabs, lo, hi)
            if trace:
                trace.add(TraceEvent(r, threading.current_thread().name, t0, trace.clock(),
                                     sum(hi - lo for _, lo, hi in parts), f"round-{r}"))

        with threadpool_limits(limits=1, user_api="blas"):
            for r, groups in enumerate(plan.rounds):
                tasks = _split(groups, workers)
                if len(tasks) == 1:  # no point paying a thread hop
                    task(r, tasks[0])
                    continue
                for f in [pool.submit(task, r, parts) for parts in tasks]:
                    f.result()
        return SlabResult(plan, slabs)


def _split(groups, workers):
    """Cut a round's groups into at most ``workers`` tasks of near-equal op counts."""
    total = sum(g.size for g in groups)
    n = max(1, min(workers, total))
    share = -(-total // n)
    tasks, cur, room = [], [], share
    for g in groups:
        lo = 0
        while lo < g.size:
            take = min(room, g.size - lo)
            cur.append((g, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                tasks.append(cur)
                cur, room = [], share
    if cur:
        tasks.append(cur)
    return tasks
