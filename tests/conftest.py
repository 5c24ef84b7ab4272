"""Shared helpers for the chainprod test suite.

Everything here is written without the engine: a plain left fold of dense
products, random blocks, a tolerance table. Tests import the helpers with
``from conftest import ...`` (pytest puts this directory on ``sys.path``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import chainprod as cp

#: local executors and the worker counts every local test crosses
LOCAL_BACKENDS = [("serial", None), ("vectorized", None), ("threads", 1), ("threads", 2), ("threads", 3)]
LOCAL_BACKEND_IDS = [b if w is None else f"{b}-w{w}" for b, w in LOCAL_BACKENDS]

#: every schedule that produces all prefixes, with the options it takes
SCAN_METHODS = [
    ("sequential", {}),
    ("independent", {}),
    ("hillis_steele", {}),
    ("sklansky", {}),
    ("brent_kung", {}),
    ("blelloch", {}),
    ("chunked", {"chunks": 2}),
    ("chunked", {"chunks": 3}),
    ("chunked", {"chunks": 7}),
    ("auto", {}),
]
SCAN_METHOD_IDS = [m + "".join(f"-{k}{v}" for k, v in o.items()) for m, o in SCAN_METHODS]

#: normwise relative tolerance per dtype
RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def rtol_for(dtype) -> float:
    return RTOL[np.dtype(dtype)]


def as_dense(m) -> np.ndarray:
    """A block (array or ``cp.Diag``) as a dense float64 array, built by hand."""
    if isinstance(m, cp.Diag):
        v = np.asarray(m.values, dtype=np.float64)
        out = np.zeros(v.shape + (v.shape[-1],))
        idx = np.arange(v.shape[-1])
        out[..., idx, idx] = v
        return out
    return np.asarray(m, dtype=np.float64)


def my_fold(mats) -> list[np.ndarray]:
    """``out[k] = mats[L-1] @ ... @ mats[k]``: a three-line fold in float64."""
    out, acc = [None] * len(mats), None
    for k in reversed(range(len(mats))):
        acc = as_dense(mats[k]) if acc is None else acc @ as_dense(mats[k])
        out[k] = acc
    return out


def rel_err(got, want) -> float:
    """Largest normwise relative error over the batch (Frobenius norm per matrix)."""
    got = as_dense(got)
    want = np.asarray(want, dtype=np.float64)
    got, want = np.broadcast_arrays(got, want)
    num = np.sqrt(((got - want) ** 2).sum(axis=(-2, -1)))
    den = np.sqrt((want**2).sum(axis=(-2, -1)))
    return float(np.max(num / np.maximum(den, np.finfo(np.float64).tiny)))


def assert_suffix_close(out, mats, rtol):
    """``out`` equals the hand fold of ``mats``; shapes and kinds as documented."""
    L = len(mats)
    assert isinstance(out, list) and len(out) == L
    ref = my_fold(mats)
    batched = any(np.ndim(m.values if isinstance(m, cp.Diag) else m) == (2 if isinstance(m, cp.Diag) else 3)
                  for m in mats)
    for k in range(L):
        all_diag = all(isinstance(m, cp.Diag) for m in mats[k:])
        if all_diag:
            assert isinstance(out[k], cp.Diag), f"out[{k}] should stay diagonal"
            vals = np.asarray(out[k].values)
            assert vals.ndim == (2 if batched else 1)
        else:
            assert isinstance(out[k], np.ndarray) and not isinstance(out[k], cp.Diag), f"out[{k}] should be dense"
            assert out[k].ndim == (3 if batched else 2)
        got = as_dense(out[k])
        want = ref[k]
        if batched:
            want = np.broadcast_to(want, got.shape[:1] + want.shape[-2:])
        assert got.shape == want.shape, (k, got.shape, want.shape)
        err = rel_err(got, want)
        assert err <= rtol, f"out[{k}] (L={L}) relative error {err:.3g} > {rtol:g}"


def snapshot(mats):
    """Deep copy of a list of arrays / Diag blocks, to check inputs are not modified."""
    return [cp.Diag(np.array(m.values, copy=True)) if isinstance(m, cp.Diag) else np.array(m, copy=True)
            for m in mats]


def assert_unchanged(mats, before):
    for k, (m, b) in enumerate(zip(mats, before)):
        a = m.values if isinstance(m, cp.Diag) else m
        bb = b.values if isinstance(b, cp.Diag) else b
        assert np.array_equal(np.asarray(a), np.asarray(bb)), f"input {k} was modified"


def make_readonly(mats):
    for m in mats:
        (m.values if isinstance(m, cp.Diag) else m).setflags(write=False)
    return mats


def orthogonal_mats(L, width, *, kind="dense", batch=None, seed=0, dtype=np.float64):
    """Norm-preserving blocks (orthogonal / +-1-ish diagonals) for long float32 chains.

    ``random_mats`` shrinks by about 0.7 per factor, so a product of 1000 of
    them underflows float32; products of these stay near norm 1.
    """
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    mats = []
    for _ in range(L):
        diag = kind == "diag" or (kind == "mixed" and rng.random() < 0.5)
        if diag:
            mats.append(cp.Diag((rng.choice([-1.0, 1.0], lead + (width,))
                                 * rng.uniform(0.97, 1.03, lead + (width,))).astype(dtype)))
        else:
            q, _ = np.linalg.qr(rng.standard_normal(lead + (width, width)))
            mats.append(q.astype(dtype))
    return mats


def layer_makers(rng, dtype):
    """``(dense(din, dout, act), diag(d, act))``: random layers of one dtype, drawn from ``rng`` in call order."""

    def dense(din, dout, act):
        W = rng.standard_normal((dout, din)) / np.sqrt(din)
        return cp.Dense(W.astype(dtype), (0.1 * rng.standard_normal(dout)).astype(dtype), act)

    def diag(d, act):
        return cp.Diagonal(rng.uniform(0.6, 1.3, d).astype(dtype), (0.1 * rng.standard_normal(d)).astype(dtype), act)

    return dense, diag


def chain_inputs(chain, N, dtype, seed=1):
    """A random input ``(N, d_in)`` and cotangent ``(N, d_out)`` for ``chain``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, chain.d_in)).astype(dtype)
    cotangent = rng.standard_normal((N, chain.d_out)).astype(dtype)
    return x, cotangent


