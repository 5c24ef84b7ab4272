"""Dask specifics: joining `dask scheduler` + `dask worker` by address or Client, keys, BLAS env."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import chainprod as cp
from chainprod.testing import left_fold_suffix, random_chain, random_mats

distributed = pytest.importorskip("distributed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(ex):
    mats = random_mats(40, 5, kind="mixed", batch=2, seed=1)
    out, tr = cp.suffix_products(mats, method="chunked", backend=ex, workers=2, return_trace=True)
    for o, r in zip(out, left_fold_suffix(mats)):
        o = o.todense() if isinstance(o, cp.Diag) else o
        np.testing.assert_allclose(o, r, rtol=1e-10, atol=1e-12)
    assert tr.peak_concurrency() <= 2
    chain = random_chain(20, 4, kind="mixed", seed=2)
    x = np.ones((3, 4))
    ref = cp.grad(chain, x, method="backprop")
    g = cp.grad(chain, x, method="sklansky", backend=ex, workers=2)
    assert max(np.abs(a - b).max() for gl, rl in zip(g, ref) for a, b in zip(gl, rl)) < 1e-12


def test_join_dask_scheduler_and_workers_by_address():
    from chainprod.executors.dask_executor import DaskExecutor

    temp = tempfile.mkdtemp(prefix="cpdt-")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    exe = [exe] if os.path.exists(exe) else [sys.executable, "-m", "dask"]
    sched = subprocess.Popen(exe + ["scheduler", "--host", "127.0.0.1", "--port", str(port),
                                    "--no-dashboard"], env=env, cwd=temp,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = subprocess.Popen(exe + ["worker", addr, "--nworkers", "2", "--nthreads", "1",
                                   "--local-directory", temp, "--no-dashboard", "--host", "127.0.0.1"],
                            env=env, cwd=temp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    try:
        client = distributed.Client(addr, timeout=60, set_as_default=False)
        client.wait_for_workers(2, timeout=90)
        _check(DaskExecutor(address=addr, timeout=120))
        _check(DaskExecutor(address=client, timeout=120))  # an existing Client
        # chainprod left the cluster running
        assert client.status == "running" and len(client.scheduler_info()["workers"]) == 2
    finally:
        if client is not None:
            client.close()
        from chainprod.executors import dask_executor

        c = dask_executor._JOINED.pop(addr, None)
        if c is not None:
            c.close()
        for p in (work, sched):  # stop only what this test started
            p.terminate()
        for p in (work, sched):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_workers_use_one_blas_thread():
    from chainprod.executors import dask_executor

    cp.suffix_products([np.eye(2)] * 3, backend="dask", workers=2)
    emb = dask_executor._EMBEDDED
    if emb is None:
        pytest.skip("dask runs on a cluster chainprod did not start")
    envs = emb["client"].run(lambda: (os.environ.get("OMP_NUM_THREADS"),
                                      os.environ.get("OPENBLAS_NUM_THREADS")))
    assert set(envs.values()) == {("1", "1")}
    assert emb["cluster"].workers and all(os.path.isdir(emb["temp"]) for _ in [0])


def test_keys_name_the_input_and_are_never_shared_between_runs():
    from chainprod.executors.dask_executor import DaskExecutor

    ex = DaskExecutor()
    s = cp.schedule("sklansky", 5)
    a = ex._token(("x", s.length), np.arange(6.0))
    b = ex._token(("x", s.length), np.arange(6.0))
    c = ex._token(("x", s.length), np.arange(6.0) + 1)
    assert a.split("-")[0] == b.split("-")[0] != c.split("-")[0]  # the input's token
    assert len({a, b, c}) == 3  # every run its own keys


def test_a_run_repeated_at_once_has_its_own_trace():
    # brent_kung and its alias blelloch are one plan: the same keys, were keys a function of the input
    # alone, and the second run would get the first one's results and trace events from the scheduler
    mats = random_mats(17, 3, kind="mixed", batch=2, seed=1)
    for method in ("brent_kung", "blelloch", "brent_kung"):
        t0 = time.perf_counter()
        out, trace = cp.suffix_products(mats, method=method, backend="dask", workers=2, return_trace=True)
        assert np.allclose(np.asarray(out[0]), np.asarray(left_fold_suffix(mats)[0]))
        assert trace.events and all(0 <= e.start <= e.end <= time.perf_counter() - t0 + 1e-3 for e in trace.events)


def test_no_keys_left_on_the_cluster_after_runs():
    from chainprod.executors import dask_executor

    mats = random_mats(30, 4, seed=3)
    for _ in range(3):
        cp.suffix_products(mats, method="brent_kung", backend="dask", workers=2)
    emb = dask_executor._EMBEDDED
    if emb is None:
        pytest.skip("dask runs on a cluster chainprod did not start")
    t_end = time.monotonic() + 10
    while time.monotonic() < t_end:
        # the executor's own keys; sharded models' keys are checked in test_sharded.py
        left = [k for k in emb["client"].run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
                if str(k).startswith("chainprod-dask-")]
        if not left:
            break
        time.sleep(0.1)
    assert not left, left[:5]


def test_calibration_shuts_down_the_cluster_it_started_and_keeps_one_it_found():
    """An embedded cluster left up by ``chainprod calibrate`` ran through the main job's sweep after it."""
    code = ("if __name__ == '__main__':\n"
            "    import os, psutil\n"
            "    from chainprod import cost\n"
            "    from chainprod.calibrate import engine_costs\n"
            "    import chainprod as cp\n"
            "    lat, rem = engine_costs('dask', cost.CostModel(), repeats=1)\n"
            "    assert lat is not None and rem is not None\n"
            "    def spawned():\n"
            "        return sorted(p.pid for p in psutil.Process(os.getpid()).children(recursive=True)\n"
            "                      if p.is_running() and 'multiprocessing.spawn' in ' '.join(p.cmdline()))\n"
            "    print('started-then-left', len(spawned()))\n"
            "    with cp.cluster('dask', workers=2):\n"
            "        held = spawned()\n"
            "        engine_costs('dask', cost.CostModel(), repeats=1)\n"
            "        print('found-then-kept', len(held) > 0 and spawned() == held)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "started-then-left 0" in out.stdout and "found-then-kept True" in out.stdout, out.stdout


def test_calibrated_remote_cost_per_layer():
    from chainprod import cost
    from chainprod.calibrate import engine_layer_cost

    rem = engine_layer_cost("dask", cost.CostModel(), repeats=1)
    assert set(rem) == {"layer", "byte"} and rem["layer"] >= 0 and rem["byte"] >= 0
    assert np.isfinite(rem["layer"]) and np.isfinite(rem["byte"])
