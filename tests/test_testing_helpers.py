"""``chainprod.testing.assert_grads_close``: passes on true gradients, names the layer on wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
import chainprod.testing as cpt


@pytest.mark.parametrize("method", ["backprop", "sklansky", "chunked"])
def test_passes_on_true_gradients(method):
    chain = cpt.random_chain(6, 4, seed=3)
    x = np.random.default_rng(0).standard_normal((3, chain.d_in))
    g = cpt.assert_grads_close(chain, x, method=method)
    assert len(g) == len(chain)


def test_float32_and_mse():
    chain = cpt.random_chain(4, 3, seed=1, dtype=np.float32)
    x = np.random.default_rng(1).standard_normal((2, chain.d_in)).astype(np.float32)
    y = np.zeros((2, chain.d_out), np.float32)
    cpt.assert_grads_close(chain, x, y, loss="mse")


def test_names_the_wrong_layer_with_both_values(monkeypatch):
    chain = cpt.random_chain(5, 3, seed=2)
    x = np.ones((2, chain.d_in))
    true = cp.grad(chain, x)

    def wrong_grad(*args, **kwargs):  # layer 2's weights off by 10%
        g = [tuple(np.array(p) for p in layer) for layer in true]
        g[2] = (g[2][0] * 1.1, g[2][1])
        return g

    monkeypatch.setattr(cpt, "grad", wrong_grad)
    with pytest.raises(cp.errors.GradientCheckError) as e:
        cpt.assert_grads_close(chain, x)
    msg = str(e.value)
    assert "layer    2" in msg and "analytic" in msg and "numerical" in msg
    assert "layer    1" not in msg and "layer    3" not in msg


def test_check_grad_still_reports_per_layer_errors():
    chain = cpt.random_chain(4, 3, seed=5)
    errs = cp.check_grad(chain, np.ones((2, chain.d_in)))
    assert errs.shape == (4,) and errs.max() < 1e-6
