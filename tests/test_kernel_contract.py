"""The kernel contract: every function of both kernel sets, numba against numpy, and both against references.

The contract (:mod:`chainprod.kernels.numpy_kernels`) is ``forward``,
``backprop``, ``backprop_with_row``, ``chunk_product``, ``param_grads`` and
``derivatives``, with one signature and meaning in every set. Here the
compiled set is checked against the numpy one function by function, on chains
mixing all five activations, dense and diagonal layers and widths, with a
batch of one and of several; ``chunk_product`` and the row of
``backprop_with_row`` also against a plain left fold of per-sample Jacobian
matrices built from the layer math written out below (from the
pre-activations ``z``, not from the outputs the kernels use).
"""

import numpy as np
import pytest
from conftest import chain_inputs, layer_makers

import chainprod as cp
from chainprod.kernels import KERNELS, default_kernels, get_kernels, pack, unpack_rows

CONTRACT = ("forward", "backprop", "backprop_with_row", "chunk_product", "param_grads", "derivatives", "all_finite")
#: relative to the largest entry of the reference
TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = (np.float64, np.float32)
BATCHES = (1, 4)

needs_numba = pytest.mark.skipif(default_kernels() != "numba", reason="numba not installed")


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


# name -> (f(z), f'(z)), written from z: independent of the kernels' rules from the outputs
LAYER_MATH = {
    "identity": (lambda z: z, np.ones_like),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "softplus": (lambda z: np.log1p(np.exp(z)), _sigmoid),
}


def make_chain(structure, dtype, seed=0):
    """Chains for the contract: every activation, both layer kinds, widths that change."""
    dense, diag = layer_makers(np.random.default_rng(seed), dtype)

    if structure == "mixed":  # layer 0 dense
        layers = [dense(3, 5, "tanh"), diag(5, "relu"), dense(5, 4, "sigmoid"), diag(4, "softplus"),
                  dense(4, 7, "identity"), dense(7, 6, "relu"), diag(6, "tanh"), dense(6, 2, "softplus")]
    elif structure == "diag_first":  # the row leaves through a diagonal layer
        layers = [diag(4, "softplus"), dense(4, 6, "sigmoid"), diag(6, "identity"), dense(6, 3, "relu"),
                  diag(3, "tanh"), dense(3, 1, "identity")]
    elif structure == "diag_runs":  # runs of diagonal layers: split by activation, width and a dense layer
        layers = [diag(4, "tanh"), diag(4, "tanh"), diag(4, "tanh"), diag(4, "relu"), diag(4, "relu"),
                  dense(4, 5, "sigmoid"), diag(5, "sigmoid"), diag(5, "sigmoid"), diag(5, "softplus"),
                  diag(5, "identity"), diag(5, "identity"), dense(5, 3, "tanh"), diag(3, "tanh"), diag(3, "tanh"),
                  dense(3, 1, "identity")]
    elif structure == "one_dense":
        layers = [dense(5, 3, "sigmoid")]
    else:  # one_diag
        layers = [diag(4, "relu")]
    return cp.Chain(layers)


STRUCTURES = ("mixed", "diag_first", "diag_runs", "one_dense", "one_diag")


inputs = chain_inputs


def reference_jacobians(chain, x):
    """Per-layer input Jacobians ``A_l`` ``(N, d_out, d_in)`` by the layer math, in float64."""
    h = x.astype(np.float64)
    mats = []
    for ly in chain.layers:
        p0, b = (p.astype(np.float64) for p in ly.params)
        f, df = LAYER_MATH[ly.activation]
        z = h @ p0.T + b if ly.kind == "dense" else p0 * h + b
        s = df(z)
        mats.append(s[:, :, None] * p0[None] if ly.kind == "dense" else np.stack([np.diag(r) for r in s * p0]))
        h = f(z)
    return mats


def reference_product(chain, x):
    """``T[n] = A_{L-1}[n] @ ... @ A_0[n]`` by a plain left fold."""
    mats = reference_jacobians(chain, x)
    T = mats[-1]
    for A in reversed(mats[:-1]):
        T = T @ A
    return T


def assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(float(np.max(np.abs(expected))), 1.0)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) if actual.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _kernel_params():
    return [pytest.param(n, marks=[needs_numba] if n == "numba" else []) for n in KERNELS]


