"""Whole-chain kernels (chainprod.kernels): numba == numpy reference == the layer-by-layer engine.

The independent references are the existing per-run numpy path
(``cp.forward`` / ``cp.backward(method="backprop")``, built on the layer
objects, not on the packed layout) and, for the rows ``V`` fed to
``param_grads``, a plain backward fold of explicit per-sample Jacobian
matrices written here.
"""

import subprocess
import sys

import numpy as np
import pytest

import chainprod as cp
from chainprod.kernels import (
    ACT_CODES,
    KERNELS,
    PackedChain,
    default_kernels,
    first_nonfinite_layer,
    get_kernels,
    layer_rows,
    pack,
    unpack_grads,
    unpack_rows,
)

ACTS = ("tanh", "relu", "sigmoid", "softplus", "identity")
STRUCTURES = ("mlp", "mixed_acts", "widths", "dense_diag")
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def _kernel_params():
    out = []
    for name in KERNELS:
        marks = [pytest.mark.skipif(name == "numba" and default_kernels() != "numba", reason="numba not installed")]
        out.append(pytest.param(name, marks=marks))
    return out


@pytest.fixture(params=_kernel_params())
def kernels(request):
    return get_kernels(request.param)


def make_chain(structure, L, dtype, seed=0):
    """Random chains of ``L`` layers; outputs of width > 1 are fine (seeds are random rows)."""
    rng = np.random.default_rng(seed)

    def dense(din, dout, act):
        W = rng.standard_normal((dout, din)) / np.sqrt(din)
        return cp.Dense(W.astype(dtype), (0.1 * rng.standard_normal(dout)).astype(dtype), act)

    layers = []
    for l in range(L):
        if structure == "mlp":
            layers.append(dense(8, 8 if l < L - 1 else 1, "tanh" if l < L - 1 else "identity"))
        elif structure == "mixed_acts":
            layers.append(dense(8, 8, ACTS[l % 5]))
        elif structure == "widths":
            w = (8, 12, 16)
            layers.append(dense(w[l % 3], w[(l + 1) % 3], ACTS[l % 4]))
        elif structure == "dense_diag":
            if l % 2:
                layers.append(cp.Diagonal(rng.uniform(0.6, 1.2, 8).astype(dtype),
                                          (0.1 * rng.standard_normal(8)).astype(dtype), ACTS[l % 5]))
            else:
                layers.append(dense(8, 8, ACTS[(l // 2) % 5]))
    return cp.Chain(layers)


def reference_rows(chain, tape):
    """Every layer's output ``(N, d_out)`` from the engine's tape (per-run stacks)."""
    return [y for Y in tape.outputs for y in Y]


def reference_V(chain, x, seed):
    """``v_l = dloss/dy_l`` by a backward fold of explicit per-sample Jacobian matrices."""
    acts = [x]
    for ly in chain.layers:
        acts.append(ly.forward(acts[-1]))
    V = [None] * len(chain)
    v = seed
    for l in range(len(chain) - 1, -1, -1):
        V[l] = v
        ly, y = chain.layers[l], acts[l + 1]
        s = np.ones_like(y) if ly.activation == "identity" else ly.derivs(y, ly.activation)
        if ly.kind == "dense":
            J = s[:, :, None] * ly.params[0][None]          # (N, d_out, d_in) = diag(s) W
        else:
            J = np.stack([np.diag(row) for row in s * ly.params[0]])
        v = np.einsum("ni,nij->nj", v, J)
    return V


def assert_close(actual, expected, rtol, what):
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_grads_close(actual, expected, rtol):
    assert len(actual) == len(expected)
    for l, (ga, ge) in enumerate(zip(actual, expected)):
        assert len(ga) == len(ge)
        for a, e in zip(ga, ge):
            assert a.shape == e.shape, f"layer {l}: {a.shape} vs {e.shape}"
            assert_close(a, e, rtol, f"layer {l}")


CASES = [(s, L, N, dt) for s in STRUCTURES for L in (1, 2, 3, 5, 17, 64) for N in (1, 3, 7)
         for dt in (np.float32, np.float64)]


@pytest.mark.parametrize("structure,L,N,dtype", CASES,
                         ids=[f"{s}-L{L}-N{N}-{np.dtype(d).name}" for s, L, N, d in CASES])
def test_kernels_match_engine(kernels, structure, L, N, dtype):
    rtol = TOL[dtype]
    chain = make_chain(structure, L, dtype, seed=L * 10 + N)
    rng = np.random.default_rng(L + N)
    x = rng.standard_normal((N, chain.d_in)).astype(dtype)
    seed = rng.standard_normal((N, chain.d_out)).astype(dtype)
    pc = pack(chain)

    Y, bad = kernels.forward(pc, x)
    assert bad == -1 and Y.dtype == dtype and Y.shape == (N * sum(chain.widths[1:]),)
    tape = cp.forward(chain, x)
    for l, (got, ref) in enumerate(zip(unpack_rows(pc, Y), reference_rows(chain, tape))):
        assert_close(got, ref, rtol, f"forward, layer {l}")

    grads, bad = kernels.backprop(pc, x, Y, seed)
    assert bad == -1 and grads.dtype == dtype
    expected = cp.backward(tape, seed, method="backprop")
    assert_grads_close(unpack_grads(pc, grads), expected, rtol)

    V = np.concatenate([v.reshape(-1) for v in reference_V(chain, x, seed)])
    grads2, bad = kernels.param_grads(pc, x, Y, V)
    assert bad == -1
    assert_grads_close(unpack_grads(pc, grads2), expected, rtol)

    S = kernels.derivatives(pc, Y)
    for l, (s, y) in enumerate(zip(unpack_rows(pc, S), unpack_rows(pc, Y))):
        ly = chain.layers[l]
        ref = np.ones_like(y) if ly.activation == "identity" else ly.derivs(y, ly.activation)
        assert_close(s, ref, rtol, f"derivatives, layer {l}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_numba_matches_numpy_reference(structure, dtype, monkeypatch):
    """The compiled set against the reference, on both its serial and its parallel (chunked batch) paths."""
    if default_kernels() != "numba":
        pytest.skip("numba not installed")
    nb, ref = get_kernels("numba"), get_kernels("numpy")
    rtol = TOL[dtype] / 10
    chain = make_chain(structure, 23, dtype, seed=5)
    rng = np.random.default_rng(1)
    pc = pack(chain)
    for threshold in (nb.PARALLEL_MIN_WORK, 0):
        monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", threshold)
        for N in (1, 2, 7):
            x = rng.standard_normal((N, chain.d_in)).astype(dtype)
            seed = rng.standard_normal((N, chain.d_out)).astype(dtype)
            V = rng.standard_normal(pc.tape_size(N)).astype(dtype)
            (Y1, b1), (Y2, b2) = nb.forward(pc, x), ref.forward(pc, x)
            assert b1 == b2 == -1
            assert_close(Y1, Y2, rtol, "forward")
            (g1, b1), (g2, b2) = nb.backprop(pc, x, Y2, seed), ref.backprop(pc, x, Y2, seed)
            assert b1 == b2 == -1
            assert_close(g1, g2, rtol, "backprop")
            (g1, b1), (g2, b2) = nb.param_grads(pc, x, Y2, V), ref.param_grads(pc, x, Y2, V)
            assert b1 == b2 == -1
            assert_close(g1, g2, rtol, "param_grads")
            assert_close(nb.derivatives(pc, Y2), ref.derivatives(pc, Y2), rtol, "derivatives")


# -- non-finite detection -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_reports_first_overflowing_layer(kernels, dtype):
    """Layer 2 overflows; layer 3 (tanh) brings the output back to finite: still reported, as layer 2."""
    s = np.sqrt(np.finfo(dtype).max) / 10  # s * s is finite, s * s * 1e3 is not
    d = np.dtype(dtype).type
    chain = cp.Chain([
        cp.Dense(np.eye(2, dtype=dtype) * d(s), np.zeros(2, dtype), "identity"),
        cp.Diagonal(np.full(2, s, dtype), np.zeros(2, dtype), "relu"),
        cp.Diagonal(np.full(2, 1e3, dtype), np.zeros(2, dtype), None),
        cp.Diagonal(np.ones(2, dtype), np.zeros(2, dtype), "tanh"),
        cp.Dense(np.ones((1, 2), dtype), np.zeros(1, dtype), "identity"),
    ])
    pc = pack(chain)
    x = np.ones((3, 2), dtype)
    Y, bad = kernels.forward(pc, x)
    assert bad == 2
    assert np.isfinite(layer_rows(pc, Y, 1)).all() and np.isinf(layer_rows(pc, Y, 2)).all()
    assert np.isfinite(layer_rows(pc, Y, 3)).all()  # tanh(inf) = 1: the last output alone would hide it


@pytest.mark.parametrize("kind", ["dense", "diag"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backprop_reports_overflowing_jacobian_product(kernels, kind, dtype):
    """Forward stays at zero; the backward rows grow by ``big`` per layer until they overflow."""
    big = 1e100 if dtype == np.float64 else 1e10  # big^3 finite, big^4 not
    L = 6
    layers = [cp.Dense(np.eye(3, dtype=dtype) * dtype(big), np.zeros(3, dtype), "identity") if kind == "dense"
              else cp.Diagonal(np.full(3, big, dtype), np.zeros(3, dtype), None) for _ in range(L)]
    chain = cp.Chain(layers)
    pc = pack(chain)
    x = np.zeros((2, 3), dtype)
    seed = np.ones((2, 3), dtype)
    Y, bad = kernels.forward(pc, x)
    assert bad == -1
    grads, bad = kernels.backprop(pc, x, Y, seed)
    # v_5 = 1, v_4 = big, ..., v_2 = big^3, v_1 = big^4 = inf: delta_1 is the first non-finite one met
    assert bad == 1
    # the engine names the same product: Jacobians of layers bad+1 .. L-1
    with pytest.raises(cp.errors.NonFiniteError) as err:
        cp.backward(cp.forward(chain, x), seed, method="backprop")
    assert err.value.layers == (bad + 1, L - 1)


def test_param_grads_reports_lowest_nonfinite_layer(kernels):
    chain = make_chain("dense_diag", 8, np.float64)
    pc = pack(chain)
    x = np.ones((2, 8))
    Y, _ = kernels.forward(pc, x)
    V = np.ones(pc.tape_size(2))
    for l in (6, 3):
        layer_rows(pc, V, l)[1, 2] = np.inf if l == 6 else np.nan
    grads, bad = kernels.param_grads(pc, x, Y, V)
    assert bad == 3
    assert first_nonfinite_layer(pc, grads) == 3
    assert np.isfinite(np.concatenate([np.ravel(g) for gs in unpack_grads(pc, grads)[:3] for g in gs])).all()


def test_first_nonfinite_layer():
    pc = pack(make_chain("widths", 5, np.float64))
    g = np.zeros(pc.n_params)
    assert first_nonfinite_layer(pc, g) == -1
    g[pc.p_off[4] - 1] = np.nan  # last entry of layer 3
    assert first_nonfinite_layer(pc, g) == 3
    g[pc.p_off[2]] = -np.inf  # first entry of layer 2
    assert first_nonfinite_layer(pc, g) == 2


# -- inputs are never modified --------------------------------------------------------------------
def test_inputs_not_modified(kernels):
    chain = make_chain("dense_diag", 9, np.float64)
    params = [tuple(p.copy() for p in ps) for ps in chain.params]
    pc = pack(chain)
    assert not pc.theta.flags.writeable
    assert all(not getattr(pc, f).flags.writeable for f in ("kind", "act", "d_in", "d_out", "p_off", "y_off"))
    with pytest.raises(ValueError):
        pc.theta[0] = 1.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8))
    seed = rng.standard_normal((3, 8))
    theta = pc.theta.copy()
    xc, sc = x.copy(), seed.copy()
    Y, _ = kernels.forward(pc, x)
    V = rng.standard_normal(Y.shape)
    Yc, Vc = Y.copy(), V.copy()
    kernels.backprop(pc, x, Y, seed)
    kernels.param_grads(pc, x, Y, V)
    kernels.derivatives(pc, Y)
    for a, b in ((x, xc), (seed, sc), (Y, Yc), (V, Vc), (pc.theta, theta)):
        np.testing.assert_array_equal(a, b)
    assert x.flags.writeable and Y.flags.writeable  # read-only views inside, caller's flags untouched
    for ps, qs in zip(chain.params, params):
        for p, q in zip(ps, qs):
            np.testing.assert_array_equal(p, q)


def test_noncontiguous_input_accepted(kernels):
    chain = make_chain("mlp", 4, np.float64)
    pc = pack(chain)
    xf = np.asfortranarray(np.random.default_rng(0).standard_normal((5, 8)))
    Y, _ = kernels.forward(pc, xf)
    Y2, _ = kernels.forward(pc, np.ascontiguousarray(xf))
    np.testing.assert_array_equal(Y, Y2)


# -- packing ------------------------------------------------------------------------------------
def test_pack_layout():
    chain = make_chain("dense_diag", 5, np.float32)
    pc = pack(chain)
    assert isinstance(pc, PackedChain) and pc.L == 5 and pc.dtype == np.float32
    assert pc.kind.tolist() == [0, 1, 0, 1, 0]
    assert pc.act.tolist() == [ACT_CODES[ly.activation] for ly in chain.layers]
    assert pc.y_off.tolist() == [0, 8, 16, 24, 32, 40]
    assert pc.theta.dtype == np.float32 and pc.theta.flags.c_contiguous
    for l, ly in enumerate(chain.layers):
        p = pc.theta[pc.p_off[l]:pc.p_off[l + 1]]
        np.testing.assert_array_equal(p, np.concatenate([q.ravel() for q in ly.params]))
    # the parameters themselves, unpacked, have the layers' shapes and values
    for got, ref in zip(unpack_grads(pc, pc.theta), chain.params):
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)
    assert "L=5" in repr(pc)


def test_pack_widths_and_fortran_weights():
    W = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    chain = cp.Chain([cp.Dense(W, np.zeros(2), "relu"), cp.Dense(np.ones((4, 2)), np.ones(4), "sigmoid")])
    pc = pack(chain)
    assert pc.d_in.tolist() == [3, 2] and pc.d_out.tolist() == [2, 4]
    assert pc.p_off.tolist() == [0, 8, 20] and pc.y_off.tolist() == [0, 2, 6]
    np.testing.assert_array_equal(pc.theta[:6], np.arange(6.0))  # row-major whatever W's memory order


def test_pack_and_unpack_errors():
    with pytest.raises(TypeError, match="Chain"):
        pack([cp.Dense(np.ones((2, 2)), np.zeros(2))])
    pc = pack(make_chain("mlp", 3, np.float64))
    with pytest.raises(ValueError, match=rf"\({pc.n_params},\)"):
        unpack_grads(pc, np.zeros(pc.n_params + 1))
    with pytest.raises(ValueError, match="flat tape"):
        unpack_rows(pc, np.zeros(7))
    with pytest.raises(IndexError, match="layer 3"):
        layer_rows(pc, np.zeros(pc.tape_size(1)), 3)


# -- argument errors ----------------------------------------------------------------------------
def test_argument_errors(kernels):
    pc = pack(make_chain("mlp", 3, np.float64))
    x = np.ones((2, 8))
    with pytest.raises(TypeError, match="PackedChain"):
        kernels.forward(make_chain("mlp", 3, np.float64), x)
    with pytest.raises(TypeError, match="float32 but the chain's parameters are float64"):
        kernels.forward(pc, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(N, 8\).*got \(8,\).*x\[None\]"):
        kernels.forward(pc, np.ones(8))
    with pytest.raises(ValueError, match=r"got \(2, 5\)"):
        kernels.forward(pc, np.ones((2, 5)))
    with pytest.raises(ValueError, match="N >= 1"):
        kernels.forward(pc, np.ones((0, 8)))
    with pytest.raises(TypeError, match="numpy array"):
        kernels.forward(pc, [[1.0] * 8])
    Y, _ = kernels.forward(pc, x)
    with pytest.raises(ValueError, match=r"cotangent must have shape \(N, d_L\) = \(2, 1\)"):
        kernels.backprop(pc, x, Y, np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"flat tape of shape \(34,\) for a batch of 2"):
        kernels.backprop(pc, x, Y[:-1], np.ones((2, 1)))
    with pytest.raises(ValueError, match="V must be a flat tape"):
        kernels.param_grads(pc, x, Y, Y[:5])
    with pytest.raises(ValueError, match="multiple of"):
        kernels.derivatives(pc, Y[:5])


# -- registry ------------------------------------------------------------------------------------
def test_registry():
    assert KERNELS == ("numba", "numpy")
    for bad in ("torch", "", None, 3):
        with pytest.raises(ValueError, match="valid kernels: numba, numpy"):
            get_kernels(bad)
    ref = get_kernels("numpy")
    for f in ("forward", "backprop", "param_grads", "derivatives"):
        assert callable(getattr(ref, f))
    if default_kernels() == "numba":
        nb = get_kernels("numba")
        assert all(callable(getattr(nb, f)) for f in ("forward", "backprop", "param_grads", "derivatives"))


def test_missing_numba_says_what_to_install(monkeypatch):
    import importlib.util

    cp.clear_caches()  # kernel sets are looked up once per process: look again

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    with pytest.raises(ImportError, match="pip install numba"):
        get_kernels("numba")
    assert default_kernels() == "numpy"
    assert get_kernels("numpy").NAME == "numpy"


def test_import_does_not_import_numba():
    code = ("import sys, chainprod, chainprod.kernels, chainprod.kernels.numpy_kernels; "
            "from chainprod.kernels import default_kernels; default_kernels(); "
            "assert 'numba' not in sys.modules, 'numba imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unpack_grads_of_alternating_shapes_matches_the_flat_layout():
    # More stretches than the per-stretch path takes: the per-shape gathers must give the same arrays.
    from chainprod.kernels.pack import _MAX_STRETCHES

    widths = [3] + [4, 6, 5] * (_MAX_STRETCHES + 2) + [1]
    layers = [cp.Dense(np.ones((o, i)), np.zeros(o), "tanh") if k % 4 else cp.Diagonal(np.ones(i), np.zeros(i))
              if i == o else cp.Dense(np.ones((o, i)), np.zeros(o), "relu")
              for k, (i, o) in enumerate(zip(widths[:-1], widths[1:]))]
    chain = cp.Chain(layers)
    pc = pack(chain)
    flat = np.arange(pc.n_params, dtype=np.float64)
    got = unpack_grads(pc, flat)
    for l, (g, p) in enumerate(zip(got, chain.params)):
        assert tuple(a.shape for a in g) == tuple(q.shape for q in p)
        np.testing.assert_array_equal(np.concatenate([a.ravel() for a in g]), flat[pc.p_off[l]:pc.p_off[l + 1]])


def test_pack_is_kept_on_the_chain():
    chain = cp.mlp([3, 4, 1])
    assert pack(chain) is pack(chain)


def test_layer_grads_reads_like_the_list_of_tuples():
    from chainprod.kernels import LayerGrads

    chain = cp.Chain([cp.Dense(np.ones((4, 3)), np.zeros(4), "tanh"), cp.Diagonal(np.ones(4), np.zeros(4)),
                      cp.Dense(np.ones((1, 4)), np.zeros(1), None)])
    pc = pack(chain)
    flat = np.arange(pc.n_params, dtype=np.float64)
    lazy, eager = LayerGrads(pc, flat), unpack_grads(pc, flat)
    assert len(lazy) == 3
    for l in (0, 1, 2, -1, -3):  # one layer at a time, before the whole list exists
        assert all(np.array_equal(a, b) for a, b in zip(lazy[l], eager[l]))
    with pytest.raises(IndexError, match="layer 3"):
        lazy[3]
    assert all(np.array_equal(a, b) for ga, gb in zip(lazy, eager) for a, b in zip(ga, gb))
    assert [tuple(a.shape for a in g) for g in lazy[1:]] == [((4,), (4,)), ((1, 4), (1,))]
    assert lazy.flat is flat and np.shares_memory(lazy[0][0], flat)
