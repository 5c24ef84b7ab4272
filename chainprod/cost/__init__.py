"""A cost model of one run, the simulator behind it, and ``method="auto"``.

How a run is costed
-------------------
Every combine op of a schedule falls in one of three *op classes*, from the
block shapes and the combine table (:data:`chainprod.blocks.COMBINE`):

* ``mm`` -- dense x dense with more than one row (an interior ``w x w``
  interval times another): a matrix-matrix product;
* ``mv`` -- dense x dense with one row (an interval containing the output
  Jacobian ``A_L`` is a thin ``1 x w`` block): a vector-matrix product;
* ``ew`` -- anything touching a diagonal block: elementwise.

``chainprod calibrate`` measures the seconds per op of each class at a grid
of sizes (ops batched as the vectorized executor batches them, in place) and
the fixed cost of one numpy call; the model interpolates log-log between
grid points. A round on ``P`` workers is list-scheduled: its ops are dealt
to ``min(P, ops)`` tasks in contiguous shares, so the round takes::

    round latency(backend) + tasks x task latency(backend)
        + max over tasks of (calls x call latency + sum of its ops' times x batch)

and rounds add up (every round is a barrier). That is Brent's schedule:
``T_P <= W/P + D`` with ``W`` the work and ``D`` the sum of the rounds'
longest ops, plus the engine's latencies.

``grad`` adds the work around the scan, also calibrated per layer type,
width and batch: the forward pass (sequential for every method), building
the Jacobians and the parameter VJPs (the scan's *preparation*), and the
backprop loop itself. Each is a fixed cost per call plus a cost per layer
(fitted from a short chain and from a long one that outgrows the caches:
on the compiled kernels a layer costs well under a microsecond, so a
call's fixed cost decides short chains and memory traffic long ones). A
run on Ray or Dask also pays a calibrated cost per layer and per byte of
the layer (shipping it, forming its Jacobian in the worker's Python). The
compiled scan kernel (one call for every round, on ``P`` threads) is
costed apart, from its own calibrated costs per position and per square op,
as Brent's ``W/P + D`` (:func:`compiled_scan_time`). On the compiled
kernels ``auto`` measures backprop beside the scans
(:mod:`chainprod.autotune`), so its prediction is the lesser of the two; on
Ray and Dask :func:`remote_auto` weighs the cluster's best plan against
backprop on the driver, and ``grad`` runs what it picks.
:func:`predict_grad` puts these together; :func:`simulate` answers Q4 for many more workers than this
machine has; :func:`crossover` gives the smallest depth where the scan wins.

The defaults below were measured on the development machine (2-core
x86_64, numpy 2.4, OpenBLAS); ``chainprod calibrate`` measures this machine
and saves a JSON file where :func:`load_model` finds it.

Resolving a method
------------------
:func:`resolve_schedule` turns any method into a Schedule: ``"auto"`` by
the cost model (:func:`choose_schedule`), everything else by the plain
builder :func:`chainprod.schedules.schedule`. It is ``chainprod.schedule``,
and every caller above this package resolves through it, so kernels and
executors only ever receive a Schedule. ``"auto"`` is not in the schedule
registry (:data:`chainprod.SCHEDULES` lists builders only); it is in
:func:`valid_schedules` (``chainprod.valid_schedules``).
"""

from __future__ import annotations

from .auto import (
    AUTO,
    LOCAL_BACKENDS,
    RemoteAuto,
    auto_runs_backprop,
    choose_schedule,
    known_remote_auto,
    predict_grad,
    remote_auto,
    resolve_schedule,
    valid_schedules,
)
from .model import DEFAULT_MODEL, OP_CLASSES, STRUCTURES, CostModel, layer_bytes, load_model, model_path, save_model
from .scan import chain_blocks, compiled_scan_time, predict, predict_backprop
from .simulate import crossover, round_stats, simulate

__all__ = [
    "CostModel", "DEFAULT_MODEL", "load_model", "save_model", "model_path", "predict",
    "predict_backprop", "predict_grad", "choose_schedule", "round_stats", "simulate", "crossover",
    "OP_CLASSES", "STRUCTURES", "LOCAL_BACKENDS", "auto_runs_backprop", "chain_blocks", "layer_bytes",
    "compiled_scan_time", "AUTO", "resolve_schedule", "valid_schedules", "remote_auto", "known_remote_auto",
    "RemoteAuto",
]
