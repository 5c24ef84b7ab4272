"""Planning: a schedule bound to real block shapes, ready for an executor.

Everything here is pure: from a *schedule*
(:class:`~chainprod.schedules.Schedule`) and the shapes of the blocks it
will run on, it derives what an executor needs without touching a single
array of values: a *bound plan* (:mod:`.bind`, batched groups of ops for the
numpy executors), a *flat plan* (:mod:`.flat`, an op table for the compiled
kernels) or a *partition* (:mod:`.partition`, per-worker task chains for Ray
and Dask). All three read the schedule through
:func:`~chainprod.schedules.replay`, the one definition of what a schedule
means, so a broken schedule fails with one message whichever planner meets it.
"""
