"""The forward pass by Newton's method on the whole trajectory: DEER, quasi-DEER, ELK, quasi-ELK.

The trajectory ``s_0 .. s_{n-1}`` of ``s_t = f_t(s_{t-1})`` (the layers of
a chain, or the steps of a recurrent layer) is the root of the residual
``r_t = s_t - f_t(s_{t-1})``. Around a guess ``s̄`` every step is replaced
by its linearisation, which turns the system into one *linear* recurrence

    s_t = J_t s_{t-1} + (f_t(s̄_{t-1}) - J_t s̄_{t-1}),      J_t = df_t/ds at s̄_{t-1}

solved in ``⌈log2 n⌉`` scan rounds by :func:`chainprod.linear_recurrence`
(any schedule, any executor). ``"quasi_deer"`` keeps only ``diag(J_t)``
(diagonal blocks, ``O(S)`` per combine). ``"elk"`` / ``"quasi_elk"`` add
Levenberg-Marquardt damping ``lam``: each step of the recurrence also pulls
towards the guess, ``s_t = (J_t s_{t-1} + c_t + lam s̄_t) / (1 + lam)``,
still one affine scan, whose products of ``J / (1 + lam)`` stay bounded
where plain Newton's products of ``J`` overflow. The math, the defaults and
the costs are in ``docs/newton.md``.
"""

from __future__ import annotations

import functools

import numpy as np

from ._validate import as_float_array, check_workers
from .cost import valid_schedules
from .errors import ConvergenceError, NonFiniteError, first_line
from .executors import get_executor
from .forward_methods import register_forward_method
from .kernels.recurrent import get_recurrent_kernels
from .layers import Chain
from .newton_models import CellLayer, ChainBody, DiagonalStates, lyapunov_exponent, split_chain
from .newton_solve import METHODS, NewtonTrace, SolveOptions, solve
from .recurrent import Recurrent
from .recurrent_io import check_finite_states, read_sequence
from .ssm import DiagonalRecurrence
from .ssm_grad import outputs, read_h0, read_u, to_layout
from .tape import Tape, resolve_kernels
from .tape import forward as tape_forward

__all__ = ["METHODS", "NewtonTrace", "forward", "newton_forward", "gradient_tape", "model_lyapunov",
           "check_newton_args", "read_init", "run_guarded"]

_SEQUENTIAL_ONLY_NOT = ("tol", "max_iter", "init", "damping", "fallback")


# -- arguments -----------------------------------------------------------------------------------------
def check_newton_args(method, schedule, backend, workers, tol, max_iter, damping, fallback):
    """``(workers, tol, max_iter, damping)`` checked (a ``ValueError`` naming the bad one); the others validated."""
    if not isinstance(method, str) or method not in ("sequential",) + METHODS:
        raise ValueError(f"method: unknown {method!r}; valid methods: {', '.join(('sequential',) + METHODS)}")
    scans = [s for s in valid_schedules() if s != "tree"]
    if not isinstance(schedule, str) or schedule not in scans:
        raise ValueError(f"schedule: unknown or unusable {schedule!r} (every state is needed, so 'tree' is "
                         f"not one); valid schedules: {', '.join(scans)}")
    get_executor(backend)  # an unknown backend lists the valid ones
    workers = check_workers(workers)
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not np.isfinite(tol) \
                or tol <= 0:
            raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
        tol = float(tol)
    if max_iter is not None:
        if isinstance(max_iter, (bool, np.bool_)) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
        max_iter = int(max_iter)
    if damping is not None:
        if not method.endswith("elk"):
            raise ValueError(f"damping is for method 'elk' or 'quasi_elk', not {method!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)) \
                or not np.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0 (or None: adaptive), got {damping!r}")
        damping = float(damping)
    if fallback not in (None, "sequential"):
        raise ValueError(f"fallback must be None or 'sequential', got {fallback!r}")
    return workers, tol, max_iter, damping


def read_init(init, shape, dtype, what):
    """``init`` as a finite array of ``shape`` and ``dtype`` (``what`` describes the shape in errors), or None."""
    if init is None:
        return None
    arr = as_float_array(init, "init", allow_nonfinite=True)
    if arr.shape != shape:
        raise ValueError(f"init: expected shape {shape} ({what}), got {arr.shape}")
    if arr.dtype != dtype:
        raise TypeError(f"init is {arr.dtype} but the model is {dtype}: pass init in the model's dtype")
    if not np.isfinite(arr).all():
        raise ValueError("init: contains NaN or infinity")
    return arr


