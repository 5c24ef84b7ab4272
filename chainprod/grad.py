"""Public entry points: per-layer gradients of a sequential model.

``grad`` = forward pass (sequential, stores layer outputs, :mod:`chainprod.tape`) + backward pass. The
backward pass needs, for every layer ``l``, the row ``v_l = cotangent . A_L ... A_{l+1}`` (``cotangent =
dloss/dx_L``), then a parameter VJP. Backprop forms the ``v_l`` one after another; a scan forms all of
them as the prefixes of one scan (``docs/theory.md``). This module resolves what runs (the method,
``auto``'s choice, the kernels, the backend) and hands the work to the short path of a training loop
(:mod:`chainprod.quick`), the compiled kernels (:mod:`chainprod.backward_compiled`), the numpy
reference (:mod:`chainprod.backward_numpy`) or a cluster.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import array_grad, backward_compiled, backward_numpy, backward_remote
from ._validate import as_float_array, check_workers, renamed_argument
from .arrays import is_foreign
from .autotune import COMPILED_BACKENDS, choose_method
from .cost import AUTO, known_remote_auto, remote_auto, valid_schedules
from .errors import NonFiniteError  # also re-exported for users of chainprod.grad
from .executors import EXECUTORS, Executor, Trace, get_executor, valid_backends
from .forward_methods import add_forward_note, chain_tape
from .layers import Chain
from .quick import chain_profile, mse_terms, serve, serve_backward, shared_ones
from .schedules import Schedule
from .tape import Tape, forward, layer_tape, resolve_kernels

__all__ = ["Tape", "forward", "backward", "loss_cotangent", "loss_seed", "grad", "value_and_grad", "LOSSES",
           "make_trace"]


# -- losses: (value(out, y), cotangent(out, y) = dvalue/dout) -----------------
def _sum_value(out, y):
    return out.sum()


def _sum_cotangent(out, y):
    return np.ones_like(out)


def _mse_value(out, y):
    return mse_terms(out, y)[0]


def _mse_cotangent(out, y):
    return mse_terms(out, y)[1]


LOSSES = {
    # sum over the batch of the (scalar) output: the gradient of the model itself
    "sum": (_sum_value, _sum_cotangent),
    # mean squared error over all elements, as torch.nn.functional.mse_loss
    "mse": (_mse_value, _mse_cotangent),
}


def loss_cotangent(tape: Tape, y=None, loss=None):
    """The loss value and its gradient with respect to the model output.

    Parameters
    ----------
    tape : Tape
        From :func:`forward`.
    y : array, optional
        Targets (with ``y`` the default loss is ``"mse"``).
    loss : {"sum", "mse"}, optional
        As in :func:`grad`.

    Returns
    -------
    value : float
    cotangent : ndarray, shape ``(N, d_L)``
        ``dloss/dx_L``, the row that :func:`backward` starts from.

    Examples
    --------
    >>> import numpy as np, chainprod as cp
    >>> tape = cp.forward(cp.mlp([3, 4, 1]), np.ones((2, 3)))
    >>> value, cotangent = cp.loss_cotangent(tape)
    >>> cotangent.tolist()
    [[1.0], [1.0]]
    """
    return _loss(tape, y, loss, True)


def _loss(tape, y, loss, want_value):
    """:func:`loss_cotangent`; the value (a reduction over the output) only if ``want_value``."""
    out = tape.out
    if loss is None:
        loss = "sum" if y is None else "mse"
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(LOSSES))}")
    if loss == "sum":
        if y is not None:
            raise ValueError("loss='sum' takes no targets y; use loss='mse' for targets")
        if out.shape[1] != 1:
            raise ValueError(
                f"grad of the model output needs output width 1, but the last layer has width "
                f"{out.shape[1]}; pass targets y= with loss='mse' for a vector output"
            )
    else:
        if y is None:
            raise ValueError(f"loss={loss!r} needs targets: pass y= with the model output's shape "
                             f"{out.shape[1:] if tape.one else out.shape}")
        y = as_float_array(y, "y", ndim=(1, 2))
        expect = out.shape[1:] if tape.one else out.shape
        # Accept exactly the output's shape, or (N,) for a width-1 output; never
        # reshape anything else (a transposed y would pair targets wrongly).
        if y.shape == expect or (out.shape[1] == 1 and y.shape == out.shape[:1] and not tape.one):
            y = y.reshape(out.shape)
        else:
            raise ValueError(f"y has shape {y.shape} but the model output has shape {expect}")
        if y.dtype != out.dtype:
            raise TypeError(f"y is {y.dtype} but the chain is {out.dtype}")
    if not want_value and loss == "sum":
        return None, shared_ones(out.shape, out.dtype)
    # Finite outputs far from y can overflow the squares (the value is then inf, the correctly rounded
    # answer) or the difference (an infinite cotangent, which the backward pass reports as a NonFiniteError
    # naming the layers): numpy's RuntimeWarning would only repeat that, without the layers.
    with np.errstate(over="ignore", invalid="ignore"):
        if loss == "mse":
            value, cotangent = mse_terms(out, y)
            # a finite sum of squares holds only finite differences, and (out - y) * (2 / n) is then finite:
            # the cotangent is read again only where the squares overflowed or met a NaN
            finite = np.isfinite(value) or bool(np.isfinite(cotangent).all())
            value = value if want_value else None
        else:
            value_fn, cotangent_fn = LOSSES[loss]
            value, cotangent = (float(value_fn(out, y)) if want_value else None), cotangent_fn(out, y)
            finite = bool(np.isfinite(cotangent).all())
    if not finite:
        L = len(tape.chain)
        raise NonFiniteError(f"the cotangent of the {loss} loss overflowed: the model output (layer {L - 1}) and "
                             f"the targets y are too far apart for {out.dtype}", (L - 1, L - 1))
    return value, cotangent




def loss_seed(tape: Tape, y=None, loss=None):
    """Deprecated name of :func:`loss_cotangent` (it warns; it will be removed in the next release)."""
    warnings.warn("chainprod.loss_seed is deprecated; use chainprod.loss_cotangent", DeprecationWarning,
                  stacklevel=2)
    return loss_cotangent(tape, y, loss)


def backward(tape: Tape, cotangent=None, *, method="auto", backend="vectorized", workers=None, trace=None,
             engine_options=None, kernels=None, seed=None):
    """Per-layer parameter gradients from a tape and the cotangent ``dloss/dx_L``.

    Parameters
    ----------
    tape : Tape
        From :func:`forward`.
    cotangent : ndarray, shape ``(N, d_L)``
        ``dloss/dx_L``, e.g. from :func:`loss_cotangent`.
    method, backend, workers
        As in :func:`grad`.
    trace : Trace, optional
        Filled with the run's events and the schedule that ran.
    engine_options : dict, optional
        ``timeout=``, ``retries=`` for Ray/Dask, checked by the executor.
    kernels : {"numba", "numpy"}, optional
        The compiled kernels or the numpy reference (default: the kernels
        the tape was made with).
    seed : ndarray, optional
        Deprecated keyword for ``cotangent`` (it warns).

    Returns
    -------
    sequence of tuples
        As in :func:`grad`.
    """
    # the short path of a compiled tape's backprop (chainprod.quick): a few microseconds of checks, not the
    # general path's; anything it does not serve, or any non-finite value, comes here again
    got = serve_backward(tape, cotangent, method, backend, workers, trace, engine_options, kernels, seed)
    if got is not None:
        return got
    cotangent = renamed_argument("backward", "cotangent", cotangent, "seed", seed)
    if cotangent is None:
        raise TypeError("backward() needs the cotangent dloss/dx_L (see chainprod.loss_cotangent)")
    L = len(tape.chain)
    workers = check_workers(workers)
    kernels = resolve_kernels(kernels if kernels is not None else tape.kernels)
    _check_method_backend(method, backend)
    compiled = kernels != "numpy"
    if compiled and not engine_options and backend.__class__ is str and backend in COMPILED_BACKENDS:
        # the common case: compiled kernels on this machine, no executor, no numpy warnings to silence
        return _run_local(tape, cotangent, method, backend, workers, trace, kernels, compiled, None)
    executor = get_executor(backend)
    remote = executor.runs_task_graphs  # a declared capability (chainprod.executors.Executor)
    engine_options = dict(engine_options or {})
    if engine_options:
        executor.check_options(engine_options)  # local: say they do nothing; remote: names and values
    if remote and L > 1 and isinstance(method, str) and method == AUTO:
        method = _remote_or_local(tape, executor, workers, kernels, trace)  # a plan for the cluster, or "backprop"
    on_cluster = remote and L > 1 and not (isinstance(method, str) and method == "backprop")
    if remote and not on_cluster and compiled and not engine_options:
        # the compiled backprop on the driver raises no numpy warnings (it counts non-finite values itself):
        # no errstate to enter, a microsecond of a call that auto kept off the cluster
        return _run_local(tape, cotangent, method, backend, workers, trace, kernels, compiled, None)
    # Overflow is detected and reported with the layer range after the fact;
    # numpy's own warnings would only repeat it without the range.
    with np.errstate(over="ignore", invalid="ignore"):
        if on_cluster:
            # Ray/Dask: Jacobians, scan and VJPs run on the workers as one
            # task graph; only per-layer gradients come back.
            return backward_remote.backward(layer_tape(tape), cotangent, executor, method=method,
                                            workers=workers, trace=trace, **engine_options)
        return _run_local(tape, cotangent, method, backend, workers, trace, kernels, compiled, engine_options)


def _run_local(tape, cotangent, method, backend, workers, trace, kernels, compiled, engine_options):
    """The backward pass on this machine: what ``method`` resolves to, compiled or on the numpy reference."""
    # a Schedule, or the string "backprop" (asked for, or what auto chose)
    choice = choose_method(tape, cotangent, method, backend, workers, kernels)
    if trace is not None and len(tape.chain) > 1:
        trace.schedule = choice
    if choice.__class__ is str:  # "backprop"
        if compiled or tape.packed is not None:
            # the kernel set by name: the compiled one, or the numpy reference on the packed layout
            return backward_compiled.backprop_grads(tape, cotangent, kernels)
        return backward_numpy.backprop_grads(tape, cotangent)
    if not choice.is_scan:
        raise ValueError(f"schedule {choice.name!r} does not produce every prefix; grad needs a scan")
    if compiled and backend in COMPILED_BACKENDS:
        threads = workers or COMPILED_BACKENDS[backend]()
        return backward_compiled.scan_grads(tape, cotangent, choice, threads, trace, kernels)
    return backward_numpy.scan_grads(layer_tape(tape), cotangent, choice, backend, workers, trace,
                                     engine_options)


def _remote_or_local(tape, executor, workers, kernels, trace):
    """``method="auto"`` on Ray or Dask: the cost model's plan for the cluster, or ``"backprop"`` here.

    The decision is :func:`chainprod.cost.remote_auto`'s, the one
    :func:`chainprod.cost.predict_grad` reports, so a prediction and a run
    agree. Where the cluster's predicted backward time (Jacobians, shipping,
    the scan's rounds) exceeds the local backprop's, ``auto`` runs backprop
    on the driver, and the trace says so in ``trace.note``.
    """
    chain = tape.chain
    # P without connecting: a run that stays local need not start a cluster
    P = workers or getattr(executor, "workers", None) or executor.prepare(None)
    structure, width = chain_profile(chain)
    L, name, N = len(chain), executor.name, tape.batch
    pick = (known_remote_auto(structure, L, width, name, P, N, kernels)
            or remote_auto(structure, L, width, backend=name, workers=P, batch=N, kernels=kernels))
    if trace is not None:
        trace.note = pick.note
    return "backprop" if pick.schedule is None else pick.schedule


def _check_method_backend(method, backend):
    """Fail on unknown names even where they would not be used (backprop, one layer)."""
    if not (backend in EXECUTORS if isinstance(backend, str) else isinstance(backend, Executor)):
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")
    if isinstance(method, str):
        if method != "backprop" and method != AUTO and method not in valid_schedules():
            raise ValueError(f"unknown schedule method {method!r}; valid methods: backprop, "
                             f"{', '.join(valid_schedules())}")
    elif not isinstance(method, Schedule) and not callable(method):
        raise TypeError(f"method must be a name, a Schedule or a callable, got {method!r}")


def make_trace(return_trace, backend, workers):
    """A new :class:`Trace` for ``return_trace=True``, the given Trace, or None for False."""
    if return_trace is True:
        return Trace(backend=str(backend), workers=workers)
    if isinstance(return_trace, Trace):
        return return_trace
    if return_trace is False or return_trace is None:
        return None
    raise TypeError(f"return_trace must be True, False or a chainprod.Trace, got {return_trace!r}")


#: the method a model other than a :class:`~chainprod.layers.Chain` defines to take ``grad``/``value_and_grad``
MODEL_HOOK = "__chainprod_value_and_grad__"


def _model_hook(model, h0, with_inputs):
    """The model's own gradient method, or ``None`` for a :class:`~chainprod.layers.Chain`.

    Recurrent models (:mod:`chainprod.recurrent`, :mod:`chainprod.ssm`) sit
    above this module and define ``MODEL_HOOK``; asking for the hook instead
    of importing their classes keeps the imports one-way, as
    ``__array_function__`` does for numpy.
    """
    hook = getattr(type(model), MODEL_HOOK, None)
    if hook is None and (h0 is not None or with_inputs):
        what = "h0" if h0 is not None else "with_inputs=True"
        raise ValueError(f"{what}: only recurrent models take an initial state or return input gradients; "
                         f"got a {type(model).__name__}")
    return hook


def _forward_kw(forward, forward_options):
    """The hook's ``forward=`` keywords: none for the default, so a hook that predates them still works."""
    if forward.__class__ is str and forward == "sequential" and forward_options is None:
        return {}
    return {"forward": forward, "forward_options": forward_options}


