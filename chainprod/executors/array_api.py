"""The vectorized executor's rounds, once, for every array library: torch, JAX, CuPy (and numpy).

The ``"array"`` backend runs the same bound plan as ``"vectorized"``
(:func:`chainprod.planning.bind`: slabs of one block shape, one batched
combine per slab group and round) with the array API namespace of the
blocks (:func:`chainprod.arrays.namespace`) instead of numpy, so the
arrays never leave their library or device:

* slabs are allocated with ``xp`` on the blocks' device, in their dtype;
* rows that are views stay views: slices, and the two-level block
  patterns of log-depth schedules such as Sklansky's
  (:mod:`chainprod.executors.array_views`), which turn a round's gathers
  and scatter into reshaped views of the slabs; the remaining row indices
  are converted to the library's integer arrays on that device once per
  bound plan and device, and kept (:data:`_INDEX`);
* every combine is a kernel of :data:`chainprod.kernels.array_blocks.ARRAY_COMBINE`:
  a new array per group, written into the out slab after it is complete,
  so an in-place circuit (out rows among the operands') needs no buffer;
* JAX arrays are immutable and eager JAX calls are costly: a plan runs
  compiled, as one ``jax.jit`` function or one compiled step per group
  (:mod:`chainprod.executors.array_jax`). With a trace, every library runs
  round by round and each round is waited for, so the trace holds real
  per-round times.

A run makes no host round trip: nothing is copied to numpy and no value
is read back. The result keeps the slabs; :class:`ArraySlabResult` reads
blocks and stacks from them in the library, and only
:meth:`~ArraySlabResult.first_nonfinite` reads one boolean back per slab.
"""

from __future__ import annotations

import numpy as np

from .._caches import PlanCache
from ..arrays import device_of, is_jax, library_of, namespace, set_rows, to_device_like, to_numpy
from ..kernels.array_blocks import array_kernel
from ..planning.bind import as_index, bind
from .array_jax import run_jax, x64
from .array_views import operand, split_group
from .base import Executor, SlabResult, TraceEvent

__all__ = ["ArrayExecutor", "ArraySlabResult"]

# (schedule key, block signature, library, device) -> per round, its ops (see _steps) with index
# arrays on the device
_INDEX = PlanCache(maxsize=64)


class ArrayExecutor(Executor):
    """Runs every round of the plan as one batched array-API call per slab group, in the blocks' library.

    ``blocks`` is a :class:`~chainprod.blocks.BlockSeq` whose segment arrays
    are of one library (torch, JAX, CuPy or numpy) on one device; results
    stay there (:class:`ArraySlabResult`). Blocks chainprod owns are used in
    place where a slab is exactly one segment (not for JAX, whose arrays
    are immutable anyway); blocks a user passed are never written.
    """

    name = "array"

    def run(self, schedule, blocks, *, workers=None, trace=None, **options):
        self.check_options(options)
        plan = bind(schedule, blocks)
        like = blocks.segments[0].array
        xp = namespace(like)
        lib = library_of(like)
        key = (schedule.key, blocks.signature())
        # JAX's index arrays take the integer width of the x64 setting they were made under
        where = (lib, str(device_of(like)), x64() if lib == "jax" else None)
        steps = _INDEX.get((*key, *where), lambda: _steps(plan, like, lib))
        sync = _sync(lib, like)

        def on_round(r, t0, groups, slabs):
            if trace:
                sync(slabs)  # accelerators return before the work is done: wait, for honest times
                trace.add(TraceEvent(r, "main", t0, trace.clock(), sum(g[-1] for g in groups), f"round-{r}"))

        if lib == "jax":
            slabs = run_jax(plan, steps, key, blocks, trace, on_round)
        else:
            slabs = _alloc(xp, plan, blocks, like)
            take = _taker(lib)
            for r, groups in enumerate(steps):
                t0 = trace.clock() if trace else 0.0
                _round(xp, groups, slabs, take)
                on_round(r, t0, groups, slabs)
        return ArraySlabResult(plan, slabs, xp, lib)


def _steps(plan, like, lib):
    """The plan's groups with kernels from the array table and row indices on ``like``'s device.

    JAX (compiled) gets one op ``(kernel, left, li, right, ri, out, oi, size)`` per group; the other
    libraries get ops ``(kernel, left, li, right, ri, out, oi, shape, size)`` with view patterns
    (:func:`chainprod.executors.array_views.split_group`).
    """
    def index(ix):
        if not isinstance(ix, np.ndarray) or lib == "numpy":  # slices, views; numpy rows as they are
            return ix
        return to_device_like(ix, like, np.int64)

    rounds = []
    for groups in plan.rounds:
        ops = []
        for g in groups:
            kernel = array_kernel(plan.slabs[g.left].kind, plan.slabs[g.right].kind)
            if lib == "jax":  # numpy rows are constants under jit
                ops.append((kernel, g.left, g.li, g.right, g.ri, g.out, g.oi, g.size))
                continue
            lengths = [plan.slabs[i].count for i in (g.left, g.right, g.out)]
            for li, ri, oi, shape, size in split_group(g.li, g.ri, g.oi, g.size, lengths):
                ops.append((kernel, g.left, index(li), g.right, index(ri), g.out, index(oi), shape, size))
        rounds.append(tuple(ops))
    return tuple(rounds)