# -- models --------------------------------------------------------------------------------------------
def _chain_newton(chain, x, opts, trace, init, kernels):
    x2, one = chain.check_input(x)
    x2 = np.ascontiguousarray(x2)
    kernels = resolve_kernels(kernels)
    head, start, stop, readout = split_chain(chain)
    N, layers = x2.shape[0], chain.layers
    per_layer, h = [], x2
    with np.errstate(over="ignore", invalid="ignore"):
        if head:
            h = layers[0].forward(x2)
            per_layer.append(h)
        body = ChainBody(chain, start, stop, np.ascontiguousarray(h))
        shape = (body.n, N, body.S)
        X = solve(body, opts, trace, read_init(init, shape, chain.dtype, f"layers {start}..{stop - 1}, batch N, "
                                               f"width {body.S}"))
        per_layer.extend(X)
        if body.n:
            h = X[-1]
        if readout:
            per_layer.append(layers[-1].forward(h))
    for l in (0, len(layers) - 1):
        if not np.isfinite(per_layer[l]).all():
            raise NonFiniteError(f"the forward pass overflowed: the output of layer {l} is NaN or infinite", (l, l))
    flat = np.concatenate([y.reshape(-1) for y in per_layer])
    # the compiled kernels' flat tape is layer-major, (N, d_out) per layer: the per-run views read it
    offs = np.cumsum([0] + [N * ly.d_out for ly in layers])
    outputs = [flat[offs[r.start]:offs[r.start + r.count]].reshape(r.count, N, r.d_out) for r in chain.runs]
    return Tape(chain, x2, one, outputs, kernels=kernels, flat=flat)


def _recurrent_layers(model, u, h0, c0, opts, trace, init):
    """Per layer ``(u, X, Hs, Z)`` as the model's own pass keeps them (``(Hs, Z)`` a kernel set's), and ``c_T``."""
    T, N = u.shape[:2]
    H, L = model.hidden_size, model.num_layers
    S = model.state_factor * H
    inits = None
    if init is not None:
        shape = (L, T, N, S) if L > 1 or np.ndim(init) == 4 else (T, N, S)
        inits = read_init(init, shape, model.dtype, "time first: (num_layers,) T, N, state S = "
                          + ("2H: (h, c)" if model.mode == "LSTM" else "H")).reshape(L, T, N, S)
    tape, last_c, p = [], [], model.params
    for layer in range(L):
        W_ih, W_hh = p[f"weight_ih_l{layer}"], p[f"weight_hh_l{layer}"]
        X = u @ W_ih.T  # every step's input projection in one product
        if model.bias:
            X += p[f"bias_ih_l{layer}"]
        b_hh = p[f"bias_hh_l{layer}"] if model.bias else np.zeros(W_hh.shape[0], model.dtype)
        prob = CellLayer(model.cell, X, W_hh, b_hh, h0[layer], None if c0 is None else c0[layer], layer)
        states = solve(prob, opts, trace, None if inits is None else inits[layer], solve_id=layer)
        check_finite_states(states[..., :H], layer)
        Hs, Z = prob.kernel_tape(states)
        tape.append((u, X, Hs, Z))
        if c0 is not None:
            last_c.append(states[-1, :, H:])
        u = Hs
    return tape, last_c


def _recurrent_newton(model, x, opts, trace, init, h0):
    u = read_sequence(x, input_size=model.input_size, batch_first=model.batch_first, dtype=model.dtype)
    h0, _, c0, _ = model.initial_states(h0, u.shape[1])
    tape, last_c = _recurrent_layers(model, u, h0, c0, opts, trace, init)
    u = tape[-1][2]
    out = u.transpose(1, 0, 2).copy() if model.batch_first else u
    h_n = np.stack([t[2][-1] for t in tape])
    return (out, (h_n, np.stack(last_c))) if c0 is not None else (out, h_n)


def _ssm_newton(layer, x, opts, trace, init, h0):
    uu = read_u(layer, x)
    T, N = uu.shape[:2]
    h, _ = read_h0(layer, h0, N)
    Bu = (uu.reshape(T * N, layer.d_in) @ layer.params["B"].T).reshape(T, N, layer.d)
    states = solve(DiagonalStates(layer.params["a"], Bu, h), opts, trace,
                   read_init(init, (T, N, layer.d), layer.dtype, "time first: T, N, state d"))
    return to_layout(layer, outputs(layer, uu, states))


