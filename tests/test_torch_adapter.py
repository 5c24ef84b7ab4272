"""``chainprod.torch``: torch models in, ``.grad`` out, checked against ``loss.backward()``.

The reference is torch autograd on a deep copy of the same model; chainprod
never sees it. Tolerances are normwise relative errors per parameter
(1e-10 for float64, 1e-4 for float32).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import chainprod as cp  # noqa: E402
from chainprod.torch import UnsupportedModuleError, from_torch, torch_backward  # noqa: E402

pytestmark = pytest.mark.torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32"}

#: every schedule that produces all prefixes (so not "tree"), plus backprop; "auto" is among them
METHODS = [m for m in cp.valid_schedules() if m != "tree" and cp.schedule(m, 5).is_scan] + ["backprop"]

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "identity": nn.Identity}
# Weight scale per following activation, so that 64 layers neither vanish nor explode
# (sigmoid' <= 1/4 would otherwise underflow float32 long before layer 64).
GAIN = {"tanh": 1.2, "relu": 1.4, "sigmoid": 2.5, "softplus": 1.3, "identity": 1.0}


# -- models -----------------------------------------------------------------------
def _linear(rng, d_in, d_out, bias=True, gain=1.0):
    lin = nn.Linear(d_in, d_out, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(gain * rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)))
        if bias:
            lin.bias.copy_(torch.from_numpy(0.3 * rng.standard_normal(d_out)))
    return lin


def _nest(rng, mods, depth=0):
    """Wrap random slices of ``mods`` in nested Sequentials (same function, deeper tree)."""
    if len(mods) < 2 or depth > 2:
        return list(mods)
    out, i = [], 0
    while i < len(mods):
        if rng.random() < 0.3:
            j = int(rng.integers(i + 1, len(mods) + 1))
            out.append(nn.Sequential(*_nest(rng, mods[i:j], depth + 1)))
            i = j
        else:
            out.append(mods[i])
            i += 1
    return out


def random_sequential(seed, n_linear, d_out=1):
    """A random float64 Sequential: ``n_linear`` Linears, random widths, 0-2 activations after each."""
    rng = np.random.default_rng(seed)
    widths = [int(w) for w in rng.integers(1, 11, n_linear)] + [d_out]
    names = list(ACTS)
    mods = []
    if rng.random() < 0.5:  # activation first: a Diagonal layer
        mods.append(ACTS[names[rng.integers(4)]]())
    for i in range(n_linear):
        acts = [names[k] for k in rng.integers(0, 5, rng.choice([0, 1, 1, 1, 2]))]
        mods.append(_linear(rng, widths[i], widths[i + 1], bias=bool(rng.random() < 0.7),
                            gain=GAIN[acts[0]] if acts else 1.0))
        mods += [ACTS[a]() for a in acts]
    return nn.Sequential(*_nest(rng, mods))


def handmade(seed):
    """Every structural case in one small model: activation first, activation after
    activation, no bias, nesting, Identity, Dropout(p=0) in training mode."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Tanh(),
        _linear(rng, 4, 7),
        nn.Sequential(nn.Softplus(), nn.Sigmoid(), _linear(rng, 7, 7, bias=False, gain=2.0),
                      nn.Sequential(nn.Tanh(), nn.Tanh())),
        nn.Identity(),
        nn.Dropout(0.0),
        _linear(rng, 7, 5),
        nn.ReLU(),
        nn.Identity(),
        nn.Sigmoid(),
        _linear(rng, 5, 1),
        nn.Softplus(),
    )


