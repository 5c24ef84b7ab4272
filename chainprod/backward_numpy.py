"""The numpy reference backward pass: backprop and scans through the executors.

Backprop forms ``v_l = cotangent . A_L ... A_{l+1}`` one layer after another,
one vector-Jacobian product per layer, no Jacobian matrix. A scan forms the
Jacobians of a whole run in one batched call and hands them, in scan order,
to an executor::

    scan order:  [cotangent . A_L,  A_{L-1},  A_{L-2},  ...,  A_2]
    prefix [0,k] = cotangent . A_L ... A_{L-k} = v_{L-k-1}

Position 0 is a thin ``1 x w`` block, so every prefix is thin too. This is
the path of ``kernels="numpy"`` and of the ``serial`` backend, and the
reference the compiled kernels are tested against.
"""

from __future__ import annotations

import numpy as np

from .blocks import COMBINE, KINDS, BlockSeq, Segment
from .errors import NonFiniteError
from .executors import get_executor
from .tape import Tape

__all__ = ["backprop_grads", "scan_grads", "jacobian_shapes"]


def backprop_grads(tape: Tape, cotangent) -> list[tuple]:
    """Per-layer gradients by sequential backprop (numpy)."""
    return _param_grads(tape, _backprop_deltas(tape, cotangent))


def scan_grads(tape: Tape, cotangent, sched, backend, workers, trace, engine_options) -> list[tuple]:
    """Per-layer gradients with every ``v_l`` from one scan of ``sched`` on an executor."""
    return _param_grads(tape, _scan_deltas(tape, cotangent, sched, backend, workers, trace, engine_options))


def _param_grads(tape, deltas):
    grads = []
    for r, run in enumerate(tape.chain.runs):
        with np.errstate(over="ignore", invalid="ignore"):
            gs = run.cls.param_grads(run.params, deltas[r], tape.run_inputs(r))
        for g in gs:
            if np.isfinite(g).all():  # the common case: one pass, no per-layer reduction
                continue
            ok = np.isfinite(g.reshape(g.shape[0], -1)).all(axis=1)
            if not ok.all():
                l = run.start + int(np.flatnonzero(~ok)[0])
                raise NonFiniteError(f"the parameter gradient of layer {l} overflowed (delta^T x is not "
                                     "finite although both factors are)", (l, l))
        # list(array) makes the per-layer views in C; zip pairs them per layer
        grads += zip(*(list(g) for g in gs))
    return grads


def jacobian_shapes(chain, batch: int = 1) -> BlockSeq:
    """The scan sequence of the Jacobian blocks of ``chain`` as shapes only (zero-stride views, no memory).

    Kept on the chain per batch size: a chain is immutable, and building the
    sequence costs a few microseconds per run of equal layers (tens of
    milliseconds for a chain whose layers alternate), which a training loop
    must not pay per step.
    """
    kept = chain.__dict__.setdefault("_jacobian_shapes", {})
    if batch not in kept:
        kept[batch] = _jacobian_shapes(chain, batch)
    return kept[batch]


def _jacobian_shapes(chain, N) -> BlockSeq:
    dt = chain.dtype
    L = len(chain)
    last = chain.layers[-1]
    segments = [Segment("dense", np.broadcast_to(np.zeros((), dt), (1, N, 1, last.d_in)))]
    for run in reversed(chain.runs):
        a, b = max(run.start, 1), min(run.start + run.count, L - 1)
        if a < b:
            shape = KINDS[run.cls.kind].shape(run.d_out, run.d_in)
            segments.append(Segment(run.cls.kind, np.broadcast_to(np.zeros((), dt), (b - a, N, *shape))))
    return BlockSeq(segments)


def _derivs(tape, r):
    run = tape.chain.runs[r]
    return run.cls.derivs(tape.outputs[r], run.activation)