# -- the contract is the same in every set ---------------------------------------------------------
@pytest.mark.parametrize("name", _kernel_params())
def test_every_set_has_the_contract(name):
    k = get_kernels(name)
    for f in CONTRACT:
        assert callable(getattr(k, f)), f"{name} kernels lack {f}"
        assert f in k.__all__


# -- numba against numpy, function by function -------------------------------------------------------
@needs_numba
@pytest.mark.parametrize("N", BATCHES)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_numba_equals_numpy(structure, dtype, N):
    nb, ref = get_kernels("numba"), get_kernels("numpy")
    chain = make_chain(structure, dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, N, dtype)

    (Y, bad), (Y_nb, bad_nb) = ref.forward(pc, x), nb.forward(pc, x)
    assert bad == bad_nb == -1
    assert Y_nb.dtype == Y.dtype == dtype
    assert_close(Y_nb, Y, dtype, "forward")

    # the rest read one tape, so each function is compared on the same inputs
    (g, bad), (g_nb, bad_nb) = ref.backprop(pc, x, Y, cotangent), nb.backprop(pc, x, Y, cotangent)
    assert bad == bad_nb == -1
    assert_close(g_nb, g, dtype, "backprop")

    (g, row, bad), (g_nb, row_nb, bad_nb) = (k.backprop_with_row(pc, x, Y, cotangent) for k in (ref, nb))
    assert bad == bad_nb == -1
    assert row.shape == row_nb.shape == (N, chain.d_in)
    assert_close(g_nb, g, dtype, "backprop_with_row grads")
    assert_close(row_nb, row, dtype, "backprop_with_row row")

    T, T_nb = ref.chunk_product(pc, Y, N), nb.chunk_product(pc, Y, N)
    assert T.shape == T_nb.shape == (N, chain.d_out, chain.d_in)
    assert T_nb.dtype == T.dtype == dtype
    assert_close(T_nb, T, dtype, "chunk_product")

    V = np.random.default_rng(2).standard_normal(pc.tape_size(N)).astype(dtype)
    (g, bad), (g_nb, bad_nb) = ref.param_grads(pc, x, Y, V), nb.param_grads(pc, x, Y, V)
    assert bad == bad_nb == -1
    assert_close(g_nb, g, dtype, "param_grads")

    assert_close(nb.derivatives(pc, Y), ref.derivatives(pc, Y), dtype, "derivatives")


# -- each set against the references ---------------------------------------------------------------
@pytest.mark.parametrize("name", _kernel_params())
@pytest.mark.parametrize("N", BATCHES)
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_product_row_and_derivatives_match_the_layer_math(name, structure, dtype, N):
    k = get_kernels(name)
    chain = make_chain(structure, dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, N, dtype)
    Y, _ = k.forward(pc, x)

    T_ref = reference_product(chain, x)
    assert_close(k.chunk_product(pc, Y, N), T_ref, dtype, "chunk_product vs left fold")

    grads, bad = k.backprop(pc, x, Y, cotangent)
    grads_r, row, bad_r = k.backprop_with_row(pc, x, Y, cotangent)
    assert bad == bad_r == -1
    assert np.array_equal(grads_r, grads), "backprop_with_row's grads must be backprop's, bit for bit"
    assert row.flags.c_contiguous and row.dtype == dtype
    row_ref = np.einsum("ni,nij->nj", cotangent.astype(np.float64), T_ref)  # cotangent . A_{L-1} ... A_0
    assert_close(row, row_ref, dtype, "row leaving layer 0")

    S = k.derivatives(pc, Y)
    h = x.astype(np.float64)
    for l, (ly, s) in enumerate(zip(chain.layers, unpack_rows(pc, S))):
        p0, b = (p.astype(np.float64) for p in ly.params)
        z = h @ p0.T + b if ly.kind == "dense" else p0 * h + b
        f, df = LAYER_MATH[ly.activation]
        assert_close(s, df(z), dtype, f"derivatives, layer {l} ({ly.activation})")
        h = f(z)


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_backprop_keeps_one_loop(dtype, monkeypatch):
    """On the chunked-batch path too, the row rides the backprop loop: same grads, same rows as serial."""
    from chainprod.kernels.crossover import force_path

    nb = get_kernels("numba")
    chain = make_chain("mixed", dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, 9, dtype)
    Y, _ = nb.forward(pc, x)
    # The fused loops: a sample's row is computed from that sample alone, so
    # cutting the batch cannot change it by one bit. (Whether a chunk of rows
    # takes BLAS depends on its size and on this machine's calibrated
    # crossover, and BLAS may block rows differently: compared to rounding below.)
    with force_path("loop"):
        _, row_serial, _ = nb.backprop_with_row(pc, x, Y, cotangent)
        g_serial, _ = nb.backprop(pc, x, Y, cotangent)
        monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
        g, bad = nb.backprop(pc, x, Y, cotangent)
        g_r, row, bad_r = nb.backprop_with_row(pc, x, Y, cotangent)
    assert bad == bad_r == -1
    assert np.array_equal(g_r, g)
    assert np.array_equal(row, row_serial)  # a sample's row never depends on the other samples
    assert_close(g, g_serial.astype(np.float64), dtype, "chunked vs serial grads")
    g_x, bad_x = nb.backprop(pc, x, Y, cotangent)  # by the crossover, whatever it is here
    g_xr, row_x, _ = nb.backprop_with_row(pc, x, Y, cotangent)
    assert bad_x == -1 and np.array_equal(g_xr, g_x)
    assert_close(row_x, row_serial.astype(np.float64), dtype, "rows by the crossover vs the loops")


