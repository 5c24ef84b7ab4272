"""A torch training step's backward pass: ``loss.backward()`` against ``cp.torch_backward``.

For each size, three ways to get the gradients of ``mse_loss(model(x), y)``
for an ``nn.Sequential`` of ``nn.Linear`` + ``nn.Tanh``:

* ``torch``: autograd's ``loss.backward()`` on 2 torch threads (forward included);
* ``torch_backward``: ``cp.torch_backward(model, x, y)`` (the model converted
  once and kept; every call checks it, reads its current parameters and
  writes ``.grad``);
* ``value_and_grad``: ``cp.value_and_grad`` on the converted chain, the same
  work without the torch side: the difference to ``torch_backward`` is what
  the adapter adds per step.

Each on the default kernels and on ``kernels="numpy"``; every round starts
with ``model.zero_grad()`` (gradients set to None), as a training loop does.
Run with ``python3 -m pytest benchmarks/bench_torch.py --benchmark-only``.
"""

import numpy as np
import pytest

import chainprod as cp

torch = pytest.importorskip("torch")

#: (width, depth, batch, dtype)
SIZES = [(256, 8, 128, "float32"), (64, 64, 32, "float32"), (1024, 4, 256, "float32"),
         (32, 256, 16, "float64"), (128, 16, 64, "float64")]
IDS = [f"w{w}-L{L}-N{N}-{dt}" for w, L, N, dt in SIZES]


def model_of(width, depth, dtype):
    """Linear + Tanh, scalar output; a gain of 1.2 keeps tanh activations O(1) at any depth
    (torch's default initialisation lets them shrink into denormals, which slow every library)."""
    gen = torch.Generator().manual_seed(0)
    mods = []
    for i in range(depth):
        lin = torch.nn.Linear(width, width if i < depth - 1 else 1, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=dtype) * 1.2 / width ** 0.5)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen, dtype=dtype) * 0.1)
        mods += [lin, torch.nn.Tanh()]
    return torch.nn.Sequential(*mods[:-1])


@pytest.fixture(scope="module", autouse=True)
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def problem(size):
    width, depth, batch, dt = size
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(1)
    model = model_of(width, depth, dtype)
    x = torch.randn(batch, width, generator=gen, dtype=dtype)
    y = torch.randn(batch, 1, generator=gen, dtype=dtype)
    return model, x, y


@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_torch_loss_backward(benchmark, size):
    model, x, y = problem(size)

    def step():
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()

    benchmark.group = f"torch step {IDS[SIZES.index(size)]}"
    benchmark(step)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_torch_backward(benchmark, size, kernels):
    model, x, y = problem(size)

    def step():
        model.zero_grad()
        cp.torch_backward(model, x, y, loss="mse", method="backprop", kernels=kernels)

    benchmark.group = f"torch step {IDS[SIZES.index(size)]}"
    benchmark(step)
    assert model[0].weight.grad.dtype == x.dtype


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("size", SIZES, ids=IDS)
def test_value_and_grad_on_the_converted_chain(benchmark, size, kernels):
    model, x, y = problem(size)
    chain, xn, yn = cp.from_torch(model), x.numpy(), y.numpy()
    benchmark.group = f"torch step {IDS[SIZES.index(size)]}"
    value, grads = benchmark(cp.value_and_grad, chain, xn, yn, loss="mse", method="backprop", kernels=kernels)
    assert np.asarray(grads[0][0]).dtype == xn.dtype
