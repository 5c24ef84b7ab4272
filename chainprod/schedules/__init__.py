"""Schedules: pure data for computing all prefix products of a chain.

A *schedule* (:class:`Schedule`) is built from sizes alone. It never touches
an array, so it can be printed, costed and validated before anything runs;
executors run any schedule. :mod:`chainprod.planning` turns one into what an
executor needs: a *bound plan* (block shapes for the numpy executors), a
*flat plan* (an op table for the compiled kernels) or a *partition*
(per-worker task chains for Ray and Dask).

The model
---------
The factors ``a_0, a_1, ..., a_{L-1}`` sit in *slots* ``0 .. L-1`` (scan
order: ``a_0 = A_L`` is the output end of the network, see ``docs/theory.md``).
A schedule is a list of *rounds*; a round is a set of independent combine
ops, each ``slot[out] <- slot[left] (x) slot[right]``, where ``left`` holds
the interval product ``[i, k] = a_i a_{i+1} ... a_k`` and ``right`` holds
``[k+1, j]``, so ``out`` receives ``[i, j]``. Left is always the earlier
factor: ``combine(x, y) = x @ y`` is associative, not commutative.

Rules every schedule obeys (:func:`replay`, the one definition of what a
schedule means, checks them; ``validate()`` and every planner call it):

* within a round, no slot written by one op is read or written by another,
  so the ops of a round may run in any order or all at once;
* an op may overwrite one of its own operands (in-place circuits);
* slots ``>= L`` are scratch, empty until first written;
* at the end, ``outputs[k]`` is the slot holding ``[0, k]`` (``-1`` where a
  schedule does not produce that prefix, e.g. ``tree`` gives only the total).

Layout: :mod:`.plan` (the type and :func:`replay`), :mod:`.flops` (flops from
block shapes, the printable summary), :mod:`.builders` (the circuits), this
module (the registry and :func:`schedule`, which builds plain schedules by
name). ``method="auto"`` is not a schedule of this registry: it
is resolved above it, by :func:`chainprod.schedule` and the gradient entry
points, which ask the cost model for the schedule to build.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .._caches import register_cache
from .._validate import check_workers
from ..errors import ScheduleError
from . import builders
from .builders import ALIASES, BUILTINS
from .flops import BlockSpecArrays, ScheduleInfo, block_spec, kinded_rounds, prefix_kind_ids, sequential_flops
from .plan import Replay, Round, Schedule, replay

__all__ = [
    "Schedule", "Round", "Replay", "replay", "ScheduleError", "ScheduleInfo", "SCHEDULES", "ALIASES", "schedule",
    "build", "register_schedule", "valid_methods", "block_spec", "sequential_flops", "BlockSpecArrays",
    "kinded_rounds", "prefix_kind_ids",
]


def _chunked(L: int, chunks: int | None = None, outer: str = "sklansky", *, workers=None, blocks=None,
             backend=None) -> Schedule:
    # P workers want P + 1 chunks: chunk 0 scans itself beside the P - 1
    # folds of chunks 1..P-1 (the last chunk's total is never needed), then
    # P chunks run their down-sweeps. With P chunks one worker would idle
    # in each phase, and P = 2 would be backprop order with no parallelism.
    if chunks is None and workers is not None:
        chunks = workers + 1
    return _chunked_plan(L, chunks, outer)


@register_cache
@functools.lru_cache(maxsize=64)
def _chunked_plan(L, chunks, outer):
    # the same schedule for the same sizes: a grad call per training step must not rebuild it
    return builders.chunked(L, chunks=chunks, outer=outer)


_chunked.__doc__ = builders.chunked.__doc__

#: name -> builder ``builder(L, **options) -> Schedule``. Builders named in
#: ``_CONTEXT`` also receive ``workers=``, ``blocks=`` and ``backend=``
#: (``chunked`` sizes its chunks from the workers). ``"auto"`` is not here:
#: :func:`chainprod.schedule` and the gradient entry points resolve it with
#: the cost model before they ask this registry for a plain schedule.
SCHEDULES: dict[str, Callable[..., Schedule]] = {**BUILTINS, "chunked": _chunked}
_CONTEXT: set[str] = {"chunked"}
_BUILTIN: set[str] = set(SCHEDULES)


def register_schedule(name: str, builder: Callable[..., Schedule], *, override: bool = False,
                      context: bool = False, builtin: bool = False) -> None:
    """Add a builder ``builder(L, **options) -> Schedule`` under ``name``.

    Parameters
    ----------
    name : str
    builder : callable
    override : bool
        Replace a built-in of that name (refused otherwise: a typo must not
        silently change what ``"sklansky"`` means for everyone).
    context : bool
        The builder also takes ``workers=``, ``blocks=`` and ``backend=``.
    builtin : bool
        Register as one of chainprod's own (used by the library itself).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"schedule name must be a non-empty str, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder for {name!r} must be callable, got {type(builder).__name__}")
    if (name in _BUILTIN or name in ALIASES) and not override and not builtin:
        raise ValueError(f"{name!r} is a built-in schedule; pass override=True to replace it")
    SCHEDULES[name] = builder
    (_CONTEXT.add if context else _CONTEXT.discard)(name)
    if builtin:
        _BUILTIN.add(name)
    _build_cached.cache_clear()


