"""Ray and Dask executors on real embedded clusters (2 workers each, started once).

Gradients against backprop, traces that prove the worker count, the task
graph's shape, and the failure paths: a worker process killed mid-run (the
exact result still comes back through retries), retries off (a clear error),
timeouts, unreachable addresses, and 100 back-to-back runs without memory
growth or leftover processes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import ClusterConnectionError, DistributedError, DistributedTimeoutError
from chainprod.planning.partition import partition
from chainprod.testing import left_fold_suffix, random_chain, random_mats

pytest.importorskip("ray")
pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

ENGINES = ["ray", "dask"]
P = 2


@pytest.fixture(scope="session", params=ENGINES)
def engine(request):
    """The default executor of each engine; its embedded cluster starts once per session."""
    ex = cp.get_executor(request.param)
    cp.suffix_products(random_mats(3, 2), method="sequential", backend=ex, workers=P)  # start it
    return request.param


def max_err(g, ref):
    return max(float(np.abs(a - b).max() / (np.abs(b).max() + 1e-300)) for gl, rl in zip(g, ref)
               for a, b in zip(gl, rl))


# -- the plan --------------------------------------------------------------------------
def test_partition_chunked_is_reduce_scan_downsweep():
    s = cp.schedule("chunked", 1000, chunks=4)
    part = partition(s, 4)
    assert part.workers == 4 and part.chunk == 250
    # every chain: its reduce, then one task per carry it waits for, then its down-sweep
    assert part.segments <= 4 * 3
    # only chunk-boundary values cross: a handful of edges, not O(L)
    assert part.cross_edges <= 8


def test_partition_fuses_sequential_into_p_tasks():
    part = partition(cp.schedule("sequential", 4096), 2)
    assert part.segments == 2 and part.cross_edges == 1


@pytest.mark.parametrize("method", ["sequential", "sklansky", "brent_kung", "hillis_steele", "chunked"])
@pytest.mark.parametrize("L,workers", [(1, 2), (2, 3), (7, 2), (33, 3), (100, 5)])
def test_partition_covers_every_op_once(method, L, workers):
    s = cp.schedule(method, L, workers=workers)
    part = partition(s, workers)
    seen = [0] * s.rounds
    for t in part.tasks:
        for r, _, _, out in t.rounds:
            seen[r] += len(out)
            # ops run on the owner of the right end of what they produce
            j = s.intervals()[r][2]
            assert set(part.owner(j[np.isin(s.steps[r].out, out)]).tolist()) == {t.worker}
        for d in t.deps:  # tasks only depend on earlier tasks: the graph is a DAG
            assert d < t.tid
    assert seen == s.widths


# -- results and gradients ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "diag", "mixed"])
@pytest.mark.parametrize("batch", [None, 3])
def test_grad_equals_backprop(engine, kind, batch):
    chain = (cp.mlp([5] * 12 + [1], seed=2) if kind == "dense" else
             cp.diagonal_chain(15, 4, activation="tanh", seed=3) if kind == "diag" else
             random_chain(14, 4, kind="mixed", seed=4))
    rng = np.random.default_rng(1)
    x = rng.standard_normal(chain.d_in if batch is None else (batch, chain.d_in))
    ref = cp.grad(chain, x, method="backprop")
    for method in ("chunked", "sklansky", "sequential", "auto"):
        g = cp.grad(chain, x, method=method, backend=engine, workers=P)
        assert len(g) == len(chain)
        assert all(a.shape == b.shape for gl, rl in zip(g, ref) for a, b in zip(gl, rl))
        assert max_err(g, ref) < 1e-12, (method, max_err(g, ref))


class _DeclaresNoTaskGraphs:
    """Mixed into an engine's executor: a user's executor that declares it runs no task graphs."""

    runs_task_graphs = False

    def backward_remote(self, *args, **kwargs):  # the hook grad once looked for: never reached now
        raise AssertionError("grad took the remote path of an executor that declares runs_task_graphs = False")


def _task_kinds(trace):
    """What ended each worker's chain: ``{"vjp"}`` on the remote path, ``{"collect"}`` on the driver-side one."""
    return {e.task.rpartition(".")[2] for e in trace.other_events}


