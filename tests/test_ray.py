"""Ray specifics: joining a cluster started with ``ray start`` by address; worker BLAS threads."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import chainprod as cp

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _start_ray_head():
    """``ray start --head`` on loopback in a fresh temp dir: ``(temp, port, env, completed process)``."""
    temp = tempfile.mkdtemp(prefix="cprt-")
    port = _free_port()
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every process of this test cluster on loopback
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    return temp, port, env, start



def _stop_started(temp):
    """Stop only the processes of the cluster we started (found by its temp dir), not `ray stop`."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and any(temp in a for a in p.info["cmdline"]):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return procs


JOIN_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, chainprod as cp
    from chainprod.executors.ray_executor import RayExecutor
    from chainprod.testing import random_mats, left_fold_suffix, random_chain
    ex = RayExecutor(address=sys.argv[1], timeout=120)
    mats = random_mats(40, 5, kind="mixed", batch=2, seed=1)
    out, tr = cp.suffix_products(mats, method="chunked", backend=ex, workers=2, return_trace=True)
    for o, r in zip(out, left_fold_suffix(mats)):
        o = o.todense() if isinstance(o, cp.Diag) else o
        assert np.allclose(o, r, rtol=1e-10, atol=1e-12)
    assert tr.peak_concurrency() <= 2
    chain = random_chain(20, 4, kind="mixed", seed=2)
    x = np.ones((3, 4))
    ref = cp.grad(chain, x, method="backprop")
    g = cp.grad(chain, x, method="sklansky", backend=ex, workers=2)
    assert max(np.abs(a - b).max() for gl, rl in zip(g, ref) for a, b in zip(gl, rl)) < 1e-12
    import ray
    print("JOINED", ray.get_runtime_context().gcs_address)
""")


def test_join_ray_start_head_by_address():
    temp, port, env, start = _start_ray_head()
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        res = subprocess.run([sys.executable, "-c", JOIN_SCRIPT, f"127.0.0.1:{port}"], env=env,
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "JOINED" in res.stdout and res.stdout.strip().endswith(f":{port}")
        # the joined cluster was not shut down by chainprod: its processes still run
        assert any(temp in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    finally:
        _stop_started(temp)
        time.sleep(0.5)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_ray_workers_use_one_blas_thread():
    cp.get_executor("ray")
    cp.suffix_products([np.eye(2)] * 3, backend="ray", workers=2)  # make sure Ray runs

    @ray.remote
    def probe():
        from threadpoolctl import threadpool_info

        from chainprod.executors import remote_tasks

        remote_tasks.limit_blas()
        return os.environ.get("OMP_NUM_THREADS"), [i["num_threads"] for i in threadpool_info()
                                                   if i.get("user_api") == "blas"]

    omp, blas = ray.get(probe.remote(), timeout=60)
    assert omp == "1"
    assert all(n == 1 for n in blas)


def test_embedded_ray_writes_nothing_outside_its_temp_dir():
    from chainprod.executors import ray_executor

    cp.suffix_products([np.eye(2)] * 3, backend="ray", workers=2)
    owned = ray_executor._OWNED
    if owned is None:
        pytest.skip("Ray was started outside chainprod in this process")
    assert os.path.isdir(owned["temp"])
    sessions = os.listdir(owned["temp"])
    assert any(s.startswith("session_") for s in sessions)


CONNECT_SCRIPT = textwrap.dedent("""
    import socket, sys, threading, time
    import chainprod as cp, numpy as np
    from chainprod.errors import ClusterConnectionError
    from chainprod.executors.ray_executor import RayExecutor
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(16)
    conns = []
    threading.Thread(target=lambda: [conns.append(srv.accept()) for _ in range(50)], daemon=True).start()
    port = srv.getsockname()[1]
    addrs = [f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"] + sys.argv[1:]
    for addr in addrs:
        t0 = time.perf_counter()
        try:
            RayExecutor(address=addr, timeout=2).connect(2)
        except ClusterConnectionError as e:
            assert "does not answer as a Ray cluster" in str(e), e
        dt = time.perf_counter() - t0
        assert dt < 3.5, (addr, dt)
        print("FAILED-FAST", addr, round(dt, 2))
""")


def test_connect_to_something_else_ends_within_the_timeout():
    args = []
    with contextlib.suppress(Exception):  # also a Dask scheduler's address, when this session runs one
        from chainprod.executors import dask_executor

        cp.suffix_products([np.eye(2)] * 3, backend="dask", workers=2)
        args.append(dask_executor._EMBEDDED["client"].scheduler.address.replace("tcp://", ""))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", CONNECT_SCRIPT, *args], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("FAILED-FAST") == 2 + len(args), res.stdout


DEAD_HEAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, chainprod as cp
    from chainprod.errors import ClusterConnectionError
    from chainprod.executors.ray_executor import RayExecutor
    chain = cp.mlp([3, 4, 4, 1], seed=1)
    x = np.ones((2, 3))
    cp.grad(chain, x, method="sklansky", backend=RayExecutor(address=sys.argv[1], timeout=60), workers=2)
    print("JOINED", flush=True)
    sys.stdin.readline()  # the test kills the head now
    try:
        cp.grad(chain, x, method="sklansky", backend="ray", workers=2)
    except ClusterConnectionError as e:
        print("CLEAR-ERROR", e, flush=True)
""")


def test_dead_joined_head_raises_instead_of_exiting():
    temp, port, env, start = _start_ray_head()
    proc = None
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        proc = subprocess.Popen([sys.executable, "-c", DEAD_HEAD_SCRIPT, f"127.0.0.1:{port}"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith("JOINED"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
        _stop_started(temp)  # the head (and its node) go away; the script keeps running
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
        assert "CLEAR-ERROR" in out and "head" in out, (proc.returncode, out, err[-3000:])
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        _stop_started(temp)
        time.sleep(0.5)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
