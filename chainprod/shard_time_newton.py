"""The forward pass of a sequence sharded over time by Newton iterations, and the gradients of its inputs.

``seq.value_and_grad(forward="deer", forward_options={...})`` on a
:class:`~chainprod.shard_time.ShardedSequence` solves every layer over all
``T`` steps by DEER, quasi-DEER, ELK or quasi-ELK (``docs/newton.md``)
with each time chunk on its worker, instead of running the chunks of a
layer one after another. Layer by layer: layer ``l`` is solved over time on
the chunks' outputs of layer ``l-1``, which stay on the workers.

How an iteration runs
---------------------
Chunk ``b`` keeps the guess of its steps' states (state ``S = H``; ``2H``,
``(h, c)``, for an LSTM) (:mod:`chainprod.executors.time_newton` is its side):

1. every chunk linearises its steps around the guess (the cell's state
   Jacobians; the quasi methods keep their diagonal; ELK damps them) and
   folds them into one affine map ``s_out = A s_in + a``; it sends the
   driver that one map (``(N, S, S)`` and ``(N, S)``, or ``(N, S)`` twice in
   the diagonal form). The first chunk knows the state entering it (``h0``):
   it runs its linear recurrence and sends the state leaving it instead; the
   last chunk sends nothing;
2. the driver composes the ``P`` maps in order: the state entering every chunk;
3. every chunk gets its state, updates its states at once and reports its
   part of the residual ``max |s_t - f(s_{t-1})|`` and ``max |s_t|``; the
   driver decides, with the local solver's helpers (tolerances, ``max_iter``,
   adaptive damping, the errors), whether to stop, go on or reject the step.

Once a layer converged, every chunk runs its ordinary forward call from its
converged incoming state (all chunks at once); the backward pass is the
sequence's own. What moves per iteration is ``e N (2 (P-1) S + (P-2) m)``
bytes (``m = S^2`` dense, ``S`` diagonal; :func:`bytes_per_iteration`), the
same whatever ``T``. A :class:`~chainprod.DiagonalRecurrence` is linear in
its state: one iteration solves it (:func:`diag_step` is its step, with or
without a Newton pass: its chunks run at once either way).

:func:`input_grads` gathers ``with_inputs=True``'s gradients of ``x`` (and
of ``h0``, ``c0``) from the chunks' reports: ``T``-sized by nature.
"""

from __future__ import annotations

import numpy as np

from .errors import NonFiniteError
from .executors.sharded_newton import affine_apply
from .executors.sharded_worker import payload_bytes
from .forward_methods import check_forward
from .newton import check_newton_args, run_guarded
from .newton_solve import METHODS, first_damping, limits, next_damping, not_converged, rejected_damping
from .shard_newton import bytes_per_iteration

__all__ = ["TIME_FORWARD_OPTIONS", "TimeNewton", "time_newton", "bytes_per_iteration", "diag_step", "input_grads"]

#: the ``forward_options`` a sequence sharded over time takes (the scans run on the chunks; the guess is 0:
#: an ``init`` of every state would move T-sized data)
TIME_FORWARD_OPTIONS = ("tol", "max_iter", "damping", "fallback")


def time_newton(forward, forward_options, *, cell, T, N, S, dtype):
    """None for ``forward="sequential"``; else the checked :class:`TimeNewton` of a step.

    Raises
    ------
    ValueError
        An unknown forward pass or option (listing the valid ones), or a bad option value.
    """
    forward, options = check_forward(forward, forward_options)
    if forward == "sequential":
        return None
    if forward not in METHODS:
        raise ValueError(f"forward={forward!r}: a sequence sharded over time runs the Newton methods "
                         f"{', '.join(METHODS)} across its chunks, or forward='sequential'")
    unknown = sorted(set(options) - set(TIME_FORWARD_OPTIONS))
    if unknown:
        raise ValueError(f"forward_options {unknown} are not for a sequence sharded over time (its scans run on "
                         f"the chunks, from the guess 0); valid keys: {', '.join(TIME_FORWARD_OPTIONS)}")
    o = options
    check_newton_args(forward, "auto", "vectorized", None, o.get("tol"), o.get("max_iter"), o.get("damping"),
                      o.get("fallback"))  # before anything is sent
    return TimeNewton(forward, options, cell, T, N, S, dtype)


