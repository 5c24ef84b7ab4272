"""Elementwise nonlinearities, each with its derivative written in terms of its output.

Every derivative is computed from the layer's *output* ``y`` (``tanh' = 1 -
y^2``, ...), so a forward pass stores outputs only. The compiled kernels
(:mod:`chainprod.kernels`) carry the same table as integer codes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["ACTIVATIONS", "Activation"]


class Activation(NamedTuple):
    """An elementwise nonlinearity and its derivative written in terms of its output."""

    fn: Callable | None  # fn(z, out) -> out, in place allowed; None = identity
    deriv: Callable | None  # deriv(y) -> f'(z) from y = f(z); None = ones


def _tanh(z, out):
    return np.tanh(z, out=out)


def _relu(z, out):
    return np.maximum(z, 0, out=out)


def _sigmoid(z, out):
    # exp(-softplus(-z)) is overflow-free for both signs of z
    np.logaddexp(0, -z, out=out)
    np.negative(out, out=out)
    return np.exp(out, out=out)


def _softplus(z, out):
    return np.logaddexp(0, z, out=out)


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation(_tanh, lambda y: 1 - y * y),
    "relu": Activation(_relu, lambda y: (y > 0).astype(y.dtype)),
    "sigmoid": Activation(_sigmoid, lambda y: y * (1 - y)),
    # softplus'(z) = sigmoid(z) = 1 - exp(-softplus(z))
    "softplus": Activation(_softplus, lambda y: -np.expm1(-y)),
    "identity": Activation(None, None),
}


def _activation(name):
    if name is None:
        name = "identity"
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(sorted(ACTIVATIONS))} (or None)")
    return name


def _apply_act(activation, y):
    fn = ACTIVATIONS[activation].fn
    if fn is not None:
        fn(y, y)
