"""One switch for every cache chainprod keeps.

Plans, bound plans, cost-model choices and compiled flat plans are cached
by plain tuples of sizes and names (never by object identity), so a cache
entry is valid for as long as the process lives. :func:`clear_caches`
empties them all at once (after registering a schedule that replaces one,
or to measure cold starts); each module registers its own caches here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

__all__ = ["clear_caches", "cpu_count", "kept_on", "register_cache", "PlanCache"]

_CLEARERS: list[Callable[[], None]] = []


def register_cache(cache):
    """Register a cache: a zero-argument function that empties it, or an
    ``lru_cache``-wrapped function (its ``cache_clear`` is used). Returns
    ``cache``, so it works as a decorator."""
    _CLEARERS.append(getattr(cache, "cache_clear", cache))
    return cache


@register_cache
@functools.lru_cache(maxsize=1)
def cpu_count() -> int:
    """``os.cpu_count()`` (1 if unknown), asked once: it reads a file each call (5.4 us on the development VM,
    as long as the compiled backprop of a 256-layer diagonal chain's whole short path; measured)."""
    return os.cpu_count() or 1


def clear_caches() -> None:
    """Empty every cache chainprod keeps (plans, bound plans, cost choices, flat plans, pooled buffers).

    >>> import chainprod as cp
    >>> cp.clear_caches()
    """
    global _generation
    _generation += 1
    for clear in _CLEARERS:
        clear()


_generation = 0  # counts clear_caches: answers kept on objects by kept_on are stale once it moved on


def kept_on(obj, name) -> dict:
    """A dict kept in ``obj.__dict__[name]`` for answers about ``obj``, emptied when :func:`clear_caches` runs.

    For memos on the user's chains (a lookup there is cheaper than building
    and hashing a full cache key): it is the caches' generation that expires
    them, not a reference from a cache.
    """
    memo = obj.__dict__.get(name)
    if memo is None or memo[0] != _generation:
        memo = obj.__dict__[name] = (_generation, {})
    return memo[1]


class PlanCache:
    """A small least-recently-used map from plain tuple keys to plans.

    ``functools.lru_cache`` keys on the arguments themselves; plans are
    built from objects (a :class:`~chainprod.schedules.Schedule`) whose
    value is described by a tuple (``Schedule.key``), so this cache takes
    the key and a maker explicitly.
    """

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._data: dict = {}
        register_cache(self.clear)

    def get(self, key, make: Callable[[], object]):
        """The value for ``key``, made by ``make()`` on a miss."""
        hit = self._data.pop(key, None)
        if hit is None:
            hit = make()
            if len(self._data) >= self.maxsize:
                self._data.pop(next(iter(self._data)))  # the least recently used
        self._data[key] = hit
        return hit

    def peek(self, key):
        """The value for ``key`` or ``None``, without making one or changing the order."""
        return self._data.get(key)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self):
        return len(self._data)