def eval_dropout(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(_linear(rng, 3, 6), nn.Dropout(0.5), nn.Tanh(), _linear(rng, 6, 1)).eval()


class Case(NamedTuple):
    name: str
    model: nn.Module  # float64
    x: np.ndarray  # float64
    d_out: int


def _case(name, model, batch, seed):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x = np.random.default_rng(seed + 1000).standard_normal((batch, linears[0].in_features))
    return Case(name, model, x, linears[-1].out_features)


CASES = [
    _case("linear", nn.Sequential(_linear(np.random.default_rng(1), 5, 1)), 3, 1),
    _case("act-linear-act", nn.Sequential(nn.Sigmoid(), _linear(np.random.default_rng(2), 6, 1), nn.Tanh()), 4, 2),
    _case("handmade", handmade(3), 5, 3),
    _case("eval-dropout", eval_dropout(4), 2, 4),
    _case("batch1", random_sequential(5, 6), 1, 5),
    _case("vector-out", random_sequential(6, 7, d_out=3), 4, 6),  # mse only
] + [_case(f"random-L{n}", random_sequential(10 + n, n), 1 + n % 5, 10 + n) for n in (2, 3, 5, 9, 17, 33, 64)]


def targets(case, x):
    return np.random.default_rng(len(case.name)).standard_normal(x.shape[:-1] + (case.d_out,))


_REF = {}


def reference(case, dtype, loss):
    """(model in dtype, x, y, loss value, grads) by autograd, cached per case."""
    key = (case.name, dtype, loss)
    if key not in _REF:
        model = copy.deepcopy(case.model).to(dtype)
        x = torch.from_numpy(case.x).to(dtype)
        y = None if loss == "sum" else torch.from_numpy(targets(case, case.x)).to(dtype)
        ref = copy.deepcopy(model)
        out = ref(x)
        value = out.sum() if loss == "sum" else torch.nn.functional.mse_loss(out, y)
        value.backward()
        _REF[key] = (model, x, y, value.item(), [p.grad.clone() for p in ref.parameters()])
    return _REF[key]


def assert_grads_close(got_params, want, rtol, what=""):
    got = [p.grad for p in got_params]
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g is not None, f"{what}: parameter {i} has no .grad"
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device
        err = torch.linalg.vector_norm((g - w).double()).item()
        scale = torch.linalg.vector_norm(w.double()).item()
        assert err <= rtol * scale, f"{what}: parameter {i} relative error {err / max(scale, 1e-300):.3g}"


# -- agreement with autograd -------------------------------------------------------
@pytest.mark.parametrize("loss", ["sum", "mse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", ["vectorized", "serial"])
@pytest.mark.parametrize("method", METHODS)
def test_matches_autograd(method, backend, dtype, loss):
    for case in CASES:
        if loss == "sum" and case.d_out != 1:
            continue
        model, x, y, value, want = reference(case, dtype, loss)
        m = copy.deepcopy(model)
        got = torch_backward(m, x, y, loss=loss, method=method, backend=backend)
        assert isinstance(got, float)
        assert got == pytest.approx(value, rel=RTOL[dtype], abs=RTOL[dtype])
        assert_grads_close(m.parameters(), want, RTOL[dtype], case.name)


@pytest.mark.parametrize("method", ["sklansky", "brent_kung", "chunked", "auto"])
def test_threads_backend(method):
    for case in (CASES[2], CASES[-1], CASES[-2]):
        model, x, y, value, want = reference(case, torch.float64, "mse")
        m = copy.deepcopy(model)
        got = torch_backward(m, x, y, loss="mse", method=method, backend="threads", workers=2)
        assert got == pytest.approx(value, rel=1e-10)
        assert_grads_close(m.parameters(), want, 1e-10, case.name)


def test_numpy_inputs_and_leading_batch_dims():
    case = CASES[2]
    model = copy.deepcopy(case.model)
    x = np.random.default_rng(0).standard_normal((2, 3, 4))  # (..., d_in) like nn.Linear
    for loss in ("sum", "mse"):
        y = None if loss == "sum" else targets(case, x)
        ref = copy.deepcopy(model)
        out = ref(torch.from_numpy(x))
        v = out.sum() if loss == "sum" else torch.nn.functional.mse_loss(out, torch.from_numpy(y))
        v.backward()
        m = copy.deepcopy(model)
        assert torch_backward(m, x, y, loss=loss, method="sklansky") == pytest.approx(v.item(), rel=1e-12)
        assert_grads_close(m.parameters(), [p.grad for p in ref.parameters()], 1e-10, loss)
    # a single sample without a batch axis
    x1 = torch.from_numpy(x[0, 0])
    ref = copy.deepcopy(model)
    ref(x1).sum().backward()
    m = copy.deepcopy(model)
    torch_backward(m, x1, method="brent_kung")
    assert_grads_close(m.parameters(), [p.grad for p in ref.parameters()], 1e-10, "1-D x")


def test_shared_module_gets_the_sum():
    rng = np.random.default_rng(8)
    lin = _linear(rng, 5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), _linear(rng, 5, 1))
    x = torch.from_numpy(rng.standard_normal((3, 5)))
    ref = copy.deepcopy(model)  # deepcopy keeps the sharing
    ref(x).sum().backward()
    m = copy.deepcopy(model)
    torch_backward(m, x, method="sklansky")
    assert len(list(m.parameters())) == 4
    assert_grads_close(m.parameters(), [p.grad for p in ref.parameters()], 1e-10)


def test_softplus_above_threshold_is_documented_difference():
    # torch's Softplus is the identity above 20; chainprod's differs there by <= exp(-20)
    rng = np.random.default_rng(9)
    first = _linear(rng, 3, 4)
    with torch.no_grad():
        first.bias.copy_(torch.tensor([25.0, 21.0, 0.5, -3.0], dtype=torch.float64))
    model = nn.Sequential(first, nn.Softplus(), _linear(rng, 4, 1))
    x = torch.from_numpy(0.1 * rng.standard_normal((6, 3)))
    assert (first(x)[:, :2] > 20).all()
    ref = copy.deepcopy(model)
    value = ref(x).sum()
    value.backward()
    m = copy.deepcopy(model)
    got = torch_backward(m, x, method="sklansky")
    assert abs(got - value.item()) <= 6 * 4 * np.exp(-20) * 10
    assert_grads_close(m.parameters(), [p.grad for p in ref.parameters()], 1e-8)


# -- accumulation, like autograd --------------------------------------------------
def test_twice_accumulates_to_double():
    model, x, y, _, want = reference(CASES[2], torch.float64, "mse")
    m = copy.deepcopy(model)
    torch_backward(m, x, y, loss="mse", method="sklansky")
    torch_backward(m, x, y, loss="mse", method="sklansky")
    assert_grads_close(m.parameters(), [2 * w for w in want], 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
def test_existing_grad_is_added_as_autograd_does(dtype):
    model, x, y, _, _ = reference(CASES[2], dtype, "mse")
    ref, m = copy.deepcopy(model), copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    for i, (pr, pm) in enumerate(zip(ref.parameters(), m.parameters())):
        if i % 2 == 0:  # some parameters start with a gradient, the others with None
            pr.grad = torch.randn(pr.shape, generator=gen, dtype=dtype)
            pm.grad = pr.grad.clone()
    held = [p.grad for p in m.parameters()]
    torch.nn.functional.mse_loss(ref(x), y).backward()
    torch_backward(m, x, y, loss="mse", method="brent_kung")
    assert_grads_close(m.parameters(), [p.grad for p in ref.parameters()], RTOL[dtype])
    for h, p in zip(held, m.parameters()):
        if h is not None:
            assert h is p.grad  # added in place: references to .grad see the update


def test_sgd_training_loop_matches_pure_torch():
    rng = np.random.default_rng(11)
    model = nn.Sequential(_linear(rng, 6, 16), nn.Tanh(), _linear(rng, 16, 16), nn.Tanh(),
                          _linear(rng, 16, 16), nn.Tanh(), _linear(rng, 16, 2))
    X = torch.from_numpy(rng.standard_normal((50, 8, 6)))
    Y = torch.from_numpy(rng.standard_normal((50, 8, 2)))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a = torch.optim.SGD(a.parameters(), lr=1e-2)
    opt_b = torch.optim.SGD(b.parameters(), lr=1e-2)
    for step in range(50):
        opt_a.zero_grad()
        loss_a = torch.nn.functional.mse_loss(a(X[step]), Y[step])
        loss_a.backward()
        opt_a.step()
        opt_b.zero_grad()
        loss_b = torch_backward(b, X[step], Y[step], loss="mse", method="sklansky")
        opt_b.step()
        assert loss_b == pytest.approx(loss_a.item(), rel=1e-10)
    moved = 0.0
    for p0, pa, pb in zip(model.parameters(), a.parameters(), b.parameters()):
        moved = max(moved, (pa - p0).abs().max().item())
        assert ((pa - pb).norm() <= 1e-10 * pa.norm()).item()
    assert moved > 1e-3  # the loop did train


# -- the conversion itself -------------------------------------------------------------
def test_from_torch_structure_and_forward():
    model = CASES[2].model  # handmade
    chain = from_torch(model)
    kinds = [(type(ly).__name__, ly.activation) for ly in chain]
    assert kinds == [("Diagonal", "tanh"), ("Dense", "softplus"), ("Diagonal", "sigmoid"), ("Dense", "tanh"),
                     ("Diagonal", "tanh"), ("Dense", "relu"), ("Diagonal", "sigmoid"), ("Dense", "softplus")]
    assert not np.any(chain[3].params[1])  # Linear(bias=False): zero bias
    x = CASES[2].x
    np.testing.assert_allclose(chain.forward(x), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-13)
    assert from_torch(copy.deepcopy(model).float()).dtype == np.float32


def test_parameters_are_copied_and_nothing_but_grad_is_modified():
    model, x, y, _, _ = reference(CASES[-3], torch.float64, "mse")
    m = copy.deepcopy(model)
    params = [p.detach().clone() for p in m.parameters()]
    x0, y0 = x.clone(), y.clone()
    chain = from_torch(m)
    first = next(mod for mod in m.modules() if isinstance(mod, nn.Linear))
    W0 = chain[[type(ly).__name__ for ly in chain].index("Dense")].params[0]
    assert not W0.flags.writeable
    assert not np.shares_memory(W0, first.weight.detach().numpy())
    with torch.no_grad():
        first.weight.add_(1.0)  # a later optimizer step does not reach the chain
    np.testing.assert_array_equal(W0, params[0].numpy())
    with torch.no_grad():
        first.weight.copy_(params[0])
    torch_backward(m, x, y, loss="mse", method="sklansky")
    torch_backward(m, x.numpy(), y.numpy(), loss="mse", method="backprop")
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params))
    assert torch.equal(x, x0) and torch.equal(y, y0) and x.grad is None


