"""Per-layer gradients of a chain on torch, JAX or CuPy arrays, computed in the arrays' own library.

``cp.grad(chain, x)`` with a foreign ``x`` (:func:`chainprod.arrays.is_foreign`) runs here, in ``x``'s library
and on its device, written once against the array API standard: the chain's parameters converted once
(kept on the chain: chains are immutable); the forward pass; the losses of :data:`chainprod.grad.LOSSES`
with the same checks; backprop (one VJP per layer) or a scan, whose Jacobian blocks in scan order
``[cotangent . A_L, A_{L-1}, ..., A_2]`` (:mod:`chainprod.backward_numpy`) go to the ``"array"`` executor;
then the parameter VJPs, one batched call per run. The math is two tables, :data:`ARRAY_ACTIVATIONS` and
:data:`ARRAY_LAYERS`. One read-back per call (are output, cotangent, gradients finite); on JAX the whole
computation is one compiled program per structure, schedule and shape (runs of layers as ``lax.scan`` loops).

``method="auto"``: on a CPU device the numpy reference's choice (the vectorized executor's cost model); on
an accelerator :func:`accelerator_auto` weighs backprop's ``L`` dependent steps against the scan's rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ._caches import PlanCache
from ._validate import as_float_array, check_workers
from .arrays import common_library, describe, device_of, dtype_name, namespace, on_accelerator, to_device_like, to_numpy
from .blocks import KINDS, BlockSeq, Segment
from .cost import AUTO, auto_runs_backprop, resolve_schedule, valid_schedules
from .cost.auto import ACCELERATOR, ACCELERATOR_SCAN  # what "auto" assumes of an accelerator
from .errors import NonFiniteError
from .executors import EXECUTORS, Executor, Trace, get_executor
from .forward_methods import check_forward
from .layers import Chain
from .schedules import Schedule, block_spec, schedule, sequential_flops

__all__ = ["ARRAY_ACTIVATIONS", "ARRAY_LAYERS", "LAUNCH_SECONDS", "DEVICE_FLOPS", "MAX_SCAN_BYTES", "value_and_grad",
           "runs_value_and_grad", "device_runs", "check_array_options", "describe_library", "accelerator_auto",
           "scan_shapes"]


# -- the layer math in xp: one rule per activation and per layer kind ------------------
class ArrayActivation(NamedTuple):
    """``fn(xp, z) -> f(z)`` (None: identity) and ``deriv(xp, y) -> f'(z)`` from the output ``y``."""
    fn: Callable | None
    deriv: Callable


#: the rules of :data:`chainprod.activations.ACTIVATIONS`, in array-API calls
ARRAY_ACTIVATIONS = {
    "identity": ArrayActivation(None, lambda xp, y: xp.ones_like(y)),
    "tanh": ArrayActivation(lambda xp, z: xp.tanh(z), lambda xp, y: 1 - y * y),
    "relu": ArrayActivation(lambda xp, z: xp.maximum(z, 0), lambda xp, y: xp.astype(y > 0, y.dtype)),
    # exp(-softplus(-z)) is overflow-free for both signs of z (as the numpy rule)
    "sigmoid": ArrayActivation(lambda xp, z: xp.exp(-xp.logaddexp(xp.zeros_like(z), -z)),
                               lambda xp, y: y * (1 - y)),
    "softplus": ArrayActivation(lambda xp, z: xp.logaddexp(xp.zeros_like(z), z), lambda xp, y: -xp.expm1(-y)),
}


def _check_rules(runs):
    """A layer kind or activation added to chainprod but not here says so, before any work."""
    missing = [f"layer kind {r.cls.kind!r}" for r in runs if r.cls.kind not in ARRAY_LAYERS] + \
        [f"activation {r.activation!r}" for r in runs if r.activation not in ARRAY_ACTIVATIONS]
    if missing:
        raise NotImplementedError(f"{missing[0]} has no array-API rule in chainprod.array_grad")