@pytest.mark.parametrize("name", _kernel_params())
def test_non_finite_cotangent_is_reported_alike(name):
    k = get_kernels(name)
    chain = make_chain("mixed", np.float64)
    pc = pack(chain)
    x, cotangent = inputs(chain, 2, np.float64)
    cotangent[1, 0] = np.inf
    Y, _ = k.forward(pc, x)
    _, bad = k.backprop(pc, x, Y, cotangent)
    _, row, bad_r = k.backprop_with_row(pc, x, Y, cotangent)
    assert bad == bad_r == pc.L - 1
    assert np.isfinite(row[0]).all() and not np.isfinite(row[1]).all()


@pytest.mark.parametrize("name", _kernel_params())
@pytest.mark.parametrize("where", [0, 2, 7, 11])
def test_overflow_inside_a_run_of_diagonal_layers_names_its_layer(name, where):
    """Two diagonal layers of gain 1e200 after layer ``where``: the forward pass names the second, as numpy does."""
    chain = make_chain("diag_runs", np.float64)
    d = chain.layers[where].d_out
    big = [cp.Diagonal(np.full(d, 1e200), np.zeros(d), "identity") for _ in range(2)]
    chain = cp.Chain(list(chain.layers[:where + 1]) + big + list(chain.layers[where + 1:]))
    pc = pack(chain)
    x, _ = inputs(chain, 3, np.float64)
    with np.errstate(all="ignore"):
        _, bad = get_kernels(name).forward(pc, x)
    assert bad == where + 2


@pytest.mark.parametrize("name", _kernel_params())
def test_backward_overflow_inside_a_run_of_diagonal_layers_names_its_layer(name):
    """Gains 1e-150, 1e-150, 1e200, 1e200: a finite forward pass, and the row overflows entering layer 2."""
    d = 4
    gains = [1e-150, 1e-150, 1e200, 1e200]
    layers = [cp.Diagonal(np.full(d, 0.5), np.zeros(d), "tanh")]
    layers += [cp.Diagonal(np.full(d, g), np.zeros(d), "identity") for g in gains]
    chain = cp.Chain(layers + [cp.Dense(np.ones((1, d)), np.zeros(1), "identity")])
    pc = pack(chain)
    x, cotangent = inputs(chain, 2, np.float64)
    k = get_kernels(name)
    with np.errstate(all="ignore"):
        Y, bad_f = k.forward(pc, x)
        _, bad = k.backprop(pc, x, Y, cotangent)
        _, _, bad_r = k.backprop_with_row(pc, x, Y, cotangent)
    assert bad_f == -1
    assert bad == bad_r == 2


@pytest.mark.parametrize("name", _kernel_params())
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_finds_any_nan_or_infinity(name, dtype):
    k = get_kernels(name)
    a = np.linspace(-3, 3, 1001).astype(dtype)
    assert k.all_finite(a) is True
    for i in (0, 500, 1000):
        for bad in (np.nan, np.inf, -np.inf):
            b = a.copy()
            b[i] = bad
            assert k.all_finite(b) is False, (i, bad)
    with pytest.raises(TypeError, match="1-D float32 or float64"):
        k.all_finite(a.reshape(7, 143))