def value_and_grad(chain: Chain, x, y=None, *, loss=None, method="auto", backend="vectorized",
                   workers=None, return_trace=False, engine_options=None, kernels=None, h0=None,
                   with_inputs=False, forward="sequential", forward_options=None):
    """Loss value and per-layer gradients (see :func:`grad`)."""
    done = serve(chain, x, y, loss, method, backend, workers, return_trace, engine_options, kernels, h0,
                  with_inputs, forward, forward_options, True)
    if done is not None:
        return done
    hook = _model_hook(chain, h0, with_inputs)
    if hook is not None:
        return hook(chain, x, y, loss=loss, method=method, backend=backend, workers=workers,
                    return_trace=return_trace, engine_options=engine_options, kernels=kernels, h0=h0,
                    with_inputs=with_inputs, **_forward_kw(forward, forward_options))
    if is_foreign(x, y):  # torch, JAX or CuPy arrays: computed in their own library, on their device
        return array_grad.value_and_grad(chain, x, y, loss=loss, method=method, backend=backend, workers=workers,
                                         return_trace=return_trace, engine_options=engine_options, kernels=kernels,
                                         forward=forward, forward_options=forward_options)
    tape, ftrace = chain_tape(chain, x, kernels=kernels, forward=forward, forward_options=forward_options,
                              backend=backend, workers=workers)
    value, cotangent = _loss(tape, y, loss, True)
    trace = make_trace(return_trace, backend, workers)
    g = backward(tape, cotangent, method=method, backend=backend, workers=workers, trace=trace,
                 engine_options=engine_options, kernels=kernels)
    return (value, g, add_forward_note(trace, ftrace)) if return_trace else (value, g)


