"""torch and JAX arrays (CPU) through suffix_products, product and linear_recurrence on the "array" backend.

Every result is compared with the numpy path on the same numbers (float64 to
1e-12, float32 to 1e-5, normwise relative), and must come back in the
input's library, dtype and device, with the inputs untouched. JAX compiles
every new plan shape (about a second each on a loaded CPU), so JAX runs
one block kind per schedule where torch runs all three.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.arrays import common_library, is_foreign, library_of
from chainprod.testing import random_mats

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy
pytest.importorskip("array_api_compat")

SCANS = [m for m in cp.valid_schedules() if m != "tree"]
TOL = {np.float64: 1e-12, np.float32: 1e-5}
L = 6


class Lib:
    """How a test turns numpy into the library and back."""

    def __init__(self, name):
        self.name = name

    def asarray(self, a):
        if self.name == "torch":
            return torch.from_numpy(np.array(a))
        return jax.numpy.asarray(a)

    def to_numpy(self, a):
        return a.numpy() if self.name == "torch" else np.asarray(a)

    def check(self, out, like):
        """``out`` is in ``like``'s library, dtype and device."""
        assert library_of(out) == self.name
        assert out.dtype == like.dtype
        if self.name == "torch":
            assert out.device == like.device
        else:
            assert out.devices() == like.devices()


@pytest.fixture(params=["torch", "jax"])
def lib(request):
    """The library of a test (parametrised here, or by a test's own list with ``indirect=["lib"]``)."""
    if request.param == "jax":
        with jax.enable_x64(True):
            yield Lib("jax")
    else:
        yield Lib("torch")


def convert(lib, mats):
    return [cp.Diag(lib.asarray(m.values)) if isinstance(m, cp.Diag) else lib.asarray(m) for m in mats]


def values(m):
    return m.values if isinstance(m, cp.Diag) else m


def rel(got, want):
    want = np.asarray(want, dtype=np.float64)
    return np.linalg.norm(np.asarray(got, dtype=np.float64) - want) / max(np.linalg.norm(want), 1e-300)


def check_products(lib, got, want, mats_lib, dtype):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert isinstance(g, cp.Diag) == isinstance(w, cp.Diag)
        lib.check(values(g), values(mats_lib[0]))
        assert rel(lib.to_numpy(values(g)), values(w)) <= TOL[dtype]


# -- suffix products and products -------------------------------------------------------
# JAX compiles every new plan shape and dtype: one kind (mixed holds every pair) and one case per schedule
@pytest.mark.parametrize("lib,method,kind", [("torch", m, k) for m in SCANS for k in ("dense", "diag", "mixed")]
                         + [("jax", m, "mixed") for m in SCANS], indirect=["lib"])
def test_suffix_products_match_numpy(lib, method, kind):
    cases = [(None, np.float64), (2, np.float64), (2, np.float32)]
    if lib.name == "jax" and method != "sklansky":
        cases = cases[1:2]  # JAX compiles every new shape and dtype: one case per schedule
    for batch, dtype in cases:
        mats = random_mats(L, 3, kind=kind, batch=batch, seed=len(kind), dtype=dtype)
        want = cp.suffix_products(mats, method=method)
        mats_lib = convert(lib, mats)
        before = [lib.to_numpy(values(m)).copy() for m in mats_lib]
        got = cp.suffix_products(mats_lib, method=method)
        check_products(lib, got, want, mats_lib, dtype)
        for m, b in zip(mats_lib, before):
            np.testing.assert_array_equal(lib.to_numpy(values(m)), b)


@pytest.mark.parametrize("method", ["tree", "sklansky", "sequential"])
def test_product_matches_numpy(lib, method):
    for kind, batch in (("mixed", 2), ("diag", None), ("dense", None))[:1 if lib.name == "jax" else 3]:
        mats = random_mats(L, 3, kind=kind, batch=batch, seed=3)
        mats_lib = convert(lib, mats)
        got, want = cp.product(mats_lib, method=method), cp.product(mats, method=method)
        assert isinstance(got, cp.Diag) == isinstance(want, cp.Diag)
        lib.check(values(got), values(mats_lib[0]))
        assert rel(lib.to_numpy(values(got)), values(want)) <= 1e-12


