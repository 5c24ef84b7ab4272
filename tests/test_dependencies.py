"""Where ``method="auto"`` is decided: the cost level, never the schedule registry below it.

The registry (:mod:`chainprod.schedules`) builds schedules from sizes
alone; ``"auto"`` needs the cost model, which sits above it. So the
registry does not know ``"auto"``, :func:`chainprod.cost.resolve_schedule`
(which is ``chainprod.schedule``) resolves it, and kernels and executors
receive a :class:`~chainprod.Schedule`, never a method name to resolve.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import chainprod as cp
from chainprod.cost import resolve_schedule, valid_schedules
from chainprod.executors.vectorized import VectorizedExecutor


def _run(code: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: no earlier import in this process may have registered anything
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_the_schedule_registry_alone_does_not_know_auto():
    done = _run("""
        import chainprod.schedules as s
        assert "auto" not in s.valid_methods(), s.valid_methods()
        assert "auto" not in s.SCHEDULES
        try:
            s.schedule("auto", 8)
        except ValueError as e:
            msg = str(e)
        else:
            raise SystemExit("chainprod.schedules.schedule('auto', 8) did not refuse")
        assert "'auto'" in msg, msg
        for name in s.valid_methods():
            assert name in msg, (name, msg)
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_top_level_resolves_auto_in_a_fresh_process():
    done = _run("""
        import chainprod as cp
        s = cp.schedule("auto", 16, blocks=8, backend="threads", workers=2)
        assert isinstance(s, cp.Schedule) and s.length == 16 and s.is_scan
        assert "auto" in cp.valid_schedules()
        assert "auto" not in cp.SCHEDULES  # the plain registry: builders only
        print("ok")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_top_level_schedule_is_the_cost_level_resolver():
    assert cp.schedule is resolve_schedule
    assert cp.valid_schedules is valid_schedules
    assert set(valid_schedules()) == {*cp.schedules.valid_methods(), "auto"}


def test_resolver_gives_the_cost_models_choice():
    blocks = cp.cost.chain_blocks("dense", 33, 16)
    for backend in ("vectorized", "threads"):
        got = resolve_schedule("auto", 32, blocks=blocks, workers=2, backend=backend)
        assert got is cp.cost.choose_schedule(32, blocks=blocks, workers=2, backend=backend)


def test_resolver_delegates_everything_else_to_the_plain_builder():
    assert resolve_schedule("sklansky", 9) is cp.schedules.schedule("sklansky", 9)
    assert resolve_schedule("blelloch", 9).widths == cp.schedules.schedule("brent_kung", 9).widths
    s = cp.schedules.schedule("chunked", 12, chunks=3)
    assert resolve_schedule(s, 12) is s
    assert resolve_schedule("chunked", 12, chunks=3).widths == s.widths
    assert resolve_schedule(lambda L: cp.schedules.build("sequential", L), 5).name == "sequential"


def test_resolver_refuses_what_the_builder_refuses():
    with pytest.raises(ValueError) as e:
        resolve_schedule("bogus_scan", 8)
    for name in valid_schedules():  # "auto" included: it is valid here
        assert name in str(e.value)
    with pytest.raises(TypeError, match="auto"):
        resolve_schedule("auto", 8, chunks=2)
    with pytest.raises(ValueError):
        resolve_schedule("auto", 0)
    with pytest.raises(TypeError):
        resolve_schedule("auto", 4.0)
    with pytest.raises(ValueError):
        resolve_schedule("auto", 8, workers=0)


class _RecordingExecutor(VectorizedExecutor):
    """The vectorized executor, noting the type of every ``schedule`` it is handed."""

    def __init__(self):
        super().__init__()
        self.got = []

    def run(self, schedule, blocks, **kwargs):
        self.got.append(schedule)
        return super().run(schedule, blocks, **kwargs)


def test_executors_receive_schedules_never_names():
    ex = _RecordingExecutor()
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((3, 3)) for _ in range(9)]
    for method in ("auto", "sklansky"):
        cp.suffix_products(mats, method=method, backend=ex)
        cp.product(mats, method=method, backend=ex)
    chain = cp.diagonal_chain(40, 4, seed=1)
    for method in ("auto", "brent_kung"):
        cp.grad(chain, np.ones((2, 4)), method=method, backend=ex, kernels="numpy")
        cp.plan(chain, method=method, backend=ex, kernels="numpy").grad(np.ones((2, 4)))
    assert len(ex.got) >= 6
    assert all(isinstance(s, cp.Schedule) for s in ex.got), [type(s).__name__ for s in ex.got]


def test_the_scan_kernel_refuses_auto():
    from chainprod.kernels import pack
    from chainprod.kernels.scan import scan_rows

    chain = cp.mlp([3, 4, 4, 1], seed=0)
    tape = cp.forward(chain, np.ones((2, 3)))  # the flat tape the kernels read
    cotangent = cp.loss_cotangent(tape)[1]
    # the kernel takes a Schedule; "auto" is the cost model's to resolve, not the kernel's
    with pytest.raises((TypeError, ValueError), match="auto"):
        scan_rows(pack(chain), tape.flat, cotangent, "auto", kernels="numpy")
