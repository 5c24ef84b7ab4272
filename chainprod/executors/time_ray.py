"""Time chunks on Ray: one actor per chunk, on the engine of the layer-sharded models.

:class:`RayTimeChunks` is :class:`~chainprod.executors.sharded_ray.RayShards`
(calls with two returns, a step submitted at once, waits that name a lost
process, timeouts) holding :class:`~chainprod.executors.time_worker.TimeChunk`
actors instead of layer shards. Nothing is rebuilt: a lost chunk is an error
the driver names (:mod:`chainprod.shard_time`).
"""

from __future__ import annotations

import ray

from .sharded_ray import RayShards
from .time_worker import TimeChunk

__all__ = ["RayTimeChunks"]

_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(max_restarts=0, max_task_retries=0)(TimeChunk)
    return _ACTOR


class RayTimeChunks(RayShards):
    """Ray actors of time chunks (see module docstring)."""

    def start(self, b, spec, x, y, deadline):
        """Create chunk ``b``'s actor with its steps of ``x`` (and ``y``); returns its process id."""
        self.forget(b)
        actor = _actor_class().options(scheduling_strategy="SPREAD").remote(spec, x, y)
        self.actors[b] = actor
        ref = actor.pid.remote()
        self.inflight.append(ref)
        return self.waited({b: ref}, deadline)[b]
