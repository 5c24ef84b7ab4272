"""The public surface: what public functions return or raise is reachable as ``cp.<Name>``.

A user writes ``except cp.DistributedError`` or ``def f(t: cp.Tape)``
without knowing which module made the object. Deprecated names keep working
for one release and say what replaces them.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import chainprod as cp
from chainprod import errors


def _exported(obj_type):
    name = obj_type.__name__
    return name in cp.__all__ and getattr(cp, name) is obj_type


def test_every_error_chainprod_raises_is_exported():
    classes = [getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))]
    assert len(classes) == 8
    missing = [c.__name__ for c in classes if not _exported(c)]
    assert not missing, f"errors not exported from chainprod: {missing}"


def test_what_the_public_functions_return_is_exported():
    chain = cp.mlp([3, 4, 4, 1], seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3))
    tape = cp.forward(chain, x)
    made = {
        "forward": tape,
        "grad (compiled)": cp.grad(chain, x, method="backprop"),
        "plan": cp.plan(chain, method="sklansky"),
        "schedule": cp.schedule("sklansky", 5),
        "describe": cp.schedule("sklansky", 5).describe(),
        "get_executor": cp.get_executor("vectorized"),
        "trace": cp.grad(chain, x, method="sklansky", kernels="numpy", return_trace=True)[1],
        "linear_recurrence": cp.linear_recurrence(np.ones((3, 2, 2)), np.ones((3, 2)), return_trace=True)[1],
        "RNN.from_params": cp.RNN.from_params({"weight_ih_l0": np.ones((2, 3)), "weight_hh_l0": np.eye(2)}),
    }
    missing = {what: type(v).__name__ for what, v in made.items()
               if not any(_exported(t) for t in type(v).__mro__ if t is not object)}
    assert not missing, f"returned types not exported from chainprod: {missing}"
    assert isinstance(made["grad (compiled)"], cp.LayerGrads)
    assert isinstance(made["get_executor"], cp.Executor)


def test_register_executor_is_public_and_says_what_is_wrong():
    with pytest.raises((TypeError, ValueError)):
        cp.register_executor("vectorized", object)


def test_deprecated_names_still_work_and_warn():
    chain = cp.mlp([3, 4, 1], seed=1)
    x = np.ones((2, 3))
    tape = cp.forward(chain, x)
    with pytest.warns(DeprecationWarning, match="loss_cotangent"):
        value, ct = cp.loss_seed(tape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value2, ct2 = cp.loss_cotangent(tape)
    assert value == value2 and np.array_equal(ct, ct2)
    with pytest.warns(DeprecationWarning, match="cotangent"):
        g_old = cp.backward(tape, seed=ct, method="backprop")
    g_new = cp.backward(tape, ct, method="backprop")
    for a, b in zip(g_old, g_new):
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p, q)
    from chainprod.testing import reference_grads
    with pytest.warns(DeprecationWarning, match="cotangent"):
        r_old = reference_grads(chain, x, seed=ct)
    r_new = reference_grads(chain, x, ct)
    for a, b in zip(r_old, r_new):
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p, q)
