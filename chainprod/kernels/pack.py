"""A chain packed into flat arrays: the one layout every compiled kernel reads.

:func:`pack` turns a :class:`~chainprod.layers.Chain` into a
:class:`PackedChain` of plain numpy arrays (no layer objects, no Python per
layer at kernel time). The layout is fixed; kernels index it directly:

=========  ============  ==========================================================
field      dtype/shape   meaning
=========  ============  ==========================================================
``L``      int           number of layers
``dtype``  np.dtype      float32 or float64 (the chain's dtype)
``kind``   int64[L]      0 = dense, 1 = diag (:data:`KIND_CODES`)
``act``    int64[L]      0 identity, 1 tanh, 2 relu, 3 sigmoid, 4 softplus (:data:`ACT_CODES`)
``d_in``   int64[L]      input width of layer ``l``
``d_out``  int64[L]      output width of layer ``l``
``p_off``  int64[L+1]    layer ``l``'s parameters are ``theta[p_off[l]:p_off[l+1]]``:
                         dense ``W`` row-major (``d_out*d_in``) then ``b`` (``d_out``);
                         diag ``a`` (``d``) then ``b`` (``d``)
``theta``  float[P]      all parameters, 1-D, C-contiguous, read-only
``y_off``  int64[L+1]    ``y_off[l+1] - y_off[l] = d_out[l]``, ``y_off[0] = 0``
=========  ============  ==========================================================

Per-sample arrays of a batch of ``N`` (the tape of outputs ``Y``, the rows
``V = dloss/dy`` and the deltas) are flat arrays of length ``N * y_off[L]``,
*layer-major*: layer ``l``'s block is
``Z[N*y_off[l] : N*y_off[l+1]].reshape(N, d_out[l])`` (row ``n`` = sample
``n``). A run of consecutive layers of one width is therefore one contiguous
``(count, N, d_out)`` stack, which is what :class:`chainprod.grad.Tape`
keeps per run. Parameter gradients use the layout of ``theta``.

>>> import numpy as np, chainprod as cp
>>> from chainprod.kernels import pack
>>> pc = pack(cp.mlp([3, 4, 1]))
>>> pc.L, pc.kind.tolist(), pc.act.tolist(), pc.p_off.tolist(), pc.y_off.tolist()
(2, [0, 0], [1, 0], [0, 16, 21], [0, 4, 5])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..layers import Chain

__all__ = ["ACT_CODES", "ACT_NAMES", "KIND_CODES", "KIND_NAMES", "PackedChain", "pack", "unpack_grads",
           "unpack_rows", "layer_rows", "first_nonfinite_layer"]

#: Activation name -> code in ``PackedChain.act``.
ACT_CODES = {"identity": 0, "tanh": 1, "relu": 2, "sigmoid": 3, "softplus": 4}
#: Code -> activation name.
ACT_NAMES = tuple(sorted(ACT_CODES, key=ACT_CODES.get))
#: Layer kind (``Layer.kind``) -> code in ``PackedChain.kind``.
KIND_CODES = {"dense": 0, "diag": 1}
#: Code -> kind name.
KIND_NAMES = tuple(sorted(KIND_CODES, key=KIND_CODES.get))


@dataclass(frozen=True, eq=False)
class PackedChain:
    """A chain as flat, read-only arrays (see the module docstring for the layout)."""

    L: int
    dtype: np.dtype
    kind: np.ndarray
    act: np.ndarray
    d_in: np.ndarray
    d_out: np.ndarray
    p_off: np.ndarray
    theta: np.ndarray
    y_off: np.ndarray

    @cached_property
    def n_params(self) -> int:
        """Length of ``theta`` (and of a flat gradient)."""
        return int(self.p_off[-1])

    @cached_property
    def width_in(self) -> int:
        """``d_0``, the chain's input width."""
        return int(self.d_in[0])

    @cached_property
    def width_out(self) -> int:
        """``d_L``, the chain's output width."""
        return int(self.d_out[-1])

    @cached_property
    def max_width(self) -> int:
        """The widest layer input or output (kernels size their work buffers by it)."""
        return int(max(self.d_in.max(), self.d_out.max()))

    @cached_property
    def max_product(self) -> int:
        """``max(d_in * d_out)`` over the dense layers (0 without one): a dense step's multiply-adds per row.

        The compiled kernels compare it with the loop/BLAS crossover
        (:mod:`chainprod.kernels.crossover`); computed once per packing.
        """
        dense = self.kind == KIND_CODES["dense"]
        return int((self.d_in[dense] * self.d_out[dense]).max()) if dense.any() else 0

    @cached_property
    def tape_rows(self) -> int:
        """``y_off[L]``: the length of a flat tape per batch row."""
        return int(self.y_off[-1])

    def tape_size(self, N: int) -> int:
        """Length of a flat tape ``Y`` (or ``V``) for a batch of ``N``."""
        return int(N) * self.tape_rows

    def __repr__(self):
        n_diag = int(np.count_nonzero(self.kind == KIND_CODES["diag"]))
        return (f"PackedChain(L={self.L}, {self.dtype}, widths {self.width_in}->{self.width_out} "
                f"(max {self.max_width}), {self.L - n_diag} dense + {n_diag} diag layers, "
                f"{self.n_params} parameters)")


