"""The schedule builders: sequential, tree, independent, Hillis-Steele, Sklansky, Brent-Kung, chunked.

Each builder takes the number of factors ``L`` (and its own options) and
returns a :class:`~chainprod.schedules.plan.Schedule`. Edge cases (``L`` = 1,
2, 3 and non-powers of two) fall out of the loops: a loop that would make an
empty round makes none, and ``L = 1`` gives a schedule with no rounds.

Each circuit, its bounds and why it is built this way: ``docs/theory.md``
(Q3 to Q6). References: Ladner & Fischer, "Parallel prefix computation"
(1980); Brent & Kung, "A regular layout for parallel adders" (1982);
Blelloch, "Prefix sums and their applications" (1990); Sklansky,
"Conditional-sum addition logic" (1960); Hillis & Steele, "Data parallel
algorithms" (1986).
"""

from __future__ import annotations

import math

import numpy as np

from .plan import Schedule, make_round

__all__ = ["sequential", "tree", "independent", "hillis_steele", "sklansky", "brent_kung", "chunked",
           "BUILTINS", "ALIASES"]


def sequential(L: int) -> Schedule:
    """Backprop order: ``[0, j-1] (x) [j, j]`` for j = 1..L-1, one op per round.

    L-1 rounds, width 1, L-1 ops, every op thin (vector-matrix). This is the
    scan that backpropagation performs (Q1 in docs/theory.md).
    """
    steps = [make_round([j - 1], [j], [j]) for j in range(1, L)]
    return Schedule("sequential", L, L, steps, np.arange(L))


def tree(L: int) -> Schedule:
    """Balanced tree for the total product only (Q3).

    Adjacent partial products are paired each round, the right one
    overwritten: ``ceil(log2 L)`` rounds, ``floor(L/2)`` ops in the first
    round, ``L-1`` ops. An odd node out is carried to the next round.
    ``outputs`` holds only ``[0, L-1]``.
    """
    nodes = np.arange(L)
    steps = []
    while nodes.size > 1:
        pairs = nodes.size // 2
        left, right = nodes[0 : 2 * pairs : 2], nodes[1 : 2 * pairs : 2]
        steps.append(make_round(left, right, right))
        nodes = np.concatenate([right, nodes[2 * pairs :]])
    outputs = np.full(L, -1)
    outputs[L - 1] = nodes[0] if L else -1
    return Schedule("tree", L, L, steps, outputs)


def independent(L: int) -> Schedule:
    """A separate balanced tree for every prefix, sharing nothing (Q4, Q5).

    ``ceil(log2 L)`` rounds, but the first round alone has about ``L^2/4``
    ops and the work is ``L(L-1)/2`` ops: the quadratic cost that Q6 removes.
    Trees never write input slots (other trees read them); each tree
    writes its own scratch slots.
    """
    next_slot = L
    per_round: list[list[list[int]]] = []
    outputs = np.arange(L)
    for k in range(1, L):
        nodes = list(range(k + 1))
        own = set()  # scratch slots of this tree
        r = 0
        while len(nodes) > 1:
            if len(per_round) <= r:
                per_round.append([[], [], []])
            nxt = []
            for a in range(0, len(nodes) - 1, 2):
                x, y = nodes[a], nodes[a + 1]
                if x in own:
                    dst = x
                elif y in own:
                    dst = y
                else:
                    dst = next_slot
                    next_slot += 1
                    own.add(dst)
                per_round[r][0].append(x)
                per_round[r][1].append(y)
                per_round[r][2].append(dst)
                nxt.append(dst)
            if len(nodes) % 2:
                nxt.append(nodes[-1])
            nodes = nxt
            r += 1
        outputs[k] = nodes[0]
    steps = [make_round(*ops) for ops in per_round]
    return Schedule("independent", L, next_slot, steps, outputs)


def hillis_steele(L: int) -> Schedule:
    """Hillis & Steele (Kogge-Stone): every position combines with the one ``stride`` back.

    ``ceil(log2 L)`` rounds, ``L - stride`` ops per round (peak ``L-1``),
    about ``L log2 L`` ops. Every op of a round reads a value another op of
    the same round replaces, so the builder double-buffers: two banks of
    ``L`` slots, written alternately (``n_slots = 2L``).
    """
    cur = np.arange(L)  # slot currently holding position p's partial product
    steps = []
    stride, bank = 1, 1
    while stride < L:
        j = np.arange(stride, L)
        dst = bank * L + j
        steps.append(make_round(cur[j - stride], cur[j], dst))
        cur = cur.copy()
        cur[j] = dst
        stride *= 2
        bank ^= 1
    return Schedule("hillis_steele", L, 2 * L if L > 1 else L, steps, cur)


def sklansky(L: int) -> Schedule:
    """Sklansky's divide-and-conquer circuit (Q6: linear workers, log rounds).

    Round ``r`` (``half = 2^r``): in every block of ``2*half`` positions, each
    position of the upper half combines with the last position of the lower
    half, which already holds that block's prefix. ``ceil(log2 L)`` rounds,
    ``floor(L/2)`` peak width, about ``(L/2) log2 L`` ops; in place.
    """
    steps = []
    pos = np.arange(L)
    half = 1
    while half < L:
        j = pos[(pos & half) != 0]
        left = (j & ~(2 * half - 1)) + half - 1
        steps.append(make_round(left, j, j))
        half *= 2
    return Schedule("sklansky", L, L, steps, np.arange(L))


