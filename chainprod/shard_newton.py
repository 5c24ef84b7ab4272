"""The forward pass of a sharded model by Newton iterations, every chunk of layers staying on its shard.

``model.value_and_grad(x, y, forward="deer", forward_options={...})`` on a
:class:`~chainprod.shard.ShardedModel` finds the state entering every shard
by DEER, quasi-DEER, ELK or quasi-ELK (``docs/newton.md`` has the math)
instead of by the pipeline, then runs the ordinary step from those states:
each shard runs its own chunk forward from its state, all at once, and the
backward pass is the model's own (``method=``).

How an iteration runs
---------------------
The solved layers (the body of :func:`chainprod.newton_models.split_chain`)
are cut where the shards are cut; shard ``b`` keeps the guess of its chunk's
states. Per iteration (:mod:`chainprod.executors.sharded_newton` is the
shard's side):

1. every shard linearises its layers around its guess and folds them into
   its prefixes ``s_t = A_t s_in + a_t``; it sends the driver one affine map,
   its last prefix (``(N, w, w)`` and ``(N, w)``; ``(N, w)`` twice in the
   diagonal form of the quasi methods). The first shard knows the state
   entering it and sends the state leaving it instead; the top shard sends
   nothing;
2. the driver composes the ``P`` maps in order (``P`` is small): the state
   entering every shard;
3. every shard gets its state, forms its new guess ``A_t s_in + a_t`` at
   once, evaluates its layers there and reports its part of the residual
   ``max |s_t - f_t(s_{t-1})|`` and ``max |s_t|``; the driver decides, as
   :func:`chainprod.newton_solve.solve` does (the same helpers: tolerances,
   ``max_iter``, adaptive damping, the errors), whether to stop, go on, or
   reject the step (adaptive ELK).

What moves per iteration is ``e N (2 (P-1) w + (P-2) m)`` bytes (``e`` bytes
per number; ``m = w^2`` for the dense methods, ``w`` for the diagonal form):
the maps of the ``P-2`` middle shards, the first shard's state and the
``P-1`` states sent back. It does not depend on the number of layers
(:func:`bytes_per_iteration`; ``ShardTrace.newton_bytes`` records it).
"""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteError
from .executors.sharded_newton import affine_apply
from .executors.sharded_worker import payload_bytes
from .forward_methods import check_forward
from .newton import check_newton_args, read_init, run_guarded
from .newton_models import split_chain
from .newton_solve import METHODS, first_damping, limits, next_damping, not_converged, rejected_damping

__all__ = ["SHARDED_FORWARD_OPTIONS", "ShardedNewton", "sharded_newton", "bytes_per_iteration"]

#: the ``forward_options`` a sharded model takes (the scans run on the shards: no schedule, backend, workers)
SHARDED_FORWARD_OPTIONS = ("tol", "max_iter", "damping", "fallback", "init")


def bytes_per_iteration(P, N, w, itemsize=8, diagonal=False) -> int:
    """Bytes a full Newton iteration moves on ``P`` shards: ``e N (2 (P-1) w + (P-2) m)`` (module docstring)."""
    m = w if diagonal else w * w
    return itemsize * N * (2 * (P - 1) * w + max(P - 2, 0) * m)


def sharded_newton(chain, bounds, forward, forward_options, N):
    """None for ``forward="sequential"``; else the checked :class:`ShardedNewton` of a step.

    Raises
    ------
    ValueError
        An unknown forward pass or option (listing the valid ones), a bad
        option value, an ``init`` of the wrong shape, or a chain whose
        middle layers change the width.
    """
    forward, options = check_forward(forward, forward_options)
    if forward == "sequential":
        return None
    if forward not in METHODS:
        raise ValueError(f"forward={forward!r}: a sharded model runs the Newton methods {', '.join(METHODS)} "
                         "across its shards, or forward='sequential'")
    unknown = sorted(set(options) - set(SHARDED_FORWARD_OPTIONS))
    if unknown:
        raise ValueError(f"forward_options {unknown} are not for a sharded model (its scans run on the shards); "
                         f"valid keys: {', '.join(SHARDED_FORWARD_OPTIONS)}")
    return ShardedNewton(chain, bounds, forward, options, N)