def test_grad_follows_the_declared_capability(engine):
    base = type(cp.get_executor(engine))
    name = f"test-no-task-graphs-{engine}"
    cp.executors.register_executor(name, type(f"NoTaskGraphs{base.__name__}", (_DeclaresNoTaskGraphs, base), {}))
    try:
        assert cp.get_executor(engine).runs_task_graphs and not cp.get_executor(name).runs_task_graphs
        chain = random_chain(13, 4, kind="mixed", seed=6)
        x = np.random.default_rng(6).standard_normal((3, chain.d_in))
        ref = cp.grad(chain, x, method="backprop")
        for method in ("sklansky", "chunked"):
            g_remote, tr_remote = cp.grad(chain, x, method=method, backend=engine, workers=P, return_trace=True)
            g_local, tr_local = cp.grad(chain, x, method=method, backend=name, workers=P, return_trace=True)
            # the declared capability picks the path: VJPs on the workers, or prefixes gathered to the driver
            assert _task_kinds(tr_remote) == {"vjp"}, tr_remote.other_events
            assert _task_kinds(tr_local) == {"collect"}, tr_local.other_events
            assert tr_remote.schedule.name == tr_local.schedule.name
            assert max_err(g_remote, ref) < 1e-12 and max_err(g_local, ref) < 1e-12, method
            assert max_err(g_local, g_remote) < 1e-12
    finally:
        cp.executors.EXECUTORS.pop(name, None)
        cp.executors._instances.pop(name, None)


def test_a_registered_local_executor_never_takes_the_remote_path():
    from chainprod.executors.vectorized import VectorizedExecutor

    name = "test-local-with-old-hook"
    cp.executors.register_executor(name, type("LocalWithOldHook", (_DeclaresNoTaskGraphs, VectorizedExecutor), {}))
    try:
        assert not cp.get_executor(name).runs_task_graphs
        chain = random_chain(9, 3, kind="mixed", seed=2)
        x = np.ones((2, 3))
        g = cp.grad(chain, x, method="brent_kung", backend=name, kernels="numpy")
        assert max_err(g, cp.grad(chain, x, method="backprop")) < 1e-12
    finally:
        cp.executors.EXECUTORS.pop(name, None)
        cp.executors._instances.pop(name, None)


# -- method="auto" on a cluster: the cluster's best plan, or backprop on the driver ------------------
def test_auto_runs_locally_when_the_cluster_cannot_win_and_says_so(engine):
    chain = cp.mlp([4] * 8 + [1], seed=3)  # microseconds locally; a cluster round trip takes milliseconds
    x = np.random.default_rng(3).standard_normal((3, 4))
    ref = cp.grad(chain, x, method="backprop")
    g, tr = cp.grad(chain, x, method="auto", backend=engine, workers=P, return_trace=True)
    assert tr.schedule == "backprop"
    assert tr.note.startswith("auto ran locally: the cluster's predicted time") and "exceeds the local" in tr.note
    assert not tr.events and not tr.other_events  # not one task went to the cluster
    assert max_err(g, ref) == 0.0  # the same compiled backprop
    # the cost model's prediction says what grad did
    pred = cp.cost.predict_grad("dense", len(chain), 4, method="auto", backend=engine, workers=P, batch=3)
    assert pred["schedule"] == "backprop"
    # a plan held for the cluster learns the same on its first batch
    p = cp.plan(chain, backend=engine, workers=P)
    assert p.schedule is None and max_err(p.grad(x), ref) == 0.0 and p.schedule == "backprop"


def test_an_explicit_schedule_still_runs_on_the_cluster(engine):
    chain = cp.mlp([4] * 8 + [1], seed=3)
    x = np.random.default_rng(3).standard_normal((3, 4))
    ref = cp.grad(chain, x, method="backprop")
    for method in ("sklansky", "sequential"):
        g, tr = cp.grad(chain, x, method=method, backend=engine, workers=P, return_trace=True)
        assert tr.schedule.name == method and tr.note == ""
        assert _task_kinds(tr) == {"vjp"}  # Jacobians, scan and VJPs ran on the workers
        assert max_err(g, ref) < 1e-12


def test_auto_runs_on_the_cluster_where_the_model_predicts_it_wins(engine, monkeypatch):
    from chainprod.cost import auto as cost_auto

    # a model where the cluster costs nothing and a local layer a second: every plan there wins
    base = cp.cost.CostModel()
    slow = {s: {**t, "backprop": [[1.0] * len(t["w"])] * len(t["batch"])} for s, t in base.layers.items()}
    zero = {engine: 0.0}
    model = cp.cost.CostModel(layers=slow, round_latency=zero, task_latency=zero, run_latency=zero, remote_layer={})
    monkeypatch.setattr(cost_auto, "load_model", lambda: model)
    chain = random_chain(14, 4, kind="mixed", seed=4)
    x = np.random.default_rng(4).standard_normal((2, chain.d_in))
    g, tr = cp.grad(chain, x, method="auto", backend=engine, workers=P, return_trace=True)
    assert isinstance(tr.schedule, cp.Schedule) and "on the cluster" in tr.note
    assert _task_kinds(tr) == {"vjp"}
    assert max_err(g, cp.grad(chain, x, method="backprop")) < 1e-12


