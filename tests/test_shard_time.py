"""Recurrent models sharded over time on real embedded Ray and Dask clusters (``chainprod.shard_time``).

Every gradient is checked against ``cp.value_and_grad(model, x, y, method="backprop")``
on the same model, run locally (itself checked against torch autograd in the
recurrent model tests); training runs against a local loop of
``value_and_grad`` + SGD. What moves per step is measured for two sequence
lengths and must be equal, and equal to the formula in ``docs/distributed.md``.
A chunk's process killed by PID must make the next step raise
``DistributedError`` naming the chunk.
"""

from __future__ import annotations

import numpy as np
import pytest

import chainprod as cp
from chainprod.errors import DistributedError, NonFiniteError
from chainprod.shard_time import ShardedSequence, TimeTrace, shard_sequence
from chainprod.testing import kill_and_wait, started_engine

pytest.importorskip("ray")
pytest.importorskip("distributed")
pytest.importorskip("psutil")



@pytest.fixture(scope="module", params=["ray", "dask"])
def engine(request):
    """An executor on each engine's embedded cluster (started once per process, shared with the other test files)."""
    return started_engine(request.param, timeout=300)


D, H, N = 3, 4, 2


def make(cls, layers, *, dtype=np.float64, seed=0, **kw):
    return cls(D, H, layers, dtype=dtype, seed=seed, **kw)


def data(T, *, dtype=np.float64, seed=1, batch_first=False):
    rng = np.random.default_rng(seed)
    shape = (N, T, D) if batch_first else (T, N, D)
    x = rng.standard_normal(shape).astype(dtype)
    y = rng.standard_normal(shape[:2] + (H,)).astype(dtype)
    return x, y


def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


#: (id, model class, layers, model options, chunks, loss, dtype, with h0)
CASES = [
    ("rnn-tanh-1-P2", cp.RNN, 1, {}, 2, "mse", np.float64, False),
    ("rnn-relu-2-uneven", cp.RNN, 2, {"nonlinearity": "relu"}, [3, 1, 5], "sum", np.float64, True),
    ("gru-1-P3-nobias", cp.GRU, 1, {"bias": False}, 3, "mse", np.float64, False),
    ("gru-2-uneven-batchfirst", cp.GRU, 2, {"batch_first": True}, [6, 3], "mse", np.float64, True),
    ("lstm-1-uneven", cp.LSTM, 1, {}, [1, 4, 4], "sum", np.float64, True),
    ("lstm-2-P3-float32", cp.LSTM, 2, {}, 3, "mse", np.float32, False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gradients_equal_the_local_model(engine, case):
    _, cls, layers, opts, chunks, loss, dtype, with_h0 = case
    T = 9
    model = make(cls, layers, dtype=dtype, **opts)
    x, y = data(T, dtype=dtype, batch_first=model.batch_first)
    y = y if loss == "mse" else None
    h0 = None
    if with_h0:
        rng = np.random.default_rng(7)
        h0 = rng.standard_normal((layers, N, H)).astype(dtype)
        h0 = (h0, 0.5 * h0) if cls is cp.LSTM else h0
    before = {k: v.copy() for k, v in model.params.items()}
    tol = 1e-10 if dtype == np.float64 else 1e-4
    with shard_sequence(model, engine, x, y, loss=loss, chunks=chunks, h0=h0, kernels="numpy") as seq:
        assert isinstance(seq, ShardedSequence) and seq.chunks == (len(chunks) if isinstance(chunks, list) else chunks)
        local = model
        for step in range(2):  # the second step runs at the parameters the first one's SGD update made
            value, grads, tr = seq.value_and_grad(return_trace=True)
            ref_value, ref = cp.value_and_grad(local, x, y, loss=loss, method="backprop", kernels="numpy", h0=h0)
            assert isinstance(tr, TimeTrace) and tr.bytes_moved == seq.bytes_per_step > 0
            assert value == pytest.approx(ref_value, rel=tol)
            assert list(grads) == list(ref)
            for k in ref:
                assert grads[k].dtype == dtype and rel(grads[k], ref[k]) < tol, (step, k, rel(grads[k], ref[k]))
            seq.sgd_step(grads, 0.1)
            rnn_opts = {"nonlinearity": opts["nonlinearity"]} if "nonlinearity" in opts else {}
            local = type(model).from_params({k: v - 0.1 * ref[k] for k, v in local.params.items()},
                                            batch_first=model.batch_first, **rnn_opts)
        trained = seq.model()
        assert type(trained) is cls and max(rel(trained.params[k], local.params[k]) for k in ref) < tol
    # nothing the user passed is modified
    assert all(np.array_equal(model.params[k], before[k]) for k in before)


def test_bytes_per_step_do_not_grow_with_T(engine):
    """Two sequence lengths, 4x apart: the same bytes per step, equal to the formula (docs/distributed.md)."""
    model = make(cp.LSTM, 2, seed=3)
    P, L, S = 3, 2, 2  # an LSTM hands over (h, c): S = 2 arrays of (N, H) per boundary
    theta = sum(v.nbytes for v in model.params.values())
    moved = {}
    for T in (12, 48):
        x, y = data(T, seed=T)
        with shard_sequence(model, engine, x, y, chunks=P, kernels="numpy") as seq:
            for _ in range(2):
                _, g, tr = seq.value_and_grad(return_trace=True)
                seq.sgd_step(g, 1e-2)
        moved[T] = tr.bytes_moved
        assert tr.bytes_params == P * theta  # the parameters, to every chunk
        assert tr.bytes_boundary == 2 * (P - 1) * L * S * N * H * 8  # states forward, adjoints back
        assert tr.bytes_reports == P * theta  # the partial gradients
    assert moved[12] == moved[48] == 2 * P * theta + 2 * (P - 1) * L * S * N * H * 8, moved


#: (id, feedthrough, chunks, loss, dtype, with h0, batch_first)
DIAG_CASES = [
    ("feedthrough-P2-mse", True, 2, "mse", np.float64, False, False),
    ("no-feedthrough-uneven-sum-h0", False, [3, 1, 7], "sum", np.float64, True, False),
    ("P3-float32-batchfirst-h0", True, 3, "mse", np.float32, True, True),
]


@pytest.mark.parametrize("case", DIAG_CASES, ids=[c[0] for c in DIAG_CASES])
def test_diagonal_recurrence_gradients_equal_the_local_layer(engine, case):
    """Chunks run at once (a linear recurrence): each from zero, the driver carries the P boundary states."""
    _, ft, chunks, loss, dtype, with_h0, bf = case
    T, d, d_out = 11, 5, 2
    layer = cp.DiagonalRecurrence.random(D, d, d_out, seed=4, feedthrough=ft, dtype=dtype, batch_first=bf)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, T, D) if bf else (T, N, D)).astype(dtype)
    y = rng.standard_normal((N, T, d_out) if bf else (T, N, d_out)).astype(dtype) if loss == "mse" else None
    h0 = rng.standard_normal((N, d)).astype(dtype) if with_h0 else None
    tol = 1e-10 if dtype == np.float64 else 1e-4
    with shard_sequence(layer, engine, x, y, loss=loss, chunks=chunks, h0=h0, kernels="numpy") as seq:
        value, grads, tr = seq.value_and_grad(return_trace=True)
        ref_value, ref = cp.value_and_grad(layer, x, y, loss=loss, method="backprop", kernels="numpy", h0=h0)
        assert value == pytest.approx(ref_value, rel=tol, abs=tol)
        assert sorted(grads) == sorted(ref)
        for k in ref:
            assert grads[k].dtype == dtype and rel(grads[k], ref[k]) < tol, (k, rel(grads[k], ref[k]))
        # P |theta| down, P partial gradients up, four (N, d) boundary arrays per chunk
        theta = sum(v.nbytes for v in layer.params.values())
        P = seq.chunks
        assert tr.bytes_moved == 2 * P * theta + 4 * P * N * d * np.dtype(dtype).itemsize
        seq.sgd_step(grads, 0.1)
        assert isinstance(seq.model(), cp.DiagonalRecurrence)