# -- bad input: the same error, word for word, in every set ------------------------------------------
def _bad_calls(pc, chain, x, Y, cotangent):
    N = x.shape[0]
    return {
        "forward: not packed": ("forward", (chain, x)),
        "forward: x dtype": ("forward", (pc, x.astype(np.float32))),
        "forward: x 1-D": ("forward", (pc, x[0])),
        "forward: x width": ("forward", (pc, np.ones((N, pc.width_in + 1)))),
        "forward: x a list": ("forward", (pc, x.tolist())),
        "backprop: cotangent shape": ("backprop", (pc, x, Y, np.ones((N, pc.width_out + 1)))),
        "backprop: cotangent dtype": ("backprop", (pc, x, Y, cotangent.astype(np.float32))),
        "backprop: Y length": ("backprop", (pc, x, Y[:-1], cotangent)),
        "backprop_with_row: not packed": ("backprop_with_row", (chain, x, Y, cotangent)),
        "backprop_with_row: cotangent shape": ("backprop_with_row", (pc, x, Y, cotangent[:1])),
        "backprop_with_row: cotangent dtype": ("backprop_with_row", (pc, x, Y, cotangent.astype(np.float32))),
        "backprop_with_row: Y dtype": ("backprop_with_row", (pc, x, Y.astype(np.float32), cotangent)),
        "backprop_with_row: x batch": ("backprop_with_row", (pc, x[:1], Y, cotangent)),
        "chunk_product: not packed": ("chunk_product", (chain, Y, N)),
        "chunk_product: N zero": ("chunk_product", (pc, Y, 0)),
        "chunk_product: N float": ("chunk_product", (pc, Y, float(N))),
        "chunk_product: N wrong": ("chunk_product", (pc, Y, N + 1)),
        "chunk_product: Y dtype": ("chunk_product", (pc, Y.astype(np.float32), N)),
        "chunk_product: Y 2-D": ("chunk_product", (pc, Y.reshape(N, -1), N)),
        "param_grads: V length": ("param_grads", (pc, x, Y, Y[:-1])),
        "param_grads: V dtype": ("param_grads", (pc, x, Y, Y.astype(np.float32))),
        "derivatives: Y length": ("derivatives", (pc, Y[:-1])),
        "derivatives: Y dtype": ("derivatives", (pc, Y.astype(np.float32))),
    }


def _raised(f, args):
    try:
        f(*args)
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    return None


@needs_numba
def test_bad_input_raises_the_same_errors_in_both_sets():
    nb, ref = get_kernels("numba"), get_kernels("numpy")
    chain = make_chain("mixed", np.float64)
    pc = pack(chain)
    x, cotangent = inputs(chain, 3, np.float64)
    Y, _ = ref.forward(pc, x)
    for what, (fname, args) in _bad_calls(pc, chain, x, Y, cotangent).items():
        got_ref = _raised(getattr(ref, fname), args)
        got_nb = _raised(getattr(nb, fname), args)
        assert got_ref is not None, f"{what}: the numpy set raised nothing"
        assert got_nb == got_ref, f"{what}: numba {got_nb} vs numpy {got_ref}"


def test_bad_input_messages_say_what_is_wrong():
    k = get_kernels("numpy")
    chain = make_chain("mixed", np.float64)
    pc = pack(chain)
    x, cotangent = inputs(chain, 3, np.float64)
    Y, _ = k.forward(pc, x)
    with pytest.raises(ValueError, match=r"cotangent must have shape \(N, d_L\) = \(3, 2\)"):
        k.backprop_with_row(pc, x, Y, cotangent[:, :1])
    with pytest.raises(TypeError, match="cotangent is float32 but the chain's parameters are float64"):
        k.backprop_with_row(pc, x, Y, cotangent.astype(np.float32))
    with pytest.raises(ValueError, match=r"N must be the batch size, an int >= 1, got 0"):
        k.chunk_product(pc, Y, 0)
    with pytest.raises(ValueError, match=r"flat tape of shape \(\d+,\) for a batch of 4"):
        k.chunk_product(pc, Y, 4)
