"""How chainprod measures: the machine, the timing loops, and the peer baselines.

Shared by :mod:`chainprod.calibrate` (which times layers to fit the cost
model) and :mod:`chainprod.bench` (which times whole gradients), so both
measure the same way:

* :func:`machine_info`, :func:`library_versions`, :func:`machine_label` say
  where a figure was measured;
* :func:`median_time` times a callable; :func:`time_passes` times a forward
  and a backward pass separately within each repeat; :func:`summarize` gives
  median, min, max and inter-quartile range;
* :func:`measure_chainprod`, :func:`measure_jax` and :func:`measure_torch`
  time one gradient of the same chain (the sum of its scalar outputs over the
  batch, or the mean squared error against targets ``y``) by chainprod, by
  JAX ``jit(grad)`` of a ``lax.scan`` and by torch autograd (eager);
* a torch model's training step, any call as a whole, the BLAS floor and
  the thread limit of a row are in :mod:`chainprod._timing_steps`.

JAX, torch and threadpoolctl are imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

from .executors import Trace
from .grad import backward, forward, loss_cotangent, value_and_grad
from .layers import Dense, Diagonal

__all__ = ["Timing", "machine_info", "library_versions", "machine_label", "median_time", "summarize",
           "time_passes", "backprop_kernels", "measure_chainprod", "measure_jax", "measure_torch",
           "jax_model", "torch_model"]


# -- where ---------------------------------------------------------------------------------------
def machine_info() -> dict:
    """Architecture, OS, core count, memory, numpy and its BLAS, host name."""
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "system": platform.system(), "release": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "numpy": np.__version__, "hostname": platform.node()}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # pragma: no cover - older numpy has no mode="dicts"
        info["blas"] = "?"
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover
        pass
    return info


#: the packages whose versions a measurement depends on (those installed are reported)
_PACKAGES = ("chainprod", "numpy", "numba", "ray", "dask", "distributed", "torch", "jax", "matplotlib", "tqdm")


def library_versions() -> dict:
    """``{package: version}`` of python and of every installed package in :data:`_PACKAGES`."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover - importable but not installed (a source tree)
            out[name] = "?"
    return out


def machine_label(info=None) -> str:
    """Short name of the machine for figure titles, e.g. ``"2-core x86_64 (host)"``."""
    info = info or machine_info()
    return f"{info.get('cpus')}-core {info.get('machine')} ({info.get('hostname', '')})".strip()


# -- timing loops --------------------------------------------------------------------------------
def median_time(fn, repeats=5, min_time=0.0, stat=statistics.median):
    """Median (or ``stat``) seconds of ``fn()`` over ``repeats`` runs (each loops until ``min_time``)."""
    out = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        out.append(dt / n)
    return stat(out)


def summarize(ts) -> dict:
    """``{"median", "min", "max", "iqr"}`` of a list of seconds."""
    ts = sorted(float(t) for t in ts)
    q25, q75 = np.percentile(ts, [25, 75]) if len(ts) > 1 else (ts[0], ts[0])
    return {"median": statistics.median(ts), "min": ts[0], "max": ts[-1], "iqr": float(q75 - q25)}


@dataclass
class Timing:
    """Seconds per repeat of the forward pass, the backward pass and end to end (their sum, or one call)."""

    forward: list
    backward: list
    total: list
    trace: Trace | None = None
    #: the compiled backprop timed beside these repeats, each of its own right after one of these
    paired: Timing | None = None


#: A repeat of :func:`time_passes` lasts at least this long: a single call of 50 us is timed with the
#: noise of one cache miss or one interrupt, and a median of three such calls flipped the sweep's
#: comparisons of rows 10-30% apart from run to run (measured); the mean over enough calls does not.
MIN_REPEAT_SECONDS = 2e-3