def test_a_killed_chunk_is_named(engine):
    model = make(cp.GRU, 1, seed=2)
    x, _ = data(8)
    with shard_sequence(model, engine, x, chunks=2, kernels="numpy", timeout=60) as seq:
        seq.value_and_grad()
        kill_and_wait(seq.pids[1])
        with pytest.raises(DistributedError, match=r"chunk 1 \(steps 4\.\.7\).*not rebuilt"):
            seq.value_and_grad()
        with pytest.raises(DistributedError, match="chunk 1"):  # and stays an error, naming it
            seq.value_and_grad()
    if engine.name == "dask":  # the nanny restarts the killed worker: wait for it, for the tests after this one
        engine.connect(2).wait_for_workers(2, timeout=120)


def test_an_overflowing_state_names_the_layer_and_step(engine):
    model = cp.RNN.from_params({"weight_ih_l0": np.full((H, D), 1e200), "weight_hh_l0": np.full((H, H), 1e200)},
                               nonlinearity="relu")
    x = np.ones((6, N, D))
    with shard_sequence(model, engine, x, chunks=[2, 4], kernels="numpy") as seq:
        with pytest.raises(NonFiniteError, match="layer 0: the state at step [0-5]"):
            seq.value_and_grad()


def test_bad_arguments_give_clear_errors(engine):
    model = make(cp.RNN, 1)
    x, y = data(5)
    with pytest.raises(ValueError, match="chunks=6 is more than the T=5"):
        shard_sequence(model, engine, x, chunks=6)
    with pytest.raises(ValueError, match="summing to T=5"):
        shard_sequence(model, engine, x, chunks=[2, 2])
    with pytest.raises(ValueError, match="chunks must be"):
        shard_sequence(model, engine, x, chunks=0)
    with pytest.raises(ValueError, match="input_size = 3"):
        shard_sequence(model, engine, np.ones((5, N, 2)))
    with pytest.raises(ValueError, match=r"y: expected the output's shape \(T, N, H\) = \(5, 2, 4\)"):
        shard_sequence(model, engine, x, np.ones((5, N, 3)))
    with pytest.raises(ValueError, match=r"h0: expected shape \(num_layers, N, H\)"):
        shard_sequence(model, engine, x, h0=np.ones((2, N, H)))
    bad = x.copy()
    bad[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match="step t=3"):
        shard_sequence(model, engine, bad)
    with pytest.raises(TypeError, match="RNN, GRU, LSTM or DiagonalRecurrence"):
        shard_sequence(cp.mlp([3, 1]), engine, x)
    with pytest.raises(TypeError, match="Ray or Dask executor"):
        shard_sequence(model, cp.get_executor("threads"), x)
    with shard_sequence(model, engine, x, chunks=2, kernels="numpy") as seq:
        with pytest.raises(ValueError, match="lr must be"):
            seq.sgd_step(seq.value_and_grad()[1], float("nan"))
        with pytest.raises(ValueError, match="set_params"):
            seq.set_params({"weight_ih_l0": np.ones((H, D))})
    with pytest.raises(RuntimeError, match="closed"):
        seq.value_and_grad()