class ArrayLayer(NamedTuple):
    """A layer kind in xp: ``p`` one layer's parameters; ``P``, ``S``, ``D`` a run's stacked ones, ``act'``, deltas.

    ``step -> z`` (the pre-activation), ``input_vjp -> v`` (the row below the layer), ``jacobians -> J``
    (stored input Jacobians ``diag(S) W`` or ``S * a``), ``param_vjp -> grads`` (stacked).
    """
    step: Callable
    input_vjp: Callable
    jacobians: Callable
    param_vjp: Callable


#: :class:`~chainprod.layers.Dense` and :class:`~chainprod.layers.Diagonal` by ``kind``, in xp (``@`` and ``.mT``:
#: the standard's operators, native in every library, with no compatibility wrapper per product)
ARRAY_LAYERS = {
    "dense": ArrayLayer(lambda xp, p, h: h @ p[0].mT + p[1],
                        lambda xp, p, d: d @ p[0],
                        lambda xp, P, S: S[..., :, None] * P[0][:, None, ...],
                        lambda xp, D, X: (D.mT @ X, xp.sum(D, axis=1))),
    "diag": ArrayLayer(lambda xp, p, h: h * p[0] + p[1],
                       lambda xp, p, d: d * p[0],
                       lambda xp, P, S: S * P[0][:, None, :],
                       lambda xp, D, X: (xp.sum(D * X, axis=1), xp.sum(D, axis=1))),
}


# -- options: what the array path takes ----------------------------------------------------
def check_array_options(library, *, backend, kernels, forward="sequential", forward_options=None,
                        engine_options=None, method="auto"):
    """Refuse what the array path cannot honour for ``library`` arrays; returns the array :class:`Executor`.

    ``backend`` "array" or the default "vectorized" (else a ``TypeError``), ``kernels`` None or "numpy" (this
    is the reference math, in ``library``), ``forward`` "sequential"."""
    noun, name = describe_library(library), backend if isinstance(backend, str) else getattr(backend, "name", None)
    # a name of the registry is refused before its engine is imported; an unknown one gets the registry's error
    executor = None if name in EXECUTORS and name not in ("array", "vectorized") else \
        get_executor("array" if name == "vectorized" else backend)
    if executor is None or executor.name != "array":
        raise TypeError(f"backend {backend if isinstance(backend, Executor) else repr(backend)} runs on numpy "
                        f"arrays; {noun} run on backend='array' (the default for them)")
    if kernels is not None and not (isinstance(kernels, str) and kernels == "numpy"):
        raise ValueError(f"kernels={kernels!r} runs on numpy arrays; {noun} compute in their own library: pass "
                         "kernels=None (or convert the inputs to numpy for the compiled kernels)")
    forward, _ = check_forward(forward, forward_options)
    if forward != "sequential":
        raise ValueError(f"forward={forward!r}: the parallel forward passes run on numpy arrays only; {noun} "
                         "take forward='sequential' (or convert the inputs to numpy)")
    if engine_options:
        executor.check_options(dict(engine_options))
    if isinstance(method, str) and method not in ("backprop", AUTO, *valid_schedules()):
        raise ValueError(f"unknown schedule method {method!r}; valid methods: backprop, {', '.join(valid_schedules())}")
    if not isinstance(method, (str, Schedule)) and not callable(method):
        raise TypeError(f"method must be a name, a Schedule or a callable, got {method!r}")
    return executor


def describe_library(library) -> str:
    return {"torch": "torch tensors", "jax": "JAX arrays", "cupy": "CuPy arrays"}.get(library, f"{library} arrays")