# -- refusals: named, positioned, and nothing written -------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1, dtype=torch.float64)

    def forward(self, x):
        return self.lin(x)


class MySequential(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def _f64(*mods):
    return nn.Sequential(*mods).double()


def _frozen_bias():
    m = _f64(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    m[2].bias.requires_grad_(False)
    return m


def _mixed():
    m = _f64(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    m[2].float()
    return m


def _none_entry():
    m = _f64(nn.Linear(4, 3), nn.Tanh())
    m.add_module("2", None)
    return m


def _overflow():
    m = _f64(*[mod for _ in range(8) for mod in (nn.Linear(4, 4), nn.Identity())], nn.Linear(4, 1))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1e40)
    return m


X4 = np.random.default_rng(0).standard_normal((3, 4))
MLP = lambda: _f64(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))  # noqa: E731

# (id, model factory, x, kwargs, exception, message pattern)
REFUSALS = [
    ("conv1d", lambda: _f64(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Conv1d(1, 1, 1)), X4, {},
     UnsupportedModuleError, r"module 3 \(Conv1d\) is not supported"),
    ("dropout-training", lambda: _f64(nn.Linear(4, 3), nn.Sequential(nn.Tanh(), nn.Linear(3, 3), nn.Dropout(0.5)),
                                      nn.Linear(3, 1)), X4, {},
     UnsupportedModuleError, r"module 1\.2 \(Dropout\) is in training mode"),
    ("batchnorm", lambda: _f64(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)), X4, {},
     UnsupportedModuleError, r"module 1 \(BatchNorm1d\)"),
    ("gelu-named", lambda: nn.Sequential(OrderedDict(fc=nn.Linear(4, 3), act=nn.GELU(),
                                                     out=nn.Linear(3, 1))).double(), X4, {},
     UnsupportedModuleError, r"module 1 \(GELU\) named 'act'"),
    ("softplus-beta", lambda: _f64(nn.Linear(4, 3), nn.Softplus(beta=2), nn.Linear(3, 1)), X4, {},
     UnsupportedModuleError, r"module 1 \(Softplus\) has beta=2"),
    ("softplus-threshold", lambda: _f64(nn.Linear(4, 3), nn.Softplus(threshold=10), nn.Linear(3, 1)), X4, {},
     UnsupportedModuleError, r"module 1 \(Softplus\).*threshold=10"),
    ("not-sequential", Net, X4, {}, UnsupportedModuleError, r"the model is a Net.*nn\.Sequential"),
    ("sequential-subclass", lambda: MySequential(nn.Linear(4, 1)).double(), X4, {},
     UnsupportedModuleError, r"subclass with its own forward"),
    ("bare-linear", lambda: nn.Linear(4, 1).double(), X4, {}, UnsupportedModuleError, r"the model is a Linear"),
    ("not-a-module", lambda: [nn.Linear(4, 1)], X4, {}, TypeError, r"nn\.Sequential, got list"),
    ("empty", nn.Sequential, X4, {}, UnsupportedModuleError, r"empty"),
    ("empty-nested", lambda: nn.Sequential(nn.Sequential(), nn.Identity()), X4, {},
     UnsupportedModuleError, r"empty"),
    ("none-entry", _none_entry, X4, {}, UnsupportedModuleError, r"module 2 is None"),
    ("no-linear", lambda: nn.Sequential(nn.Tanh(), nn.ReLU()), X4, {}, UnsupportedModuleError, r"no nn\.Linear"),
    # A CUDA device is not available here; meta parameters take the same "not on the CPU" check.
    ("device", lambda: nn.Sequential(nn.Linear(4, 3, device="meta"), nn.Linear(3, 1, device="meta")), X4, {},
     UnsupportedModuleError, r"module 0 \(Linear\): parameter 'weight' is on meta.*CPU"),
    ("requires-grad-false", _frozen_bias, X4, {},
     UnsupportedModuleError, r"module 2 \(Linear\): parameter 'bias' has requires_grad=False"),
    ("mixed-dtypes", _mixed, X4, {}, UnsupportedModuleError,
     r"module 2 \(Linear\): parameter 'weight' is torch\.float32 but earlier parameters are torch\.float64"),
    ("float16", lambda: nn.Sequential(nn.Linear(4, 1)).half(), X4, {},
     UnsupportedModuleError, r"module 0 \(Linear\): parameter 'weight' is torch\.float16"),
    ("widths", lambda: _f64(nn.Linear(4, 3), nn.Tanh(), nn.Sequential(nn.Linear(5, 1))), X4, {},
     UnsupportedModuleError, r"module 2\.0 \(Linear\) expects in_features=5 .* width 3"),
    ("x-width", MLP, np.ones((3, 5)), {}, ValueError, r"x has shape \(3, 5\).*width 4"),
    ("x-dtype", MLP, X4.astype(np.float32), {}, TypeError, r"x is float32 but the model's parameters are "),
    ("x-int", MLP, torch.ones((3, 4), dtype=torch.int64), {}, TypeError, r"x is torch\.int64"),
    ("x-device", MLP, torch.ones((3, 4), dtype=torch.float64, device="meta"), {}, ValueError, r"x is on meta"),
    ("x-requires-grad", MLP, torch.ones((3, 4), dtype=torch.float64, requires_grad=True), {},
     ValueError, r"x requires a gradient"),
    ("x-nan", MLP, np.full((3, 4), np.nan), {}, ValueError, r"NaN"),
    ("y-shape", MLP, X4, {"y": np.zeros(3), "loss": "mse"}, ValueError, r"y has shape \(3,\).*\(3, 1\)"),
    ("y-missing", MLP, X4, {"loss": "mse"}, ValueError, r"needs targets"),
    ("sum-with-y", MLP, X4, {"y": np.zeros((3, 1))}, ValueError, r"takes no targets"),
    ("loss", MLP, X4, {"loss": "l1"}, ValueError, r"unknown loss 'l1'"),
    ("sum-vector-output", lambda: _f64(nn.Linear(4, 2)), X4, {}, ValueError, r"output width 1"),
    ("method", MLP, X4, {"method": "nope"}, ValueError, r"unknown schedule method 'nope'"),
    ("backend", MLP, X4, {"backend": "nope"}, ValueError, r"unknown backend 'nope'"),
    ("overflow", _overflow, X4, {"method": "sklansky"}, cp.errors.NonFiniteError, r"overflow"),
]


