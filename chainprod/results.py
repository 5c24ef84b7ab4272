"""The files of a sweep: ``results.csv``, ``results.json`` and ``traces.json.gz``, written and read back.

* ``results.csv``: one tidy row per measurement (columns :data:`FIELDS`;
  ``note`` says what a row ran where its method and backend do not: a
  torch-models row's threads and baseline, why ``auto`` stayed off a
  cluster), written and flushed as each measurement finishes, so an
  interrupted sweep keeps a valid file; pandas reads it as is.
* ``results.json``: the machine, library versions, command line, sweep
  parameters and what was skipped, and why.
* ``traces.json.gz``: the per-task traces of parallel runs, keyed
  ``structure/L=/w=/N=/dtype/backend/P=/method`` (kept apart: they are large
  and only the Gantt charts read them). Each is ``{"schedule", "events"}``;
  the one traced step of a sharded row (backend ``ray-sharded`` /
  ``dask-sharded``) also has ``"kind": "sharded"``, the step's
  ``forward_seconds``, ``backward_seconds``, ``total_seconds``,
  ``bytes_moved`` and ``rounds``, and one event per call on a shard;
* ``report.html``: :func:`markdown_page` renders ``report.md`` as a page.

Every whole file (``results.json``, ``traces.json.gz``, the figures, the
report) is written to a temporary name in its directory and renamed
(:func:`atomic_path`), so an interrupted job never leaves a half-written
file; :class:`Interrupts` makes Ctrl-C end a long job at any moment. No
pickle anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import html
import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

__all__ = ["WAIT_ENV", "WaitHook", "FIELDS", "ResultsWriter", "read_results", "read_meta", "read_traces",
           "markdown_page", "Interrupts", "atomic_path", "write_text_atomic"]

#: CSV columns, in order
FIELDS = [
    "structure", "depth", "width", "batch", "dtype", "backend", "workers", "method", "schedule", "note",
    "repeats", "status",
    "forward_median", "forward_min", "forward_max", "forward_iqr",
    "backward_median", "backward_min", "backward_max", "backward_iqr",
    "total_median", "total_min", "total_max", "total_iqr",
    "best_backprop_backward", "best_backprop_backward_median", "best_backprop_total", "best_backprop_total_median",
    "speedup_backward", "speedup_total", "paired_backprop_backward_median", "paired_backprop_total_median",
    "rounds", "peak_width", "num_ops", "measured_rounds", "peak_concurrency", "tasks", "bytes_moved",
    "flops", "sequential_flops", "brent_bound", "jacobian_bytes",
    "predicted_forward", "predicted_backward", "predicted_total", "prediction_error_backward",
    "prediction_error_total", "machine", "timestamp",
]
_INT_FIELDS = {"depth", "width", "batch", "workers", "repeats"}
_TEXT_FIELDS = {"structure", "dtype", "backend", "method", "schedule", "note", "status", "machine", "timestamp",
                "best_backprop_backward", "best_backprop_total"}


# -- writing ---------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path):
    """Yield a temporary name beside ``path``; rename it to ``path`` when the block ends well, else remove it.

    The name is in the same directory, so :func:`os.replace` is atomic:
    ``path`` is either its old contents or the complete new file, never a
    part of one (a Ctrl-C, an error or a kill while writing).
    """
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` whole or not at all (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


class Interrupts:
    """Ctrl-C as an interrupt at every moment of a long job (a sweep, its figures), as a context manager.

    Python raises ``KeyboardInterrupt`` wherever the main thread is when
    SIGINT arrives. Inside a gc callback, a weakref callback or a
    ``__del__`` (JAX's ``_xla_gc_callback`` and ``WeakSet._remove`` run
    often) the exception is printed as "Exception ignored" and lost, and the
    job would run on to the end. While installed, this handler counts every
    Ctrl-C before raising, so :meth:`check`, called between steps, raises
    again where the first was lost; a ``KeyboardInterrupt`` lost that way is
    not printed (the next check honours it). Outside the main thread it
    installs nothing and :meth:`check` never raises.
    """

    def __init__(self):
        self.count = 0
        self._previous = self._hook = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            sys.unraisablehook = self._hook
            self._installed = False
        return False

    def _handler(self, signum, frame):
        self.count += 1
        raise KeyboardInterrupt

    def _unraisable(self, unraisable):
        if not (self.count and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            self._hook(unraisable)

    @property
    def interrupted(self) -> bool:
        """True once Ctrl-C was pressed while installed (whether or not the exception was lost)."""
        return self.count > 0

    def check(self):
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed: a safe point between two steps of the job."""
        if self.count:
            raise KeyboardInterrupt


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
            # delivered now to whoever handles Ctrl-C here, so an Interrupts guard counts it too
            if callable(previous):
                previous(*caught[0])
            elif previous != signal.SIG_IGN:
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
        # The row is counted inside the held block too: a Ctrl-C held there is raised as the block
        # ends, and a row on disk but not in self.rows would make results.json's count disagree.
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
            write_text_atomic(self.json, json.dumps(meta, indent=2, default=_json_default))
            with atomic_path(self.traces_path) as tmp, gzip.open(tmp, "wt") as f:
                json.dump(self.traces, f, default=_json_default)


# -- reading back ------------------------------------------------------------------------------------
#: the environment variable of :class:`WaitHook`
WAIT_ENV = "CHAINPROD_BENCH_WAIT_AFTER_ROWS"


class WaitHook:
    """``$CHAINPROD_BENCH_WAIT_AFTER_ROWS``: once that many rows are written, wait up to a minute for a signal.

    A test that sends SIGINT then interrupts the sweep between two rows,
    however fast the rows come (warm caches) or slow (a cold compile).
    """

    def __init__(self):
        value = os.environ.get(WAIT_ENV, "").strip()
        if value and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"${WAIT_ENV} must be a positive number of rows, got {value!r}")
        self.after = int(value) if value else None

    def __call__(self, writer):
        if self.after is not None and len(writer.rows) >= self.after:
            self.after = None
            print(f"chainprod bench: {len(writer.rows)} rows written; waiting for a signal (${WAIT_ENV})",
                  file=sys.stderr, flush=True)
            time.sleep(60)  # SIGINT ends the sleep with KeyboardInterrupt


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


# -- report.html ---------------------------------------------------------------------------------------
def _inline(text) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', text)
    text = re.sub(r"\[([^]]*)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text))


def markdown_page(text, title) -> str:
    """A report's markdown as a standalone HTML page (only the constructs :mod:`chainprod.report` writes)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):  # a fenced block, closed by a bare fence
            j = lines.index("```", i + 1)
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
            continue
        if line.startswith(("- ", "|")):  # a list or a table: every following line that starts the same way
            j = i
            while j < len(lines) and lines[j].startswith(line[:2] if line.startswith("- ") else "|"):
                j += 1
            if line.startswith("- "):
                out.append("<ul>" + "".join(f"<li>{_inline(x[2:])}</li>" for x in lines[i:j]) + "</ul>")
            else:
                body = [x for x in lines[i:j] if not set(x) <= {"|", "-"}]  # drop the separator row
                out.append("<table>" + "".join(
                    "<tr>" + "".join(f"<{t}>{_inline(c.strip())}</{t}>" for c in x.strip("|").split(" | ")) + "</tr>"
                    for x, t in zip(body, ["th"] + ["td"] * len(body))) + "</table>")
            i = j
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line:
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:80em;margin:auto;padding:1em} table{border-collapse:collapse;"
             "font-size:85%} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} pre{background:#f4f4f4;"
             "padding:.5em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            f"{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
