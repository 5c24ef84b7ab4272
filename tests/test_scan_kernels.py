"""The flat scan kernels (numba and numpy) against an independent reference.

The reference is a plain backward left fold of explicit Jacobian matrices,
written here from the layers' parameters and their own forward maps: it
shares no code with the planner or the kernels.
"""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

import chainprod as cp
from chainprod.kernels import pack
from chainprod.kernels.scan import plan_for, position_specs, run_scan_compiled, scan_rows
from chainprod.planning.flat import bind_flat, clear_cache, kind_signature
from chainprod.schedules import Round, Schedule

numba = pytest.importorskip("numba")

SCANS = sorted(set(cp.valid_schedules()) - {"auto", "tree"})
LENGTHS = [2, 3, 4, 5, 8, 17, 64]
ACTS = ["tanh", "relu", "sigmoid", "softplus", "identity"]


# -- chains ---------------------------------------------------------------------
def _dense(rng, d_out, d_in, act, dtype):
    W = rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)
    return cp.Dense(W.astype(dtype), (0.1 * rng.standard_normal(d_out)).astype(dtype), act)


def _diag(rng, d, act, dtype):
    return cp.Diagonal(rng.uniform(0.7, 1.2, d).astype(dtype), (0.1 * rng.standard_normal(d)).astype(dtype), act)