def _sequential(model, x, h0, kernels, packed):
    if isinstance(model, Chain):
        if h0 is not None:
            raise TypeError("h0 is for recurrent models; a Chain's input is x")
        return tape_forward(model, x, kernels=kernels, packed=packed)
    if isinstance(model, Recurrent):
        return model.forward(x, h0, kernels=kernels)
    if isinstance(model, DiagonalRecurrence):
        return model.forward(x, h0)
    raise TypeError(f"forward takes a Chain, RNN, GRU, LSTM or DiagonalRecurrence, got {type(model).__name__}")


def newton_forward(model, x, *, method="deer", schedule="auto", backend="vectorized", workers=None, tol=None,
                   max_iter=None, init=None, damping=None, fallback=None, return_trace=False, h0=None,
                   kernels=None, engine_options=None):
    """The forward pass of ``model`` by Newton iterations on its whole trajectory.

    Parameters
    ----------
    model : Chain, RNN, GRU, LSTM or DiagonalRecurrence
        A chain's layers must all map ``w -> w``, but for a first layer
        ``d_0 -> w`` (run directly: its input is known) and a last layer
        ``w -> d_L`` (run after the solve). Stacked recurrent layers are
        solved one layer after another, over time.
    x : array
        The chain's input ``(N, d_0)`` / ``(d_0,)``, or the input sequence
        in the model's layout.
    method : {"deer", "quasi_deer", "elk", "quasi_elk"}
        Newton with dense Jacobians, with their diagonals only, and both
        with Levenberg-Marquardt damping (``docs/newton.md``).
    schedule : str
        The scan schedule of every linear solve (any of
        :func:`chainprod.valid_schedules` but ``"tree"``; ``"auto"``: the
        cost model's choice).
    backend, workers, engine_options
        As in :func:`chainprod.linear_recurrence`.
    tol : float, optional
        On the scaled residual ``max |s_t - f_t(s_{t-1})| / max(1, max |s|)``;
        default :data:`DEFAULT_TOL` (float64 ``1e-10``, float32 ``1e-5``).
    max_iter : int, optional
        Default ``min(n, 100)`` for DEER (``n`` undamped steps reach the
        exact answer), ``100`` for ELK.
    init : array, optional
        The initial guess of the solved states, time (layer) first: a chain
        ``(n, N, w)`` over the solved layers, a recurrent model ``(T, N, S)``
        (``(num_layers, T, N, S)`` when stacked; ``S = 2H``, ``(h, c)``, for
        an LSTM). Zeros by default.
    damping : float, optional
        ELK methods only: a fixed ``lam >= 0``; ``None`` adapts it: it
        starts at 1 (0 for an affine model), is divided by 4 after a step that lowers the residual
        (0 below 1e-3: plain Newton near the answer), doubled up to 2 after
        one that raises it; a step that overflows is rejected and ``lam``
        multiplied by 4.
    fallback : {None, "sequential"}
        ``"sequential"``: a run that does not converge (or overflows) is
        finished by the sequential pass, and the trace says so.
    return_trace : bool
        Also return a :class:`NewtonTrace`.
    h0 : array or pair, optional
        Recurrent models' initial state, as their ``forward`` takes it.
    kernels : {"numba", "numpy"}, optional
        The kernel set the returned tape names (a chain's backward pass
        runs on it), the sequential fallback's, and the iterations': on
        ``"numba"`` (the default) with backend ``"vectorized"`` or
        ``"threads"`` every scan is one compiled kernel call and a chain's
        linearisation another (:mod:`chainprod.newton_steps`).

    Returns
    -------
    Tape, or what the model's ``forward`` returns
        Within ``tol`` of the sequential pass; with ``return_trace`` a pair
        ``(result, trace)``.
    """
    if method == "sequential":
        raise ValueError("newton_forward runs a Newton method; use chainprod.forward(..., method='sequential') "
                         f"for the sequential pass (methods: {', '.join(METHODS)})")

    def run(opts, trace):
        if isinstance(model, Chain):
            if h0 is not None:
                raise TypeError("h0 is for recurrent models; a Chain's input is x")
            return _chain_newton(model, x, opts, trace, init, kernels)
        if isinstance(model, Recurrent):
            return _recurrent_newton(model, x, opts, trace, init, h0)
        if isinstance(model, DiagonalRecurrence):
            return _ssm_newton(model, x, opts, trace, init, h0)
        raise TypeError(f"a Newton forward pass takes a Chain, RNN, GRU, LSTM or DiagonalRecurrence, got "
                        f"{type(model).__name__}")

    result, trace = run_guarded(run, method, schedule, backend, workers, tol, max_iter, damping, fallback,
                                engine_options, kernels)
    if result is None:  # fell back: the trace says why
        result = _sequential(model, x, h0, kernels, None)
    return (result, trace) if return_trace else result


