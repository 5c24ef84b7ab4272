"""The Newton iteration itself: a problem's trajectory by repeated affine scans, and its trace.

:func:`solve` runs DEER, quasi-DEER, ELK or quasi-ELK on any problem of
:mod:`chainprod.newton_models` (an iteration's evaluation and linear solve are
:mod:`chainprod.newton_steps`', on numpy or on the compiled kernels);
:mod:`chainprod.newton` checks the
arguments, builds the problems from a model and returns what the model's
sequential pass returns. ``docs/newton.md`` has the math.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConvergenceError, NonFiniteError
from .newton_steps import make_steps, residual

__all__ = ["METHODS", "DEFAULT_TOL", "MAX_ITER_CAP", "NewtonTrace", "SolveOptions", "residual", "solve", "limits",
           "first_damping", "next_damping", "rejected_damping", "not_converged"]

#: the Newton methods (``"sequential"`` is the plain pass)
METHODS = ("deer", "quasi_deer", "elk", "quasi_elk")
#: default tolerance on the scaled residual, per dtype: about 1e6 float64 roundings (what a scan of
#: thousands of steps keeps), and about 100 float32 ones
DEFAULT_TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5}
#: default ``max_iter`` is ``min(n, MAX_ITER_CAP)``: ``n`` undamped steps reach the exact answer
MAX_ITER_CAP = 100
#: adaptive damping (``damping=None`` for the ELK methods): the first ``lam``; its divisor after a step
#: that lowers the residual (to 0 below 1e-3); after one that raises it, ``lam`` doubles up to ELK_MAX
#: (a causal damped step with a large ``lam`` stalls on an expansive model: docs/newton.md)
ELK_START, ELK_FACTOR, ELK_MAX = 1.0, 4.0, 2.0


@dataclass
class NewtonTrace:
    """What a Newton forward pass did, iteration by iteration.

    Attributes
    ----------
    method, schedule, backend, workers, tol, max_iter
        As run (``schedule`` the name of the scan that ran, ``"loop"`` for
        the plain loop ``"auto"`` may pick on a local backend).
    iterations : int
        Linear solves run, over every solve (a stacked recurrent model
        solves one layer after another).
    residuals : list of float
        The scaled residual of the kept iterate after each iteration.
    rounds : list of int
        Scan rounds of each iteration (steps, for the plain loop).
    damping : list of float
        ``lam`` used by each iteration (0 for DEER).
    accepted : list of bool
        Whether each iteration's step was kept (adaptive ELK rejects steps
        that raise the residual or overflow, and raises ``lam``).
    solve : list of int
        Which solve each iteration belongs to (the layer of a stacked model).
    initial_residuals : list of float
        The residual of the initial guess, per solve.
    converged : bool
    fallback : bool
        True when the sequential pass finished the run (``fallback="sequential"``).
    note : str
    """

    method: str
    schedule: str = ""
    backend: str = ""
    workers: int | None = None
    tol: float = 0.0
    max_iter: int = 0
    iterations: int = 0
    residuals: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    damping: list = field(default_factory=list)
    accepted: list = field(default_factory=list)
    solve: list = field(default_factory=list)
    initial_residuals: list = field(default_factory=list)
    converged: bool = False
    fallback: bool = False
    note: str = ""

    def record(self, solve, res, rounds, lam, accepted):
        self.iterations += 1
        self.residuals.append(float(res))
        self.rounds.append(int(rounds))
        self.damping.append(float(lam))
        self.accepted.append(bool(accepted))
        self.solve.append(int(solve))


@dataclass
class SolveOptions:
    """The checked options of one Newton forward pass (see :func:`chainprod.newton.newton_forward`)."""

    method: str
    schedule: str
    backend: object
    workers: int | None
    tol: float | None
    max_iter: int | None
    damping: float | None
    engine_options: dict | None
    #: ``"numba"``, ``"numpy"`` or None (the default set): the compiled steps serve the local backends
    kernels: str | None = None


def limits(opts: SolveOptions, n, dtype):
    """``(tol, max_iter)`` of a solve of ``n`` steps: the options' own, or the defaults of docs/newton.md."""
    tol = DEFAULT_TOL[np.dtype(dtype)] if opts.tol is None else opts.tol
    max_iter = min(n, MAX_ITER_CAP) if opts.max_iter is None else opts.max_iter
    if opts.method.endswith("elk") and opts.max_iter is None:
        max_iter = MAX_ITER_CAP  # damped steps do not reach the exact answer in n steps: no n bound
    return tol, max_iter


