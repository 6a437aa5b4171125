"""TrackBitmap against plain Python: a list of bools and a ``set`` of indices.

Sizes cover the word edges (63, 64, 65), the empty bitmap, one bit, and
sizes past the 8-word blocks the scans unroll over.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fastfc import TrackBitmap
from fastfc._core import combine_or3

SIZES = [0, 1, 63, 64, 65, 129, 1000, 4097]


def random_bools(n: int, seed: int, density: float = 0.5) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < density


def make(bools) -> TrackBitmap:
    """A bitmap set bit by bit (independent of from_bools)."""
    bm = TrackBitmap(len(bools))
    for i, b in enumerate(bools):
        if b:
            bm.set(i)
    return bm


def bits_of(bm: TrackBitmap) -> list[bool]:
    """The bits read back one by one (independent of to_bools)."""
    return [bm.test(i) for i in range(len(bm))]


def ref_next(bools, start: int, value: bool) -> int:
    for i in range(start, len(bools)):
        if bool(bools[i]) == value:
            return i
    return -1


def ref_runs(bools, start: int, stop: int) -> list[tuple[int, int]]:
    runs, i = [], start
    while i < stop:
        if bools[i]:
            j = i
            while j < stop and bools[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    return runs


def sample_points(n: int) -> list[int]:
    """Positions worth probing: both ends, word edges, a few in between."""
    pts = {0, 1, n // 2, n - 1, n, n + 1}
    edges = [64, 128, 512, 576, n - n % 64, n - n % 64 - 64]
    for w in edges:
        pts.update({w - 1, w, w + 1})
    return sorted(p for p in pts if 0 <= p <= n + 1)


def sample_ranges(n: int, seed: int, k: int = 40) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    out = [(0, n), (0, 0), (n, n)]
    pts = [p for p in sample_points(n) if p <= n]
    for a in pts:
        for b in pts:
            if a <= b:
                out.append((a, b))
    for _ in range(k):
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, 2))
        out.append((a, b))
    return out


# ---------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_new_bitmap_is_clear(n):
    bm = TrackBitmap(n)
    assert len(bm) == n == bm.n_bits
    assert bm.n_words == (n + 63) // 64
    assert bm.nbytes == 8 * bm.n_words
    assert bm.count() == 0
    assert not bm.any()
    assert bm.all() == (n == 0)
    assert bits_of(bm) == [False] * n
    assert bm.find_next_set(0) == -1
    assert bm.find_next_clear(0) == (0 if n else -1)
    assert list(bm.runs()) == []


@pytest.mark.parametrize("n", SIZES)
def test_filled_bitmap_is_full_and_pads_with_zeros(n):
    bm = TrackBitmap(n, fill=True)
    assert bm.count() == n
    assert bm.all()
    assert bm.any() == (n > 0)
    assert bits_of(bm) == [True] * n
    assert bm.find_next_clear(0) == -1
    assert list(bm.runs()) == ([(0, n)] if n else [])
    # bits past n_bits in the last word stay clear
    if n % 64:
        assert int(bm.words[-1]) == (1 << (n % 64)) - 1


@pytest.mark.parametrize("bad", [-1, -64])
def test_negative_size_is_refused(bad):
    with pytest.raises(ValueError):
        TrackBitmap(bad)


@pytest.mark.parametrize("bad", [1.5, "8", None])
def test_non_integer_size_is_refused(bad):
    with pytest.raises(TypeError):
        TrackBitmap(bad)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_adopted_words_are_shared_and_padding_cleared(n):
    nw = (n + 63) // 64
    words = np.full(nw, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    bm = TrackBitmap(n, words=words)
    assert bm.count() == n
    if n % 64:
        assert int(words[-1]) == (1 << (n % 64)) - 1
    bm.clear(0)
    assert int(words[0]) & 1 == 0          # shares memory with the array
    words[0] |= np.uint64(1)
    assert bm.test(0)
    assert np.shares_memory(bm.words, words)


def test_adopted_words_errors():
    with pytest.raises(TypeError):
        TrackBitmap(64, words=np.zeros(1, dtype=np.int64))
    with pytest.raises(TypeError):
        TrackBitmap(64, words=[0])
    with pytest.raises(ValueError):
        TrackBitmap(65, words=np.zeros(1, dtype=np.uint64))      # too short
    with pytest.raises(ValueError):
        TrackBitmap(64, words=np.zeros((1, 1), dtype=np.uint64))  # not 1-D
    with pytest.raises(ValueError):
        TrackBitmap(64, words=np.zeros(4, dtype=np.uint64)[::2])  # not contiguous
    ro = np.zeros(2, dtype=np.uint64)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        TrackBitmap(64, words=ro)


def test_adopting_no_words_for_no_bits():
    bm = TrackBitmap(0, words=np.zeros(0, dtype=np.uint64))
    assert len(bm) == 0 and bm.count() == 0 and bm == TrackBitmap(0)


# ---------------------------------------------------------------------------
# single bits
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_set_clear_test_each_probe(n):
    bm = TrackBitmap(n)
    ref = [False] * n
    for i in sample_points(n):
        if i >= n:
            continue
        bm.set(i)
        ref[i] = True
        assert bm.test(i) and bm[i]
        assert bits_of(bm) == ref
        assert bm.count() == sum(ref)
    for i in sample_points(n)[::2]:
        if i >= n:
            continue
        bm.clear(i)
        ref[i] = False
        assert not bm.test(i) and not bm[i]
    assert bits_of(bm) == ref
    assert bm.count() == sum(ref)
    # idempotent
    before = bm.words.copy()
    for i, b in enumerate(ref):
        if b:
            bm.set(i)
        else:
            bm.clear(i)
    assert np.array_equal(bm.words, before)


@pytest.mark.parametrize("n", SIZES)
def test_single_bit_out_of_range(n):
    bm = make(random_bools(n, 1))
    before = bm.words.copy()
    for i in (-1, n, n + 64, -(n + 1)):
        for op in (bm.set, bm.clear, bm.test, bm.__getitem__):
            with pytest.raises(IndexError):
                op(i)
    assert np.array_equal(bm.words, before)


def test_single_bit_wrong_type():
    bm = TrackBitmap(10)
    for op in (bm.set, bm.clear, bm.test):
        with pytest.raises(TypeError):
            op(1.5)
        with pytest.raises(TypeError):
            op("3")
    assert bm.count() == 0


# ---------------------------------------------------------------------------
# ranges, counts and scans
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_set_range_and_clear_range(n):
    # from_bools/to_bools are checked bit by bit in their own test
    for k, (a, b) in enumerate(sample_ranges(n, seed=n)):
        base = random_bools(n, k)
        bm = TrackBitmap.from_bools(base)
        bm.set_range(a, b)
        ref = base.copy()
        ref[a:b] = True
        assert np.array_equal(bm.to_bools(), ref), (a, b)
        assert bm.count() == int(ref.sum())
        bm = TrackBitmap.from_bools(base)
        bm.clear_range(a, b)
        ref = base.copy()
        ref[a:b] = False
        assert np.array_equal(bm.to_bools(), ref), (a, b)
        assert bm.count() == int(ref.sum())


@pytest.mark.parametrize("n", SIZES)
def test_count_range_and_any_range(n):
    for seed, density in ((1, 0.5), (2, 0.02), (3, 0.98)):
        bools = random_bools(n, seed, density)
        bm = make(bools)
        for a, b in sample_ranges(n, seed=seed):
            assert bm.count_range(a, b) == int(bools[a:b].sum()), (a, b)
            assert bm.any_range(a, b) == bool(bools[a:b].any()), (a, b)


@pytest.mark.parametrize("n", SIZES)
def test_bad_ranges_raise_index_error_and_change_nothing(n):
    bm = make(random_bools(n, 5))
    before = bm.words.copy()
    bad = [(-1, n), (0, n + 1), (n, n + 1), (-1, 0)]
    if n >= 2:
        bad.append((n - 1, n - 2))
    if n >= 1:
        bad.append((1, 0))
    for a, b in bad:
        for op in (bm.set_range, bm.clear_range, bm.count_range, bm.any_range):
            with pytest.raises(IndexError):
                op(a, b)
        with pytest.raises(IndexError):
            list(bm.runs(a, b))
    assert np.array_equal(bm.words, before)


@pytest.mark.parametrize("n", SIZES)
def test_count_any_all(n):
    for seed, density in ((1, 0.5), (2, 0.0), (3, 1.0), (4, 0.01)):
        bools = random_bools(n, seed, density)
        bm = make(bools)
        assert bm.count() == int(bools.sum())
        assert bm.any() == bool(bools.any())
        assert bm.all() == bool(bools.all())


@pytest.mark.parametrize("n", SIZES)
def test_find_next_set_and_clear(n):
    for seed, density in ((1, 0.5), (2, 0.01), (3, 0.99), (4, 0.0), (5, 1.0)):
        bools = random_bools(n, seed, density)
        bm = make(bools)
        starts = sample_points(n) + [n + 100]
        if n <= 200:
            starts = list(range(n + 2))
        for s in starts:
            assert bm.find_next_set(s) == ref_next(bools, s, True), s
            assert bm.find_next_clear(s) == ref_next(bools, s, False), s
        assert bm.find_next_set() == ref_next(bools, 0, True)
        assert bm.find_next_clear() == ref_next(bools, 0, False)


def test_find_next_far_set_bit_after_empty_blocks():
    # one bit far past several all-zero 8-word blocks, and its mirror image
    n = 64 * 40 + 7
    for i in (0, 63, 64, 511, 512, 575, 576, 64 * 17 + 3, n - 1):
        bm = TrackBitmap(n)
        bm.set(i)
        assert bm.find_next_set(0) == i
        assert bm.find_next_set(i) == i
        assert bm.find_next_set(i + 1) == -1
        full = TrackBitmap(n, fill=True)
        full.clear(i)
        assert full.find_next_clear(0) == i
        assert full.find_next_clear(i + 1) == -1


@pytest.mark.parametrize("n", SIZES)
def test_find_negative_start_raises(n):
    bm = TrackBitmap(n)
    with pytest.raises(IndexError):
        bm.find_next_set(-1)
    with pytest.raises(IndexError):
        bm.find_next_clear(-1)


@pytest.mark.parametrize("n", SIZES)
def test_runs(n):
    for seed, density in ((1, 0.5), (2, 0.1), (3, 0.9), (4, 1.0)):
        bools = random_bools(n, seed, density)
        bm = make(bools)
        assert list(bm.runs()) == ref_runs(bools, 0, n)
        for a, b in sample_ranges(n, seed=seed, k=15):
            assert list(bm.runs(a, b)) == ref_runs(bools, a, b), (a, b)
            assert list(bm.runs(a)) == ref_runs(bools, a, n)


@pytest.mark.parametrize("n", SIZES)
def test_fill(n):
    bm = make(random_bools(n, 9))
    bm.fill()
    assert bm.count() == n and bm.all()
    bm.fill(False)
    assert bm.count() == 0 and not bm.any()
    bm.fill(True)
    assert bits_of(bm) == [True] * n


# ---------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_from_bools_and_to_bools(n):
    bools = random_bools(n, 11)
    bm = TrackBitmap.from_bools(bools)
    assert len(bm) == n
    assert bits_of(bm) == list(bools)
    out = bm.to_bools()
    assert out.dtype == bool and out.shape == (n,)
    assert np.array_equal(out, bools)
    assert np.array_equal(bm.set_indices(), np.flatnonzero(bools))
    # from a list of ints, too
    assert TrackBitmap.from_bools([int(b) for b in bools]) == bm
    # the result owns its bits: changing the source array changes nothing
    if n:
        bools[0] = not bools[0]
        assert bm.test(0) != bools[0]


def test_from_bools_not_1d():
    with pytest.raises(ValueError):
        TrackBitmap.from_bools(np.zeros((2, 3), dtype=bool))


@pytest.mark.parametrize("n", SIZES)
def test_words_view_and_copy(n):
    bm = make(random_bools(n, 3))
    assert bm.words.dtype == np.uint64 and bm.words.shape == (bm.n_words,)
    c = bm.copy()
    assert c == bm and c is not bm
    if n:
        c.set(0)
        c.clear(n - 1)
        bm.set(n - 1)
        assert c.test(n - 1) is False and bm.test(n - 1) is True


@pytest.mark.parametrize("n", SIZES)
def test_pickle_round_trip(n):
    bm = make(random_bools(n, 21))
    back = pickle.loads(pickle.dumps(bm))
    assert back == bm
    assert bits_of(back) == bits_of(bm)
    if n:
        back.set(0)
        back.clear(n - 1)
        assert bits_of(bm) == list(random_bools(n, 21))   # independent copy


def test_repr_shows_size_and_count():
    bm = make([True, False, True])
    assert "3" in repr(bm) and "2" in repr(bm)


# ---------------------------------------------------------------------------
# algebra
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", SIZES)
def test_binary_operators_make_new_bitmaps(n):
    a_b, b_b = random_bools(n, 1), random_bools(n, 2)
    a, b = make(a_b), make(b_b)
    a_words, b_words = a.words.copy(), b.words.copy()
    for result, expect in ((a | b, a_b | b_b), (a & b, a_b & b_b), (a - b, a_b & ~b_b)):
        assert isinstance(result, TrackBitmap)
        assert result is not a and result is not b
        assert bits_of(result) == list(expect)
    assert np.array_equal(a.words, a_words) and np.array_equal(b.words, b_words)


@pytest.mark.parametrize("n", SIZES)
def test_in_place_algebra(n):
    a_b, b_b = random_bools(n, 3), random_bools(n, 4)
    b = make(b_b)
    for method, expect in (("or_", a_b | b_b), ("and_", a_b & b_b),
                           ("andnot", a_b & ~b_b), ("copy_from", b_b)):
        a = make(a_b)
        assert getattr(a, method)(b) is a
        assert bits_of(a) == list(expect), method
        assert bits_of(b) == list(b_b)


@pytest.mark.parametrize("n", [1, 64, 65])
def test_algebra_errors_change_nothing(n):
    a = make(random_bools(n, 5))
    before = a.words.copy()
    other = TrackBitmap(n + 1, fill=True)
    for method in ("or_", "and_", "andnot", "copy_from"):
        with pytest.raises(ValueError):
            getattr(a, method)(other)
        with pytest.raises(TypeError):
            getattr(a, method)(None)
        with pytest.raises(TypeError):
            getattr(a, method)(np.ones(n, dtype=bool))
    for op in ("__or__", "__and__", "__sub__"):
        with pytest.raises(ValueError):
            getattr(a, op)(other)
    with pytest.raises(TypeError):
        a | 3
    with pytest.raises(TypeError):
        a & None
    with pytest.raises(TypeError):
        a - [True] * n
    assert np.array_equal(a.words, before)


@pytest.mark.parametrize("n", SIZES)
def test_equality(n):
    bools = random_bools(n, 8)
    a, b = make(bools), TrackBitmap.from_bools(bools)
    assert a == b and not (a != b)
    assert a != TrackBitmap(n + 1)
    assert TrackBitmap(n) != TrackBitmap(n + 1)
    assert a != "not a bitmap" and not (a == 0)
    if n:
        b.clear(n - 1) if bools[n - 1] else b.set(n - 1)
        assert a != b
    with pytest.raises(TypeError):
        hash(a)


# ---------------------------------------------------------------------------
# Hypothesis: single operations against a reference list
# ---------------------------------------------------------------------------

@given(st.lists(st.booleans(), max_size=300), st.data())
def test_any_bitmap_scans_like_a_list(bools, data):
    n = len(bools)
    bm = TrackBitmap.from_bools(bools)
    assert bits_of(bm) == bools
    start = data.draw(st.integers(0, n + 2), label="start")
    assert bm.find_next_set(start) == ref_next(bools, start, True)
    assert bm.find_next_clear(start) == ref_next(bools, start, False)
    a = data.draw(st.integers(0, n), label="a")
    b = data.draw(st.integers(a, n), label="b")
    assert list(bm.runs(a, b)) == ref_runs(bools, a, b)
    assert bm.count_range(a, b) == sum(bools[a:b])
    assert bm.any_range(a, b) == any(bools[a:b])


# ---------------------------------------------------------------------------
# Hypothesis: a state machine against a Python set (as pyroaring does)
# ---------------------------------------------------------------------------

class BitmapMachine(RuleBasedStateMachine):
    """A TrackBitmap and a ``set`` of indices take the same operations.
    From 4,096 bits a bitmap keeps a summary (a bit per word): clearing bits
    leaves it stale, which scans must see through."""

    @initialize(n=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 300, 700,
                                   4095, 4096, 4097, 64 * 64 * 3 + 5]))
    def start(self, n):
        self.n = n
        self.bm = TrackBitmap(n)
        self.ref: set[int] = set()

    @rule(data=st.data())
    def set_bit(self, data):
        i = data.draw(st.integers(0, self.n - 1))
        self.bm.set(i)
        self.ref.add(i)

    @rule(data=st.data())
    def clear_bit(self, data):
        i = data.draw(st.integers(0, self.n - 1))
        self.bm.clear(i)
        self.ref.discard(i)

    @rule(data=st.data(), value=st.booleans())
    def range_op(self, data, value):
        a = data.draw(st.integers(0, self.n))
        b = data.draw(st.integers(a, self.n))
        if value:
            self.bm.set_range(a, b)
            self.ref |= set(range(a, b))
        else:
            self.bm.clear_range(a, b)
            self.ref -= set(range(a, b))

    @rule(value=st.booleans())
    def fill(self, value):
        self.bm.fill(value)
        self.ref = set(range(self.n)) if value else set()

    @rule(data=st.data(), op=st.sampled_from(["or_", "and_", "andnot", "copy_from",
                                              "|", "&", "-"]))
    def combine(self, data, op):
        other_set = data.draw(st.sets(st.integers(0, self.n - 1), max_size=min(self.n, 80)))
        a = data.draw(st.integers(0, self.n))
        b = data.draw(st.integers(a, min(self.n, a + data.draw(st.sampled_from([0, 70, 5000])))))
        other = TrackBitmap(self.n)
        for i in other_set:
            other.set(i)
        other.set_range(a, b)
        other_set |= set(range(a, b))
        if op in ("|", "&", "-"):
            result = {"|": self.bm.__or__, "&": self.bm.__and__, "-": self.bm.__sub__}[op](other)
            expect = {"|": self.ref | other_set, "&": self.ref & other_set,
                      "-": self.ref - other_set}[op]
            assert set(np.flatnonzero(result.to_bools()).tolist()) == expect
            return  # operands unchanged; the invariants check self.bm
        getattr(self.bm, op)(other)
        self.ref = {"or_": self.ref | other_set, "and_": self.ref & other_set,
                    "andnot": self.ref - other_set, "copy_from": set(other_set)}[op]
        assert set(np.flatnonzero(other.to_bools()).tolist()) == other_set

    @rule(data=st.data())
    def combine_three(self, data):
        sets = [data.draw(st.sets(st.integers(0, self.n - 1), max_size=min(self.n, 40)))
                for _ in range(2)]
        b, c = TrackBitmap(self.n), TrackBitmap(self.n)
        for bm, bits in zip((b, c), sets):
            for i in bits:
                bm.set(i)
        out = combine_or3(self.bm, b, c)
        expect = self.ref | sets[0] | sets[1]
        assert set(out.set_indices().tolist()) == expect
        assert out.find_next_set(0) == (min(expect) if expect else -1)
        assert list(out.runs()) == ref_runs([i in expect for i in range(self.n)], 0, self.n)

    @rule(data=st.data())
    def test_bit(self, data):
        i = data.draw(st.integers(0, self.n - 1))
        assert self.bm.test(i) == (i in self.ref)

    @rule(data=st.data())
    def scan(self, data):
        s = data.draw(st.integers(0, self.n + 1))
        nxt = [i for i in self.ref if i >= s]
        assert self.bm.find_next_set(s) == (min(nxt) if nxt else -1)
        free = [i for i in range(s, self.n) if i not in self.ref]
        assert self.bm.find_next_clear(s) == (free[0] if free else -1)

    @rule(data=st.data())
    def ranged_queries(self, data):
        a = data.draw(st.integers(0, self.n))
        b = data.draw(st.integers(a, self.n))
        inside = {i for i in self.ref if a <= i < b}
        assert self.bm.count_range(a, b) == len(inside)
        assert self.bm.any_range(a, b) == bool(inside)
        bools = [i in self.ref for i in range(self.n)]
        assert list(self.bm.runs(a, b)) == ref_runs(bools, a, b)

    @rule()
    def round_trip(self):
        assert pickle.loads(pickle.dumps(self.bm)) == self.bm
        assert TrackBitmap.from_bools(self.bm.to_bools()) == self.bm
        assert self.bm.copy() == self.bm

    @invariant()
    def same_bits(self):
        assert self.bm.count() == len(self.ref)
        assert set(self.bm.set_indices().tolist()) == self.ref
        assert self.bm.any() == bool(self.ref)
        assert self.bm.all() == (len(self.ref) == self.n)
        # padding past n_bits stays clear
        if self.n % 64:
            assert int(self.bm.words[-1]) >> (self.n % 64) == 0


TestBitmapMachine = BitmapMachine.TestCase
# shorter runs than the profile's: a bitmap's states are shallow
TestBitmapMachine.settings = settings(
    settings.default, stateful_step_count=min(40, settings.default.stateful_step_count),
    max_examples=min(300, settings.default.max_examples))


# ---------------------------------------------------------------------------
# long bitmaps and unaligned storage (the vector kernels' prologues, blocks
# and tails)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("skew", range(8))
@pytest.mark.parametrize("n", [64 * 32 - 1, 64 * 32 * 3 + 5, 64 * 200 + 33])
def test_count_and_scans_on_long_unaligned_bitmaps(n, skew):
    nw = (n + 63) // 64
    buf = np.zeros(nw + 8, dtype=np.uint64)
    bm = TrackBitmap(n, words=buf[skew:skew + nw])     # 8-byte steps off alignment
    assert bm.count() == 0 and bm.find_next_set(0) == -1
    rng = np.random.default_rng(n + skew)
    probes = sorted(p for p in {0, n - 1, 63, 64, 511, 512, 2047, 2048, 2049, n // 2,
                                *rng.integers(0, n, 6).tolist()} if p < n)
    for i in probes:                                  # one bit alone, far from others
        bm.set(i)
        assert bm.count() == 1
        assert bm.find_next_set(0) == i
        assert bm.find_next_set(i) == i and bm.find_next_set(i + 1) == -1
        assert bm.any() and bm.count_range(0, n) == 1
        assert list(bm.runs()) == [(i, i + 1)]
        bm.clear(i)
    bools = rng.random(n) < 0.01
    for i in np.flatnonzero(bools):
        bm.set(int(i))
    assert bm.count() == int(bools.sum())
    for s in probes:
        assert bm.find_next_set(s) == ref_next(bools, s, True)
    bm.fill(True)
    assert bm.count() == n and bm.all()
    bm.clear(probes[-1])
    assert bm.find_next_clear(0) == probes[-1] and bm.count() == n - 1
    # the words around the view were never touched
    assert not buf[:skew].any() and not buf[skew + nw:].any()
