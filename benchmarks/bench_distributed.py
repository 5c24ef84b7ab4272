"""Ray and Dask executors: overheads, strong scaling, grad vs threads and backprop.

Run (not part of the unit tests; ~5-8 minutes on a 2-core machine)::

    python -m pytest benchmarks/bench_distributed.py --benchmark-only \
        --benchmark-columns=min,median,max,rounds --benchmark-sort=name -p no:randomly

Sizes: dense w = 256, L = 1024, float64, batch 1, unless a test says otherwise.
Each engine runs on its embedded local cluster with 2 worker processes.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.testing import random_mats

pytest.importorskip("pytest_benchmark")
ray = pytest.importorskip("ray")
distributed = pytest.importorskip("distributed")

ENGINES = ["ray", "dask"]
W, L = 256, 1024


@pytest.fixture(scope="module", params=ENGINES)
def engine(request):
    cp.suffix_products(random_mats(3, 2), backend=request.param, workers=2)  # start the cluster
    return request.param


def _roundtrip(engine):
    if engine == "ray":
        f = ray.remote(lambda: None)
        return lambda: ray.get(f.remote())
    from chainprod.executors import dask_executor

    client = dask_executor._EMBEDDED["client"]
    counter = iter(range(10**9))
    return lambda: client.submit(lambda i: None, next(counter), pure=False).result()


# -- 1. overheads ----------------------------------------------------------------------------
def test_task_roundtrip(benchmark, engine):
    """One empty task, submit to result: the engine's unit of latency."""
    benchmark.group = f"overhead-{engine}"
    benchmark.pedantic(_roundtrip(engine), rounds=50, warmup_rounds=5)


def test_run_no_ops(benchmark, engine):
    """A run with one factor and no ops: fixed cost of a run (P=1 chain, one collect)."""
    benchmark.group = f"overhead-{engine}"
    mats = random_mats(1, 2)
    benchmark.pedantic(lambda: cp.suffix_products(mats, method="sklansky", backend=engine, workers=2),
                       rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("method", ["sklansky", "brent_kung", "hillis_steele"])
def test_rounds_tiny_blocks(benchmark, engine, method):
    """L=1024 blocks of 2x2 (compute ~ 0): (time - no-op run) / rounds = per-round overhead."""
    benchmark.group = f"overhead-{engine}"
    mats = random_mats(1024, 2, seed=1)
    s = cp.schedule(method, 1024)
    benchmark.extra_info.update(rounds=s.rounds, ops=s.num_ops)
    benchmark.pedantic(lambda: cp.suffix_products(mats, method=s, backend=engine, workers=2),
                       rounds=5, warmup_rounds=1)


# -- 2. strong scaling, suffix products of dense w x w blocks ------------------------------------
@pytest.fixture(scope="module")
def dense_mats():
    rng = np.random.default_rng(0)
    return [np.eye(W) * 0.9 + rng.standard_normal((W, W)) / (4 * W) for _ in range(256)]


@pytest.mark.parametrize("P", [1, 2])
def test_scaling_suffix_sklansky_L256(benchmark, engine, dense_mats, P):
    """Sklansky on 256 dense 256x256 blocks (1024 matmuls): same work at P=1 and P=2."""
    benchmark.group = f"scaling-suffix-{engine}"
    benchmark.pedantic(lambda: cp.suffix_products(dense_mats, method="sklansky", backend=engine, workers=P),
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("P", [1, 2])
def test_scaling_suffix_sklansky_L256_threads(benchmark, dense_mats, P):
    benchmark.group = "scaling-suffix-threads"
    benchmark.pedantic(lambda: cp.suffix_products(dense_mats, method="sklansky", backend="threads", workers=P),
                       rounds=3, warmup_rounds=1)


# -- 3. grad, dense MLP w=256, L=1024, batch 1 ----------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    chain = cp.mlp([W] * L + [1], seed=0)
    x = np.random.default_rng(0).standard_normal(W)
    return chain, x


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("method", ["auto", "chunked", "brent_kung"])
def test_grad_dense(benchmark, engine, mlp, P, method):
    """End to end grad (forward on the driver, Jacobians + scan + VJPs on the workers)."""
    chain, x = mlp
    benchmark.group = f"grad-w{W}-L{L}"
    benchmark.extra_info["schedule"] = cp.schedule(method, L - 1, workers=P, blocks=W, backend=engine).name
    benchmark.pedantic(lambda: cp.grad(chain, x, method=method, backend=engine, workers=P),
                       rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("method", ["auto", "chunked", "brent_kung"])
def test_grad_dense_threads(benchmark, mlp, method, P):
    chain, x = mlp
    benchmark.group = f"grad-w{W}-L{L}"
    benchmark.pedantic(lambda: cp.grad(chain, x, method=method, backend="threads", workers=P),
                       rounds=3, warmup_rounds=1)


def test_grad_dense_vectorized(benchmark, mlp):
    chain, x = mlp
    benchmark.group = f"grad-w{W}-L{L}"
    benchmark.pedantic(lambda: cp.grad(chain, x, method="auto", backend="vectorized"), rounds=3,
                       warmup_rounds=1)


def test_grad_dense_backprop(benchmark, mlp):
    chain, x = mlp
    benchmark.group = f"grad-w{W}-L{L}"
    benchmark.pedantic(lambda: cp.grad(chain, x, method="backprop"), rounds=3, warmup_rounds=1)


# -- 4. where a scan can win: a long diagonal chain (state-space recurrence) -------------------------
@pytest.fixture(scope="module")
def diag_chain():
    chain = cp.diagonal_chain(65536, 32, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 32))
    return chain, x


@pytest.mark.parametrize("backend", ["ray", "dask", "threads", "backprop"])
def test_grad_diagonal_L65536(benchmark, diag_chain, backend):
    chain, x = diag_chain
    benchmark.group = "grad-diag-w32-L65536-N4"
    if backend == "backprop":
        fn = lambda: cp.grad(chain, x, method="backprop")  # noqa: E731
    else:
        fn = lambda: cp.grad(chain, x, method="chunked", backend=backend, workers=2)  # noqa: E731
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
