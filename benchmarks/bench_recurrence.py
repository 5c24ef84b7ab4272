"""linear_recurrence: the plain loop against scans of affine blocks on the vectorized executor.

``method="sequential"`` is the loop (one or two numpy calls per step);
``brent_kung`` (work-efficient) and ``chunked`` (few rounds) run a scan of
``T + 1`` affine blocks, and ``auto`` runs what the cost model picks (its
first call, which decides, is the warm-up round). One sample (``N = 1``),
float64, stable random ``A`` (spectral norm about 0.9).
"""

import functools

import numpy as np
import pytest

import chainprod as cp

LENGTHS = [1024, 16384]
WIDTHS = [8, 64]
METHODS = ["sequential", "brent_kung", "chunked", "auto"]


@functools.lru_cache(maxsize=2)  # one problem at a time: the dense T=16384, d=64 one is half a GB
def problem(T, d, kind):
    rng = np.random.default_rng(T + d)
    if kind == "diag":
        A = cp.Diag(rng.uniform(-0.99, 0.99, (T, d)))
    else:
        A = rng.standard_normal((T, d, d)) * (0.45 / np.sqrt(d))  # a Gaussian d x d has norm about 2 sqrt(d)
    return A, rng.standard_normal((T, d))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["diag", "dense"])
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("T", LENGTHS)
def test_linear_recurrence(benchmark, T, d, kind, method):
    A, b = problem(T, d, kind)
    benchmark.group = f"linear_recurrence T={T} d={d} {kind}"
    # the big dense scans take seconds per call: a fixed, small number of rounds after one warm-up
    benchmark.pedantic(cp.linear_recurrence, args=(A, b), kwargs={"method": method}, rounds=3, warmup_rounds=1)
