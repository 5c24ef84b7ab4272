"""Public entry points: per-layer gradients and suffix products.

``grad`` = forward pass (sequential, stores layer outputs) + backward pass.
The backward pass needs, for every layer ``l``, the row vector
``v_l = seed . A_L ... A_{l+1}`` (``seed = dloss/dx_L``), then a parameter
VJP. Backprop forms the ``v_l`` one after another; every other method hands
the Jacobians to a schedule and an executor, which form all of them as the
prefixes of one scan::

    scan order:  [seed . A_L,  A_{L-1},  A_{L-2},  ...,  A_2]
    prefix [0,k] = seed . A_L ... A_{L-k} = v_{L-k-1}

Position 0 is a thin ``1 x w`` block, so every prefix is thin too: the
schedule's down-sweep ops are vector-matrix products.
"""

from __future__ import annotations

import numpy as np

from ._validate import as_float_array, check_workers
from .blocks import COMBINE, KINDS, BlockSeq, Segment
from .cost import LOCAL_BACKENDS, auto_runs_backprop
from .errors import NonFiniteError
from .executors import Executor, Trace, get_executor, valid_backends
from .layers import Chain, _run_forward
from .schedules import Schedule, schedule, valid_methods

__all__ = ["Tape", "forward", "backward", "loss_seed", "grad", "value_and_grad", "LOSSES", "make_trace"]


# -- losses: (value(out, y), seed(out, y) = dvalue/dout) ----------------------
def _sum_value(out, y):
    return out.sum()


def _sum_seed(out, y):
    return np.ones_like(out)


def _mse_value(out, y):
    return np.mean((out - y) ** 2)


def _mse_seed(out, y):
    return 2.0 * (out - y) / out.size


LOSSES = {
    # sum over the batch of the (scalar) output: the gradient the issue defines
    "sum": (_sum_value, _sum_seed),
    # mean squared error over all elements, as torch.nn.functional.mse_loss
    "mse": (_mse_value, _mse_seed),
}


class Tape:
    """What a forward pass keeps for the backward pass: every layer's output.

    ``outputs[r]`` is the ``(count, N, d_out)`` stack of run ``r``'s outputs;
    ``inputs[r]`` is that run's input ``(N, d_in)``.
    """

    def __init__(self, chain: Chain, x2, one: bool):
        self.chain = chain
        self.x = x2
        self.one = one
        self.inputs, self.outputs = [], []
        h = x2
        for run in chain.runs:
            Y = np.empty((run.count, x2.shape[0], run.d_out), dtype=chain.dtype)
            _run_forward(run, h, Y)
            self.inputs.append(h)
            self.outputs.append(Y)
            h = Y[-1]
        self.out = h

    @property
    def batch(self):
        return self.x.shape[0]

    def run_inputs(self, r):
        """``(count, N, d_in)``: each layer's input in run ``r``."""
        Y = self.outputs[r]
        return np.concatenate([self.inputs[r][None], Y[:-1]]) if Y.shape[0] > 1 else self.inputs[r][None]


def forward(chain: Chain, x) -> Tape:
    """Run the chain forward on ``x`` and keep what the backward pass needs."""
    if not isinstance(chain, Chain):
        raise TypeError(f"expected a chainprod Chain, got {type(chain).__name__}")
    x2, one = chain.check_input(x)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below with the layer
        tape = Tape(chain, x2, one)
    if not np.all(np.isfinite(tape.out)):
        for run, Y in zip(chain.runs, tape.outputs):
            ok = np.isfinite(Y.reshape(Y.shape[0], -1)).all(axis=1)
            if not ok.all():
                l = run.start + int(np.flatnonzero(~ok)[0])
                raise NonFiniteError(f"the forward pass overflowed: the output of layer {l} is NaN or "
                                     "infinite (inputs and parameters are finite)", (l, l))
    return tape


