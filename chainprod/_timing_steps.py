"""How chainprod measures a whole training step: torch's, any call's, the BLAS floor's, on ``P`` threads.

The rest of the measuring (the machine, the timing loops, chainprod's and
the peers' gradients of a chain) is in :mod:`chainprod._timing`:

* :func:`measure_torch_step` times a torch model's training step
  (``mse_loss`` then ``loss.backward()``), :func:`measure_call` any call as
  a whole, and :func:`measure_matmuls` the matrix products of a dense chain's
  forward and backward pass in BLAS alone (the machine's lower bound);
* :func:`thread_limit` runs a block on ``P`` threads of torch, numba and BLAS.

torch and threadpoolctl are imported only when asked for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time

import numpy as np

from ._timing import Timing, time_passes
from .layers import Dense

__all__ = ["SETTLE_SECONDS", "load_torch_first", "thread_limit", "grad_clearer", "measure_call", "measure_matmuls",
           "measure_torch_step"]


# -- a torch model's training step, any call, and the BLAS floor --------------------------------------
def load_torch_first():
    """Import torch, where it is installed, before numba's threads start: call it before any compiled call.

    torch ships its own ``libgomp.so.1``; numba's ``omp`` threading layer links
    the system's, of the same name. Started first (the first parallel region,
    or ``numba.set_num_threads``), numba's loads the system library, and torch,
    imported after, ran its two-thread steps 8x slower on the 2-core
    development VM: an MLP (width 256, depth 8, batch 128, float32) 23.6 ms a
    step against 2.8 with torch imported first (and 5.0 on one thread either
    way). The main job had calibrated (numba's threads started) before its
    torch rows imported torch: every torch row at P = 2 from width 128 on read
    10-20x its time alone. Returns whether torch is loaded.
    """
    if "torch" in sys.modules:
        return True
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # noqa: F401

    return True


#: seconds a row waits before it starts for BLAS threads of earlier work to stop spinning: OpenBLAS's
#: threads spin 2^28 cycles after a call (its default; about 0.1 s) before they sleep
SETTLE_SECONDS = 0.2


@contextlib.contextmanager
def thread_limit(P):
    """Run the block on ``P`` threads: torch's intra-op threads (if torch is loaded), numba's (if loaded) and BLAS.

    All are restored afterwards. The block starts :data:`SETTLE_SECONDS`
    later, once the threads of the BLAS calls before it sleep: OpenBLAS's
    threads spin for about 0.1 s after a call (numpy's library; chainprod's
    kernels load scipy's with a shorter spin), and a row timed while they
    spin shares the cores with them. On the 2-core development VM
    ``cp.torch_backward`` of an MLP (width 256, depth 8, batch 128, float32)
    on two threads took 2.2 or 6.3 ms a call, alternately, in the 0.1 s after
    a numpy product on two threads, and torch's own step 6.6 ms against 2.6
    (its first step after the product 116 ms). Shutting the threads down
    instead made it worse: setting a library's thread count (threadpoolctl
    does, around every compiled call) then starts new threads, which spin.

    numba's count matters even on the ``vectorized`` backend: the compiled
    kernels cut a large batch over numba's threads, so a row said to run on
    one thread must not find two.
    Without threadpoolctl, BLAS keeps its own thread count (``pip install
    threadpoolctl``). XLA's pool is not reached.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    # A limit reaches only what is loaded: numba, and the BLAS its kernels call (scipy's, not numpy's),
    # are loaded first where installed. Entered before the first compiled call of a process, the block
    # ran chainprod on numba's default two threads and scipy's BLAS on two: a row said to be on one
    # thread at the two-thread floor's speed (measured, width 1024, batch 256).
    if importlib.util.find_spec("numba") is not None:
        from .kernels.numba_blas import blas_available

        blas_available()
    with contextlib.ExitStack() as stack:
        numba = sys.modules.get("numba")
        if numba is not None and hasattr(numba, "set_num_threads"):
            stack.callback(numba.set_num_threads, numba.get_num_threads())
            numba.set_num_threads(max(1, min(int(P), numba.config.NUMBA_NUM_THREADS)))
        try:
            from threadpoolctl import threadpool_limits

            stack.enter_context(threadpool_limits(int(P), user_api="blas"))
        except ImportError:  # pragma: no cover - threadpoolctl is in the bench and test extras
            pass
        if torch is not None:
            torch.set_num_threads(int(P))
            stack.callback(torch.set_num_threads, before)
        time.sleep(SETTLE_SECONDS)
        yield


def measure_call(fn, repeats=3, warmup=2, setup=None) -> Timing:
    """Time ``fn()`` as a whole, ``repeats`` times after ``warmup`` untimed calls: end-to-end only.

    For a call that does both passes at once (``chainprod.torch_backward``):
    :attr:`Timing.forward` and :attr:`Timing.backward` stay empty. ``setup()``
    runs untimed before every call (e.g. clearing torch's ``.grad``).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    total = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        total.append(time.perf_counter() - t0)
    return Timing([], [], total)


def measure_torch_step(model, x, y, repeats=3) -> Timing:
    """Time a training step of a torch ``model``: ``mse_loss(model(x), y)`` (forward), ``loss.backward()``.

    ``.grad`` is cleared, untimed, before each repeat (as ``optimizer.zero_grad(set_to_none=True)``).
    """
    import torch.nn.functional as F

    clear = grad_clearer(model)
    clear()
    F.mse_loss(model(x), y).backward()
    return time_passes(lambda: F.mse_loss(model(x), y), lambda loss: loss.backward(), repeats, setup=clear)


def grad_clearer(model):
    """A function that sets every parameter's ``.grad`` of ``model`` to None (``zero_grad(set_to_none=True)``).

    Run untimed before each timed step of torch and of ``cp.torch_backward`` alike: a step into
    existing gradients adds to them in place, a step after clearing only sets them.
    """
    params = list(model.parameters())

    def clear():
        for p in params:
            p.grad = None

    return clear


def measure_matmuls(chain, x, repeats=3) -> Timing:
    """The matrix products of a dense chain's training step in BLAS alone: the machine's lower bound.

    Forward: ``h_l = h_{l-1} @ W_l.T`` per layer; backward: ``dW_l = g_l.T @ h_{l-1}``
    per layer and ``g_{l-1} = g_l @ W_l`` for every layer but the first, into
    preallocated outputs (no activations, no bias, no allocation, no checks):
    what any implementation of the same step has to compute at least.
    """
    Ws = [np.asarray(layer.params[0]) for layer in chain.layers]
    if not all(isinstance(layer, Dense) for layer in chain.layers):
        raise ValueError("the BLAS floor is defined for chains of Dense layers")
    N = x.shape[0]
    hs = [np.ascontiguousarray(x)] + [np.empty((N, W.shape[0]), W.dtype) for W in Ws]
    dWs = [np.empty_like(W) for W in Ws]
    gs = [np.empty((N, W.shape[1]), W.dtype) for W in Ws]
    g_top = np.ones((N, Ws[-1].shape[0]), Ws[-1].dtype)

    def run_forward():
        for l, W in enumerate(Ws):
            np.matmul(hs[l], W.T, out=hs[l + 1])

    def run_backward(_):
        g = g_top
        for l in range(len(Ws) - 1, -1, -1):
            np.matmul(g.T, hs[l], out=dWs[l])
            if l:
                np.matmul(g, Ws[l], out=gs[l])
                g = gs[l]

    for _ in range(2):
        run_backward(run_forward())
    return time_passes(run_forward, run_backward, repeats)