def valid_methods() -> list[str]:
    """Every schedule name and alias ``schedule()`` accepts."""
    return sorted([*SCHEDULES, *ALIASES])


def _check_length(L):
    if isinstance(L, bool) or not isinstance(L, int) and not hasattr(L, "__index__"):
        raise TypeError(f"L must be an int, got {L!r}")
    L = int(L)
    if L < 1:
        raise ValueError(f"L must be >= 1 (a product needs at least one factor), got {L}")
    return L


@functools.lru_cache(maxsize=256)
def _build_cached(name, L, opts):
    return SCHEDULES[name](L, **dict(opts))


register_cache(_build_cached.cache_clear)


def _lookup(method):
    name = ALIASES.get(method, method)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule method {method!r}; valid methods: {', '.join(valid_methods())}")
    return name


def build(method: str, L: int, **options) -> Schedule:
    """Build (and cache) a named schedule from its options alone; schedules are immutable so reuse is safe."""
    L = _check_length(L)
    name = _lookup(method)
    try:
        return _build_cached(name, L, tuple(sorted(options.items())))
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"schedule {method!r} does not take option(s) {sorted(options)}: {e}") from None
        raise


build.cache_clear = _build_cached.cache_clear  # type: ignore[attr-defined]


def schedule(method, L: int, *, workers: int | None = None, blocks=None, backend: str = "vectorized",
             **options) -> Schedule:
    """Build a plain schedule by name, or check a ready one.

    ``"auto"`` is not resolved here: :func:`chainprod.schedule` and the
    gradient entry points pick a schedule with the cost model, then build it
    with this function.

    Parameters
    ----------
    method : str or Schedule or callable
        A name from :data:`SCHEDULES` (aliases: ``blelloch``, ``kogge_stone``,
        ``ladner_fischer``), a ready :class:`Schedule`, or a callable
        ``f(L, **options) -> Schedule`` (validated before use).
    L : int
        Number of factors.
    workers : int, optional
        Workers ``P`` the schedule will run on; ``chunked`` then uses ``P + 1``
        chunks (peak width ``P``).
    blocks : optional
        Block shapes, passed to builders registered with ``context=True``
        (see :meth:`Schedule.flops_per_round` for the forms).
    backend : str
        Executor the schedule is for, passed to builders registered with
        ``context=True``.
    **options
        Passed to the builder (e.g. ``chunks=``, ``outer=`` for ``chunked``).

    Examples
    --------
    >>> s = schedule("sklansky", 8)
    >>> s.rounds, s.peak_width, s.num_ops
    (3, 4, 12)
    """
    workers = check_workers(workers)
    if isinstance(method, Schedule):
        if method.length != L:
            raise ValueError(f"schedule {method.name!r} is for L={method.length}, the chain has {L} factors")
        return method
    if callable(method):
        s = method(L, **options)
        if not isinstance(s, Schedule):
            raise TypeError(f"schedule callable returned {type(s).__name__}, expected Schedule")
        return s.validate()
    if not isinstance(method, str):
        raise TypeError(f"method must be a name, a Schedule or a callable, got {method!r}")
    name = _lookup(method)
    if name in _CONTEXT:
        L = _check_length(L)
        if name == "chunked" and "chunks" in options:  # explicit chunks: a plain, cacheable build
            return build(name, L, **options)
        return SCHEDULES[name](L, workers=workers, blocks=blocks, backend=backend, **options)
    return build(name, L, **options)