# -- the parameters on the device, kept per chain ---------------------------------------------
def device_runs(chain: Chain, like) -> tuple:
    """``chain.runs`` with parameters in ``like``'s library, device, dtype: converted once, kept on the chain."""
    key = (type(like).__module__, str(device_of(like)), dtype_name(like.dtype))
    kept = chain.__dict__.setdefault("_array_runs", {})
    got = kept.get(key)
    if got is None:
        if len(kept) >= 4:
            kept.clear()
        # copies (np.array): the chain's stacks are read-only, and its layer-order views run backwards in memory
        got = kept[key] = tuple(run._replace(params=tuple(to_device_like(np.array(p), like) for p in run.params),
                                              reversed=tuple(to_device_like(np.array(p), like) for p in run.reversed))
                                for run in chain.runs)
    return got


# -- checks of inputs in xp --------------------------------------------------------------------
def _finite(xp, a) -> bool:
    return bool(xp.all(xp.isfinite(a)))  # a host synchronisation: on the way in, and to name what overflowed


def _check_array(xp, a, what, ndim, dtype_of, device):
    """``a`` (an array of the call's library) checked like :func:`chainprod._validate.as_float_array`."""
    shape = tuple(a.shape)
    if a.dtype not in (xp.float32, xp.float64):
        raise TypeError(f"{what}: dtype {dtype_name(a.dtype)} is not supported; use float32 or float64")
    if a.ndim not in ndim:
        raise ValueError(f"{what}: expected {ndim} dimension(s), got shape {shape}")
    if 0 in shape or str(device_of(a)) != str(device):
        raise ValueError(f"{what}: has a zero-size dimension (shape {shape})" if 0 in shape else
                         f"{what} is on {device_of(a)} but x is on {device}: pass arrays on one device")
    if dtype_name(a.dtype) != dtype_name(dtype_of):
        hint = " (JAX computes in float32 unless jax_enable_x64 is on)" if xp.__name__.startswith("jax") else ""
        raise TypeError(f"{what} is {dtype_name(a.dtype)} but the chain's parameters are {dtype_name(dtype_of)}; "
                        f"convert {what} to {dtype_name(dtype_of)}{hint}")
    if not _finite(xp, a):
        raise ValueError(f"{what}: contains NaN or infinity")
    return a


# -- forward, targets ----------------------------------------------------------------------------
def _loop(xp, body, carry, xs):
    """``carry, ys[i] = body(carry, (a[i] for a in xs))``: on JAX one ``lax.scan`` (one body to compile)."""
    if xp.__name__ == "jax.numpy" and xs[0].shape[0] > 1:  # (one layer may change the width: no loop then)
        import jax
        return jax.lax.scan(body, carry, xs)
    ys = []
    for i in range(xs[0].shape[0]):
        carry, y = body(carry, tuple(a[i] for a in xs))
        ys.append(y)
    return carry, xp.stack(ys)


def _forward(xp, runs, x2):
    """Per-run stacks ``(count, N, d_out)`` of every layer's output."""
    outputs, h = [], x2
    for run in runs:
        rule, act = ARRAY_LAYERS[run.cls.kind], ARRAY_ACTIVATIONS[run.activation]

        def body(h, p, rule=rule, act=act):
            z = rule.step(xp, p, h)
            return (z, z) if act.fn is None else (act.fn(xp, z),) * 2

        h, Y = _loop(xp, body, h, run.params)
        outputs.append(Y)
    return outputs


def _targets(xp, out_shape, y, loss, one, like):
    """``(loss, y2)`` checked as :func:`chainprod.grad.loss_cotangent` checks them (``y2`` shaped like the output)."""
    if loss is None:
        loss = "sum" if y is None else "mse"
    if not isinstance(loss, str) or loss not in ("sum", "mse"):
        raise ValueError(f"unknown loss {loss!r}; valid losses: mse, sum")
    N, d = out_shape
    if loss == "sum":
        if y is not None:
            raise ValueError("loss='sum' takes no targets y; use loss='mse' for targets")
        if d != 1:
            raise ValueError(f"grad of the model output needs output width 1, but the last layer has width {d}; "
                             "pass targets y= with loss='mse' for a vector output")
        return loss, None
    expect = (d,) if one else (N, d)
    if y is None:
        raise ValueError(f"loss={loss!r} needs targets: pass y= with the model output's shape {expect}")
    if common_library({"y": y}) == "numpy":  # Python numbers or lists (never mixing): placed like x
        y = to_device_like(as_float_array(y, "y", ndim=(1, 2)), like)
    y = _check_array(xp, y, "y", (1, 2), like.dtype, device_of(like))
    # exactly the output's shape, or (N,) for a width-1 output; never reshape anything else
    if tuple(y.shape) == expect or (d == 1 and tuple(y.shape) == (N,) and not one):
        return loss, xp.reshape(y, (N, d))
    raise ValueError(f"y has shape {tuple(y.shape)} but the model output has shape {expect}")