def _readonly(a):
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def pack(chain: Chain) -> PackedChain:
    """Pack ``chain`` into flat arrays; the chain is not modified (``theta`` is a copy).

    Works run by run (consecutive layers of one type and shape are already
    stacked by :class:`Chain`), so packing a 65536-layer chain is a few numpy
    calls per run, not per layer.

    Parameters
    ----------
    chain : Chain

    Returns
    -------
    PackedChain
        Kept on the chain after the first call: a chain's parameters are
        frozen, so its packing never changes, and a training loop that
        calls ``grad`` on the same chain packs it once.
    """
    hit = getattr(chain, "__dict__", {}).get("_packed")
    if hit is not None:
        return hit
    pc = _pack(chain)
    chain.__dict__["_packed"] = pc
    return pc


def _pack(chain):
    if not isinstance(chain, Chain):
        raise TypeError(f"pack expects a chainprod Chain, got {type(chain).__name__}")
    L = len(chain)
    kind = np.empty(L, np.int64)
    act = np.empty(L, np.int64)
    d_in = np.empty(L, np.int64)
    d_out = np.empty(L, np.int64)
    sizes = np.empty(L, np.int64)
    pieces = []
    for run in chain.runs:
        s = slice(run.start, run.start + run.count)
        kname = run.cls.kind
        if kname not in KIND_CODES:
            raise ValueError(f"layers {run.start}..{run.start + run.count - 1} are of kind {kname!r}, which the "
                             f"compiled kernels do not support; supported kinds: {', '.join(KIND_NAMES)}")
        kind[s] = KIND_CODES[kname]
        act[s] = ACT_CODES[run.activation]
        d_in[s], d_out[s] = run.d_in, run.d_out
        # Each layer's parameters, flattened and concatenated, one row per layer:
        # [W row-major, b] or [a, b]. One C-level copy per run.
        rows = np.concatenate([p.reshape(run.count, -1) for p in run.params], axis=1)
        sizes[s] = rows.shape[1]
        pieces.append(rows.reshape(-1))
    p_off = np.zeros(L + 1, np.int64)
    np.cumsum(sizes, out=p_off[1:])
    y_off = np.zeros(L + 1, np.int64)
    np.cumsum(d_out, out=y_off[1:])
    theta = np.concatenate(pieces).astype(chain.dtype, copy=False)
    return PackedChain(L=L, dtype=np.dtype(chain.dtype), kind=_readonly(kind), act=_readonly(act),
                       d_in=_readonly(d_in), d_out=_readonly(d_out), p_off=_readonly(p_off),
                       theta=_readonly(theta), y_off=_readonly(y_off))


def _groups(pc):
    """``(start, stop)`` of maximal stretches of layers with equal (kind, d_in, d_out)."""
    if pc.L == 1:
        return [(0, 1)]
    change = (np.diff(pc.kind) != 0) | (np.diff(pc.d_in) != 0) | (np.diff(pc.d_out) != 0)
    edges = np.concatenate(([0], np.flatnonzero(change) + 1, [pc.L])).tolist()
    return list(zip(edges[:-1], edges[1:]))


def unpack_grads(pc: PackedChain, flat) -> list[tuple]:
    """Per-layer gradient tuples (views of ``flat``), shaped like each layer's ``params``.

    ``(dW (d_out, d_in), db (d_out,))`` for a dense layer, ``(da (d,), db (d,))``
    for a diagonal one: the same structure :func:`chainprod.grad` returns.
    """
    flat = np.asarray(flat)
    if flat.shape != (pc.n_params,):
        raise ValueError(f"a flat gradient of this chain has shape ({pc.n_params},), got {flat.shape}")
    groups = _groups(pc)
    if len(groups) > _MAX_STRETCHES:
        return _unpack_by_shape(pc, flat)
    out = []
    for a, b in groups:
        n, din, dout = b - a, int(pc.d_in[a]), int(pc.d_out[a])
        rows = flat[pc.p_off[a]:pc.p_off[b]].reshape(n, -1)
        p0, p1 = _split(rows, pc.kind[a], din, dout)
        # list(array) makes the per-layer views in C; zip pairs them per layer
        out += zip(list(p0), list(rows[:, p1:]))
    return out


#: more stretches of equal shape than this (a chain whose widths or kinds
#: alternate) are unpacked per shape instead: a few gathers, not one numpy
#: call per stretch
_MAX_STRETCHES = 16


def _split(rows, kind, din, dout):
    """The first parameter's ``(n, ...)`` view of stacked rows, and where the second starts."""
    if kind == KIND_CODES["dense"]:
        return rows[:, :dout * din].reshape(rows.shape[0], dout, din), dout * din
    return rows[:, :dout], dout