def time_passes(run_forward, run_backward, repeats, setup=None, min_seconds=MIN_REPEAT_SECONDS) -> Timing:
    """Time ``state = run_forward()`` and ``run_backward(state)`` apart, ``repeats`` times.

    Each repeat runs the pair ``n`` times and records the mean of each pass,
    ``n`` chosen from one untimed pair so that a repeat lasts about
    ``min_seconds`` (``n = 1`` for a call that long). ``setup()`` runs
    untimed before every pair (e.g. clearing torch's ``.grad``).
    End-to-end is the sum of the two passes of the same repeat.
    """
    def pair():
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        state = run_forward()
        t1 = time.perf_counter()
        run_backward(state)
        return t1 - t0, time.perf_counter() - t1

    f, b = pair()
    n = max(1, min(10_000, int(min_seconds / max(f + b, 1e-7))))
    fw, bw = [], []
    for _ in range(repeats):
        sf = sb = 0.0
        for _ in range(n):
            f, b = pair()
            sf += f
            sb += b
        fw.append(sf / n)
        bw.append(sb / n)
    return Timing(fw, bw, [f + b for f, b in zip(fw, bw)])


# -- chainprod -----------------------------------------------------------------------------------
def _kernels_kw(fn, kernels) -> dict:
    """``{"kernels": kernels}`` if ``fn`` takes that keyword and ``kernels`` is given, else ``{}``.

    The one place that asks whether the compiled loops are wired in, so the
    sweep runs on either side of that change.
    """
    if kernels is None or "kernels" not in inspect.signature(fn).parameters:
        return {}
    return {"kernels": kernels}


def backprop_kernels() -> list[str]:
    """The ``kernels=`` choices of :func:`chainprod.backward` here, best first; ``[]`` if it takes none.

    ``["numba", "numpy"]`` with numba installed (the compiled loop, then the
    plain numpy loop), ``["numpy"]`` without.
    """
    if not _kernels_kw(backward, "numpy"):
        return []
    return ["numba", "numpy"] if importlib.util.find_spec("numba") is not None else ["numpy"]


def measure_chainprod(chain, x, *, method="backprop", backend="vectorized", workers=None, kernels=None,
                      repeats=3, trace=False, y=None, loss=None, one_call=False, paired=False) -> Timing:
    """Time :func:`chainprod.forward` and :func:`chainprod.backward` of ``chain`` on ``x``.

    The forward pass includes the loss and its cotangent
    (:func:`chainprod.loss_cotangent` with ``y`` and ``loss``): the two
    halves are what :func:`chainprod.value_and_grad` runs.

    Two untimed warm-up runs first: they bind the plan, let ``auto`` choose,
    compile kernels and start engines; with ``trace=True`` the first carries the
    :class:`~chainprod.Trace` returned in :attr:`Timing.trace` (measured
    rounds and concurrency, and what ``auto`` ran). ``kernels`` (``"numba"``
    or ``"numpy"``) picks backprop's loop; ``None`` keeps the library default.

    With ``one_call`` the end-to-end times are of the one call a training
    step makes, :func:`chainprod.value_and_grad` (its short path where it
    applies), ``repeats`` times, not the sum of the two passes timed apart
    (which pays the public entry, its checks and the loss twice: 17 us
    against 34 us on a 256-layer diagonal chain of width 8); JAX's and
    torch's end-to-end times are of one call too.

    With ``paired`` the Timing's :attr:`~Timing.paired` is the compiled
    backprop's (``method="backprop"``, the library's default kernels), timed
    the same way, each of its repeats right after the configuration's, so
    that both see the same load (the auto check compares them).
    """
    configs = [_Config(chain, x, method, backend, workers, kernels, y, loss, trace)]
    if paired:
        configs.append(_Config(chain, x, "backprop", backend, workers, None, y, loss, False))
    timings = [Timing([], [], [], c.trace) for c in configs]
    for _ in range(repeats):
        for c, t in zip(configs, timings):
            one = time_passes(c.run_forward, c.run_backward, 1)
            t.forward += one.forward
            t.backward += one.backward
            t.total += one.total
    if one_call:
        for t in timings:
            t.total = []
        for _ in range(repeats):
            for c, t in zip(configs, timings):
                t.total.append(median_time(c.call, 1, MIN_REPEAT_SECONDS))
    if paired:
        timings[0].paired = timings[1]
    return timings[0]


