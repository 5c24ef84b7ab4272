"""One contract suite, run on every executor the registry lists.

``executor.run(schedule, blocks, workers=P, trace=trace)`` must give the
left fold of the blocks for every schedule and block kind, never touch
blocks it does not own, and fill the trace with measured events.
Distributed executors (ray, dask) start an embedded cluster on first use;
sizes stay small (L <= 33) and ``workers=2`` everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import assert_suffix_close, my_fold, rel_err

import chainprod as cp
from chainprod.blocks import BlockSeq, Segment
from chainprod.testing import random_chain, random_mats, reference_grads

BACKENDS = cp.valid_backends()
SCANS = [("sequential", {}), ("independent", {}), ("hillis_steele", {}), ("sklansky", {}), ("brent_kung", {}),
         ("blelloch", {}), ("chunked", {"chunks": 2}), ("chunked", {"chunks": 5}), ("auto", {})]
SCAN_IDS = [m + "".join(f"-{v}" for v in o.values()) for m, o in SCANS]
LENGTHS = [1, 2, 3, 5, 8, 17, 33]
DISTRIBUTED_LENGTHS = [1, 2, 5, 17, 33]
LOCAL = ("serial", "vectorized", "threads")
WORKERS = 2


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def plan(method, opts, L, backend):
    return cp.schedule(method, L, workers=WORKERS, backend=backend, **opts)


def scan_blocks(L, kind, batch, seed, width=3):
    """(items, BlockSeq): ``items[p] = (kind, (N, ...) array)`` in scan order, grouped into segments."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(L):
        k = kind if kind != "mixed" else ("diag" if rng.random() < 0.5 else "dense")
        if k == "diag":
            items.append(("diag", rng.uniform(0.5, 1.5, (batch, width))))
        else:
            items.append(("dense", 0.7 * (np.eye(width) + rng.standard_normal((batch, width, width)) / 3)))
    segments, run = [], []
    for it in items:
        if run and run[0][0] != it[0]:
            segments.append(Segment(run[0][0], np.stack([a for _, a in run])))
            run = []
        run.append(it)
    segments.append(Segment(run[0][0], np.stack([a for _, a in run])))
    for s in segments:
        s.array.setflags(write=False)
    return items, BlockSeq(segments, owned=False)


def prefix_fold(items):
    """``[0, k] = a_0 a_1 ... a_k`` by hand, dense float64, per batch element."""
    out, acc = [], None
    for kind, a in items:
        m = np.einsum("nd,de->nde", a, np.eye(a.shape[-1])) if kind == "diag" else a
        acc = m if acc is None else acc @ m
        out.append(acc)
    return out


def to_dense(kind, a):
    return np.einsum("nd,de->nde", a, np.eye(a.shape[-1])) if kind == "diag" else a


# -- results ------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", SCANS, ids=SCAN_IDS)
def test_suffix_products_match_left_fold(backend, method, opts):
    local = backend in LOCAL
    for L in LENGTHS if local else DISTRIBUTED_LENGTHS:
        if method == "independent" and L > 17:
            continue
        for kind in ("dense", "diag", "mixed"):
            # distributed engines pay a round trip per call: one batching per (L, kind) there
            for batch in (None, 2) if local else ((None, 2)[(L + len(kind)) % 2],):
                mats = random_mats(L, 3, kind=kind, batch=batch, seed=L + 31 * len(kind))
                out = cp.suffix_products(mats, method=plan(method, opts, L, backend), backend=backend,
                                         workers=WORKERS)
                assert_suffix_close(out, mats, 1e-10)


@pytest.mark.parametrize("method,opts", SCANS, ids=SCAN_IDS)
def test_run_contract_on_blockseq(backend, method, opts):
    ex = cp.get_executor(backend)
    for L, kind in ((1, "dense"), (4, "diag"), (9, "mixed"), (17, "dense"), (33, "mixed")):
        items, seq = scan_blocks(L, kind, batch=2, seed=L)
        before = [s.array.copy() for s in seq.segments]
        s = plan(method, opts, L, backend)
        trace = cp.Trace(backend=backend, workers=WORKERS)
        result = ex.run(s, seq, workers=WORKERS, trace=trace)
        assert sorted(np.asarray(result.available()).tolist()) == list(range(L))
        want = prefix_fold(items)
        for k in range(L):
            kd, arr = result.block(k)
            all_diag = all(it[0] == "diag" for it in items[: k + 1])
            assert kd == ("diag" if all_diag else "dense")
            assert arr.shape[0] == 2
            assert rel_err(to_dense(kd, np.asarray(arr)), want[k]) <= 1e-10
        assert result.first_nonfinite() is None
        for a, b in zip(seq.segments, before):  # blocks it does not own are never written
            assert np.array_equal(a.array, b)
        if kind == "dense":
            kd, st = result.stack()
            assert kd == "dense" and st.shape == (L, 2, 3, 3)
            for k in range(L):
                assert rel_err(st[k], want[k]) <= 1e-10


