"""The Jacobians of the recurrent cells' states, ``d s_t / d s_{t-1}``, from a step's saved gates.

The state ``s`` is ``h`` (RNN, GRU) or ``[h, c]`` (LSTM, width ``2H``).
``point`` holds what one step of the cell computed, per cell: ``(h_t,)``
for the RNNs, ``(h_{t-1}, r, z, n, gh_n)`` for the GRU, ``(c_{t-1}, i, f,
g, o, tanh(c_t))`` for the LSTM, each ``(..., H)``. With ``diag`` only the
diagonal of each Jacobian is formed (the quasi-Newton methods'
approximation). The Newton forward passes use them on one process
(:mod:`chainprod.newton_models`) and on a time chunk's worker
(:mod:`chainprod.executors.time_newton`). ``docs/recurrences.md`` has the
cells' equations.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cell_jacobian"]


def cell_jacobian(cell, W, H, point, diag):
    """``(..., S, S)`` Jacobians (``(..., S)`` diagonals with ``diag``) of the cell ``cell`` with ``W_hh`` ``W``."""
    if cell in ("rnn_tanh", "rnn_relu"):
        F = point[0]
        d = 1 - F * F if cell == "rnn_tanh" else (F > 0).astype(F.dtype)
        return d * np.diagonal(W) if diag else d[..., None] * W  # diag(f'(a_t)) W_hh
    if cell == "gru":
        hp, r, z, n, ghn = point
        W_r, W_z, W_n = W[:H], W[H:2 * H], W[2 * H:]
        dn = (1 - z) * (1 - n * n)  # dh_t / d(pre-activation of n)
        kr, kz, kn = dn * ghn * r * (1 - r), (hp - n) * z * (1 - z), dn * r
        if diag:
            return z + kn * np.diagonal(W_n) + kr * np.diagonal(W_r) + kz * np.diagonal(W_z)
        J = kn[..., None] * W_n + kr[..., None] * W_r + kz[..., None] * W_z
        k = np.arange(H)
        J[..., k, k] += z  # the direct path h_t = ... + z h_{t-1}
        return J
    cp_, i, f, g, o, tc = point
    W_i, W_f, W_g, W_o = (W[k * H:(k + 1) * H] for k in range(4))
    dtc = o * (1 - tc * tc)  # dh_t / dc_t
    ki, kf, kg, ko = g * i * (1 - i), cp_ * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)
    if diag:
        dc_dh = ki * np.diagonal(W_i) + kf * np.diagonal(W_f) + kg * np.diagonal(W_g)
        return np.concatenate([ko * np.diagonal(W_o) + dtc * dc_dh, f], axis=-1)
    dc_dh = ki[..., None] * W_i + kf[..., None] * W_f + kg[..., None] * W_g
    J = np.zeros(i.shape[:-1] + (2 * H, 2 * H), i.dtype)
    k = np.arange(H)
    J[..., :H, :H] = ko[..., None] * W_o + dtc[..., None] * dc_dh
    J[..., k, H + k] = dtc * f  # dh_t / dc_{t-1}
    J[..., H:, :H] = dc_dh
    J[..., H + k, H + k] = f  # dc_t / dc_{t-1}
    return J
