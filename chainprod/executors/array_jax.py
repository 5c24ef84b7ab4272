"""JAX runs of a bound plan: the whole plan as one compiled function, or one compiled step per group.

JAX arrays are immutable and every eager JAX call is a dispatch of its own
(tens of microseconds on a CPU), and an eager ``slab.at[rows].set(v)``
copies the whole slab. So a plan runs compiled, in one of two ways:

* **whole plan** (plans of at most :data:`JIT_MAX_GROUPS` groups: the
  log-depth schedules of blocks of a few shapes): one ``jax.jit`` function from
  the input segments to the slabs that hold outputs, compiled once per
  plan and input shapes; a run is one dispatch. XLA's compile time grows
  with every op it holds (a tenth of a second or more per group on a CPU),
  which is why long plans do not take this way.
* **step by step** (longer plans, such as ``sequential`` over many
  positions, and every run that records a trace): one compiled
  step per group, ``out.at[oi].set(kernel(left[li], right[ri]))``, whose
  row indices are traced integer arrays (made once per plan and device),
  so every group of the same shapes shares one compiled step, and whose
  ``out`` slab is donated, so the update is made in place.

Gathers and scatters tell XLA what the plan knows of their row indices
(ascending, no repeats: :class:`Rows`), which spares it a sort and a
serialised scatter; a slice stays a slice.

``jax`` is imported only when a JAX run happens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .._caches import PlanCache
from ..arrays import device_of

__all__ = ["JIT_MAX_GROUPS", "Rows", "get_rows", "set_rows", "run_jax"]

#: plans with at most this many groups (kernel calls) run as one compiled function
JIT_MAX_GROUPS = 32

# (schedule key, block signature) -> the jitted whole-plan function
_WHOLE = PlanCache(maxsize=32)
# (schedule key, block signature, device) -> steps with integer row arrays on the device
_ROWS = PlanCache(maxsize=32)


class Rows(NamedTuple):
    """Row indices for XLA: a slice stays a slice; an integer array carries what XLA may assume of it."""

    index: object
    #: ascending (XLA's gather and scatter then skip sorting)
    sorted: bool
    #: no row twice (a scatter then needs no ordering of its writes)
    unique: bool


def _rows(ix):
    if isinstance(ix, slice):
        return Rows(ix, True, True)
    # int32 whatever JAX's x64 setting: an int64 constant traced with x64 off meets int32 sizes and fails
    ix = np.asarray(ix, dtype=np.int32)
    return Rows(ix, bool(np.all(np.diff(ix) >= 0)), bool(np.unique(ix).size == ix.size))


def get_rows(slab, rows: Rows):
    """``slab[rows]`` (gather with the index's hints)."""
    if isinstance(rows.index, slice):
        return slab[rows.index]
    return slab.at[rows.index].get(indices_are_sorted=rows.sorted, unique_indices=rows.unique,
                                   mode="promise_in_bounds")


def set_rows(slab, rows: Rows, value):
    """``slab`` with ``slab[rows] = value`` (functional; a scatter with the index's hints)."""
    if isinstance(rows.index, slice):
        return slab.at[rows.index].set(value)
    return slab.at[rows.index].set(value, indices_are_sorted=rows.sorted, unique_indices=rows.unique,
                                   mode="promise_in_bounds")


def x64() -> bool:
    """Whether JAX runs with 64-bit types now: index arrays made under one setting fail under the other."""
    import jax

    return jax.dtypes.canonicalize_dtype(np.int64) == np.int64


def run_jax(plan, steps, key, blocks, trace=None, on_round=None):
    """Run ``plan`` on JAX ``blocks``; returns the list of slabs (``None`` where a slab holds no output
    in a whole-plan run). ``steps`` are the plan's groups as :mod:`chainprod.executors.array_api` makes
    them; ``on_round(r, t0, groups, slabs)`` is called after each round of a step-by-step run."""
    inputs = tuple(s.array for s in blocks.segments)
    if trace is None and sum(len(g) for g in steps) <= JIT_MAX_GROUPS:
        run = _WHOLE.get((*key, x64()), lambda: _whole_plan(plan, steps))
        return list(run(inputs))
    device = device_of(inputs[0])
    rows = _ROWS.get((*key, str(device), x64()), lambda: _device_rows(steps, device))
    # a donated slab is consumed: never let an input (the caller's array) be one
    slabs = _place(plan, inputs, written={g[5] for groups in steps for g in groups})
    step = _step_function()
    for r, groups in enumerate(rows):
        t0 = trace.clock() if trace else 0.0
        for kernel, left, li, right, ri, out, oi, flags in groups:
            slabs[out] = step(kernel, left == out, right == out, flags, slabs[out],
                              None if left == out else slabs[left], None if right == out else slabs[right],
                              li, ri, oi)
        if on_round is not None:
            on_round(r, t0, steps[r], slabs)
    return slabs


def _place(plan, inputs, written=()):
    """The slabs' first values: an input that is a whole slab is the slab (immutable), else zeros + rows.

    Slabs in ``written`` (updated by donated steps) are always new arrays.
    """
    import jax.numpy as jnp

    slabs = [None] * len(plan.slabs)
    for (sid, rows), arr in zip(plan.placement, inputs):
        if slabs[sid] is None and sid not in written and isinstance(rows, slice) and rows.start == 0 \
                and rows.step in (None, 1) and plan.slabs[sid].count == arr.shape[0]:
            slabs[sid] = arr
    for i, s in enumerate(plan.slabs):
        if slabs[i] is None:
            slabs[i] = jnp.zeros(s.shape(inputs[0].shape[1]), dtype=inputs[0].dtype)
    for (sid, rows), arr in zip(plan.placement, inputs):
        if slabs[sid] is not arr:
            slabs[sid] = slabs[sid].at[rows].set(arr)
    return slabs


def _whole_plan(plan, steps):
    """The whole plan as one ``jax.jit`` function of the input segments -> the slabs holding outputs."""
    import jax
    import jax.numpy as jnp

    keep = {int(s) for s in np.unique(plan.out_slab[plan.out_slab >= 0])}
    steps = tuple(tuple((k, left, _rows(li), right, _rows(ri), out, _rows(oi), n)
                        for k, left, li, right, ri, out, oi, n in groups) for groups in steps)

    def run(inputs):
        slabs = _place(plan, inputs)
        for groups in steps:
            for kernel, left, li, right, ri, out, oi, _ in groups:
                value = kernel(jnp, get_rows(slabs[left], li), get_rows(slabs[right], ri))
                slabs[out] = set_rows(slabs[out], oi, value)
        return tuple(s if i in keep else None for i, s in enumerate(slabs))

    return jax.jit(run)


def _device_rows(steps, device):
    """``steps`` with every row index (slice or array) as an integer array on ``device``; the last field
    of a group becomes the indices' hints ``((sorted, unique) of li, ri, oi)``, static in the step."""
    import jax

    def rows(ix, n):
        arr = np.arange(ix.start, ix.start + n * (ix.step or 1), ix.step or 1) if isinstance(ix, slice) else ix
        return _rows(arr)

    out = []
    for groups in steps:
        made = []
        for k, left, li, right, ri, o, oi, n in groups:
            rs = (rows(li, n), rows(ri, n), rows(oi, n))
            arrays = [jax.device_put(np.asarray(r.index, dtype=np.int32), device) for r in rs]
            made.append((k, left, arrays[0], right, arrays[1], o, arrays[2], tuple((r.sorted, r.unique) for r in rs)))
        out.append(tuple(made))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _step_function():
    """One compiled group step; ``out`` is donated (updated in place) and passed once even when it is
    also an operand (``left_is_out`` / ``right_is_out``: that operand is read from ``out``)."""
    import jax
    import jax.numpy as jnp

    def step(kernel, left_is_out, right_is_out, flags, out, left, right, li, ri, oi):
        (ls, lu), (rs, ru), (os_, ou) = flags
        a = get_rows(out if left_is_out else left, Rows(li, ls, lu))
        b = get_rows(out if right_is_out else right, Rows(ri, rs, ru))
        return set_rows(out, Rows(oi, os_, ou), kernel(jnp, a, b))

    return jax.jit(step, static_argnums=(0, 1, 2, 3), donate_argnums=(4,))