def test_total_product_with_tree(backend):
    for L in (1, 2, 7, 16, 33):
        for kind in ("dense", "diag", "mixed"):
            mats = random_mats(L, 3, kind=kind, batch=2, seed=L)
            got = cp.product(mats, method="tree", backend=backend, workers=WORKERS)
            assert rel_err(got, my_fold(mats)[0]) <= 1e-10
            if kind == "diag":
                assert isinstance(got, cp.Diag)
    ex = cp.get_executor(backend)
    items, seq = scan_blocks(9, "dense", 1, seed=3)
    res = ex.run(cp.schedule("tree", 9), seq, workers=WORKERS)
    assert np.asarray(res.available()).tolist() == [8]
    assert rel_err(res.block(8)[1], prefix_fold(items)[8]) <= 1e-10


def test_thin_head_gradient_shapes(backend):
    rng = np.random.default_rng(5)
    mats = [rng.standard_normal((4, 2))] + [rng.standard_normal((4, 4)) / 2 for _ in range(12)]
    mats += [rng.standard_normal((1, 4))]
    for method in ("sklansky", "brent_kung", "chunked"):
        out = cp.suffix_products(mats, method=method, backend=backend, workers=WORKERS)
        assert_suffix_close(out, mats, 1e-10)


def test_grad_on_backend(backend):
    for kind in ("dense", "diag", "mixed"):
        chain = random_chain(12, 4, kind=kind, seed=7)
        x = np.random.default_rng(7).standard_normal((3, 4))
        ref = reference_grads(chain, x)
        for method in ("sklansky", "brent_kung", "chunked", "auto"):
            g = cp.grad(chain, x, method=method, backend=backend, workers=WORKERS)
            for gl, rl in zip(g, ref):
                for a, b in zip(gl, rl):
                    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_repeated_runs_agree(backend):
    mats = random_mats(17, 3, kind="mixed", batch=2, seed=9)
    first = cp.suffix_products(mats, method="sklansky", backend=backend, workers=WORKERS)
    for _ in range(2):
        again = cp.suffix_products(mats, method="sklansky", backend=backend, workers=WORKERS)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(np.asarray(getattr(a, "values", a)), np.asarray(getattr(b, "values", b)))


def test_overflow_detected(backend):
    with pytest.raises(cp.NonFiniteError, match=r"mats\[1\.\.2\]"):
        cp.suffix_products([1e200 * np.eye(2)] * 3, method="sklansky", backend=backend, workers=WORKERS)


# -- traces ------------------------------------------------------------------------
@pytest.mark.parametrize("method,opts", [m for m in SCANS if m[0] != "auto"],
                         ids=[i for i in SCAN_IDS if i != "auto"])
def test_trace_events(backend, method, opts):
    L = 17
    mats = random_mats(L, 3, kind="mixed", batch=2, seed=1)
    s = plan(method, opts, L, backend)
    out, trace = cp.suffix_products(mats, method=s, backend=backend, workers=WORKERS, return_trace=True)
    assert_suffix_close(out, mats, 1e-10)
    assert isinstance(trace, cp.Trace)
    assert trace.workers == WORKERS
    ev = trace.events
    assert ev, "a run with ops records events"
    for e in ev:
        assert isinstance(e.round, (int, np.integer)) and 0 <= e.round < s.rounds
        assert isinstance(e.worker, str) and e.worker
        assert np.isfinite(e.start) and np.isfinite(e.end) and 0 <= e.start <= e.end
        assert isinstance(e.ops, (int, np.integer)) and e.ops >= 1
    assert sum(e.ops for e in ev) == s.num_ops
    per_round = np.zeros(s.rounds, dtype=int)
    for e in ev:
        per_round[e.round] += e.ops
    assert per_round.tolist() == s.widths
    assert trace.rounds == s.rounds
    assert trace.num_tasks == len(ev)
    assert 1 <= trace.peak_concurrency() <= len(ev)
    assert trace.span >= 0
    recs = trace.to_records()
    assert len(recs) == len(ev) and {"round", "worker", "start", "end", "ops"} <= set(recs[0])