@pytest.mark.parametrize("make, x, kwargs, exc, pattern", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_problem_and_write_nothing(make, x, kwargs, exc, pattern):
    model = make()
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    before = []
    for i, p in enumerate(params):
        if i == 0 and p.device.type == "cpu":
            p.grad = torch.ones_like(p)  # one gradient present, the rest None
        before.append(None if p.grad is None else p.grad.clone())
    with pytest.raises(exc, match=pattern):
        torch_backward(model, x, **kwargs)
    for p, b in zip(params, before):
        assert (p.grad is None) if b is None else torch.equal(p.grad, b)
    if isinstance(x, torch.Tensor):
        assert x.grad is None


@pytest.mark.parametrize("make, pattern", [
    (lambda: _f64(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Conv1d(1, 1, 1)), r"module 3 \(Conv1d\)"),
    (lambda: nn.Sequential(), r"empty"),
    (_frozen_bias, r"module 2 \(Linear\)"),
], ids=["conv1d", "empty", "frozen"])
def test_from_torch_refuses_too(make, pattern):
    with pytest.raises(UnsupportedModuleError, match=pattern) as info:
        from_torch(make())
    assert isinstance(info.value, ValueError)


# -- the kept conversion: converted once, current values every call ----------------------
def _mlp(seed, widths, dtype=torch.float64, act=nn.Tanh):
    rng = np.random.default_rng(seed)
    mods = []
    for i in range(len(widths) - 1):
        mods.append(_linear(rng, widths[i], widths[i + 1], gain=1.2))
        if i < len(widths) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(dtype)


def _autograd(model, x, y):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(ref(x), y).backward()
    return [p.grad for p in ref.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_training_steps_see_the_optimizers_in_place_updates(opt, dtype, kernels):
    # optimizers update parameters in place: the kept conversion must read them afresh every call
    model = _mlp(21, [5, 9, 9, 9, 2], dtype)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5), "adam": lambda ps: torch.optim.Adam(ps, 1e-2)}
    opt_a, opt_b = make[opt](a.parameters()), make[opt](b.parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(7, 5, generator=gen, dtype=dtype), torch.randn(7, 2, generator=gen, dtype=dtype)
        opt_a.zero_grad()
        loss_a = torch.nn.functional.mse_loss(a(x), y)
        loss_a.backward()
        opt_b.zero_grad()
        loss_b = torch_backward(b, x, y, loss="mse", method="backprop", kernels=kernels)
        assert loss_b == pytest.approx(loss_a.item(), rel=RTOL[dtype])
        assert_grads_close(b.parameters(), [p.grad for p in a.parameters()], RTOL[dtype], f"step {step}")
        opt_a.step()
        opt_b.step()
    assert b[0].weight.grad.dtype == dtype
    assert cp.torch._kept(b).buffer.dtype == np.dtype(str(dtype)[6:])  # float32 stays float32


def _replace_linear(m):
    m[2] = _linear(np.random.default_rng(5), 6, 6, gain=1.2)


def _replace_weight(m):
    m[0].weight = nn.Parameter(m[0].weight.detach() * 1.5)


def _replace_data(m):
    m[0].weight.data = m[0].weight.detach() * 1.5  # the same Parameter object, new memory


def _transpose_square(m):
    m[2].weight.data = m[2].weight.data.t()  # same memory, other strides: the values read differently


def _copy_in_place(m):
    with torch.no_grad():
        m[2].bias.copy_(torch.linspace(-1, 1, 6, dtype=torch.float64))


def _swap_activation(m):
    m[1] = nn.ReLU()


def _append(m):
    m.append(nn.Sigmoid())


def _nested_change(m):
    m[3] = nn.Sequential(nn.Tanh(), nn.Identity())


def _remove_bias(m):
    m[4].bias = None


def _non_contiguous_weight(m):
    m[2].weight = nn.Parameter(m[2].weight.detach().t().contiguous().t())


@pytest.mark.parametrize("change", [_replace_linear, _replace_weight, _replace_data, _transpose_square, _copy_in_place,
                                    _swap_activation, _append, _nested_change, _remove_bias, _non_contiguous_weight])
def test_a_changed_model_is_converted_again(change):
    model = nn.Sequential(_linear(np.random.default_rng(3), 4, 6), nn.Tanh(), _linear(np.random.default_rng(4), 6, 6),
                          nn.Sequential(nn.Tanh()), _linear(np.random.default_rng(6), 6, 1))
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((5, 4)))
    y = torch.from_numpy(np.random.default_rng(8).standard_normal((5, 1)))
    torch_backward(model, x, y, loss="mse")  # converted and kept
    change(model)
    want = _autograd(model, x, y)
    model.zero_grad()
    torch_backward(model, x, y, loss="mse", method="sklansky")
    assert_grads_close(model.parameters(), want, 1e-10, change.__name__)
    model.zero_grad()
    torch_backward(model, x, y, loss="mse", method="backprop")  # and kept again
    assert_grads_close(model.parameters(), want, 1e-10, change.__name__)


