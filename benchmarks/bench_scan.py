"""suffix_products on every local executor and jax.lax.associative_scan (when installed)."""

import numpy as np
import pytest

import chainprod as cp

SIZES = [(256, 8), (1024, 8), (1024, 32), (4096, 8)]


@pytest.mark.parametrize("L,w", SIZES)
@pytest.mark.parametrize("backend", ["vectorized", "threads"])
@pytest.mark.parametrize("method", ["sequential", "sklansky", "brent_kung", "chunked"])
def test_suffix_products(benchmark, L, w, backend, method):
    mats = [np.random.default_rng(i).standard_normal((w, w)) / np.sqrt(w) for i in range(L)]
    benchmark.group = f"suffix_products L={L} w={w}"
    benchmark(cp.suffix_products, mats, method=method, backend=backend, workers=2)


@pytest.mark.parametrize("L,w", SIZES)
def test_jax_associative_scan(benchmark, L, w):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).standard_normal((L, w, w)) / np.sqrt(w))
    f = jax.jit(lambda a: jax.lax.associative_scan(jnp.matmul, a))
    f(a).block_until_ready()
    benchmark.group = f"suffix_products L={L} w={w}"
    benchmark(lambda: f(a).block_until_ready())
