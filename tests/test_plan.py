"""``cp.plan``: a plan decided once and reused; equal results to the one-shot calls."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import grads_close

import chainprod as cp
import chainprod.testing as cpt


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["backprop", "sklansky", "brent_kung", "chunked", "auto"])
def test_plan_grad_equals_grad(method, kernels):
    chain = cpt.random_chain(12, 4, kind="mixed", seed=3)
    p = cp.plan(chain, method=method, backend="threads", workers=2, kernels=kernels)
    for seed in range(3):  # the same plan on several batches
        x = np.random.default_rng(seed).standard_normal((2, chain.d_in))
        grads_close(p.grad(x), cpt.reference_grads(chain, x), 1e-10)
    assert p.schedule == "backprop" or isinstance(p.schedule, cp.Schedule)


def test_plan_holds_the_schedule_it_resolved():
    chain = cp.mlp([4] * 20 + [1])
    p = cp.plan(chain, method="chunked", workers=2)
    assert p.schedule.name == "chunked" and p.schedule.options["chunks"] == 3
    s = p.schedule
    p.grad(np.ones((1, 4)))
    assert p.schedule is s
    assert "chunked" in repr(p) and "Brent bound" in p.describe()


def test_auto_plan_decides_on_first_call_and_keeps_it():
    chain = cp.mlp([4] * 20 + [1])
    p = cp.plan(chain)  # compiled auto: decided by measuring the first batch
    assert p.schedule is None and "first call" in repr(p)
    v, g = p.value_and_grad(np.ones((2, 4)))
    assert p.schedule is not None
    first = p.schedule
    p.grad(np.ones((2, 4)))
    assert p.schedule is first


def test_product_plans():
    mats = cpt.random_mats(9, 3, seed=1)
    p = cp.plan(9, method="sklansky")
    out = p.suffix_products(mats)
    ref = cpt.left_fold_suffix(mats)
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(cp.plan(mats, method="tree").product(mats), ref[0], rtol=1e-12)
    shaped = cp.plan([("dense", 3, 3)] * 9, method="brent_kung")
    assert shaped.schedule.length == 9
    with pytest.raises(ValueError, match="9 matrices, got 4"):
        p.suffix_products(mats[:4])
    with pytest.raises(TypeError, match="products of matrices"):
        p.grad(np.ones(3))
    with pytest.raises(TypeError, match="gradients of a Chain"):
        cp.plan(cp.mlp([3, 3, 1])).suffix_products(mats)


def test_plan_rejects_bad_options_at_once():
    chain = cp.mlp([3, 3, 1])
    with pytest.raises(ValueError, match="valid backends"):
        cp.plan(chain, backend="nope")
    with pytest.raises(ValueError, match="valid methods"):
        cp.plan(chain, method="nope")
    with pytest.raises(ValueError, match="valid kernels"):
        cp.plan(chain, kernels="fortran")
    with pytest.raises(TypeError, match="plan\\(\\) takes"):
        cp.plan("chain")
