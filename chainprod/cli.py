"""The ``chainprod`` command: ``bench``, ``plot``, ``schedule``, ``simulate``, ``calibrate``, ``demo``.

``chainprod bench`` is the main job: a sweep of depth, workers, width, backend, method, structure, batch
and dtype against backprop, then torch users' MLPs against torch autograd, with results and figures
written to ``--out``. Run ``chainprod <command> --help`` for each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import sys
import tempfile
import time
from importlib.metadata import version

import numpy as np

from . import cost
from ._timing_steps import load_torch_first
from ._validate import FLOAT_DTYPES
from .bench import BASELINES, PRESETS, SHARDED, Sweep, read_results, run_sweep
from .bench_sequences import add_sequence_arguments
from .calibrate import calibrate, calibration_status
from .executors import valid_backends
from .grad import grad
from .layers import diagonal_chain, mlp
from .plots import plot_results, schedule_diagram, simulation
from .report import summary_lines, write_report
from .results import Interrupts, write_text_atomic
from .schedules import build, schedule

__all__ = ["main", "build_parser"]


def _ints(s):
    out = []
    for part in s.split(","):
        part = part.strip()
        if part.startswith("2^") or part.startswith("2**"):
            k = int(part.split("^")[-1].split("**")[-1])
            if k < 0:
                raise ValueError(f"2^{k} is not an integer")
            out.append(2 ** k)
        elif part:
            out.append(int(part))
    return out


def _strs(s):
    return [p.strip() for p in s.split(",") if p.strip()]


# -- option checks, while parsing (before anything runs): "chainprod bench: error: argument --backends: ...", exit 2
def _at_least(minimum, why="", one=False):
    """A comma list of ints (``2^k`` allowed), each ``>= minimum``; ``one=True``: one int."""
    def ints(s):
        try:
            values = [int(s)] if one else _ints(s)
        except ValueError:
            raise argparse.ArgumentTypeError("expected " + ("an integer" if one else "a comma list of integers "
                                             "(e.g. 16,64,2^10)") + f", got {s!r}") from None
        bad = [v for v in values if v < minimum]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {bad[0] if bad else 'none'}")
        return values[0] if one else values
    return ints


def _positive_number(s):
    with contextlib.suppress(ValueError):
        if 0 < float(s) < float("inf"):
            return float(s)
    raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}")


def _names(what, valid):
    """A comma list of names, each one of ``valid()`` (read from the registries when parsing)."""
    def names(s):
        got, ok = _strs(s), list(valid())
        bad = [n for n in got if n not in ok]
        if bad or not got:
            said = f"invalid {what} {bad[0]!r}" if bad else f"no {what} given"
            raise argparse.ArgumentTypeError(f"{said}; valid {what}s: {', '.join(ok)}")
        return got
    return names


def _scan_methods():
    """The methods a sweep can measure: backprop, auto and every registered schedule that is a scan."""
    def scan(m):
        try:
            return build(m, 8).is_scan
        except (ValueError, TypeError):  # a builder that needs options the sweep gives it: kept
            return True
    return ["backprop", *(m for m in cost.valid_schedules() if m == cost.AUTO or scan(m))]


_DEPTHS = _at_least(2, " (a chain of one layer has no product to scan)")


def _check_out(parser, option, path, file=False):
    """Refuse an output directory (``file``: a file's) that cannot be written, naming the option: exit 2.

    A missing directory is created (it would be anyway), before the command starts.
    """
    path = os.path.abspath(path)
    if file:
        if os.path.isdir(path):
            parser.error(f"argument {option}: {path!r} is a directory; give a file name")
        path = os.path.dirname(path)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent == path and not os.path.isdir(path):
        parser.error(f"argument {option}: {path!r} is a file, not a directory")
    if not os.path.isdir(parent):
        parser.error(f"argument {option}: cannot create {path!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"argument {option}: cannot write in {parent!r}: permission denied")
    try:  # what access() cannot see (a read-only file system, a full disk): try it
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"argument {option}: cannot write in {path!r}: {e.strerror or e}")


def _torch_models(s):
    """``"256x8x128,32x256x16:float64"`` -> ``[(256, 8, 128, "float32"), (32, 256, 16, "float64")]``.

    ``"none"`` -> ``[]`` (no torch-models section).
    """
    if s.strip().lower() == "none":
        return []
    out = []
    for part in _strs(s):
        size, _, dtype = part.partition(":")
        try:
            w, d, n = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"torch model {part!r}: expected WIDTHxDEPTHxBATCH[:DTYPE], "
                                             "e.g. 256x8x128 or 32x256x16:float64") from None
        if dtype not in ("", "float32", "float64") or min(w, d, n) < 1:
            raise argparse.ArgumentTypeError(f"torch model {part!r}: sizes must be positive and the dtype "
                                             "float32 or float64")
        out.append((w, d, n, dtype or "float32"))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chainprod",
        description="Per-layer gradients by parallel prefix scans of Jacobians: benchmarks, plans, model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="sweep depth x workers x width x batch x backend x method against the best "
                                     "backprop, and torch users' MLPs",
                       description="Measure forward, backward and end-to-end times of every scan configuration "
                                   "and of every backprop baseline (compiled and numpy backprop, JAX jit(grad), "
                                   "torch autograd, where installed); speedups are against the fastest of them. "
                                   "Then the torch-models section: nn.Linear + nn.Tanh MLPs, one training step's "
                                   "gradient by torch autograd, JAX, cp.torch_backward, cp.value_and_grad and the "
                                   "BLAS floor at each worker count. The report names every row where chainprod "
                                   "is slower than a baseline. Calibrates the cost model first if this machine has "
                                   "none. Writes results.csv, results.json, traces.json.gz, figures and report.md "
                                   "to --out. Ctrl-C keeps what was measured (exit status 130). Defaults: a few "
                                   "minutes on 2 cores.")
    b.set_defaults(_parser=add_sequence_arguments(b, PRESETS))
    b.add_argument("--depths", type=_DEPTHS, help="comma list of depths L >= 2, e.g. 256,2048,2^14")
    b.add_argument("--workers", type=_at_least(1), help="comma list of worker counts P")
    b.add_argument("--widths", type=_at_least(1), help="comma list of widths w")
    b.add_argument("--backends", type=_names("backend", lambda: [*valid_backends(), *SHARDED]),
                   help="comma list: vectorized,threads,serial,ray,dask, and "
                                                  "ray-sharded,dask-sharded (a training step of a model resident "
                                                  "on P >= 2 workers)")
    b.add_argument("--sharded", action="store_true", help="add ray-sharded and dask-sharded to the backends")
    b.add_argument("--methods", type=_names("method", _scan_methods),
                   help="comma list of scans: auto,sklansky,brent_kung,chunked,...")
    b.add_argument("--baselines", type=_names("baseline", lambda: BASELINES),
                   help="comma list: backprop,backprop-numpy,jax,torch (default: all installed; backprop is "
                        "always measured)")
    b.add_argument("--structure", type=_names("structure", lambda: cost.STRUCTURES), help="comma list: dense,diagonal")
    b.add_argument("--batches", "--batch", dest="batch", type=_at_least(1),
                   help="comma list of batch sizes N (default: 1,64; --quick: 1,64)")
    b.add_argument("--torch-models", type=_torch_models, metavar="MODELS",
                   help="the torch-models section: comma list of WIDTHxDEPTHxBATCH[:DTYPE] (nn.Linear + nn.Tanh, "
                        "DEPTH linear layers; dtype float32 unless given), or none (default: 256x8x128, 64x64x32, "
                        "1024x4x256, 32x256x16:float64, 128x16x64:float64; --quick: 32x4x16)")
    b.add_argument("--dtype", type=_names("dtype", lambda: [str(d) for d in FLOAT_DTYPES]),
                   help="comma list: float64,float32")
    b.add_argument("--repeats", type=_at_least(1, one=True), help="timed repeats per configuration (median and "
                                                                  "spread)")
    b.add_argument("--max-config-seconds", type=_positive_number,
                   help="skip configurations predicted to take longer")
    b.add_argument("--max-activations", type=_positive_number,
                   help="skip problems whose forward pass stores more than this "
                                                         "many activations, L x N x w (default: 2^22 = 4194304)")
    b.add_argument("--out", default="chainprod-results", help="output directory (default: %(default)s)")
    b.add_argument("--quick", action="store_true", help="a seconds-long sweep (smoke test)")
    b.add_argument("--no-plots", action="store_true", help="write results and report only")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or per-problem lines")
    b.add_argument("--no-calibrate", action="store_true", help="do not calibrate first, even without a calibration")
    b.add_argument("--quiet", action="store_true", help="print only the final summary")
    b.add_argument("--open", action="store_true", help="open report.html in a browser when done (or print its path)")

    pl = sub.add_parser("plot", help="redraw the figures of a saved sweep",
                        description="Read RESULTS (a directory with results.csv/results.json, or the CSV) "
                                    "and write every figure as PNG and SVG.")
    pl.set_defaults(_parser=pl)
    pl.add_argument("results", metavar="RESULTS")
    pl.add_argument("--out", help="figure directory (default: RESULTS/plots)")

    s = sub.add_parser("schedule", help="print a plan (and draw it with --draw FILE)",
                       description="Build schedule NAME over L factors from sizes alone and print its "
                                   "summary: rounds, peak width, ops, flops, Brent bound, one row per round.")
    s.set_defaults(_parser=s)
    s.add_argument("name", help="sequential, tree, independent, hillis_steele, sklansky, brent_kung, chunked, auto")
    s.add_argument("L", type=_at_least(1, one=True), help="number of factors")
    s.add_argument("--width", type=_at_least(1, one=True), default=64, help="w for flops (1 x w head, w x w blocks)")
    s.add_argument("--workers", type=_at_least(1, one=True), help="P for chunked/auto and the Brent bound")
    s.add_argument("--draw", metavar="FILE", help="draw the circuit to FILE (.png/.svg; both are written)")
    s.add_argument("--validate", action="store_true", help="prove the plan by symbolic replay")

    sm = sub.add_parser("simulate", help="predict times for up to 4096 workers and 2^20 layers",
                        description="Use the calibrated cost model to predict the backward pass of the best "
                                    "scan and of backprop for worker counts and depths far beyond this "
                                    "machine; print the Q4 crossover (smallest depth where the scan wins) "
                                    "per worker count and plot speedup vs depth.")
    sm.set_defaults(_parser=sm)
    sm.add_argument("--width", type=_at_least(1, one=True), default=64)
    sm.add_argument("--workers", type=_at_least(1), default=[1, 2, 4, 16, 64, 256, 1024, 4096])
    sm.add_argument("--depths", type=_DEPTHS, default=[2 ** k for k in range(4, 21, 2)])
    sm.add_argument("--structure", default="dense", choices=cost.STRUCTURES)
    sm.add_argument("--batch", type=_at_least(1, one=True), default=1)
    sm.add_argument("--backend", default="ray", choices=sorted({*cost.CostModel().round_latency, "ideal"}),
                    help="whose latencies to use (ray, dask, threads, ideal: none)")
    sm.add_argument("--out", default="chainprod-simulation", help="figure directory")

    c = sub.add_parser("calibrate", help="measure this machine's per-op costs for the model",
                       description="Time numpy kernels (matmul, matvec, elementwise, call latency), the "
                                   "per-layer forward/backprop/Jacobian costs and the task/hop/run latency "
                                   "of each installed engine; save JSON where method='auto' finds it.")
    c.add_argument("--quick", action="store_true", help="fewer repeats")
    c.set_defaults(_parser=c)
    c.add_argument("--engines", type=_names("engine", lambda: ["dask", "ray", "threads"]),  # the timed ones
                   default=["threads", "ray", "dask"],
                   help="engines to time (default: %(default)s)")
    c.add_argument("--output", help="where to save (default: $CHAINPROD_COST_MODEL or ~/.cache/chainprod)")

    d = sub.add_parser("demo", help="per-layer gradient agreement with backprop and a schedule summary",
                       description="A few seconds: gradients of a small MLP and a diagonal chain by every "
                                   "scan, compared layer by layer with backprop, then a schedule summary.")
    d.set_defaults(_parser=d)
    d.add_argument("--depth", type=_at_least(2, " (one layer has no product to scan)", one=True), default=64)
    d.add_argument("--width", type=_at_least(1, one=True), default=16)
    d.add_argument("--backend", default="vectorized", choices=valid_backends())
    return p


_SWEEP_ARGS = (("depths", "depths"), ("workers", "workers"), ("widths", "widths"), ("backends", "backends"),
               ("methods", "methods"), ("baselines", "baselines"), ("structure", "structures"),
               ("batch", "batches"), ("dtype", "dtypes"), ("repeats", "repeats"),
               ("max_config_seconds", "max_config_seconds"), ("max_activations", "max_activations"),
               ("torch_models", "torch_models"), ("sequences", "sequences"))


def _sweep_from_args(a):
    fields = dict(PRESETS[a.preset or ("quick" if a.quick else "default")].__dict__)
    fields.update({fld: getattr(a, arg) for arg, fld in _SWEEP_ARGS if getattr(a, arg) is not None})
    if a.sharded:
        fields["backends"] = [*fields["backends"], *(b for b in SHARDED if b not in fields["backends"])]
    if "backprop" not in fields["baselines"] and "backprop" not in fields["methods"]:
        fields["baselines"] = ["backprop", *fields["baselines"]]  # the baseline is always measured
    return Sweep(**fields)


def _calibrate_if_needed(sweep, quick, say) -> str:
    """Calibrate when this machine and these library versions have no saved model; say how long it took."""
    engines = tuple(b for b in sweep.backends if b in ("threads", "ray", "dask"))
    why = calibration_status(engines=engines)
    if why is None:
        return "cost model: the saved calibration of this machine"
    say(f"calibrating the cost model first ({why}), so that auto is judged with this machine's costs")
    t0 = time.perf_counter()
    calibrate(quick=quick, engines=engines, progress=lambda line: say("  " + line))
    took = time.perf_counter() - t0
    say(f"calibration took {took:.1f} s")
    return f"calibrated before the sweep ({why}): {took:.1f} s"


def _cmd_bench(a):
    with Interrupts() as interrupts:  # Ctrl-C ends the command at any moment, even where a callback swallows it
        return _bench(a, interrupts)


def _bench(a, interrupts):
    say = (lambda *args, **kw: None) if a.quiet else print
    sweep = _sweep_from_args(a)
    cmd = "chainprod " + " ".join(shlex.quote(x) for x in a._argv)
    if sweep.torch_models or sweep.sequences:
        load_torch_first()  # before calibrating starts numba's threads (why: load_torch_first)
    notes = [] if a.no_calibrate else [_calibrate_if_needed(sweep, a.quick, say)]
    interrupts.check()
    meta = run_sweep(sweep, a.out, progress="none" if (a.quiet or a.no_progress) else "auto", command=cmd, log=say,
                     interrupts=interrupts)
    rows = read_results(meta["csv"])
    figures, status = [], 0
    if meta["interrupted"]:
        status = 130
        notes.append("interrupted during the sweep: no figures drawn")
    elif not a.no_plots:
        try:
            interrupts.check()
            figures = plot_results(a.out, log=lambda p: None, check=interrupts.check)
            interrupts.check()
        except ImportError as e:
            notes.append(f"no figures: {e} (pip install 'chainprod[plot]')")
        except KeyboardInterrupt:
            status = 130
            notes.append("interrupted while drawing the figures: some are missing")
    report = write_report(a.out, rows, meta, [p for p in figures if p.endswith(".png")], notes=notes)
    print("\n".join(summary_lines(rows, meta)))
    if status or interrupts.interrupted:
        print(f"interrupted: partial results kept in {meta['csv']} and {meta['json']}; report {report}")
        return 130
    print(f"results: {meta['csv']}, {meta['json']}, {meta['traces']}")
    if figures:
        print(f"figures: {os.path.join(a.out, 'plots')}/ (headline: speedup_vs_depth.png)")
    print(f"report:  {report}")
    if a.open:
        _open_in_browser(os.path.splitext(report)[0] + ".html")
    return 0


def _open_in_browser(path):
    """Open ``path`` in a graphical browser, or print it (a console browser would take over the terminal)."""
    import webbrowser

    gui = sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    try:
        opened = bool(gui) and webbrowser.open(pathlib.Path(path).resolve().as_uri())
    except webbrowser.Error:
        opened = False
    print(f"opened {path}" if opened else f"no browser here; open {path}")


def _cmd_plot(a):
    path = a.results
    if path.endswith(".csv"):
        path = os.path.dirname(path) or "."
    if not os.path.exists(os.path.join(path, "results.csv")):
        print(f"chainprod plot: no results.csv in {path!r}", file=sys.stderr)
        return 2
    with Interrupts() as interrupts:  # a Ctrl-C that a callback swallowed still stops the drawing
        plot_results(path, a.out, check=interrupts.check)
        interrupts.check()
    return 0


def _cmd_schedule(a):
    s = cost.resolve_schedule(a.name, a.L, workers=a.workers, blocks=a.width)  # the name may be "auto"
    if a.validate:
        s.validate()
        print("validated: every output holds exactly its prefix")
    print(s.describe(a.width, a.workers))
    if a.draw:
        stem = os.path.splitext(a.draw)[0]
        for p in schedule_diagram(s, stem):
            print(f"drew {p}")
    return 0


def _cmd_simulate(a):
    model = cost.load_model()
    print(f"cost model: {model.source}; backend latencies: {a.backend}; "
          f"{a.structure} w={a.width} N={a.batch}; backward pass only (forward is sequential for both)")
    results = []
    print(f"{'P':>6} {'crossover L':>12}   " + " ".join(f"{L:>9}" for L in a.depths))
    for P in a.workers:
        line = []
        for L in a.depths:
            r = cost.simulate(L, a.width, P, structure=a.structure, batch=a.batch, backend=a.backend, model=model)
            results.append(r)
            line.append(f"{r['speedup']:>8.2f}x")
        x = cost.crossover(a.width, P, structure=a.structure, batch=a.batch, backend=a.backend, model=model)
        print(f"{P:>6} {('>2^20' if x is None else str(x)):>12}   " + " ".join(line))
    print("(speedup = predicted backprop time / predicted best-scan time; crossover = smallest L = 2^k "
          "where the scan wins)")
    try:
        for p in simulation(results, os.path.join(a.out, f"simulate_{a.structure}_w{a.width}"),
                            machine=(model.machine or {}).get("hostname")):
            print(f"drew {p}")
    except ImportError as e:
        print(f"no figure: {e}")
    os.makedirs(a.out, exist_ok=True)
    write_text_atomic(os.path.join(a.out, f"simulate_{a.structure}_w{a.width}.json"), json.dumps(results, indent=1))
    return 0


def _cmd_calibrate(a):
    calibrate(quick=a.quick, engines=tuple(a.engines), path=a.output)
    return 0


def _cmd_demo(a):
    print(f"chainprod {version('chainprod')}: per-layer gradients by parallel prefix scans\n")
    for name, chain in (("tanh MLP", mlp([a.width] * a.depth + [1])),
                        ("diagonal chain", diagonal_chain(a.depth - 1, a.width))):
        x = np.random.default_rng(0).standard_normal((4, a.width))
        ref = grad(chain, x, method="backprop")
        print(f"{name}: L={len(chain)} layers, width {a.width}, batch 4, backend {a.backend}")
        for method in ("sklansky", "brent_kung", "hillis_steele", "chunked", "auto"):
            g = grad(chain, x, method=method, backend=a.backend)
            worst = max(float(np.max(np.abs(gp - rp)) / (np.max(np.abs(rp)) + 1e-300))
                        for gl, rl in zip(g, ref) for gp, rp in zip(gl, rl))
            print(f"  {method:14} worst per-layer relative difference vs backprop: {worst:.1e}")
    print()
    print(schedule("sklansky", 16).describe(a.width))
    return 0


_COMMANDS = {"bench": _cmd_bench, "plot": _cmd_plot, "schedule": _cmd_schedule, "simulate": _cmd_simulate,
             "calibrate": _cmd_calibrate, "demo": _cmd_demo}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    a._argv = argv
    if not a.command:
        parser.print_help()
        return 0
    for option, attr, file in (("--out", "out", False), ("--draw", "draw", True), ("--output", "output", True)):
        if getattr(a, attr, None):  # the output paths, before the command starts
            _check_out(a._parser, option, getattr(a, attr), file)
    try:
        return _COMMANDS[a.command](a) or 0
    except (ValueError, TypeError, ImportError) as e:
        print(f"chainprod {a.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # anywhere else (e.g. calibrating): a message, not a traceback
        print(f"\nchainprod {a.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
