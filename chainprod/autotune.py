"""What ``method="auto"`` runs on the compiled kernels: measured once, then remembered.

On the compiled kernels a backward pass costs tens of nanoseconds per
layer, so the choice between backprop and a scan is decided by effects a
flop count does not see (memory bandwidth, thread wake-ups, the thin head).
The cost model gives the candidates; measuring decides, the way FFTW's
planner and cuDNN's benchmark mode do:

1. candidates: the scans ``sklansky``, ``brent_kung``, ``chunked`` (``P + 1``
   chunks) and the cost model's own pick, each for ``P`` threads;
2. a candidate is measured only if it could win: its flops divided by ``P``
   are at most :data:`FLOP_MARGIN` times backprop's (a dense ``w x w`` scan
   does about ``w`` times the flops of backprop, so on a few cores dense
   chains keep backprop without measuring anything);
3. each measured candidate and backprop run once to warm up (compiling on a
   machine's first use) and then :data:`REPEATS` times on the real tape; the
   fastest minimum wins.

The choice is kept per chain shape (runs of kind, activation, widths),
batch size, dtype, worker count, kernels and library version: in memory,
and on disk beside the cost model (``$CHAINPROD_AUTO_CACHE`` overrides), so
a machine measures each problem once. On the numpy reference ``auto`` asks
the cost model instead (:func:`chainprod.cost.resolve_schedule`); on Ray or
Dask the cost model weighs the cluster's best plan against backprop on the
driver (:func:`chainprod.cost.remote_auto`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time

from . import backward_compiled
from ._caches import PlanCache, cpu_count, kept_on
from ._version import __version__
from .backward_numpy import jacobian_shapes
from .cost import AUTO, auto_runs_backprop, model_path, resolve_schedule
from .kernels import KERNEL_REVISION
from .schedules import block_spec, schedule, sequential_flops

__all__ = ["COMPILED_BACKENDS", "choose_method", "known_choice", "auto_cache_path", "FLOP_MARGIN", "REPEATS"]

#: local backends the compiled kernels serve, and their thread count when ``workers`` is None
COMPILED_BACKENDS = {"vectorized": lambda: 1, "threads": cpu_count}
#: measure a scan only if (its flops / P) <= FLOP_MARGIN x backprop's flops
FLOP_MARGIN = 4.0
#: timed runs per candidate (after one warm-up)
REPEATS = 3

_CHOICES = PlanCache(maxsize=256)


def choose_method(tape, cotangent, method, backend, workers, kernels):
    """``"backprop"`` or the :class:`~chainprod.schedules.Schedule` that ``method`` means here.

    Parameters
    ----------
    tape : Tape
    cotangent : ndarray
        ``dloss/dx_L``: ``auto`` on the compiled kernels measures its candidates on it.
    method : str or Schedule or callable
        ``"backprop"``, ``"auto"``, a schedule name, a Schedule or a builder.
    backend, workers, kernels
        As in :func:`chainprod.grad`.

    Returns
    -------
    Schedule or str
        A Schedule, or ``"backprop"`` (asked for, or what ``auto`` chose).
    """
    L = len(tape.chain)
    is_str = isinstance(method, str)
    if (is_str and method == "backprop") or L < 2:
        return "backprop"
    is_auto = is_str and method == AUTO
    if is_auto and kernels != "numpy" and isinstance(backend, str) and backend in COMPILED_BACKENDS:
        P = workers or COMPILED_BACKENDS[backend]()
        # The choices made for this chain, kept on it by batch, P and kernels: a hit costs one lookup of a
        # small key. The full key (structure, versions) took 1.2 us a call to build and hash, 10 % of a
        # 256-layer diagonal chain's backward pass (measured); clear_caches() starts a new generation.
        memo = _kept_choices(tape.chain)
        small = (tape.x.shape[0], P, kernels)
        hit = memo.get(small)
        if hit is None:
            key = _key(tape.chain, tape.batch, P, kernels)
            hit = memo[small] = _CHOICES.get(
                key, lambda: _from_disk(key, L) or _measure(tape, cotangent, P, kernels, key))
        return hit
    shapes = jacobian_shapes(tape.chain, tape.batch)
    sched = resolve_schedule(method, L - 1, workers=workers, blocks=shapes, backend=backend)
    if not is_auto:
        return sched
    # The model's best scan; when that is the sequential one no parallel
    # schedule pays for its extra work and backprop does the same order
    # without forming Jacobians.
    return "backprop" if auto_runs_backprop(sched, backend) else sched


def known_choice(chain, batch, P, kernels):
    """What ``auto`` chose for this problem in this process (``"backprop"`` or a Schedule), or ``None``.

    Never measures or reads the disk: for callers that take a shorter path
    only when the choice is already known (:mod:`chainprod.quick`). The
    choice kept on the chain by :func:`choose_method` first (one lookup of a
    small key), then the process's cache.
    """
    hit = _kept_choices(chain).get((batch, P, kernels))
    return hit if hit is not None else _CHOICES.peek(_key(chain, batch, P, kernels))


def _kept_choices(chain) -> dict:
    """The choices kept on ``chain`` by ``(batch, P, kernels)``, until the caches are cleared."""
    return kept_on(chain, "_auto_choices")


def _key(chain, batch, P, kernels) -> tuple:
    sig = chain.__dict__.get("_auto_signature")
    if sig is None:  # a chain's structure never changes: its signature is computed once
        runs = tuple((r.cls.kind, r.activation, r.count, r.d_in, r.d_out) for r in chain.runs)
        sig = chain.__dict__["_auto_signature"] = (runs, str(chain.dtype))
    # KERNEL_REVISION: a choice measured on older kernels says nothing about these
    return (sig[0], batch, sig[1], int(P), kernels, __version__, KERNEL_REVISION, _numba_version())


@functools.lru_cache(maxsize=1)
def _numba_version():
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:  # pragma: no cover - numba missing: the numpy path never gets here
        return "?"


def _candidates(L, shapes, P, backend):
    seen = set()
    for name in ("sklansky", "brent_kung", "chunked"):
        s = schedule(name, L - 1, workers=P)
        seen.add(s.key)
        yield s
    modelled = resolve_schedule(AUTO, L - 1, workers=P, blocks=shapes, backend="threads" if P > 1 else "vectorized")
    if modelled.key not in seen and modelled.name != "sequential":
        yield modelled


def _measure(tape, cotangent, P, kernels, key):
    L = len(tape.chain)
    shapes = jacobian_shapes(tape.chain, tape.batch)
    seq = sequential_flops(block_spec(shapes, L - 1))
    runs = {"backprop": lambda: backward_compiled.backprop_grads(tape, cotangent, kernels)}
    choices = {"backprop": "backprop"}
    for s in _candidates(L, shapes, P, "threads"):
        if s.flops(shapes) / P <= FLOP_MARGIN * max(seq, 1.0):
            name = f"{s.name}{dict(s.options) or ''}"
            runs[name] = lambda s=s: backward_compiled.scan_grads(tape, cotangent, s, P, None, kernels)
            choices[name] = s
    best = min(runs, key=lambda name: _best_time(runs[name]))
    # A scan that beat backprop is timed against it once more, and kept only if it wins again: the choice
    # is kept for the process and on disk, and one disturbed round of backprop's repeats had kept a
    # chunked scan at 4x backprop's time (diagonal L = 2048, w = 128, threads P = 2; a main job, measured)
    if best != "backprop" and _best_time(runs["backprop"]) <= _best_time(runs[best]):
        best = "backprop"
    _to_disk(key, choices[best])
    return choices[best]


def _best_time(fn) -> float:
    fn()  # warm-up: loads (or, on a machine's first use, compiles) the kernels
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# -- on disk: one JSON object, key digest -> {"method", "options"} ----------------
def auto_cache_path() -> str:
    """Where measured ``auto`` choices are kept (beside the cost model; ``$CHAINPROD_AUTO_CACHE`` overrides)."""
    return os.environ.get("CHAINPROD_AUTO_CACHE") or os.path.join(os.path.dirname(model_path()), "auto_choices.json")


def _digest(key) -> str:
    return hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()


def _read_disk() -> dict:
    try:
        with open(auto_cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _from_disk(key, L):
    hit = _read_disk().get(_digest(key))
    if not isinstance(hit, dict) or "method" not in hit:
        return None
    if hit["method"] == "backprop":
        return "backprop"
    try:
        return schedule(hit["method"], L - 1, **hit.get("options", {}))
    except (TypeError, ValueError):  # a stale entry (a schedule that changed its options): measure again
        return None


def _to_disk(key, choice):
    entry = ({"method": "backprop"} if choice == "backprop" else
             {"method": choice.name, "options": dict(choice.options)})
    data = _read_disk()
    data[_digest(key)] = entry
    path = auto_cache_path()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:  # a read-only home: the choice still lives in memory for this process
        pass
