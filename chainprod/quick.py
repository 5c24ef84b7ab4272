"""The short paths of :func:`chainprod.grad` and :func:`chainprod.backward` for the calls made in a training loop.

A small chain's whole backward pass takes a few microseconds in the compiled
kernels, so the general path's layers (argument checks written for every
option, a :class:`~chainprod.tape.Tape`, kernel-set lookups, read-only views
made per call, a context manager per kernel call) cost as much as the work.
:func:`try_grad` serves the most common call directly: a
:class:`~chainprod.layers.Chain`, a C-contiguous ``(N, d_0)`` numpy ``x`` of
the chain's dtype, the ``"sum"`` loss or the ``"mse"`` loss against numpy targets, ``method="backprop"`` (or ``"auto"``
once it has chosen backprop for this problem in this process), the compiled
kernels on this thread, and no trace or parallel forward pass; on a cluster
backend (``ray``, ``dask``, with ``workers`` given) only where the cost model
keeps the gradient on the driver, as the general path does. It
runs the same compiled loops with the same crossover and batch policy as
:mod:`chainprod.kernels.numba_kernels` (:func:`serial_plan` says when they
apply), so its gradients equal the general path's bit for bit
(``tests/test_quick.py``).

:func:`try_backward` does the same for :func:`chainprod.backward` on a tape
the compiled kernels made: its one compiled call runs the loop and counts the
non-finite gradients.

It never raises on its own account: any input it does not serve, and any
non-finite value met on the way, returns ``None``, and the caller runs the
general path, which checks everything and says what is wrong and where.
"""

from __future__ import annotations

import numpy as np

from ._caches import kept_on
from .autotune import COMPILED_BACKENDS, known_choice
from .cost import AUTO, known_remote_auto, remote_auto
from .executors import get_executor
from .kernels import LayerGrads, get_kernels, pack
from .layers import Chain
from .tape import Tape, resolve_kernels

__all__ = ["chain_profile", "local_method", "mse_terms", "serve", "serve_backward", "shared_ones", "sum_of_squares",
           "try_backward", "try_grad"]

_ONES: dict = {}


def mse_terms(out, y, into=None):
    """``(value, cotangent)`` of the mean squared error of ``out`` against ``y``, ``out - y`` formed once.

    The value is :func:`sum_of_squares` of the difference over the number of
    entries; the cotangent is ``(out - y) *
    (2 / n)`` in the dtype, as torch's ``mse_loss`` forms its gradient. Three
    passes over memory where the value and the cotangent apart took eight
    (the mean of a squared copy, then ``2 (out - y) / n``): 22 -> 10 us at
    128 x 256 float32. A finite value holds only finite differences, and then
    a finite cotangent: callers read the cotangent for NaN or infinity only
    where the value is not finite. numpy's overflow warnings are the caller's
    to silence. The cotangent is written into ``into`` where given (shaped
    like ``out``: a workspace's array), else into a new array.
    """
    d = np.subtract(out, y, out=into)
    return sum_of_squares(d) / d.size, np.multiply(d, d.dtype.type(2.0 / d.size), out=d)


#: values per piece of :func:`sum_of_squares`
SQUARES_PIECE = 1024


def sum_of_squares(a):
    """The sum of the squares of ``a``'s values: pieces of :data:`SQUARES_PIECE` in its dtype, their sums in float64.

    Pieces of the flat array (a copy where ``a`` is not contiguous), not rows: numpy's row-wise product costs a call
    per row, and the recurrent models' states have rows of ``N H`` values (a
    float32 ``(1000, 1, 8)`` array: 16.7 us by rows of 8, 2.6 us in pieces).
    """
    flat = a.reshape(-1)
    whole = flat.size - flat.size % SQUARES_PIECE
    rows = flat[:whole].reshape(-1, SQUARES_PIECE)
    tail = flat[whole:]
    return float(np.einsum("ij,ij->i", rows, rows).sum(dtype=np.float64)) + float(np.dot(tail, tail))


def shared_ones(shape, dtype):
    """The ``"sum"`` cotangent: one read-only array of ones per shape and dtype (its users only read it)."""
    key = (shape, dtype)
    got = _ONES.get(key)
    if got is None:
        if len(_ONES) >= 64:
            _ONES.clear()
        got = _ONES[key] = np.ones(shape, dtype)
        got.flags.writeable = False
    return got


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _empty(dtype):
    """backprop's ``row_in`` when the input row is not kept: length 0, never written."""
    return _EMPTY[dtype]


