"""Register-blocked products for the compiled recurrent loops, written with 32-byte vectors.

A recurrent step multiplies a few rows by ``W_hh`` (forward:
``gates += h_{t-1} W_hh^T``; backward: ``dh = dG W_hh``): at ``H = 8`` or
``20`` the loop vectoriser of LLVM leaves most of that product to scalar
code or to memory (a loop of 8 or 20 values runs its checks and its
remainder every time, and the sum it accumulates goes back to memory after
every term). :func:`rows_times` keeps up to eight vectors of the result in
registers over the whole sum instead (two rows by four vectors, or a row
alone by eight: at batch 1 a pair of rows would leave half of the sums
without work). Measured per product, float32, one
thread, under load (loops of the loop vectoriser / BLAS ``gemm`` / these):
``N = 1, H = 8``: 0.031 / 0.128 / 0.012 us; ``N = 1, H = 20`` (the LSTM):
0.128 / 1.09 / 0.064 us; ``N = 16, H = 20`` (the LSTM): 1.85 / 1.66 /
1.29 us.

The vectors are a numba type of their own, :class:`Vec` (LLVM's
``<8 x float>`` or ``<4 x double>``), with four operations compiled to one
instruction each: :func:`vload`, :func:`vstore` (unaligned, ``lanes``
values from an index), :func:`vsplat` (one value in every lane) and
:func:`vmuladd` (``acc + a * b``, one fused multiply-add where the machine
has one: LLVM's ``fmuladd``, a product and a sum elsewhere; no
reassociation: each sum still runs over ``k`` in order). The fused form
rounds once where the scalar loops round twice, so the products agree with
them and with BLAS (which fuses too) to rounding, not bit for bit. Measured
per product on the 2-core AMD EPYC development VM (float32, one thread;
product then sum / fused): ``16 x 256`` times ``256 x 64`` 5.85 / 4.58 us,
``16 x 20`` times ``20 x 80`` 0.66 / 0.54 us; a row alone by eight vectors
and fused, against paired with itself and not, ``1 x 256`` times
``256 x 64``: 0.36 against 0.76 us. A vector reads and writes whole rows
of ``lanes`` values: the matrices these products take have rows padded to a
multiple of :func:`lanes` (the caller pads them with zeros), and ``B`` is
kept in panels of :data:`PANEL_VECTORS` vectors' columns (:func:`panels`).

Importing this module imports numba. numba's on-disk cache keys a compiled
function on its own file only: after editing this module, delete the cached
loops (``chainprod/kernels/__pycache__/recurrent_numba_loops.*.nb[ic]``),
or they keep the old code.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["PANEL_VECTORS", "Vec", "aligned_zeros", "lanes", "padded_width", "panel_width", "panels", "prefetch",
           "prefetch_range", "rows_times", "to_panels", "vload", "vmuladd", "vsplat", "vstore"]

_U = np.uint64

#: bytes in one vector (AVX's registers; on machines with narrower ones LLVM splits each operation)
VECTOR_BYTES = 32


class Vec(types.Type):
    """``VECTOR_BYTES`` bytes of one float dtype (8 float32 or 4 float64), a value held in a register."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vec({dtype} x {self.lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


def _float_array(arr):
    return isinstance(arr, types.Array) and isinstance(arr.dtype, types.Float)


def _address(context, builder, aty, arr, index, vty):
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [index]), vty.as_pointer())


