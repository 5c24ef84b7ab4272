"""The sequential part of RNN, GRU and LSTM layers, written once for any array library (the array API).

A port of the numpy reference kernels (:mod:`chainprod.kernels.recurrent_numpy`:
:func:`forward`, :func:`backward`) and of the scan's state Jacobians and
per-step gradients (:mod:`chainprod.recurrent_grad`) to the array-API
namespace ``xp`` of the arrays given (torch, JAX, CuPy; numpy too). The
contract is theirs: cells ``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"``,
``"lstm"`` with torch's equations and gate order; ``X = u W_ih^T + b_ih`` of
every step is formed by the caller; ``forward`` returns every state ``Hs``
``(T, N, H)`` and ``Z`` ``(T, N, K)`` (``[r, z, n, gh_n]`` for a GRU,
``[i, f, g, o, c_t]`` for an LSTM, nothing for an RNN); every array is
time-first and of one dtype, computed in that dtype on the arrays' device.

Each loop is a step function (:data:`STEPS`) that :func:`run_steps` runs:
``jax.lax.scan`` under ``jax.jit`` for JAX (a JAX array cannot be written in
place, and a Python loop of eager JAX calls is slow), a Python loop whose
results are stacked once for the others. The sums over time (``dW_hh``,
``db_hh``) are one product after the loop rather than one per step (fewer,
larger kernels, which also suits an accelerator).
"""

from __future__ import annotations

from .arrays import device_of, is_jax

__all__ = ["STEPS", "backward", "forward", "prev_cells", "prev_states", "run_steps", "scan_grads", "state_jacobians",
           "step_grads"]


def _sigmoid(xp, a):
    # exp(-a) overflows to inf for a very negative a, and 1 / (1 + inf) = 0 is the right limit
    return 1 / (1 + xp.exp(-a))


def _chunks(a, H, k):
    return [a[..., j * H:(j + 1) * H] for j in range(k)]


def prev_states(xp, Hs, h0):
    """``h_{t-1}`` of every step: ``h0``, then every state but the last, ``(T, N, H)``."""
    return xp.concat([h0[None, ...], Hs[:-1, ...]], axis=0)


def prev_cells(xp, cell, Z, c0, H):
    """``c_{t-1}`` of every step for an LSTM (``c0``, then every cell state but the last); None otherwise."""
    if cell != "lstm":
        return None
    return xp.concat([c0[None, ...], Z[:-1, :, 4 * H:]], axis=0)


# -- one step of each loop: ``step(xp, cell, params, carry, xs_t) -> (carry, ys_t)`` -------------------------
def _forward_step(xp, cell, params, carry, xs):
    """``h_t`` (and ``c_t``) from ``h_{t-1}`` (and ``c_{t-1}``) and ``X_t``; ``ys``: ``(h_t,)`` or ``(h_t, Z_t)``."""
    W_t, b_hh = params
    (h, c), (x,) = carry, xs
    H = W_t.shape[0]
    gh = h @ W_t + b_hh  # (N, G*H): the only part that waits for h_{t-1}
    if cell == "rnn_tanh":
        h = xp.tanh(x + gh)
        return (h, c), (h,)
    if cell == "rnn_relu":
        a = x + gh
        h = xp.maximum(a, xp.zeros_like(a))
        return (h, c), (h,)
    if cell == "gru":
        r = _sigmoid(xp, x[:, :H] + gh[:, :H])
        z = _sigmoid(xp, x[:, H:2 * H] + gh[:, H:2 * H])
        n = xp.tanh(x[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
        return (h, c), (h, xp.concat([r, z, n, gh[:, 2 * H:]], axis=1))
    a = x + gh
    i, f = _sigmoid(xp, a[:, :H]), _sigmoid(xp, a[:, H:2 * H])
    g, o = xp.tanh(a[:, 2 * H:3 * H]), _sigmoid(xp, a[:, 3 * H:])
    c = f * c + i * g
    h = o * xp.tanh(c)
    return (h, c), (h, xp.concat([i, f, g, o, c], axis=1))


def _backward_step(xp, cell, params, carry, xs):
    """The adjoints of ``h_{t-1}`` (and ``c_{t-1}``) from those of step ``t``; ``ys``: ``(da,)`` or ``(da, dgh)``.

    ``xs``: ``(dHs_t, Hs_t)`` for an RNN, ``(dHs_t, h_{t-1}, Z_t)`` for a GRU,
    ``(dHs_t, c_{t-1}, Z_t)`` for an LSTM.
    """
    (W_hh,), (dh, dc) = params, carry
    H = W_hh.shape[1]
    dh = dh + xs[0]
    if cell in ("rnn_tanh", "rnn_relu"):
        h = xs[1]
        # relu'(0) = 0, as torch takes it
        da = dh * (1 - h * h) if cell == "rnn_tanh" else dh * xp.astype(h > 0, dh.dtype)
        return (da @ W_hh, dc), (da,)
    if cell == "gru":
        h_prev, (r, z, n, ghn) = xs[1], _chunks(xs[2], H, 4)
        dan = dh * (1 - z) * (1 - n * n)
        dar = dan * ghn * r * (1 - r)
        daz = dh * (h_prev - n) * z * (1 - z)
        # r multiplies the n-chunk of h_{t-1} W_hh^T + b_hh, not the n-chunk of X
        dgh = xp.concat([dar, daz, dan * r], axis=1)
        # and the direct path h_t = ... + z * h_{t-1}
        return (dgh @ W_hh + dh * z, dc), (xp.concat([dar, daz, dan], axis=1), dgh)
    c_prev, (i, f, g, o, c) = xs[1], _chunks(xs[2], H, 5)
    tc = xp.tanh(c)
    dc = dc + dh * o * (1 - tc * tc)  # c_t reaches the loss through h_t too
    da = xp.concat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dh * tc * o * (1 - o)],
                   axis=1)
    return (da @ W_hh, dc * f), (da,)  # dc * f: the adjoint of c_{t-1}


