"""The two parts of a Newton iteration, on numpy or on the compiled kernels: evaluate a guess, take a step.

:func:`chainprod.newton_solve.solve` runs the iteration (tolerances,
damping, rejected steps, errors, the trace); it asks a *steps* object made
by :func:`make_steps` for the two things that cost:

* ``evaluate(x)``: every ``f_t(x_{t-1})`` at the guess ``x``, the scaled
  residual ``max |x - f(x)| / max(1, max |x|)`` and the first step whose
  value is not finite;
* ``step(ev, x, lam)``: the linearised recurrence ``s_t = J_t s_{t-1} + c_t``
  (damped by ``lam``) solved by one affine scan, the new guess.

:class:`NumpySteps` is the reference: the problem's own ``evaluate`` and
``jacobian`` (:mod:`chainprod.newton_models`) and
:func:`chainprod.linear_recurrence` on any executor. :class:`CompiledSteps`
serves the local backends (``"vectorized"``, ``"threads"``) on the compiled
kernels: the scan is one call of :mod:`chainprod.kernels.affine_scan` (the
same schedule, picked once per solve), and a chain of dense and diagonal
layers is linearised by :mod:`chainprod.kernels.newton_numba` straight into
the scan's buffer; other problems form their Jacobians with numpy.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from .autotune import COMPILED_BACKENDS
from .blocks import BlockSeq, Diag, Segment
from .cost import AUTO, LOCAL_BACKENDS, resolve_schedule
from .errors import NonFiniteError
from .kernels import crossover
from .kernels.affine_scan import affine_layout, form_blocks, kernel_threads, numba_threads, run_affine
from .kernels.pack import pack
from .layers import Dense, Diagonal
from .newton_models import ChainBody, previous
from .recurrence import linear_recurrence
from .tape import resolve_kernels

__all__ = ["Evaluation", "NumpySteps", "CompiledSteps", "make_steps", "residual", "first_bad", "compiled_serves"]

# Below this many multiply-adds a chain's evaluation or linearisation runs on one thread.
_PARALLEL_MIN_WORK = 1 << 15


def residual(x, F):
    """``max |x - F| / max(1, max |x|)``: absolute for small states, relative for large ones."""
    scale = max(1.0, float(np.max(np.abs(x))))
    return float(np.max(np.abs(x - F))) / scale


def first_bad(a):
    """The first step ``t`` of ``a`` ``(n, ...)`` holding a NaN or infinity, or -1."""
    ok = np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
    return -1 if ok.all() else int(np.flatnonzero(~ok)[0])


class Evaluation(NamedTuple):
    """A guess evaluated: ``F[t] = f_t(prev[t])``, what the Jacobians need, and the residual."""

    prev: np.ndarray | None  #: ``x_{t-1}`` of every step (None where the compiled chain kernels need none)
    F: np.ndarray
    point: object            #: the problem's linearisation point (the chain kernels': ``u = W prev``)
    bad: int                 #: first step whose ``F`` is not finite, or -1
    res: float               #: the scaled residual (inf when ``bad >= 0``)


def compiled_serves(opts, kernels) -> bool:
    """Whether :class:`CompiledSteps` runs a solve with these options (else :class:`NumpySteps`)."""
    backend = opts.backend
    return (resolve_kernels(kernels) == "numba" and backend.__class__ is str and backend in COMPILED_BACKENDS
            and not opts.engine_options)


def make_steps(problem, opts, diag):
    """The steps of one solve: compiled where :func:`compiled_serves`, else numpy (``opts.kernels`` decides)."""
    if compiled_serves(opts, getattr(opts, "kernels", None)):
        return CompiledSteps(problem, opts, diag)
    return NumpySteps(problem, opts, diag)


class NumpySteps:
    """The reference steps: the problem's numpy rules, :func:`chainprod.linear_recurrence` on ``opts.backend``."""

    def __init__(self, problem, opts, diag):
        self.problem, self.opts, self.diag = problem, opts, diag

    def evaluate(self, x) -> Evaluation:
        prev = previous(self.problem.h0, x)
        F, point = self.problem.evaluate(prev)
        t = first_bad(F)
        return Evaluation(prev, F, point, t, residual(x, F) if t < 0 else np.inf)

    def step(self, ev, x, lam):
        """``(new guess, schedule name, rounds)``; a ``NonFiniteError`` with ``layers = (0, t)`` on overflow."""
        p, opts = self.problem, self.opts
        J = p.jacobian(ev.point, self.diag)
        Jx = J * ev.prev if J.ndim == 3 else np.matmul(J, ev.prev[..., None])[..., 0]
        b = ev.F - Jx  # f(s̄_{t-1}) - J s̄_{t-1}
        if lam:
            # Levenberg-Marquardt, causal form: s_t = (J s_{t-1} + b_t + lam s̄_t) / (1 + lam)
            b += lam * x
            b /= 1 + lam
            J = J / (1 + lam)
        A = Diag(J) if J.ndim == 3 else J
        # the reference end to end: the numpy loop, or the scan on the executor (what the compiled steps are
        # tested against)
        xn, tr = linear_recurrence(A, b, p.h0, method=opts.schedule, backend=opts.backend, workers=opts.workers,
                                   return_trace=True, engine_options=opts.engine_options, kernels="numpy")
        if tr.schedule is None:
            return xn, "loop", p.n
        return xn, tr.schedule.name, tr.schedule.rounds


