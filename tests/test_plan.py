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


# -- a plan after a training step: the parameters are given, never silently stale ----------------------------
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["backprop", "sklansky", "auto"])
def test_plan_computes_with_the_parameters_after_sgd_step(method, kernels):
    chain = cpt.random_chain(10, 4, kind="mixed", seed=5)
    x = np.random.default_rng(1).standard_normal((3, chain.d_in))
    p = cp.plan(chain, method=method, backend="threads", workers=2, kernels=kernels)
    g = p.grad(x)
    new = chain.sgd_step(g, lr=0.5)
    ref = cp.grad(new, x, method="backprop", kernels="numpy")
    old = cp.grad(chain, x, method="backprop", kernels="numpy")
    assert max(float(np.abs(a - b).max()) for gl, rl in zip(ref, old) for a, b in zip(gl, rl)) > 1e-3
    schedule = p.schedule
    grads_close(p.grad(x, params=new), ref, 1e-10)                      # per call, a Chain
    grads_close(p.grad(x, params=new.params), ref, 1e-10)               # per call, the params list
    value, g2 = p.value_and_grad(x, params=new)
    grads_close(g2, ref, 1e-10)
    assert value == pytest.approx(cp.value_and_grad(new, x, kernels="numpy")[0], rel=1e-12)
    q = p.with_params(new)                                              # once, at no planning cost
    grads_close(q.grad(x), ref, 1e-10)
    assert q.schedule is p.schedule is schedule and q.chain is new and p.chain is chain
    with pytest.warns(UserWarning, match="old parameters; pass params=new_chain, or use plan.with_params"):
        stale = p.grad(x)  # the plan's own chain was superseded: computed there, and said so
    grads_close(stale, old, 1e-10)


def test_plan_with_params_refuses_another_structure_naming_the_layer():
    chain = cp.mlp([4, 8, 8, 1])
    p = cp.plan(chain, method="sklansky")
    x = np.ones((2, 4))
    with pytest.raises(ValueError, match=r"at layer 1: Dense\(8 -> 6, tanh\).*where the plan has Dense\(8 -> 8"):
        p.grad(x, params=cp.Chain([chain[0], cp.mlp([8, 6, 1]).layers[0], cp.mlp([6, 1]).layers[0]]))
    with pytest.raises(ValueError, match=r"at layer 2: Dense\(8 -> 1, relu\)"):
        p.with_params(cp.Chain([*chain.layers[:2], cp.Dense(*chain[2].params, activation="relu")]))
    with pytest.raises(ValueError, match=r"at layer 0: .* in float32 where the plan has .* in float64"):
        p.grad(x, params=chain.with_params([tuple(a.astype(np.float32) for a in ps) for ps in chain.params]))
    with pytest.raises(ValueError, match="chain of 2 layers but this plan's chain has 3"):
        p.grad(x, params=cp.mlp([4, 8, 1]))
    with pytest.raises(ValueError, match="params has 2 layers"):
        p.grad(x, params=chain.params[:2])
    bad = [*chain.params[:2], (np.ones((1, 7)), np.ones(1))]
    with pytest.raises(ValueError, match=r"params of layer 2 have shapes \(\(1, 7\), \(1,\)\), but layer 2"):
        p.with_params(bad)
    with pytest.raises(TypeError, match="params must be a Chain"):
        p.grad(x, params=np.ones(3))
    with pytest.raises(TypeError, match="needs the parameters"):
        p.with_params(None)
    with pytest.raises(TypeError, match="products of matrices"):
        cp.plan(8).with_params(chain)


@pytest.mark.parametrize("batch", [-3, 0, 1.5, True, "4"])
def test_plan_refuses_a_bad_batch(batch):
    with pytest.raises(ValueError, match=f"batch must be a positive int .*got {batch!r}"):
        cp.plan(cp.mlp([3, 3, 1]), batch=batch)


def test_plan_checks_engine_options_when_made():
    with pytest.raises(TypeError, match="engine_options must be a dict"):
        cp.plan(cp.mlp([3, 3, 1]), engine_options="timeout=3")
    with pytest.raises(TypeError, match="takes no engine options"):
        cp.plan(cp.mlp([3, 3, 1]), backend="threads", engine_options={"timeout": 3})