def run_guarded(run, method, schedule, backend, workers, tol, max_iter, damping, fallback, engine_options,
                kernels=None):
    """``(run(opts, trace), trace)`` with the options checked; ``(None, trace)`` where ``fallback`` takes over.

    The one place that says what ``fallback="sequential"`` means: a run that
    does not converge, or meets a NaN or infinity, is marked in the trace
    and handed back for the model's own sequential pass to finish.
    """
    workers, tol, max_iter, damping = check_newton_args(method, schedule, backend, workers, tol, max_iter,
                                                        damping, fallback)
    opts = SolveOptions(method, schedule, backend, workers, tol, max_iter, damping, engine_options, kernels)
    trace = NewtonTrace(method, backend=getattr(backend, "name", backend), workers=workers)
    try:
        return run(opts, trace), trace
    except (ConvergenceError, NonFiniteError) as err:
        if fallback != "sequential":
            raise
        trace.fallback, trace.converged = True, False
        trace.note = (f"{method} stopped after {trace.iterations} iteration(s) ({first_line(err)}); the "
                      "sequential pass ran instead (fallback='sequential')")
        return None, trace


def forward(model, x, *, method="sequential", kernels=None, packed=None, h0=None, return_trace=False, **newton):
    """The forward pass of a chain or recurrent model, sequential or by Newton iterations.

    Parameters
    ----------
    model : Chain, RNN, GRU, LSTM or DiagonalRecurrence
    x : array
        The input (a chain's ``(N, d_0)``, a sequence in the model's layout).
    method : {"sequential", "deer", "quasi_deer", "elk", "quasi_elk"}
        ``"sequential"`` (the default) is the plain pass:
        :func:`chainprod.tape.forward` for a chain, the model's ``forward``
        otherwise. The others run :func:`newton_forward`.
    kernels, packed
        As in :func:`chainprod.tape.forward` (``packed`` with the
        sequential method on a chain only).
    h0 : optional
        Recurrent models' initial state.
    return_trace : bool
        Also return a :class:`NewtonTrace` (no iterations for ``"sequential"``).
    **newton
        ``schedule``, ``backend``, ``workers``, ``tol``, ``max_iter``,
        ``init``, ``damping``, ``fallback``, ``engine_options``: see
        :func:`newton_forward`.

    Returns
    -------
    Tape (a chain) or what the model's ``forward`` returns
        And the trace with ``return_trace``.

    >>> import numpy as np, chainprod as cp
    >>> chain = cp.mlp([3, 4, 4, 4, 1], seed=0)
    >>> x = np.ones((2, 3))
    >>> tape = cp.forward(chain, x, method="deer")
    >>> bool(np.allclose(tape.out, cp.forward(chain, x).out))
    True
    """
    if method.__class__ is str and method == "sequential":
        # the plain pass, on the path every existing caller takes: checked in as few steps as possible
        unknown = sorted(set(newton) - {"schedule", "backend", "workers", "engine_options"}
                         - set(_SEQUENTIAL_ONLY_NOT))
        if unknown:
            raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}")
        given = sorted(k for k, v in newton.items() if v is not None and not (k == "schedule" and v == "auto")
                       and not (k == "backend" and v == "vectorized"))
        if given:
            raise ValueError(f"{', '.join(given)}: for the Newton methods ({', '.join(METHODS)}), not "
                             "method='sequential'")
    else:
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method: unknown {method!r}; valid methods: "
                             f"{', '.join(('sequential',) + METHODS)}")
        if packed is not None:
            raise ValueError("packed is for method='sequential' only: a Newton forward pass reads the chain's "
                             "own parameters")
        return newton_forward(model, x, method=method, h0=h0, kernels=kernels, return_trace=return_trace,
                              **newton)
    result = _sequential(model, x, h0, kernels, packed)
    if not return_trace:
        return result
    return result, NewtonTrace("sequential", schedule="loop", converged=True,
                               note="method 'sequential': the plain pass, no Newton iterations")


