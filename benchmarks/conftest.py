"""Shared fixtures of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``)."""

import numpy as np
import pytest

import chainprod as cp
from chainprod.grad import loss_cotangent


def tape_and_cotangent(chain, x):
    tape = cp.forward(chain, x)
    _, cotangent = loss_cotangent(tape, None, None)
    return tape, cotangent


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