def test_stacked_input_and_thin_head(lib):
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((L, 4, 4)) / 2
    got = cp.suffix_products(lib.asarray(stacked), method="brent_kung")
    for g, w in zip(got, cp.suffix_products(stacked, method="brent_kung")):
        assert rel(lib.to_numpy(g), w) <= 1e-12
    if lib.name == "jax":
        return  # compile time: the varying widths run on torch
    mats = [rng.standard_normal((4, 2))] + [rng.standard_normal((4, 4)) / 2 for _ in range(4)]
    mats.append(rng.standard_normal((1, 4)))  # widths vary: a gradient chain's thin head
    got = cp.suffix_products(convert(lib, mats), method="sklansky")
    for g, w in zip(got, cp.suffix_products(mats, method="sklansky")):
        assert rel(lib.to_numpy(g), w) <= 1e-12


# -- linear recurrences -------------------------------------------------------------------
def recurrence_inputs(diag, batched, h0, T=7, d=3, N=2, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    lead = (T, N) if batched else (T,)
    a = rng.uniform(0.5, 1.0, (*lead, d)) if diag else rng.standard_normal((*lead, d, d)) / 2
    b = rng.standard_normal((*lead, d))
    h = rng.standard_normal((N, d) if batched else (d,)) if h0 else None
    return a.astype(dtype), b.astype(dtype), None if h is None else h.astype(dtype)


@pytest.mark.parametrize("lib,method", [("torch", m) for m in ("auto", "sequential", "sklansky", "brent_kung",
                                                                 "hillis_steele", "chunked", "independent")]
                         + [("jax", m) for m in ("auto", "sequential", "sklansky")], indirect=["lib"])
@pytest.mark.parametrize("diag", [True, False], ids=["Diag", "dense"])
def test_linear_recurrence_matches_numpy(lib, method, diag):
    cases = [(False, False, np.float64), (True, True, np.float64), (False, True, np.float32)]
    if lib.name == "jax" and method != "sklansky":
        cases = cases[1:2]
    for batched, h0, dtype in cases:
        a, b, h = recurrence_inputs(diag, batched, h0, dtype=dtype)
        want = cp.linear_recurrence(cp.Diag(a) if diag else a, b, h, method=method)
        A_lib, b_lib = lib.asarray(a), lib.asarray(b)
        h_lib = None if h is None else lib.asarray(h)
        got = cp.linear_recurrence(cp.Diag(A_lib) if diag else A_lib, b_lib, h_lib, method=method)
        lib.check(got, b_lib)
        assert tuple(got.shape) == want.shape
        assert rel(lib.to_numpy(got), want) <= TOL[dtype]
        np.testing.assert_array_equal(lib.to_numpy(A_lib), a)
        np.testing.assert_array_equal(lib.to_numpy(b_lib), b)
        if h is not None:
            np.testing.assert_array_equal(lib.to_numpy(h_lib), h)


def test_linear_recurrence_batch_in_A_only(lib):
    a, b, _ = recurrence_inputs(True, True, False)
    b = b[:, 0]  # one input for every sample, a transition per sample
    got = cp.linear_recurrence(cp.Diag(lib.asarray(a)), lib.asarray(b), method="sklansky")
    want = cp.linear_recurrence(cp.Diag(a), b, method="sklansky")
    assert tuple(got.shape) == want.shape == (7, 2, 3)
    assert rel(lib.to_numpy(got), want) <= 1e-12


def test_trace_on_array_backend(lib):
    mats = random_mats(9, 3, kind="mixed", batch=2, seed=4)
    s = cp.schedule("brent_kung", 9)
    out, trace = cp.suffix_products(convert(lib, mats), method=s, return_trace=True)
    assert trace.backend == "array" and trace.rounds == s.rounds
    assert sum(e.ops for e in trace.events) == s.num_ops
    for g, w in zip(out, cp.suffix_products(mats, method=s)):
        assert rel(lib.to_numpy(values(g)), values(w)) <= 1e-12


# -- errors -------------------------------------------------------------------------------
def test_mixing_libraries_is_a_type_error():
    t, j = torch.eye(2, dtype=torch.float64), jax.numpy.eye(2)
    with pytest.raises(TypeError, match=r"mats\[0\] is a torch tensor and mats\[1\] a numpy array"):
        cp.suffix_products([t, np.eye(2)])
    with pytest.raises(TypeError, match=r"mats\[0\] is a torch tensor and mats\[1\] a JAX array"):
        cp.product([t, cp.Diag(j[0])])
    with pytest.raises(TypeError, match=r"A is a torch tensor and b a numpy array"):
        cp.linear_recurrence(torch.ones(3, 2, 2, dtype=torch.float64), np.ones((3, 2)))
    with pytest.raises(TypeError, match=r"pass arrays of one library"):
        common_library({"A": None, "b": j, "h0": t})
    assert common_library({"A": t, "b": [1.0, 2.0], "h0": None}) == "torch"
    assert is_foreign(None, [np.eye(2), cp.Diag(t[0])]) and not is_foreign(np.eye(2), 1.0, None)


@pytest.mark.parametrize("backend", ["serial", "threads", "ray", "dask"])
def test_numpy_backend_with_torch_is_a_type_error(backend):
    mats = [torch.eye(2, dtype=torch.float64)] * 3
    msg = rf"backend '{backend}' runs on numpy arrays; torch tensors run on backend='array' \(the default for them\)"
    with pytest.raises(TypeError, match=msg):
        cp.suffix_products(mats, backend=backend)
    with pytest.raises(TypeError, match=msg):
        cp.linear_recurrence(cp.Diag(torch.ones(3, 2, dtype=torch.float64)), torch.ones(3, 2, dtype=torch.float64),
                             backend=backend)


def test_nonfinite_torch_input_named_like_numpy():
    mats = random_mats(5, 3, batch=2, seed=1)
    mats[2] = mats[2].copy()
    mats[2][1, 0, 2] = np.nan
    with pytest.raises(ValueError) as np_err:
        cp.suffix_products(mats)
    with pytest.raises(ValueError) as torch_err:
        cp.suffix_products([torch.from_numpy(m) for m in mats])
    assert str(torch_err.value) == str(np_err.value)
    assert "mats[2]" in str(torch_err.value) and "(1, 0, 2)" in str(torch_err.value)
    a, b, _ = recurrence_inputs(True, False, False)
    b[4, 1] = np.inf
    with pytest.raises(ValueError) as np_err:
        cp.linear_recurrence(cp.Diag(a), b)
    with pytest.raises(ValueError) as torch_err:
        cp.linear_recurrence(cp.Diag(torch.from_numpy(a)), torch.from_numpy(b))
    assert str(torch_err.value) == str(np_err.value) and "step t=4" in str(torch_err.value)


def test_overflow_and_shape_errors_like_numpy():
    big = [1e200 * np.eye(2)] * 3
    with pytest.raises(cp.NonFiniteError, match=r"mats\[1\.\.2\]"):
        cp.suffix_products([torch.from_numpy(m) for m in big], method="sklansky")
    with pytest.raises(cp.NonFiniteError, match=r"mats\[0\.\.2\]"):
        cp.product([torch.from_numpy(m) for m in big])
    bad = [np.ones((3, 2)), np.ones((2, 2))]
    with pytest.raises(ValueError) as np_err:
        cp.suffix_products(bad)
    with pytest.raises(ValueError) as torch_err:
        cp.suffix_products([torch.from_numpy(m) for m in bad])
    assert str(torch_err.value) == str(np_err.value)
    with pytest.raises(ValueError, match=r"A has T=3 steps \(shape \(3, 2, 2\)\) but b has T=4 \(shape \(4, 2\)\)"):
        cp.linear_recurrence(torch.ones(3, 2, 2, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"A is float64 but b is float32"):
        cp.linear_recurrence(torch.ones(3, 2, 2, dtype=torch.float64), torch.ones(3, 2))
    with pytest.raises(TypeError, match=r"mats\[0\]: dtype int64 \(integer\) is not supported"):
        cp.suffix_products([torch.ones(2, 2, dtype=torch.int64)])


def test_auto_on_array_backend_is_the_vectorized_choice_on_cpu():
    mats = random_mats(64, 4, batch=2, seed=0)
    seq, _ = cp.products.read_blocks([torch.from_numpy(m) for m in mats])
    got = cp.cost.resolve_schedule("auto", 64, blocks=seq, backend="array")
    want = cp.cost.resolve_schedule("auto", 64, blocks=cp.products.read_blocks(mats)[0], backend="vectorized")
    assert got.key == want.key


# -- how the executor runs ------------------------------------------------------------------
@pytest.mark.parametrize("L_", [16, 13, 100])
def test_view_patterns_cover_every_row(L_):
    from chainprod.blocks import BlockSeq, Segment
    from chainprod.executors.array_views import Bcast, Grid, split_group
    from chainprod.planning.bind import bind

    plan = bind(cp.schedule("sklansky", L_), BlockSeq([Segment("dense", np.zeros((L_, 1, 2, 2)))]))
    grids = 0
    for groups in plan.rounds:
        for g in groups:
            n = plan.slabs[g.out].count
            ops = split_group(g.li, g.ri, g.oi, g.size, [n, n, n])
            rows = {"l": [], "r": [], "o": []}
            for li, ri, oi, shape, size in ops:
                for key, spec in zip("lro", (li, ri, oi)):
                    rows[key].append(np.broadcast_to(_rows_of(spec, size, shape), (size,)))
                grids += shape is not None
                assert shape is None or (isinstance(oi, Grid) and isinstance(li, (Grid, Bcast, np.ndarray)))
            for key, want in zip("lro", (g.li, g.ri, g.oi)):
                want = np.arange(L_)[want] if isinstance(want, slice) else want
                np.testing.assert_array_equal(np.concatenate(rows[key]), want)
    assert grids >= 1


def _rows_of(spec, size, shape):
    """The slab rows a spec selects, flattened in the op's order (a numpy slab of row numbers)."""
    from chainprod.executors.array_views import operand

    slab = np.arange(10_000)
    return np.broadcast_to(operand(np, slab, spec, shape, lambda s, r: s[r]), shape or (size,)).reshape(-1)


@pytest.mark.parametrize("max_groups", [0, 10**6], ids=["step-by-step", "whole-plan"])
def test_jax_run_modes_agree(monkeypatch, max_groups):
    from chainprod.executors import array_jax

    monkeypatch.setattr(array_jax, "JIT_MAX_GROUPS", max_groups)
    mats = random_mats(L, 3, kind="mixed", batch=2, seed=5)
    with jax.enable_x64(True):
        for method in ("sequential", "sklansky"):
            got = cp.suffix_products(convert(Lib("jax"), mats), method=method)
            for g, w in zip(got, cp.suffix_products(mats, method=method)):
                assert rel(np.asarray(values(g)), values(w)) <= 1e-12


@pytest.mark.parametrize("max_groups", [0, 10**6], ids=["step-by-step", "whole-plan"])
def test_jax_plan_cached_under_x64_runs_with_x64_off(monkeypatch, max_groups):
    # the same plan, first with 64-bit types, then without: cached row indices must fit both settings
    from chainprod.executors import array_jax

    monkeypatch.setattr(array_jax, "JIT_MAX_GROUPS", max_groups)
    cp.clear_caches()
    a, b = np.full((6, 3, 5), 0.5), np.ones((6, 3, 5))
    want = cp.linear_recurrence(cp.Diag(a), b, method="sklansky")
    with jax.enable_x64(True):
        got64 = cp.linear_recurrence(cp.Diag(jnp.asarray(a)), jnp.asarray(b), method="sklansky")
    got32 = cp.linear_recurrence(cp.Diag(jnp.asarray(a, dtype=jnp.float32)), jnp.asarray(b, dtype=jnp.float32),
                                 method="sklansky")
    assert got64.dtype == jnp.float64 and got32.dtype == jnp.float32
    assert rel(np.asarray(got64), want) <= 1e-12 and rel(np.asarray(got32).astype(np.float64), want) <= 1e-5


def test_long_odd_chain_on_torch():
    mats = random_mats(100, 3, kind="mixed", batch=2, seed=6)  # not a power of two: grids and their tails
    for method in ("sklansky", "brent_kung"):
        got = cp.suffix_products(convert(Lib("torch"), mats), method=method)
        for g, w in zip(got, cp.suffix_products(mats, method=method)):
            assert rel(values(g).numpy(), values(w)) <= 1e-12


def test_missing_array_api_compat_says_what_to_install(monkeypatch):
    from chainprod.arrays import namespace

    monkeypatch.setitem(__import__("sys").modules, "array_api_compat", None)  # import fails as if missing
    with pytest.raises(ImportError, match=r"pip install 'chainprod\[array\]'"):
        namespace(torch.ones(2))