class TimeNewton:
    """One step's Newton forward pass over time: the iteration, driven from here.

    Attributes
    ----------
    trace : NewtonTrace
        Of the last :meth:`run` (iterations of every layer; ``solve`` is the layer).
    per_iteration : list of int
        Bytes each iteration moved, both ways.
    bytes_params, bytes_down : int
        Bytes the driver sent: the parameters and ``h0`` with each layer's
        first call, and the states sent back each iteration.
    """

    def __init__(self, method, options, cell, T, N, S, dtype):
        self.method, self.options, self.cell = method, dict(options), cell
        self.T, self.N, self.S, self.dtype = T, N, S, np.dtype(dtype)
        self.trace, self.per_iteration, self.bytes_params, self.bytes_down = None, [], 0, 0

    def expected_bytes(self, P) -> int:
        """What a full iteration moves on ``P`` chunks (:func:`bytes_per_iteration`)."""
        diagonal = self.cell == "diag" or self.method.startswith("quasi")
        return bytes_per_iteration(P, self.N, self.S, self.dtype.itemsize, diagonal)

    def run(self, eng, bounds, layers, step_trace, deadline):
        """Solve every layer on ``eng``'s chunks; the last layer's finishing calls, or None.

        ``layers`` holds ``(params, state)`` per layer: what the chunks'
        forward call takes, and the known state entering the first chunk
        (None: zeros). Returns ``{chunk: (value, report) handles}`` of the
        last layer's ``newton_finish`` calls, or None where
        ``fallback="sequential"`` hands the step to the sequential pass (the
        trace says why). Fills the step's :class:`~chainprod.shard_time.TimeTrace`
        (``newton``, ``newton_bytes``, and the bytes the driver sent).
        Raises what :func:`chainprod.newton_solve.solve` raises.
        """
        self.per_iteration, self.bytes_params, self.bytes_down = [], 0, 0

        def solve(opts, trace):
            trace.backend, trace.workers, trace.schedule = f"{eng.name}-time", eng.P, "chunks"
            finals = None
            for l, (params, state) in enumerate(layers):
                promote = self._solve_layer(eng, bounds, l, params, state, opts, trace, deadline)
                finals = {b: eng.call(b, "newton_finish", l, promote) for b in range(eng.P)}
            trace.converged = True
            return finals

        o = self.options
        finals, self.trace = run_guarded(solve, self.method, "auto", "vectorized", None, o.get("tol"),
                                         o.get("max_iter"), o.get("damping"), o.get("fallback"), None)
        step_trace.newton, step_trace.newton_bytes = self.trace, self.per_iteration
        step_trace.bytes_params += self.bytes_params
        step_trace.bytes_boundary += self.bytes_down
        return finals

    def _solve_layer(self, eng, bounds, l, params, state, opts, trace, deadline):
        """Layer ``l`` to convergence; returns whether the chunks' last candidate is the answer."""
        P, method = eng.P, self.method
        tol, max_iter = limits(opts, self.T, self.dtype)
        trace.tol, trace.max_iter = tol, max_iter
        adaptive, lam = first_damping(opts, self.cell == "diag")
        quasi = method.startswith("quasi")
        self.bytes_params += P * payload_bytes(params) + payload_bytes(state)
        got = eng.results({b: eng.call(b, "newton_begin", l, params, state if b == 0 else None)
                           for b in range(P)}, deadline)
        parts = [info for _, info in got.values()]
        bad = [p["bad_F"] for p in parts if p["bad_F"] >= 0]
        if bad:
            raise NonFiniteError(f"{method}: f at the initial guess is not finite at step t={min(bad)} of layer {l}",
                                 (l, l))
        res = _scaled(parts)
        trace.initial_residuals.append(res)
        rounds = max(t1 - t0 for t0, t1 in bounds) + P - 1
        k, promote = 0, False
        while not res <= tol:
            if k == max_iter:
                raise not_converged(method, res, k, tol, self.T, self.N, self.S, trace)
            k += 1
            got = eng.results({b: eng.call(b, "newton_map", quasi, lam, promote) for b in range(P)}, deadline)
            promote = False
            size = payload_bytes([v for v, _ in got.values()])
            bad = [i["bad"] for _, i in got.values() if i["bad"] >= 0]
            new = [None] * P
            with np.errstate(over="ignore", invalid="ignore"):
                cur = got[0][0]
                for b in range(1, P):  # the state entering chunk b: the maps composed in order
                    new[b] = cur
                    if b < P - 1 and not bad:
                        cur = affine_apply(*got[b][0], cur)
                        if not np.isfinite(cur).all():
                            bad.append(bounds[b][1] - 1)
            if not bad:
                got = eng.results({b: eng.call(b, "newton_update", new[b]) for b in range(P)}, deadline)
                down = payload_bytes(new)
                self.bytes_down += down
                size += down
                parts = [i for _, i in got.values()]
                bad = [p["bad_x"] for p in parts if p["bad_x"] >= 0]
            self.per_iteration.append(size)
            if bad:
                if adaptive:
                    trace.record(l, res, 0, lam, False)
                    lam = rejected_damping(lam)
                    continue
                t = min(bad)
                raise NonFiniteError(
                    f"{method} iteration {k}: the linearised recurrence overflowed at step t={t} of layer {l} (a "
                    "product of many Jacobians grows without bound: the model is not contractive along this "
                    "guess); try method='elk' or 'quasi_elk' (damping) or fallback='sequential'", (l, l))
            bad_f = [p["bad_F"] for p in parts if p["bad_F"] >= 0]
            if bad_f:
                if adaptive:
                    trace.record(l, res, rounds, lam, False)  # rejected: the guess stays
                    lam = rejected_damping(lam)
                    continue
                raise NonFiniteError(f"{method} iteration {k}: f is not finite at step t={min(bad_f)} of layer {l} "
                                     "(the iterate there grew too large); try method='elk' or "
                                     "fallback='sequential'", (l, l))
            res_prev, res, promote = res, _scaled(parts), True
            trace.record(l, res, rounds, lam, True)
            if adaptive:
                lam = next_damping(lam, res < res_prev)
        return promote


