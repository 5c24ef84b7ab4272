"""Planning: a schedule bound to real block shapes, ready for an executor.

Everything here is pure: from a :class:`~chainprod.schedules.Schedule` and
the shapes of the blocks it will run on, it derives what an executor needs
(batched groups of ops, partitions over workers, flat op tables for the
compiled kernels) without touching a single array of values.
"""