@pytest.mark.parametrize("change, pattern", [
    (lambda m: m[0].weight.requires_grad_(False), r"module 0 \(Linear\): parameter 'weight' has requires_grad=False"),
    (lambda m: m.train().append(nn.Dropout(0.5)), r"module 3 \(Dropout\) is in training mode"),
    (lambda m: setattr(m[1], "beta", 2.0), r"module 1 \(Softplus\) has beta=2"),
    (lambda m: m.insert(1, nn.GELU()), r"module 1 \(GELU\) is not supported"),
    (lambda m: m[2].float(), r"mixed dtypes"),
], ids=["frozen", "dropout-train", "softplus-beta", "gelu", "mixed-dtype"])
def test_a_change_to_something_unsupported_is_refused_after_the_model_was_kept(change, pattern):
    model = _f64(nn.Linear(4, 3), nn.Softplus(), nn.Linear(3, 1)).eval()
    torch_backward(model, X4)
    change(model)
    before = [p.grad.clone() for p in model.parameters()]  # model.float() converts them too
    with pytest.raises(UnsupportedModuleError, match=pattern):
        torch_backward(model, X4)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_dropout_toggling_between_train_and_eval_is_seen():
    model = _f64(nn.Linear(4, 3), nn.Dropout(0.3), nn.Tanh(), nn.Linear(3, 1)).eval()
    torch_backward(model, X4)
    model.train()
    with pytest.raises(UnsupportedModuleError, match="training mode"):
        torch_backward(model, X4)
    model.eval()
    torch_backward(model, X4)


