"""The compiled affine scan: every state of ``h_t = A_t h_{t-1} + c_t`` from a flat plan, in one call.

What the kernels compute, the buffer layout and the plan they run are
described in :mod:`chainprod.kernels.affine_scan` (which imports this module
only when the compiled kernels are first used; importing it imports numba).

Two kinds of op meet in an affine scan (``left`` the earlier interval in
scan order, ``right`` the later; the result is the map ``right o left``):

* *apply*: ``left`` holds the position-0 state, so ``left`` is a state
  ``h`` and the result the state ``A h + c`` (a matrix-vector product, or
  ``O(d)`` for a diagonal ``A``). The planner marks it: its ``m`` (rows of
  the left operand, logically ``1 x (d + 1)``) is 1.
* *compose*: both are maps, ``(A2, c2) o (A1, c1) = (A2 A1, A2 c1 + c2)``,
  one ``d x d`` by ``d x (d + 1)`` product per batch element (a plain loop
  below the crossover of square products, one BLAS ``gemm`` from it on,
  as in :mod:`.scan_compiled`), or ``(a2 a1, a2 c1 + c2)`` for diagonals.

An op whose output slot is one of its operands' (the in-place circuits of
Sklansky, Brent-Kung, chunked) forms a dense result in a temporary first;
the diagonal and apply loops read each element before they write it, or
also go through the temporary. The arithmetic is that of the numpy combine
rules (:data:`chainprod.blocks.COMBINE`): the product first, ``c`` added
last, so the two agree to rounding.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .numba_blas import NOTRANS, gemm

__all__ = ["affine_scan_kernel", "affine_loop_kernel", "form_affine_blocks", "form_affine_diag_blocks", "linear_loop"]

# the plain loop's sizes and offsets are unsigned: numba then indexes without the check for a negative index
_U = np.uint64


@njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _apply_diag(buf, lo, ro, oo, N, d):
    """:func:`_apply` for a diagonal map, every offset unsigned (as :func:`_compose_diag`)."""
    for b in range(N):
        h = lo + b * d
        m = ro + b * (d + d)
        o = oo + b * d
        for i in range(d):  # element i reads only element i: safe in place
            buf[o + i] = buf[m + i] * buf[h + i] + buf[m + d + i]


@njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _matvec(M, m, stride, x, xo, c, co, cstride, out, oo, d):
    """``out[oo + i] = sum_j M[m + i stride + j] x[xo + j] + c[co + i cstride]``, ``i < d``: each row's sum
    along the row, in order, four rows at a time (four sums in flight, where one would wait on the adder
    every term). Every offset unsigned."""
    four = _U(4)
    i = d - d
    while i + four <= d:
        r0 = m + i * stride
        r1 = r0 + stride
        r2 = r1 + stride
        r3 = r2 + stride
        s0 = s1 = s2 = s3 = out.dtype.type(0.0)
        for j in range(d):
            xj = x[xo + j]
            s0 += M[r0 + j] * xj
            s1 += M[r1 + j] * xj
            s2 += M[r2 + j] * xj
            s3 += M[r3 + j] * xj
        ci = co + i * cstride
        out[oo + i] = s0 + c[ci]
        out[oo + i + _U(1)] = s1 + c[ci + cstride]
        out[oo + i + _U(2)] = s2 + c[ci + cstride + cstride]
        out[oo + i + _U(3)] = s3 + c[ci + cstride + cstride + cstride]
        i += four
    while i < d:
        r0 = m + i * stride
        s0 = out.dtype.type(0.0)
        for j in range(d):
            s0 += M[r0 + j] * x[xo + j]
        out[oo + i] = s0 + c[co + i * cstride]
        i += _U(1)


@njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _apply_dense(buf, lo, ro, oo, N, d, tmp):
    """:func:`_apply` for a dense map: each row's sum over ``j`` in order along the row (contiguous), four
    rows at a time (four sums in flight), into ``tmp`` first (the state may be its own output).

    Summing by columns instead (``tmp += A[:, j] h_j``) walked the map at a stride of ``d + 1``: at
    ``d = 64`` an apply took longer than a BLAS composition, and ``brent_kung``'s scan of 1024 steps ran
    1.3x slower than the numpy executor's.
    """
    w = d + _U(1)
    for b in range(N):
        m = ro + b * d * w
        _matvec(buf, m, w, buf, lo + b * d, buf, m + d, w, tmp, d - d, d)
        o = oo + b * d
        for k in range(d):
            buf[o + k] = tmp[k]


@njit(cache=True, error_model="numpy")
def _apply(buf, lo, ro, oo, N, d, diag, tmp):
    """State at ``oo`` <- map at ``ro`` applied to the state at ``lo`` (every batch element)."""
    if diag:
        _apply_diag(buf, _U(lo), _U(ro), _U(oo), _U(N), _U(d))
        return
    _apply_dense(buf, _U(lo), _U(ro), _U(oo), _U(N), _U(d), tmp)


@njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _compose_diag(buf, lo, ro, oo, N, d):
    """:func:`_compose` for diagonal maps, every offset unsigned (no negative-index checks between the
    loads: the loop vectorises)."""
    d2 = d + d
    for b in range(N):
        l_ = lo + b * d2
        r_ = ro + b * d2
        o = oo + b * d2
        for i in range(d):  # element i reads only element i of each operand: safe in place
            a2 = buf[r_ + i]
            c2 = buf[r_ + d + i]
            a1 = buf[l_ + i]
            c1 = buf[l_ + d + i]
            buf[o + i] = a2 * a1
            buf[o + d + i] = a2 * c1 + c2


@njit(cache=True, error_model="numpy", boundscheck=False, inline="always")
def _compose_loops(buf, l_, r_, dst, o, d):
    """``dst[o:]`` <- ``[A2 A1 | A2 c1]`` by loops: row ``i`` as axpys of ``[A1 | c1]``'s rows (``d + 1`` long:
    vectorises), by unsigned indices into the buffer (no slice, whose reference numba takes and drops)."""
    w = d + _U(1)
    for i in range(d):
        oi = o + i * w
        x = buf[r_ + i * w]
        for j in range(w):
            dst[oi + j] = x * buf[l_ + j]
        for k in range(_U(1), d):
            x = buf[r_ + i * w + k]
            lk = l_ + k * w
            for j in range(w):
                dst[oi + j] += x * buf[lk + j]


@njit(cache=True, error_model="numpy")
def _compose(buf, lo, ro, oo, N, d, diag, tmp, cross):
    """Map at ``oo`` <- map at ``ro`` composed after the map at ``lo`` (every batch element)."""
    if diag:
        _compose_diag(buf, _U(lo), _U(ro), _U(oo), _U(N), _U(d))
        return
    w = d + 1
    size = d * w
    inplace = oo == lo or oo == ro
    for b in range(N):
        l_ = lo + b * size
        r_ = ro + b * size
        dst = tmp if inplace else buf
        o = 0 if inplace else oo + b * size
        if d * d * w >= cross:  # [A2 A1 | A2 c1] = A2 (d x d, row stride d + 1) @ [A1 | c1]
            gemm(NOTRANS, NOTRANS, d, w, d, buf, r_, w, buf, l_, w, 0.0, dst, o, w)
        else:
            _compose_loops(buf, _U(l_), _U(r_), dst, _U(o), _U(d))
        for i in range(d):
            dst[o + i * w + d] += buf[r_ + i * w + d]
        if inplace:
            for e in range(size):
                buf[oo + b * size + e] = tmp[e]


@njit(cache=True, error_model="numpy")
def _run_lanes(a, b, N, d, diag, buf, tmp, lane_ptr, op_left, op_right, op_out, op_m, cross):
    """Lanes ``a .. b-1`` in order (their ops are contiguous in the plan)."""
    for o in range(lane_ptr[a], lane_ptr[b]):
        if op_m[o] == 1:
            _apply(buf, op_left[o], op_right[o], op_out[o], N, d, diag, tmp)
        else:
            _compose(buf, op_left[o], op_right[o], op_out[o], N, d, diag, tmp, cross)


@njit(cache=True, parallel=True, error_model="numpy")
def affine_scan_kernel(buf, d, diag, op_left, op_right, op_out, op_m, lane_ptr, lane_cum, lane_mid, stage_ptr,
                       stage_parallel, out_off, threads, cross, states):
    """Run every stage of the plan on ``buf``, copy the states out; the first non-finite ``t``, or -1.

    ``states`` is ``(n, N, d)``; the plan's prefix ``k`` (``k >= 1``) is the
    state ``h_{k-1}``. ``buf`` holds the head state (position 0) and every
    step's block in its slot. With ``threads > 1`` the caller limits BLAS to
    one thread (the lanes of a stage call it concurrently).
    """
    n, N = states.shape[0], states.shape[1]
    T = max(threads, 1)
    tmps = np.empty((T, d * (d + 1)), dtype=buf.dtype)  # one temporary per group of lanes
    bounds = np.empty(T + 1, dtype=np.int64)
    for st in range(stage_ptr.shape[0] - 1):
        a = stage_ptr[st]
        b = stage_ptr[st + 1]
        if stage_parallel[st] == 1 and threads > 1:
            # contiguous groups of lanes of about equal flops, one per thread (a lane goes to the group its
            # middle falls in), as in the scan kernel of chainprod.kernels.scan_compiled
            G = min(T, b - a)
            base = lane_cum[a]
            F = lane_cum[b] - base
            bounds[0] = a
            bounds[G] = b
            for g in range(1, G):
                bounds[g] = a + np.searchsorted(lane_mid[a:b], base + F * g / G)
            for g in prange(G):
                _run_lanes(bounds[g], bounds[g + 1], N, d, diag, buf, tmps[g], lane_ptr, op_left, op_right,
                           op_out, op_m, cross)
        else:
            _run_lanes(a, b, N, d, diag, buf, tmps[0], lane_ptr, op_left, op_right, op_out, op_m, cross)

    bad = -1
    for t in range(n):  # one thread: n N d numbers, against the scan's n N d^2 (or more) work
        if not _copy_state(buf, out_off[t + 1], states[t]) and bad < 0:
            bad = t
    return bad


@njit(cache=True, error_model="numpy")
def _copy_state(buf, src, out):
    """``out`` (N, d) <- the state at ``buf[src:]``; whether every entry is finite."""
    N, d = out.shape
    zero = buf.dtype.type(0.0)
    bad = 0
    for b in range(N):
        for i in range(d):
            v = buf[src + b * d + i]
            out[b, i] = v
            bad += 1 if v - v != zero else 0
    return bad == 0


@njit(cache=True, error_model="numpy")
def affine_loop_kernel(buf, pos_off, h0, diag, states):
    """The plain loop over the blocks at ``pos_off``: ``states[t] = A_t states[t-1] + c_t``; first bad ``t`` or -1.

    What ``"sequential"`` runs on a local backend, with no plan: no block
    is composed with another, only applied to the state.
    """
    n, N, d = states.shape
    w = d + 1
    zero = buf.dtype.type(0.0)
    flat, h0f = states.reshape(-1), h0.reshape(-1)  # C order both (run_affine's): the dense step's layout
    for t in range(n):
        prev = h0 if t == 0 else states[t - 1]
        out = states[t]
        bad = 0
        for b in range(N):
            if diag:
                m = pos_off[t] + b * 2 * d
                for i in range(d):
                    v = buf[m + i] * prev[b, i] + buf[m + d + i]
                    out[b, i] = v
                    bad += 1 if v - v != zero else 0
            else:
                m = pos_off[t] + b * d * w
                ho = b * d if t == 0 else (t - 1) * N * d + b * d
                _matvec(buf, _U(m), _U(w), h0f if t == 0 else flat, _U(ho), buf, _U(m + d), _U(w), flat,
                        _U(t * N * d + b * d), _U(d))
                for i in range(d):
                    v = out[b, i]
                    bad += 1 if v - v != zero else 0
        if bad:
            return t
    return -1


@njit(cache=True, error_model="numpy", boundscheck=False)
def linear_loop(A, b, h0, out, T, N, d, a_step, a_batch, b_step, b_batch, diag):
    """``out[t, n] = A_t[n] out[t-1, n] + b_t[n]`` (``out[-1] = h0``) from the inputs as given: no blocks.

    Every array is flat, C order. Step ``t``'s transition starts at ``t
    a_step`` of ``A`` and sample ``n``'s at ``n a_batch`` past it (0 when
    ``A`` has no batch axis: one transition for every sample); ``b`` the
    same with ``b_step``, ``b_batch``. A dense ``A_t[n]`` is ``d x d``
    row-major, a diagonal one ``d`` numbers. ``out`` is ``(T, N, d)``,
    ``h0`` ``(N, d)``. Each state is ``A h`` summed over ``j`` in order
    (four rows at a time: four independent sums in flight, where one would
    wait on the adder every term), then ``b`` added: the order of
    :func:`affine_loop_kernel`. Overflow is not checked here (the caller
    reads the states once after).
    """
    z = T - T
    one = _U(1)
    for t in range(T):
        so = t * N * d
        po = so - N * d if t > z else z
        hp = out if t > z else h0
        at = t * a_step
        bt = t * b_step
        for n in range(N):
            ho = po + n * d
            oo = so + n * d
            ao = at + n * a_batch
            bo = bt + n * b_batch
            if diag:
                for i in range(d):
                    out[oo + i] = A[ao + i] * hp[ho + i] + b[bo + i]
                continue
            _matvec(A, ao, d, hp, ho, b, bo, one, out, oo, d)


@njit(cache=True, error_model="numpy")
def form_affine_blocks(J, F, prev, x, lam, buf, pos_off):
    """Step ``t``'s block ``[J_t | c_t]`` into ``buf[pos_off[t]:]``, ``c_t = F_t - J_t prev_t``, damped by ``lam``.

    ``J`` is ``(n, N, d, d)``; with ``lam > 0`` (Levenberg-Marquardt) the
    block is ``(J, c + lam x) / (1 + lam)``: the arithmetic of the numpy
    step of :func:`chainprod.newton_solve.solve`. :func:`form_affine_diag_blocks`
    takes a diagonal ``J``. One thread: a pass over memory that is written
    once (the chain kernels of :mod:`.newton_numba` form theirs in parallel).
    """
    for t in range(F.shape[0]):
        _form_dense(J[t], F[t], prev[t], x[t], lam, buf, pos_off[t])


@njit(cache=True, error_model="numpy")
def form_affine_diag_blocks(J, F, prev, x, lam, buf, pos_off):
    """:func:`form_affine_blocks` for a diagonal ``J`` ``(n, N, d)``: blocks ``[a_t | c_t]``."""
    for t in range(F.shape[0]):
        _form_diag(J[t], F[t], prev[t], x[t], lam, buf, pos_off[t])


@njit(cache=True, error_model="numpy")
def _form_diag(J, F, prev, x, lam, buf, off):
    N, d = F.shape
    damp = buf.dtype.type(lam)  # the dtype's arithmetic, as numpy's with a Python float
    scale = buf.dtype.type(1.0) + damp
    for b in range(N):
        o = off + b * 2 * d
        for i in range(d):
            a = J[b, i]
            c = F[b, i] - a * prev[b, i]
            if lam != 0:
                c = (c + damp * x[b, i]) / scale
                a = a / scale
            buf[o + i] = a
            buf[o + d + i] = c


@njit(cache=True, error_model="numpy")
def _form_dense(J, F, prev, x, lam, buf, off):
    N, d = F.shape
    w = d + 1
    damp = buf.dtype.type(lam)
    scale = buf.dtype.type(1.0) + damp
    for b in range(N):
        o = off + b * d * w
        for i in range(d):
            acc = buf.dtype.type(0.0)
            for j in range(d):
                a = J[b, i, j]
                acc += a * prev[b, j]
                buf[o + i * w + j] = a / scale if lam != 0 else a
            c = F[b, i] - acc
            if lam != 0:
                c = (c + damp * x[b, i]) / scale
            buf[o + i * w + d] = c