def _round(xp, groups, slabs, take):
    """One round: ``slabs[out][oi] = kernel(slabs[left][li], slabs[right][ri])`` per group.

    Slices and grids are views; integer rows are gathered by ``take(slab, rows)``.
    """
    for kernel, left, li, right, ri, out, oi, shape, _ in groups:
        value = kernel(xp, operand(xp, slabs[left], li, shape, take), operand(xp, slabs[right], ri, shape, take))
        # the kernel's result is a new array, complete before the write: in-place circuits are safe
        if shape is None:
            slabs[out] = set_rows(xp, slabs[out], oi, value)
        else:
            oi.view(xp, slabs[out])[...] = value  # a view of the (contiguous) out slab: written in place


def _taker(lib):
    """``take(slab, rows)``: the rows of a slab. torch's ``index_select`` directly, since the array API's
    ``take`` adds a pass for negative indices on torch (ours never are) and indexing parses its key."""
    if lib == "torch":
        import torch
        return lambda slab, rows: torch.index_select(slab, 0, rows)
    return lambda slab, rows: slab[rows]


def _alloc(xp, plan, blocks, like):
    """Slabs in the blocks' library and device; an owned segment that is a whole slab is used in place."""
    slabs = [None] * len(plan.slabs)
    if blocks.owned and not is_jax(xp):
        for (sid, rows), seg in zip(plan.placement, blocks.segments):
            if (isinstance(rows, slice) and rows.start == 0 and rows.step in (None, 1)
                    and plan.slabs[sid].count == seg.count and _writeable_contiguous(seg.array)):
                slabs[sid] = seg.array
    device = device_of(like)
    for i, s in enumerate(plan.slabs):
        if slabs[i] is None:
            slabs[i] = xp.empty(s.shape(blocks.batch), dtype=blocks.dtype, device=device)
    for (sid, rows), seg in zip(plan.placement, blocks.segments):
        if slabs[sid] is not seg.array:
            slabs[sid] = set_rows(xp, slabs[sid], rows, seg.array)
    return slabs


def _writeable_contiguous(a):
    """Safe to use as a slab: written in place, and reshaped into grid views (which must not copy)."""
    if hasattr(a, "is_contiguous"):  # torch
        return bool(a.is_contiguous())
    flags = a.flags  # numpy (read-only views exist) and CuPy
    return bool(getattr(flags, "writeable", True)) and bool(flags.c_contiguous)


def _sync(lib, like):
    """A function that waits until the work queued on the slabs is done (for trace timings)."""
    if lib == "torch" and like.device.type == "cuda":
        import torch
        return lambda slabs: torch.cuda.synchronize(like.device)
    if lib == "jax":
        return lambda slabs: [s.block_until_ready() for s in slabs]
    if lib == "cupy":
        import cupy
        return lambda slabs: cupy.cuda.get_current_stream().synchronize()
    return lambda slabs: None


class ArraySlabResult(SlabResult):
    """Prefix products held in the slabs of a bound plan, in the blocks' library and device.

    ``block(k)`` and ``stack()`` return arrays of that library (views where
    the library has them); ``first_nonfinite()`` reads one boolean per slab
    back to the host, and a row mask only for a slab that holds a non-finite value.
    """

    def __init__(self, plan, slabs, xp, library):
        super().__init__(plan, slabs)
        self.xp = xp
        self.library = library

    def stack(self, positions=None):
        ks = self.available() if positions is None else np.asarray(positions, dtype=np.int64)
        sids = self.plan.out_slab[ks]
        if ks.size and np.all(sids == sids[0]) and sids[0] >= 0:
            s = int(sids[0])
            rows = as_index(self.plan.out_row[ks])
            arr = self.slabs[s]
            if not isinstance(rows, slice) and self.library not in ("numpy", "jax"):
                rows = to_device_like(rows, arr, np.int64)
            return self.plan.slabs[s].kind, arr[rows]
        blocks = [self.block(int(k)) for k in ks]
        if len({b[0] for b in blocks}) != 1 or len({tuple(b[1].shape) for b in blocks}) != 1:
            return None
        return blocks[0][0], self.xp.stack([b[1] for b in blocks])

    def first_nonfinite(self):
        xp = self.xp
        bad = []
        for s in np.unique(self.plan.out_slab[self.plan.out_slab >= 0]):
            arr = self.slabs[int(s)]
            if bool(xp.all(xp.isfinite(arr))):  # the common case: one boolean back, no per-row reduction
                continue
            rows = self.plan.out_row[self.plan.out_slab == s]
            ks = np.flatnonzero(self.plan.out_slab == s)
            ok = to_numpy(xp.all(xp.isfinite(xp.reshape(arr, (arr.shape[0], -1))), axis=1))[rows]
            if not ok.all():
                bad.append(int(ks[np.flatnonzero(~ok)[0]]))
        return min(bad) if bad else None

