"""The forward pass: run a chain and keep what the backward pass needs.

A :class:`Tape` holds every layer's output. With the compiled kernels the
whole forward pass is one kernel call writing a flat, layer-major tape
(layout of :mod:`chainprod.kernels.pack`); the per-run ``outputs`` the
numpy paths read are views of that one array. The numpy reference runs the
same math one run of stacked layers at a time.

A forward pass can also run a chain's structure with parameter values held
elsewhere: ``forward(chain, x, packed=packed_with(chain, theta))`` reads
``theta`` (the layout of :class:`~chainprod.kernels.PackedChain`) instead of
the chain's own arrays. The torch adapter does this to read a model's
current parameters without building a new :class:`Chain` per training step;
:func:`layer_tape` gives the paths that read per-layer arrays a chain with
those values.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from ._caches import register_cache
from .errors import NonFiniteError
from .kernels import KERNELS, PackedChain, default_kernels, get_kernels, pack, unpack_grads
from .layers import Chain, run_forward

__all__ = ["Tape", "forward", "resolve_kernels", "flat_tape", "packed_with", "layer_tape"]


@register_cache
@functools.lru_cache(maxsize=1)
def _installed_default() -> str:
    # default_kernels() asks importlib whether numba is installed (microseconds per call);
    # the answer does not change while the process runs
    return default_kernels()


def resolve_kernels(kernels) -> str:
    """``None`` -> the default kernel set; a name is checked.

    The default is ``$CHAINPROD_KERNELS`` when set (e.g. ``numpy`` to run a
    whole program on the reference), else ``"numba"`` when it is installed.
    """
    if kernels is not None and kernels.__class__ is str and kernels in KERNELS:
        return kernels  # the common case, checked in one step
    source = "kernels"
    if kernels is None:
        kernels, source = os.environ.get("CHAINPROD_KERNELS") or _installed_default(), "$CHAINPROD_KERNELS"
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"unknown {source} {kernels!r}; valid kernels: {', '.join(KERNELS)} (or None for the "
                         "default)")
    return kernels




def packed_with(chain: Chain, theta) -> PackedChain:
    """``chain``'s packing (:func:`~chainprod.kernels.pack`) with the parameter values ``theta``.

    Parameters
    ----------
    chain : Chain
        Gives the structure: kinds, activations, widths, offsets.
    theta : ndarray
        1-D, C-contiguous, of the chain's dtype and length ``n_params``, in
        the layout of ``PackedChain.theta``. Not copied: the packed chain
        reads a read-only view of it, so ``theta`` must not change while a
        gradient computed from it is in use.

    Returns
    -------
    PackedChain
        For ``forward(chain, x, packed=...)``.
    """
    base = pack(chain)
    if not isinstance(theta, np.ndarray) or theta.dtype != base.dtype or theta.shape != (base.n_params,) \
            or not theta.flags.c_contiguous:
        what = (f"{theta.dtype} array of shape {theta.shape}" if isinstance(theta, np.ndarray)
                else type(theta).__name__)
        raise ValueError(f"theta must be a C-contiguous 1-D {base.dtype} array of the chain's "
                         f"{base.n_params} parameters, got a {what}")
    view = theta.view()
    # read-only, as pack's own theta: the compiled kernels are specialised (and cached) for that type
    view.flags.writeable = False
    return dataclasses.replace(base, theta=view)


def _same_structure(chain, pc) -> PackedChain:
    """``pc`` if it packs ``chain``'s structure (possibly other values), else a ValueError."""
    if not isinstance(pc, PackedChain):
        raise TypeError(f"packed must be a PackedChain (from chainprod.tape.packed_with), got {type(pc).__name__}")
    base = pack(chain)
    if pc.kind is base.kind and pc.act is base.act and pc.p_off is base.p_off and pc.d_in is base.d_in:
        return pc  # made by packed_with from this chain: the structure arrays are the very same
    fields = ("kind", "act", "d_in", "d_out", "p_off", "y_off")
    if pc.L != base.L or pc.dtype != base.dtype or not all(
            np.array_equal(getattr(pc, f), getattr(base, f)) for f in fields):
        raise ValueError(f"packed ({pc!r}) is not a packing of this chain ({base!r})")
    return pc