def _unpack_by_shape(pc, flat):
    """:func:`unpack_grads` for chains of many short stretches: one gather per distinct shape.

    The per-layer arrays are then views of the gathered copies (not of
    ``flat``); what a caller sees is the same.
    """
    out = [None] * pc.L
    # one integer per distinct (kind, d_in, d_out): np.unique of a 1-D array is a plain sort
    code = (pc.kind * (int(pc.d_in.max()) + 1) + pc.d_in) * (int(pc.d_out.max()) + 1) + pc.d_out
    for c in np.unique(code).tolist():
        ls = np.flatnonzero(code == c)
        l0 = int(ls[0])
        size = int(pc.p_off[l0 + 1] - pc.p_off[l0])
        rows = flat[pc.p_off[ls][:, None] + np.arange(size)]
        p0, p1 = _split(rows, pc.kind[l0], int(pc.d_in[l0]), int(pc.d_out[l0]))
        for l, t in zip(ls.tolist(), zip(list(p0), list(rows[:, p1:]))):
            out[l] = t
    return out


class LayerGrads(Sequence):
    """Per-layer gradient tuples of a flat gradient, made when they are asked for.

    A sequence of ``L`` tuples, ``grads[l]`` shaped like layer ``l``'s
    ``params`` and a view of :attr:`flat` (the layout of ``theta``): what
    :func:`unpack_grads` returns, without building ``2 L`` array objects up
    front. Building them costs about 0.1 us per array, several times the
    compiled backward pass itself on long narrow chains, so a caller that
    reads ``flat`` (an optimizer step over all parameters at once) or a few
    layers never pays it. ``grads[l]`` builds one tuple; iterating (or
    ``list(grads)``) builds them all once, in C.
    """

    __slots__ = ("_pc", "flat", "_items")

    def __init__(self, pc: PackedChain, flat):
        self._pc = pc
        #: the whole gradient, one array in the layout of the chain's flat parameters
        self.flat = flat
        self._items = None

    def __len__(self):
        return self._pc.L

    def __getitem__(self, i):
        if self._items is not None or not isinstance(i, (int, np.integer)):
            return self._all()[i]
        pc = self._pc
        if not -pc.L <= i < pc.L:
            raise IndexError(f"layer {i} is out of range for a chain of {pc.L} layers")
        l = int(i) % pc.L
        rows = self.flat[pc.p_off[l]:pc.p_off[l + 1]].reshape(1, -1)
        p0, p1 = _split(rows, pc.kind[l], int(pc.d_in[l]), int(pc.d_out[l]))
        return p0[0], rows[0, p1:]

    def __iter__(self):
        return iter(self._all())

    def _all(self):
        if self._items is None:
            self._items = unpack_grads(self._pc, self.flat)
        return self._items

    def __repr__(self):
        return f"<LayerGrads of {self._pc.L} layers, {self._pc.n_params} parameters; .flat holds them all>"


def layer_rows(pc: PackedChain, Z, l: int) -> np.ndarray:
    """Layer ``l``'s ``(N, d_out[l])`` block of a flat tape ``Z`` (a view)."""
    if not -pc.L <= l < pc.L:
        raise IndexError(f"layer {l} is out of range for a chain of {pc.L} layers")
    l %= pc.L
    N = _batch_of(pc, Z)
    return Z[N * pc.y_off[l]:N * pc.y_off[l + 1]].reshape(N, int(pc.d_out[l]))


def unpack_rows(pc: PackedChain, Z) -> list[np.ndarray]:
    """Every layer's ``(N, d_out[l])`` block of a flat tape ``Z`` (views)."""
    N = _batch_of(pc, Z)
    out = []
    for a, b in _groups(pc):
        blocks = Z[N * pc.y_off[a]:N * pc.y_off[b]].reshape(b - a, N, int(pc.d_out[a]))
        out += list(blocks)
    return out


def _batch_of(pc, Z):
    if not isinstance(Z, np.ndarray) or Z.ndim != 1 or Z.shape[0] % int(pc.y_off[-1]):
        raise ValueError(f"expected a flat tape: a 1-D array whose length is a multiple of "
                         f"y_off[L] = {int(pc.y_off[-1])}, got {getattr(Z, 'shape', type(Z).__name__)}")
    return Z.shape[0] // int(pc.y_off[-1])


def first_nonfinite_layer(pc: PackedChain, flat) -> int:
    """The lowest layer whose slice of a flat gradient holds NaN or infinity, or -1.

    One pass over ``flat`` when all is finite (the common case); the layer is
    located only on failure.
    """
    flat = np.asarray(flat)
    if flat.shape != (pc.n_params,):
        raise ValueError(f"a flat gradient of this chain has shape ({pc.n_params},), got {flat.shape}")
    if np.isfinite(flat).all():
        return -1
    i = int(np.flatnonzero(~np.isfinite(flat))[0])
    return int(np.searchsorted(pc.p_off, i, side="right")) - 1
