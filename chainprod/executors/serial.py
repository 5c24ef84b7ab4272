"""The reference executor: one op at a time, in plan order, plain numpy."""

from __future__ import annotations

from ..blocks import COMBINE
from .base import Executor, ListResult, TraceEvent


class SerialExecutor(Executor):
    """Runs each op on its own. Slow and obvious: the yardstick for the others."""

    name = "serial"

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):
        self.check_options(options)
        slots = [None] * schedule.n_slots
        for p in range(len(blocks)):
            slots[p] = blocks.block(p)
        for r, st in enumerate(schedule.steps):
            t0 = trace.clock() if trace else 0.0
            # Rounds are order-free (validate() proves it), so plain order is fine.
            for a, b, o in zip(st.left.tolist(), st.right.tolist(), st.out.tolist()):
                (ka, xa), (kb, xb) = slots[a], slots[b]
                rule = COMBINE[(ka, kb)]
                slots[o] = (rule.out, rule.kernel(xa, xb))
            if trace:
                trace.add(TraceEvent(r, "main", t0, trace.clock(), len(st), f"round-{r}"))
        return ListResult(slots[s] if s >= 0 else None for s in schedule.outputs.tolist())