@pytest.mark.parametrize("local", ["serial", "vectorized", "threads"])
def test_trace_round_order_local(local):
    # local executors run each round as a barrier: a round's tasks start only after every
    # task of the round before it has ended (distributed executors only follow data
    # dependencies, so this holds for them per dependency chain, not globally)
    backend = local
    s = cp.schedule("sklansky", 33)
    mats = random_mats(33, 3, seed=2)
    _, trace = cp.suffix_products(mats, method=s, backend=backend, workers=WORKERS, return_trace=True)
    ends = {}
    for e in trace.events:
        ends[e.round] = max(ends.get(e.round, 0.0), e.end)
    for e in trace.events:
        if e.round > 0:
            assert e.start >= ends[e.round - 1] - 1e-3


def test_trace_with_grad(backend):
    chain = random_chain(10, 3, kind="mixed", seed=4)
    x = np.ones((2, 3))
    g, trace = cp.grad(chain, x, method="brent_kung", backend=backend, workers=WORKERS, return_trace=True)
    assert sum(e.ops for e in trace.events) == cp.schedule("brent_kung", len(chain) - 1).num_ops
    assert len(g) == len(chain)


def test_single_factor_runs_nothing(backend):
    out, trace = cp.suffix_products([np.eye(2) * 3.0], method="sklansky", backend=backend, workers=WORKERS,
                                    return_trace=True)
    np.testing.assert_array_equal(out[0], np.eye(2) * 3.0)
    assert trace.events == [] or sum(e.ops for e in trace.events) == 0


def test_registry_names():
    assert {"serial", "vectorized", "threads", "ray", "dask"} <= set(BACKENDS)
    for name in BACKENDS:
        assert isinstance(cp.executors.EXECUTORS[name], tuple)


def test_import_is_light():
    code = textwrap.dedent("""
        import sys
        import chainprod, chainprod.testing, chainprod.executors
        heavy = [m for m in ("ray", "dask", "distributed", "matplotlib", "torch", "jax")
                 if m in sys.modules]
        print(",".join(heavy))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"import chainprod imported {res.stdout.strip()}"


# -- the array executor on torch and JAX arrays (CPU) --------------------------------
@pytest.fixture(params=["torch", "jax"])
def array_lib(request):
    """``(to_library, to_numpy, array type, (L, kind) cases)``; JAX computes in float64 for the test, on
    fewer cases: it compiles every new plan shape (about a second each on a loaded CPU)."""
    if request.param == "torch":
        torch = pytest.importorskip("torch")
        yield (lambda a: torch.from_numpy(np.array(a)), lambda a: a.numpy(), torch.Tensor,
               ((1, "dense"), (5, "diag"), (9, "mixed"), (17, "dense")))
    else:
        jax = pytest.importorskip("jax")
        with jax.enable_x64(True):
            yield jax.numpy.asarray, np.asarray, jax.Array, ((9, "mixed"),)


@pytest.mark.parametrize("method,opts", SCANS, ids=SCAN_IDS)
def test_array_executor_on_foreign_blocks(array_lib, method, opts):
    to_lib, to_np, array_type, cases = array_lib
    ex = cp.get_executor("array")
    for L, kind in cases:
        items, seq = scan_blocks(L, kind, batch=2, seed=L)
        fseq = BlockSeq([Segment(s.kind, to_lib(s.array)) for s in seq.segments])
        before = [to_np(s.array).copy() for s in fseq.segments]
        s = plan(method, opts, L, "array")
        trace = cp.Trace(backend="array") if L == 5 else None  # with a trace, round by round
        result = ex.run(s, fseq, workers=WORKERS, trace=trace)
        want = prefix_fold(items)
        for k in range(L):
            kd, arr = result.block(k)
            assert isinstance(arr, array_type) and arr.dtype == fseq.segments[0].array.dtype
            assert rel_err(to_dense(kd, to_np(arr)), want[k]) <= 1e-10
        assert result.first_nonfinite() is None
        for a, b in zip(fseq.segments, before):
            assert np.array_equal(to_np(a.array), b)
        if trace is not None:
            assert sum(e.ops for e in trace.events) == s.num_ops
        if kind == "dense":
            kd, st = result.stack()
            assert isinstance(st, array_type) and tuple(st.shape) == (L, 2, 3, 3)
            assert max(rel_err(to_np(st[k]), want[k]) for k in range(L)) <= 1e-10


def test_array_executor_finds_nonfinite(array_lib):
    to_lib = array_lib[0]
    items, seq = scan_blocks(9, "dense", batch=2, seed=3)
    bad = np.array(seq.segments[0].array)
    bad[4, 1, 0, 0] = np.inf
    res = cp.get_executor("array").run(cp.schedule("sklansky", 9), BlockSeq([Segment("dense", to_lib(bad))]))
    assert res.first_nonfinite() == 4
