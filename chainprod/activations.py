"""Elementwise nonlinearities, each with its derivative written in terms of its output.

Every derivative is computed from the layer's *output* ``y`` (a forward pass
stores outputs only):

==========  ======================  ==========================================
name        ``y = f(z)``            ``f'(z)`` from ``y``
==========  ======================  ==========================================
identity    ``z``                   ``1``
tanh        ``tanh(z)``             ``1 - y^2``
relu        ``max(z, 0)``           ``y > 0``
sigmoid     ``1 / (1 + e^-z)``      ``y (1 - y)``
softplus    ``log(1 + e^z)``        ``-expm1(-y)`` (``= sigmoid(z)``)
==========  ======================  ==========================================

:data:`ACTIVATIONS` is the one table of these rules in numpy; the layers and
the numpy reference kernels read it. The compiled kernels
(:mod:`chainprod.kernels`) carry the same rules by integer code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["ACTIVATIONS", "Activation", "activation_name", "apply_activation", "derivative_from_output"]


class Activation(NamedTuple):
    """An elementwise nonlinearity and its derivative written in terms of its output."""

    fn: Callable | None  # fn(z, out) -> out, in place allowed; None = identity (nothing to do)
    deriv: Callable  # deriv(y) -> f'(z) from y = f(z), a new array


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
    "identity": Activation(None, np.ones_like),
}


def activation_name(name) -> str:
    """The table's name for ``name`` (``None`` means ``"identity"``).

    Raises
    ------
    ValueError
        ``name`` is not in :data:`ACTIVATIONS` (the message lists them).
    """
    if name is None:
        name = "identity"
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(sorted(ACTIVATIONS))} (or None)")
    return name


def apply_activation(name: str, y: np.ndarray) -> np.ndarray:
    """``y <- f(y)`` in place for the activation called ``name`` (a table name); returns ``y``."""
    fn = ACTIVATIONS[name].fn
    if fn is not None:
        fn(y, y)
    return y


def derivative_from_output(name: str, y: np.ndarray) -> np.ndarray:
    """``f'(z)`` from the output ``y = f(z)``, a new array shaped like ``y``."""
    return ACTIVATIONS[name].deriv(y)