@intrinsic
def vload(typingctx, arr, index):
    """``arr[index : index + lanes]`` as a vector (no bounds check)."""
    if not (_float_array(arr) and isinstance(index, types.Integer)):
        return None
    vt = Vec(arr.dtype)

    def codegen(context, builder, sig, args):
        ptr = _address(context, builder, sig.args[0], args[0], args[1], context.get_value_type(vt))
        return builder.load(ptr, align=arr.dtype.bitwidth // 8)

    return vt(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, v):
    """``arr[index : index + lanes] = v`` (no bounds check)."""
    if not (_float_array(arr) and isinstance(index, types.Integer) and v == Vec(arr.dtype)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _address(context, builder, sig.args[0], args[0], args[1], context.get_value_type(sig.args[2]))
        builder.store(args[2], ptr, align=arr.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, index, v), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector with ``x`` in every lane."""
    if not isinstance(x, types.Float):
        return None
    vt = Vec(x)

    def codegen(context, builder, sig, args):
        lt = context.get_value_type(vt)
        one = builder.insert_element(ir.Constant(lt, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, ir.Constant(lt, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes))

    return vt(x), codegen


@intrinsic
def vmuladd(typingctx, acc, a, b):
    """``acc + a * b`` lane by lane, one fused multiply-add where the machine has one (``llvm.fmuladd``)."""
    if not (isinstance(acc, Vec) and acc == a == b):
        return None

    def codegen(context, builder, sig, args):
        vt = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt, vt, vt]),
                                            f"llvm.fmuladd.v{sig.args[0].lanes}f{sig.args[0].dtype.bitwidth}")
        return builder.call(fn, [args[1], args[2], args[0]])

    return acc(acc, a, b), codegen


@intrinsic
def _zeros_like_lanes(typingctx, arr):
    if not _float_array(arr):
        return None
    vt = Vec(arr.dtype)
    return vt(arr), lambda context, builder, sig, args: ir.Constant(context.get_value_type(vt), None)


@intrinsic
def lanes(typingctx, arr):
    """Values of ``arr``'s dtype in one vector (8 for float32, 4 for float64), an unsigned constant."""
    if not _float_array(arr):
        return None
    n = VECTOR_BYTES // (arr.dtype.bitwidth // 8)
    return types.uint64(arr), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), n)


@intrinsic
def prefetch(typingctx, arr, index, write):
    """Ask the cache for the line holding ``arr[index]`` (``write``: a literal bool, for writing); no effect on values.

    The backward loop walks its arrays from the last step to the first, a
    direction the hardware prefetchers follow less well: reading the next
    step's rows of ``Z`` ahead cut the LSTM's backward step at N = 16,
    H = 20 (T = 1000, its 6.4 MB of ``Z`` beyond the caches of a loaded
    machine) by about a fifth.
    """
    if not (_float_array(arr) and isinstance(index, types.Integer) and isinstance(write, types.BooleanLiteral)):
        return None
    rw = 1 if write.literal_value else 0

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, rw), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index, write), codegen


@njit(cache=True, inline="always", error_model="numpy", boundscheck=False)
def prefetch_range(arr, start, n, write):
    """:func:`prefetch` every cache line of ``arr[start : start + n]`` (64-byte lines)."""
    step = _U(64) // _U(arr.itemsize)
    i = start
    while i < start + n:
        prefetch(arr, i, write)
        i += step


def padded_width(n, dtype):
    """``n`` rounded up to a whole number of vectors of ``dtype`` (the row length the products take)."""
    per = VECTOR_BYTES // np.dtype(dtype).itemsize
    return (int(n) + per - 1) // per * per


#: vectors in a panel's row: :func:`rows_times` reads ``B`` in panels of this many vectors' columns, each
#: panel contiguous (:func:`panels`), and a lone row takes a panel's row eight vectors at a time
PANEL_VECTORS = 8