class ShardedNewton:
    """One step's Newton forward pass on a sharded model: what is solved where, and the iteration.

    Parameters
    ----------
    chain : Chain
        The model's template (its shapes and activations; the parameters are the shards').
    bounds : list of (int, int)
        Layers ``start .. stop-1`` of each shard.
    method : str
        One of :data:`chainprod.newton_solve.METHODS`.
    options : dict
        ``tol``, ``max_iter``, ``damping``, ``fallback``, ``init`` (as :func:`chainprod.forward`).
    N : int
        Batch size (``init`` is checked against it).

    Attributes
    ----------
    bodies : list of (int, int)
        Each shard's solved layers, local to its chunk (``lo == hi``: none).
    """

    def __init__(self, chain, bounds, method, options, N):
        head, start, stop, _ = split_chain(chain)
        self.method, self.options, self.dtype = method, dict(options), chain.dtype
        self.start, self.n, self.bounds = start, stop - start, list(bounds)
        self.w = chain.layers[start].d_in if self.n else 0
        self.linear = all(chain.layers[i].activation == "identity" for i in range(start, stop))
        self.bodies = []
        for s, e in bounds:
            lo = min(max(s, start), e) - s
            self.bodies.append((lo, max(min(e, stop) - s, lo)))
        o = self.options
        check_newton_args(method, "auto", "vectorized", None, o.get("tol"), o.get("max_iter"), o.get("damping"),
                          o.get("fallback"))  # before anything is sent
        self.init = read_init(o.get("init"), (self.n, N, self.w), chain.dtype,
                              f"layers {start}..{stop - 1}, batch N, width {self.w}")

    def run(self, engine, step, x, updates, deadline):
        """Solve on ``engine``'s shards; returns ``(states, trace, bytes sent, bytes per iteration)``.

        ``states`` are those entering shards ``1 .. P-1`` (a list), or None
        where ``fallback="sequential"`` hands the step to the pipeline (the
        :class:`~chainprod.newton_solve.NewtonTrace` says why) or nothing is
        solved. Raises what :func:`chainprod.newton_solve.solve` raises.
        """
        moved, per_iteration = [0], []

        def solve(opts, trace):
            trace.backend, trace.workers, trace.schedule = f"{engine.name}-sharded", engine.P, "shards"
            return self._solve(engine, step, x, updates, deadline, opts, trace, moved, per_iteration)

        o = self.options
        states, trace = run_guarded(solve, self.method, "auto", "vectorized", None, o.get("tol"), o.get("max_iter"),
                                    o.get("damping"), o.get("fallback"), None)
        return states, trace, moved[0], per_iteration

    # -- the iteration ---------------------------------------------------------------------------
    def _begin(self, eng, step, x, updates, deadline, moved):
        """Start every shard at the initial guess; returns ``(states entering each shard, residual parts)``."""
        P, N = eng.P, x.shape[0]
        calls, guess = {}, [None] * P
        for b, (lo, hi) in enumerate(self.bodies):
            g = self.bounds[b][0] - 1 - self.start  # the solved layer before the shard (-1: the first layer's output)
            if b > 0 and g >= 0:
                guess[b] = np.zeros((N, self.w), self.dtype) if self.init is None else self.init[g]
            s0 = self.bounds[b][0]
            init = None if self.init is None or hi == lo else self.init[s0 + lo - self.start:s0 + hi - self.start]
            # a shard whose input is the first layer's output reads it from the first shard's value
            s_in = guess[b] if b == 0 or g >= 0 else calls[0][0]
            calls[b] = eng.call(b, "newton_begin", step, x if b == 0 else None, updates, (lo, hi), s_in, init)
            moved[0] += payload_bytes([x if b == 0 else None, guess[b], init])
        got = eng.results(calls, deadline)
        for b in range(1, P):
            if guess[b] is None:
                guess[b] = got[0][0]
        return guess, [info for _, info in got.values()]

    def _scaled(self, parts):
        num = max((p["num"] for p in parts), default=0.0)
        return num / max(1.0, max((p["xmax"] for p in parts), default=0.0))

    def _solve(self, eng, step, x, updates, deadline, opts, trace, moved, per_iteration):
        P, method, n = eng.P, self.method, self.n
        tol, max_iter = limits(opts, n, self.dtype)
        trace.tol, trace.max_iter = tol, max_iter
        if n == 0:
            trace.fallback, trace.note = True, f"{method}: the chain has no layers of one width to solve"
            return None
        adaptive, lam = first_damping(opts, self.linear)
        quasi = method.startswith("quasi")
        s, parts = self._begin(eng, step, x, updates, deadline, moved)
        bad = [p["bad_F"] for p in parts if p["bad_F"] >= 0]
        if bad:
            raise NonFiniteError(f"{method}: f at the initial guess is not finite at layer {min(bad)}",
                                 (min(bad), min(bad)))
        res = self._scaled(parts)
        trace.initial_residuals.append(res)
        solved = [b for b, (lo, hi) in enumerate(self.bodies) if hi > lo]
        mapped = sorted(set(solved) | {0})  # the first shard always says what leaves it
        rounds = max(hi - lo for lo, hi in self.bodies) + P - 1
        k, promote = 0, False
        while not res <= tol:
            if k == max_iter:
                raise not_converged(method, res, k, tol, n, x.shape[0], self.w, trace)
            k += 1
            got = eng.results({b: eng.call(b, "newton_map", quasi, lam, promote) for b in mapped}, deadline)
            promote = False
            size = payload_bytes([v for v, _ in got.values()])
            bad = [i["bad"] for _, i in got.values() if i["bad"] >= 0]
            new = [None] * P
            with np.errstate(over="ignore", invalid="ignore"):
                cur = got[0][0]
                for b in range(1, P):
                    new[b] = cur
                    lo, hi = self.bodies[b]
                    if b < P - 1 and hi > lo and not bad:
                        cur = affine_apply(*got[b][0], cur)  # the state leaving shard b
                        if not np.isfinite(cur).all():
                            bad.append(self.bounds[b][0] + hi - 1)
            if not bad:
                sent = {b: new[b] for b in solved}
                got = eng.results({b: eng.call(b, "newton_update", st) for b, st in sent.items()}, deadline)
                moved[0] += payload_bytes(list(sent.values()))
                size += payload_bytes(list(sent.values()))
                parts = [i for _, i in got.values()]
                bad = [p["bad_x"] for p in parts if p["bad_x"] >= 0]
            per_iteration.append(size)
            if bad:
                if adaptive:
                    trace.record(0, res, 0, lam, False)
                    lam = rejected_damping(lam)
                    continue
                t = min(bad)
                raise NonFiniteError(
                    f"{method} iteration {k}: the linearised recurrence overflowed at layer {t} (a product of many "
                    "Jacobians grows without bound: the model is not contractive along this guess); try "
                    "method='elk' or 'quasi_elk' (damping) or fallback='sequential'", (t, t))
            bad_f = [p["bad_F"] for p in parts if p["bad_F"] >= 0]
            if bad_f:
                if adaptive:
                    trace.record(0, res, rounds, lam, False)  # rejected: the guess stays
                    lam = rejected_damping(lam)
                    continue
                t = min(bad_f)
                raise NonFiniteError(f"{method} iteration {k}: f is not finite at layer {t} (the iterate there grew "
                                     "too large); try method='elk' or fallback='sequential'", (t, t))
            res_prev, res, s, promote = res, self._scaled(parts), new, True
            trace.record(0, res, rounds, lam, True)
            if adaptive:
                lam = next_damping(lam, res < res_prev)
        trace.converged = True
        return s[1:]