def test_grad_mse_and_float32(engine):
    chain = cp.mlp([4, 6, 6, 2], seed=1, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y = np.zeros((5, 2), np.float32)
    ref = cp.grad(chain, x, y, method="backprop")
    g = cp.grad(chain, x, y, method="brent_kung", backend=engine, workers=P)
    assert max_err(g, ref) < 1e-5


def test_grad_nonfinite_names_layers_and_is_not_retried(engine):
    # tanh at 0: the forward pass stays 0, the Jacobians are 1e150 * I and their products overflow
    chain = cp.Chain([cp.Dense(1e150 * np.eye(3), np.zeros(3), "tanh") for _ in range(5)]
                     + [cp.Dense(np.ones((1, 3)), np.zeros(1), "identity")])
    t0 = time.perf_counter()
    with pytest.raises(cp.NonFiniteError, match=r"layers \d+\.\.5"):
        cp.grad(chain, np.zeros(3), method="sklansky", backend=engine, workers=P)
    assert time.perf_counter() - t0 < 10


def test_suffix_products_large_blocks_and_trace(engine):
    mats = random_mats(64, 24, kind="mixed", batch=2, seed=5)
    out, tr = cp.suffix_products(mats, method="chunked", backend=engine, workers=P, return_trace=True)
    for o, r in zip(out, left_fold_suffix(mats)):
        np.testing.assert_allclose(np.asarray(o.todense() if isinstance(o, cp.Diag) else o), r,
                                   rtol=1e-10, atol=1e-12)
    # at most P tasks at once, measured on the workers
    assert 1 <= tr.peak_concurrency() <= P
    assert len({e.worker for e in tr.events}) <= P
    assert tr.span > 0


def test_worker_count_is_real(engine):
    # sklansky's early rounds run on both chunks at the same time: the trace shows
    # two workers (processes) busy at once, never more
    mats = random_mats(256, 48, batch=2, seed=1)
    _, tr = cp.suffix_products(mats, method="sklansky", backend=engine, workers=P, return_trace=True)
    assert tr.peak_concurrency() <= P
    assert len({e.worker.split("/")[-1] for e in tr.events}) == P


def test_unknown_option_and_bad_values(engine):
    ex = cp.get_executor(engine)
    s = cp.schedule("sequential", 3)
    seq = cp.BlockSeq([cp.Segment("dense", np.ones((3, 1, 2, 2)))])
    with pytest.raises(TypeError, match="unknown option"):
        ex.run(s, seq, workers=P, bogus=1)
    with pytest.raises(ValueError, match="timeout"):
        ex.run(s, seq, workers=P, timeout=-1)
    with pytest.raises(ValueError, match="retries"):
        ex.run(s, seq, workers=P, retries=-2)


# -- bounded waits and failures ---------------------------------------------------------------
def _slow_mats():
    # sklansky on 64 blocks of (32, 128, 128): 192 batched 128^3 products, ~1-2 s on 2 workers
    rng = np.random.default_rng(0)
    return [(np.eye(128) + rng.standard_normal((32, 128, 128)) / 128) * 0.9 for _ in range(64)]


def test_timeout_raises_clear_error(engine):
    cls = type(cp.get_executor(engine))
    ex = cls(timeout=0.2)
    t0 = time.perf_counter()
    with pytest.raises(DistributedTimeoutError, match=rf"{engine}: .*timeout=0.2"):
        cp.suffix_products(_slow_mats(), method="sklansky", backend=ex, workers=P)
    assert time.perf_counter() - t0 < 15
    # the cluster is still usable afterwards
    out = cp.suffix_products(random_mats(5, 2), method="sklansky", backend=engine, workers=P)
    assert len(out) == 5


def _busy_worker_pids(engine):
    if engine == "ray":
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and "chainprod w" in " ".join(p.info["cmdline"])
                and "seg" in " ".join(p.info["cmdline"])]
    from chainprod.executors import dask_executor

    client = dask_executor._EMBEDDED["client"]
    busy = {a for a, keys in client.processing().items() if any("segment" in str(k) for k in keys)}
    pids = client.run(os.getpid)
    return [pids[a] for a in busy if a in pids]