def grad(chain: Chain, x, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
         return_trace=False, engine_options=None, kernels=None, h0=None, with_inputs=False,
         forward="sequential", forward_options=None):
    """Per-layer parameter gradients of a sequential model.

    Parameters
    ----------
    chain : Chain, or a recurrent model
        A :class:`~chainprod.layers.Chain`; or a model over time
        (:class:`chainprod.RNN`, :class:`chainprod.GRU`,
        :class:`chainprod.LSTM`, :class:`chainprod.DiagonalRecurrence`),
        which then takes its input sequence as ``x`` and returns a dict of
        gradients named like its parameters (``docs/recurrences.md``).
    x : array, shape ``(N, d_0)`` or ``(d_0,)``
    y : array, optional
        Targets; with ``y`` the default loss is ``"mse"``.
    loss : {"sum", "mse"}, optional
        ``"sum"`` (default without ``y``): the gradient of ``sum over the
        batch of chain(x)``; needs output width 1. ``"mse"``: mean squared
        error against ``y``, as ``torch.nn.functional.mse_loss``.
    method : str or Schedule
        ``"backprop"`` (the sequential baseline: vector-Jacobian products,
        no Jacobian matrices), a schedule name (see
        :func:`chainprod.schedule`), ``"auto"``, or a ready ``Schedule``
        of length ``len(chain) - 1``. ``"auto"`` on the compiled kernels
        measures backprop against the scans that could win, once per chain
        shape, batch, dtype and worker count on this machine, and keeps the
        fastest (:mod:`chainprod.autotune`); on the numpy reference it asks the
        cost model; on Ray or Dask it runs the cluster's best plan, or
        backprop on the driver where the cost model predicts no plan on the
        cluster beats it (``trace.note`` says which, and why).
    backend : str
        Executor: ``"vectorized"``, ``"serial"``, ``"threads"``, ``"ray"``, ``"dask"``; ``"array"``,
        the default for a torch, JAX or CuPy ``x``, computed in its library and on its device
        (:mod:`chainprod.array_grad`: gradients and the value, a 0-d array, come back in it).
    workers : int, optional
        Worker count ``P`` for parallel executors and ``chunked``/``auto``.
    return_trace : bool or Trace
        Also return the run's :class:`~chainprod.executors.Trace`.
    engine_options : dict, optional
        Per-call options of a distributed executor: ``timeout`` (seconds,
        bounds every wait) and ``retries`` (re-runs of tasks whose worker
        died). Local executors take none.
    kernels : {"numba", "numpy"}, optional
        ``"numba"`` (the default when numba is installed): compiled kernels,
        one call for the forward pass, one for backprop, two for a scan
        (threads = ``workers``; ``vectorized`` alone uses one). ``"numpy"``:
        the reference implementation through the executors.

    h0 : array, optional
        Recurrent models only: the initial state (zeros by default).
    with_inputs : bool
        Recurrent models only: also return the gradients for the inputs and
        the initial state.
    forward : str
        The forward pass the gradients are taken after: ``"sequential"``
        (the default, the plain pass) or a parallel one, ``"deer"``,
        ``"quasi_deer"``, ``"elk"``, ``"quasi_elk"`` (Newton iterations on
        the whole trajectory, ``docs/newton.md``); any backward ``method``.
        The gradients equal the sequential forward's within the solve's
        tolerance; with ``return_trace`` the trace's note gives the Newton
        iterations and the final residual.
    forward_options : dict, optional
        For a parallel ``forward`` only: ``tol``, ``max_iter``,
        ``schedule``, ``damping``, ``fallback``, ``init``, ``backend``,
        ``workers``, ``engine_options`` as in
        :func:`chainprod.newton.newton_forward` (``backend`` and
        ``workers`` default to the gradient's).

    Returns
    -------
    sequence of tuples
        ``grads[l]`` has one array per parameter of layer ``l``, shaped like
        it. A list on the numpy reference; on the compiled kernels a
        :class:`~chainprod.kernels.LayerGrads`, whose tuples are views of one
        flat array (``grads.flat``) made when first read, so a backward pass
        does not pay for ``2 L`` array objects nobody reads.
    """
    done = serve(chain, x, y, loss, method, backend, workers, return_trace, engine_options, kernels, h0,
                  with_inputs, forward, forward_options, False)
    if done is not None:
        return done[1]
    hook = _model_hook(chain, h0, with_inputs)
    if hook is not None:
        out = hook(chain, x, y, loss=loss, method=method, backend=backend, workers=workers,
                   return_trace=return_trace, engine_options=engine_options, kernels=kernels, h0=h0,
                   with_inputs=with_inputs, **_forward_kw(forward, forward_options))
        return out[1:] if return_trace else out[1]
    if is_foreign(x, y):  # torch, JAX or CuPy arrays: computed in their own library, on their device
        out = array_grad.value_and_grad(chain, x, y, loss=loss, method=method, backend=backend, workers=workers,
                                        return_trace=return_trace, engine_options=engine_options, kernels=kernels,
                                        forward=forward, forward_options=forward_options)
        return out[1:] if return_trace else out[1]
    tape, ftrace = chain_tape(chain, x, kernels=kernels, forward=forward, forward_options=forward_options,
                              backend=backend, workers=workers)
    _, cotangent = _loss(tape, y, loss, False)
    trace = make_trace(return_trace, backend, workers)
    g = backward(tape, cotangent, method=method, backend=backend, workers=workers, trace=trace,
                 engine_options=engine_options, kernels=kernels)
    return (g, add_forward_note(trace, ftrace)) if return_trace else g
