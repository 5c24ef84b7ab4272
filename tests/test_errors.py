"""Bad input gets a clear ValueError / TypeError that says what and where."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import LOCAL_BACKEND_IDS, LOCAL_BACKENDS

import chainprod as cp
from chainprod.executors import EXECUTORS, register_executor
from chainprod.testing import random_mats

X2 = np.ones((2, 3))


@pytest.fixture(autouse=True, params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Every error test runs on the compiled kernels and on the numpy reference."""
    monkeypatch.setenv("CHAINPROD_KERNELS", request.param)
    return request.param


@pytest.fixture
def chain():
    return cp.mlp([3, 4, 4, 1], seed=0)


def dense(d_out, d_in, dtype=np.float64, act="tanh"):
    return cp.Dense(np.full((d_out, d_in), 0.1, dtype=dtype), np.zeros(d_out, dtype=dtype), act)


# -- chains ----------------------------------------------------------------------
def test_widths_do_not_chain_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 2\b.*\b2\b.*\b3\b"):
        cp.Chain([dense(4, 3), dense(2, 4), cp.Diagonal(np.ones(3), np.zeros(3))])
    with pytest.raises(ValueError, match=r"layer 1\b"):
        cp.Chain([dense(4, 3), dense(1, 5)])


def test_empty_chain_and_non_layers():
    with pytest.raises(ValueError, match="empty|at least one"):
        cp.Chain([])
    with pytest.raises(TypeError, match="layer 1"):
        cp.Chain([dense(2, 2), "relu"])
    with pytest.raises(TypeError, match="Chain"):
        cp.grad([dense(1, 3)], X2)


