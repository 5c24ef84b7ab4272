"""The block algebra table: every kind pair against dense matmul, flops, containers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import chainprod as cp
from chainprod.blocks import COMBINE, KINDS, BlockSeq, BlockSpec, Diag, Segment, combine, op_flops, product_kind


def stored(kind, dense):
    """The stored array of a block of ``kind`` for a dense (..., d, d) matrix (diag: its diagonal)."""
    return np.diagonal(dense, axis1=-2, axis2=-1).copy() if kind == "diag" else dense


def expand(kind, a):
    if kind == "diag":
        out = np.zeros(a.shape + (a.shape[-1],))
        i = np.arange(a.shape[-1])
        out[..., i, i] = a
        return out
    return a


LINEAR = ["dense", "diag"]
AFFINE = ["affine", "affine_diag"]


def test_the_kinds_are_the_linear_and_the_affine_ones():
    assert sorted(KINDS) == sorted(LINEAR + AFFINE)


@pytest.mark.parametrize("lk,rk", list(itertools.product(LINEAR, LINEAR)))
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["one", "batch", "stack"])
def test_combine_equals_dense_matmul(lk, rk, lead):
    rng = np.random.default_rng(0)
    d = 4
    L = rng.standard_normal(lead + (d, d))
    R = rng.standard_normal(lead + (d, d))
    if lk == "diag":
        L = expand("diag", stored("diag", L))
    if rk == "diag":
        R = expand("diag", stored("diag", R))
    got = combine(lk, stored(lk, L), rk, stored(rk, R))
    out_kind = COMBINE[(lk, rk)].out
    assert out_kind == ("diag" if lk == rk == "diag" else "dense")
    np.testing.assert_allclose(expand(out_kind, got), L @ R, rtol=1e-13, atol=1e-14)
    # with out=: the kernel writes in place
    buf = np.empty_like(got)
    res = combine(lk, stored(lk, L), rk, stored(rk, R), out=buf)
    assert res is buf
    np.testing.assert_array_equal(buf, got)


def test_combine_rectangular():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((2, 1, 5))  # thin head
    D = rng.uniform(size=(2, 5))
    B = rng.standard_normal((2, 5, 3))
    np.testing.assert_allclose(combine("dense", A, "diag", D), A @ expand("diag", D), rtol=1e-14)
    np.testing.assert_allclose(combine("diag", D, "dense", B), expand("diag", D) @ B, rtol=1e-14)
    np.testing.assert_allclose(combine("dense", A, "dense", B), A @ B, rtol=1e-14)


def test_combine_is_associative_not_commutative():
    rng = np.random.default_rng(2)
    a, b, c = (rng.standard_normal((3, 3)) for _ in range(3))
    ab_c = combine("dense", combine("dense", a, "dense", b), "dense", c)
    a_bc = combine("dense", a, "dense", combine("dense", b, "dense", c))
    np.testing.assert_allclose(ab_c, a_bc, rtol=1e-12)
    assert not np.allclose(combine("dense", a, "dense", b), combine("dense", b, "dense", a))


def test_op_flops_from_shapes():
    # rows x inner @ inner x cols
    assert op_flops("dense", "dense", 1, 8, 8) == 2 * 8 * 8
    assert op_flops("dense", "dense", 8, 8, 8) == 2 * 8**3
    assert op_flops("dense", "dense", 3, 5, 7) == 2 * 3 * 5 * 7
    assert op_flops("dense", "diag", 3, 5, 5) == 15  # scale 5 columns of 3 rows
    assert op_flops("diag", "dense", 5, 5, 7) == 35
    assert op_flops("diag", "diag", 6, 6, 6) == 6


def test_product_kind():
    assert product_kind(["diag", "diag", "diag"]) == "diag"
    assert product_kind(["diag", "dense", "diag"]) == "dense"
    assert product_kind(["dense"]) == "dense"
    with pytest.raises(ValueError):
        product_kind([])


def test_kinds_table():
    assert KINDS["dense"].shape(3, 4) == (3, 4)
    assert KINDS["diag"].shape(4, 4) == (4,)
    for pair, rule in COMBINE.items():
        assert rule.out in KINDS and set(pair) <= set(KINDS)


def test_diag_marker():
    v = np.array([1.0, 2.0, 3.0])
    d = Diag(v)
    assert d.shape == (3, 3)
    np.testing.assert_array_equal(d.todense(), np.diag(v))
    np.testing.assert_array_equal(np.asarray(d), np.diag(v))
    assert np.asarray(d, dtype=np.float32).dtype == np.float32
    vb = np.arange(6.0).reshape(2, 3)
    db = Diag(vb)
    assert db.shape == (2, 3, 3)
    np.testing.assert_array_equal(db.todense()[1], np.diag(vb[1]))
    assert "Diag(" in repr(d)
    assert cp.Diag is Diag


def test_diag_dense_roundtrip_through_suffix_products():
    # the documented way: Diag(values) behaves exactly like np.diag(values)
    rng = np.random.default_rng(3)
    ds = [rng.uniform(0.5, 1.5, 4) for _ in range(5)]
    as_diag = cp.suffix_products([Diag(v) for v in ds], method="sklansky")
    as_dense = cp.suffix_products([np.diag(v) for v in ds], method="sklansky")
    for a, b in zip(as_diag, as_dense):
        assert isinstance(a, Diag) and not isinstance(b, Diag)
        np.testing.assert_allclose(a.todense(), b, rtol=1e-14)


def test_segment_and_blockseq():
    rng = np.random.default_rng(4)
    s1 = Segment("dense", rng.standard_normal((2, 3, 1, 4)))  # 2 thin blocks, batch 3
    s2 = Segment("diag", rng.standard_normal((5, 3, 4)))
    assert s1.count == 2 and s1.spec == BlockSpec("dense", 1, 4)
    assert s2.count == 5 and s2.spec == BlockSpec("diag", 4, 4)
    seq = BlockSeq([s1, s2])
    assert len(seq) == 7 and seq.batch == 3 and seq.dtype == np.float64 and not seq.owned
    assert list(seq.kinds) == ["dense"] * 2 + ["diag"] * 5
    assert seq.rows.tolist() == [1, 1, 4, 4, 4, 4, 4] and seq.cols.tolist() == [4] * 7
    assert seq.signature() == (("dense", 2, 1, 4), ("diag", 5, 4, 4))
    assert seq.specs()[3] == BlockSpec("diag", 4, 4)
    k, a = seq.block(3)
    assert k == "diag" and a is not None and np.array_equal(a, s2.array[1])
    with pytest.raises(IndexError):
        seq.block(7)
    # the plan's flops accept a BlockSeq too
    s = cp.schedule("sequential", 7)
    assert s.flops(seq) == s.flops(seq.specs())


def test_blockseq_rejects_bad_groups():
    with pytest.raises(ValueError, match="at least one"):
        BlockSeq([])
    with pytest.raises(ValueError, match="batch"):
        BlockSeq([Segment("dense", np.ones((1, 2, 3, 3))), Segment("dense", np.ones((1, 3, 3, 3)))])
    with pytest.raises(TypeError, match="dtype"):
        BlockSeq([Segment("dense", np.ones((1, 2, 3, 3))), Segment("diag", np.ones((1, 2, 3), np.float32))])


# -- affine blocks ---------------------------------------------------------------------
def affine_matrix(kind, a):
    """The logical matrix of a stored affine block, by hand: ``[[A^T, 0], [b^T, 1]]``."""
    if kind == "affine_diag":
        d = a.shape[-1] // 2
        A = np.zeros(a.shape[:-1] + (d, d))
        i = np.arange(d)
        A[..., i, i] = a[..., :d]
        b = a[..., d:]
    else:
        A, b = a[..., :-1], a[..., -1]
    m, n = A.shape[-2:]
    out = np.zeros(a.shape[: a.ndim - KINDS[kind].block_ndim] + (n + 1, m + 1))
    out[..., :n, :m] = np.swapaxes(A, -1, -2)
    out[..., n, :m] = b
    out[..., n, m] = 1.0
    return out


def random_affine(kind, lead, d, rng, n_in=None):
    if kind == "affine_diag":
        return rng.standard_normal(lead + (2 * d,))
    return rng.standard_normal(lead + (d, (d if n_in is None else n_in) + 1))


def apply_affine(kind, a, h):
    """``A h + b`` for one stored block and a vector ``h``."""
    if kind == "affine_diag":
        d = a.shape[-1] // 2
        return a[:d] * h + a[d:]
    return a[:, :-1] @ h + a[:, -1]


@pytest.mark.parametrize("lk,rk", list(itertools.product(AFFINE, AFFINE)))
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["one", "batch", "stack"])
def test_affine_combine_is_the_matrix_product_and_the_composition(lk, rk, lead):
    rng = np.random.default_rng(5)
    d = 4
    left, right = random_affine(lk, lead, d, rng), random_affine(rk, lead, d, rng)
    got = combine(lk, left, rk, right)
    out_kind = COMBINE[(lk, rk)].out
    assert out_kind == ("affine_diag" if lk == rk == "affine_diag" else "affine")
    np.testing.assert_allclose(affine_matrix(out_kind, got), affine_matrix(lk, left) @ affine_matrix(rk, right),
                               rtol=1e-13, atol=1e-14)
    # left is the earlier step: the product is the map ``right o left``
    h = rng.standard_normal(d)
    first = (0,) * len(lead)
    np.testing.assert_allclose(apply_affine(out_kind, got[first], h),
                               apply_affine(rk, right[first], apply_affine(lk, left[first], h)), rtol=1e-13)
    # with out=, into a fresh buffer and over either operand (the in-place circuits of a schedule)
    buf = np.empty_like(got)
    assert combine(lk, left, rk, right, out=buf) is buf
    np.testing.assert_array_equal(buf, got)
    if KINDS[lk].shape(d + 1, d + 1) == got.shape[len(lead):]:
        over = left.copy()
        combine(lk, over, rk, right, out=over)
        np.testing.assert_allclose(over, got, rtol=1e-15, atol=1e-15)
    if KINDS[rk].shape(d + 1, d + 1) == got.shape[len(lead):]:
        over = right.copy()
        combine(lk, left, rk, over, out=over)
        np.testing.assert_allclose(over, got, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("rk", AFFINE)
def test_a_state_times_an_affine_block_is_the_next_state(rk):
    # the state h is the constant map R^0 -> R^d, stored (d, 1): a thin 1 x (d + 1) row
    rng = np.random.default_rng(6)
    d = 5
    h = rng.standard_normal((2, d, 1))
    right = random_affine(rk, (2,), d, rng)
    got = combine("affine", h, rk, right)
    assert got.shape == (2, d, 1)
    for n in range(2):
        np.testing.assert_allclose(got[n, :, 0], apply_affine(rk, right[n], h[n, :, 0]), rtol=1e-13)
    np.testing.assert_allclose(affine_matrix("affine", got), affine_matrix("affine", h) @ affine_matrix(rk, right),
                               rtol=1e-13)


def test_affine_combine_of_rectangular_maps():
    rng = np.random.default_rng(7)
    first = random_affine("affine", (), 3, rng, n_in=5)  # R^5 -> R^3
    second = random_affine("affine", (), 2, rng, n_in=3)  # R^3 -> R^2
    got = combine("affine", first, "affine", second)
    assert got.shape == (2, 6)
    x = rng.standard_normal(5)
    np.testing.assert_allclose(apply_affine("affine", got, x),
                               apply_affine("affine", second, apply_affine("affine", first, x)), rtol=1e-13)


def test_affine_layout_and_flops():
    d = 6
    assert KINDS["affine"].shape(d + 1, d + 1) == (d, d + 1)
    assert KINDS["affine"].shape(1, d + 1) == (d, 1)  # a state
    assert KINDS["affine_diag"].shape(d + 1, d + 1) == (2 * d,)
    for kind, trailing in [("affine", (d, d + 1)), ("affine", (d, 1)), ("affine_diag", (2 * d,)),
                           ("dense", (3, 4)), ("diag", (d,))]:
        rows, cols = KINDS[kind].spec(trailing)
        assert KINDS[kind].shape(rows, cols) == trailing
    r = k = c = d + 1
    assert op_flops("affine", "affine", r, k, c) == 2 * d * d * (d + 1) + d
    assert op_flops("affine", "affine", 1, k, c) == 2 * d * d + d  # state: a matrix-vector product
    assert op_flops("affine", "affine_diag", 1, k, c) == 2 * d
    assert op_flops("affine_diag", "affine_diag", r, k, c) == 3 * d
    assert op_flops("affine_diag", "affine", r, k, c) == 3 * d * d + d
    assert COMBINE[("affine", "affine")].cost == "matmul"
    assert {COMBINE[p].cost for p in itertools.product(AFFINE, AFFINE) if p != ("affine", "affine")} == \
        {"elementwise"}


def test_affine_segments_and_flops_through_a_schedule():
    d, T = 3, 6
    head = Segment("affine", np.zeros((1, 2, d, 1)))
    body = Segment("affine", np.zeros((T, 2, d, d + 1)))
    assert head.spec == BlockSpec("affine", 1, d + 1) and body.spec == BlockSpec("affine", d + 1, d + 1)
    assert Segment("affine_diag", np.zeros((T, 2, 2 * d))).spec == BlockSpec("affine_diag", d + 1, d + 1)
    seq = BlockSeq([head, body])
    assert seq.rows.tolist() == [1] + [d + 1] * T and seq.cols.tolist() == [d + 1] * (T + 1)
    # the sequential order is the plain loop: a matrix-vector product and an add per step
    assert cp.schedule("sequential", T + 1).flops(seq) == T * (2 * d * d + d)
    assert cp.schedule("sklansky", T + 1).flops(seq) > T * (2 * d * d + d)


def test_affine_and_linear_kinds_do_not_mix():
    with pytest.raises(ValueError, match="do not combine"):
        combine("dense", np.ones((2, 2)), "affine", np.ones((2, 3)))
    with pytest.raises(ValueError, match="do not combine"):
        product_kind(["affine", "diag"])
    with pytest.raises(ValueError, match="do not combine"):
        BlockSeq([Segment("affine", np.ones((1, 1, 2, 1))), Segment("dense", np.ones((1, 1, 3, 3)))])
    with pytest.raises(ValueError, match="unknown block kind"):
        BlockSeq([Segment("banded", np.ones((1, 1, 2, 2)))])
    assert product_kind(["affine", "affine_diag", "affine_diag"]) == "affine"
    assert product_kind(["affine_diag", "affine_diag"]) == "affine_diag"
