"""The short path of ``grad`` (:mod:`chainprod.quick`) against the general path, and where it steps aside.

The general path is the one every other test checks against references;
``return_trace=True`` forces it (the short path serves no trace). The two
run the same compiled loops, so their gradients must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import NonFiniteError
from chainprod.quick import try_grad

pytest.importorskip("numba")


def chains():
    yield "diag-tanh", cp.diagonal_chain(64, 8, activation="tanh", seed=1)
    yield "mlp-relu", cp.mlp([5, 7, 7, 7, 1], activation="relu", seed=2)
    yield "mlp-f32", cp.mlp([4, 6, 6, 1], activation="sigmoid", seed=3, dtype=np.float32)
    mixed = [cp.Dense(np.eye(3) * 0.5, np.zeros(3), act) for act in ("tanh", "softplus", "sigmoid", "relu")]
    yield "mixed", cp.Chain([*mixed, cp.Dense(np.ones((1, 3)) * 0.3, np.zeros(1), "identity")])


@pytest.mark.parametrize("name,chain", list(chains()), ids=[n for n, _ in chains()])
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("loss", ["sum", "mse"])
def test_equals_the_general_path_bit_for_bit(name, chain, N, loss):
    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, chain.d_in)).astype(chain.dtype)
    y = None if loss == "sum" else rng.standard_normal((N, chain.d_out)).astype(chain.dtype)
    before = [a.copy() for a in (x, y) if a is not None]
    served = try_grad(chain, x, "backprop", True, y)
    assert served is not None, "the training loop's call must take the short path"
    value, grads = served
    want_value, want, _ = cp.value_and_grad(chain, x, y, method="backprop", return_trace=True)
    assert value == want_value
    assert np.array_equal(grads.flat, want.flat)
    # and through the public entry points, which take the short path for this call
    assert np.array_equal(cp.grad(chain, x, y, loss=loss, method="backprop").flat, want.flat)
    v2, g2 = cp.value_and_grad(chain, x, y, method="backprop")
    assert v2 == want_value and np.array_equal(g2.flat, want.flat)
    for a, b in zip([a for a in (x, y) if a is not None], before):  # the caller's arrays, as they were
        assert np.array_equal(a, b) and a.flags.writeable


def test_mse_on_a_wide_output_is_served():
    chain = cp.mlp([3, 5, 4], seed=7)
    x, y = np.ones((2, 3)), np.zeros((2, 4))
    served = try_grad(chain, x, "backprop", True, y)
    want_value, want, _ = cp.value_and_grad(chain, x, y, method="backprop", return_trace=True)
    assert served is not None and served[0] == want_value and np.array_equal(served[1].flat, want.flat)


@pytest.mark.parametrize("case", ["1-D y", "float32 y", "wrong shape", "NaN in y"])
def test_targets_it_does_not_serve_go_to_the_general_path(case):
    chain = cp.mlp([3, 4, 2], seed=5)
    x = np.ones((3, 3))
    y = {"1-D y": np.zeros(2 * 3), "float32 y": np.zeros((3, 2), np.float32), "wrong shape": np.zeros((2, 3)),
         "NaN in y": np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0]])}[case]
    assert try_grad(chain, x, "backprop", False, y) is None


def test_auto_is_served_only_once_its_choice_is_known():
    cp.clear_caches()
    chain = cp.mlp([3, 4, 4, 1], seed=4)
    x = np.ones((2, 3))
    assert try_grad(chain, x, "auto", False) is None  # nothing measured yet: the general path decides
    want = cp.grad(chain, x, method="auto", return_trace=True)[0]
    served = try_grad(chain, x, "auto", False)  # a dense chain on one thread keeps backprop
    assert served is not None and np.array_equal(served[1].flat, want.flat)


@pytest.mark.parametrize("case", ["1-D x", "strided x", "float32 x", "wrong width", "NaN in x", "wide output",
                                  "a scan", "a list"])
def test_steps_aside_for_what_it_does_not_serve(case):
    chain = cp.mlp([3, 4, 1], seed=5)
    x = np.random.default_rng(0).standard_normal((4, 3))
    method = "backprop"
    if case == "1-D x":
        x = x[0]
    elif case == "strided x":
        x = np.random.default_rng(0).standard_normal((4, 6))[:, ::2]
    elif case == "float32 x":
        x = x.astype(np.float32)
    elif case == "wrong width":
        x = np.ones((4, 5))
    elif case == "NaN in x":
        x[1, 2] = np.nan
    elif case == "wide output":
        chain = cp.mlp([3, 4, 2], seed=5)
    elif case == "a scan":
        method = "sklansky"
    elif case == "a list":
        x = x.tolist()
    assert try_grad(chain, x, method, False) is None


def test_bad_input_still_gets_the_general_paths_error():
    chain = cp.mlp([3, 4, 1], seed=5)
    x = np.ones((2, 3))
    x[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"x: contains NaN or infinity \(first at index \(0, 1\)\)"):
        cp.grad(chain, x, method="backprop")


def test_an_overflow_on_the_way_is_reported_by_the_general_path():
    big = cp.Chain([cp.Dense(np.full((2, 2), 1e200), np.zeros(2), "identity"),
                    cp.Dense(np.full((1, 2), 1e200), np.zeros(1), "identity")])
    x = np.ones((1, 2))
    assert try_grad(big, x, "backprop", False) is None
    with pytest.raises(NonFiniteError, match="layer"):
        cp.grad(big, x, method="backprop")


def test_numpy_kernels_from_the_environment_are_respected(monkeypatch):
    monkeypatch.setenv("CHAINPROD_KERNELS", "numpy")
    chain = cp.mlp([3, 4, 1], seed=6)
    assert try_grad(chain, np.ones((2, 3)), "backprop", False) is None
    g = cp.grad(chain, np.ones((2, 3)), method="backprop")
    assert isinstance(g, list)  # the numpy reference's result type: the general path ran on it


def test_auto_on_threads_is_served_per_worker_count_once_known():
    from chainprod.quick import serve

    cp.clear_caches()
    chain = cp.mlp([3, 4, 4, 1], seed=4)
    x = np.ones((2, 3))
    args = (None, None, "auto", "threads", 2, False, None, None, None, False, "sequential", None, False)
    assert serve(chain, x, *args) is None  # auto has not chosen for 2 workers yet
    want = cp.grad(chain, x, method="auto", backend="threads", workers=2, return_trace=True)[0]
    served = serve(chain, x, *args)
    assert served is not None and np.array_equal(served[1].flat, want.flat)
    # the choice for 2 workers says nothing about 1
    assert serve(chain, x, None, None, "auto", "threads", 1, False, None, None, None, False, "sequential",
                 None, False) is None


@pytest.mark.parametrize("backend", ["ray", "dask"])
def test_auto_on_a_cluster_is_served_where_the_cost_model_keeps_it_local(backend):
    from chainprod.cost import remote_auto
    from chainprod.quick import chain_profile, serve

    chain = cp.diagonal_chain(32, 4, seed=6)
    x = np.random.default_rng(1).standard_normal((1, 4))
    structure, width = chain_profile(chain)
    assert remote_auto(structure, len(chain), width, backend=backend, workers=2, batch=1).schedule is None
    served = serve(chain, x, None, None, "auto", backend, 2, False, None, None, None, False, "sequential", None, True)
    want = cp.value_and_grad(chain, x, method="backprop", return_trace=True)
    assert served is not None and served[0] == want[0] and np.array_equal(served[1].flat, want[1].flat)
    # without a worker count the general path decides (it may ask the cluster for one)
    assert serve(chain, x, None, None, "auto", backend, None, False, None, None, None, False, "sequential",
                 None, True) is None


def test_a_missing_engine_is_still_an_error_on_the_short_path():
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"  # import ray fails, as where ray is not installed
            "import numpy as np, chainprod as cp\n"
            "ch = cp.diagonal_chain(32, 4, seed=6)\n"
            "try:\n"
            "    cp.grad(ch, np.ones((1, 4)), method='auto', backend='ray', workers=2)\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'chainprod[ray]'" in out.stdout, out.stdout + out.stderr


# -- the short path of backward ---------------------------------------------------------------
@pytest.mark.parametrize("name,chain", list(chains()), ids=[n for n, _ in chains()])
@pytest.mark.parametrize("N", [1, 5])
def test_backward_equals_the_general_path_bit_for_bit(name, chain, N):
    from chainprod.quick import try_backward

    rng = np.random.default_rng(N)
    x = rng.standard_normal((N, chain.d_in)).astype(chain.dtype)
    tape = cp.forward(chain, x)
    cotangent = rng.standard_normal((N, chain.d_out)).astype(chain.dtype)
    before = cotangent.copy()
    served = try_backward(tape, cotangent, "backprop")
    assert served is not None, "a compiled tape's backprop must take the short path"
    want = cp.backward(tape, cotangent, method="backprop", trace=cp.Trace())  # a trace: the general path
    assert np.array_equal(served.flat, want.flat)
    assert np.array_equal(cp.backward(tape, cotangent, method="backprop").flat, want.flat)
    assert np.array_equal(cotangent, before) and cotangent.flags.writeable  # the caller's, as it was
    assert tape.flat.flags.writeable and x.flags.writeable  # read-only views of its arrays, not the arrays


@pytest.mark.parametrize("case", ["numpy tape", "float32 cotangent", "wrong shape", "strided", "a list",
                                  "a scan", "auto unknown"])
def test_backward_steps_aside_for_what_it_does_not_serve(case):
    from chainprod.quick import try_backward

    cp.clear_caches()
    chain = cp.mlp([3, 4, 4, 2], seed=5)
    x = np.ones((4, 3))
    tape = cp.forward(chain, x, kernels="numpy" if case == "numpy tape" else None)
    cotangent = np.ones((4, 2))
    method = {"a scan": "sklansky", "auto unknown": "auto"}.get(case, "backprop")
    if case == "float32 cotangent":
        cotangent = cotangent.astype(np.float32)
    elif case == "wrong shape":
        cotangent = np.ones((4, 3))
    elif case == "strided":
        cotangent = np.ones((4, 4))[:, ::2]
    elif case == "a list":
        cotangent = cotangent.tolist()
    assert try_backward(tape, cotangent, method) is None


def test_backward_with_bad_input_or_an_overflow_gets_the_general_paths_error():
    chain = cp.mlp([3, 4, 2], seed=5)
    tape = cp.forward(chain, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"cotangent must have shape \(N, d_L\) = \(2, 2\)"):
        cp.backward(tape, np.ones((2, 3)), method="backprop")
    # finite forward (1e150 * 1e-200, then * 1e200), but dW_0 = (1e200 * cotangent) x^T = 1e350 overflows
    big = cp.Chain([cp.Dense(np.eye(2) * 1e-200, np.zeros(2), "identity"),
                    cp.Dense(np.full((1, 2), 1e200), np.zeros(1), "identity")])
    tape = cp.forward(big, np.full((1, 2), 1e150))
    cotangent = np.ones((1, 1))
    from chainprod.quick import try_backward

    assert try_backward(tape, cotangent, "backprop") is None
    with pytest.raises(NonFiniteError, match="layer"):
        cp.backward(tape, cotangent, method="backprop")


def test_backward_auto_is_served_once_its_choice_is_known():
    from chainprod.quick import try_backward

    cp.clear_caches()
    chain = cp.mlp([3, 4, 4, 1], seed=4)
    tape = cp.forward(chain, np.ones((2, 3)))
    cotangent = np.ones((2, 1))
    assert try_backward(tape, cotangent, "auto") is None
    want = cp.backward(tape, cotangent, method="auto")  # the general path measures and keeps the choice
    served = try_backward(tape, cotangent, "auto")
    assert served is not None and np.array_equal(served.flat, want.flat)


def test_the_machines_cpu_count_is_asked_once_until_the_caches_are_cleared(monkeypatch):
    """``os.cpu_count`` reads a file on every call; ``auto`` on threads without ``workers`` asks for it per call."""
    import os

    asked = []
    real = os.cpu_count
    monkeypatch.setattr(os, "cpu_count", lambda: asked.append(1) or real())
    cp.clear_caches()
    try:
        chain = cp.diagonal_chain(16, 4, seed=0)
        tape = cp.forward(chain, np.ones((1, 4)))
        want = cp.backward(tape, np.ones((1, 1)), method="backprop")
        for _ in range(5):
            got = cp.backward(tape, np.ones((1, 1)), method="auto", backend="threads")
            for gs, ws in zip(got, want):
                for g, w in zip(gs, ws):
                    np.testing.assert_allclose(g, w, rtol=1e-12)
        assert len(asked) == 1
        cp.clear_caches()
        cp.backward(tape, np.ones((1, 1)), method="auto", backend="threads")
        assert len(asked) == 2
    finally:
        monkeypatch.undo()
        cp.clear_caches()


def test_the_local_method_is_kept_on_the_chain_until_the_caches_are_cleared(monkeypatch):
    from chainprod import quick

    chain = cp.diagonal_chain(16, 4, seed=0)
    asked = []
    real = quick.local_method
    monkeypatch.setattr(quick, "local_method", lambda *a: asked.append(a) or real(*a))
    cp.clear_caches()
    try:
        first = quick.kept_local_method(chain, 1, "auto", "ray", 2)
        assert first == real(chain, 1, "auto", "ray", 2) == ("backprop", 1)  # a short chain stays here
        assert quick.kept_local_method(chain, 1, "auto", "ray", 2) == first and len(asked) == 1
        assert quick.kept_local_method(chain, 3, "auto", "ray", 2) == first and len(asked) == 2  # its own batch
        assert quick.kept_local_method(chain, 1, "sklansky", "ray", 2) is None and len(asked) == 3  # None is kept
        assert quick.kept_local_method(chain, 1, "sklansky", "ray", 2) is None and len(asked) == 3
        cp.clear_caches()
        assert quick.kept_local_method(chain, 1, "auto", "ray", 2) == first and len(asked) == 4
        # auto on this machine: kept only once its choice is known, then as the backprop it chose
        assert quick.kept_local_method(chain, 1, "auto", "vectorized", None) == ("auto", 1)
        assert quick.kept_local_method(chain, 1, "auto", "vectorized", None) == ("auto", 1) and len(asked) == 6
        cp.grad(chain, np.ones((1, 4)), method="auto")  # auto chooses (backprop, on a 16-layer chain)
        assert quick.kept_local_method(chain, 1, "auto", "vectorized", None) == ("backprop", 1)
        n = len(asked)
        assert quick.kept_local_method(chain, 1, "auto", "vectorized", None) == ("backprop", 1) and len(asked) == n
    finally:
        monkeypatch.undo()
        cp.clear_caches()


@pytest.mark.parametrize("shape", [(0, 3), (5,), (1000, 1, 8), (3, 1024), (7, 300), (2049,)])  # pieces, tails
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_of_squares_in_pieces_equals_a_float64_sum(shape, dtype):
    from chainprod.quick import mse_terms, sum_of_squares

    a = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    want = float(np.sum(a.astype(np.float64) ** 2))
    got = sum_of_squares(a)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13, abs=0)
    if a.ndim == 2:  # a strided view: read through a copy, same sum
        assert sum_of_squares(a.T) == pytest.approx(want, rel=1e-6 if dtype == np.float32 else 1e-13, abs=0)
    if a.size:
        out, y = a + 1, np.ones_like(a)
        d = (out - y).astype(np.float64)  # the difference as the dtype rounds it
        value, cot = mse_terms(out, y)
        assert value == pytest.approx(np.sum(d * d) / a.size, rel=1e-6 if dtype == np.float32 else 1e-13, abs=0)
        np.testing.assert_allclose(cot, 2 * d / a.size, rtol=1e-6 if dtype == np.float32 else 1e-13)
