"""The files of a sweep: ``results.csv``, ``results.json`` and ``traces.json.gz``, written and read back.

* ``results.csv``: one tidy row per measurement (columns :data:`FIELDS`),
  written and flushed as each measurement finishes, so an interrupted sweep
  keeps a valid file; pandas reads it as is.
* ``results.json``: the machine, library versions, command line, sweep
  parameters and what was skipped, and why.
* ``traces.json.gz``: the per-task traces of parallel runs, keyed
  ``structure/L=/w=/N=/dtype/backend/P=/method`` (kept apart: they are large
  and only the Gantt charts read them). Each is ``{"schedule", "events"}``;
  the one traced step of a sharded row (backend ``ray-sharded`` /
  ``dask-sharded``) also has ``"kind": "sharded"``, the step's
  ``forward_seconds``, ``backward_seconds``, ``total_seconds``,
  ``bytes_moved`` and ``rounds``, and one event per call on a shard.

No pickle anywhere.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import threading
from contextlib import contextmanager

import numpy as np

__all__ = ["FIELDS", "ResultsWriter", "read_results", "read_meta", "read_traces"]

#: CSV columns, in order
FIELDS = [
    "structure", "depth", "width", "batch", "dtype", "backend", "workers", "method", "schedule",
    "repeats", "status",
    "forward_median", "forward_min", "forward_max", "forward_iqr",
    "backward_median", "backward_min", "backward_max", "backward_iqr",
    "total_median", "total_min", "total_max", "total_iqr",
    "best_backprop_backward", "best_backprop_backward_median", "best_backprop_total", "best_backprop_total_median",
    "speedup_backward", "speedup_total",
    "rounds", "peak_width", "num_ops", "measured_rounds", "peak_concurrency", "tasks", "bytes_moved",
    "flops", "sequential_flops", "brent_bound", "jacobian_bytes",
    "predicted_forward", "predicted_backward", "predicted_total", "prediction_error_backward",
    "prediction_error_total", "machine", "timestamp",
]
_INT_FIELDS = {"depth", "width", "batch", "workers", "repeats"}
_TEXT_FIELDS = {"structure", "dtype", "backend", "method", "schedule", "status", "machine", "timestamp",
                "best_backprop_backward", "best_backprop_total"}


# -- writing ---------------------------------------------------------------------------------------
@contextmanager
def _no_interrupt():
    """Hold Ctrl-C until the block is done, so a row or a file is never half written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)


class ResultsWriter:
    """``results.csv`` written row by row; ``results.json`` and ``traces.json.gz`` at :meth:`close`."""

    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.csv = os.path.join(out_dir, "results.csv")
        self.json = os.path.join(out_dir, "results.json")
        self.traces_path = os.path.join(out_dir, "traces.json.gz")
        self.rows, self.traces = [], {}
        self._file = open(self.csv, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=FIELDS)
        with _no_interrupt():
            self._writer.writeheader()
            self._file.flush()

    def write(self, row, trace=None):
        with _no_interrupt():
            self._writer.writerow(row)
            self._file.flush()
        self.rows.append(row)
        if trace is not None:
            r = row
            self.traces[f"{r['structure']}/L={r['depth']}/w={r['width']}/N={r['batch']}/{r['dtype']}/"
                        f"{r['backend']}/P={r['workers']}/{r['method']}"] = trace

    def close(self, meta):
        with _no_interrupt():
            self._file.close()
            with open(self.json, "w") as f:
                json.dump(meta, f, indent=2, default=_json_default)
            with gzip.open(self.traces_path, "wt") as f:
                json.dump(self.traces, f, default=_json_default)


# -- reading back ------------------------------------------------------------------------------------
def _results_file(path, name):
    return os.path.join(path, name) if os.path.isdir(path) else os.path.join(os.path.dirname(path) or ".", name)


def read_results(path) -> list[dict]:
    """Rows of a ``results.csv`` (or of the directory holding one), numbers converted, blanks None."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.csv")
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            for k, v in r.items():
                if v in ("", None):
                    r[k] = None
                elif k in _INT_FIELDS:
                    r[k] = int(v)
                elif k not in _TEXT_FIELDS:
                    r[k] = float(v)
            out.append(r)
    return out


def read_meta(path) -> dict:
    """The ``results.json`` next to a ``results.csv`` (or in a directory); ``{}`` if there is none."""
    p = _results_file(path, "results.json")
    if not os.path.exists(p):
        return {}
    with open(p) as f:
        return json.load(f)


def read_traces(path) -> dict:
    """``{key: {"schedule", "events", ...}}`` from the ``traces.json.gz`` of a results directory (``{}`` if none)."""
    p = _results_file(path, "traces.json.gz")
    if not os.path.exists(p):
        return {}
    with gzip.open(p, "rt") as f:
        return json.load(f)
