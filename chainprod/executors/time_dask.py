"""Time chunks on Dask: each chunk lives in one pinned worker process.

:class:`DaskTimeChunks` is :class:`~chainprod.executors.sharded_dask.DaskShards`
(pinned tasks, the watch on every chunk's worker while waiting, errors that
name the lost chunk, timeouts) holding
:class:`~chainprod.executors.time_worker.TimeChunk` objects, kept in
:data:`CHUNKS` of the worker process, instead of layer shards. The calls of
one chunk within a step are ordered by passing each call the future of the
one before; a step waits for every chunk's last call, so no dependency spans
two steps. Nothing is rebuilt: a lost chunk is an error the driver names
(:mod:`chainprod.shard_time`).
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings

import distributed

from .sharded_dask import GROUP, DaskShards, ShardMissing
from .sharded_worker import Reply
from .time_worker import TimeChunk

__all__ = ["DaskTimeChunks", "CHUNKS"]

#: in a worker process: (sequence id, chunk) -> TimeChunk
CHUNKS: dict = {}


# -- on the workers -------------------------------------------------------------------
def create_chunk(seq, b, spec, x, y):
    CHUNKS[(seq, b)] = TimeChunk(spec, x, y)
    return Reply(os.getpid())


def call_chunk(seq, b, epoch, method, after, *args):
    # `after` is the chunk's previous call of the same step: an argument only to order the calls
    st = CHUNKS.get((seq, b))
    if st is None:
        raise ShardMissing(f"time chunk {b} of sequence {seq} is not on this worker", b)
    args = [a.value if isinstance(a, Reply) else a for a in args]
    return Reply(*st.run(epoch, method, *args))


def drop_chunk(seq, b):
    CHUNKS.pop((seq, b), None)


# -- on the driver --------------------------------------------------------------------
class DaskTimeChunks(DaskShards):
    """Pinned Dask workers holding time chunks (see module docstring)."""

    def __init__(self, executor, P):
        super().__init__(executor, P)
        self.prev = [None] * P

    def key(self, b, what):
        # in the task group of the layer shards' calls (their engine keeps that group alive)
        return f"{GROUP}-{b}-{self.model}-t{what}-{uuid.uuid4().hex[:8]}"

    def new_epoch(self):
        super().new_epoch()
        self.prev = [None] * self.P

    def forget(self, b):
        if self.addr[b] is not None:
            with contextlib.suppress(Exception):
                distributed.fire_and_forget(self.client.submit(drop_chunk, self.model, b, workers=[self.addr[b]],
                                                               allow_other_workers=True, pure=False))
        self.addr[b] = None
        self.prev[b] = None

    def start(self, b, spec, x, y, deadline):
        """Place chunk ``b`` (its steps of ``x`` and ``y``) on a live worker; returns its process id."""
        self.forget(b)
        addr = self.addr[b] = self.pick_worker(b, deadline)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            xs = self.client.scatter([x] if y is None else [x, y], workers=[addr], hash=False)
            f = self.client.submit(create_chunk, self.model, b, spec, *xs, *([None] if y is None else []),
                                   workers=[addr], allow_other_workers=False, pure=False, key=self.key(b, "create"))
        pid = self.get({b: f}, deadline)[b].value
        del xs
        return pid

    def call(self, b, method, *args):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(Large object|large graph).*")
            f = self.client.submit(call_chunk, self.model, b, self.epoch, method, self.prev[b], *args,
                                   workers=[self.addr[b]], allow_other_workers=False, pure=False,
                                   key=self.key(b, method))
        self.prev[b] = f
        self.inflight.append(f)
        return f, f

    def close(self):
        for b in range(self.P):
            self.forget(b)
        self.inflight = []
        self.prev = [None] * self.P
        self.anchor = None