class _Config:
    """One configuration's passes and its one call, warmed up (two untimed runs) when made."""

    def __init__(self, chain, x, method, backend, workers, kernels, y, loss, trace):
        kw = {} if method == "backprop" else {"backend": backend, "workers": workers}
        kw.update(_kernels_kw(backward, kernels))
        self.fkw, self.kw = _kernels_kw(forward, kernels), kw
        self.vkw = {**kw, **_kernels_kw(value_and_grad, kernels)}
        self.chain, self.x, self.y, self.loss, self.method = chain, x, y, loss, method
        self.trace = Trace(backend=backend, workers=workers) if trace else None
        tape = forward(chain, x, **self.fkw)
        backward(tape, loss_cotangent(tape, y, loss)[1], method=method, trace=self.trace, **kw)
        # A second untimed run: the first one on a new chain also pays first-touch page faults of
        # its output arrays, which would otherwise land in the first timed repeat of whichever
        # configuration happens to be measured first.
        self.run_backward(self.run_forward())

    def run_forward(self):
        tape = forward(self.chain, self.x, **self.fkw)
        return tape, loss_cotangent(tape, self.y, self.loss)[1]

    def run_backward(self, state):
        return backward(*state, method=self.method, **self.kw)

    def call(self):
        return value_and_grad(self.chain, self.x, self.y, loss=self.loss, method=self.method, **self.vkw)


# -- peers: the same chain in JAX and in torch -------------------------------------------------------
def _uniform_body(chain):
    """``(kind, activation)`` of a chain whose layers but the last share kind, shape and activation.

    That is the shape of :func:`chainprod.mlp` (``[w] * L + [1]``) and of
    :func:`chainprod.diagonal_chain`: a body that a ``lax.scan`` runs as one
    step, then a ``Dense`` readout. Anything else raises ``ValueError``.
    """
    body, last = chain.layers[:-1], chain.layers[-1]
    if not body or not isinstance(last, Dense):
        raise ValueError("the JAX peer needs a uniform body followed by a Dense readout layer")
    first = body[0]
    kind = "dense" if isinstance(first, Dense) else "diag" if isinstance(first, Diagonal) else None
    shape = tuple(p.shape for p in first.params)
    for l, layer in enumerate(body):
        if (type(layer) is not type(first) or tuple(p.shape for p in layer.params) != shape
                or layer.activation != first.activation):
            raise ValueError(f"the JAX peer needs a uniform body; layer {l} ({layer!r}) differs from "
                             f"layer 0 ({first!r})")
    if kind is None:
        raise ValueError(f"the JAX peer supports Dense and Diagonal layers, not {type(first).__name__}")
    return kind, first.activation


def _jax_activation(name):
    import jax

    table = {"identity": lambda z: z, "tanh": jax.numpy.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid,
             "softplus": jax.nn.softplus}
    return table[name]


def _torch_activation(name):
    import torch
    import torch.nn.functional as F

    table = {"identity": lambda z: z, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
             "softplus": F.softplus}
    return table[name]


