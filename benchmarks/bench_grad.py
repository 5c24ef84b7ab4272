"""Backward pass: backprop (compiled and numpy loops) vs every scan on every local executor, torch autograd.

Presets match ``chainprod bench --quick``. The forward pass is done once
outside the timer: this file times the backward pass alone. The torch model
is the sweep's own (:func:`chainprod._timing.torch_model`).
"""

import numpy as np
import pytest
from conftest import tape_and_cotangent
from presets import preset_problems

import chainprod as cp
from chainprod._timing import backprop_kernels, torch_model
from chainprod.bench import build_chain

PROBLEMS = preset_problems("quick")
METHODS = ["backprop", "auto", "sklansky", "brent_kung", "chunked"]
BACKENDS = ["vectorized", "threads", "serial"]


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p[0]}-L{p[1]}-w{p[2]}-N{p[3]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_backward(benchmark, problem, backend, method):
    s, L, w, N, dt = problem
    if method == "backprop" and backend != "vectorized":
        pytest.skip("backprop has no backend")
    if backend == "serial" and L > 1024:
        pytest.skip("serial is the yardstick, not a contender, at this size")
    chain = build_chain(s, L, w, dt, 0)
    tape, cotangent = tape_and_cotangent(chain, np.ones((N, w), dtype=dt))
    kw = {} if method == "backprop" else {"backend": backend, "workers": 2}
    benchmark.group = f"backward {s} L={L} w={w} N={N}"
    benchmark(cp.backward, tape, cotangent, method=method, **kw)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p[0]}-L{p[1]}-w{p[2]}-N{p[3]}")
def test_numpy_backprop_backward(benchmark, problem):
    if len(backprop_kernels()) < 2:
        pytest.skip("no compiled kernels: backprop already is the numpy loop")
    s, L, w, N, dt = problem
    chain = build_chain(s, L, w, dt, 0)
    tape = cp.forward(chain, np.ones((N, w), dtype=dt), kernels="numpy")
    cotangent = cp.loss_cotangent(tape)[1]
    benchmark.group = f"backward {s} L={L} w={w} N={N}"
    benchmark(cp.backward, tape, cotangent, method="backprop", kernels="numpy")


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p[0]}-L{p[1]}-w{p[2]}-N{p[3]}")
def test_torch_autograd_backward(benchmark, problem):
    torch = pytest.importorskip("torch")
    s, L, w, N, dt = problem
    loss_fn, tensors = torch_model(build_chain(s, L, w, dt, 0))
    x = torch.ones((N, w), dtype=torch.float64)

    def setup():
        for ts in tensors:
            for t in ts:
                t.grad = None
        return (loss_fn(x),), {}

    benchmark.group = f"backward {s} L={L} w={w} N={N}"
    benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=5)
