"""The affine scan kernels written plainly with numpy: the reference the compiled ones are tested against.

Same contract as :mod:`chainprod.kernels.affine_numba` (see
:mod:`chainprod.kernels.affine_scan`), same flat plan, same buffer layout;
every step is an obvious numpy call, one op at a time (slow on purpose:
nothing here is clever enough to share a bug with the compiled kernel).
"""

from __future__ import annotations

import numpy as np

__all__ = ["run_plan", "run_loop", "form_blocks"]


def _state(buf, off, N, d):
    return buf[off:off + N * d].reshape(N, d)


def _map(buf, off, N, d, diag):
    """``(A, c)`` of the map at ``off``: ``A`` ``(N, d, d)`` or its diagonal ``(N, d)``, ``c`` ``(N, d)``."""
    if diag:
        blk = buf[off:off + N * 2 * d].reshape(N, 2 * d)
        return blk[:, :d], blk[:, d:]
    blk = buf[off:off + N * d * (d + 1)].reshape(N, d, d + 1)
    return blk[..., :d], blk[..., d]


def _apply(A, c, h):
    return (A * h if A.ndim == 2 else np.matmul(A, h[..., None])[..., 0]) + c


def run_plan(plan, buf, N, d, diag, n):
    """``(states (n, N, d), bad)``: every op of the flat plan in order, then the prefixes ``1 .. n``."""
    for o in range(plan.n_ops):
        lo, ro, oo = int(plan.op_left[o]), int(plan.op_right[o]), int(plan.op_out[o])
        A2, c2 = _map(buf, ro, N, d, diag)
        if plan.op_m[o] == 1:  # the left operand holds the start state: apply the map to it
            res = _apply(A2, c2, _state(buf, lo, N, d))
        else:  # (A2, c2) o (A1, c1) = (A2 A1, A2 c1 + c2)
            A1, c1 = _map(buf, lo, N, d, diag)
            res = np.concatenate([A2 * A1, _apply(A2, c2, c1)], axis=-1) if diag else \
                np.concatenate([np.matmul(A2, A1), _apply(A2, c2, c1)[..., None]], axis=-1)
        buf[oo:oo + res.size] = res.reshape(-1)  # formed before stored: an operand may be overwritten
    states = np.stack([_state(buf, int(plan.out_off[k]), N, d) for k in range(1, n + 1)])
    return states, _first_bad(states)


def run_loop(buf, pos_off, h0, diag, n):
    """``(states, bad)`` by ``h_t = A_t h_{t-1} + c_t``, one step after another."""
    N, d = h0.shape
    states = np.empty((n, N, d), h0.dtype)
    h = h0
    for t in range(n):
        A, c = _map(buf, int(pos_off[t]), N, d, diag)
        h = states[t] = _apply(A, c, h)
    return states, _first_bad(states)


def form_blocks(J, F, prev, x, lam, buf, pos_off):
    """Step ``t``'s ``[J_t | c_t]``, ``c_t = F_t - J_t prev_t``, damped by ``lam``, into ``buf[pos_off[t]:]``."""
    n, N, d = F.shape
    diag = J.ndim == 3
    c = F - (J * prev if diag else np.matmul(J, prev[..., None])[..., 0])
    if lam:
        c = (c + lam * x) / (1 + lam)
        J = J / (1 + lam)
    for t in range(n):
        off = int(pos_off[t])
        blk = np.concatenate([J[t], c[t]], axis=-1) if diag else np.concatenate([J[t], c[t][..., None]], axis=-1)
        buf[off:off + blk.size] = blk.reshape(-1)


def _first_bad(states):
    ok = np.isfinite(states.reshape(states.shape[0], -1)).all(axis=1)
    return -1 if ok.all() else int(np.flatnonzero(~ok)[0])
