"""``cp.linear_recurrence`` against a plain loop, on every scan schedule and executor, and its errors.

The reference is a Python loop over the steps and the samples in float64,
written here without chainprod. The affine combine rule is checked for
associativity on random blocks, and the block-algebra tables for the two
affine kinds. Ray and Dask run on the default executors' embedded clusters,
started once per session (the same ones ``tests/test_distributed.py`` uses).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import chainprod as cp
from chainprod.blocks import COMBINE, KINDS, Diag, combine, kind_table
from chainprod.errors import NonFiniteError
from chainprod.schedules import valid_methods

#: every schedule of the registry (names and aliases) that gives every prefix, and "auto"
SCANS = sorted(m for m in valid_methods() if cp.schedule(m, 9, workers=2).is_scan) + ["auto"]
LOCAL = [("serial", None), ("vectorized", None), ("threads", 2), ("threads", 3)]
LOCAL_IDS = [b if w is None else f"{b}-w{w}" for b, w in LOCAL]
#: float32 states of a stable recurrence (|A_t| <= 1) agree with the float64 loop to this, relative to the
#: largest state; float64 to rounding
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def reference(A, b, h0, diag):
    """``h_t = A_t h_{t-1} + b_t`` one sample and one step at a time, in float64: ``(T, N, d)``."""
    A, b = np.asarray(A, np.float64), np.asarray(b, np.float64)
    T, d = b.shape[0], b.shape[-1]
    N = max(b.shape[1] if b.ndim == 3 else 1, A.shape[1] if A.ndim == (3 if diag else 4) else 1,
            1 if h0 is None or np.ndim(h0) == 1 else np.shape(h0)[0])
    out = np.zeros((T, N, d))
    for n in range(N):
        h = np.zeros(d) if h0 is None else np.asarray(h0, np.float64)[n] if np.ndim(h0) == 2 else np.asarray(h0)
        for t in range(T):
            At = A[t][n] if A.ndim == (3 if diag else 4) else A[t]
            bt = b[t][n] if b.ndim == 3 else b[t]
            h = (At * h if diag else At @ h) + bt
            out[t, n] = h
    return out


def problem(kind, batched, dtype=np.float64, T=23, N=3, d=4, seed=0):
    """Stable random ``A`` (spectral norm <= 0.95), ``b`` and ``h0``; batched: ``A``, ``b``, ``h0`` all carry N."""
    rng = np.random.default_rng(seed)
    lead = (T, N) if batched else (T,)
    if kind == "diag":
        A = Diag(rng.uniform(-0.95, 0.95, lead + (d,)).astype(dtype))
    else:
        q, _ = np.linalg.qr(rng.standard_normal(lead + (d, d)))
        A = (0.95 * q).astype(dtype)
    b = rng.standard_normal(lead + (d,)).astype(dtype)
    h0 = rng.standard_normal((N, d) if batched else (d,)).astype(dtype)
    return A, b, h0


def check(states, A, b, h0, dtype=np.float64):
    diag = isinstance(A, Diag)
    ref = reference(A.values if diag else A, b, h0, diag)
    batched = ref.shape[1] > 1 or (np.ndim(b) == 3)
    assert states.dtype == dtype
    assert states.shape == (ref.shape if batched else (ref.shape[0], ref.shape[2]))
    got = states if batched else states[:, None]
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= RTOL[dtype], f"max relative error {err:.3g}"


def test_every_scan_of_the_registry_is_here():
    assert {"sequential", "sklansky", "brent_kung", "hillis_steele", "independent", "chunked"} <= set(SCANS)
    assert "tree" not in SCANS


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("backend,workers", LOCAL, ids=LOCAL_IDS)
@pytest.mark.parametrize("method", SCANS)
@pytest.mark.parametrize("batched", [False, True], ids=["one", "batched"])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_equals_the_loop_float64(kind, batched, method, backend, workers, kernels):
    A, b, h0 = problem(kind, batched)
    check(cp.linear_recurrence(A, b, h0, method=method, backend=backend, workers=workers, kernels=kernels), A, b,
          h0)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", SCANS)
@pytest.mark.parametrize("batched", [False, True], ids=["one", "batched"])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_equals_the_loop_float32(kind, batched, method, kernels):
    A, b, h0 = problem(kind, batched, np.float32, T=200, seed=1)
    check(cp.linear_recurrence(A, b, h0, method=method, kernels=kernels), A, b, h0, np.float32)


@pytest.mark.parametrize("d", [1, 3, 4, 7, 9])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_the_compiled_loop_equals_numpys_at_every_width(kind, d):
    # the compiled loop takes a dense A four rows at a time: widths below, at and past a multiple of four
    A, b, h0 = problem(kind, True, T=40, N=2, d=d, seed=5)
    got = cp.linear_recurrence(A, b, h0, method="sequential", kernels="numba")
    ref = cp.linear_recurrence(A, b, h0, method="sequential", kernels="numpy")
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)
    check(got, A, b, h0)


@pytest.mark.parametrize("backend", ["serial", "vectorized", "threads"])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_the_sequential_schedule_through_an_executor(kind, backend):
    # a string backend runs "sequential" as the plain loop; an Executor instance runs the schedule
    A, b, h0 = problem(kind, True)
    states, trace = cp.linear_recurrence(A, b, h0, method="sequential", backend=cp.get_executor(backend),
                                         workers=2, return_trace=True)
    check(states, A, b, h0)
    assert trace.schedule.name == "sequential" and trace.rounds == 23


@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_shapes_mixed_batch_axes_and_default_h0(kind):
    A, b, h0 = problem(kind, True, T=9, N=2, d=3, seed=2)
    a_one = Diag(A.values[:, 0]) if kind == "diag" else A[:, 0]
    cases = [
        (A, b, None),  # h0 = 0
        (a_one, b, h0),  # A without a batch axis: one A for every sample
        (A, b[:, 0], h0),  # b without one
        (a_one, b[:, 0], h0),  # only h0 carries the batch
        (a_one, b[:, 0], h0[0]),  # nothing does: (T, d)
    ]
    for method, kernels in itertools.product(("sequential", "sklansky", "chunked"), ("numba", "numpy")):
        for A_, b_, h_ in cases:
            check(cp.linear_recurrence(A_, b_, h_, method=method, kernels=kernels), A_, b_, h_)
    assert cp.linear_recurrence(a_one, b[:, 0], method="sklansky").shape == (9, 3)
    # lists of steps are arrays too
    steps = list(A.values if kind == "diag" else A)
    check(cp.linear_recurrence(Diag(steps) if kind == "diag" else steps, list(b), h0), A, b, h0)


def test_one_step_and_a_long_diagonal_sequence():
    A, b, h0 = problem("diag", False, T=1)
    for method in ("sequential", "sklansky", "auto"):
        check(cp.linear_recurrence(A, b, h0, method=method), A, b, h0)
    A, b, h0 = problem("diag", True, T=3000, N=2, d=2, seed=3)
    for method in ("chunked", "brent_kung", "auto"):
        check(cp.linear_recurrence(A, b, h0, method=method, backend="threads", workers=2), A, b, h0)


def test_traces():
    A, b, h0 = problem("dense", True)
    # the numpy reference runs a scan on the executor, round by round; the compiled scan is one task
    states, trace = cp.linear_recurrence(A, b, h0, method="sklansky", return_trace=True, kernels="numpy")
    assert trace.schedule.name == "sklansky" and trace.rounds == trace.schedule.rounds
    states, trace = cp.linear_recurrence(A, b, h0, method="sklansky", return_trace=True, kernels="numba")
    (event,) = trace.events
    assert trace.schedule.name == "sklansky" and event.ops == trace.schedule.num_ops and "compiled" in event.task
    for kernels in ("numba", "numpy"):
        states, trace = cp.linear_recurrence(A, b, h0, method="sequential", return_trace=True, kernels=kernels)
        assert trace.schedule is None and "loop" in trace.note and trace.events[0].ops == 23
    given = cp.Trace()
    out = cp.linear_recurrence(A, b, h0, method="brent_kung", return_trace=given)
    assert out[1] is given and given.events



@pytest.mark.parametrize("scan_wins", [True, False])
def test_compiled_auto_runs_a_proposed_scan_only_if_it_beats_the_compiled_loop(monkeypatch, scan_wins):
    # a long diagonal recurrence, where the cost model (which prices the numpy loop) proposes a scan; the two
    # timings are replaced so that each outcome is taken for sure (the scan is timed first, then the loop)
    import chainprod.recurrence as rec

    A, b, h0 = problem("diag", True, T=3000, N=2, d=2, seed=3)
    proposed = cp.linear_recurrence(A, b, h0, return_trace=True, kernels="numpy")[1].schedule
    assert proposed is not None and proposed.is_scan
    timings = iter([1.0, 2.0] if scan_wins else [2.0, 1.0])
    monkeypatch.setattr(rec, "best_seconds", lambda fn, repeats: (fn(), next(timings))[1])
    cp.clear_caches()
    for _ in range(2):  # the second call reuses the first one's answer (no timing left to take)
        states, trace = cp.linear_recurrence(A, b, h0, return_trace=True, kernels="numba")
        check(states, A, b, h0)
        if scan_wins:
            assert trace.schedule.name == proposed.name and "ran the scan" in trace.note
        else:
            assert trace.schedule is None and "ran the compiled loop" in trace.note
        assert f"the cost model proposed {proposed.name!r}" in trace.note
    cp.clear_caches()

# -- the algebra ---------------------------------------------------------------------------
@pytest.mark.parametrize("kinds", list(itertools.product(["affine", "affine_diag"], repeat=3)))
def test_the_affine_rule_is_associative_on_random_blocks(kinds):
    rng = np.random.default_rng(4)
    d = 5

    def block(kind):
        return rng.standard_normal((3, 2 * d) if kind == "affine_diag" else (3, d, d + 1))

    x, y, z = (block(k) for k in kinds)
    kx, ky, kz = kinds
    xy = combine(kx, x, ky, y)
    yz = combine(ky, y, kz, z)
    left = combine(COMBINE[(kx, ky)].out, xy, kz, z)
    right = combine(kx, x, COMBINE[(ky, kz)].out, yz)
    np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-12)


def test_the_tables_know_the_affine_kinds():
    names, table = kind_table()
    assert {"affine", "affine_diag"} <= set(names) <= set(KINDS)
    ids = {n: i for i, n in enumerate(names)}
    assert table[ids["affine"], ids["affine_diag"]] == ids["affine"]
    assert table[ids["affine_diag"], ids["affine"]] == ids["affine"]
    assert table[ids["affine_diag"], ids["affine_diag"]] == ids["affine_diag"]
    assert table[ids["affine"], ids["affine"]] == ids["affine"]
    # affine and linear kinds do not combine: no product kind
    assert table[ids["dense"], ids["affine"]] == -1 and table[ids["affine_diag"], ids["diag"]] == -1
    for pair in itertools.product(["affine", "affine_diag"], repeat=2):
        assert COMBINE[pair].cost in ("matmul", "elementwise")


def test_auto_costs_the_affine_blocks():
    # the cost model prices a scan of affine blocks from their shapes and the combine table
    A, b, h0 = problem("diag", False, T=64)
    _, trace = cp.linear_recurrence(A, b, h0, return_trace=True)
    assert trace.schedule is None or trace.schedule.is_scan
    s = cp.schedule("auto", 65, blocks=[("affine", 1, 5)] + [("affine_diag", 5, 5)] * 64)
    assert s.is_scan


# -- bad input -------------------------------------------------------------------------------
def _inputs(kind="dense"):
    return problem(kind, True, T=6, N=2, d=3, seed=5)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["sequential", "sklansky"])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_inputs_are_never_modified(kind, method, kernels):
    A, b, h0 = _inputs(kind)
    arrays = [A.values if kind == "diag" else A, b, h0]
    before = [x.copy() for x in arrays]
    for x in arrays:
        x.setflags(write=False)  # a write would raise
    states = cp.linear_recurrence(A, b, h0, method=method, kernels=kernels)
    states[:] = 0.0  # the result is the caller's own array
    for x, y in zip(arrays, before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method,kernels", [("sequential", "numba"), ("sequential", "numpy"), ("sklansky", "numba")])
@pytest.mark.parametrize("kind", ["dense", "diag"])
@pytest.mark.parametrize("where", ["A", "b"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_names_the_step(kind, where, value, method, kernels):
    # the compiled loop checks its inputs only once a state is not finite: every bad entry makes one so
    A, b, h0 = _inputs(kind)
    h0[:] = 0.0  # a zero state times an infinity is NaN: still caught
    target = b if where == "b" else (A.values if kind == "diag" else A)
    target[4, 1, 2] = value
    with pytest.raises(ValueError, match=r"step t=4 \(first at index \(1, 2"):
        cp.linear_recurrence(A, b, h0, method=method, kernels=kernels)


def test_shape_errors_say_what_was_expected():
    A, b, h0 = _inputs()
    with pytest.raises(ValueError, match=r"A has T=6 steps .* b has T=5"):
        cp.linear_recurrence(A, b[:5], h0)
    with pytest.raises(ValueError, match=r"batch sizes differ: A has N=2 .* b has N=3"):
        cp.linear_recurrence(A, np.ones((6, 3, 3)), h0)
    with pytest.raises(ValueError, match=r"matrix \(d, d\) with d = 4 .* got shape \(6, 2, 3, 3\)"):
        cp.linear_recurrence(A, np.ones((6, 2, 4)))
    with pytest.raises(ValueError, match=r"A: expected an array \(T, d, d\)"):
        cp.linear_recurrence(A[:, 0, 0], b)
    with pytest.raises(ValueError, match=r"vector \(d,\) with d = 3"):
        cp.linear_recurrence(Diag(np.ones((6, 4))), b)
    with pytest.raises(ValueError, match=r"b: expected shape \(T, d\) or \(T, N, d\), got \(6,\)"):
        cp.linear_recurrence(A, b[:, 0, 0])
    with pytest.raises(ValueError, match=r"h0: expected shape \(d,\) = \(3,\) or \(N, d\).* got \(4,\)"):
        cp.linear_recurrence(A, b, np.ones(4))
    with pytest.raises(ValueError, match=r"h0 has N=5"):
        cp.linear_recurrence(A, b, np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"A: step t=2 has shape \(3, 2\), expected \(3, 3\)"):
        cp.linear_recurrence([np.eye(3), np.eye(3), np.ones((3, 2))], np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"h0: contains NaN"):
        cp.linear_recurrence(A, b, np.full(3, np.nan))
    with pytest.raises(ValueError, match="zero-size"):
        cp.linear_recurrence(np.ones((0, 3, 3)), np.ones((0, 3)))


def test_dtype_errors():
    A, b, h0 = _inputs()
    with pytest.raises(TypeError, match="integer"):
        cp.linear_recurrence(A.astype(int), b)
    with pytest.raises(TypeError, match="complex"):
        cp.linear_recurrence(A, b.astype(complex))
    with pytest.raises(TypeError, match="float16"):
        cp.linear_recurrence(A, b.astype(np.float16))
    with pytest.raises(TypeError, match="A is float32 but b is float64"):
        cp.linear_recurrence(A.astype(np.float32), b)
    with pytest.raises(TypeError, match="h0 is float32"):
        cp.linear_recurrence(A, b, h0.astype(np.float32))


def test_method_errors():
    A, b, h0 = _inputs()
    with pytest.raises(ValueError, match="only the total product"):
        cp.linear_recurrence(A, b, method="tree")
    with pytest.raises(ValueError, match="unknown schedule method 'nope'"):
        cp.linear_recurrence(A, b, method="nope")
    with pytest.raises(TypeError, match="method must be"):
        cp.linear_recurrence(A, b, method=3)
    with pytest.raises(ValueError, match="unknown backend"):
        cp.linear_recurrence(A, b, method="sklansky", backend="nope")
    with pytest.raises(ValueError, match="unknown kernels 'fortran'; valid kernels: numba, numpy"):
        cp.linear_recurrence(A, b, kernels="fortran")
    for method in ("sequential", "sklansky"):
        with pytest.raises(TypeError, match="takes no engine options"):
            cp.linear_recurrence(A, b, method=method, engine_options={"timeout": 5})


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["sequential", "sklansky"])
def test_overflow_names_the_step(method, kernels):
    T, d = 400, 2
    A = Diag(np.full((T, d), 10.0))
    with pytest.raises(NonFiniteError, match=r"step t=30[0-9]") as info:
        cp.linear_recurrence(A, np.ones((T, d)), method=method, kernels=kernels)
    assert info.value.layers[0] == 0 and 300 <= info.value.layers[1] <= 310


# -- Ray and Dask ----------------------------------------------------------------------------
@pytest.fixture(scope="session", params=["ray", "dask"])
def engine(request):
    """The default executor of each engine: its embedded cluster starts once per session."""
    pytest.importorskip("ray" if request.param == "ray" else "distributed")
    ex = cp.get_executor(request.param)
    cp.suffix_products([np.eye(2)] * 3, method="sequential", backend=ex, workers=2)  # start it
    return request.param


@pytest.mark.parametrize("method", ["sequential", "sklansky", "chunked", "auto"])
@pytest.mark.parametrize("kind", ["dense", "diag"])
def test_on_a_cluster(engine, kind, method):
    A, b, h0 = problem(kind, True, T=17, seed=6)
    states, trace = cp.linear_recurrence(A, b, h0, method=method, backend=engine, workers=2, return_trace=True)
    check(states, A, b, h0)
    assert trace.schedule is not None and trace.events  # "sequential" is the schedule here, not the local loop