# -- backward ----------------------------------------------------------------------------------
def _backprop_deltas(xp, runs, S, cotangent):
    """``delta_l = v_l * act'_l`` per run, one VJP per layer from the top; no Jacobian is formed."""
    deltas, g = [None] * len(runs), cotangent
    for r in reversed(range(len(runs))):
        rule = ARRAY_LAYERS[runs[r].cls.kind]

        def body(g, item, rule=rule):  # item: the layer's parameters and act', last layer of the run first
            d = g * item[-1]
            return rule.input_vjp(xp, item[:-1], d), d

        g, D = _loop(xp, body, g, (*runs[r].reversed, xp.flip(S[r], axis=0)))
        deltas[r] = xp.flip(D, axis=0)
    return deltas


def _scan_blocks(xp, runs, S, cotangent, L) -> BlockSeq:
    """The scan sequence ``[cotangent . A_L, A_{L-1}, ..., A_2]``: one segment per run, last run first."""
    last = runs[-1]
    # the head: cotangent times the last layer's Jacobian, a thin (N, 1, d) dense block
    head = ARRAY_LAYERS[last.cls.kind].input_vjp(xp, tuple(p[-1] for p in last.params), cotangent * S[-1][-1])
    segments = [Segment("dense", head[None, :, None, :])]
    for r, run in reversed(list(enumerate(runs))):
        a, b = max(run.start, 1), min(run.start + run.count, L - 1)  # layer 0's Jacobian is never needed
        if a >= b:
            continue
        ia, ib, n = a - run.start, b - run.start, run.count
        # ``reversed`` holds the run last layer first, so layers ib-1 .. ia are one slice of it
        P, S_rev = tuple(p[n - ib: n - ia] for p in run.reversed), xp.flip(S[r][ia:ib], axis=0)
        segments.append(Segment(run.cls.kind, ARRAY_LAYERS[run.cls.kind].jacobians(xp, P, S_rev)))
    return BlockSeq(segments, owned=True)


def _scan_deltas(xp, runs, S, cotangent, L, sched, executor, workers, trace):
    """``delta_l`` per run with every row ``v_l`` from one scan of ``sched`` on ``executor``."""
    N = cotangent.shape[0]
    result = executor.run(sched, _scan_blocks(xp, runs, S, cotangent, L), workers=workers, trace=trace)
    stacked = result.stack()
    deltas = []
    for r, run in enumerate(runs):
        a, b = run.start, min(run.start + run.count, L - 1)  # layers whose v comes from the scan
        rows = []
        if a < b:
            # layer l <- prefix k = L-2-l: layers a..b-1 are prefixes L-2-a down to L-1-b (or one block at a time)
            part = xp.flip(stacked[1][L - 1 - b: L - 1 - a], axis=0) if stacked is not None else \
                xp.stack([result.block(L - 2 - l)[1] for l in range(a, b)])
            rows.append(xp.reshape(part, (b - a, N, run.d_out)))
        if run.start + run.count == L:  # the last layer's row is the cotangent itself
            rows.append(cotangent[None])
        V = rows[0] if len(rows) == 1 else xp.concat(rows)
        deltas.append(V * S[r])
    return deltas