def _diagonal_step(xp, cell, params, carry, xs):
    """``h_t = a * h_{t-1} + x_t``: the diagonal recurrence, either way in time; ``ys``: ``(h_t,)``."""
    h = params[0] * carry + xs[0]
    return h, (h,)


#: the loops :func:`run_steps` runs, by name
STEPS = {"forward": _forward_step, "backward": _backward_step, "diagonal": _diagonal_step}
_JITTED: dict = {}


def run_steps(xp, name, cell, params, carry, xs, *, reverse=False):
    """``(carry, ys)``: the loop :data:`STEPS` ``[name]`` over the leading (time) axis of every array of ``xs``.

    ``ys`` are the steps' outputs stacked along time (in time order also
    when ``reverse``). On JAX arrays the loop is one ``jax.lax.scan`` under
    ``jax.jit`` (compiled once per cell, shapes and dtypes), as JAX wants
    loops written; elsewhere a Python loop, the step's few kernels each time.
    """
    step = STEPS[name]
    if is_jax(xp):
        key = (name, cell, reverse)
        run = _JITTED.get(key)
        if run is None:
            import jax

            def scan(params, carry, xs):
                return jax.lax.scan(lambda cr, x: step(xp, cell, params, cr, x), carry, xs, reverse=reverse)

            run = _JITTED[key] = jax.jit(scan)
        return run(params, carry, xs)
    T = xs[0].shape[0]
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        carry, ys[t] = step(xp, cell, params, carry, tuple(a[t, ...] for a in xs))
    return carry, tuple(xp.stack(list(y), axis=0) for y in zip(*ys))


def forward(xp, cell, X, W_hh, b_hh, h0, c0):
    """Every state of one recurrent layer from its input projections: ``(Hs, Z)``.

    Parameters as :func:`chainprod.kernels.recurrent_numpy.forward`, arrays
    of the namespace ``xp``. Non-finite states are not raised here: the
    caller checks ``Hs`` and names the step.
    """
    T, N, _ = X.shape
    _, ys = run_steps(xp, "forward", cell, (W_hh.T, b_hh), (h0, c0), (X,))
    Z = ys[1] if len(ys) > 1 else xp.zeros((T, N, 0), dtype=X.dtype, device=device_of(X))
    return ys[0], Z


def backward(xp, cell, X, W_hh, b_hh, h0, c0, Hs, Z, dHs):
    """Backprop through time of one recurrent layer: ``(dX, dW_hh, db_hh, dh0, dc0)``.

    Parameters and results as :func:`chainprod.kernels.recurrent_numpy.backward`
    (without ``dhT``, ``dcT``: the adjoint arriving after the last step is
    zero), arrays of the namespace ``xp``.
    """
    xs = {"gru": lambda: (dHs, prev_states(xp, Hs, h0), Z),
          "lstm": lambda: (dHs, prev_cells(xp, cell, Z, c0, Hs.shape[2]), Z)}.get(cell, lambda: (dHs, Hs))()
    dh = xp.zeros_like(h0)
    (dh, dc), ys = run_steps(xp, "backward", cell, (W_hh,), (dh, dh if cell == "lstm" else None), xs, reverse=True)
    dX = ys[0]
    dW, db = _shared_grads(xp, ys[-1], Hs, h0)
    return dX, dW, db, dh, dc


def _shared_grads(xp, dgh, Hs, h0):
    """``dW_hh = sum_t dgh_t^T h_{t-1}`` and ``db_hh = sum_t dgh_t``, over every step and sample at once."""
    T, N, GH = dgh.shape
    H = Hs.shape[2]
    rows = xp.reshape(dgh, (T * N, GH))
    return rows.T @ xp.reshape(prev_states(xp, Hs, h0), (T * N, H)), xp.sum(rows, axis=0)


def _diag(xp, v, eye):
    """``diag(v)`` of every step and sample: ``(..., H) -> (..., H, H)``."""
    return v[..., None] * eye