def jax_model(chain, mse=False):
    """``(loss, params)``: the chain's summed output as a JAX function of stacked parameters.

    The body runs as one ``lax.scan`` step per layer (dense: ``act(h @ W.T + b)``;
    diagonal: ``act(a * h + b)``), then the readout; ``loss(params, x, y=None)``
    is the sum over the batch of the scalar output, as ``loss_cotangent`` takes
    it, or with ``mse=True`` the mean squared error against ``y`` (as
    ``torch.nn.functional.mse_loss``). Turns on ``jax_enable_x64`` for a
    float64 chain.
    """
    import jax

    if chain.dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    kind, activation = _uniform_body(chain)
    act = _jax_activation(activation)
    body = chain.layers[:-1]
    params = (jnp.asarray(np.stack([l.params[0] for l in body])), jnp.asarray(np.stack([l.params[1] for l in body])),
              jnp.asarray(chain.layers[-1].params[0]), jnp.asarray(chain.layers[-1].params[1]))
    last_act = _jax_activation(chain.layers[-1].activation)

    def step(h, p):
        a, b = p
        return act(h @ a.T + b if kind == "dense" else a * h + b), None

    def loss(params, x, y=None):
        A, B, Wo, bo = params
        h, _ = jax.lax.scan(step, x, (A, B))
        out = last_act(h @ Wo.T + bo)
        return jnp.mean((out - y) ** 2) if mse else jnp.sum(out)

    return loss, params


def measure_jax(chain, x, repeats=3, y=None) -> Timing:
    """Time JAX ``jit(loss)`` (forward) and ``jit(grad(loss))`` (end-to-end) of :func:`jax_model`.

    Compilation is excluded (one warm-up call each). ``jit(grad)`` fuses the
    two passes, so the backward time is an estimate: end-to-end minus forward
    of the same repeat (each averaged over calls lasting at least 2 ms, so the
    difference is not lost in the noise of a single call). Splitting the
    passes with ``jax.vjp`` instead measures them apart but runs both several
    times slower than the fused gradient: a weaker baseline. With targets
    ``y`` the loss is the mean squared error. XLA runs on its own thread pool
    (all cores): :func:`chainprod._timing_steps.thread_limit` does not reach it.
    """
    import jax

    loss, params = jax_model(chain, mse=y is not None)
    xj = jax.numpy.asarray(x)
    yj = None if y is None else jax.numpy.asarray(y)
    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    jax.block_until_ready(fwd(params, xj, yj))
    jax.block_until_ready(grad(params, xj, yj))
    f, t = [], []
    for _ in range(repeats):
        f.append(median_time(lambda: jax.block_until_ready(fwd(params, xj, yj)), 1, 2e-3))
        t.append(median_time(lambda: jax.block_until_ready(grad(params, xj, yj)), 1, 2e-3))
    # A difference of two medians: on a tiny chain, where jit(grad) costs what jit(loss) does, noise can
    # make it zero or negative; it is floored at 1% of the gradient's time (never 0, which no ratio survives).
    return Timing(f, [max(tt - ff, 0.01 * tt) for tt, ff in zip(t, f)], t)


def torch_model(chain):
    """``(loss_fn, tensors)``: the chain as eager torch code on float CPU tensors (one per parameter).

    The layers are applied one after another as ``nn.Sequential`` would
    (``F.linear`` then the activation; ``a * h + b`` for a diagonal layer), so
    autograd records one node per operation as it does for a user's model.
    """
    import torch
    import torch.nn.functional as F

    tensors = [[torch.tensor(np.array(p), requires_grad=True) for p in layer.params] for layer in chain.layers]
    acts = [_torch_activation(layer.activation) for layer in chain.layers]
    dense = [isinstance(layer, Dense) for layer in chain.layers]

    def loss_fn(x):
        h = x
        for (a, b), act, is_dense in zip(tensors, acts, dense):
            h = act(F.linear(h, a, b) if is_dense else h * a + b)
        return h.sum()

    return loss_fn, tensors


def measure_torch(chain, x, repeats=3) -> Timing:
    """Time the forward pass and ``loss.backward()`` of :func:`torch_model` (after one warm-up)."""
    import torch

    loss_fn, tensors = torch_model(chain)
    xt = torch.from_numpy(np.ascontiguousarray(x))

    def clear():
        for ps in tensors:
            for p in ps:
                p.grad = None

    loss_fn(xt).backward()
    return time_passes(lambda: loss_fn(xt), lambda loss: loss.backward(), repeats, setup=clear)
