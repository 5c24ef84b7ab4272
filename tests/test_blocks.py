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


@pytest.mark.parametrize("lk,rk", list(itertools.product(KINDS, KINDS)))
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