def _shapes(n, N, d, diag) -> BlockSeq:
    """The scan's block kinds and shapes with no data, as :func:`chainprod.linear_recurrence` costs them."""
    zero = np.zeros(())
    body = (n, N, 2 * d) if diag else (n, N, d, d + 1)
    return BlockSeq([Segment("affine", np.broadcast_to(zero, (1, N, d, 1))),
                     Segment("affine_diag" if diag else "affine", np.broadcast_to(zero, body))])


def _chain_kernels(problem) -> bool:
    return isinstance(problem, ChainBody) and all(r.cls in (Dense, Diagonal) for r in problem.runs)


class CompiledSteps(NumpySteps):
    """The steps on the compiled kernels (local backends): one affine scan call; a chain linearised in one call.

    The schedule is resolved once, as :func:`chainprod.linear_recurrence`
    resolves it (``"auto"`` by the cost model; the sequential choice on a
    local backend is the plain loop), and bound to a flat plan; the scan
    buffer is kept for every iteration of the solve. ``workers`` threads
    (default: 1 on ``"vectorized"``, every core on ``"threads"``).
    """

    def __init__(self, problem, opts, diag):
        super().__init__(problem, opts, diag)
        n, N, S = problem.n, problem.N, problem.S
        method, backend = opts.schedule, opts.backend
        local = backend in LOCAL_BACKENDS
        if method == "sequential" and local:
            sched = None
        else:
            sched = resolve_schedule(method, n + 1, workers=opts.workers, blocks=_shapes(n, N, S, diag),
                                     backend=backend)
            if not sched.is_scan:
                raise ValueError(f"schedule {sched.name!r} computes only the total product, not every state; use "
                                 "a scan schedule such as 'sklansky' or 'brent_kung'")
            if method == AUTO and sched.name == "sequential" and local:
                sched = None  # the same order as the loop, without composing blocks
        self.name, self.rounds = ("loop", n) if sched is None else (sched.name, sched.rounds)
        self.threads = kernel_threads(opts.workers or COMPILED_BACKENDS[backend]())
        self.layout = affine_layout(sched, n, N, S, diag=diag)
        self.dtype = problem.h0.dtype
        self.buf = np.empty(self.layout.buf_size, self.dtype)
        self.h0 = np.ascontiguousarray(problem.h0)
        self.chain = _chain_kernels(problem)
        if self.chain:
            self.pc = pack(problem.chain)
            work = n * N * S * (S if any(r.cls is Dense for r in problem.runs) else 1)
            self.parallel = self.threads > 1 and work >= _PARALLEL_MIN_WORK
            from .kernels import numba_blas  # imports numba: only once the compiled kernels run

            self.cross = crossover.blas_crossover(self.dtype) if numba_blas.blas_available() else crossover.NEVER

    def evaluate(self, x) -> Evaluation:
        if not self.chain:
            return super().evaluate(x)
        from .kernels.newton_numba import chain_evaluate

        p, pc = self.problem, self.pc
        F = np.empty_like(x)
        with numba_threads(self.threads), self.blas_limit() as cross:
            diff, big, t = chain_evaluate(pc.theta, pc.p_off, pc.kind, pc.act, p.offset, self.h0.reshape(-1),
                                          x.reshape(-1), F.reshape(-1), p.n, p.N, p.S, cross, self.parallel)
        return Evaluation(None, F, None, int(t), float(diff) / max(1.0, float(big)) if t < 0 else np.inf)

    def step(self, ev, x, lam):
        p, layout, buf = self.problem, self.layout, self.buf
        if self.chain:
            from .kernels.newton_numba import chain_linearise

            pc = self.pc
            with numba_threads(self.threads):
                chain_linearise(pc.theta, pc.p_off, pc.kind, pc.act, p.offset, self.h0.reshape(-1), x.reshape(-1),
                                ev.F.reshape(-1), float(lam), self.diag, buf, layout.pos_off, p.n, p.N, p.S,
                                self.parallel)
        else:
            J = np.ascontiguousarray(p.jacobian(ev.point, self.diag))
            form_blocks(layout, buf, J, np.ascontiguousarray(ev.F), np.ascontiguousarray(ev.prev), x, lam)
        xn, bad = run_affine(layout, buf, self.h0, workers=self.threads)
        if bad >= 0:
            raise NonFiniteError(f"state h_t at step t={bad} is not finite: the linearised recurrence overflowed "
                                 f"(the compiled {self.name!r} scan)", (0, bad))
        return xn, self.name, self.rounds

    @contextlib.contextmanager
    def blas_limit(self):
        """The crossover of a layer's product (rows of the batch x W^T), BLAS on one thread inside a parallel
        call; :data:`~chainprod.kernels.crossover.NEVER` (loops) where BLAS cannot be limited."""
        cross = self.cross
        if not self.parallel or cross >= crossover.NEVER or self.problem.N * self.problem.S ** 2 < cross:
            yield cross
            return
        from .kernels import numba_blas

        with numba_blas.one_blas_thread() as limited:
            yield cross if limited else crossover.NEVER