def panel_width(dtype):
    """Columns in one panel of ``B`` (:data:`PANEL_VECTORS` vectors of ``dtype``)."""
    return PANEL_VECTORS * (VECTOR_BYTES // np.dtype(dtype).itemsize)


@njit(cache=True, error_model="numpy", boundscheck=False)
def aligned_zeros(n, like):
    """``n`` zeros of ``like``'s dtype from an address that is a multiple of 64 bytes (a cache line); ``n`` unsigned.

    numpy's arrays start at multiples of 16 bytes: then one vector in two (of
    32 bytes) straddles two cache lines. A lone row's product with a ``B`` read
    from the second-level cache, ``1 x 64`` times ``64 x 256`` float32:
    0.50 us from an address 16 bytes past a line, 0.40 from a line.
    """
    buf = np.zeros(n + _U(16), like.dtype)  # 16 values: 64 bytes and more of any float dtype
    line = _U(64)
    skip = ((line - _U(buf.ctypes.data) % line) % line) // _U(buf.itemsize)
    return buf[skip:skip + n]


def panels(b):
    """The matrix ``b`` in :func:`rows_times`'s layout: rows padded with zeros to whole vectors, in panels.

    Panel ``p`` holds columns ``p pw .. p pw + w_p - 1`` of every row, ``pw =``
    :func:`panel_width` (``w_p = pw`` but in the last panel), ``K x w_p`` in C
    order from offset ``p pw K``. A flat array of ``K`` times the padded width,
    from an address a multiple of 64 (why: :func:`aligned_zeros`).
    """
    b = np.ascontiguousarray(b)
    return to_panels(b, False, _U(panel_width(b.dtype)))


@njit(cache=True, error_model="numpy", boundscheck=False)
def to_panels(b, trans, pw):
    """``b`` (C order; with ``trans`` its transpose) in panels of ``pw`` columns, as :func:`panels` lays them out.

    ``pw`` unsigned, a whole number of vectors; ``pw`` at least the padded
    width: one panel, the matrix in C order with padded rows. Compiled, so
    that the recurrent kernels lay out ``W_hh`` in their own call: in numpy,
    with the aligned allocation, it took 6.9 us of a 29 us call at
    ``H = 8`` (a call's fixed cost, which a 1000-step sequence pays twice).
    """
    K = _U(b.shape[0])
    cols = _U(b.shape[1])
    if trans:
        K, cols = cols, K
    L = lanes(b)
    width = (cols + (L - _U(1))) // L * L
    out = aligned_zeros(K * width, b)
    c0 = _U(0)
    while c0 < width:
        w = min(pw, width - c0)
        last = min(cols, c0 + w)
        for k in range(K):
            o = c0 * K + k * w
            if trans:
                for c in range(c0, last):
                    out[o + (c - c0)] = b[c, k]
            else:
                for c in range(c0, last):
                    out[o + (c - c0)] = b[k, c]
        c0 += w
    return out


@njit(cache=True, error_model="numpy", boundscheck=False)
def rows_times(out, oo, ostride, a, ao, astride, astep, K, B, pw, width, NB, accumulate):
    """``out[n, :width] (+)= sum_k a[n, k] B[k, :width]`` for the ``NB`` rows ``n``.

    Row ``n`` of ``out`` starts at ``oo + n ostride``; ``a[n, k]`` is
    ``a[ao + n astride + k astep]``; ``B`` is ``K x width`` in panels of
    ``pw`` columns (:func:`panels`; ``pw >= width``: one panel, ``B`` in C
    order). ``width`` and ``pw`` are whole numbers of vectors; every index is
    unsigned. Without ``accumulate`` ``out`` is overwritten. Each sum over
    ``k`` runs in order, one term after the other, in a register: two rows
    times up to four vectors at a time, up to eight sums in flight, enough to
    hide the adder's latency (one row at a time, a step's ``dh = dG W_hh``
    of the LSTM at ``N = 16, H = 20`` waited on chains of 80 additions).

    In panels the rows of the columns a block reads lie at a stride of the
    panel's width, not the matrix's (rows of 1 KB fell on a quarter of the
    first-level cache's sets and pushed each other out). Measured on the AMD
    EPYC development VM, float32, one thread, per product, in C order /
    panels: ``1 x 64`` times ``64 x 256`` 0.51 / 0.37 us, ``1 x 128`` times
    ``128 x 512`` 2.0 / 1.37 us; ``16 x 128`` times ``128 x 512`` 19.9 /
    17.6 us; ``16 x 64`` times ``64 x 256`` 4.47 / 4.43 us (both from
    addresses that are multiples of 64).
    """
    L = lanes(out)
    L4 = L + L + L + L
    zero = width - width  # unsigned zero
    n = zero
    while n + _ONE < NB:  # rows in pairs
        o0 = oo + n * ostride
        o1 = o0 + ostride
        a0 = ao + n * astride
        a1 = a0 + astride
        c = zero
        p0 = zero  # the panel of column c: columns p0 .. p0 + w - 1 (_panel_of)
        w = min(pw, width)
        while c < width:  # a block never crosses a panel's edge: panels are whole multiples of 4 L wide
            left = width - c
            p0, w, b = _panel_of(c, p0, w, pw, width, K)
            if left >= L4:
                _block(out, o0 + c, o1 + c, a, a0, a1, astep, K, B, b, w, L, 4, accumulate)
                c += L4
            elif left >= L4 - L:
                _block(out, o0 + c, o1 + c, a, a0, a1, astep, K, B, b, w, L, 3, accumulate)
                c += L4 - L
            elif left >= L + L:
                _block(out, o0 + c, o1 + c, a, a0, a1, astep, K, B, b, w, L, 2, accumulate)
                c += L + L
            else:
                _block(out, o0 + c, o1 + c, a, a0, a1, astep, K, B, b, w, L, 1, accumulate)
                c += L
        n += _ONE + _ONE
    if n < NB:  # a row alone (every row at batch 1): eight vectors of it at a time, no second row's work
        _one_row(out, oo + n * ostride, a, ao + n * astride, astep, K, B, pw, width, L, accumulate)


_ONE = np.uint64(1)


@njit(cache=True, inline="always")
def _panel_of(c, p0, w, pw, width, K):
    """``(p0, w, b)`` at column ``c``: its panel (columns ``p0 .. p0 + w - 1``) and where row 0 of ``c`` is in ``B``.

    ``p0, w`` are the panel of the block before (a block never crosses a
    panel's edge), moved on where ``c`` starts the next; row ``k`` of column
    ``c`` is at ``b + k w``. Only integers: inlined, it takes no reference.
    """
    if c - p0 == w:
        p0 = c
        w = min(pw, width - c)
    return p0, w, p0 * K + (c - p0)


@njit(cache=True, inline="always", error_model="numpy", boundscheck=False)
def _one_row(out, o0, a, a0, astep, K, B, pw, width, L, accumulate):
    """:func:`rows_times` of one row: up to eight vectors of it at a time (eight sums in flight)."""
    L4 = L + L + L + L
    L8 = L4 + L4
    c = width - width
    p0 = c  # the panel of column c, as in rows_times
    w = min(pw, width)
    while c < width:
        left = width - c
        p0, w, b = _panel_of(c, p0, w, pw, width, K)
        if left >= L8:
            _row_block(out, o0 + c, a, a0, astep, K, B, b, w, L, 8, accumulate)
            c += L8
        elif left >= L4:
            _row_block(out, o0 + c, a, a0, astep, K, B, b, w, L, 4, accumulate)
            c += L4
        elif left >= L + L:
            _row_block(out, o0 + c, a, a0, astep, K, B, b, w, L, 2, accumulate)
            c += L + L
        else:
            _row_block(out, o0 + c, a, a0, astep, K, B, b, w, L, 1, accumulate)
            c += L


@njit(cache=True, inline="always", error_model="numpy", boundscheck=False)
def _row_block(out, o0, a, a0, astep, K, B, c, bstride, L, nvec, accumulate):
    """``nvec`` (1, 2, 4 or 8) vectors of row ``o0`` summed over ``k``, each sum in order."""
    L2 = L + L
    L4 = L2 + L2
    s0 = _start(out, o0, accumulate)
    s1 = _start(out, o0 + L, accumulate and nvec > 1)
    s2 = _start(out, o0 + L2, accumulate and nvec > 2)
    s3 = _start(out, o0 + L2 + L, accumulate and nvec > 2)
    s4 = _start(out, o0 + L4, accumulate and nvec > 4)
    s5 = _start(out, o0 + L4 + L, accumulate and nvec > 4)
    s6 = _start(out, o0 + L4 + L2, accumulate and nvec > 4)
    s7 = _start(out, o0 + L4 + L2 + L, accumulate and nvec > 4)
    for k in range(K):
        x = vsplat(a[a0 + k * astep])
        b = k * bstride + c
        s0 = vmuladd(s0, x, vload(B, b))
        if nvec > 1:
            s1 = vmuladd(s1, x, vload(B, b + L))
        if nvec > 2:
            s2 = vmuladd(s2, x, vload(B, b + L2))
            s3 = vmuladd(s3, x, vload(B, b + L2 + L))
        if nvec > 4:
            s4 = vmuladd(s4, x, vload(B, b + L4))
            s5 = vmuladd(s5, x, vload(B, b + L4 + L))
            s6 = vmuladd(s6, x, vload(B, b + L4 + L2))
            s7 = vmuladd(s7, x, vload(B, b + L4 + L2 + L))
    vstore(out, o0, s0)
    if nvec > 1:
        vstore(out, o0 + L, s1)
    if nvec > 2:
        vstore(out, o0 + L2, s2)
        vstore(out, o0 + L2 + L, s3)
    if nvec > 4:
        vstore(out, o0 + L4, s4)
        vstore(out, o0 + L4 + L, s5)
        vstore(out, o0 + L4 + L2, s6)
        vstore(out, o0 + L4 + L2 + L, s7)


@njit(cache=True, inline="always", error_model="numpy", boundscheck=False)
def _block(out, o0, o1, a, a0, a1, astep, K, B, c, bstride, L, nvec, accumulate):
    """``nvec`` (1 to 4) vectors of rows ``o0`` and ``o1`` summed over ``k``."""
    s0 = _start(out, o0, accumulate)
    s1 = _start(out, o0 + L, accumulate and nvec > 1)
    s2 = _start(out, o0 + L + L, accumulate and nvec > 2)
    s3 = _start(out, o0 + L + L + L, accumulate and nvec > 3)
    t0 = _start(out, o1, accumulate)
    t1 = _start(out, o1 + L, accumulate and nvec > 1)
    t2 = _start(out, o1 + L + L, accumulate and nvec > 2)
    t3 = _start(out, o1 + L + L + L, accumulate and nvec > 3)
    for k in range(K):
        x = vsplat(a[a0 + k * astep])
        y = vsplat(a[a1 + k * astep])
        b = k * bstride + c
        v0 = vload(B, b)
        s0 = vmuladd(s0, x, v0)
        t0 = vmuladd(t0, y, v0)
        if nvec > 1:
            v1 = vload(B, b + L)
            s1 = vmuladd(s1, x, v1)
            t1 = vmuladd(t1, y, v1)
        if nvec > 2:
            v2 = vload(B, b + L + L)
            s2 = vmuladd(s2, x, v2)
            t2 = vmuladd(t2, y, v2)
        if nvec > 3:
            v3 = vload(B, b + L + L + L)
            s3 = vmuladd(s3, x, v3)
            t3 = vmuladd(t3, y, v3)
    vstore(out, o0, s0)
    if nvec > 1:
        vstore(out, o0 + L, s1)
    if nvec > 2:
        vstore(out, o0 + L + L, s2)
    if nvec > 3:
        vstore(out, o0 + L + L + L, s3)
    vstore(out, o1, t0)
    if nvec > 1:
        vstore(out, o1 + L, t1)
    if nvec > 2:
        vstore(out, o1 + L + L, t2)
    if nvec > 3:
        vstore(out, o1 + L + L + L, t3)


@njit(cache=True, inline="always", error_model="numpy", boundscheck=False)
def _start(out, i, load):
    """The vector of ``out`` at ``i`` when ``load`` (a sum that accumulates), else zeros."""
    if load:
        return vload(out, i)
    return _zeros_like_lanes(out)
