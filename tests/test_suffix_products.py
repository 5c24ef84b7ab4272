"""``suffix_products`` against plain left folds: every scan x local executor x block kind."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    LOCAL_BACKEND_IDS,
    LOCAL_BACKENDS,
    SCAN_METHOD_IDS,
    SCAN_METHODS,
    as_dense,
    assert_suffix_close,
    assert_unchanged,
    make_readonly,
    my_fold,
    orthogonal_mats,
    random_widths,
    rel_err,
    rtol_for,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chainprod as cp
from chainprod.testing import left_fold_suffix, random_mats

LENGTHS = [1, 2, 3, 4, 5, 7, 8, 16, 17, 100, 1000]
KINDS = ["dense", "diag", "mixed"]


def make_mats(L, kind, batched, dtype, seed):
    """Random blocks for one case: varying widths for short dense/mixed chains,
    norm-preserving blocks for long float32 chains (random_mats underflows there)."""
    batch = 3 if batched else None
    if np.dtype(dtype) == np.float32 and L >= 100:
        return orthogonal_mats(L, 4, kind=kind, batch=batch, seed=seed, dtype=dtype)
    if kind != "diag" and L <= 17:
        # widths 1..5; mixed gets a diagonal only where a block is square
        return random_mats(L, kind=kind, batch=batch, seed=seed, dtype=dtype,
                           widths=random_widths(L, seed, lo=1, hi=6))
    return random_mats(L, 4, kind=kind, batch=batch, seed=seed, dtype=dtype)


def call(mats, method, opts, backend, workers):
    if opts:  # a schedule with options is passed ready-made
        method = cp.schedule(method, len(mats), **opts)
    return cp.suffix_products(mats, method=method, backend=backend, workers=workers)


# -- 1. every length, kind, batching and dtype on the default path ----------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("L", LENGTHS)
def test_matches_left_fold(L, kind, batched, dtype):
    mats = make_mats(L, kind, batched, dtype, seed=L * 7 + len(kind))
    out = cp.suffix_products(mats)
    assert_suffix_close(out, mats, rtol_for(dtype))
    # and against the library's own reference helper
    ref = left_fold_suffix(mats)
    for k in (0, L // 2, L - 1):
        assert rel_err(out[k], ref[k]) <= rtol_for(dtype)


def test_my_fold_agrees_with_testing_helper():
    mats = random_mats(9, kind="mixed", batch=2, seed=3)
    for a, b in zip(my_fold(mats), left_fold_suffix(mats)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=0)


def test_out_k_is_the_suffix_product_written_out():
    # out[k] == mats[L-1] @ mats[L-2] @ ... @ mats[k], spelled out for L = 3
    a, b, c = random_mats(3, 3, seed=11)
    out = cp.suffix_products([a, b, c], method="sklansky")
    np.testing.assert_allclose(out[2], c, rtol=1e-14)
    np.testing.assert_allclose(out[1], c @ b, rtol=1e-13)
    np.testing.assert_allclose(out[0], c @ b @ a, rtol=1e-13)


# -- 2. every scan schedule x every local executor ------------------------------
@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method,opts", SCAN_METHODS, ids=SCAN_METHOD_IDS)
def test_schedule_x_executor(method, opts, backend, workers):
    for L in (1, 2, 3, 4, 5, 7, 8, 16, 17, 100):
        for kind in KINDS:
            batched = (L + len(kind)) % 2 == 0
            mats = make_mats(L, kind, batched, np.float64, seed=1000 + L)
            out = call(mats, method, opts, backend, workers)
            assert_suffix_close(out, mats, 1e-10)


@pytest.mark.parametrize("backend,workers", [("serial", None), ("vectorized", None), ("threads", 2)],
                         ids=["serial", "vectorized", "threads-w2"])
@pytest.mark.parametrize("method,opts", [m for m in SCAN_METHODS if m[0] != "independent"],
                         ids=[i for i in SCAN_METHOD_IDS if i != "independent"])
def test_long_float32_chains(method, opts, backend, workers):
    L = 1000
    for kind in ("dense", "mixed"):
        mats = orthogonal_mats(L, 3, kind=kind, batch=2 if kind == "dense" else None, seed=5, dtype=np.float32)
        out = call(mats, method, opts, backend, workers)
        assert all(np.asarray(o.values if isinstance(o, cp.Diag) else o).dtype == np.float32 for o in out)
        assert_suffix_close(out, mats, 1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
def test_output_dtype_follows_input(dtype, backend, workers):
    for kind in KINDS:
        mats = random_mats(6, 3, kind=kind, seed=2, dtype=dtype)
        out = cp.suffix_products(mats, method="sklansky", backend=backend, workers=workers)
        for o in out:
            assert np.asarray(o.values if isinstance(o, cp.Diag) else o).dtype == np.dtype(dtype)


# -- 3. diagonal blocks -----------------------------------------------------------
@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_diag_only_products_stay_diag(backend, workers, batched):
    rng = np.random.default_rng(0)
    shape = (2, 5) if batched else (5,)
    mats = [cp.Diag(rng.uniform(0.5, 1.5, shape)) for _ in range(9)]
    for method in ("sequential", "sklansky", "brent_kung", "hillis_steele"):
        out = cp.suffix_products(mats, method=method, backend=backend, workers=workers)
        for k, o in enumerate(out):
            assert isinstance(o, cp.Diag)
            assert np.shape(o.values) == shape
            want = np.prod(np.stack([m.values for m in mats[k:]]), axis=0)  # elementwise
            np.testing.assert_allclose(o.values, want, rtol=1e-13)


def test_diag_then_dense_kinds():
    rng = np.random.default_rng(1)
    d = cp.Diag(rng.uniform(0.5, 1.5, 3))
    A = rng.standard_normal((3, 3))
    # mats = [A, D, D]: out[2] = D, out[1] = D D (diag), out[0] = D D A (dense)
    out = cp.suffix_products([A, d, d], method="brent_kung")
    assert isinstance(out[2], cp.Diag) and isinstance(out[1], cp.Diag)
    assert not isinstance(out[0], cp.Diag) and out[0].shape == (3, 3)
    np.testing.assert_allclose(out[0], np.diag(d.values**2) @ A, rtol=1e-13)


def test_unbatched_blocks_broadcast_over_batch():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((2, 3, 3))  # batched
    B = rng.standard_normal((3, 3))  # shared by every sample
    D = cp.Diag(rng.uniform(0.5, 1.5, 3))  # shared diagonal
    out = cp.suffix_products([A, B, D], method="sklansky")
    assert out[0].shape == (2, 3, 3)
    for n in range(2):
        np.testing.assert_allclose(out[0][n], np.diag(D.values) @ B @ A[n], rtol=1e-13)
    assert out[2].values.shape in ((3,), (2, 3))
    np.testing.assert_allclose(np.broadcast_to(as_dense(out[2]), (2, 3, 3))[1], np.diag(D.values), rtol=0)


# -- 4. inputs never modified, read-only accepted, stacked arrays -------------------
@pytest.mark.parametrize("backend,workers", LOCAL_BACKENDS, ids=LOCAL_BACKEND_IDS)
@pytest.mark.parametrize("method", ["sequential", "independent", "hillis_steele", "sklansky", "brent_kung",
                                    "chunked", "auto"])
def test_inputs_unchanged_and_readonly_ok(method, backend, workers):
    for kind, batched in (("dense", False), ("diag", True), ("mixed", True)):
        mats = random_mats(13, 3, kind=kind, batch=2 if batched else None, seed=4)
        before = snapshot(mats)
        out = cp.suffix_products(mats, method=method, backend=backend, workers=workers)
        assert_unchanged(mats, before)
        # outputs are new memory: writing to them cannot reach the inputs
        for o in out:
            arr = o.values if isinstance(o, cp.Diag) else o
            for m in mats:
                assert not np.shares_memory(arr, m.values if isinstance(m, cp.Diag) else m)
        ro = make_readonly(snapshot(mats))
        out_ro = cp.suffix_products(ro, method=method, backend=backend, workers=workers)
        assert_suffix_close(out_ro, ro, 1e-10)
        assert_unchanged(ro, before)


def test_stacked_array_is_a_list():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((6, 4, 4)) / 2
    A.setflags(write=False)
    before = A.copy()
    out = cp.suffix_products(A, method="sklansky")
    ref = cp.suffix_products(list(A), method="sequential")
    assert len(out) == 6
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    assert_suffix_close(out, list(A), 1e-12)
    assert np.array_equal(A, before)
    # a stacked batch (L, N, d, d) is a list of batched blocks
    B = rng.standard_normal((5, 2, 3, 3)) / 2
    outb = cp.suffix_products(B, method="brent_kung")
    assert outb[0].shape == (2, 3, 3)
    assert_suffix_close(outb, list(B), 1e-12)


def test_nested_lists_and_int_workers_accepted():
    out = cp.suffix_products([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [0.0, 2.0]]])
    np.testing.assert_allclose(out[0], np.array([[0.5, 0.0], [0.0, 2.0]]) @ np.array([[1.0, 2.0], [3.0, 4.0]]))
    mats = random_mats(5, 3, seed=1)
    out2 = cp.suffix_products(mats, method="chunked", backend="threads", workers=np.int64(2))
    assert_suffix_close(out2, mats, 1e-12)


def test_thin_head_and_rectangular_blocks():
    # the gradient shape: a 1 x w head at the output end, interior w x w, a w x d_0 tail
    rng = np.random.default_rng(4)
    mats = [rng.standard_normal((6, 2))] + [rng.standard_normal((6, 6)) / 3 for _ in range(10)]
    mats.append(rng.standard_normal((1, 6)))
    for method in ("sequential", "sklansky", "brent_kung", "hillis_steele", "chunked", "independent"):
        out = cp.suffix_products(mats, method=method)
        assert out[0].shape == (1, 2) and out[-1].shape == (1, 6) and out[3].shape == (1, 6)
        assert_suffix_close(out, mats, 1e-12)


def test_return_trace():
    mats = random_mats(9, 3, seed=6)
    out, trace = cp.suffix_products(mats, method="sklansky", return_trace=True)
    assert isinstance(trace, cp.Trace)
    assert sum(e.ops for e in trace.events) == cp.schedule("sklansky", 9).num_ops
    assert_suffix_close(out, mats, 1e-12)


def test_schedule_object_as_method():
    mats = random_mats(10, 3, seed=7)
    s = cp.schedule("chunked", 10, chunks=3)
    assert_suffix_close(cp.suffix_products(mats, method=s), mats, 1e-12)
    with pytest.raises(ValueError, match="L=11"):
        cp.suffix_products(mats, method=cp.schedule("sklansky", 11))


def test_product_is_the_total():
    for kind in KINDS:
        mats = random_mats(11, 3, kind=kind, batch=2, seed=8)
        want = my_fold(mats)[0]
        for method in ("tree", "sklansky", "sequential"):
            got = cp.product(mats, method=method)
            assert rel_err(got, want) <= 1e-12
        if kind == "diag":
            assert isinstance(cp.product(mats), cp.Diag)


def test_tree_is_not_a_scan():
    with pytest.raises(ValueError, match="tree"):
        cp.suffix_products(random_mats(5, 3), method="tree")


# -- 5. random cases ---------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    L=st.integers(1, 70),
    kind=st.sampled_from(KINDS),
    batch=st.sampled_from([None, 1, 2]),
    method=st.sampled_from(["sequential", "hillis_steele", "sklansky", "brent_kung", "chunked", "auto",
                            "independent"]),
    backend=st.sampled_from(["serial", "vectorized", "threads"]),
    chunks=st.integers(1, 80),
    seed=st.integers(0, 10_000),
)
def test_random_cases(L, kind, batch, method, backend, chunks, seed):
    widths = random_widths(L, seed, lo=1, hi=5) if kind != "diag" else None
    mats = random_mats(L, 3, kind=kind, batch=batch, seed=seed, widths=widths)
    m = cp.schedule("chunked", L, chunks=chunks) if method == "chunked" else method
    out = cp.suffix_products(mats, method=m, backend=backend, workers=2 if backend == "threads" else None)
    assert_suffix_close(out, mats, 1e-10)