def try_grad(chain, x, method, want_value, y=None, P=1):
    """``(value, grads)`` by the compiled backprop loops, or ``None`` if not served.

    Parameters
    ----------
    chain : Chain
    x : object
        The call's input; served only as a C-contiguous ``(N, d_0)`` numpy
        array of the chain's dtype.
    method : object
        Served: ``"backprop"``, and ``"auto"`` where :func:`known_choice`
        already holds backprop for this chain, batch, dtype and ``P``
        workers (the compiled backends' key: 1 on ``vectorized``).
    want_value : bool
        Also return the loss value (``None`` in its place otherwise).
    y : object, optional
        ``None``: the ``"sum"`` loss (output width 1). Else the ``"mse"``
        loss against ``y``, served only as a C-contiguous finite numpy array
        of the output's shape ``(N, d_L)`` and the chain's dtype.
    """
    if x.__class__ is not np.ndarray or chain.__class__ is not Chain or x.ndim != 2:
        return None
    if resolve_kernels(None) != "numba":
        return None
    N = x.shape[0]
    if N < 1 or x.dtype != chain.dtype or not x.flags.c_contiguous:
        return None
    pc = pack(chain)
    if x.shape[1] != pc.width_in or (pc.width_out != 1 if y is None else not _served_targets(y, N, pc)):
        return None
    how = _serial_backprop(chain, pc, N, method, P)
    if how is None:
        return None
    kernels, loops, cross = how
    x1 = x.reshape(-1)  # a new view: its flag below leaves the caller's array writeable
    if not kernels.all_finite(x1):
        return None
    # The general path hands the loops read-only inputs (kernels/checks.py); the same array types here
    # mean the same compiled specializations, not a second compile of each loop.
    x1.setflags(write=False)  # setflags: 0.1 us less than the flags object's setter (measured)
    Y = np.empty(pc.tape_size(N), pc.dtype)
    args = (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off, pc.theta, x1)
    if loops.forward_rows(*args, Y, N, 0, N, cross) >= 0:
        return None
    Y.setflags(write=False)
    if y is None:
        cotangent, value = shared_ones((N,), pc.dtype), (float(Y[Y.shape[0] - N:].sum()) if want_value else None)
    else:
        # the general path's mean squared error (chainprod.grad.LOSSES): the same function
        out = Y[Y.shape[0] - N * pc.width_out:].reshape(N, pc.width_out)
        with np.errstate(over="ignore", invalid="ignore"):
            value, cotangent = mse_terms(out, y)
        if not (np.isfinite(value) or kernels.all_finite(cotangent.reshape(-1))):
            return None
        value = value if want_value else None
        cotangent = cotangent.reshape(-1)
        cotangent.setflags(write=False)
    grads = np.empty(pc.n_params, pc.dtype)
    bad, nonfinite = loops.backprop_serial_counted(*args, Y, cotangent, N, grads, _empty(pc.dtype), pc.max_width,
                                                   cross)
    if bad >= 0 or nonfinite:
        return None
    return value, LayerGrads(pc, grads)


def _serial_backprop(chain, pc, N, method, P):
    """``(kernel set, loops, crossover)`` where ``method`` means the compiled backprop run serially, else None.

    ``"backprop"``, or ``"auto"`` once :func:`known_choice` holds backprop for
    this chain, batch and ``P``; serially where
    :func:`~chainprod.kernels.numba_kernels.serial_plan` says the loops run so.
    """
    if method != "backprop" and (method != "auto" or (pc.L > 1 and known_choice(chain, N, P, "numba") != "backprop")):
        return None
    kernels = get_kernels("numba")
    plan = kernels.serial_plan(pc, N)
    return None if plan is None else (kernels, *plan)


def _served_targets(y, N, pc):
    return (y.__class__ is np.ndarray and y.shape == (N, pc.width_out) and y.dtype == pc.dtype
            and y.flags.c_contiguous and get_kernels("numba").all_finite(y.reshape(-1)))


