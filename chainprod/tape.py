"""The forward pass: run a chain and keep what the backward pass needs.

A :class:`Tape` holds every layer's output. With the compiled kernels the
whole forward pass is one kernel call writing a flat, layer-major tape
(layout of :mod:`chainprod.kernels.pack`); the per-run ``outputs`` the
numpy paths read are views of that one array. The numpy reference runs the
same math one run of stacked layers at a time.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import NonFiniteError
from .kernels import KERNELS, default_kernels, get_kernels, pack
from .layers import Chain, run_forward

__all__ = ["Tape", "forward", "resolve_kernels", "flat_tape"]


def resolve_kernels(kernels) -> str:
    """``None`` -> the default kernel set; a name is checked.

    The default is ``$CHAINPROD_KERNELS`` when set (e.g. ``numpy`` to run a
    whole program on the reference), else ``"numba"`` when it is installed.
    """
    source = "kernels"
    if kernels is None:
        kernels, source = os.environ.get("CHAINPROD_KERNELS") or default_kernels(), "$CHAINPROD_KERNELS"
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"unknown {source} {kernels!r}; valid kernels: {', '.join(KERNELS)} (or None for the "
                         "default)")
    return kernels


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
    """

    def __init__(self, chain: Chain, x2, one: bool, outputs, *, kernels="numpy", flat=None):
        self.chain = chain
        self.x = x2
        self.one = one
        self.outputs = outputs
        self.inputs = [x2] + [o[-1] for o in outputs[:-1]]
        self.out = outputs[-1][-1]
        self.kernels = kernels
        self.flat = flat

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


def forward(chain: Chain, x, *, kernels=None) -> Tape:
    """Run the chain forward on ``x`` and keep what the backward pass needs.

    Parameters
    ----------
    chain : Chain
    x : array, shape ``(N, d_0)`` or ``(d_0,)``
    kernels : {"numba", "numpy"}, optional
        The compiled kernels (default when numba is installed) or the numpy
        reference.

    >>> import numpy as np, chainprod as cp
    >>> tape = cp.forward(cp.mlp([3, 4, 1]), np.ones((2, 3)))
    >>> tape.out.shape
    (2, 1)
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"expected a chainprod Chain, got {type(chain).__name__}")
    kernels = resolve_kernels(kernels)
    x2, one = chain.check_input(x)
    if kernels == "numpy":
        with np.errstate(over="ignore", invalid="ignore"):  # reported below with the layer
            tape = Tape(chain, x2, one, _run_numpy(chain, x2))
        bad = _first_bad_output(tape)
    else:
        pc = pack(chain)
        x2 = np.ascontiguousarray(x2)
        Y, bad = get_kernels(kernels).forward(pc, x2)
        tape = Tape(chain, x2, one, _run_views(chain, pc, Y, x2.shape[0]), kernels=kernels, flat=Y)
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
    pc = pack(tape.chain)
    Y = tape.flat if tape.flat is not None else np.concatenate([o.reshape(-1) for o in tape.outputs])
    return pc, np.ascontiguousarray(tape.x), Y