def brent_kung(L: int) -> Schedule:
    """Brent-Kung / Blelloch work-efficient scan: an up-sweep then a down-sweep.

    Up-sweep (a reduction tree): for ``stride = 1, 2, 4, ...`` slot
    ``j = 2*stride*m + 2*stride - 1`` takes ``slot[j - stride] (x) slot[j]``.
    Afterwards slots ``2^t - 1`` hold full prefixes. Down-sweep: for the
    strides in reverse, slot ``j = 2*stride*m + 3*stride - 1`` takes
    ``slot[j - stride] (x) slot[j]``, filling the prefixes in between.
    At most ``2 ceil(log2 L) - 1`` rounds, fewer than ``2L`` ops, in place.
    This is the inclusive form of Blelloch's (1990) exclusive up/down sweep,
    which needs no identity element and keeps the operand order.
    """
    steps = []
    stride = 1
    strides = []
    while stride < L:
        j = np.arange(2 * stride - 1, L, 2 * stride)
        steps.append(make_round(j - stride, j, j))
        strides.append(stride)
        stride *= 2
    for stride in reversed(strides[:-1] if strides else []):
        j = np.arange(3 * stride - 1, L, 2 * stride)
        steps.append(make_round(j - stride, j, j))
    return Schedule("brent_kung", L, L, steps, np.arange(L))


def chunked(L: int, chunks: int | None = None, outer: str = "sklansky") -> Schedule:
    """Reduce-then-scan over ``chunks`` contiguous chunks (few workers, long chains).

    Phase 1, chunk by chunk in parallel: chunk 0 scans itself sequentially
    (its prefixes are final); every other chunk but the last folds its
    blocks into a scratch slot, giving the chunk total. Phase 2: the
    ``outer`` schedule scans the chunk totals, so each chunk gets the prefix
    that ends just before it. Phase 3: each chunk after the first runs a
    sequential thin scan from that prefix. About ``2L/chunks + log2 chunks``
    rounds, width ``chunks - 1`` (so ``P`` workers want ``P + 1`` chunks, which
    is what ``schedule("chunked", L, workers=P)`` builds), about ``2L`` ops; the down-sweep ops are all
    thin (vector-matrix) because every prefix contains ``a_0``.

    Chunks have equal size ``c = ceil(L/chunks)`` except a shorter last one,
    so each round's slots form arithmetic progressions that a vectorised
    executor turns into strided views. ``chunks=None`` uses ``round(sqrt(L))``.
    """
    if chunks is None:
        chunks = max(1, round(math.sqrt(L)))
    if isinstance(chunks, (bool, np.bool_)) or not isinstance(chunks, (int, np.integer)) or chunks < 1:
        raise ValueError(f"chunked: chunks must be an int >= 1, got {chunks!r}")
    chunks = int(chunks)
    outer_builder = _outer_scan(outer)
    c = max(1, -(-L // chunks))
    n = -(-L // c) if L else 0
    opts = {"chunks": chunks, "outer": outer}
    if c == 1 or n <= 1:  # every chunk one block, or one chunk: nothing to split
        inner = outer_builder(L) if c == 1 else sequential(L)
        return Schedule("chunked", L, inner.n_slots, inner.steps, inner.outputs, opts)
    starts = np.arange(n) * c
    ends = np.minimum(starts + c, L) - 1
    totals = np.empty(n - 1, dtype=np.int64)  # slot of chunk b's total, b < n-1
    totals[0] = ends[0]
    mids = np.arange(1, n - 1)  # chunks folded into scratch (all of size c)
    totals[1:] = L + np.arange(mids.size)
    next_slot = L + mids.size
    steps = []
    # Phase 1.
    for t in range(1, c):
        left = [t - 1]
        right = [t]
        out = [t]
        if mids.size:
            left.append(starts[mids] if t == 1 else totals[mids])
            right.append(starts[mids] + t)
            out.append(totals[mids])
        steps.append(make_round(np.concatenate(left, axis=None), np.concatenate(right, axis=None),
                            np.concatenate(out, axis=None)))
    # Phase 2: scan the n-1 totals with the outer schedule, remapped to our slots.
    carry = totals.copy()  # carry[b] = slot holding [0, ends[b]] once phase 2 is done
    if n - 1 >= 2:
        sub = outer_builder(n - 1)
        remap = np.concatenate([totals, next_slot + np.arange(sub.n_slots - (n - 1))])
        next_slot += sub.n_slots - (n - 1)
        steps += [make_round(remap[s.left], remap[s.right], remap[s.out]) for s in sub.steps]
        carry = remap[sub.outputs]
    # Phase 3: thin sequential scan inside chunks 1..n-1 from their carry-in.
    for t in range(c):
        b = np.arange(1, n)
        b = b[starts[b] + t <= ends[b]]
        p = starts[b] + t
        left = carry[b - 1] if t == 0 else p - 1
        steps.append(make_round(left, p, p))
    return Schedule("chunked", L, next_slot, steps, np.arange(L), opts)


def _outer_scan(name):
    """The built-in scan builder ``chunked`` runs over its chunk totals (``outer=``)."""
    builder = BUILTINS.get(ALIASES.get(name, name)) if isinstance(name, str) else None
    if builder is None or not builder(2).is_scan:
        raise ValueError(f"chunked: outer={name!r} is not a built-in scan (one that produces every prefix); "
                         "use sequential, sklansky, brent_kung or hillis_steele")
    return builder


#: the built-in builders by name (the registry in :mod:`chainprod.schedules` starts from these)
BUILTINS = {
    "sequential": sequential,
    "tree": tree,
    "independent": independent,
    "hillis_steele": hillis_steele,
    "sklansky": sklansky,
    "brent_kung": brent_kung,
    "chunked": chunked,
}
#: other names the literature uses for the same circuits
ALIASES = {"blelloch": "brent_kung", "kogge_stone": "hillis_steele", "ladner_fischer": "sklansky"}
