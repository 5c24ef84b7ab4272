"""One shard's part of a Newton forward pass across shards: its chunk's steps, prefixes and residual.

A Newton forward pass (DEER, quasi-DEER, ELK, quasi-ELK; ``docs/newton.md``)
replaces every layer ``s_t = f_t(s_{t-1})`` of the solved body of a chain by
its linearisation around the current guess ``s̄``::

    s_t = J_t s_{t-1} + c_t,     J_t = df_t/ds at s̄_{t-1},     c_t = f_t(s̄_{t-1}) - J_t s̄_{t-1}

(ELK damps it: ``J_t / (1 + lam)`` and ``(c_t + lam s̄_t) / (1 + lam)``).
On a sharded model (:mod:`chainprod.shard_newton` drives it) each shard
holds the guess of its own chunk of layers and does, per iteration:

1. :meth:`ChunkNewton.linearize`: the ``J_t`` and ``c_t`` of its layers, and
   the prefixes ``(A_t, a_t) = (J_t, c_t) ∘ ... ∘ (J_lo, c_lo)`` by a left
   fold (``A_t = J_t A_{t-1}``, ``a_t = J_t a_{t-1} + c_t``), so that
   ``s_t = A_t s_in + a_t`` for the state ``s_in`` entering the chunk. It
   sends one affine map, the last prefix, to the driver: ``(N, w, w)`` and
   ``(N, w)``, or ``(N, w)`` twice in the diagonal form (quasi methods, or a
   chunk of diagonal layers).
2. :meth:`ChunkNewton.update`: with the new ``s_in`` from the driver, every
   state of the chunk at once, ``s_t = A_t s_in + a_t``, then ``f_t`` at the
   new guess (the next linearisation point) and the chunk's part of the
   residual ``max |s_t - f_t(s_{t-1})|`` and ``max |s_t|``.

The first shard knows the state entering its chunk (the chain's input, or
its first layer's output): it runs its chunk's recurrence directly from it
in step 1 (``O(w^2)`` per layer, no product of Jacobians) and sends the state
leaving the chunk instead of a map. The guess, the Jacobians and the prefixes
never leave the shard: what moves per iteration is ``O(P N w^2)``, whatever
the number of layers. Plain numpy on the packed layer tables
(:mod:`chainprod.kernels.pack`); nothing here talks to an engine.
"""

from __future__ import annotations

import numpy as np

from ..activations import apply_activation, derivative_from_output
from ..kernels.pack import ACT_NAMES, KIND_CODES, PackedChain

__all__ = ["ChunkNewton", "affine_apply", "first_bad"]


def affine_apply(M, m, s):
    """``M s + m`` per lane; ``M`` dense ``(..., N, w, w)`` or diagonal ``(..., N, w)``, ``m`` and ``s`` ``(N, w)``.

    Leading axes of ``M`` and ``m`` (steps) broadcast against one ``s``.
    """
    if M.ndim == m.ndim:
        return M * s + m
    return np.matmul(M, s[..., None])[..., 0] + m


def first_bad(*arrays) -> int:
    """The first index of the leading (step) axis where any of ``arrays`` is NaN or infinite; -1 if none."""
    n = arrays[0].shape[0]
    ok = np.ones(n, bool)
    for a in arrays:
        ok &= np.isfinite(a.reshape(n, -1)).all(axis=1)
    return -1 if ok.all() else int(np.flatnonzero(~ok)[0])


