"""Backward pass: backprop (numpy loop) vs every scan on every local executor, torch autograd.

Presets match ``chainprod bench --quick``. The forward pass is done once
outside the timer: this file times the backward pass alone.
"""

import numpy as np
import pytest
from conftest import tape_and_seed
from presets import preset_problems

import chainprod as cp
from chainprod.bench import _build_chain

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
    chain = _build_chain(s, L, w, dt, 0)
    tape, seed = tape_and_seed(chain, np.ones((N, w), dtype=dt))
    kw = {} if method == "backprop" else {"backend": backend, "workers": 2}
    benchmark.group = f"backward {s} L={L} w={w} N={N}"
    benchmark(cp.backward, tape, seed, method=method, **kw)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p[0]}-L{p[1]}-w{p[2]}-N{p[3]}")
def test_torch_autograd_backward(benchmark, problem):
    torch = pytest.importorskip("torch")
    s, L, w, N, dt = problem
    chain = _build_chain(s, L, w, dt, 0)
    torch.set_num_threads(1)
    params = []
    for layer in chain.layers:
        params.append([torch.tensor(np.asarray(p), requires_grad=True) for p in layer.params])
    x = torch.ones((N, w), dtype=torch.float64)

    def fwd():
        h = x
        for layer, (a, b) in zip(chain.layers, params):
            if layer.kind == "dense":
                h = h @ a.T + b
            else:
                h = h * a + b
            if layer.activation == "tanh":
                h = torch.tanh(h)
        return h.sum()

    def setup():
        for p in params:
            for t in p:
                t.grad = None
        return (fwd(),), {}

    benchmark.group = f"backward {s} L={L} w={w} N={N}"
    benchmark.pedantic(lambda loss: loss.backward(), setup=setup, rounds=5)
