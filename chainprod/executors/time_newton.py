"""A time chunk's part of a Newton forward pass over time: its steps of one layer, linearised and folded.

A Newton forward pass (DEER, quasi-DEER, ELK, quasi-ELK; ``docs/newton.md``)
solves one layer of a recurrent model over all ``T`` steps at once: around
a guess ``s̄`` of every state, each step ``s_t = f(s_{t-1}, u_t)`` becomes
``s_t = J_t s_{t-1} + c_t`` (``J_t = df/ds`` at ``s̄_{t-1}``, ``c_t =
f(s̄_{t-1}) - J_t s̄_{t-1}``), one affine recurrence. On a sequence sharded
over time (:mod:`chainprod.shard_time_newton` drives it) chunk ``b`` keeps
the guess of its own steps ``t0 .. t1-1`` and, per iteration, folds them
into one affine map ``s_{t1-1} = A s_in + a`` of the state ``s_in`` entering
it, sends that map (``(N, S, S)`` and ``(N, S)``; ``(N, S)`` twice in the
diagonal form), gets its true ``s_in`` back and updates every state at once.

This is the iteration a layer shard of a chain runs
(:class:`~chainprod.executors.sharded_newton.ChunkNewton`: the fold, the
update, ELK's damping, the residual parts): only the steps differ. Here a
step is one cell of an RNN, GRU or LSTM (state ``S = H``; ``2H``, ``(h,
c)``, for the LSTM), or of a :class:`~chainprod.DiagonalRecurrence`
(``h_t = a h_{t-1} + (B u)_t``, linear: one Newton iteration is exact).
:class:`TimeChunkNewton` holds the calls a
:class:`~chainprod.executors.time_worker.TimeChunk` answers.
"""

from __future__ import annotations

import numpy as np

from ..kernels import recurrent_numpy
from ..kernels.cell_jacobians import cell_jacobian
from .sharded_newton import ChunkNewton

__all__ = ["StepsNewton", "TimeChunkNewton"]


class StepsNewton(ChunkNewton):
    """Steps ``t0 .. t0+n-1`` of one recurrent layer during a Newton pass (the iteration of ``ChunkNewton``).

    Parameters
    ----------
    cell : str
        ``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"``, ``"lstm"`` or ``"diag"``.
    X : ndarray, (n, N, G*H)
        The steps' input projections ``u_t W_ih^T + b_ih`` (``"diag"``: ``B u_t``, ``(n, N, d)``).
    W, b : ndarray
        ``W_hh`` ``(G*H, H)`` and ``b_hh`` ``(G*H,)`` (``"diag"``: ``a`` ``(d,)`` and None).
    s_in : ndarray, (N, S)
        The state entering the chunk: known (``fixed``) or the guess of it.
    t0 : int
        The global step of the chunk's first step (messages and bad steps name global steps).
    fixed : bool
        ``s_in`` is known (the first chunk): the chunk runs its own linear recurrence.
    """

    def __init__(self, cell, X, W, b, s_in, t0, fixed):
        self.cell, self.X, self.W, self.b = cell, X, W, b
        self.n, N = X.shape[:2]
        self.offset, self.fixed = int(t0), bool(fixed)
        self.H = W.shape[-1]
        self.s = np.ascontiguousarray(s_in)
        self.diagonal = self.linear = cell == "diag"
        self.x = np.zeros((self.n,) + self.s.shape, X.dtype)
        self.cand = self.A = self.a = None
        with np.errstate(over="ignore", invalid="ignore"):
            self.F = self.evaluate(self.before())

    # -- the steps ---------------------------------------------------------------------------
    def before(self):
        """``s_{t-1}`` of every step of the current iterate: ``s_in``, then every state but the last."""
        return np.concatenate([self.s[None], self.x[:-1]], axis=0)

    def _step(self, prev):
        """``(F, point)``: ``f(prev_t, u_t)`` of every step ``(n, N, S)`` and what the Jacobians need."""
        if self.cell == "diag":
            return prev * self.W + self.X, None
        n, N, _ = prev.shape
        H = self.H
        # every step at once is one step of the cell on n*N lanes: the kernel contract's own equations
        hp = np.ascontiguousarray(prev[..., :H])
        cp_ = np.ascontiguousarray(prev[..., H:]).reshape(n * N, H) if self.cell == "lstm" else None
        Hs, Z = recurrent_numpy.forward(self.cell, self.X.reshape(1, n * N, -1), self.W, self.b,
                                        hp.reshape(n * N, H), cp_)
        F, Z = Hs.reshape(n, N, H), Z.reshape(n, N, -1)
        if self.cell in ("rnn_tanh", "rnn_relu"):
            return F, (F,)
        if self.cell == "gru":
            return F, (hp, *(Z[..., k * H:(k + 1) * H] for k in range(4)))  # h_{t-1}, r, z, n, gh_n
        i, f, g, o, c = (Z[..., k * H:(k + 1) * H] for k in range(5))
        return np.concatenate([F, c], axis=-1), (prev[..., H:], i, f, g, o, np.tanh(c))

    def evaluate(self, prev):
        """``f_t(prev_t)`` of every step, ``(n, N, S)``."""
        return self._step(prev)[0]

    def jacobian(self, F, diag):
        """``J_t`` at the current iterate (whose ``f`` is ``F``): ``(n, N, S, S)``, or its diagonal when ``diag``.

        The gates are recomputed from the iterate ``(s, x)``: one cell step
        on ``n N`` lanes, little beside the fold of ``n`` Jacobians.
        """
        if self.cell == "diag":
            J = np.empty_like(F)
            J[...] = self.W
            return J
        with np.errstate(over="ignore", invalid="ignore"):
            _, point = self._step(self.before())
        return cell_jacobian(self.cell, self.W, self.H, point, diag)


