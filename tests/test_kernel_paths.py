"""The compiled kernels' two ways of forming a dense product, each forced, against the numpy reference.

Every dense product of the compiled kernels is a fused loop below the
calibrated crossover and one BLAS ``gemm`` from it on
(:mod:`chainprod.kernels.crossover`). Here each way is forced for a whole
call (``force_path``) and every function of the kernel contract, and the
compiled scan, is compared with the numpy reference kernels: float64 to
``1e-12`` and float32 to ``1e-5`` of the largest entry, on chains mixing
dense and diagonal layers, all five activations and widths on both sides of
the crossover, at batch 1 and above. The paths are compared with each
other, the default (by size) path too, and the contract's exact promises
are checked on every path: ``backprop_with_row``'s gradients are
``backprop``'s bit for bit, and non-finite values are reported at the same
layer. Then the pieces: the vectorisable ``exp``/``expm1``/``log1p``/``tanh``
the activations use (against extended precision), the float32 rules staying
float32, and where the crossover comes from (the saved calibration, a
default, a forced path) and how the calibration measures it.
"""

import json
import os

import numpy as np
import pytest
from conftest import chain_inputs, layer_makers

import chainprod as cp
from chainprod.kernels import crossover, default_kernels, get_kernels, pack
from chainprod.kernels.scan import scan_rows

pytestmark = pytest.mark.skipif(default_kernels() != "numba", reason="numba not installed")

PATHS = ("loop", "blas", None)  # None: by the crossover
TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = (np.float64, np.float32)
ACTS = ("tanh", "relu", "sigmoid", "softplus", "identity")


def make_chain(name, dtype, seed=0):
    """Chains whose products fall on both sides of any crossover (3 x 5 up to 40 x 40 per row)."""
    dense, diag = layer_makers(np.random.default_rng(seed), dtype)

    if name == "mixed":
        layers = [dense(3, 5, "tanh"), diag(5, "relu"), dense(5, 24, "sigmoid"), dense(24, 40, "softplus"),
                  diag(40, "identity"), dense(40, 40, "relu"), dense(40, 8, "tanh"), diag(8, "sigmoid"),
                  dense(8, 8, "softplus"), dense(8, 2, "identity")]
    elif name == "wide":  # every product above any crossover
        layers = [dense(32, 48, ACTS[l % 5]) if l == 0 else dense(48, 48, ACTS[l % 5]) for l in range(5)]
    elif name == "diag_first":
        layers = [diag(6, "softplus"), dense(6, 33, "sigmoid"), diag(33, "tanh"), dense(33, 1, "identity")]
    else:  # one_dense
        layers = [dense(20, 30, "sigmoid")]
    return cp.Chain(layers)


CHAINS = ("mixed", "wide", "diag_first", "one_dense")


inputs = chain_inputs


def assert_close(actual, expected, dtype, what):
    scale = max(float(np.max(np.abs(expected))), 1.0)
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:g} * {scale:.3g}"


def run_all(k, pc, x, Y, cotangent, V, N):
    """Every contract function on the same inputs (and the forward pass of its own)."""
    Yk, bad_f = k.forward(pc, x)
    g, bad_b = k.backprop(pc, x, Y, cotangent)
    g_r, row, bad_r = k.backprop_with_row(pc, x, Y, cotangent)
    pg, bad_p = k.param_grads(pc, x, Y, V)
    return {"forward": Yk, "backprop": g, "backprop_with_row grads": g_r, "row": row,
            "chunk_product": k.chunk_product(pc, Y, N), "param_grads": pg, "derivatives": k.derivatives(pc, Y),
            "bad": (bad_f, bad_b, bad_r, bad_p)}


