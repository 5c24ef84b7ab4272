"""The cost model's data: calibrated seconds per op class and per layer, saved as JSON."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .._caches import clear_caches, register_cache
from ..kernels.crossover import calibration_path

__all__ = ["CostModel", "DEFAULT_MODEL", "OP_CLASSES", "STRUCTURES", "layer_bytes", "load_model", "save_model",
           "model_path"]

#: op classes of the model (see the module docstring)
OP_CLASSES = ("mm", "mv", "ew")
#: chain structures the per-layer tables know: ``mlp`` layers and ``Diagonal`` layers
STRUCTURES = ("dense", "diagonal")

_W = [2, 4, 8, 16, 32, 64, 128, 256]


def _default_ops():
    # Seconds per op per batch element on the development machine (measured, then rounded).
    return {
        "mm": {"w": _W, "t": [5.0e-8, 6.6e-8, 1.6e-7, 6.0e-7, 3.3e-6, 2.2e-5, 1.6e-4, 1.2e-3]},
        "mv": {"w": _W, "t": [4.5e-8, 5.0e-8, 7.0e-8, 1.5e-7, 4.0e-7, 1.4e-6, 5.5e-6, 2.4e-5]},
        "ew": {"w": _W, "t": [1.0e-8, 1.0e-8, 1.2e-8, 1.5e-8, 2.5e-8, 4.0e-8, 7.0e-8, 1.4e-7]},
    }


def _default_layers():
    # Seconds per layer at batch 1 and batch 16 (measured, then rounded).
    return {
        "dense": {
            "w": _W, "batch": [1, 16],
            "forward": [[3.2e-6] * 4 + [3.6e-6, 5.0e-6, 1.2e-5, 4.5e-5],
                        [3.4e-6, 3.6e-6, 4.0e-6, 5.0e-6, 8.0e-6, 2.0e-5, 7.0e-5, 2.8e-4]],
            "backprop": [[3.0e-6] * 4 + [3.8e-6, 6.0e-6, 2.0e-5, 1.0e-4],
                         [4.0e-6, 4.4e-6, 5.0e-6, 7.0e-6, 1.4e-5, 4.5e-5, 1.6e-4, 6.0e-4]],
            "prep": [[1.0e-7, 2.0e-7, 5.0e-7, 1.5e-6, 6.0e-6, 2.4e-5, 1.0e-4, 5.0e-4],
                     [1.0e-6, 2.5e-6, 8.0e-6, 3.0e-5, 1.2e-4, 5.0e-4, 2.0e-3, 8.0e-3]],
        },
        "diagonal": {
            "w": _W, "batch": [1, 16],
            "forward": [[2.8e-6] * 8, [3.0e-6] * 6 + [4.0e-6, 6.0e-6]],
            "backprop": [[3.0e-6] * 8, [3.2e-6] * 6 + [4.5e-6, 7.0e-6]],
            "prep": [[5.0e-8, 5.0e-8, 6.0e-8, 8.0e-8, 1.2e-7, 2.0e-7, 3.5e-7, 7.0e-7],
                     [1.0e-7, 1.5e-7, 2.5e-7, 4.5e-7, 9.0e-7, 1.8e-6, 3.5e-6, 7.0e-6]],
        },
    }


@dataclass
class CostModel:
    """Calibrated costs of this machine. All times in seconds.

    Attributes
    ----------
    call_latency : float
        Fixed cost of one batched numpy kernel call.
    gather_factor : float
        Slow-down of a batched call whose rows are not a strided view (a
        gather and a scatter copy).
    serial_op_latency : float
        Python overhead per op of the ``serial`` executor.
    ops : dict
        ``class -> {"w": sizes, "t": seconds per op per batch element}``.
        ``w`` is the block width: ``w x w @ w x w`` for ``mm``, ``1 x w @
        w x w`` for ``mv`` and ``w`` elements for ``ew``.
    layers : dict
        ``structure -> {"w", "batch", "forward", "backprop", "prep"}``:
        seconds per layer; ``prep`` is everything a scan's backward pass does
        besides the scan (derivatives, Jacobian blocks, parameter VJPs).
        Optional ``"fixed"`` (same layout, seconds per call): the cost of a
        call that does not grow with the depth (argument checks, packing,
        the kernel call), so ``L`` layers take ``fixed + L x per layer``
        (:meth:`run_time`). Calibration measures three depths per width: a
        short chain, one of about ``bytes[0]`` (in the caches) and one well
        beyond ``bytes[1]`` (parameters streamed from memory), so the
        per-layer tables are those of deep chains and the optional
        ``"cached"`` tables (same layout) those of chains that fit the caches.
    round_latency, task_latency, run_latency : dict
        Per backend: fixed cost of a dependent round (barrier / hop), of a
        task, and of a whole run (submitting, gathering results).
    compiled_ops : dict
        Seconds per op per batch element of the compiled scan kernel, as
        ``ops`` (``{"w", "t"}`` per name): ``pos`` and ``pos_ew`` a position
        of a dense or diagonal chain (forming its Jacobian block and the one
        thin op that makes its prefix), ``mm`` and ``ew`` a square dense or
        diagonal op. Empty until calibrated (the numpy op costs stand in).
    remote_layer : dict
        Per distributed backend: ``{"layer": s, "byte": s}``, seconds per
        layer of a run on that engine beyond the local model (shipping the
        layer, forming its Jacobian in a worker's Python), as
        ``layer + byte x bytes of the layer``.
    kernel_crossover : dict
        ``{dtype name: {form: multiply-adds}}``: from how many multiply-adds
        a dense product of the compiled kernels goes to BLAS instead of a
        fused loop (forms ``"row"``, ``"rows"``, ``"blocks"``, ``"step"``,
        ``"step_batch"`` of :mod:`chainprod.kernels.crossover`), as measured by
        calibration. The kernels read it from the saved file
        (:mod:`chainprod.kernels.crossover`); empty until calibrated.
    """

    call_latency: float = 4e-6
    gather_factor: float = 2.0
    serial_op_latency: float = 3e-6
    ops: dict = field(default_factory=_default_ops)
    layers: dict = field(default_factory=_default_layers)
    round_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 3e-5, "ray": 1.5e-3, "dask": 5.8e-3})
    task_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 2e-5, "ray": 5e-4, "dask": 1.8e-3})
    run_latency: dict = field(default_factory=lambda: {
        "serial": 0.0, "vectorized": 0.0, "threads": 0.0, "ray": 5e-3, "dask": 2e-2})
    compiled_ops: dict = field(default_factory=dict)
    # ray measured from the sweep's rows on the development machine; dask assumed alike until calibrated
    remote_layer: dict = field(default_factory=lambda: {
        "ray": {"layer": 4.3e-5, "byte": 1.2e-9}, "dask": {"layer": 4.3e-5, "byte": 1.2e-9}})
    kernel_crossover: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    source: str = "defaults"

    # -- lookups ---------------------------------------------------------
    def op_time(self, cls: str, w) -> np.ndarray:
        """Seconds per op per batch element of class ``cls`` at width(s) ``w``."""
        tab = self.ops[cls]
        return _loglog(tab["w"], tab["t"], w)

    def layer_time(self, structure: str, what: str, w, batch: int = 1) -> float:
        """Seconds per layer of ``what`` in {forward, backprop, prep} at width ``w`` and ``batch``.

        For a calibrated model this is the per-layer cost of deep chains
        (parameters beyond the caches); :meth:`run_time` also knows short ones.
        """
        return self._lookup(structure, self._table(structure)[what], w, batch)

    def compiled_op_time(self, name: str, w) -> np.ndarray:
        """Seconds per op per batch element of the compiled scan kernel (see ``compiled_ops``)."""
        tab = self.compiled_ops[name]
        return _loglog(tab["w"], tab["t"], w)

    def run_time(self, structure: str, what: str, w, L: int, batch: int = 1) -> float:
        """Seconds of ``what`` over ``L`` layers: a fixed cost per call plus ``L`` per-layer costs.

        With a calibration's ``cached`` table the per-layer cost depends on
        the bytes ``B`` of the ``L`` layers: the cached cost up to the first
        of ``bytes``, the deep-chain cost from the second on, geometric
        interpolation between.
        """
        tab = self._table(structure)
        per = self.layer_time(structure, what, w, batch)
        cached = tab.get("cached", {}).get(what)
        if cached is not None and L > 0:
            lo, hi = tab["bytes"]
            B = L * layer_bytes(structure, w, batch)
            if B < hi:
                f = 0.0 if B <= lo else np.log(B / lo) / np.log(hi / lo)
                per = self._lookup(structure, cached, w, batch) ** (1 - f) * per ** f
        fixed = tab.get("fixed", {}).get(what)
        if fixed is None or L <= 0:
            return L * per
        return self._lookup(structure, fixed, w, batch, fixed=True) + L * per

    def _table(self, structure):
        if structure not in self.layers:
            raise ValueError(f"unknown structure {structure!r}; valid: {', '.join(sorted(self.layers))}")
        return self.layers[structure]

    def _lookup(self, structure, rows, w, batch, fixed=False):
        """A per-width, per-batch table at ``w`` (log-log) and ``batch``.

        Linear in the batch size between (and beyond) the two measured batch
        sizes; a table of one batch size scales per-layer costs with the
        batch and leaves a ``fixed`` cost as it is.
        """
        tab = self.layers[structure]
        b = list(tab["batch"])
        t = [float(_loglog(tab["w"], np.maximum(row, 1e-12), w)) for row in rows]
        if len(b) == 1:
            return t[0] if fixed else t[0] * batch / b[0]
        slope = (t[1] - t[0]) / (b[1] - b[0])
        return max(t[0] + slope * (batch - b[0]), 0.0 if fixed else t[0] * 0.5)

    def remote_time(self, backend: str, structure: str, w, L: int, batch: int = 1) -> float:
        """Seconds a run of ``L`` layers on ``backend`` adds per layer to the local model (0 locally)."""
        c = self.remote_layer.get(backend) if isinstance(backend, str) else None
        if not c:
            return 0.0
        return L * (c["layer"] + c["byte"] * layer_bytes(structure, w, batch))

    def latency(self, kind: str, backend: str) -> float:
        table = {"round": self.round_latency, "task": self.task_latency, "run": self.run_latency}[kind]
        return float(table.get(backend, table.get("ray", 0.0)))

    @property
    def key(self) -> str:
        """A plain description of every number in the model, for caches keyed by it.

        Computed once per model object: a model is data to read, not to edit
        in place (build a new one, or :func:`save_model`, to change numbers).
        """
        key = self.__dict__.get("_key")
        if key is None:
            key = self.__dict__["_key"] = self.to_json()
        return key

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def layer_bytes(structure: str, w, batch: int = 1) -> float:
    """Bytes of one layer's parameters and its activation rows (float64)."""
    params = w * w + w if structure == "dense" else 2 * w
    return 8.0 * (params + batch * w)


def _loglog(xs, ys, x):
    """Piecewise-linear interpolation in log-log space, extrapolating the end segments."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-15))
    q = np.log(np.maximum(np.asarray(x, float), 1e-12))
    i = np.clip(np.searchsorted(lx, q) - 1, 0, len(lx) - 2)
    t = (q - lx[i]) / (lx[i + 1] - lx[i])
    return np.exp(ly[i] + t * (ly[i + 1] - ly[i]))


DEFAULT_MODEL = CostModel()


def model_path() -> str:
    """Where ``chainprod calibrate`` saves the model (``$CHAINPROD_COST_MODEL`` overrides).

    The compiled kernels read their loop/BLAS crossover from the same file
    (:func:`chainprod.kernels.crossover.calibration_path`, the one definition).
    """
    return calibration_path()


@register_cache
@functools.lru_cache(maxsize=1)
def load_model() -> CostModel:
    """The calibrated model if one was saved (see :func:`model_path`), else the defaults."""
    try:
        with open(model_path()) as f:
            return CostModel.from_dict(json.load(f))
    except (OSError, ValueError, TypeError):
        return DEFAULT_MODEL


def save_model(model: CostModel, path: str | None = None) -> str:
    """Write ``model`` as JSON (to :func:`model_path` by default) and reset the caches."""
    path = path or model_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(model.to_json())
    clear_caches()  # choices and round costs were made with the old numbers
    return path