def state_jacobians(xp, cell, W_hh, Hs, Z, h0, c0):
    """``J_t = ds_t/ds_{t-1}`` of every step and sample, ``(T, N, S, S)`` (``S = 2H`` for an LSTM, ``(h, c)``).

    As :func:`chainprod.recurrent_grad.state_jacobians`, built without
    writing into any array (blocks are joined, diagonals added).
    """
    H = Hs.shape[2]
    if cell in ("rnn_tanh", "rnn_relu"):
        d = 1 - Hs * Hs if cell == "rnn_tanh" else xp.astype(Hs > 0, Hs.dtype)
        return d[..., None] * W_hh  # diag(f'(a_t)) W_hh
    eye = xp.eye(H, dtype=Hs.dtype, device=device_of(Hs))
    if cell == "gru":
        W_r, W_z, W_n = W_hh[:H, :], W_hh[H:2 * H, :], W_hh[2 * H:, :]
        r, z, n, ghn = _chunks(Z, H, 4)
        dn = (1 - z) * (1 - n * n)  # dh_t / d(pre-activation of n)
        # h_t = (1 - z) n + z h_{t-1}: through n (r times the n-chunk, and r itself), through z, and directly
        return ((dn * r)[..., None] * W_n + (dn * ghn * r * (1 - r))[..., None] * W_r
                + ((prev_states(xp, Hs, h0) - n) * z * (1 - z))[..., None] * W_z + _diag(xp, z, eye))
    W_i, W_f, W_g, W_o = (W_hh[k * H:(k + 1) * H, :] for k in range(4))
    i, f, g, o, c = _chunks(Z, H, 5)
    c_prev = prev_cells(xp, cell, Z, c0, H)
    tc = xp.tanh(c)
    dtc = o * (1 - tc * tc)  # dh_t / dc_t
    dc_dh = ((c_prev * f * (1 - f))[..., None] * W_f + (g * i * (1 - i))[..., None] * W_i
             + (i * (1 - g * g))[..., None] * W_g)
    dh_dh = (tc * o * (1 - o))[..., None] * W_o + dtc[..., None] * dc_dh
    top = xp.concat([dh_dh, _diag(xp, dtc * f, eye)], axis=-1)  # [dh_t/dh_{t-1}, dh_t/dc_{t-1}]
    bottom = xp.concat([dc_dh, _diag(xp, f, eye)], axis=-1)  # [dc_t/dh_{t-1}, dc_t/dc_{t-1}]
    return xp.concat([top, bottom], axis=-2)


def step_grads(xp, cell, Hs, Z, h0, c0, lam_h, lam_c):
    """Each step's own gradients from the adjoints: ``(dX, dgh)``, both ``(T, N, G*H)``.

    As :func:`chainprod.recurrent_grad.step_grads`: ``lam_h`` the total
    adjoint of ``h_t``, ``lam_c`` that of ``c_t`` through later steps only.
    """
    H = Hs.shape[2]
    if cell == "rnn_tanh":
        da = lam_h * (1 - Hs * Hs)
        return da, da
    if cell == "rnn_relu":
        da = lam_h * xp.astype(Hs > 0, Hs.dtype)
        return da, da
    if cell == "gru":
        r, z, n, ghn = _chunks(Z, H, 4)
        dan = lam_h * (1 - z) * (1 - n * n)
        dar = dan * ghn * r * (1 - r)
        daz = lam_h * (prev_states(xp, Hs, h0) - n) * z * (1 - z)
        return xp.concat([dar, daz, dan], axis=2), xp.concat([dar, daz, dan * r], axis=2)
    i, f, g, o, c = _chunks(Z, H, 5)
    tc = xp.tanh(c)
    dc = lam_c + lam_h * o * (1 - tc * tc)
    da = xp.concat([dc * g * i * (1 - i), dc * prev_cells(xp, cell, Z, c0, H) * f * (1 - f), dc * i * (1 - g * g),
                    lam_h * tc * o * (1 - o)], axis=2)
    return da, da


def scan_grads(xp, cell, Hs, Z, h0, c0, lam, J0):
    """``(dX, dW_hh, db_hh, dh0, dc0)`` from every adjoint ``lam`` ``(T, N, S)`` and the first Jacobian ``J0``.

    What a scan of the adjoints leaves to do, for all steps at once: each
    step's gradients (:func:`step_grads`), their sums over time, and
    ``J_0^T lambda_0 = dloss/ds_{-1}``, the initial state's gradient.
    """
    H = Hs.shape[2]
    lstm = cell == "lstm"
    dX, dgh = step_grads(xp, cell, Hs, Z, h0, c0, lam[..., :H], lam[..., H:] if lstm else None)
    dW, db = _shared_grads(xp, dgh, Hs, h0)
    lam0 = (xp.matrix_transpose(J0) @ lam[0, ..., None])[..., 0]
    return dX, dW, db, lam0[:, :H], (lam0[:, H:] if lstm else None)