@pytest.mark.parametrize("N", (1, 5))
@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_path_matches_the_numpy_reference(name, dtype, N):
    nb, ref = get_kernels("numba"), get_kernels("numpy")
    chain = make_chain(name, dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, N, dtype)
    Y, _ = ref.forward(pc, x)
    V = np.random.default_rng(2).standard_normal(pc.tape_size(N)).astype(dtype)
    expected = run_all(ref, pc, x, Y, cotangent, V, N)
    results = {}
    for path in PATHS:
        with crossover.force_path(path):
            got = run_all(nb, pc, x, Y, cotangent, V, N)
        results[path] = got
        assert got["bad"] == (-1, -1, -1, -1)
        assert np.array_equal(got["backprop_with_row grads"], got["backprop"]), (path, "bit for bit")
        for what, want in expected.items():
            if what != "bad":
                assert got[what].dtype == dtype, (path, what)
                assert_close(got[what], want, dtype, f"{path}: {what}")
    for what in expected:  # and the two ways agree with each other
        if what != "bad":
            assert_close(results["loop"][what], results["blas"][what], dtype, f"loop vs blas: {what}")


@pytest.mark.parametrize("N", (1, 3))
@pytest.mark.parametrize("name", ("mixed", "wide", "diag_first"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_path_of_the_compiled_scan_matches_the_numpy_scan(name, dtype, N):
    chain = make_chain(name, dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, N, dtype)
    Y, _ = get_kernels("numpy").forward(pc, x)
    for method in ("sequential", "sklansky", "brent_kung"):
        want, bad = scan_rows(pc, Y, cotangent, method, kernels="numpy")
        assert bad == -1
        for path in PATHS:
            for workers in (1, 2):
                with crossover.force_path(path):
                    V, bad = scan_rows(pc, Y, cotangent, method, workers=workers)
                assert bad == -1 and V.dtype == dtype
                assert_close(V, want, dtype, f"{method}, {path}, {workers} workers")


def _batch_of_nine(name, dtype, seed):
    """``run_all``'s arguments: a chain's packed layout, a batch of 9, its tape (the numpy reference's), a
    cotangent and rows ``V``."""
    chain = make_chain(name, dtype)
    pc = pack(chain)
    x, cotangent = inputs(chain, 9, dtype)
    Y, _ = get_kernels("numpy").forward(pc, x)
    V = np.random.default_rng(seed).standard_normal(pc.tape_size(9)).astype(dtype)
    return pc, x, Y, cotangent, V


def _agrees_with_the_reference(got, args, dtype, what):
    assert got["bad"] == (-1, -1, -1, -1)
    assert np.array_equal(got["backprop_with_row grads"], got["backprop"])
    for name, want in run_all(get_kernels("numpy"), *args, 9).items():
        if name != "bad":
            assert_close(got[name], want, dtype, f"{what}: {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_chunks_on_threads_keep_the_contract(path, dtype, monkeypatch):
    """The chunked-batch (parallel) path with BLAS inside the threads: same results, one loop."""
    nb = get_kernels("numba")
    args = _batch_of_nine("mixed", dtype, 3)
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
    with crossover.force_path(path):
        got = run_all(nb, *args, 9)
    _agrees_with_the_reference(got, args, dtype, f"chunked {path}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_layers_run_serially_with_blas_on_the_threads_and_keep_the_contract(dtype, monkeypatch):
    """Past BLAS_THREADS_WIDE a batch is not cut: one loop, BLAS on the threads it would have used."""
    import numba

    nb = get_kernels("numba")
    args = _batch_of_nine("wide", dtype, 5)
    pc = args[0]
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with crossover.force_path("blas"):
            cross = nb._crossover(pc, 9)
            assert nb._split(pc, 9, cross) == (2, 1)  # narrow enough: the batch is cut over both threads
            monkeypatch.setattr(nb, "BLAS_THREADS_WIDE", 0)
            assert nb._split(pc, 9, cross) == (1, 2)  # wide: serial, BLAS on both threads
            assert nb._split(pc, 1, cross) == (1, 1)  # one sample: nothing to share
            got = run_all(nb, *args, 9)
    finally:
        numba.set_num_threads(before)
    _agrees_with_the_reference(got, args, dtype, "wide, serial with BLAS threads")


def test_without_a_way_to_limit_blas_threads_parallel_regions_keep_out_of_blas(monkeypatch):
    """No threadpoolctl: a call that would run BLAS inside its threads runs serially (or in loops), still right."""
    from chainprod.kernels import numba_blas

    nb, ref = get_kernels("numba"), get_kernels("numpy")
    chain = make_chain("wide", np.float64)
    pc = pack(chain)
    x, cotangent = inputs(chain, 6, np.float64)
    Y, _ = ref.forward(pc, x)
    V = np.random.default_rng(4).standard_normal(pc.tape_size(6))
    monkeypatch.setattr(numba_blas, "_BLAS_LIBRARIES", False)
    monkeypatch.setattr(nb, "PARALLEL_MIN_WORK", 0)
    with numba_blas.one_blas_thread() as limited:
        assert limited is False
    with crossover.force_path("blas"):
        got = run_all(nb, pc, x, Y, cotangent, V, 6)
        want, _ = scan_rows(pc, Y, cotangent, "sklansky", kernels="numpy")
        V_scan, bad = scan_rows(pc, Y, cotangent, "sklansky", workers=2)
    assert got["bad"] == (-1, -1, -1, -1) and bad == -1
    for what, expected in run_all(ref, pc, x, Y, cotangent, V, 6).items():
        if what != "bad":
            assert_close(got[what], expected, np.float64, what)
    assert_close(V_scan, want, np.float64, "scan")


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_values_are_reported_at_the_same_layer(path):
    nb, ref = get_kernels("numba"), get_kernels("numpy")
    chain = make_chain("mixed", np.float64)
    pc = pack(chain)
    x, cotangent = inputs(chain, 3, np.float64)
    x_bad = x.copy()
    x_bad[1, 0] = np.nan
    cot_bad = cotangent.copy()
    cot_bad[2, 1] = np.nan
    Y, _ = ref.forward(pc, x)
    V = np.ones(pc.tape_size(3))
    V[3 * pc.y_off[5] + 7] = np.inf  # a row of layer 5
    with crossover.force_path(path):
        assert nb.forward(pc, x_bad)[1] == ref.forward(pc, x_bad)[1] == 0
        assert nb.backprop(pc, x, Y, cot_bad)[1] == ref.backprop(pc, x, Y, cot_bad)[1] == pc.L - 1
        assert nb.backprop_with_row(pc, x, Y, cot_bad)[2] == pc.L - 1
        assert nb.param_grads(pc, x, Y, V)[1] == ref.param_grads(pc, x, Y, V)[1] == 5


def test_float32_rules_stay_float32():
    """The elementwise rules compute a float32 input in float32 (no float64 constant promotes them)."""
    from numba import types

    from chainprod.kernels import numba_rules

    z = np.float32(0.3)
    for fn, args in ((numba_rules.sigmoid, (z,)), (numba_rules.softplus, (z,))):
        fn(*args)
        assert fn.nopython_signatures[-1].return_type == types.float32, fn
    for code in range(5):
        numba_rules.activate(code, z)
        numba_rules.derivative(code, z)
    assert {s.return_type for s in numba_rules.activate.nopython_signatures if s.args[1] == types.float32} == \
        {types.float32}
    assert {s.return_type for s in numba_rules.derivative.nopython_signatures if s.args[1] == types.float32} == \
        {types.float32}


def test_sigmoid_is_exact_and_overflow_free():
    from chainprod.kernels import numba_rules

    for z in (-800.0, -40.0, -1.5, 0.0, 2.0, 40.0, 800.0):
        want = 1 / (1 + np.exp(-z)) if z > -700 else 0.0
        assert abs(numba_rules.sigmoid(z) - want) <= 4e-16 * want  # a few ulp of the exact value
    assert np.isnan(numba_rules.sigmoid(np.nan))


# -- the vectorisable transcendental functions ----------------------------------------------------
def _math_kernel():
    from numba import njit

    from chainprod.kernels import numba_math as nm

    @njit(error_model="numpy")
    def run(a, out, which):
        for i in range(a.shape[0]):
            x = a[i]
            if which == 0:
                out[i] = nm.exp(x)
            elif which == 1:
                out[i] = nm.expm1(x)
            elif which == 2:
                out[i] = nm.log1p_unit(x)
            else:
                out[i] = nm.tanh(x)

    return run


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorisable_math_is_accurate_to_a_few_ulp(dtype):
    """exp, expm1, log1p (of [0, 1]) and tanh against extended precision: <= 4 ulp, specials as the C library."""
    run = _math_kernel()
    rng = np.random.default_rng(0)
    eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    small = 10.0 ** rng.uniform(-30, 0, 20000) * rng.choice([-1, 1], 20000)
    grids = [np.concatenate([rng.uniform(-750, 712, 20000), rng.uniform(-2, 2, 20000), np.linspace(-110, 90, 2001)]),
             np.concatenate([rng.uniform(-40, 40, 20000), small]),
             np.concatenate([rng.uniform(0, 1, 20000), 10.0 ** rng.uniform(-40, 0, 20000), [0.0, 1.0, 0.41421356]]),
             np.concatenate([rng.uniform(-30, 30, 20000), small])]
    refs = [np.exp, np.expm1, np.log1p, np.tanh]
    for which, (grid, ref_fn) in enumerate(zip(grids, refs)):
        a = grid.astype(dtype)
        out = np.empty_like(a)
        run(a, out, which)
        with np.errstate(all="ignore"):
            ref = ref_fn(a.astype(np.longdouble))
            normal = np.isfinite(ref.astype(dtype)) & (np.abs(ref) >= tiny)
            err = np.abs((out[normal] - ref[normal]) / ref[normal]).astype(np.float64) / eps
            # beyond the normal range (overflow, underflow to subnormals or 0): as the rounded reference
            rest = ref[~normal].astype(dtype)
            assert np.all((out[~normal] == rest) | (np.abs(out[~normal] - rest) <= tiny)), which
        assert err.max() <= 4, (which, float(err.max()))
    specials = np.array([np.nan, np.inf, -np.inf], dtype)
    want = {0: [np.nan, np.inf, 0.0], 1: [np.nan, np.inf, -1.0], 3: [np.nan, 1.0, -1.0]}
    for which, w in want.items():
        out = np.empty_like(specials)
        run(specials, out, which)
        np.testing.assert_array_equal(out, np.array(w, dtype))


# -- the crossover: where it comes from ------------------------------------------------------------
def test_force_path_sets_and_restores_the_crossover():
    dt = np.dtype(np.float64)
    before = crossover.blas_crossover(dt)
    with crossover.force_path("blas"):
        assert crossover.blas_crossover(dt) == crossover.blas_crossover(dt, "blocks") == 0
        with crossover.force_path("loop"):
            assert crossover.blas_crossover(dt) == crossover.NEVER
        assert crossover.blas_crossover(dt) == 0
    assert crossover.blas_crossover(dt) == before
    with pytest.raises(ValueError, match="path must be 'loop', 'blas' or None, got 'fast'"):
        with crossover.force_path("fast"):
            pass


def test_the_kernels_read_the_crossover_saved_with_the_calibration(tmp_path, monkeypatch):
    path = tmp_path / "model.json"
    monkeypatch.setenv("CHAINPROD_COST_MODEL", str(path))
    cp.clear_caches()
    try:
        assert crossover.calibration_path() == str(path) == cp.cost.model_path()
        f64, f32 = np.dtype(np.float64), np.dtype(np.float32)
        assert crossover.blas_crossover(f64) == crossover.DEFAULT_CROSSOVER["float64"]["rows"]  # no file yet
        saved = cp.cost.CostModel(kernel_crossover={"float64": {"rows": 1000, "blocks": 8}, "float32": {"rows": -1}})
        cp.cost.save_model(saved, str(path))  # saving clears the caches: the kernels reread the file
        assert json.loads(path.read_text())["kernel_crossover"]["float64"]["rows"] == 1000
        assert crossover.blas_crossover(f64) == 1000 and crossover.blas_crossover(f64, "blocks") == 8
        # a malformed entry falls back to the default
        assert crossover.blas_crossover(f32) == crossover.DEFAULT_CROSSOVER["float32"]["rows"]
        with crossover.using_crossover({"float64": {"rows": 3}}):
            assert crossover.blas_crossover(f64) == 3
        assert crossover.blas_crossover(f64) == 1000
        path.write_text("not json")
        cp.clear_caches()
        assert crossover.blas_crossover(f64) == crossover.DEFAULT_CROSSOVER["float64"]["rows"]
    finally:
        monkeypatch.undo()
        cp.clear_caches()


def test_calibration_measures_a_crossover():
    from chainprod.calibrate import CROSSOVER_ROW_WIDTHS, best_threshold, kernel_crossover
    from chainprod.kernels.numba_blas import blas_available

    assert best_threshold([(8, 1.0, 3.0), (64, 1.0, 2.0), (512, 3.0, 1.0)]) == 512
    assert best_threshold([(8, 1.0, 3.0), (64, 1.0, 2.0)]) == crossover.NEVER
    assert best_threshold([(8, 3.0, 1.0), (64, 2.0, 1.0)]) == 8
    if not blas_available():
        assert kernel_crossover(repeats=1, progress=lambda line: None) == {}
        return
    got = kernel_crossover(repeats=1, progress=lambda line: None)
    for name in ("float32", "float64"):
        for form in crossover.FORMS:
            assert 0 <= got[name][form] <= crossover.NEVER
        assert len(got["measured"][name]["rows"]) > 10 and len(got["measured"][name]["row"]) > 10
        assert all(m == w * w for (m, _, _), w in zip(got["measured"][name]["row"], CROSSOVER_ROW_WIDTHS))


@pytest.mark.parametrize("user", [None, "28"])
def test_scipys_blas_loads_with_a_short_thread_timeout_and_the_environment_is_left_as_it_was(user):
    """OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` when it loads: set then (unless the user set it), removed after."""
    import subprocess
    import sys

    code = ("import os, numba.np.linalg as la\n"
            "seen = []\n"
            "real = la.ensure_blas\n"
            "la.ensure_blas = lambda: seen.append(os.environ.get('OPENBLAS_THREAD_TIMEOUT')) or real()\n"
            "from chainprod.kernels import numba_blas\n"
            "assert numba_blas.blas_available()\n"
            "print(seen[0], os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = user
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    during, after = out.stdout.split()
    from chainprod.kernels.numba_blas import BLAS_THREAD_TIMEOUT

    assert during == (user or BLAS_THREAD_TIMEOUT), out.stdout + out.stderr
    assert after == (user or "None")


def test_the_batch_of_one_plan_kept_on_a_packed_chain_follows_every_crossover_change():
    from chainprod.kernels import crossover, get_kernels, pack

    k = get_kernels("numba")
    pc = pack(cp.diagonal_chain(8, 4, seed=0))
    plain = k.serial_plan(pc, 1)
    with crossover.force_path("loop"):
        assert k.serial_plan(pc, 1)[1] == crossover.NEVER
    for limit in (3, 5, 7):  # a new table each time, the last one freed: each must be seen
        with crossover.using_crossover({"float64": {"row": limit, "rows": limit + 100}}):
            # one sample's products follow the "row" form, a batch's the "rows" form
            assert k.serial_plan(pc, 1)[1] == limit and k.serial_plan(pc, 2)[1] == limit + 100
    assert k.serial_plan(pc, 1) == plain


def test_blas_threads_limits_every_blas_library_and_restores_each_count():
    """Inside the block every BLAS library loaded runs ``n`` threads; after it, each has its own count back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from chainprod.kernels import numba_blas

    if not numba_blas.blas_available():
        pytest.skip("numba finds no BLAS here")

    def counts():
        return sorted((i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info()
                      if i["user_api"] == "blas")

    with threadpoolctl.threadpool_limits(2, user_api="blas"):  # restores every library's count at the end
        libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        libs[0].set_num_threads(1)  # with two libraries loaded, they start from different counts
        before = counts()
        assert dict(before)[libs[0].filepath] == 1
        with numba_blas.blas_threads(2) as limited:
            assert limited is True
            assert all(n == 2 for _, n in counts())
            with numba_blas.blas_threads(3):  # nested: set back to the outer block's count
                assert all(n == 3 for _, n in counts())
            assert all(n == 2 for _, n in counts())
        assert counts() == before