def _backprop_deltas(tape, cotangent):
    """The sequential baseline: one vector-Jacobian product per layer, last to first."""
    deltas = []
    g = cotangent
    for r in reversed(range(len(tape.chain.runs))):
        run = tape.chain.runs[r]
        S = _derivs(tape, r)
        D = np.empty_like(S)
        g = run.cls.backprop(run.params, S, g, D)
        ok = np.isfinite(D.reshape(D.shape[0], -1)).all(axis=1) if not np.isfinite(D).all() else None
        if ok is not None:
            # delta_l = v_l * act' and v_l = cotangent . A_L ... A_{l+1}
            first, last = run.start + int(np.flatnonzero(~ok)[-1]) + 1, len(tape.chain) - 1
            raise NonFiniteError(
                f"backprop produced a non-finite gradient: the product of the input Jacobians of "
                f"layers {first}..{last} (0-based) overflowed", (first, last))
        deltas.append(D)
    return deltas[::-1]


def _scan_deltas(tape, cotangent, sched, backend, workers, trace, engine_options):
    chain = tape.chain
    L = len(chain)
    runs = chain.runs
    S = [_derivs(tape, r) for r in range(len(runs))]
    # v[l] per layer, as per-run stacks G[r] of shape (count, N, d_out).
    G = [np.empty_like(s) for s in S]
    G[-1][-1] = cotangent
    if L > 1:
        seq = _jacobian_blocks(chain, S, cotangent)
        result = get_executor(backend).run(sched, seq, workers=workers, trace=trace, **engine_options)
        bad = result.first_nonfinite()
        if bad is not None:
            lo = L - 1 - bad - 1
            raise NonFiniteError(
                f"non-finite value in the product of the input Jacobians of layers {lo + 1}..{L - 1} "
                f"(0-based): the chain product overflowed; scale the weights down or shorten the chain",
                (lo + 1, L - 1))
        stacked = result.stack()
        for r, run in enumerate(runs):
            a, b = run.start, min(run.start + run.count, L - 1)  # layers whose v comes from the scan
            if a >= b:
                continue
            # layer l <- prefix k = L-2-l; layers a..b-1 are prefixes L-2-a down to L-1-b
            ks = np.arange(L - 2 - a, L - 2 - b, -1)
            if stacked is not None:
                G[r][: b - a] = stacked[1][L - 1 - b: L - 1 - a][::-1].reshape(b - a, *G[r].shape[1:])
            else:
                for i, k in enumerate(ks):
                    G[r][i] = result.block(int(k))[1].reshape(G[r].shape[1:])
    return [g * s for g, s in zip(G, S)]


def _jacobian_blocks(chain, S, cotangent) -> BlockSeq:
    """The scan sequence ``[cotangent . A_L, A_{L-1}, ..., A_2]`` as stacked segments (owned)."""
    L = len(chain)
    runs = chain.runs
    last = runs[-1]
    # Head: cotangent (N, 1, d_L) times the last layer's Jacobian.
    J_last = last.cls.jacobians(tuple(p[-1:] for p in last.params), S[-1][-1:])[0]
    rule = COMBINE[("dense", last.cls.kind)]
    head = rule.kernel(cotangent[:, None, :], J_last)
    segments = [Segment("dense", head[None])]
    for r in reversed(range(len(runs))):
        run = runs[r]
        a = max(run.start, 1)  # layer 0's Jacobian is never needed
        b = min(run.start + run.count, L - 1)  # layer L-1 is inside the head
        if a >= b:
            continue
        ia, ib = a - run.start, b - run.start
        # Scan order is last layer first. Run parameters are stored that way,
        # so the Jacobians come out contiguous in scan order (reading or
        # writing a reversed view of a big stack is several times slower).
        n = run.count
        P = tuple(p[n - ib: n - ia] for p in run.reversed)
        segments.append(Segment(run.cls.kind, run.cls.jacobians(P, S[r][ia:ib][::-1])))
    return BlockSeq(segments, owned=True)