def test_layer_shape_errors():
    with pytest.raises(ValueError, match="W"):
        cp.Dense(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(3,\).*2"):
        cp.Dense(np.ones((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="Diagonal"):
        cp.Diagonal(np.ones(3), np.zeros(2))
    with pytest.raises(ValueError, match="two widths"):
        cp.mlp([3])


@pytest.mark.parametrize("act", ["gelu", "Tanh", 3, ""])
def test_unknown_activation_lists_valid(act):
    with pytest.raises(ValueError) as e:
        cp.Dense(np.eye(2), np.zeros(2), act)
    msg = str(e.value)
    assert repr(act) in msg
    for name in ("tanh", "relu", "sigmoid", "softplus", "identity"):
        assert name in msg
    with pytest.raises(ValueError, match="activation"):
        cp.Diagonal(np.ones(2), np.zeros(2), act)
    with pytest.raises(ValueError, match="activation"):
        cp.mlp([3, 4, 1], activation=act)


def test_mlp_validates_activation_even_without_hidden_layers():
    with pytest.raises(ValueError, match="activation"):
        cp.mlp([3, 1], activation="swish")


# -- grad inputs -------------------------------------------------------------------
def test_grad_needs_scalar_output_without_targets():
    with pytest.raises(ValueError, match=r"width 1.*width 2|width 2"):
        cp.grad(cp.mlp([3, 4, 2]), X2)
    with pytest.raises(ValueError, match="y"):
        cp.grad(cp.mlp([3, 1]), X2, np.ones((2, 1)), loss="sum")


def test_wrong_x_width_and_rank(chain):
    with pytest.raises(ValueError, match=r"width 4.*expects 3"):
        cp.grad(chain, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"width 5"):
        chain.forward(np.ones(5))
    with pytest.raises(ValueError, match=r"\(2, 2, 3\)"):
        cp.grad(chain, np.ones((2, 2, 3)))
    with pytest.raises(ValueError):
        cp.grad(chain, 1.0)


def test_wrong_y_shape_and_dtype(chain):
    with pytest.raises(ValueError, match="y"):
        cp.grad(chain, X2, np.ones(3))
    with pytest.raises(TypeError, match="float32"):
        cp.grad(chain, X2, np.ones((2, 1), dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, bool, object, np.complex128, np.float16],
                         ids=["int64", "int32", "uint8", "bool", "object", "complex", "float16"])
def test_bad_dtypes_everywhere(dtype, chain):
    bad2 = np.ones((2, 2), dtype=dtype)
    bad1 = np.ones(2, dtype=dtype)
    with pytest.raises(TypeError, match="W"):
        cp.Dense(bad2, np.zeros(2))
    with pytest.raises(TypeError, match="b"):
        cp.Dense(np.eye(2), bad1)
    with pytest.raises(TypeError, match="a"):
        cp.Diagonal(bad1, np.zeros(2))
    with pytest.raises(TypeError, match="x"):
        cp.grad(chain, np.ones((2, 3), dtype=dtype))
    with pytest.raises(TypeError, match="y"):
        cp.grad(chain, X2, np.ones((2, 1), dtype=dtype))
    with pytest.raises(TypeError, match=r"mats\[1\]"):
        cp.suffix_products([np.eye(2), bad2])
    with pytest.raises(TypeError, match=r"mats\[0\]"):
        cp.suffix_products([cp.Diag(bad1), np.eye(2)])
    msg_kind = {np.int64: "integer", np.int32: "integer", np.uint8: "integer", bool: "bool", object: "object",
                np.complex128: "complex", np.float16: "float16"}[dtype]
    with pytest.raises(TypeError, match=msg_kind):
        cp.suffix_products([bad2])


def test_mixed_dtypes():
    with pytest.raises(TypeError, match=r"layer 0 is float32 but layer 1 is float64"):
        cp.Chain([dense(2, 2, np.float32), dense(1, 2, np.float64)])
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        cp.Dense(np.eye(2, dtype=np.float32), np.zeros(2))
    c32 = cp.mlp([3, 4, 1], dtype=np.float32)
    with pytest.raises(TypeError, match="float64.*float32"):
        cp.grad(c32, X2)
    with pytest.raises(TypeError, match=r"mats\[0\] is float32 but mats\[2\] is float64"):
        cp.suffix_products([np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.eye(2)])
    with pytest.raises(TypeError, match="dtype"):
        cp.suffix_products([cp.Diag(np.ones(2)), cp.Diag(np.ones(2, dtype=np.float32))])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs(bad, chain):
    W = np.eye(2)
    W[1, 0] = bad
    with pytest.raises(ValueError, match=r"W.*\(1, 0\)"):
        cp.Dense(W, np.zeros(2))
    with pytest.raises(ValueError, match="b"):
        cp.Diagonal(np.ones(2), np.array([0.0, bad]))
    x = np.ones((2, 3))
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x.*\(1, 2\)"):
        cp.grad(chain, x)
    with pytest.raises(ValueError, match="y"):
        cp.grad(chain, X2, np.array([[1.0], [bad]]))
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        cp.suffix_products([np.eye(2), W])
    with pytest.raises(ValueError, match=r"mats\[0\] \(Diag\)"):
        cp.suffix_products([cp.Diag(np.array([1.0, bad]))])
    with pytest.raises(ValueError):
        chain.sgd_step(cp.grad(chain, X2), bad)


def test_zero_size_dims(chain):
    with pytest.raises(ValueError, match="zero-size"):
        cp.Dense(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="zero-size"):
        cp.Diagonal(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="zero-size"):
        cp.grad(chain, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="zero-size"):
        cp.suffix_products([np.zeros((2, 0)), np.zeros((0, 2))])
    with pytest.raises(ValueError, match="zero-size"):
        cp.suffix_products([np.zeros((0, 2, 2))] * 2)
    with pytest.raises(ValueError):
        cp.mlp([3, 0, 1])


# -- mats --------------------------------------------------------------------------
def test_mats_errors():
    with pytest.raises(ValueError, match="empty"):
        cp.suffix_products([])
    with pytest.raises(TypeError, match="list"):
        cp.suffix_products({"a": np.eye(2)})
    with pytest.raises(TypeError):
        cp.suffix_products(3)
    with pytest.raises(ValueError, match=r"mats\[1\].*4x4.*3x2|mats\[1\]"):
        cp.suffix_products([np.ones((3, 2)), np.ones((4, 4))])
    with pytest.raises(ValueError, match=r"mats\[1\]"):
        cp.suffix_products([cp.Diag(np.ones(3)), cp.Diag(np.ones(2))])
    with pytest.raises(ValueError, match="batch"):
        cp.suffix_products([np.ones((2, 3, 3)), np.ones((3, 3, 3))])
    with pytest.raises(ValueError, match=r"mats\[0\]"):
        cp.suffix_products([np.ones(3)])
    with pytest.raises(TypeError, match=r"mats\[0\]"):
        cp.suffix_products([[[1.0, 2.0], [3.0]]])


# -- options -----------------------------------------------------------------------
def test_unknown_method_backend_loss(chain):
    with pytest.raises(ValueError, match=r"'nope'.*sklansky.*|'nope'.*brent_kung"):
        cp.grad(chain, X2, method="nope")
    with pytest.raises(ValueError) as e:
        cp.grad(chain, X2, backend="nope")
    for name in cp.valid_backends():
        assert name in str(e.value)
    with pytest.raises(ValueError, match=r"'nope'.*vectorized"):
        cp.suffix_products(random_mats(3), backend="nope")
    with pytest.raises(ValueError, match=r"'hinge'.*mse"):
        cp.grad(chain, X2, loss="hinge")
    with pytest.raises(ValueError, match="hinge"):
        cp.check_grad(chain, X2, loss="hinge")
    with pytest.raises(ValueError, match="tree"):
        cp.grad(chain, X2, method="tree")
    with pytest.raises(TypeError):
        cp.grad(chain, X2, method=None)
    with pytest.raises(ValueError, match="unknown backend"):
        cp.get_executor(123)


def test_unknown_backend_with_backprop(chain):
    with pytest.raises(ValueError, match="unknown backend"):
        cp.grad(chain, X2, method="backprop", backend="nope")


def test_unknown_method_and_backend_with_one_layer():
    one = cp.mlp([3, 1])
    with pytest.raises(ValueError, match="unknown schedule method"):
        cp.grad(one, X2, method="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        cp.grad(one, X2, method="sklansky", backend="nope")


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_one(workers, chain):
    with pytest.raises(ValueError, match="workers"):
        cp.grad(chain, X2, workers=workers)
    with pytest.raises(ValueError, match="workers"):
        cp.grad(chain, X2, method="backprop", workers=workers)
    with pytest.raises(ValueError, match="workers"):
        cp.suffix_products(random_mats(3), workers=workers)
    with pytest.raises(ValueError, match="workers"):
        cp.product(random_mats(3), workers=workers)
    with pytest.raises(ValueError, match="workers"):
        cp.schedule("chunked", 8, workers=workers)


@pytest.mark.parametrize("workers", [1.5, 2.0, "2", True, [2]])
def test_non_int_workers(workers, chain):
    with pytest.raises(TypeError, match="workers"):
        cp.grad(chain, X2, workers=workers, backend="threads")
    with pytest.raises(TypeError, match="workers"):
        cp.suffix_products(random_mats(3), workers=workers)
    with pytest.raises(TypeError, match="workers"):
        cp.schedule("sklansky", 8, workers=workers)


def test_chunked_outer_must_be_a_scan():
    with pytest.raises(ValueError, match="outer"):
        cp.schedule("chunked", 50, chunks=7, outer="tree")


def test_sgd_step_wrong_number_of_grads(chain):
    g = cp.grad(chain, X2)
    with pytest.raises(ValueError, match="3"):
        chain.sgd_step(g[:2], 0.1)


def test_sgd_step_checks_grad_shapes(chain):
    g = cp.grad(chain, X2)
    bad = list(g)
    bad[0] = (np.ones((1, 3)), g[0][1])
    with pytest.raises(ValueError, match="layer 0"):
        chain.sgd_step(bad, 0.1)


# -- overflow inside products --------------------------------------------------------
@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method", ["sequential", "independent", "hillis_steele", "sklansky", "brent_kung",
                                    "chunked"])
def test_overflow_in_suffix_products_names_the_range(method, backend, workers):
    # out[2] = 1e200 I is finite, out[1] = 1e400 I is not: the first bad suffix is mats[1..2]
    for mats in ([1e200 * np.eye(2)] * 3, [cp.Diag(np.full(2, 1e200))] * 3,
                 [np.stack([np.eye(2), 1e200 * np.eye(2)])] * 3):
        with pytest.raises(cp.NonFiniteError, match=r"mats\[1\.\.2\]") as e:
            cp.suffix_products(mats, method=method, backend=backend, workers=workers)
        assert e.value.layers == (1, 2)
    # longer: 1e100 per factor overflows once 4 factors meet: first bad suffix mats[L-4..L-1]
    L = 9
    with pytest.raises(cp.NonFiniteError, match=rf"mats\[{L - 4}\.\.{L - 1}\]"):
        cp.suffix_products([1e100 * np.eye(3)] * L, method=method, backend=backend, workers=workers)
    assert issubclass(cp.NonFiniteError, ValueError)


def test_overflow_in_product():
    with pytest.raises(cp.NonFiniteError, match=r"mats\[0\.\.3\]|mats\["):
        cp.product([1e200 * np.eye(2)] * 4)


@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method", ["backprop", "sequential", "sklansky", "brent_kung", "chunked", "auto"])
def test_overflow_in_grad_names_the_layers(method, backend, workers):
    # identity layers W = 1e150, x = 1e-300: the forward values are 1e-150 .. 1e300 (finite);
    # v_2 = A_3 = 1e150, v_1 = A_3 A_2 = 1e300, v_0 = A_3 A_2 A_1 = 1e450: layers 1..3 overflow.
    chain = cp.Chain([cp.Dense(np.array([[1e150]]), np.zeros(1), "identity") for _ in range(4)])
    with pytest.raises(cp.NonFiniteError, match=r"layers 1\.\.3") as e:
        cp.grad(chain, np.array([1e-300]), method=method, backend=backend, workers=workers)
    assert e.value.layers == (1, 3)


def test_forward_overflow_raises():
    chain = cp.Chain([cp.Dense(np.array([[1e200]]), np.zeros(1), None)] * 3)
    with pytest.raises(cp.NonFiniteError):
        cp.grad(chain, np.array([1.0]))
    with pytest.raises(cp.NonFiniteError):
        cp.value_and_grad(chain, np.array([1.0]), method="backprop")


def test_forward_overflow_names_the_layer():
    # x_1 = 1e200, x_2 = 1e400 = inf: layer 1 (0-based) is the first to overflow
    chain = cp.Chain([cp.Dense(np.array([[1e200]]), np.zeros(1), None)] * 3)
    with pytest.raises(cp.NonFiniteError, match=r"layer 1\b"):
        cp.grad(chain, np.array([1.0]))


# -- missing engines ------------------------------------------------------------------
def test_missing_engine_says_what_to_install():
    name = "fake_engine_for_tests"
    register_executor(name, "chainprod.executors.no_such_module_xyz:FakeExecutor", extra="fakeextra")
    try:
        assert name in cp.valid_backends()
        with pytest.raises(ImportError) as e:
            cp.get_executor(name)
        msg = str(e.value)
        assert "pip install" in msg and "fakeextra" in msg and name in msg
        with pytest.raises(ImportError, match="pip install"):
            cp.suffix_products(random_mats(3), backend=name)
    finally:
        EXECUTORS.pop(name, None)
        from chainprod import executors

        executors._instances.pop(name, None)
    assert name not in cp.valid_backends()


def test_error_messages_quote_the_bad_value():
    with pytest.raises(ValueError) as e:
        cp.schedule("Sklansky", 4)
    assert "'Sklansky'" in str(e.value)
    assert re.search(r"valid", str(e.value))


def test_big_endian_float64_accepted():
    A = np.random.default_rng(0).standard_normal((3, 3)) / 2
    out = cp.suffix_products([A.astype(">f8")] * 3, method="sklansky")
    np.testing.assert_allclose(out[0], A @ A @ A, rtol=1e-13)
    chain = cp.mlp([3, 4, 1], seed=0)
    g = cp.grad(chain, A.astype(">f8"))
    np.testing.assert_allclose(g[0][0], cp.grad(chain, A)[0][0], rtol=1e-13)


def test_mse_targets_with_transposed_shape_rejected():
    chain = cp.mlp([3, 4, 2], seed=0)  # output (3, 2)
    x = np.ones((3, 3))
    y = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match="y"):
        cp.grad(chain, x, y, loss="mse")


@pytest.mark.parametrize("method", ["backprop", "sklansky"])
def test_overflow_in_parameter_gradient_names_the_layer(method):
    # forward finite (x = 1e200 -> 1 -> 1e200); v_0 = 1e200 finite; dW_0 = v_0 * x = 1e400 overflows
    chain = cp.Chain([cp.Dense(np.array([[1e-200]]), np.zeros(1), None),
                      cp.Dense(np.array([[1e200]]), np.zeros(1), None)])
    with pytest.raises(cp.NonFiniteError, match=r"layer 0\b|layers 0\b"):
        cp.grad(chain, np.array([1e200]), method=method)


# -- input types and options found by trying as a new user ----------------------------
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_input_is_a_plain_array(chain):
    x = np.ones((2, 3))
    g = cp.grad(chain, np.matrix(x))
    ref = cp.grad(chain, x)
    assert all(type(a) is np.ndarray and a.shape == b.shape for ga, gb in zip(g, ref) for a, b in zip(ga, gb))
    out = cp.suffix_products([np.matrix(np.eye(2) * 2.0)] * 3)
    assert type(out[0]) is np.ndarray and out[0].shape == (2, 2)


def test_masked_arrays_are_refused(chain):
    with pytest.raises(TypeError, match="masked arrays are not supported"):
        cp.grad(chain, np.ma.masked_array(np.ones((2, 3)), mask=np.zeros((2, 3))))


def test_mse_without_targets_says_so():
    with pytest.raises(ValueError, match="needs targets"):
        cp.grad(cp.mlp([3, 2]), X2, loss="mse")


@pytest.mark.parametrize("widths", [[5, 2.7, 1], [5, True, 1], 5, None, "5,1"])
def test_mlp_widths_are_never_truncated(widths):
    with pytest.raises(TypeError, match="mlp widths"):
        cp.mlp(widths)


def test_chain_of_none():
    with pytest.raises(TypeError, match="sequence of layers"):
        cp.Chain(None)


def test_return_trace_must_be_a_bool(chain):
    with pytest.raises(TypeError, match="return_trace"):
        cp.grad(chain, X2, return_trace="yes")


def test_chunked_chunks_zero_speaks_of_chunks():
    with pytest.raises(ValueError, match="chunks must be an int >= 1"):
        cp.schedule("chunked", 10, chunks=0)


def test_sgd_step_names_the_layer_that_overflowed():
    chain = cp.Chain([dense(2, 2), dense(1, 2)])
    grads = [(np.full((2, 2), 1e300), np.zeros(2)), (np.zeros((1, 2)), np.zeros(1))]
    with pytest.raises(cp.NonFiniteError, match="layer 0"):
        chain.sgd_step(grads, lr=1e10)


def test_unknown_kernels_list_the_valid_ones(chain, monkeypatch):
    with pytest.raises(ValueError, match="valid kernels: numba, numpy"):
        cp.grad(chain, X2, kernels="fortran")
    monkeypatch.setenv("CHAINPROD_KERNELS", "fortran")
    with pytest.raises(ValueError, match="CHAINPROD_KERNELS"):
        cp.grad(chain, X2)
