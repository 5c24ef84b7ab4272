"""Recurrences over time: ``cp.linear_recurrence`` by loop and scans, and recurrent models' gradients against peers.

Run with ``python3 -m pytest benchmarks/bench_recurrence.py --benchmark-only``
(under a minute on 2 cores).

``test_linear_recurrence``: ``method="sequential"`` is the loop;
``brent_kung`` (work-efficient) and ``chunked`` (few rounds) run a scan of
``T + 1`` affine blocks, and ``auto`` runs what the cost model picks (its
first call, which decides, is the warm-up round), each by the compiled
kernels (``numba``: the loop one kernel call, a scan one call of the
compiled affine scan) and by the numpy reference (``numpy``: the loop one or
two numpy calls per step, a scan the vectorized executor's batched rounds).
One sample (``N = 1``), float64, stable random ``A`` (spectral norm about
0.9); dense ``A`` only up to sizes where a scan takes well under a second.

``test_recurrent_gradient``: one training step's gradient (``loss = sum of
every output``, every parameter) of a one-layer RNN (tanh), GRU, LSTM
(``input_size = hidden = 20``) and the diagonal recurrence layer (hidden 20)
over T = 1000 steps of a batch of 4, float64, as the ``chainprod bench``
sequences section times it (:mod:`chainprod.bench_sequences`): compiled
backprop through time (``numba``), the numpy reference loop (``numpy``), the
adjoints by a ``sklansky`` scan of the state Jacobians (``scan``, the RNN,
GRU and diagonal layer only: an LSTM's 40 x 40 blocks take seconds),
torch's module and ``loss.backward()`` (2 threads; for the diagonal layer an
eager loop) and JAX ``jit(value_and_grad)`` of a ``lax.scan`` (compile time
in the warm-up round). A fixed number of rounds after one warm-up each.
"""

import functools
import importlib.util

import numpy as np
import pytest

import chainprod as cp
from chainprod.bench_sequences import SequenceProblem, sequence_step

#: (T, d, kind) of the linear recurrences: dense blocks cost d^3 per scan op, diagonal ones d
LINEAR = [(1024, 8, "dense"), (1024, 64, "dense"), (16384, 8, "dense"), (1024, 64, "diag"), (16384, 64, "diag")]
METHODS = ["sequential", "brent_kung", "chunked", "auto"]
CELLS = ["rnn_tanh", "gru", "lstm", "diag_recurrence"]
#: (method, backend) of each gradient benchmark
PEERS = [("backprop", "numba"), ("backprop-numpy", "numpy"), ("sklansky", "vectorized"), ("torch", "torch"),
         ("jax", "jax")]
T, H, N = 1000, 20, 4


@functools.lru_cache(maxsize=2)
def problem(T, d, kind):
    rng = np.random.default_rng(T + d)
    if kind == "diag":
        A = cp.Diag(rng.uniform(-0.99, 0.99, (T, d)))
    else:
        A = rng.standard_normal((T, d, d)) * (0.45 / np.sqrt(d))  # a Gaussian d x d has norm about 2 sqrt(d)
    return A, rng.standard_normal((T, d))


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("T,d,kind", LINEAR, ids=[f"T{T}-d{d}-{k}" for T, d, k in LINEAR])
def test_linear_recurrence(benchmark, T, d, kind, method, kernels):
    A, b = problem(T, d, kind)
    benchmark.group = f"linear_recurrence T={T} d={d} {kind}"
    benchmark.pedantic(cp.linear_recurrence, args=(A, b), kwargs={"method": method, "kernels": kernels},
                       rounds=3 if kernels == "numpy" else 10, warmup_rounds=1)


@functools.lru_cache(maxsize=1)
def model_problem(cell):
    return SequenceProblem(cell, T, H, N, "float64", seed=0)


@pytest.fixture(scope="module", autouse=True)
def two_torch_threads():
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method,backend", PEERS, ids=[m if m != "backprop-numpy" else "numpy" for m, _ in PEERS])
@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_gradient(benchmark, cell, method, backend):
    if method in ("torch", "jax"):
        pytest.importorskip(method)
    if method == "sklansky" and cell == "lstm":
        pytest.skip("an LSTM's adjoint scan multiplies 40 x 40 blocks: seconds per call at this size")
    step = sequence_step(method, backend, 2, model_problem(cell))
    benchmark.group = f"gradient through time: {cell} T={T} H={H} N={N}"
    benchmark.pedantic(step, rounds=3 if method in ("torch", "backprop-numpy", "sklansky") else 10,
                       warmup_rounds=1)