def diag_step(eng, bounds, params, h0, N, newton, inputs, trace, deadline):
    """A step of a :class:`~chainprod.DiagonalRecurrence`: rounds of ``P`` independent calls; its chunks' reports.

    Its recurrence ``h_t = a h_{t-1} + B u_t`` is linear in the state it
    starts from, so every chunk runs at once: (1) each runs its states from
    zero; the driver carries the ``P`` boundary states across; (2) each runs
    from its true ``h_in`` (its outputs, loss terms and adjoints from zero);
    the driver carries the ``P`` boundary adjoints back; (3) each forms its
    partial gradients. With ``newton`` a Newton pass (one iteration: the
    recurrence is linear) finds the states ``h_in`` instead of round (1).
    ``params`` is ``(a, B, C, D)``; ``h0`` None (zeros) or ``(N, d)``.
    """
    P, a = eng.P, params[0]
    lengths = [t1 - t0 for t0, t1 in bounds]

    def round_(method, args):
        return eng.reports({b: eng.call(b, method, *args[b])[1] for b in range(P)}, deadline)

    state = None if h0 is None else (h0, None)
    finals = None if newton is None else newton.run(eng, bounds, [(params, state)], trace, deadline)
    if finals is not None:  # Newton found every chunk's h_in; its last calls ran diag_finish from it
        mus = eng.reports({b: c[1] for b, c in finals.items()}, deadline)
        trace.bytes_boundary += payload_bytes(mus)
    else:
        trace.bytes_params += P * payload_bytes(params)
        ends = round_("diag_local", {b: (params,) for b in range(P)})
        h_in = {0: np.zeros((N, a.shape[0]), a.dtype) if h0 is None else h0}
        with np.errstate(over="ignore", invalid="ignore"):
            for b in range(P - 1):  # h_in of chunk b+1: chunk b's end state from h_in_b, by linearity
                h_in[b + 1] = a ** lengths[b] * h_in[b] + ends[b]
        mus = round_("diag_finish", {b: (h_in[b],) for b in range(P)})
        # the boundary traffic: end states up, true start states down, first adjoints up
        trace.bytes_boundary += payload_bytes([ends, h_in, mus])
    g = {P - 1: np.zeros((N, a.shape[0]), a.dtype)}
    with np.errstate(over="ignore", invalid="ignore"):
        for b in range(P - 1, 0, -1):  # the adjoint arriving at chunk b-1's last state
            g[b - 1] = a * (mus[b] + a ** (lengths[b] - 1) * g[b])
    trace.bytes_boundary += payload_bytes(g)  # the arriving adjoints, down
    return round_("diag_grads", {b: (g[b], inputs) for b in range(P)})


def _scaled(parts):
    """The scaled residual ``max |s - f(s)| / max(1, max |s|)`` of the chunks' parts."""
    num = max(p["num"] for p in parts)
    return num / max(1.0, max(p["xmax"] for p in parts))


def input_grads(reports, *, cell, layers, batch_first, h0_shapes):
    """``with_inputs=True``'s gradients from the chunks' reports: ``"input"``, ``"h0"`` (and ``"c0"``).

    ``"input"`` is the chunks' parts joined in time, in the model's layout;
    ``"h0"`` (``"c0"``) the first chunk's, in the shape ``h0`` (``c0``) was
    given in (``h0_shapes``; a diagonal recurrence's ``(d,)`` one sums the batch).
    """
    P = len(reports)
    dx = np.concatenate([reports[b]["inputs"]["input"] for b in range(P)], axis=0)
    out = {"input": dx.transpose(1, 0, 2).copy() if batch_first else dx}
    first = reports[0]["inputs"]
    if cell == "diag":
        dh0 = first["h0"]
        out["h0"] = dh0 if len(h0_shapes[0]) == 2 else dh0.sum(axis=0)
        return out
    for name, shape in zip(("h0", "c0"), h0_shapes):
        if name in first:
            out[name] = np.stack(first[name][:layers]).reshape(shape)
    return out
