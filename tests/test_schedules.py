"""Schedules asserted exactly from sizes, replayed by an independent checker."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chainprod as cp
from chainprod.schedules import SCHEDULES, Round
from chainprod.schedules import replay as schedule_replay

SMALL = list(range(1, 71))
LARGE = [127, 128, 129, 1000, 1025, 4096]
SCANS = ["sequential", "independent", "hillis_steele", "sklansky", "brent_kung", "chunked"]


def clog2(L: int) -> int:
    """ceil(log2 L) for L >= 1 by integer arithmetic (0 for L = 1)."""
    return (L - 1).bit_length()


def replay(s):
    """Independent replay: per round, the (i, k, j) of every op; checks every rule.

    All ops of a round read the state as it was at the start of the round
    (the round is order-free), and the result must be the same as applying
    them one by one in order and in reverse order.
    """
    lo = np.full(s.n_slots, -1)
    hi = np.full(s.n_slots, -1)
    lo[: s.length] = hi[: s.length] = np.arange(s.length)
    rounds = []
    for st_ in s.steps:
        left, right, out = (np.asarray(a) for a in (st_.left, st_.right, st_.out))
        assert left.shape == right.shape == out.shape
        assert len(set(out.tolist())) == out.size, "two ops write one slot"
        i, k, k1, j = lo[left], hi[left], lo[right], hi[right]
        assert np.all(i >= 0) and np.all(k1 >= 0), "reads an empty slot"
        assert np.all(k + 1 == k1), "intervals not adjacent"
        for order in (range(out.size), reversed(range(out.size))):
            l2, h2 = lo.copy(), hi.copy()
            for n in order:
                a, b = (l2[left[n]], h2[left[n]]), (l2[right[n]], h2[right[n]])
                assert (a, b) == ((i[n], k[n]), (k1[n], j[n])), "round is not order-free"
                l2[out[n]], h2[out[n]] = a[0], b[1]
        lo[out], hi[out] = i, j
        rounds.append((i.copy(), k.copy(), j.copy()))
    return rounds, lo, hi


def check_scan(s):
    _, lo, hi = replay(s)
    assert s.outputs.shape == (s.length,)
    for k, slot in enumerate(s.outputs.tolist()):
        assert slot >= 0 and (lo[slot], hi[slot]) == (0, k), f"output {k}"


def assert_widths(s, widths):
    assert s.widths == widths
    assert s.rounds == len(widths)
    assert s.peak_width == max(widths, default=0)
    assert s.num_ops == sum(widths)


# -- exact properties ----------------------------------------------------------
@pytest.mark.parametrize("L", SMALL + LARGE)
def test_sequential(L):
    s = cp.schedule("sequential", L).validate()
    check_scan(s)
    assert_widths(s, [1] * (L - 1))
    assert s.rounds == L - 1 and s.num_ops == L - 1 and s.peak_width == (1 if L > 1 else 0)


@pytest.mark.parametrize("L", SMALL + LARGE)
def test_tree(L):
    s = cp.schedule("tree", L).validate()
    widths, n = [], L
    while n > 1:
        widths.append(n // 2)
        n -= n // 2
    assert_widths(s, widths)
    assert s.rounds == clog2(L)
    assert s.num_ops == L - 1
    if L > 1:
        assert s.widths[0] == L // 2
        assert not s.is_scan
        assert [k for k in range(L) if s.outputs[k] >= 0] == [L - 1]
    _, lo, hi = replay(s)
    slot = s.outputs[L - 1]
    assert (lo[slot], hi[slot]) == (0, L - 1)


@pytest.mark.parametrize("L", SMALL + [127, 128, 129, 1000, 1025])
def test_independent(L):
    s = cp.schedule("independent", L).validate()
    if L <= 200:
        check_scan(s)
    assert s.rounds == clog2(L)
    assert s.num_ops == L * (L - 1) // 2
    # first round: every tree over k+1 leaves pairs them up
    peak = sum((k + 1) // 2 for k in range(1, L))
    assert s.peak_width == peak
    assert (s.widths[0] if L > 1 else 0) == peak
    if L >= 8:
        assert abs(peak - L * L / 4) <= L  # grows as L^2/4
    # every round exactly: trees of m leaves pair floor(m/2) nodes per round
    expect = [0] * clog2(L)
    for k in range(1, L):
        m, r = k + 1, 0
        while m > 1:
            expect[r] += m // 2
            m -= m // 2
            r += 1
    assert s.widths == expect


@pytest.mark.parametrize("L", SMALL + LARGE)
def test_hillis_steele(L):
    s = cp.schedule("hillis_steele", L).validate()
    check_scan(s)
    strides = [1 << r for r in range(clog2(L))]
    assert_widths(s, [L - st_ for st_ in strides])
    assert s.rounds == clog2(L)
    assert s.peak_width == max(L - 1, 0)
    assert s.num_ops == sum(L - st_ for st_ in strides)


@pytest.mark.parametrize("L", SMALL + LARGE)
def test_sklansky(L):
    s = cp.schedule("sklansky", L).validate()
    check_scan(s)
    assert s.rounds == clog2(L)
    assert s.peak_width == L // 2
    assert_widths(s, [sum(1 for p in range(L) if p >> r & 1) for r in range(clog2(L))])


@pytest.mark.parametrize("L", SMALL + LARGE)
def test_brent_kung(L):
    s = cp.schedule("brent_kung", L).validate()
    check_scan(s)
    assert clog2(L) <= s.rounds <= 2 * clog2(L)
    assert L - 1 <= s.num_ops < max(2 * L, 1)
    assert s.peak_width == L // 2
    n = clog2(L)
    if L > 1 and L == 1 << n:  # powers of two: the textbook count
        assert s.num_ops == 2 * L - 2 - n
        assert s.rounds == 2 * n - 1


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8, 13, 64, 100])
def test_blelloch_and_other_aliases(L):
    for alias, name in (("blelloch", "brent_kung"), ("kogge_stone", "hillis_steele"),
                        ("ladner_fischer", "sklansky")):
        a, b = cp.schedule(alias, L), cp.schedule(name, L)
        assert a.widths == b.widths
        for x, y in zip(a.steps, b.steps):
            for u, v in zip(x, y):
                assert np.array_equal(u, v)
        assert np.array_equal(a.outputs, b.outputs)


def chunked_bounds(s, L, P):
    assert s.peak_width <= P
    assert s.rounds <= 2 * -(-L // P) + clog2(P)
    assert L - 1 <= s.num_ops <= 2 * L + (P // 2) * clog2(P)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 7, 16, 33])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 16, 17, 50, 64, 70, 1000, 1025, 4096])
def test_chunked(L, P):
    s = cp.schedule("chunked", L, chunks=P).validate()
    if L <= 1025:
        check_scan(s)
    chunked_bounds(s, L, P)
    assert s.options.get("chunks") == P
    # workers=P builds P + 1 chunks: peak width P, and real parallelism even for P = 2
    w = cp.schedule("chunked", L, workers=P)
    assert w.options["chunks"] == P + 1
    assert w.widths == cp.schedule("chunked", L, chunks=P + 1).widths
    assert w.peak_width <= P
    if P == 2 and L >= 6:  # two workers really work side by side
        assert w.peak_width == 2


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 3000), P=st.integers(1, 200),
       outer=st.sampled_from(["sklansky", "brent_kung", "hillis_steele", "sequential"]))
def test_chunked_random(L, P, outer):
    s = cp.schedule("chunked", L, chunks=P, outer=outer).validate()
    check_scan(s)
    assert s.peak_width <= P
    outer_rounds = cp.schedule(outer, max(P, 1)).rounds
    assert s.rounds <= 2 * -(-L // P) + outer_rounds
    assert s.num_ops >= L - 1


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 600), name=st.sampled_from(["sequential", "hillis_steele", "sklansky", "brent_kung"]))
def test_scans_random_lengths(L, name):
    s = cp.schedule(name, L)
    check_scan(s)
    assert s.rounds >= clog2(L) and s.num_ops >= L - 1  # lower bounds of any prefix circuit


@pytest.mark.parametrize("L,backend", [(L, b) for L in (1, 2, 3, 7, 64, 100) for b in ("vectorized", "serial",
                                                                                      "threads")]
                         + [(1000, "vectorized")])
def test_auto_is_a_valid_scan(L, backend):
    for blocks in (None, 8, [("dense", 1, 4)] + [("diag", 4, 4)] * (L - 1)):
        s = cp.schedule("auto", L, blocks=blocks, backend=backend, workers=2).validate()
        assert s.is_scan and s.length == L
        if L <= 100:
            check_scan(s)


# -- validation of hand-made schedules ----------------------------------------------
def R(left, right, out):
    return Round(np.array(left), np.array(right), np.array(out))


def test_hand_made_valid_schedule_passes():
    # L = 3: [0]x[1] -> 1, then [0,1]x[2] -> 2
    s = cp.Schedule("mine", 3, 3, [R([0], [1], [1]), R([1], [2], [2])], [0, 1, 2])
    assert s.validate() is s
    assert s.rounds == 2 and s.num_ops == 2 and s.is_scan
    check_scan(s)
    mats = [np.eye(2) * (k + 2) for k in range(3)]
    out = cp.suffix_products(mats, method=s)
    np.testing.assert_allclose(out[0], np.eye(2) * 24)


@pytest.mark.parametrize(
    "case,steps,n_slots,outputs,msg",
    [
        ("non-adjacent", [R([0], [2], [2]), R([0], [1], [1])], 3, [0, 1, 2], "adjacent"),
        ("two-writers", [R([0, 1], [1, 2], [3, 3])], 4, [0, 1, 3], "same slot"),
        ("read-after-write-in-round", [R([0, 1], [1, 2], [1, 2])], 3, [0, 1, 2], "another op"),
        ("wrong-outputs", [R([0], [1], [1]), R([1], [2], [2])], 3, [0, 2, 1], "expected"),
        ("output-not-a-prefix", [R([1], [2], [2])], 3, [0, 1, 2], "expected"),
        ("empty-slot", [R([0], [3], [1])], 4, [0, 1, 2], "empty"),
        ("slot-out-of-range", [R([0], [7], [1])], 3, [0, 1, 2], "range"),
        ("outputs-wrong-length", [R([0], [1], [1]), R([1], [2], [2])], 3, [0, 1], "shape"),
    ],
)
def test_broken_schedules_raise(case, steps, n_slots, outputs, msg):
    s = cp.Schedule(case, 3, n_slots, steps, outputs)
    with pytest.raises(cp.ScheduleError, match=msg):
        s.validate()
    assert issubclass(cp.ScheduleError, ValueError)


def test_broken_schedule_rejected_by_suffix_products():
    s = cp.Schedule("bad", 3, 3, [R([0], [2], [2]), R([0], [1], [1])], [0, 1, 2])
    with pytest.raises(cp.ScheduleError):
        cp.suffix_products([np.eye(2)] * 3, method=s)


def test_callable_method_is_validated():
    good = cp.schedule(lambda L: SCHEDULES["sklansky"](L), 9)
    assert good.widths == cp.schedule("sklansky", 9).widths
    with pytest.raises(cp.ScheduleError):
        cp.schedule(lambda L: cp.Schedule("bad", L, L, [R([0], [2], [2])], np.arange(L)), 3)
    with pytest.raises(TypeError, match="Schedule"):
        cp.schedule(lambda L: "not a schedule", 3)


def test_register_schedule_roundtrip():
    def reverse_sequential(L):  # the same ops as sequential, built by hand
        return cp.Schedule("mine", L, L, [R([j - 1], [j], [j]) for j in range(1, L)], np.arange(L))

    cp.register_schedule("mine_seq", reverse_sequential)
    try:
        assert "mine_seq" in cp.valid_schedules()
        mats = [np.eye(2) * 2.0] * 5
        out = cp.suffix_products(mats, method="mine_seq")
        np.testing.assert_allclose(out[0], np.eye(2) * 32)
    finally:
        SCHEDULES.pop("mine_seq", None)
        from chainprod.schedules import build
        build.cache_clear()
    assert "mine_seq" not in cp.valid_schedules()


def test_plans_are_immutable():
    s = cp.schedule("sklansky", 16)
    with pytest.raises(ValueError):
        s.steps[0].left[0] = 5
    with pytest.raises(ValueError):
        s.outputs[0] = 3


# -- names, ready schedules ------------------------------------------------------------
def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as e:
        cp.schedule("bogus_scan", 8)
    msg = str(e.value)
    assert "bogus_scan" in msg
    for name in cp.valid_schedules():
        assert name in msg
    with pytest.raises(ValueError, match="sklansky"):
        cp.suffix_products([np.eye(2)] * 3, method="bogus_scan")


def test_ready_schedule_accepted_and_length_checked():
    s = cp.schedule("brent_kung", 12)
    assert cp.schedule(s, 12) is s
    with pytest.raises(ValueError, match="12"):
        cp.schedule(s, 13)


def test_bad_lengths_and_options():
    with pytest.raises(ValueError):
        cp.schedule("sklansky", 0)
    with pytest.raises(TypeError):
        cp.schedule("sklansky", 4.0)
    with pytest.raises(TypeError, match="chunks"):
        cp.schedule("sklansky", 4, chunks=2)
    with pytest.raises(ValueError):
        cp.schedule("chunked", 8, chunks=0)
    with pytest.raises(TypeError):
        cp.schedule(3, 8)


# -- printing ------------------------------------------------------------------------
@pytest.mark.parametrize("name,L", [("sklansky", 8), ("brent_kung", 13), ("chunked", 20), ("sequential", 5),
                                    ("hillis_steele", 17)])
def test_str_teaches_the_plan(name, L):
    s = cp.schedule(name, L)
    text = str(s)
    low = text.lower()
    for word in ("rounds", "peak width", "ops", "flops", "brent"):
        assert word in low
    assert name in text
    assert re.search(rf"rounds[^\n]*\b{s.rounds}\b", low)
    assert re.search(rf"peak width[^\n]*\b{s.peak_width}\b", low)
    assert re.search(rf"ops[^\n]*\b{s.num_ops}\b", low)
    rows = [ln for ln in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\S+\s+\[", ln)]
    assert len(rows) == s.rounds
    assert [int(r.split()[1]) for r in rows] == s.widths
    assert name in repr(s) and str(L) in repr(s)


def test_str_of_long_plan_is_bounded():
    s = cp.schedule("sequential", 200)
    assert len(str(s).splitlines()) < 60


# -- costs -----------------------------------------------------------------------------
def flops_gradient_chain(s, w):
    """Per-round flops by hand: an op whose left interval starts at 0 is 1xw @ wxw."""
    rounds, _, _ = replay(s)
    return [sum(2 * w * w if i == 0 else 2 * w**3 for i in ii.tolist()) for ii, _, _ in rounds]


def flops_from_specs(s, specs):
    kinds = [k for k, _, _ in specs]
    rows = [r for _, r, _ in specs]
    cols = [c for _, _, c in specs]
    out = []
    for ii, kk, jj in replay(s)[0]:
        tot = 0
        for i, k, j in zip(ii.tolist(), kk.tolist(), jj.tolist()):
            ld = any(x == "dense" for x in kinds[i: k + 1])
            rd = any(x == "dense" for x in kinds[k + 1: j + 1])
            r, inner, c = rows[i], cols[k], cols[j]
            if ld and rd:
                tot += 2 * r * inner * c
            elif ld or rd:
                tot += r * c  # scaling rows or columns
            else:
                tot += r  # diagonal times diagonal
        out.append(tot)
    return out


@pytest.mark.parametrize("w", [1, 3, 8])
@pytest.mark.parametrize("name", SCANS + ["tree"])
@pytest.mark.parametrize("L", [1, 2, 5, 16, 33])
def test_flops_gradient_chain(name, L, w):
    s = cp.schedule(name, L)
    per = flops_gradient_chain(s, w)
    np.testing.assert_allclose(s.flops_per_round(w), per, rtol=0)
    assert s.flops(w) == sum(per)
    if name == "sequential":
        assert s.flops(w) == 2 * w * w * (L - 1)  # backprop: all vector-matrix


def test_flops_diag_and_mixed():
    d = 6
    L = 20
    rng = np.random.default_rng(0)
    for name in SCANS:
        s = cp.schedule(name, L)
        specs = [("diag", d, d)] * L
        assert s.flops(specs) == s.num_ops * d  # every op is elementwise, d flops
        mixed = [("dense", 1, d)] + [("diag" if rng.random() < 0.5 else "dense", d, d) for _ in range(L - 1)]
        np.testing.assert_allclose(s.flops_per_round(mixed), flops_from_specs(s, mixed), rtol=0)
        rect = [("dense", 1, 4), ("dense", 4, 4), ("dense", 4, 7), ("dense", 7, 2)] + [("dense", 2, 2)] * (L - 4)
        np.testing.assert_allclose(s.flops_per_round(rect), flops_from_specs(s, rect), rtol=0)
    with pytest.raises(ValueError):
        cp.schedule("sklansky", 4).flops([("dense", 2, 2)] * 3)


@pytest.mark.parametrize("P", [1, 2, 3, 8])
@pytest.mark.parametrize("name", SCANS)
def test_brent_bound(name, P):
    L, w = 23, 5
    s = cp.schedule(name, L)
    rounds = replay(s)[0]
    work = depth = 0
    for ii, _, _ in rounds:
        f = [2 * w * w if i == 0 else 2 * w**3 for i in ii.tolist()]
        work += sum(f)
        depth += max(f)
    assert s.brent_bound(P, w) == pytest.approx(work / P + depth, rel=1e-12)
    # more workers never hurt, one worker means W + D
    assert s.brent_bound(P + 1, w) <= s.brent_bound(P, w)
    assert s.brent_bound(1, w) == pytest.approx(s.flops(w) + depth)
    with pytest.raises(ValueError):
        s.brent_bound(0, w)


def test_describe_sequential_flops():
    s = cp.schedule("sklansky", 9)
    info = s.describe(8, workers=2)
    assert info.flops == s.flops(8)
    assert info.sequential_flops == 2 * 8 * 8 * 8  # L-1 thin products
    assert info.brent == pytest.approx(s.brent_bound(2, 8))


def test_schedule_ops_listing():
    s = cp.schedule("sklansky", 4)
    # round 1: [0]x[1] -> [0,1], [2]x[3] -> [2,3]; round 2: [0,1]x[2] -> [0,2], [0,1]x[2,3] -> [0,3]
    assert sorted(s.ops(0)) == [((0, 0), (1, 1), (0, 1)), ((2, 2), (3, 3), (2, 3))]
    assert sorted(s.ops(1)) == [((0, 1), (2, 2), (0, 2)), ((0, 1), (2, 3), (0, 3))]


def test_cached_plan_options_are_not_shared_mutable_state():
    s = cp.schedule("chunked", 23, chunks=3)
    try:
        try:
            s.options["chunks"] = 99
        except TypeError:
            pass  # read-only options are a fine fix
        assert cp.schedule("chunked", 23, chunks=3).options["chunks"] == 3
    finally:
        try:
            s.options["chunks"] = 3  # do not poison the cache for other tests
        except TypeError:
            pass


# -- the one replay: what a schedule means, for validate() and every planner ------------------
BUILDERS = ["sequential", "tree", "independent", "hillis_steele", "sklansky", "brent_kung", "chunked"]


def built(name, L):
    return cp.schedule("chunked", L, chunks=3) if name == "chunked" else cp.schedule(name, L)


@pytest.mark.parametrize("L", [1, 2, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("name", BUILDERS)
def test_replay_yields_exactly_the_ops_of_each_builder(name, L):
    s = built(name, L)
    rp = schedule_replay(s)
    assert rp.round_ptr.tolist() == [0, *np.cumsum(s.widths).tolist()]
    assert rp.widths.tolist() == s.widths and rp.n_ops == s.num_ops
    for q, field in enumerate(("left", "right", "out")):
        want = [int(x) for st_ in s.steps for x in st_[q]]
        assert getattr(rp, field).tolist() == want
    assert rp.op_round.tolist() == [r for r, w in enumerate(s.widths) for _ in range(w)]
    # the intervals, against the independent replay of this file
    rounds, lo, hi = replay(s)
    for name_, got in zip("ikj", (rp.i, rp.k, rp.j)):
        want = [int(x) for r in rounds for x in r["ikj".index(name_)]]
        assert got.tolist() == want
    np.testing.assert_array_equal(rp.lo, lo)
    np.testing.assert_array_equal(rp.hi, hi)
    assert len(s.intervals()) == s.rounds
    for (a, b, c), (x, y, z) in zip(s.intervals(), rounds):
        assert a.tolist() == x.tolist() and b.tolist() == y.tolist() and c.tolist() == z.tolist()
    # cached on the (immutable) schedule, read-only, and not pickled with it
    assert schedule_replay(s) is rp
    assert all(not a.flags.writeable for a in rp)
    again = pickle.loads(pickle.dumps(s))
    assert "_replay" not in again.__dict__
    assert schedule_replay(again).i.tolist() == rp.i.tolist()


def flat_args(L, w=2):
    rows = np.full(L, w)
    rows[0] = 1
    return np.zeros(L, dtype=np.int64), rows, np.full(L, w)


def planner_messages(s):
    """The ScheduleError message of each planner on ``s`` (None where it accepts ``s``)."""
    from chainprod.planning.bind import bind_signature
    from chainprod.planning.flat import bind_flat
    from chainprod.planning.partition import partition

    L = s.length
    runs = {
        "validate": lambda: s.validate(),
        "intervals": lambda: s.intervals(),
        "bind": lambda: bind_signature(s, (("dense", 1, 1, 2), ("dense", L - 1, 2, 2))),
        "flat": lambda: bind_flat(s, *flat_args(L)),
        "partition": lambda: partition(s, 2),
    }
    out = {}
    for who, run in runs.items():
        try:
            run()
            out[who] = None
        except cp.ScheduleError as e:
            out[who] = str(e)
    return out


def corrupt(s, r, field, q, value, outputs=None):
    """A copy of ``s`` with ``steps[r].<field>[q] = value`` (and other ``outputs`` if given)."""
    steps = [Round(*(np.array(a) for a in st_)) for st_ in s.steps]
    getattr(steps[r], field)[q] = value
    n_slots = max(s.n_slots, value + 1)
    return cp.Schedule("bad", s.length, n_slots, steps, s.outputs if outputs is None else outputs)


def broken_schedules():
    sk = cp.schedule("sklansky", 32)  # rounds of 16 ops: walked with numpy
    return {
        # narrow rounds (a handful of ops, walked on lists)
        "empty-narrow": (cp.Schedule("bad", 3, 4, [R([0], [3], [1])], [0, 1, 2]),
                         "schedule 'bad', round 0, op 0: reads right slot 3, which is empty"),
        "apart-narrow": (cp.Schedule("bad", 3, 3, [R([0], [2], [2]), R([0], [1], [1])], [0, 1, 2]),
                         "schedule 'bad', round 0, op 0: left slot 0 holds [0, 0] and right slot 2 holds "
                         "[2, 2]; they are not adjacent"),
        "crossed-narrow": (cp.Schedule("bad", 3, 3, [R([0, 1], [1, 2], [1, 2])], [0, 1, 2]),
                           "schedule 'bad', round 0, op 1: reads slot 1, which another op of the round (op 0) "
                           "writes"),
        "twice-narrow": (cp.Schedule("bad", 3, 4, [R([0, 1], [1, 2], [3, 3])], [0, 1, 3]),
                         "schedule 'bad', round 0, op 0: writes slot 3, and op 1 of the same round writes the "
                         "same slot"),
        "missing-prefix-narrow": (cp.Schedule("bad", 4, 4, cp.schedule("tree", 4).steps, np.arange(4)),
                                  "schedule 'bad': outputs[2] (slot 2) holds [2, 2], expected [0, 2]"),
        "range-narrow": (cp.Schedule("bad", 3, 3, [R([0], [1], [1]), R([1], [7], [2])], [0, 1, 2]),
                         "schedule 'bad', round 1, op 0: right slot 7 is out of range 0..2"),
        # wide rounds (walked with numpy): the same rules, the same messages
        "empty-wide": (corrupt(sk, 0, "right", 5, 32),
                       "schedule 'bad', round 0, op 5: reads right slot 32, which is empty"),
        "apart-wide": (corrupt(sk, 1, "left", 3, 0),
                       "schedule 'bad', round 1, op 3: left slot 0 holds [0, 0] and right slot 7 holds "
                       "[6, 7]; they are not adjacent"),
        "crossed-wide": (corrupt(sk, 0, "out", 0, 2),
                         "schedule 'bad', round 0, op 1: reads slot 2, which another op of the round (op 0) "
                         "writes"),
        "twice-wide": (corrupt(sk, 0, "out", 2, 3),
                       "schedule 'bad', round 0, op 1: writes slot 3, and op 2 of the same round writes the "
                       "same slot"),
        "missing-prefix-wide": (cp.Schedule("bad", 32, 32, cp.schedule("tree", 32).steps, np.arange(32)),
                                "schedule 'bad': outputs[2] (slot 2) holds [2, 2], expected [0, 2]"),
        "range-wide": (corrupt(sk, 2, "left", 9, -4),
                       "schedule 'bad', round 2, op 9: left slot -4 is out of range 0..31"),
    }


@pytest.mark.parametrize("case", list(broken_schedules()))
def test_broken_schedule_same_error_from_validate_and_every_planner(case):
    s, want = broken_schedules()[case]
    got = planner_messages(s)
    assert set(got.values()) == {got["validate"]}, got  # one message, whoever meets the schedule
    assert got["validate"].startswith(want), got["validate"]
    with pytest.raises(ValueError):  # still a ValueError for callers that catch those
        s.validate()


def test_first_broken_rule_in_round_order_wins():
    # round 0 is fine, round 1 reads an empty slot, round 2 has a slot out of range: round 1 is reported
    s = cp.Schedule("bad", 4, 5, [R([0], [1], [1]), R([1], [4], [2]), R([2], [9], [3])], np.arange(4))
    with pytest.raises(cp.ScheduleError, match="round 1, op 0: reads right slot 4"):
        s.validate()
    # in one round, a slot out of range is named before any other broken rule
    s = cp.Schedule("bad", 3, 3, [R([0, 2], [2, 9], [2, 1])], [0, 1, 2])
    with pytest.raises(cp.ScheduleError, match="op 1: right slot 9 is out of range"):
        s.validate()


def test_flat_plan_agrees_with_the_replay():
    from chainprod.planning.flat import bind_flat

    for name in ("sequential", "hillis_steele", "sklansky", "brent_kung", "chunked", "independent"):
        for L in (1, 2, 5, 13, 64):
            s = built(name, L)
            rp = schedule_replay(s)
            kinds, rows, cols = flat_args(L, 3)
            fp = bind_flat(s, kinds, rows, cols, batch=2, parallel_min_flops=0.0)
            used = np.unique(np.concatenate([np.arange(L), rp.out]))
            slot_of = dict(zip(fp.slot_off[used].tolist(), used.tolist()))
            assert len(slot_of) == used.size  # every slot in use has its own place in the buffer
            flat_ops = sorted(zip(fp.op_round.tolist(), *([slot_of[o] for o in a.tolist()]
                                                          for a in (fp.op_left, fp.op_right, fp.op_out)),
                                  fp.op_m.tolist(), fp.op_k.tolist(), fp.op_n.tolist()))
            want = sorted(zip(rp.op_round.tolist(), rp.left.tolist(), rp.right.tolist(), rp.out.tolist(),
                              rows[rp.i].tolist(), cols[rp.k].tolist(), cols[rp.j].tolist()))
            assert flat_ops == want, (name, L)
            assert fp.n_ops == rp.n_ops and int(fp.stage_rounds.sum()) == s.rounds


@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("name", BUILDERS)
def test_partition_agrees_with_the_replay(name, P):
    from chainprod.planning.partition import partition

    for L in (1, 2, 5, 13, 64):
        s = built(name, L)
        rp = schedule_replay(s)
        part = partition(s, P)
        placed = sorted((r, int(a), int(b), int(c), t.worker) for t in part.tasks for r, ls, rs, os_ in t.rounds
                        for a, b, c in zip(ls, rs, os_))
        # every op once, in its round, on the owner of the right end of the interval it makes
        want = sorted(zip(rp.op_round.tolist(), rp.left.tolist(), rp.right.tolist(), rp.out.tolist(),
                          part.owner(rp.j).tolist()))
        assert placed == want, (name, L, P)


def test_bound_plan_agrees_with_the_replay():
    from chainprod.planning.bind import bind_signature

    for name in BUILDERS:
        for L in (2, 13, 64):
            s = built(name, L)
            bp = bind_signature(s, (("dense", 1, 1, 2), ("dense", L - 1, 2, 2)))
            assert [sum(g.size for g in groups) for groups in bp.rounds] == schedule_replay(s).widths.tolist()


def test_not_a_scan_is_the_flat_planners_own_refusal():
    from chainprod.planning.flat import bind_flat

    t = cp.schedule("tree", 8)
    assert t.validate() is t  # a valid schedule ...
    with pytest.raises(ValueError, match="does not produce every prefix") as e:
        bind_flat(t, *flat_args(8))  # ... that the flat plan cannot use
    assert not isinstance(e.value, cp.ScheduleError)


def test_workers_checked_by_the_one_check():
    s = cp.schedule("sklansky", 8)
    with pytest.raises(TypeError, match=r"^workers must be a positive int, got True$"):
        s.brent_bound(True)
    with pytest.raises(ValueError, match=r"^workers must be >= 1, got 0$"):
        s.brent_bound(0)
    from chainprod.schedules import schedule as plain_schedule

    with pytest.raises(ValueError, match="workers must be >= 1"):
        plain_schedule("chunked", 8, workers=0)
