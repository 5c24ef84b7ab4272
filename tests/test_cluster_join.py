"""Joining a Ray head by address from a user's shell, and a head that dies under a training loop.

Every join here runs in a subprocess whose environment holds only ``PATH``,
``HOME`` and ``PYTHONPATH`` (this checkout): none of the Ray settings the
rest of the suite sets, which is what a user's shell gives the driver. The
heads are started with ``ray start --head`` on loopback in a temp dir of
their own, and stopped by killing only their processes (never ``ray stop``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clean_env(**extra):
    """What a user's shell gives a driver: no RAY_* settings, no temp dirs of the suite."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", tempfile.gettempdir()),
            "PYTHONPATH": REPO, **extra}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head():
    """``ray start --head`` listening on loopback only, in a fresh temp dir: ``(temp, port, processes)``."""
    temp, port = tempfile.mkdtemp(prefix="cpjoin-"), free_port()
    # the head (not the drivers) keeps every process on 127.0.0.1, as on a laptop or in CI
    env = clean_env(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    start = subprocess.run(
        ["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    procs = head_processes(temp)  # before any driver joins (drivers log under the temp dir too)
    if start.returncode != 0:
        stop_head(temp, procs)
        pytest.fail(f"ray start --head failed: {start.stderr[-2000:]}")
    return temp, port, procs


def head_processes(temp):
    """Processes naming ``temp`` or writing under it (the head's, as long as no driver has joined)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and (any(temp in a for a in p.info["cmdline"] or []) or any(
                    f.path.startswith(temp) for f in p.open_files())):
                found.append(p)
        except psutil.Error:
            pass
    return found


def stop_head(temp, procs, remove=True):
    """SIGKILL the head's processes and everything they started (as a crash would); wait until gone."""
    victims = {}
    for p in list(procs) + [p for p in psutil.process_iter(["cmdline"])
                            if any(temp in a for a in p.info["cmdline"] or [])]:
        try:
            victims[p.pid] = p
            victims.update((c.pid, c) for c in p.children(recursive=True))  # workers, actors, agents
        except psutil.Error:
            pass
    victims.pop(os.getpid(), None)
    for p in victims.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=30)
    assert not alive, f"head processes still alive: {alive}"
    if remove:
        shutil.rmtree(temp, ignore_errors=True)


def run_clean(script, *args, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def live_head():
    """One loopback head shared by the tests that only join it."""
    temp, port, procs = start_head()
    yield port
    stop_head(temp, procs)


JOIN_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np, chainprod as cp
    from chainprod.testing import random_mats, left_fold_suffix, random_chain
    addr = sys.argv[1]
    t0 = time.monotonic()
    with cp.cluster("ray", address=addr, timeout=20) as ex:
        print("JOIN-SECONDS", round(time.monotonic() - t0, 2), flush=True)
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
        assert ex.head_alive()
    import ray
    print("JOINED", ray.get_runtime_context().gcs_address)
""")


def test_join_a_loopback_head_from_a_clean_environment(live_head):
    # Ray dials this node's network address for 127.0.0.1, where a loopback head does not listen,
    # and used to retry there for many minutes: the join must work, within its timeout
    res = run_clean(JOIN_SCRIPT, f"127.0.0.1:{live_head}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "JOINED" in res.stdout and res.stdout.strip().endswith(f":{live_head}"), res.stdout
    seconds = float(res.stdout.split("JOIN-SECONDS")[1].split()[0])
    assert seconds < 20 + 2, seconds  # the join's own bound, plus the thread's hand-over
    # the joined cluster was not shut down by chainprod: its head still listens
    socket.create_connection(("127.0.0.1", live_head), timeout=5).close()


FAIL_SCRIPT = textwrap.dedent("""
    import socket, sys, threading, time
    from concurrent import futures
    import grpc
    import chainprod as cp
    from chainprod.errors import ClusterConnectionError
    TIMEOUT = 3.0
    silent = socket.socket(); silent.bind(("127.0.0.1", 0)); silent.listen(16)
    conns = []
    threading.Thread(target=lambda: [conns.append(silent.accept()) for _ in range(50)], daemon=True).start()
    # a gRPC server that is not Ray: the handshake succeeds, every call of ray.init fails, and
    # ray.init retries them for many minutes
    fake = grpc.server(futures.ThreadPoolExecutor(2))
    fake_port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    cases = {"nothing listens": f"127.0.0.1:{sys.argv[1]}", "silent socket": f"127.0.0.1:{silent.getsockname()[1]}",
             "gRPC, not Ray": f"127.0.0.1:{fake_port}"}
    for what, addr in cases.items():
        t0 = time.monotonic()
        try:
            with cp.cluster("ray", address=addr, timeout=TIMEOUT):
                print("JOINED?", what, flush=True)
        except ClusterConnectionError as e:
            print("CLEAR-ERROR", what, "|", round(time.monotonic() - t0, 2), "|", str(e)[:160], flush=True)
""")


def test_failed_joins_end_within_the_timeout():
    res = run_clean(FAIL_SCRIPT, free_port())
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("CLEAR-ERROR")]
    assert len(lines) == 3 and "JOINED?" not in res.stdout, res.stdout + res.stderr[-2000:]
    for ln in lines:
        assert float(ln.split("|")[1]) < 3.0 + 2, ln  # timeout=3, plus the thread's hand-over


DEAD_HEAD_SCRIPT = textwrap.dedent("""
    import sys, time, numpy as np, chainprod as cp
    from chainprod.errors import ClusterConnectionError
    from chainprod.executors.ray_executor import RayExecutor
    addr, window = sys.argv[1], float(sys.argv[2])
    ex = RayExecutor(address=addr, timeout=60, workers=2)
    chain = cp.mlp([3, 4, 4, 4, 1], seed=1)
    x = np.ones((2, 3))
    model = cp.shard(chain, ex, shards=2)
    loss, grads = model.value_and_grad(x)
    model.sgd_step(grads, lr=0.01)
    print("READY", flush=True)
    sys.stdin.readline()  # the test has killed the head now
    t_kill = time.monotonic()
    big = np.ones((6000, 3))  # 144 KB: over Ray's inline limit, so the step would ray.put it first
    calls = {"step": lambda: model.value_and_grad(big), "gather": model.gather,
             "grad": lambda: cp.grad(chain, x, method="sklansky", backend=ex, workers=2),
             "join": lambda: cp.cluster("ray", address=addr, timeout=5).__enter__()}
    for what, call in calls.items():
        try:
            call()
            print("NO-ERROR", what, flush=True)
        except ClusterConnectionError as e:
            print("CLEAR-ERROR", what, str(e).splitlines()[0][:120], flush=True)
        except Exception as e:
            print("WRONG-ERROR", what, type(e).__name__, e, flush=True)
    # Ray's core worker ends a driver's process once its head has been gone for its reconnect
    # window (made short here): outlive it, running Python code
    while time.monotonic() - t_kill < window + 4:
        time.sleep(0.1)
    model.close()
    print("ALIVE", round(time.monotonic() - t_kill, 1), flush=True)
""")


def _readline(stream, timeout):
    box = []
    th = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    th.start()
    th.join(timeout)
    return box[0] if box else ""


def test_head_killed_under_training_raises_and_the_process_lives_on():
    temp, port, procs = start_head()
    window = 3  # Ray's reconnect window for this driver, in seconds (60 by default)
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-c", DEAD_HEAD_SCRIPT, f"127.0.0.1:{port}", str(window)],
                                env=clean_env(RAY_gcs_rpc_server_reconnect_timeout_s=str(window)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = _readline(proc.stdout, 180)
        assert line.startswith("READY"), (line, proc.poll())
        stop_head(temp, procs, remove=False)  # SIGKILL: the head, its raylet, the shards' actors
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (proc.returncode, out, err[-3000:])
        for what in ("step", "gather", "grad", "join"):
            assert f"CLEAR-ERROR {what}" in out, (what, out, err[-3000:])
        assert "ALIVE" in out, out
        # a fresh driver joining the dead head's address fails at once, with the same error
        res = run_clean("import sys, chainprod as cp\nfrom chainprod.errors import ClusterConnectionError\n"
                        "try:\n    cp.cluster('ray', address=sys.argv[1], timeout=5).__enter__()\n"
                        "except ClusterConnectionError as e:\n    print('CLEAR-ERROR', e)\n",
                        f"127.0.0.1:{port}", timeout=60)
        assert "CLEAR-ERROR" in res.stdout, res.stdout + res.stderr[-2000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        stop_head(temp, procs)