def _compute(xp, runs, x2, y2, loss, choice, executor, workers, trace):
    """``(value, stacks, ok, outputs, deltas)`` with no host synchronisation (JAX compiles it whole); ``ok``:
    whether the output, the cotangent and the gradients are finite, read back once by the caller."""
    L = runs[-1].start + runs[-1].count
    outputs = _forward(xp, runs, x2)
    out = outputs[-1][-1]
    if loss == "sum":
        value, cotangent = xp.sum(out), xp.ones_like(out)
    else:
        diff = out - y2
        value, cotangent = xp.mean(diff * diff), 2.0 * diff / (out.shape[0] * out.shape[1])
    S = [ARRAY_ACTIVATIONS[run.activation].deriv(xp, Y) for run, Y in zip(runs, outputs)]  # act'(z) per run
    if isinstance(choice, str):
        deltas = _backprop_deltas(xp, runs, S, cotangent)
    else:
        deltas = _scan_deltas(xp, runs, S, cotangent, L, choice, executor, workers, trace)
    stacks = []  # the per-run stacked parameter gradients, from delta and each layer's input
    for r, (run, D) in enumerate(zip(runs, deltas)):
        first = x2 if r == 0 else outputs[r - 1][-1]
        X = first[None] if run.count == 1 else xp.concat([first[None], outputs[r][:-1]])
        stacks.append(ARRAY_LAYERS[run.cls.kind].param_vjp(xp, D, X))
    finite = [xp.all(xp.isfinite(a)) for a in (out, cotangent, *(g for gs in stacks for g in gs))]
    return value, stacks, xp.stack([finite[0], finite[1], xp.all(xp.stack(finite[2:]))]), outputs, deltas


#: jitted :func:`_compute` per structure, loss and schedule (JAX: one compiled program, not one per op and shape)
_JITTED = PlanCache(maxsize=32)


def _jitted(runs, loss, choice, executor, workers):
    import jax

    shape = tuple(r._replace(params=None, reversed=None) for r in runs)  # the structure only: no arrays kept

    def run(params, rev, x2, y2):
        rs = [r._replace(params=p, reversed=q) for r, p, q in zip(shape, params, rev)]
        return _compute(jax.numpy, rs, x2, y2, loss, choice, executor, workers, None)

    key = (shape, loss, choice if isinstance(choice, str) else choice.key, executor.name, workers)
    return _JITTED.get(key, lambda: jax.jit(run))


def _raise_nonfinite(xp, runs, deltas, stacks, scanned, L):
    """Name the layers whose product overflowed (the first row met from the top), else the parameter VJP."""
    layers = [(run.start + i, r, i) for r, run in enumerate(runs) for i in range(run.count)]
    bad = next((l for l, r, i in reversed(layers) if not _finite(xp, deltas[r][i])), None)
    if bad is not None:  # delta_l is not finite: v_l = cot . A_{L-1} ... A_{l+1} overflowed
        raise NonFiniteError(f"{'the scan' if scanned else 'backprop'} produced a non-finite gradient: the product "
                             f"of the input Jacobians of layers {bad + 1}..{L - 1} (0-based) overflowed; scale the "
                             "weights down or shorten the chain", (bad + 1, L - 1))
    bad = next(l for l, r, i in layers if not all(_finite(xp, g[i]) for g in stacks[r]))
    raise NonFiniteError(f"the parameter gradient of layer {bad} overflowed (delta^T x is not finite although both "
                         "factors are)", (bad, bad))


# -- which method -----------------------------------------------------------------------------
#: seconds per dependent step on an accelerator (two launches: the step and its VJP), its flop rate and
#: the most Jacobian bytes of a scan: chainprod.cost.auto.ACCELERATOR, shared with the recurrent models
LAUNCH_SECONDS, DEVICE_FLOPS = 2 * ACCELERATOR["launch_seconds"], ACCELERATOR["flops"]
MAX_SCAN_BYTES = ACCELERATOR["max_bytes"]