def make_chain(name, L, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    if name == "mlp":
        return cp.mlp([8] * L + [1], activation="tanh", dtype=dtype, seed=seed)
    if name == "mixed_acts":
        return cp.Chain([_dense(rng, 8 if l < L - 1 else 1, 8, ACTS[l % 5], dtype) for l in range(L)])
    if name == "widths":
        w = [(8, 12, 16)[l % 3] for l in range(L)] + [1]
        return cp.Chain([_dense(rng, w[l + 1], w[l], ACTS[l % 4], dtype) for l in range(L)])
    if name == "interleaved":
        layers = [_dense(rng, 6, 6, "tanh", dtype) if l % 2 else _diag(rng, 6, ACTS[l % 5], dtype)
                  for l in range(L - 1)]
        return cp.Chain(layers + [_dense(rng, 1, 6, "identity", dtype)])
    if name == "diagonal":
        return cp.diagonal_chain(L - 1, 5, activation="tanh", dtype=dtype, seed=seed) if L > 1 else None
    raise ValueError(name)


CHAINS = ["mlp", "mixed_acts", "widths", "interleaved", "diagonal"]


# -- the independent reference ------------------------------------------------------
def _jacobian(layer, y):
    """Explicit (N, d_out, d_in) input Jacobians of one layer from its outputs."""
    s = layer.derivs(y, layer.activation)
    if isinstance(layer, cp.Dense):
        return s[:, :, None] * layer.params[0][None]
    return np.stack([np.diag(r) for r in s * layer.params[0][None]])


def reference(chain, x, seed):
    """``(Y, V)`` flat in the packed layout; V by a left fold of explicit matrices."""
    acts = [x]
    for ly in chain.layers:
        acts.append(ly.forward(acts[-1]))
    L = len(chain)
    rows = [None] * L
    rows[L - 1] = seed
    v = seed[:, None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        for l in range(L - 1, 0, -1):
            v = v @ _jacobian(chain.layers[l], acts[l + 1])
            rows[l - 1] = v[:, 0, :]
    flat = lambda zs: np.concatenate([z.reshape(-1) for z in zs])  # noqa: E731
    return flat(acts[1:]), flat(rows)


def _inputs(chain, N, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, chain.d_in)).astype(chain.dtype)
    s = rng.standard_normal((N, chain.d_out)).astype(chain.dtype)
    return x, s


def _close(V, ref, dtype):
    tol = 1e-10 if dtype == np.float64 else 1e-4
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(V - ref).max() / scale
    return err <= tol, err


# -- correctness: every scan x chain x length x batch, both kernels ---------------
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("chain_name", CHAINS)
def test_rows_match_left_fold(chain_name, L):
    chain = make_chain(chain_name, L)
    pc = pack(chain)
    for N in (1, 3):
        x, seed = _inputs(chain, N)
        Y, ref = reference(chain, x, seed)
        for method in SCANS:
            if method == "independent" and L > 17:
                continue
            for kernels in ("numba", "numpy"):
                V, bad = scan_rows(pc, Y, seed, method, kernels=kernels, workers=2)
                ok, err = _close(V, ref, np.float64)
                assert ok and bad == -1, (chain_name, L, N, method, kernels, err, bad)


@pytest.mark.parametrize("chain_name", CHAINS)
def test_float32(chain_name):
    for L in (5, 64):
        chain = make_chain(chain_name, L, dtype=np.float32)
        pc = pack(chain)
        x, seed = _inputs(chain, 3)
        Y, _ = reference(chain, x, seed)
        # the reference in float64 from the float32 tape and parameters
        _, ref = reference(make_chain(chain_name, L, dtype=np.float64), x.astype(np.float64),
                           seed.astype(np.float64))
        for method in ("sequential", "sklansky", "brent_kung", "chunked"):
            for kernels in ("numba", "numpy"):
                V, bad = scan_rows(pc, Y, seed, method, kernels=kernels, workers=2)
                assert V.dtype == np.float32
                ok, err = _close(V.astype(np.float64), ref, np.float32)
                assert ok and bad == -1, (chain_name, L, method, kernels, err)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", ["sklansky", "brent_kung", "chunked", "hillis_steele", "sequential"])
def test_parallel_stages_and_workers(method, workers):
    """Force every stage with >= 2 lanes into a parallel region (threshold 0)."""
    chain = make_chain("interleaved", 40)
    pc = pack(chain)
    x, seed = _inputs(chain, 3)
    Y, ref = reference(chain, x, seed)
    sched = cp.schedule(method, pc.L - 1, workers=2)
    kinds, rows, cols = position_specs(pc)
    plan = bind_flat(sched, kinds, rows, cols, batch=3, parallel_min_flops=0.0)
    if method != "sequential":
        assert plan.stage_parallel.any()
    V, bad = run_scan_compiled(pc, Y, seed, plan, workers=workers)
    assert _close(V, ref, np.float64)[0] and bad == -1
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # restored after the call


def test_inputs_not_modified_and_last_row_is_seed():
    chain = make_chain("widths", 9)
    pc = pack(chain)
    x, seed = _inputs(chain, 3)
    Y, ref = reference(chain, x, seed)
    Y0, s0 = Y.copy(), seed.copy()
    V, _ = scan_rows(pc, Y, seed, "brent_kung")
    assert np.array_equal(Y, Y0) and np.array_equal(seed, s0)
    assert np.array_equal(V[3 * pc.y_off[-2]:], seed.reshape(-1))


def test_single_layer():
    chain = cp.mlp([4, 1])
    x, seed = _inputs(chain, 2)
    Y, _ = reference(chain, x, seed)
    for kernels in ("numba", "numpy"):
        V, bad = scan_rows(pack(chain), Y, seed, "sklansky", kernels=kernels)
        assert np.array_equal(V, seed.reshape(-1)) and bad == -1


# -- non-finite ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sequential", "sklansky", "brent_kung", "chunked"])
def test_overflow_reports_first_bad_prefix(method):
    L = 60
    rng = np.random.default_rng(3)
    layers = [cp.Dense(1e6 * np.eye(4) + rng.standard_normal((4, 4)), np.zeros(4), "identity")
              for _ in range(L - 1)] + [cp.Dense(np.ones((1, 4)), np.zeros(1), "identity")]
    chain = cp.Chain(layers)
    x = np.full((1, 4), 1e-300)  # a finite forward pass (tiny inputs), an overflowing backward product
    seed = np.ones((1, 1))
    Y, ref = reference(chain, x, seed)
    assert np.isfinite(Y).all()
    ref_rows = [ref[pc_off:pc_off + 4] for pc_off in range(0, 4 * (L - 1), 4)]
    # prefix k is v_{L-2-k}
    expect = next(k for k in range(L - 1) if not np.isfinite(ref_rows[L - 2 - k]).all())
    assert 0 < expect < L - 2
    for kernels in ("numba", "numpy"):
        _, bad = scan_rows(pack(chain), Y, seed, method, kernels=kernels, workers=2)
        assert bad == expect, (kernels, bad, expect)


# -- plans ----------------------------------------------------------------------------
def test_plan_cache_is_keyed_by_value():
    clear_cache()
    chain = make_chain("widths", 12)
    pc = pack(chain)
    s = cp.schedule("sklansky", pc.L - 1)
    p1 = plan_for(pc, s, 3)
    assert plan_for(pc, s, 3) is p1
    # an equal schedule built separately (another object): the same plan
    twin = Schedule(s.name, s.length, s.n_slots, [Round(*(np.array(a) for a in st)) for st in s.steps], s.outputs)
    assert twin is not s and plan_for(pc, twin, 3) is p1
    # different shapes, batch or schedule: different plans
    assert plan_for(pack(make_chain("mlp", 12)), s, 3) is not p1
    assert plan_for(pc, s, 1) is not p1
    assert plan_for(pc, cp.schedule("brent_kung", pc.L - 1), 3) is not p1
    clear_cache()
    assert plan_for(pc, s, 3) is not p1


def test_plan_is_plain_and_picklable():
    pc = pack(make_chain("interleaved", 20))
    plan = plan_for(pc, cp.schedule("chunked", pc.L - 1, workers=2), 2)
    back = pickle.loads(pickle.dumps(plan))
    for name, a in plan._asdict().items():
        assert np.array_equal(np.asarray(a), np.asarray(getattr(back, name))), name
    assert all(isinstance(a, (int, np.ndarray)) for a in plan)


def test_signature_is_run_length_encoded():
    pc = pack(make_chain("interleaved", 6))
    sig = kind_signature(*position_specs(pc))
    # head (dense 1x6), then layers 4, 3, 2, 1: diag, dense, diag, dense
    assert sig == ((0, 1, 1, 6), (1, 1, 6, 6), (0, 1, 6, 6), (1, 1, 6, 6), (0, 1, 6, 6))
    pc = pack(make_chain("mlp", 30))
    assert kind_signature(*position_specs(pc)) == ((0, 1, 1, 8), (0, 28, 8, 8))


def test_stages_fuse_sequential_phases():
    pc = pack(make_chain("mlp", 200))
    seq = plan_for(pc, cp.schedule("sequential", pc.L - 1), 1)
    assert seq.n_stages == 1 and seq.stage_rounds[0] == pc.L - 2  # one serial loop, no region per round
    ch = plan_for(pc, cp.schedule("chunked", pc.L - 1, chunks=5), 1)
    # folds/scans of chunks 0..3 as 4 lanes, the carry scan, the fix-ups of chunks 1..4 as 4 lanes
    lanes = np.diff(ch.stage_ptr)
    assert ch.n_stages <= 4 and lanes.max() == 4 and int(ch.stage_rounds.sum()) == cp.schedule(
        "chunked", pc.L - 1, chunks=5).rounds


def test_diagonal_positions_stay_diagonal():
    pc = pack(make_chain("diagonal", 30))
    plan = plan_for(pc, cp.schedule("brent_kung", pc.L - 1), 1)
    # interior products of diagonal blocks are diag(x)diag ops; prefixes are thin dense rows
    assert (plan.op_code == 3).any() and not (plan.op_code == 0).any()
    assert plan.buf_size <= 3 * 5 * plan.n_slots


# -- errors ----------------------------------------------------------------------------
def test_errors_say_what_is_wrong():
    chain = make_chain("mlp", 6)
    pc = pack(chain)
    x, seed = _inputs(chain, 2)
    Y, _ = reference(chain, x, seed)
    with pytest.raises(ValueError, match="valid kernels: numba, numpy"):
        scan_rows(pc, Y, seed, "sklansky", kernels="cuda")
    with pytest.raises(ValueError, match="does not produce every prefix"):
        scan_rows(pc, Y, seed, cp.schedule("tree", pc.L - 1))
    with pytest.raises(ValueError, match="is for 4 positions"):
        scan_rows(pc, Y, seed, cp.schedule("sklansky", 4))
    with pytest.raises(ValueError, match=r"cotangent must be \(N, 1\)"):
        scan_rows(pc, Y, np.ones((2, 3)), "sklansky")
    with pytest.raises(ValueError, match="flat tape of a batch of 2"):
        scan_rows(pc, Y[:-1], seed, "sklansky")
    with pytest.raises(TypeError, match="cotangent is float32"):
        scan_rows(pc, Y, seed.astype(np.float32), "sklansky")
    with pytest.raises(ValueError, match="workers"):
        scan_rows(pc, Y, seed, "sklansky", workers=0)
    with pytest.raises(ValueError, match="not adjacent"):
        bad = Schedule("broken", 5, 5, [Round(np.array([0]), np.array([2]), np.array([2]))], np.arange(5))
        scan_rows(pc, Y, seed, bad)


def test_import_does_not_import_numba():
    code = ("import sys, chainprod, chainprod.kernels.scan, chainprod.planning.flat, "
            "chainprod.kernels.scan_numpy; print('numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