def chain_profile(chain):
    """``(structure, width)`` the cost model describes ``chain`` by: its layer tables are per structure and width.

    ``"diagonal"`` when every layer but a readout is diagonal, else
    ``"dense"``; the width is the widest layer (its hidden width). A
    chain's structure never changes, so it is computed once per chain (3 us
    a call otherwise, on every ``auto`` call on a cluster backend).
    """
    got = chain.__dict__.get("_cost_profile")
    if got is None:
        L = len(chain)
        kinds = {r.cls.kind for r in chain.runs if r.start < L - 1} or {chain.runs[-1].cls.kind}
        structure = "diagonal" if kinds == {"diag"} else "dense"
        got = chain.__dict__["_cost_profile"] = (structure, max(max(r.d_in, r.d_out) for r in chain.runs))
    return got


def try_backward(tape, cotangent, method, P=1):
    """The per-layer gradients of a compiled tape by the compiled backprop loop, or ``None`` if not served.

    :func:`chainprod.backward`'s short path: a tape the compiled kernels made
    (its flat outputs kept), a C-contiguous numpy cotangent of shape
    ``(N, d_L)`` and the chain's dtype, ``method`` as in :func:`try_grad`.
    The loop :func:`chainprod.kernels.numba_kernels.backprop` runs, with the
    same crossover and batch policy, so the gradients are the general path's
    bit for bit. Any non-finite value returns ``None``: the general path then
    runs and names the layers.
    """
    if tape.__class__ is not Tape or tape.kernels != "numba" or tape.flat is None:
        return None
    # What the loop reads besides the cotangent is the tape's, made once per tape and kept on it: the
    # read-only views the general path hands the loops (the same compiled specializations; a view and its
    # flag cost 0.4 us each) and the packed chain's arrays (0.3 us a call to gather, measured)
    kept = tape.__dict__.get("_backprop_args")
    if kept is None:
        x = tape.x
        if not x.flags.c_contiguous:
            return None
        pc = tape.packed if tape.packed is not None else pack(tape.chain)
        x1, Y = x.reshape(-1), tape.flat.view()
        x1.flags.writeable = Y.flags.writeable = False
        kept = tape.__dict__["_backprop_args"] = (
            (x.shape[0], pc.width_out), pc.dtype, pc, (pc.kind, pc.act, pc.d_in, pc.d_out, pc.p_off, pc.y_off,
                                                       pc.theta, x1, Y), _empty(pc.dtype), pc.max_width)
    shape, dtype, pc, head, no_rows, width = kept
    if (cotangent.__class__ is not np.ndarray or cotangent.shape != shape or cotangent.dtype != dtype
            or not cotangent.flags.c_contiguous):
        return None
    N = shape[0]
    how = _serial_backprop(tape.chain, pc, N, method, P)
    if how is None:
        return None
    _, loops, cross = how
    rows = cotangent.reshape(-1)
    rows.setflags(write=False)  # a new view: the caller's cotangent stays writeable
    grads = np.empty(pc.n_params, dtype)
    bad, nonfinite = loops.backprop_serial_counted(*head, rows, N, grads, no_rows, width, cross)
    if bad >= 0 or nonfinite:
        return None
    return LayerGrads(pc, grads)


def _served_call(method, backend, workers, kernels) -> bool:
    """The options both short paths serve: names for ``method`` and ``backend``, an int ``workers``, numba."""
    return (method.__class__ is str and backend.__class__ is str
            and (workers is None or (workers.__class__ is int and workers >= 1))
            and (kernels is None or (kernels.__class__ is str and kernels == "numba")))


def _served_options(y, loss, method, backend, workers, return_trace, engine_options, kernels, h0, with_inputs,
                    forward, forward_options) -> bool:
    return (h0 is None and engine_options is None and forward_options is None and with_inputs is False
            and (return_trace is False or return_trace is None) and forward.__class__ is str
            and forward == "sequential" and _served_call(method, backend, workers, kernels)
            and (loss is None or (loss.__class__ is str and loss == ("sum", "mse")[y is not None])))