def loss_seed(tape: Tape, y=None, loss=None):
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
    seed : ndarray, shape ``(N, d_L)``
        ``dloss/dx_L``, the row that :func:`backward` starts from.

    >>> import numpy as np, chainprod as cp
    >>> tape = cp.forward(cp.mlp([3, 4, 1]), np.ones((2, 3)))
    >>> value, seed = cp.loss_seed(tape)
    >>> seed.tolist()
    [[1.0], [1.0]]
    """
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
    value_fn, seed_fn = LOSSES[loss]
    return float(value_fn(out, y)), seed_fn(out, y)


def backward(tape: Tape, seed, *, method="auto", backend="vectorized", workers=None, trace=None,
             engine_options=None):
    """Per-layer parameter gradients from a tape and ``seed = dloss/dx_L`` ``(N, d_L)``.

    ``engine_options`` (``timeout=``, ``retries=`` for Ray/Dask) go to the executor.
    """
    engine_options = dict(engine_options or {})
    chain = tape.chain
    L = len(chain)
    workers = check_workers(workers)
    _check_method_backend(method, backend)
    if engine_options and not hasattr(get_executor(backend), "backward_remote"):
        get_executor(backend).check_options(engine_options)  # local: say they do nothing, whatever the method
    # Overflow is detected and reported with the layer range after the fact;
    # numpy's own warnings would only repeat it without the range.
    with np.errstate(over="ignore", invalid="ignore"):
        if isinstance(method, str) and method == "backprop":
            deltas = _backprop_deltas(tape, seed)
        elif _auto_prefers_backprop(tape, method, backend, workers, trace):
            deltas = _backprop_deltas(tape, seed)
        # -- distributed dispatch (ray/dask): Jacobians, scan and VJPs run on the workers;
        # only per-layer gradients come back (chainprod/executors/distributed.py) --
        elif L > 1 and hasattr(get_executor(backend), "backward_remote"):
            return get_executor(backend).backward_remote(tape, seed, method=method, workers=workers,
                                                         trace=trace, **engine_options)
        # -- end distributed dispatch --
        else:
            deltas = _scan_deltas(tape, seed, method, backend, workers, trace, engine_options)
    grads = []
    for r, run in enumerate(chain.runs):
        with np.errstate(over="ignore", invalid="ignore"):
            gs = run.cls.param_grads(run.params, deltas[r], tape.run_inputs(r))
        for g in gs:
            if np.isfinite(g).all():  # the common case: one pass, no per-layer reduction
                continue
            ok = np.isfinite(g.reshape(g.shape[0], -1)).all(axis=1)
            if not ok.all():
                l = run.start + int(np.flatnonzero(~ok)[0])
                raise NonFiniteError(f"the parameter gradient of layer {l} overflowed (delta^T x is not "
                                     "finite although both factors are)", (l, l))
        # list(array) makes the per-layer views in C; zip pairs them per layer
        grads += zip(*(list(g) for g in gs))
    return grads


def _check_method_backend(method, backend):
    """Fail on unknown names even where they would not be used (backprop, one layer)."""
    if not isinstance(backend, Executor) and backend not in valid_backends():
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(valid_backends())}")
    if isinstance(method, str) and method != "backprop" and method not in valid_methods():
        raise ValueError(f"unknown schedule method {method!r}; valid methods: backprop, "
                         f"{', '.join(valid_methods())}")
    if not isinstance(method, (str, Schedule)) and not callable(method):
        raise TypeError(f"method must be a name, a Schedule or a callable, got {method!r}")


def _auto_prefers_backprop(tape, method, backend, workers, trace) -> bool:
    """``method="auto"`` on a local backend: is backprop itself the fastest way?

    The cost model picks the best scan for the real block shapes (planned on a
    shape-only sequence: no Jacobian is formed to decide). When that is the
    ``sequential`` scan, no parallel schedule pays for its extra matrix-matrix
    work here, and backprop does the same sequential order without forming
    Jacobians at all, so it wins outright (seed Q4: wide blocks, short chains,
    few workers). The trace then records ``schedule = "backprop"``.
    """
    if not (isinstance(method, str) and method == "auto") or len(tape.chain) < 2 or backend not in LOCAL_BACKENDS:
        return False
    plan = schedule("auto", len(tape.chain) - 1, workers=workers, blocks=_jacobian_shapes(tape), backend=backend)
    if not auto_runs_backprop(plan, backend):
        return False
    if trace is not None:
        trace.schedule = "backprop"
    return True


def _jacobian_shapes(tape) -> BlockSeq:
    """The scan sequence of :func:`_jacobian_blocks` as shapes only (zero-stride views, no memory)."""
    chain, N, dt = tape.chain, tape.batch, tape.chain.dtype
    L = len(chain)
    last = chain.layers[-1]
    segments = [Segment("dense", np.broadcast_to(np.zeros((), dt), (1, N, 1, last.d_in)))]
    for run in reversed(chain.runs):
        a, b = max(run.start, 1), min(run.start + run.count, L - 1)
        if a < b:
            shape = KINDS[run.cls.kind].shape(run.d_out, run.d_in)
            segments.append(Segment(run.cls.kind, np.broadcast_to(np.zeros((), dt), (b - a, N, *shape))))
    return BlockSeq(segments)


def _derivs(tape, r):
    run = tape.chain.runs[r]
    return run.cls.derivs(tape.outputs[r], run.activation)


def _backprop_deltas(tape, seed):
    """The sequential baseline: one vector-Jacobian product per layer, last to first."""
    deltas = []
    g = seed
    for r in reversed(range(len(tape.chain.runs))):
        run = tape.chain.runs[r]
        S = _derivs(tape, r)
        D = np.empty_like(S)
        g = run.cls.backprop(run.params, S, g, D)
        ok = np.isfinite(D.reshape(D.shape[0], -1)).all(axis=1) if not np.isfinite(D).all() else None
        if ok is not None:
            # delta_l = v_l * act' and v_l = seed . A_L ... A_{l+1}
            first, last = run.start + int(np.flatnonzero(~ok)[-1]) + 1, len(tape.chain) - 1
            raise NonFiniteError(
                f"backprop produced a non-finite gradient: the product of the input Jacobians of "
                f"layers {first}..{last} (0-based) overflowed", (first, last))
        deltas.append(D)
    return deltas[::-1]


def _scan_deltas(tape, seed, method, backend, workers, trace, engine_options):
    chain = tape.chain
    L = len(chain)
    runs = chain.runs
    S = [_derivs(tape, r) for r in range(len(runs))]
    # v[l] per layer, as per-run stacks G[r] of shape (count, N, d_out).
    G = [np.empty_like(s) for s in S]
    G[-1][-1] = seed
    if L > 1:
        seq = _jacobian_blocks(chain, S, seed)
        sched = schedule(method, L - 1, workers=workers, blocks=seq, backend=backend)
        if not sched.is_scan:
            raise ValueError(f"schedule {sched.name!r} does not produce every prefix; grad needs a scan")
        if trace is not None:
            trace.schedule = sched
        result = get_executor(backend).run(sched, seq, workers=workers, trace=trace, **engine_options)
        bad = result.first_nonfinite()
        if bad is not None:
            lo = L - 1 - bad - 1
            raise NonFiniteError(
                f"non-finite value in the product of the input Jacobians of layers {lo + 1}..{L - 1} "
                f"(0-based): the chain product overflowed; scale the weights down or shorten the chain",
                (lo + 1, L - 1))
        stacked = result.stack()
        for r, run in enumerate(runs):
            a, b = run.start, min(run.start + run.count, L - 1)  # layers whose v comes from the scan
            if a >= b:
                continue
            # layer l <- prefix k = L-2-l; layers a..b-1 are prefixes L-2-a down to L-1-b
            ks = np.arange(L - 2 - a, L - 2 - b, -1)
            if stacked is not None:
                G[r][: b - a] = stacked[1][L - 1 - b: L - 1 - a][::-1].reshape(b - a, *G[r].shape[1:])
            else:
                for i, k in enumerate(ks):
                    G[r][i] = result.block(int(k))[1].reshape(G[r].shape[1:])
    return [g * s for g, s in zip(G, S)]


def _jacobian_blocks(chain, S, seed) -> BlockSeq:
    """The scan sequence ``[seed . A_L, A_{L-1}, ..., A_2]`` as stacked segments (owned)."""
    L = len(chain)
    runs = chain.runs
    last = runs[-1]
    # Head: seed (N, 1, d_L) times the last layer's Jacobian.
    J_last = last.cls.jacobians(tuple(p[-1:] for p in last.params), S[-1][-1:])[0]
    rule = COMBINE[("dense", last.cls.kind)]
    head = rule.kernel(seed[:, None, :], J_last)
    segments = [Segment("dense", head[None])]
    for r in reversed(range(len(runs))):
        run = runs[r]
        a = max(run.start, 1)  # layer 0's Jacobian is never needed
        b = min(run.start + run.count, L - 1)  # layer L-1 is inside the head
        if a >= b:
            continue
        ia, ib = a - run.start, b - run.start
        # Scan order is last layer first. Run parameters are stored that way,
        # so the Jacobians come out contiguous in scan order (reading or
        # writing a reversed view of a big stack is several times slower).
        n = run.count
        P = tuple(p[n - ib: n - ia] for p in run.reversed)
        segments.append(Segment(run.cls.kind, run.cls.jacobians(P, S[r][ia:ib][::-1])))
    return BlockSeq(segments, owned=True)


def make_trace(return_trace, backend, workers):
    if return_trace is True:
        return Trace(backend=str(backend), workers=workers)
    if isinstance(return_trace, Trace):
        return return_trace
    return None


def value_and_grad(chain: Chain, x, y=None, *, loss=None, method="auto", backend="vectorized",
                   workers=None, return_trace=False, engine_options=None):
    """Loss value and per-layer gradients (see :func:`grad`)."""
    tape = forward(chain, x)
    value, seed = loss_seed(tape, y, loss)
    trace = make_trace(return_trace, backend, workers)
    g = backward(tape, seed, method=method, backend=backend, workers=workers, trace=trace,
                 engine_options=engine_options)
    return (value, g, trace) if return_trace else (value, g)


def grad(chain: Chain, x, y=None, *, loss=None, method="auto", backend="vectorized", workers=None,
         return_trace=False, engine_options=None):
    """Per-layer parameter gradients of a sequential model.

    Parameters
    ----------
    chain : Chain
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
        of length ``len(chain) - 1``.
    backend : str
        Executor: ``"vectorized"``, ``"serial"``, ``"threads"``, ``"ray"``, ``"dask"``.
    workers : int, optional
        Worker count ``P`` for parallel executors and ``chunked``/``auto``.
    return_trace : bool or Trace
        Also return the run's :class:`~chainprod.executors.Trace`.
    engine_options : dict, optional
        Per-call options of a distributed executor: ``timeout`` (seconds,
        bounds every wait) and ``retries`` (re-runs of tasks whose worker
        died). Local executors take none.

    Returns
    -------
    list of tuples
        ``grads[l]`` has one array per parameter of layer ``l``, shaped like it.
    """
    tape = forward(chain, x)
    _, seed = loss_seed(tape, y, loss)
    trace = make_trace(return_trace, backend, workers)
    g = backward(tape, seed, method=method, backend=backend, workers=workers, trace=trace,
                 engine_options=engine_options)
    return (g, trace) if return_trace else g