def _run_and_kill(engine, ex, mats):
    box = {}

    def target():
        try:
            box["out"] = cp.suffix_products(mats, method="sklansky", backend=ex, workers=P)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["err"] = e

    th = threading.Thread(target=target)
    th.start()
    killed = None
    t_end = time.monotonic() + 30
    while killed is None and time.monotonic() < t_end and th.is_alive():
        pids = _busy_worker_pids(engine)
        if pids:
            killed = pids[0]
            psutil.Process(killed).kill()
        else:
            time.sleep(0.02)
    th.join(120)
    assert killed is not None, "no worker was seen running a combine task"
    return box, killed


@pytest.mark.parametrize("retries", [3, 0], ids=["retries-on", "retries-off"])
def test_killed_worker(engine, retries):
    mats = _slow_mats()
    ex = type(cp.get_executor(engine))(retries=retries, timeout=120)
    box, pid = _run_and_kill(engine, ex, mats)
    if retries:
        assert "err" not in box, box.get("err")
        ref = left_fold_suffix(mats)
        for a, b in zip(box["out"], ref):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    else:
        err = box.get("err")
        assert isinstance(err, DistributedError), repr(err)
        msg = str(err)
        assert msg.startswith(f"{engine}: task") and ("died" in msg or "lost" in msg.lower()), msg
        assert "retries=0" in msg
    # the cluster recovers for the next run
    time.sleep(0.5)
    out = cp.suffix_products(random_mats(6, 2), method="sklansky", backend=engine, workers=P)
    assert len(out) == 6


def test_unreachable_address_fails_fast(engine):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ex = type(cp.get_executor(engine))(address=f"127.0.0.1:{port}" if engine == "ray" else f"tcp://127.0.0.1:{port}")
    t0 = time.perf_counter()
    with pytest.raises(ClusterConnectionError, match=rf"{engine}: no cluster reachable at"):
        cp.suffix_products(random_mats(3, 2), backend=ex, workers=P)
    assert time.perf_counter() - t0 < 5


# -- many runs on one cluster ---------------------------------------------------------------------
def _proc_count():
    me = psutil.Process()
    return len([c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE])


def test_hundred_runs_no_growth(engine):
    mats = random_mats(20, 8, kind="mixed", batch=2, seed=3)
    chain = cp.mlp([6] * 10 + [1])
    x = np.ones((2, 6))
    me = psutil.Process()

    def once(i):
        if i % 2:
            cp.suffix_products(mats, method="sklansky", backend=engine, workers=P)
        else:
            cp.grad(chain, x, method="chunked", backend=engine, workers=P)

    for i in range(10):  # warm up caches, worker pools, plans
        once(i)
    time.sleep(0.5)
    rss0, procs0 = me.memory_info().rss, _proc_count()
    for i in range(100):
        once(i)
    time.sleep(0.5)
    grown = (me.memory_info().rss - rss0) / 2**20
    assert grown < 40, f"driver RSS grew by {grown:.1f} MiB over 100 runs"
    assert _proc_count() <= procs0 + 1, "runs left processes behind"


def test_cluster_context_manager_reuses_cluster(engine):
    with cp.executors.cluster(engine, workers=P, timeout=60) as ex:
        assert ex.timeout == 60 and ex.name == engine
        out = cp.suffix_products(random_mats(9, 3), method="brent_kung", backend=ex, workers=P)
        out2 = cp.suffix_products(random_mats(9, 3), method="brent_kung", backend=engine, workers=P)
        for a, b in zip(out, out2):
            np.testing.assert_array_equal(a, b)
    # the session's embedded cluster was already running: the block left it running
    assert len(cp.suffix_products(random_mats(4, 2), backend=engine, workers=P)) == 4


def test_engine_options_flow_from_the_public_api(engine):
    # timeout= given per call through grad()/suffix_products(), not through an executor object
    t0 = time.perf_counter()
    with pytest.raises(DistributedTimeoutError, match=rf"{engine}: .*timeout=0.2"):
        cp.suffix_products(_slow_mats(), method="sklansky", backend=engine, workers=P,
                           engine_options={"timeout": 0.2})
    assert time.perf_counter() - t0 < 15
    chain = cp.mlp([3, 5, 5, 5, 1], seed=4)
    x = np.ones((2, 3))
    g = cp.grad(chain, x, method="chunked", backend=engine, workers=P,
                engine_options={"timeout": 120, "retries": 1})
    assert max_err(g, cp.grad(chain, x, method="backprop")) < 1e-12
    with pytest.raises(TypeError, match="unknown option"):
        cp.grad(chain, x, backend=engine, workers=P, engine_options={"bogus": 1})
    with pytest.raises(TypeError, match="no engine options"):
        cp.grad(chain, x, backend="vectorized", engine_options={"timeout": 1})