class TimeChunkNewton:
    """The Newton calls of a time chunk (a base of :class:`~chainprod.executors.time_worker.TimeChunk`).

    Per layer: :meth:`newton_begin`, then per iteration :meth:`newton_map`
    and :meth:`newton_update`, then :meth:`newton_finish`, which runs the
    chunk's ordinary forward call from its converged incoming state.
    """

    def newton_begin(self, l, params, state):
        """Start layer ``l`` at the guess 0 for every state; returns ``(None, residual parts)``.

        ``params`` as :meth:`forward` takes them (``(a, B, C, D)`` for the
        diagonal recurrence); ``state`` the known ``(h, c)`` entering the first
        chunk (None: zeros), ignored by the others (their guess of it is 0, the
        previous chunk's guess of its last state).
        """
        N, H = self.x.shape[1], self.H
        zeros = np.zeros((N, H), self.x.dtype)
        h, c = (zeros, zeros) if state is None or self.index > 0 else (
            zeros if state[0] is None else state[0], zeros if state[1] is None else state[1])
        if self.cell == "diag":
            self.diag_project(params)
            self.newton = StepsNewton("diag", self.BU, params[0], None, h, self.t0, self.index == 0)
        else:
            X, W_hh, b_hh = self.project(l, params)
            s = np.concatenate([h, c], axis=1) if self.cell == "lstm" else h
            self.newton = StepsNewton(self.cell, X, W_hh, b_hh, s, self.t0, self.index == 0)
            self.newton_params = params
        return None, self.newton.begin_parts()

    def newton_map(self, quasi, lam, promote):
        """Step 1 of an iteration (``ChunkNewton.linearize``); the last chunk's map is needed by no one."""
        return self.newton.linearize(quasi, lam, promote, want_map=self.index < self.chunks - 1)

    def newton_update(self, s_in):
        """Step 2 of an iteration (``ChunkNewton.update``); returns ``(None, residual parts)``."""
        return None, self.newton.update(s_in)

    def newton_finish(self, l, promote):
        """The end of layer ``l``'s pass: the chunk's forward from its converged incoming state.

        ``promote``: the last update's candidate was accepted. A recurrent
        layer returns what :meth:`forward` returns (nothing is handed on);
        the diagonal recurrence what :meth:`diag_finish` returns.
        """
        nw, self.newton = self.newton, None
        if promote and nw.cand is not None:
            nw.s = nw.cand[0]
        s = nw.s
        if self.cell == "diag":
            return self.diag_finish(s)
        state = (s[:, :self.H], s[:, self.H:]) if self.cell == "lstm" else (s, None)
        return self.forward(l, self.newton_params, state, hand_on=False)