def first_damping(opts: SolveOptions, linear):
    """``(adaptive, lam)`` of the first iteration (``lam`` 0 for the undamped methods)."""
    elk = opts.method.endswith("elk")
    adaptive = elk and opts.damping is None
    # an affine problem is solved exactly by one undamped step: adaptive damping starts there at 0
    lam = ((0.0 if linear else ELK_START) if adaptive else opts.damping) if elk else 0.0
    return adaptive, lam


def next_damping(lam, improved):
    """Adaptive ``lam`` after an accepted step that lowered the residual (``improved``) or did not."""
    if improved:
        return lam / ELK_FACTOR if lam > 1e-3 else 0.0  # towards plain Newton as steps succeed
    return min(max(lam * 2, ELK_START), ELK_MAX)


def rejected_damping(lam):
    """Adaptive ``lam`` after a rejected step (it overflowed)."""
    return max(lam * ELK_FACTOR, ELK_START)


def not_converged(method, res, k, tol, n, N, S, trace):
    """The :class:`~chainprod.errors.ConvergenceError` of a solve stopped at ``max_iter = k`` (notes ``trace``)."""
    trace.note = trace.note or f"{method}: not converged"
    hint = ("raise max_iter, or start the damping higher (damping=...)" if method.endswith("elk") else
            "try method='elk' or 'quasi_elk' (damping), a better init, or a larger max_iter")
    return ConvergenceError(
        f"{method} did not converge in {k} iteration(s): the scaled residual max|x - f(x)| / "
        f"max(1, max|x|) is {res:.3g} > tol = {tol:.3g} ({n} steps, {N} lanes, state {S}); {hint}; "
        "or pass fallback='sequential' to finish by the sequential pass", res, k, tol, trace)


def solve(problem, opts: SolveOptions, trace: NewtonTrace, init=None, solve_id=0):
    """The trajectory ``(n, N, S)`` of ``problem`` (:mod:`chainprod.newton_models`) by Newton iterations.

    Raises
    ------
    chainprod.errors.ConvergenceError
        The scaled residual is above ``tol`` after ``max_iter`` iterations.
    chainprod.errors.NonFiniteError
        An iterate is NaN or infinite (undamped methods; adaptive ELK rejects
        such a step and raises its damping instead).
    """
    n, N, S, h0 = problem.n, problem.N, problem.S, problem.h0
    dtype = h0.dtype
    x = np.zeros((n, N, S), dtype) if init is None else np.array(init, dtype, copy=True)
    if n == 0:
        return x
    method = opts.method
    quasi = method.startswith("quasi")
    diag = quasi or problem.diagonal
    tol, max_iter = limits(opts, n, dtype)
    trace.tol, trace.max_iter = tol, max_iter
    adaptive, lam = first_damping(opts, problem.linear)
    # numpy, or the compiled kernels on a local backend (chainprod.newton_steps): the same iteration
    steps = make_steps(problem, opts, diag)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite values are reported with their step
        ev = steps.evaluate(x)
        if ev.bad >= 0:
            raise NonFiniteError(f"{method}: f at the initial guess is not finite at {problem.where(ev.bad)}",
                                 (ev.bad, ev.bad))
        res = ev.res
        trace.initial_residuals.append(res)
        k = 0
        while not res <= tol:
            if k == max_iter:
                raise not_converged(method, res, k, tol, n, N, S, trace)
            k += 1
            try:
                xn, trace.schedule, rounds = steps.step(ev, x, lam)  # linearise at x, one affine scan
            except NonFiniteError as err:
                t = err.layers[1] if err.layers else 0
                if adaptive:
                    trace.record(solve_id, res, 0, lam, False)
                    lam = rejected_damping(lam)
                    continue
                raise NonFiniteError(
                    f"{method} iteration {k}: the linearised recurrence overflowed at {problem.where(t)} (a "
                    "product of many Jacobians grows without bound: the model is not contractive along this "
                    "guess); try method='elk' or 'quasi_elk' (damping) or fallback='sequential'",
                    (t, t)) from err
            ev_n = steps.evaluate(xn)
            t, res_n = ev_n.bad, ev_n.res
            if adaptive and t >= 0:
                trace.record(solve_id, res, rounds, lam, False)  # rejected: the guess stays
                lam = rejected_damping(lam)
                continue
            if t >= 0:
                raise NonFiniteError(f"{method} iteration {k}: f is not finite at {problem.where(t)} (the iterate "
                                     "there grew too large); try method='elk' or fallback='sequential'", (t, t))
            res_prev = res
            x, ev, res = xn, ev_n, res_n
            trace.record(solve_id, res, rounds, lam, True)
            if adaptive:
                lam = next_damping(lam, res_n < res_prev)
    trace.converged = True
    return x