class ChunkNewton:
    """The solved layers ``lo .. hi-1`` of one shard's chunk (all ``w -> w``) during a Newton pass.

    Parameters
    ----------
    pc : PackedChain
        The shard's layers (its ``theta`` a view of the shard's parameters).
    lo, hi : int
        The solved layers, local to the chunk (``lo == hi``: none).
    first : int
        Global index of the chunk's first layer (messages name global layers).
    s_in : ndarray, (N, w)
        The state entering layer ``lo``: known (``fixed``) or the guess of it.
    init : ndarray or None
        The guess of the chunk's solved states ``(hi - lo, N, w)``; zeros by default.
    fixed : bool
        ``s_in`` is known (the first shard): the chunk runs its own recurrence.

    Attributes
    ----------
    s, x, F : ndarray
        The current iterate: the state entering the chunk, the chunk's states
        ``(n, N, w)`` and ``f`` at them (the next linearisation point).
    """

    def __init__(self, pc: PackedChain, lo: int, hi: int, first: int, s_in, init, fixed: bool):
        self.n, self.offset, self.fixed = hi - lo, first + lo, fixed
        self.s = np.ascontiguousarray(s_in)
        N, w = self.s.shape
        self.runs = self._runs(pc, lo, hi, w)
        self.diagonal = all(not dense for _, _, dense, _, _, _ in self.runs)
        self.x = np.zeros((self.n, N, w), pc.dtype) if init is None else np.array(init, pc.dtype)
        self.cand = self.A = self.a = None
        with np.errstate(over="ignore", invalid="ignore"):
            self.F = self.evaluate(self._previous(self.s, self.x))

    @staticmethod
    def _runs(pc, lo, hi, w):
        """``(t0, t1, dense, activation, W or a, b)`` of each stretch of equal kind and activation, as views."""
        runs, t0 = [], lo
        while t0 < hi:
            t1 = t0 + 1
            while t1 < hi and pc.kind[t1] == pc.kind[t0] and pc.act[t1] == pc.act[t0]:
                t1 += 1
            dense = int(pc.kind[t0]) == KIND_CODES["dense"]
            rows = pc.theta[int(pc.p_off[t0]):int(pc.p_off[t1])].reshape(t1 - t0, -1)
            k = w * w if dense else w
            W = rows[:, :k].reshape((t1 - t0, w, w) if dense else (t1 - t0, w))
            runs.append((t0 - lo, t1 - lo, dense, ACT_NAMES[int(pc.act[t0])], W, rows[:, k:]))
            t0 = t1
        return runs

    @staticmethod
    def _previous(s, x):
        return np.concatenate([s[None], x[:-1]], axis=0)

    def where(self, t) -> int:
        """The global index of the chunk's solved step ``t`` (-1 stays -1)."""
        return -1 if t < 0 else self.offset + t

    # -- the steps ---------------------------------------------------------------------------
    def evaluate(self, prev):
        """``f_t(prev_t)`` of every solved layer, ``(n, N, w)``."""
        F = np.empty_like(prev)
        for t0, t1, dense, act, W, b in self.runs:
            p, out = prev[t0:t1], F[t0:t1]
            if dense:
                np.matmul(p, np.swapaxes(W, 1, 2), out=out)
            else:
                np.multiply(p, W[:, None], out=out)
            out += b[:, None]
            apply_activation(act, out)
        return F

    def jacobian(self, F, diag):
        """``J_t`` at outputs ``F``: ``(n, N, w, w)``, or its diagonal ``(n, N, w)`` when ``diag``."""
        n, N, w = F.shape
        J = np.zeros((n, N, w) if diag else (n, N, w, w), F.dtype)
        k = np.arange(w)
        for t0, t1, dense, act, W, _ in self.runs:
            Y = F[t0:t1]
            S = np.ones_like(Y) if act == "identity" else derivative_from_output(act, Y)
            if not dense and diag:
                np.multiply(S, W[:, None], out=J[t0:t1])
            elif not dense:
                J[t0:t1, :, k, k] = S * W[:, None]
            elif diag:
                J[t0:t1] = S * np.diagonal(W, axis1=1, axis2=2)[:, None]
            else:
                np.multiply(S[..., None], W[:, None], out=J[t0:t1])  # diag(act') W
        return J

    def residual_parts(self, x, F, bad_x=-1):
        """The chunk's part of the scaled residual: ``max |x - F|``, ``max |x|`` and the first bad layers."""
        bad_F = first_bad(F) if self.n else -1
        if not self.n:
            return {"num": 0.0, "xmax": 0.0, "bad_x": -1, "bad_F": -1}
        num = float(np.max(np.abs(x - F))) if bad_F < 0 and bad_x < 0 else float("inf")
        xmax = float(np.max(np.abs(x))) if bad_x < 0 else float("inf")
        return {"num": num, "xmax": xmax, "bad_x": self.where(bad_x), "bad_F": self.where(bad_F)}

    # -- one iteration ------------------------------------------------------------------------
    def linearize(self, quasi, lam, promote, want_map):
        """Step 1 of an iteration: the chunk's prefixes; returns ``(value for the driver, info)``.

        Parameters
        ----------
        quasi : bool
            Keep only ``diag(J_t)``.
        lam : float
            ELK's damping (0: plain Newton).
        promote : bool
            The candidate of the last :meth:`update` was accepted: it becomes the iterate first.
        want_map : bool
            Return the chunk's map (the top shard's is needed by no one).

        Returns
        -------
        value
            The first shard: the state leaving the chunk ``(N, w)``; the
            others: the last prefix ``(A, a)``; None without ``want_map``.
        info : dict
            ``bad``: the global index of the first layer whose prefix (or
            state) is NaN or infinite, -1 if none.
        """
        if promote and self.cand is not None:
            self.s, self.x, self.F = self.cand
        self.cand = None
        if not self.n:
            self.A = self.a = None
            return (self.s if self.fixed and want_map else None), {"bad": -1}
        with np.errstate(over="ignore", invalid="ignore"):
            J = self.jacobian(self.F, quasi or self.diagonal)
            prev = self._previous(self.s, self.x)
            c = self.F - (J * prev if J.ndim == 3 else np.matmul(J, prev[..., None])[..., 0])
            if lam:
                # Levenberg-Marquardt, causal form: s_t = (J s_{t-1} + c_t + lam s̄_t) / (1 + lam)
                c += lam * self.x
                c /= 1 + lam
                J /= 1 + lam
            if self.fixed:
                # the state entering the chunk is known: run the recurrence itself, no product of Jacobians
                x, h = np.empty_like(c), self.s
                for t in range(self.n):
                    h = x[t] = affine_apply(J[t], c[t], h)
                self.A, self.a = None, x
                return (x[-1].copy() if want_map else None), {"bad": self.where(first_bad(x))}
            A, a = np.empty_like(J), np.empty_like(c)
            A[0], a[0] = J[0], c[0]
            for t in range(1, self.n):
                if J.ndim == 4:
                    np.matmul(J[t], A[t - 1], out=A[t])
                else:
                    np.multiply(J[t], A[t - 1], out=A[t])
                a[t] = affine_apply(J[t], c[t], a[t - 1])
        self.A, self.a = A, a
        return ((A[-1].copy(), a[-1].copy()) if want_map else None), {"bad": self.where(first_bad(A, a))}

    def update(self, s_in):
        """Step 2: the candidate iterate from the new state entering the chunk; returns its residual parts.

        ``s_in`` is ignored by the first shard (its state is known). The
        candidate is kept until the next :meth:`linearize` says whether the
        driver accepted it.
        """
        if not self.n:
            self.cand = (self.s if self.fixed else np.ascontiguousarray(s_in), self.x, self.F)
            return self.residual_parts(self.x, self.F)
        with np.errstate(over="ignore", invalid="ignore"):
            s = self.s if self.fixed else np.ascontiguousarray(s_in)
            x = self.a if self.fixed else affine_apply(self.A, self.a, s)
            F = self.evaluate(self._previous(s, x))
            info = self.residual_parts(x, F, first_bad(x))
        self.cand = (s, x, F)
        return info

    def begin_parts(self):
        """The residual parts of the initial guess."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.residual_parts(self.x, self.F)
