"""A new structured Jacobian kind is a table entry, not a branch in every executor.

Registers an upper-triangular kind ("triu": stored like dense, products of
two triangular blocks stay triangular and cost a third of the flops) from
this test alone, then runs it through every scan schedule and local executor.
"""

import numpy as np
import pytest

import chainprod as cp
from chainprod.blocks import COMBINE, KINDS, BlockSeq, Kind, Rule, Segment
from chainprod.executors import get_executor


@pytest.fixture
def triu_kind():
    mm = COMBINE[("dense", "dense")].kernel
    rows = {
        ("triu", "triu"): Rule("triu", mm, lambda r, k, c: r * k * c // 3 + 1),
        ("triu", "dense"): Rule("dense", mm, lambda r, k, c: r * k * c),
        ("dense", "triu"): Rule("dense", mm, lambda r, k, c: r * k * c),
        ("diag", "triu"): Rule("triu", COMBINE[("diag", "dense")].kernel, lambda r, k, c: r * c),
        ("triu", "diag"): Rule("triu", COMBINE[("dense", "diag")].kernel, lambda r, k, c: r * c),
    }
    KINDS["triu"] = Kind("triu", 2)
    COMBINE.update(rows)
    yield
    del KINDS["triu"]
    for k in rows:
        del COMBINE[k]


def _blocks(kinds, w=3, N=2, seed=0):
    rng = np.random.default_rng(seed)
    segs, dense = [], []
    for k in kinds:
        if k == "diag":
            a = rng.uniform(0.5, 1.5, (N, w))
            segs.append(Segment("diag", a[None]))
            dense.append(a[:, :, None] * np.eye(w))
        else:
            a = rng.standard_normal((N, w, w)) / w + np.eye(w)
            if k == "triu":
                a = np.triu(a)
            segs.append(Segment(k, a[None]))
            dense.append(a)
    return BlockSeq(segs, owned=True), dense


@pytest.mark.parametrize("backend", ["serial", "vectorized", "threads"])
@pytest.mark.parametrize("method", ["sequential", "sklansky", "brent_kung", "hillis_steele", "chunked"])
def test_triangular_kind_runs_everywhere(triu_kind, method, backend):
    kinds = ["triu", "triu", "diag", "triu", "dense", "triu", "triu", "diag", "triu", "triu", "triu"]
    seq, dense = _blocks(kinds)
    s = cp.schedule(method, len(kinds), workers=2)
    out = get_executor(backend).run(s, seq, workers=2)
    acc = dense[0]
    for k in range(len(kinds)):
        if k:
            acc = acc @ dense[k]
        kind, got = out.block(k)
        # the prefix stays triangular until the dense block at position 4 joins it
        assert kind == ("dense" if k >= 4 else "triu")
        np.testing.assert_allclose(got, acc, rtol=1e-12, atol=1e-12)


def test_triangular_kind_is_costed_by_its_own_rule(triu_kind):
    s = cp.schedule("sequential", 3)
    w = 6
    specs = [("triu", w, w)] * 3
    assert s.flops(specs) == 2 * (w * w * w // 3 + 1)
    assert s.flops([("dense", w, w)] * 3) == 2 * 2 * w ** 3
