"""BLAS from inside compiled kernels: one ``gemm`` on row-major blocks of flat arrays.

The compiled kernels (:mod:`chainprod.kernels.numba_kernels`,
:mod:`chainprod.kernels.scan`) hand every dense product above the
calibrated crossover (:mod:`chainprod.kernels.crossover`) to BLAS through
:func:`gemm`. It calls the same ``xGEMM`` numba's own ``np.dot`` calls
(scipy's BLAS, through numba's ``numba_xxgemm`` helper, so kernels that use
it stay in numba's on-disk cache), but on blocks given as *a flat array and
an offset*: no 2-D view is made, no shape is checked, nothing is copied.
That is what lets BLAS take over at small sizes: an ``8 x 8 @ 8 x 8``
product took 0.19 us through ``np.dot(a, b, out)`` on reshaped slices and
0.06 us through :func:`gemm`, as fast as ``np.matmul`` on the same stacked
blocks (measured on the development machine).

Threads: the kernels run on numba's threads only (a chunk of the batch, a
group of layers or of scan lanes per thread). BLAS must not start threads of
its own inside them (two cores running four busy threads was measured
10-15x slower), nor beside them: OpenBLAS's threads keep spinning for a
while after a call and slowed the next parallel region 2-3x.
:func:`one_blas_thread` limits BLAS to one thread for a call; without
``threadpoolctl`` it cannot, and says so (the kernels then keep BLAS out of
their parallel regions).

Importing this module imports numba (not scipy).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["BLAS_THREADS_MIN", "NOTRANS", "TRANS", "blas_available", "blas_threads", "gemm", "one_blas_thread",
           "warm_up"]

#: Products below this many multiply-adds run on one BLAS thread whatever its setting (OpenBLAS starts
#: more from 4 x 65536 for a matrix product, fewer for a matrix-vector one): the kernels limit BLAS's
#: threads only for calls that reach it
BLAS_THREADS_MIN = 1 << 16

#: ``gemm`` flags: use a block as stored, or its transpose
NOTRANS = ord("n")
TRANS = ord("t")

_KIND = {types.float32: "s", types.float64: "d"}


@intrinsic
def _xxgemm(typingctx, ta, tb, m, n, k, a, ia, lda, b, ib, ldb, beta, c, ic, ldc):
    """Column-major ``c[ic:] <- op(a[ia:]) op(b[ib:]) + beta c[ic:]`` (Fortran ``xGEMM``); returns its status."""
    if not (isinstance(a, types.Array) and isinstance(b, types.Array) and isinstance(c, types.Array)):
        return None
    if a.dtype not in _KIND or b.dtype != a.dtype or c.dtype != a.dtype:
        return None
    dtype = a.dtype

    def codegen(context, builder, sig, args):
        ta_, tb_, m_, n_, k_, a_, ia_, lda_, b_, ib_, ldb_, beta_, c_, ic_, ldc_ = args
        char = ir.IntType(8)
        voidp = char.as_pointer()
        intp = cgutils.intp_t
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, voidp, voidp, intp, voidp,
                                                intp, voidp, voidp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")

        def ptr(aty, arr, off):
            data = context.make_array(aty)(context, builder, arr).data
            return builder.bitcast(builder.gep(data, [off]), voidp)

        alpha = cgutils.alloca_once_value(builder, context.get_constant(dtype, 1.0))
        beta_slot = cgutils.alloca_once_value(builder, context.cast(builder, beta_, sig.args[11], dtype))
        as_int = lambda v, ty: context.cast(builder, v, ty, types.intp)  # noqa: E731
        kind = ir.Constant(char, ord(_KIND[dtype]))
        return builder.call(fn, (kind, builder.trunc(ta_, char), builder.trunc(tb_, char),
                                 as_int(m_, sig.args[2]), as_int(n_, sig.args[3]), as_int(k_, sig.args[4]),
                                 builder.bitcast(alpha, voidp), ptr(sig.args[5], a_, ia_),
                                 as_int(lda_, sig.args[7]), ptr(sig.args[8], b_, ib_), as_int(ldb_, sig.args[10]),
                                 builder.bitcast(beta_slot, voidp), ptr(sig.args[12], c_, ic_),
                                 as_int(ldc_, sig.args[14])))

    sig = types.int32(types.int64, types.int64, m, n, k, a, ia, lda, b, ib, ldb, beta, c, ic, ldc)
    return sig, codegen


@njit(cache=True)
def gemm(ta, tb, m, n, k, a, ia, lda, b, ib, ldb, beta, c, ic, ldc):
    """Row-major ``C = op(A) @ op(B) + beta C`` on blocks of flat arrays.

    ``C`` is ``m x n`` at ``c[ic:]`` with row stride ``ldc``; ``op(A)`` is
    ``m x k``: ``A`` stored ``m x k`` (``ta = NOTRANS``) or ``k x m``
    (``ta = TRANS``) at ``a[ia:]`` with row stride ``lda``; likewise ``op(B)``
    ``k x n`` at ``b[ib:]``. ``C`` must not overlap ``A`` or ``B``. Returns
    BLAS's status (0).
    """
    # a row-major matrix is its transpose in column-major order: C^T = op(B)^T op(A)^T,
    # and each operand's flag carries over unchanged (the memory already holds the transpose)
    return _xxgemm(tb, ta, n, m, k, b, ib, ldb, a, ia, lda, beta, c, ic, ldc)


_AVAILABLE = None

#: OpenBLAS's ``OPENBLAS_THREAD_TIMEOUT`` for the library the kernels load (scipy's): its threads
#: spin for 2^20 cycles (about 0.4 ms) after a call before they sleep, not OpenBLAS's 2^28 (about
#: 0.1 s), in which they held the cores that the next library's threads needed. A training loop of
#: ``cp.torch_backward`` and torch's own steps (width 1024, batch 256, float32, 2 threads): torch's
#: step 75 ms with the default, 36 with this; ``cp.torch_backward`` 46 and 45 (medians, measured)
BLAS_THREAD_TIMEOUT = "20"


@contextlib.contextmanager
def _thread_timeout():
    """``OPENBLAS_THREAD_TIMEOUT`` set while scipy's BLAS loads (OpenBLAS reads it then), unless the user set it.

    Removed again afterwards: the process's environment, and its children's, stay as they were. A
    library already loaded (``scipy.linalg`` imported before chainprod's first compiled product)
    keeps its own setting.
    """
    name = "OPENBLAS_THREAD_TIMEOUT"
    if name in os.environ or "scipy.linalg.cython_blas" in sys.modules:
        yield
        return
    os.environ[name] = BLAS_THREAD_TIMEOUT
    try:
        yield
    finally:
        os.environ.pop(name, None)


def blas_available() -> bool:
    """Whether :func:`gemm` can run here (numba finds scipy's BLAS, of the integer width it was built for).

    The first call that finds it also runs :func:`warm_up`.
    """
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            from numba.np.linalg import ensure_blas

            with _thread_timeout():
                ensure_blas()
        except Exception:  # ImportError without scipy; numba's own error on an integer-width mismatch
            _AVAILABLE = False
        else:
            _AVAILABLE = True
            warm_up()
    return _AVAILABLE


def warm_up():
    """Resolve BLAS's functions once, on this thread, before any parallel region may call them.

    numba looks each BLAS function up on its first call, taking the GIL: a
    first call from a worker thread of a parallel region (the GIL held by
    the thread that waits for it) would never return.
    """
    for dt in (np.float32, np.float64):
        one = np.ones(1, dt)
        out = np.zeros(1, dt)
        gemm(NOTRANS, NOTRANS, 1, 1, 1, one, 0, 1, one, 0, 1, 0.0, out, 0, 1)


_BLAS_LIBRARIES = None


def _libraries():
    """threadpoolctl's controllers of the BLAS libraries now loaded, or False without threadpoolctl (made once)."""
    global _BLAS_LIBRARIES
    if _BLAS_LIBRARIES is None:
        if importlib.util.find_spec("threadpoolctl") is None:
            _BLAS_LIBRARIES = False
        else:
            from threadpoolctl import ThreadpoolController

            blas_available()  # scipy's BLAS is loaded by now, so the controller sees it
            _BLAS_LIBRARIES = tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
    return _BLAS_LIBRARIES


class blas_threads:
    """Limit BLAS to ``n`` threads inside the block; ``as`` gives False (and limits nothing) without threadpoolctl.

    Each library's count is read and set directly, and set back on exit only
    where it changed: threadpoolctl's own ``limit`` reads every library's
    version and architecture on entry, 16 us of every compiled call that
    limits BLAS (twice in a training step; measured, two libraries loaded).
    """

    __slots__ = ("n", "saved")

    def __init__(self, n):
        self.n = int(n)
        self.saved = ()

    def __enter__(self):
        libs = _libraries()
        if not libs:
            return False
        saved = []
        for lib in libs:
            before = lib.get_num_threads()
            if before != self.n:
                lib.set_num_threads(self.n)
                saved.append((lib, before))
        self.saved = saved
        return True

    def __exit__(self, *exc):
        for lib, before in self.saved:
            lib.set_num_threads(before)
        self.saved = ()
        return False


def one_blas_thread():
    """Limit BLAS to one thread inside the block (:func:`blas_threads` of 1)."""
    return blas_threads(1)