def test_accumulation_and_grad_identity_across_calls_and_steps():
    model = _mlp(31, [3, 8, 8, 1])
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 3)))
    y = torch.zeros(4, 1, dtype=torch.float64)
    one = _autograd(model, x, y)
    torch_backward(model, x, y, loss="mse")
    held = [p.grad for p in model.parameters()]
    torch_backward(model, x, y, loss="mse")  # accumulates in place, like autograd
    assert all(h is p.grad for h, p in zip(held, model.parameters()))
    assert_grads_close(model.parameters(), [2 * g for g in one], 1e-10)
    model.zero_grad(set_to_none=False)  # zeroed in place: the next call adds to the same tensors
    torch_backward(model, x, y, loss="mse")
    assert all(h is p.grad for h, p in zip(held, model.parameters()))
    assert_grads_close(model.parameters(), one, 1e-10)
    # gradients of different parameters never share memory a write could reach
    model[0].weight.grad.add_(1.0)
    assert_grads_close(list(model.parameters())[1:], one[1:], 1e-10)


def test_the_kept_conversion_is_weak_and_cleared_with_the_caches():
    import gc
    import weakref

    model = _mlp(41, [3, 4, 1])
    torch_backward(model, torch.ones(2, 3, dtype=torch.float64))
    kept = cp.torch._kept
    assert kept(model) is kept(model)
    cp.clear_caches()
    assert len(cp.torch._KEPT) == 0
    torch_backward(model, torch.ones(2, 3, dtype=torch.float64))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and len(cp.torch._KEPT) == 0


def test_a_buffer_in_use_is_not_shared():
    model = _mlp(51, [3, 4, 1])
    torch_backward(model, torch.ones(2, 3, dtype=torch.float64))
    kept = cp.torch._kept(model)
    a, release_a = kept.packed()
    b, release_b = kept.packed()  # as another thread would find it
    assert not np.shares_memory(a.theta, b.theta) and np.array_equal(a.theta, b.theta)
    release_b()
    release_a()
    c, release_c = kept.packed()
    assert c is a and not c.theta.flags.writeable
    release_c()