def scan_shapes(runs, N, dtype) -> BlockSeq:
    """The scan sequence of ``runs`` at batch ``N`` as shapes only (zero-stride numpy views), for cost models."""
    z, L = np.zeros((), dtype), runs[-1].start + runs[-1].count
    segments = [Segment("dense", np.broadcast_to(z, (1, N, 1, runs[-1].d_in)))]
    for run in reversed(runs):
        a, b = max(run.start, 1), min(run.start + run.count, L - 1)
        if a < b:
            trailing = KINDS[run.cls.kind].shape(run.d_out, run.d_in)
            segments.append(Segment(run.cls.kind, np.broadcast_to(z, (b - a, N, *trailing))))
    return BlockSeq(segments)


def accelerator_auto(shapes: BlockSeq, n_runs: int = 1):
    """``method="auto"`` on an accelerator: the log-depth scan or ``"backprop"``, by launch latency and flops.

    A dependent step costs :data:`LAUNCH_SECONDS`, a flop ``1 / DEVICE_FLOPS`` (rough data-centre GPU figures):
    backprop ~ ``L`` steps + its flops; the scan ~ (rounds + 2 per run) steps + its flops + the Jacobians. Long
    narrow or diagonal chains scan; wide dense ones, and scans over :data:`MAX_SCAN_BYTES`, keep backprop."""
    L, N = len(shapes) + 1, shapes.batch
    sched = schedule(ACCELERATOR_SCAN, L - 1)
    elements = sum(s.count * int(np.prod(s.array.shape[2:])) for s in shapes.segments)
    if N * elements * shapes.dtype.itemsize > MAX_SCAN_BYTES:
        return "backprop"
    backprop = L * LAUNCH_SECONDS + N * sequential_flops(block_spec(shapes, L - 1)) / DEVICE_FLOPS
    scan = (sched.rounds + 2 * n_runs) * LAUNCH_SECONDS + N * (sched.flops(shapes) + elements) / DEVICE_FLOPS
    return sched if scan < backprop else "backprop"


def _choose(method, runs, N, L, dtype, workers, accelerator):
    """``"backprop"`` or the scan :class:`Schedule` that ``method`` means here."""
    if (isinstance(method, str) and method == "backprop") or L < 2:
        return "backprop"
    shapes = scan_shapes(runs, N, dtype)
    if isinstance(method, str) and method == AUTO:
        if accelerator:
            return accelerator_auto(shapes, len(runs))
        # a CPU device: the numpy reference's choice, the vectorized executor's cost model
        sched = resolve_schedule(AUTO, L - 1, workers=workers, blocks=shapes, backend="vectorized")
        return "backprop" if auto_runs_backprop(sched, "vectorized") else sched
    sched = resolve_schedule(method, L - 1, workers=workers, blocks=shapes)
    if not sched.is_scan:
        raise ValueError(f"schedule {sched.name!r} does not produce every prefix; grad needs a scan")
    return sched