def serve_backward(tape, cotangent, method, backend, workers, trace, engine_options, kernels, seed):
    """:func:`try_backward` for :func:`chainprod.backward`'s call, else None.

    Served: a compiled tape, ``trace``, ``engine_options`` and the deprecated
    ``seed`` unset, and the backends and ``auto`` as in :func:`serve`.
    """
    if (tape.__class__ is not Tape or tape.kernels != "numba" or seed is not None or trace is not None
            or engine_options is not None or not _served_call(method, backend, workers, kernels)):
        return None
    if method == "backprop" and (backend == "vectorized" or backend == "threads"):
        return try_backward(tape, cotangent, method)  # workers do not change a serial loop (0.2 us a call)
    how = kept_local_method(tape.chain, tape.batch, method, backend, workers)
    return None if how is None else try_backward(tape, cotangent, *how)


def kept_local_method(chain, N, method, backend, workers):
    """:func:`local_method`, its answers kept on the chain by options until the caches are cleared.

    It reads nothing else. On a cluster backend it took 0.4-0.9 us of a 7.6 us
    call, enough for the auto check to flag ``auto`` on ``ray``, which runs
    this very backprop here, at 1.13x it (a fresh-clone main job, measured).
    An ``auto`` whose kept choice is backprop is kept as ``"backprop"``; one
    not decided yet is not kept.
    """
    if chain.__class__ is not Chain:  # nothing is written on a model that is not chainprod's
        return local_method(chain, N, method, backend, workers)
    memo = kept_on(chain, "_local_methods")
    key = (N, method, backend, workers)
    how = memo.get(key, memo)  # memo itself: not asked yet (None is an answer)
    if how is memo:
        how = local_method(chain, N, method, backend, workers)
        if how is not None and how[0] == AUTO:
            if known_choice(chain, N, how[1], "numba") != "backprop":
                return how  # undecided, or a scan: asked again on the next call
            # auto's choice is kept until the caches are cleared, as this answer is: asking for it on
            # every call put auto 0.7 us (11-14 %) behind backprop on a 7 us call (a main job, measured)
            how = ("backprop", how[1])
        memo[key] = how
    return how


def local_method(chain, N, method, backend, workers):
    """``(method, P)`` for :func:`try_grad` / :func:`try_backward` on ``backend``, or ``None`` if not served.

    On ``vectorized`` and ``threads``: ``method`` on ``workers`` (the
    backend's default count without). On ``ray`` and ``dask`` (``workers``
    given, so no cluster is asked): ``"backprop"``, and ``auto`` where the
    cost model keeps the gradient on the driver, as the general path would.
    """
    if backend == "vectorized" or backend == "threads":
        return method, workers or COMPILED_BACKENDS[backend]()
    if (backend != "ray" and backend != "dask") or not workers or chain.__class__ is not Chain:
        return None
    L = len(chain)
    if L < 2:
        return None
    if method == AUTO:
        # a decision already made for these sizes was made after the engine was found: no need to ask
        # again (0.1 us), and len once (0.1 us more): this path's whole overhead is the margin by which
        # auto on a cluster that runs backprop here trails backprop (1 us of 5 on a short chain, measured)
        structure, width = chain_profile(chain)
        pick = known_remote_auto(structure, L, width, backend, workers, N, "numba")
        if pick is None:
            get_executor(backend)  # a missing engine is an error here too (made once, then looked up)
            pick = remote_auto(structure, L, width, backend=backend, workers=workers, batch=N, kernels="numba")
        return ("backprop", 1) if pick.schedule is None else None
    if method == "backprop":
        get_executor(backend)
        return method, 1
    return None


def serve(chain, x, y, loss, method, backend, workers, return_trace, engine_options, kernels, h0, with_inputs,
           forward, forward_options, want_value):
    """:func:`try_grad` for the training loop's call, else None.

    Served: every option at its default but ``backend`` and ``workers``. On
    ``vectorized`` and ``threads`` ``auto`` takes the short path once its
    choice for those workers is known to be backprop; on ``ray`` and
    ``dask`` (``workers`` given, so no cluster is asked) where the cost
    model keeps the gradient on the driver, as the general path would.
    """
    if not _served_options(y, loss, method, backend, workers, return_trace, engine_options, kernels, h0,
                           with_inputs, forward, forward_options):
        return None
    if x.__class__ is not np.ndarray or x.ndim != 2:
        return None
    how = kept_local_method(chain, x.shape[0], method, backend, workers)
    return None if how is None else try_grad(chain, x, how[0], want_value, y, how[1])