class Tape:
    """What a forward pass keeps for the backward pass: every layer's output.

    Attributes
    ----------
    chain : Chain
    x : ndarray, shape ``(N, d_0)``
    outputs : list of ndarray
        ``outputs[r]`` is the ``(count, N, d_out)`` stack of run ``r``'s outputs.
    inputs : list of ndarray
        ``inputs[r]`` is that run's input ``(N, d_in)``.
    out : ndarray, shape ``(N, d_L)``
        The model output.
    kernels : str
        The kernel set that made the tape (``"numba"`` or ``"numpy"``).
    flat : ndarray or None
        The compiled path's flat tape (the memory ``outputs`` view).
    packed : PackedChain or None
        The parameters the forward pass ran with, when they are not the
        chain's own (``forward(..., packed=)``); ``chain`` then gives the
        structure only (see :func:`layer_tape`).
    """

    def __init__(self, chain: Chain, x2, one: bool, outputs=None, *, kernels="numpy", flat=None, packed=None):
        if outputs is None and flat is None:
            raise TypeError("a Tape needs the per-run outputs or the flat tape")
        self.chain = chain
        self.x = x2
        self.one = one
        self.kernels = kernels
        self.flat = flat
        self.packed = packed
        if outputs is not None:
            self.__dict__["outputs"] = outputs

    # The per-run views and inputs are made on first use: the compiled paths read the
    # flat tape only, and on a short chain making them costs as much as the kernel call.
    @property
    def outputs(self):
        """``outputs[r]``: the ``(count, N, d_out)`` stack of run ``r``'s outputs."""
        got = self.__dict__.get("outputs")
        if got is None:
            pc = self.packed if self.packed is not None else pack(self.chain)
            got = self.__dict__["outputs"] = _run_views(self.chain, pc, self.flat, self.x.shape[0])
        return got

    @property
    def inputs(self):
        """``inputs[r]``: run ``r``'s input ``(N, d_in)``."""
        got = self.__dict__.get("_inputs")
        if got is None:
            got = self.__dict__["_inputs"] = [self.x] + [o[-1] for o in self.outputs[:-1]]
        return got

    @property
    def out(self):
        """The model output, ``(N, d_L)``."""
        outputs = self.__dict__.get("outputs")
        if outputs is not None:
            return outputs[-1][-1]
        N, d = self.x.shape[0], self.chain.d_out
        return self.flat[self.flat.shape[0] - N * d:].reshape(N, d)

    @property
    def batch(self):
        return self.x.shape[0]

    def run_inputs(self, r):
        """``(count, N, d_in)``: each layer's input in run ``r``."""
        Y = self.outputs[r]
        return np.concatenate([self.inputs[r][None], Y[:-1]]) if Y.shape[0] > 1 else self.inputs[r][None]


def _run_numpy(chain, x2):
    outputs, h = [], x2
    for run in chain.runs:
        Y = np.empty((run.count, x2.shape[0], run.d_out), dtype=chain.dtype)
        run_forward(run, h, Y)
        outputs.append(Y)
        h = Y[-1]
    return outputs


def _run_views(chain, pc, Y, N):
    """Per-run ``(count, N, d_out)`` views of a flat layer-major tape."""
    yo = pc.y_off
    return [Y[N * yo[r.start]: N * yo[r.start + r.count]].reshape(r.count, N, r.d_out) for r in chain.runs]


def forward(chain: Chain, x, *, kernels=None, packed=None) -> Tape:
    """Run the chain forward on ``x`` and keep what the backward pass needs.

    Parameters
    ----------
    chain : Chain
    x : array, shape ``(N, d_0)`` or ``(d_0,)``
    kernels : {"numba", "numpy"}, optional
        The compiled kernels (default when numba is installed) or the numpy
        reference.
    packed : PackedChain, optional
        Run ``chain``'s structure with these parameters instead of its own
        (from :func:`packed_with`); the kernel set's ``forward`` runs on it,
        whichever set it is.

    >>> import numpy as np, chainprod as cp
    >>> tape = cp.forward(cp.mlp([3, 4, 1]), np.ones((2, 3)))
    >>> tape.out.shape
    (2, 1)
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"expected a chainprod Chain, got {type(chain).__name__}")
    kernels = resolve_kernels(kernels)
    x2, one = chain.check_input(x)
    if kernels == "numpy" and packed is None:
        with np.errstate(over="ignore", invalid="ignore"):  # reported below with the layer
            tape = Tape(chain, x2, one, _run_numpy(chain, x2))
        bad = _first_bad_output(tape)
    else:
        pc = pack(chain) if packed is None else _same_structure(chain, packed)
        x2 = np.ascontiguousarray(x2)
        if kernels == "numpy":
            with np.errstate(over="ignore", invalid="ignore"):  # numpy's warnings; reported below with the layer
                Y, bad = get_kernels(kernels).forward(pc, x2)
        else:
            Y, bad = get_kernels(kernels).forward(pc, x2)
        tape = Tape(chain, x2, one, kernels=kernels, flat=Y, packed=packed)
    if bad >= 0:
        raise NonFiniteError(f"the forward pass overflowed: the output of layer {bad} is NaN or "
                             "infinite (inputs and parameters are finite)", (bad, bad))
    return tape


def _first_bad_output(tape) -> int:
    if np.all(np.isfinite(tape.out)):
        return -1
    for run, Y in zip(tape.chain.runs, tape.outputs):
        ok = np.isfinite(Y.reshape(Y.shape[0], -1)).all(axis=1)
        if not ok.all():
            return run.start + int(np.flatnonzero(~ok)[0])
    return -1  # pragma: no cover - a non-finite output has a first layer


def flat_tape(tape: Tape):
    """``(packed chain, x, flat Y)`` for the compiled kernels, from any tape (no copy if compiled)."""
    pc = tape.packed if tape.packed is not None else pack(tape.chain)
    Y = tape.flat if tape.flat is not None else np.concatenate([o.reshape(-1) for o in tape.outputs])
    return pc, np.ascontiguousarray(tape.x), Y


def layer_tape(tape: Tape) -> Tape:
    """A tape whose ``chain`` holds the parameters its forward pass ran with.

    ``tape`` itself, unless it was made with ``forward(..., packed=)``; then
    the same outputs over a new :class:`Chain` with the packed values (built
    once per tape). The paths that read per-layer parameter arrays (the
    numpy scans, Ray and Dask) go through here; the kernel sets read
    ``tape.packed`` directly.
    """
    if tape.packed is None:
        return tape
    got = tape.__dict__.get("_layer_tape")
    if got is None:
        chain = tape.chain.with_params(unpack_grads(tape.packed, tape.packed.theta))
        got = Tape(chain, tape.x, tape.one, tape.outputs, kernels=tape.kernels, flat=tape.flat)
        tape.__dict__["_layer_tape"] = got
    return got
