"""The single-machine fast path: each round as a few batched numpy calls."""

from __future__ import annotations

from ..planning.bind import bind
from .base import Executor, SlabResult, TraceEvent, alloc_slabs, run_group


class VectorizedExecutor(Executor):
    """Runs every round of the plan as one batched kernel per slab group.

    The plan is bound to the block shapes once (cached); a run then costs a
    handful of numpy calls per round, on strided views where the slots of a
    round form arithmetic progressions. Blocks that chainprod owns (the
    Jacobians inside :func:`chainprod.grad`) are used in place, so peak memory
    stays near the Jacobians' own bytes.
    """

    name = "vectorized"

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):
        self.check_options(options)
        plan = bind(schedule, blocks)
        slabs = alloc_slabs(plan, blocks)
        for r, groups in enumerate(plan.rounds):
            t0 = trace.clock() if trace else 0.0
            for g in groups:
                run_group(g, slabs)
            if trace:
                trace.add(TraceEvent(r, "main", t0, trace.clock(), sum(g.size for g in groups), f"round-{r}"))
        return SlabResult(plan, slabs)