# -- what travels: stacked small blocks, grouped results (pure, no engine) --------------------
def test_pack_roundtrip_small_stacked_big_as_is():
    from chainprod.executors.remote_tasks import pack_values, task_values

    rng = np.random.default_rng(0)
    vals = {s: ("dense", rng.standard_normal((1, 2, 2))) for s in range(10)}
    vals[10] = ("diag", rng.standard_normal((1, 3)))
    vals[11] = ("dense", rng.standard_normal((1, 100, 100)))  # > 64 KiB: travels as it is
    big, packed = pack_values(vals, [1, 3, 5, 10, 11])
    assert set(big) == {11} and big[11][1] is vals[11][1]
    assert sorted(len(sl) for _, sl, _ in packed) == [1, 3]
    back = task_values({"values": big, "packed": packed})
    assert set(back) == {1, 3, 5, 10, 11}
    for s, (kind, a) in back.items():
        assert kind == vals[s][0] and np.array_equal(a, vals[s][1])


def test_group_result_stack_and_nonfinite():
    from chainprod.executors.distributed import GroupResult

    a = np.arange(4 * 4, dtype=float).reshape(4, 1, 2, 2)
    b = np.arange(2 * 4, dtype=float).reshape(2, 1, 2, 2) + 100
    res = GroupResult(6, [("dense", np.array([4, 5]), b), ("dense", np.array([0, 1, 2, 3]), a)])
    kind, st = res.stack()
    assert kind == "dense" and np.array_equal(st, np.concatenate([a, b]))
    assert res.block(5)[1] is not None and np.array_equal(res.block(5)[1], b[1])
    assert res.first_nonfinite() is None
    b[1, 0, 0, 0] = np.nan
    a[2, 0, 1, 1] = np.inf
    assert res.first_nonfinite() == 2


def test_embedded_cluster_sized_by_machine():
    from chainprod.executors.distributed import embedded_size

    assert embedded_size(1) >= 2 and embedded_size(None) >= 2
    assert embedded_size(1) == embedded_size(None) >= (os.cpu_count() or 1)
    assert embedded_size(64) >= 64


# -- regressions: timeouts, connecting, options ------------------------------------------------------
def test_dask_timeout_leaves_the_cluster_usable_at_once():
    pytest.importorskip("distributed")
    chain = cp.mlp([16] * 200 + [1], seed=1)
    x = np.ones((4, 16))
    ref = cp.grad(chain, x, method="backprop")
    cp.grad(chain, x, backend="dask", method="sklansky", workers=P)
    with pytest.raises(DistributedTimeoutError):
        cp.grad(chain, x, backend="dask", method="sklansky", workers=P, engine_options={"timeout": 0.001})
    # the same call (same deterministic keys) right after: no leftover cancellation
    g = cp.grad(chain, x, backend="dask", method="sklansky", workers=P)
    assert max_err(g, ref) < 1e-12


def _silent_listener():
    """A port that accepts TCP connections and never says a word."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                conns.append(srv.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return srv, conns


def test_dask_connect_to_something_else_ends_within_the_timeout():
    # (Ray: tests/test_ray.py, in a fresh process: one process talks to one Ray cluster)
    from chainprod.executors.dask_executor import DaskExecutor

    srv, conns = _silent_listener()
    try:
        for addr in (f"tcp://127.0.0.1:{srv.getsockname()[1]}",):
            ex = DaskExecutor(address=addr, timeout=2)
            t0 = time.perf_counter()
            with pytest.raises(ClusterConnectionError, match=r"dask: .*does not answer as a Dask scheduler"):
                ex.connect(P)
            assert time.perf_counter() - t0 < 2 + 1.5, addr
    finally:
        srv.close()
        for c in conns:
            c.close()


def test_infinite_timeout_means_none_and_workers_is_not_an_engine_option(engine):
    ex = type(cp.get_executor(engine))(timeout=float("inf"))
    assert ex.timeout is None
    chain = cp.mlp([3, 5, 5, 1], seed=2)
    x = np.ones((2, 3))
    g = cp.grad(chain, x, method="chunked", backend=engine, workers=P, engine_options={"timeout": float("inf")})
    assert max_err(g, cp.grad(chain, x, method="backprop")) < 1e-12
    with pytest.raises(TypeError, match="'workers' is not an engine option"):
        cp.get_executor(engine).check_options({"workers": 2})
    with pytest.raises(ValueError, match="timeout must be"):
        cp.get_executor(engine).check_options({"timeout": float("nan")})
