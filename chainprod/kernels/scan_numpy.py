"""The scan kernels written plainly with numpy: the reference the compiled ones are tested against.

Same contract as :mod:`chainprod.kernels.scan` (see :func:`run_scan`), same
flat plan, same buffer layout; every step is an obvious numpy call, one
position or one op at a time (so it is slow on long chains, on purpose:
nothing here is clever enough to share a bug with the compiled kernel).
"""

from __future__ import annotations

import numpy as np

from ..activations import derivative_from_output
from .pack import ACT_NAMES

__all__ = ["run_scan", "form_blocks", "derivative"]


def derivative(act: int, y: np.ndarray) -> np.ndarray:
    """``act'(z)`` from the layer output ``y = act(z)``, for an activation code of the packed layout.

    The rule is the one of :data:`chainprod.activations.ACTIVATIONS` for that code's name.
    """
    return derivative_from_output(ACT_NAMES[act], y)


def _layer(pc, Y, N, j):
    r, c = int(pc.d_out[j]), int(pc.d_in[j])
    y = Y[N * pc.y_off[j]:N * pc.y_off[j + 1]].reshape(N, r)
    p = pc.theta[pc.p_off[j]:pc.p_off[j + 1]]
    first = p[:r * c].reshape(r, c) if pc.kind[j] == 0 else p[:r]  # W or a
    return derivative(int(pc.act[j]), y), first


def form_blocks(pc, Y, cotangent, plan, buf):
    """Write every scan position's block into its slot of ``buf``.

    Position 0 is the thin head ``cotangent . A_{L-1}`` (``(N, 1, d_in)``);
    position ``p >= 1`` is the input Jacobian of layer ``L-1-p``:
    ``diag(act'(y)) W`` (dense) or ``act'(y) * a`` (diagonal).
    """
    L, N = pc.L, cotangent.shape[0]
    for p in range(plan.length):
        j = L - 1 - p
        s, first = _layer(pc, Y, N, j)
        off = int(plan.slot_off[p])
        r, c = int(pc.d_out[j]), int(pc.d_in[j])
        if p == 0:
            g = cotangent * s
            head = g @ first if pc.kind[j] == 0 else g * first
            buf[off:off + N * c] = head.reshape(-1)
        elif pc.kind[j] == 0:
            buf[off:off + N * r * c] = (s[:, :, None] * first[None]).reshape(-1)
        else:
            buf[off:off + N * r] = (s * first).reshape(-1)


def _block(buf, off, N, kind_dense, m, n):
    size = N * m * n if kind_dense else N * m
    a = buf[off:off + size]
    return a.reshape(N, m, n) if kind_dense else a.reshape(N, m)


def run_scan(pc, Y, cotangent, plan, workers=None):
    """``(V, bad)``: every row ``v_l`` by the flat plan, one op at a time.

    ``workers`` is accepted for the common signature and ignored (this is
    the serial reference).
    """
    N = cotangent.shape[0]
    L = pc.L
    V = np.empty(N * int(pc.y_off[L]), dtype=pc.dtype)
    V[N * pc.y_off[L - 1]:] = cotangent.reshape(-1)
    if plan is None:  # one layer: nothing to scan
        return V, -1
    buf = np.empty(plan.buf_size, dtype=pc.dtype)
    form_blocks(pc, Y, cotangent, plan, buf)
    # Stages run in order; inside a stage the plan's op order (lane by lane)
    # is a valid serial order. numpy forms each result before storing it, so
    # an op may overwrite its own operand without a temporary.
    for o in range(plan.n_ops):
        code, m, k, n = (int(plan.op_code[o]), int(plan.op_m[o]), int(plan.op_k[o]), int(plan.op_n[o]))
        left = _block(buf, int(plan.op_left[o]), N, code in (0, 1), m, k)
        right = _block(buf, int(plan.op_right[o]), N, code in (0, 2), k, n)
        if code == 0:
            res = left @ right
        elif code == 1:
            res = left * right[:, None, :]
        elif code == 2:
            res = left[:, :, None] * right
        else:
            res = left * right
        oo = int(plan.op_out[o])
        buf[oo:oo + res.size] = res.reshape(-1)
    bad = -1
    for k in range(plan.length):
        l = L - 2 - k
        d = int(pc.d_out[l])
        off = int(plan.out_off[k])
        rows = buf[off:off + N * d]
        V[N * pc.y_off[l]:N * pc.y_off[l + 1]] = rows
        if bad < 0 and not np.isfinite(rows).all():
            bad = k
    return V, bad
