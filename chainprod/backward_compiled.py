"""The compiled backward pass: one kernel call for backprop, two for a scan.

Backprop is the fused sequential loop of :mod:`chainprod.kernels` (delta,
parameter VJPs and the next row, layer after layer, no Jacobian formed): the
baseline of every speed claim. A scan forms every Jacobian and runs every
round of its schedule inside one kernel call
(:func:`chainprod.kernels.scan.scan_rows`, threads = ``workers``), then the
parameter VJPs of all layers run in parallel. Any chain: mixed activations,
widths, dense and diagonal layers.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .errors import NonFiniteError
from .executors import TraceEvent
from .kernels import LayerGrads, first_nonfinite_layer, get_kernels
from .kernels.scan import scan_rows
from .tape import Tape, flat_tape

__all__ = ["backprop_grads", "scan_grads"]


def backprop_grads(tape: Tape, cotangent, kernels="numba") -> list[tuple]:
    """Per-layer gradients by the compiled sequential backprop loop."""
    pc, x, Y = flat_tape(tape)
    grads, bad = get_kernels(kernels).backprop(pc, x, Y, np.ascontiguousarray(cotangent))
    L = pc.L
    if bad >= 0:
        # delta_bad = v_bad * act' and v_bad = cotangent . A_{L-1} ... A_{bad+1}
        first = bad + 1
        raise NonFiniteError(
            f"backprop produced a non-finite gradient: the product of the input Jacobians of "
            f"layers {min(first, L - 1)}..{L - 1} (0-based) overflowed", (min(first, L - 1), L - 1))
    return _checked(pc, grads, kernels)


def scan_grads(tape: Tape, cotangent, sched, workers, trace, kernels="numba") -> list[tuple]:
    """Per-layer gradients with every ``v_l`` from one compiled scan of ``sched`` on ``workers`` threads."""
    pc, x, Y = flat_tape(tape)
    L = pc.L
    t0 = trace.clock() if trace is not None else 0.0
    V, bad = scan_rows(pc, Y, np.ascontiguousarray(cotangent), sched, workers=workers, kernels=kernels)
    if trace is not None:
        # one kernel call runs every round: the trace records it as one task
        trace.add(TraceEvent(0, f"{kernels}-threads", t0, trace.clock(), sched.num_ops, "compiled scan"))
    if bad >= 0:
        lo = L - 1 - bad - 1
        raise NonFiniteError(
            f"non-finite value in the product of the input Jacobians of layers {lo + 1}..{L - 1} "
            f"(0-based): the chain product overflowed; scale the weights down or shorten the chain",
            (lo + 1, L - 1))
    with _threads(kernels, workers):
        grads, bad = get_kernels(kernels).param_grads(pc, x, Y, V)
    return _checked(pc, grads, kernels)


@contextlib.contextmanager
def _threads(kernels, workers):
    """The VJPs run on the same ``workers`` threads as the scan (numba's count is per process)."""
    if kernels != "numba" or workers is None:
        yield
        return
    import numba  # the compiled set is loaded already: this costs nothing

    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(workers), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _checked(pc, grads, kernels):
    if get_kernels(kernels).all_finite(grads):  # the common case: one pass, no per-layer search
        return LayerGrads(pc, grads)
    l = first_nonfinite_layer(pc, grads)
    if l >= 0:
        raise NonFiniteError(f"the parameter gradient of layer {l} overflowed (delta^T x is not "
                             "finite although both factors are)", (l, l))
    return LayerGrads(pc, grads)