# -- entry points ---------------------------------------------------------------------------------
def runs_value_and_grad(runs, x2, y=None, loss=None, *, one=False, method="auto", executor=None, workers=None,
                        trace=None):
    """``(value, grads)`` of ``runs`` (a chain's :class:`~chainprod.layers.Run` tuples, parameters in ``x2``'s library).

    ``x2``: the checked ``(N, d_0)`` input (``one``: it was ``(d_0,)``, ``y``'s shape then); ``y`` (checked here),
    ``loss``, ``method``, ``workers`` as in :func:`chainprod.grad.grad`; ``trace`` gets the schedule and events.
    ``value`` a 0-d array (one reduction: made even for ``grad``), ``grads[l]`` a tuple of arrays, all like ``x2``."""
    _check_rules(runs)
    xp, executor = namespace(x2), executor or get_executor("array")
    L, N = runs[-1].start + runs[-1].count, x2.shape[0]
    loss, y2 = _targets(xp, (N, runs[-1].d_out), y, loss, one, x2)
    choice = _choose(method, runs, N, L, np.dtype(dtype_name(x2.dtype)), workers, on_accelerator(x2))
    if trace is not None and L > 1:
        trace.schedule = choice
    if xp.__name__ == "jax.numpy" and trace is None:
        fn = _jitted(runs, loss, choice, executor, workers)
        value, stacks, ok, outputs, deltas = fn([r.params for r in runs], [r.reversed for r in runs], x2, y2)
    else:
        value, stacks, ok, outputs, deltas = _compute(xp, runs, x2, y2, loss, choice, executor, workers, trace)
    ok = to_numpy(ok)  # the one read-back of a call that goes well
    if not ok[0]:
        bad = next(run.start + i for run, Y in zip(runs, outputs) for i in range(run.count) if not _finite(xp, Y[i]))
        raise NonFiniteError(f"the forward pass overflowed: the output of layer {bad} is NaN or infinite (inputs and "
                             "parameters are finite)", (bad, bad))
    if not ok[1]:
        raise NonFiniteError(f"the cotangent of the {loss} loss overflowed: the model output (layer {L - 1}) and "
                             f"the targets y are too far apart for {dtype_name(x2.dtype)}", (L - 1, L - 1))
    if not ok[2]:
        _raise_nonfinite(xp, runs, deltas, stacks, not isinstance(choice, str), L)
    return value, [tuple(g[i] for g in gs) for run, gs in zip(runs, stacks) for i in range(run.count)]


def value_and_grad(chain: Chain, x, y=None, *, loss=None, method="auto", backend="array", workers=None,
                   return_trace=False, engine_options=None, kernels=None, forward="sequential",
                   forward_options=None):
    """:func:`chainprod.grad.value_and_grad` for a torch, JAX or CuPy ``x``, computed in that library.

    :func:`chainprod.grad.grad`'s arguments; returns as :func:`runs_value_and_grad` (and the :class:`Trace`).
    ``TypeError``: two libraries, a numpy-only ``backend``, another dtype; ``ValueError``: compiled ``kernels``,
    a parallel ``forward``, bad shapes; :class:`~chainprod.errors.NonFiniteError` naming the layers."""
    if not isinstance(chain, Chain):
        raise TypeError(f"expected a chainprod Chain, got {type(chain).__name__}")
    library = common_library({"x": x, "y": y})
    if library == "numpy":
        raise TypeError("chainprod.array_grad computes on torch, JAX or CuPy arrays; for numpy inputs use "
                        "chainprod.grad")
    executor = check_array_options(library, backend=backend, kernels=kernels, forward=forward,
                                   forward_options=forward_options, engine_options=engine_options, method=method)
    workers = check_workers(workers)
    if not (return_trace in (True, False, None) or isinstance(return_trace, Trace)):
        raise TypeError(f"return_trace must be True, False or a chainprod.Trace, got {return_trace!r}")
    trace = Trace(backend="array", workers=workers) if return_trace is True else \
        (return_trace if isinstance(return_trace, Trace) else None)
    if common_library({"x": x}) != library:
        raise TypeError(f"x is {describe(x)} but y is {describe(y)}: pass x as {describe_library(library)} too")
    if library == "torch":  # a tensor that requires a gradient would make torch record a graph nobody asked for
        x, y = x.detach(), (y.detach() if hasattr(y, "detach") else y)
    xp = namespace(x)
    x = _check_array(xp, x, "x", (1, 2), chain.dtype, device_of(x))
    if x.shape[-1] != chain.d_in:
        raise ValueError(f"x has width {x.shape[-1]} (shape {tuple(x.shape)}) but layer 0 expects {chain.d_in}")
    one = x.ndim == 1
    x2 = x[None] if one else x
    value, grads = runs_value_and_grad(device_runs(chain, x2), x2, y, loss, one=one, method=method,
                                       executor=executor, workers=workers, trace=trace)
    return (value, grads, trace) if return_trace else (value, grads)
