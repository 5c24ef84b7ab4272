"""Ray specifics: worker BLAS threads, the embedded cluster's temp dir, joins that must fail fast.

Joining a head started with ``ray start --head`` (from a clean environment,
and a head that dies under a training loop) is in ``test_cluster_join.py``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import chainprod as cp

ray = pytest.importorskip("ray")


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


def test_embedded_cluster_has_no_head_to_lose():
    from chainprod.executors import ray_executor
    from chainprod.executors.ray_executor import RayExecutor

    cp.suffix_products([np.eye(2)] * 3, backend="ray", workers=2)
    if ray_executor._OWNED is None:
        pytest.skip("Ray was started outside chainprod in this process")
    assert RayExecutor().head_alive() and ray_executor.head_alive()
    ref = ray.put(np.arange(3))
    assert ray_executor.watched_get(ref, timeout=30).tolist() == [0, 1, 2]  # a plain ray.get here


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
