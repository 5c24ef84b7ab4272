"""Where the compiled kernels stop forming a dense product in a fused loop and call BLAS.

Every dense product of the compiled kernels (a layer's step over ``N`` rows,
a parameter VJP, a scan's combine op) has ``m x k x n`` multiply-adds.
Below the *crossover* the kernels run it as a plain loop (no call: at batch
1 and width 8 a BLAS call costs more than the arithmetic); from it on as
one BLAS ``gemm``. The crossover is a number of multiply-adds per dtype and
per *form* of product:

``"row"``
    one sample's row times a layer's matrix (a matrix-vector product) and
    its parameter VJP (an outer product): the forward pass and backprop at
    batch 1;
``"rows"``
    a batch of rows times a layer's matrix: the forward step, backprop's
    next row and parameter VJP from two samples on, a step of a chunk's
    Jacobian product, a scan's thin ops (one row per sample times a
    Jacobian);
``"blocks"``
    a scan's square ops, a ``m x k`` Jacobian block times a ``k x n`` one
    per sample (the loop over a block is slower per multiply-add than over
    rows, so BLAS takes over earlier);
``"step"``, ``"step_batch"``
    a recurrent cell's step (:mod:`.recurrent_numba`): the states times
    ``W_hh`` (``N * G * H * H`` multiply-adds), for one sample (a
    matrix-vector product) and for two or more.

Both are measured by ``chainprod calibrate`` on the machine
(:func:`chainprod.calibrate.calibrate` times both ways over a grid of
products and keeps the size from which BLAS wins) and saved with the
calibration, in its ``kernel_crossover`` field. The kernels read it from
there (:func:`blas_crossover`); without a saved calibration they use
:data:`DEFAULT_CROSSOVER`.

This module needs numpy only (the cost model reads :func:`calibration_path`
from here, and ``import chainprod`` must not import numba).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import numpy as np

from .._caches import register_cache

__all__ = ["DEFAULT_CROSSOVER", "FORMS", "NEVER", "best_seconds_per_rep", "blas_crossover", "calibration_path",
           "force_path", "saved_crossover", "using_crossover"]

#: a crossover no product reaches: the loops only
NEVER = 1 << 62

#: Multiply-adds from which a product goes to BLAS when no calibration is
#: saved, per dtype and form: what ``chainprod calibrate`` measured on the
#: development machine (2 cores, OpenBLAS 0.3.30 through scipy), twice, the
#: same in both dtypes. There one sample's row products were faster as loops
#: at every width measured (4-512: BLAS 1.2-3.2x the loops' time; backprop of
#: 1024-wide float32 layers at batch 1 1.3x), two rows' up to 64 wide, and
#: of four rows or more BLAS won from about 512 multiply-adds; a square
#: block product in BLAS from 6 x 6 x 6 (216; at 4 x 4 x 4 BLAS took 1.9x the
#: loop's time); a recurrent cell's step (the register-blocked products of
#: :mod:`.recurrent_numba_simd` against one ``gemm`` per step) never: BLAS
#: took 1.0-6.0x the loops' time at one sample and 0.84-2.9x in a batch (RNN
#: and LSTM, H = 8-64, N = 1, 4, 16). An earlier host of the same kind had
#: measured 256, 27, 4096 and 1024: the crossovers move with the machine,
#: which is why ``chainprod calibrate`` measures them there.
DEFAULT_CROSSOVER = {dt: {"row": NEVER, "rows": 512, "blocks": 216, "step": NEVER, "step_batch": NEVER}
                     for dt in ("float32", "float64")}
#: the forms of product (see the module docstring)
FORMS = ("row", "rows", "blocks", "step", "step_batch")


_FORCED = {"loop": NEVER, "blas": 0}
_forced = None  # a value of _FORCED while force_path is in effect
_table = None  # a parsed table while using_crossover is in effect


def calibration_path() -> str:
    """The file ``chainprod calibrate`` saves to (``$CHAINPROD_COST_MODEL`` overrides).

    The one definition of the path: :func:`chainprod.cost.model_path` returns it.
    """
    env = os.environ.get("CHAINPROD_COST_MODEL")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "chainprod", "cost_model.json")


@register_cache
@functools.lru_cache(maxsize=1)
def saved_crossover() -> dict:
    """``{(dtype name, form): multiply-adds}`` from the saved calibration, or ``{}``.

    Read once per process; :func:`chainprod.clear_caches` (which saving a
    calibration calls) makes the next call read the file again.
    """
    try:
        with open(calibration_path()) as f:
            saved = json.load(f).get("kernel_crossover") or {}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
    return _parse(saved)


def _parse(saved):
    """``{(dtype name, form): multiply-adds}`` of a ``kernel_crossover`` table; malformed entries are left out."""
    out = {}
    for name in DEFAULT_CROSSOVER:
        forms = saved.get(name) if isinstance(saved, dict) else None
        for form in FORMS:
            v = forms.get(form) if isinstance(forms, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
                out[name, form] = int(min(v, NEVER))
    return out


#: (dtype, form) -> crossover now in effect (the kernels ask on every call: a dict hit, not a file or a parse)
_active: dict = {}
#: bumped whenever what blas_crossover answers may change (clear_caches, force_path, using_crossover)
_generation = 0


def _changed():
    global _generation
    _generation += 1
    _active.clear()


register_cache(_changed)


def generation() -> int:
    """A number that changes whenever :func:`blas_crossover`'s answers may: a key for callers' memos."""
    return _generation


def blas_crossover(dtype, form="rows") -> int:
    """Multiply-adds from which a product of ``dtype`` and ``form`` goes to BLAS: forced, calibrated or default."""
    if _forced is not None:
        return _forced
    hit = _active.get((dtype, form))
    if hit is None:
        key = (np.dtype(dtype).name, form)
        saved = saved_crossover() if _table is None else _table
        hit = _active[dtype, form] = saved[key] if key in saved else DEFAULT_CROSSOVER[key[0]][form]
    return hit


@contextlib.contextmanager
def force_path(path):
    """Make every compiled kernel in this process take one path inside the block.

    Parameters
    ----------
    path : {"loop", "blas"} or None
        ``"loop"``: every product as a fused loop; ``"blas"``: every dense
        product in BLAS (where numba finds BLAS; else the loops run);
        ``None``: by the crossover. Meant for tests and benchmarks that
        compare the two ways.

    >>> from chainprod.kernels.crossover import blas_crossover, force_path
    >>> with force_path("blas"):
    ...     blas_crossover("float64")
    0
    """
    global _forced
    if path is not None and path not in _FORCED:
        raise ValueError(f"path must be 'loop', 'blas' or None, got {path!r}")
    before = _forced
    _forced = None if path is None else _FORCED[path]
    _changed()
    try:
        yield
    finally:
        _forced = before
        _changed()


@contextlib.contextmanager
def using_crossover(table):
    """Make the kernels use ``table`` (a ``kernel_crossover`` dict) instead of the saved one inside the block.

    The calibration measures the other costs with the crossover it has just
    measured, before anything is saved. Forms or dtypes missing from
    ``table`` take :data:`DEFAULT_CROSSOVER`.
    """
    global _table
    before = _table
    _table = _parse(table or {})
    _changed()
    try:
        yield
    finally:
        _table = before
        _changed()


def best_seconds_per_rep(run, repeats=5, min_seconds=2e-4) -> float:
    """Best seconds per repetition of ``run(reps)``, a compiled loop that repeats its work ``reps`` times.

    ``reps`` grows by 4x until one call lasts ``min_seconds`` (so the Python
    call is not in the figure); the best of ``repeats`` such calls. The first
    call, ``run(1)``, compiles or loads the loop and is not timed.
    """
    run(1)
    reps = 1
    while True:
        t0 = time.perf_counter()
        run(reps)
        t = time.perf_counter() - t0
        if t >= min_seconds:
            break
        reps *= 4
    best = t / reps
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        run(reps)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best