def gradient_tape(model, x, *, method, h0=None, kernels=None, schedule="auto", backend="vectorized", workers=None,
                  tol=None, max_iter=None, init=None, damping=None, fallback=None, engine_options=None):
    """``(tape, trace)``: what a gradient's backward pass reads, from a Newton forward pass.

    The solver :mod:`chainprod.forward_methods` runs for ``cp.grad(...,
    forward=method, forward_options=...)``; its docstring says what ``x``,
    ``h0`` and ``tape`` are per model (already checked inputs for the
    models over time). ``tape`` is None when the run did not converge and
    ``fallback="sequential"`` hands it to the model's own sequential pass
    (the trace says so); other options as in :func:`newton_forward`.
    """
    def run(opts, trace):
        if isinstance(model, Chain):
            return _chain_newton(model, x, opts, trace, init, kernels)
        if isinstance(model, Recurrent):
            return _recurrent_layers(model, x, h0[0], h0[1], opts, trace, init)[0]
        if isinstance(model, DiagonalRecurrence):
            return solve(DiagonalStates(model.params["a"], (x @ model.params["B"].T), h0), opts, trace,
                         read_init(init, x.shape[:2] + (model.d,), model.dtype, "time first: T, N, state d"))
        raise TypeError(f"a Newton forward pass takes a Chain, RNN, GRU, LSTM or DiagonalRecurrence, got "
                        f"{type(model).__name__}")

    return run_guarded(run, method, schedule, backend, workers, tol, max_iter, damping, fallback, engine_options,
                       kernels)


def model_lyapunov(model, x, *, h0=None, seed=0):
    """The largest Lyapunov exponent of ``model`` along its sequential trajectory from ``x`` (per step).

    :func:`chainprod.newton_models.lyapunov_exponent` of the recurrence a
    Newton forward pass solves: a chain's body (per layer), each layer of a
    recurrent model over time (the largest over the layers), a diagonal
    recurrence's states. Negative: contractive (few Newton iterations).
    """
    if isinstance(model, Chain):
        head, start, stop, _ = split_chain(model)
        if stop == start:
            raise ValueError("model_lyapunov: the chain has no layers of one width to solve")
        tape = tape_forward(model, x, kernels="numpy")
        per_layer = [o[i] for o in tape.outputs for i in range(o.shape[0])]
        h = per_layer[0] if head else np.ascontiguousarray(tape.x)
        return lyapunov_exponent(ChainBody(model, start, stop, h), np.stack(per_layer[start:stop]), seed=seed)
    if isinstance(model, DiagonalRecurrence):
        uu = read_u(model, x)
        h, _ = read_h0(model, h0, uu.shape[1])
        Bu = uu @ model.params["B"].T
        states = _diag_states(model.params["a"], Bu, h)
        return lyapunov_exponent(DiagonalStates(model.params["a"], Bu, h), states, seed=seed)
    if not isinstance(model, Recurrent):
        raise TypeError(f"model_lyapunov takes a Chain, RNN, GRU, LSTM or DiagonalRecurrence, got "
                        f"{type(model).__name__}")
    u = read_sequence(x, input_size=model.input_size, batch_first=model.batch_first, dtype=model.dtype)
    h0, _, c0, _ = model.initial_states(h0, u.shape[1])
    kern, H, p, best = get_recurrent_kernels("numpy"), model.hidden_size, model.params, -np.inf
    for layer in range(model.num_layers):
        W_hh = p[f"weight_hh_l{layer}"]
        X = u @ p[f"weight_ih_l{layer}"].T + (p[f"bias_ih_l{layer}"] if model.bias else 0)
        b_hh = p[f"bias_hh_l{layer}"] if model.bias else np.zeros(W_hh.shape[0], model.dtype)
        c = None if c0 is None else np.ascontiguousarray(c0[layer])
        Hs, Z = kern.forward(model.cell, X, W_hh, b_hh, np.ascontiguousarray(h0[layer]), c)
        states = Hs if c is None else np.concatenate([Hs, Z[..., 4 * H:]], axis=-1)
        best = max(best, lyapunov_exponent(CellLayer(model.cell, X, W_hh, b_hh, h0[layer], c, layer), states,
                                           seed=seed))
        u = Hs
    return best


def _diag_states(a, Bu, h):
    """``h_t = a h_{t-1} + Bu_t`` by a plain loop, ``(T, N, d)``."""
    out, s = np.empty_like(Bu), h
    for t in range(Bu.shape[0]):
        s = out[t] = a * s + Bu[t]
    return out


def _register():
    for m in METHODS:
        register_forward_method(m, functools.partial(gradient_tape, method=m))


_register()