def random_widths(L, seed, lo=1, hi=6):
    return [int(w) for w in np.random.default_rng(seed).integers(lo, hi, L + 1)]


def grads_close(g, ref, rtol, atol=0.0):
    """Per-layer, per-parameter comparison with a useful failure message."""
    assert len(g) == len(ref)
    for l, (gl, rl) in enumerate(zip(g, ref)):
        assert len(gl) == len(rl), f"layer {l}: {len(gl)} parameter grads, expected {len(rl)}"
        for i, (a, b) in enumerate(zip(gl, rl)):
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b, dtype=np.float64)
            assert a.shape == b.shape, f"layer {l} param {i}: shape {a.shape} != {b.shape}"
            scale = max(float(np.abs(b).max(initial=0.0)), 1e-300)
            err = float(np.abs(a - b).max(initial=0.0))
            assert err <= rtol * scale + atol, f"layer {l} param {i}: max abs error {err:.3g} (scale {scale:.3g})"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _quiet_overflow():
    # Overflow tests provoke numpy RuntimeWarnings on purpose; the errors are what we assert.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


__all__ = [
    "LOCAL_BACKENDS", "LOCAL_BACKEND_IDS", "SCAN_METHODS", "SCAN_METHOD_IDS", "RTOL", "rtol_for",
    "as_dense", "my_fold", "rel_err", "assert_suffix_close", "snapshot", "assert_unchanged",
    "make_readonly", "orthogonal_mats", "random_widths", "grads_close",
]
