"""Shared fixtures of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``)."""

import numpy as np
import pytest

import chainprod as cp
from chainprod.grad import loss_seed


def tape_and_seed(chain, x):
    tape = cp.forward(chain, x)
    _, seed = loss_seed(tape, None, None)
    return tape, seed


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)
