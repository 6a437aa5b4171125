"""Global Mirror sessions: consistency groups, every injected fault, stats,
the continuous loop and recovery.

Each test builds a small session (16 tracks of 512 B per volume) whose
``on_coordinate`` callback records the A images at every coordination
instant. :func:`check_promise` then asserts the promise after an attempt:
every C volume (read through its I/O path, which answers virtual tracks
from B) holds the A image of the newest committed CG, and all C carry that
CG's sequence number. Faults are armed per volume and fire deterministically;
only the loop tests run writer threads.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fastfc import (GlobalMirror, GMState, LimitError, Link, LocalLink, PPRCPair,
                    FlashCopy, InjectedFault, StateError, Volume, WriteInhibitedError,
                    faults)
from fastfc.copyservices.globalmirror import MAX_DRAIN_FAILURES, RETRIES, Cause
from helpers import image, rand

TS = 512
N = 16


class Session:
    """A, B, C volumes, a GlobalMirror over them, and the A images recorded
    at each coordination instant (``snaps[0]``: the C images before any CG)."""

    def __init__(self, n_triplets: int = 3, n_tracks: int = N, track_size: int = TS,
                 *, link: Link | None = None, keep: int | None = None, **options):
        def vols(tag):
            return [Volume(n_tracks, track_size, name=f"{tag}{i}") for i in range(n_triplets)]
        self.A, self.B, self.C = vols("A"), vols("B"), vols("C")
        for i, a in enumerate(self.A):
            a._raw_array()[:] = rand(a.capacity, 100 + i)
        self.keep = keep
        self.snaps = {0: [image(c) for c in self.C]}
        self.link = link if link is not None else LocalLink()
        # generous time limits unless a test is about them: a loaded machine
        # must not turn a test's committed CG into a timeout
        options.setdefault("max_coordination_time", 0.5)
        self.gm = GlobalMirror(list(zip(self.A, self.B, self.C)), link=self.link,
                               on_coordinate=self._record, **options)

    def _record(self, seq: int) -> None:
        # host writes to every A are held: this is the coordination instant
        self.snaps[seq] = [a.read(0, a.capacity) for a in self.A]
        if self.keep is not None:             # bound memory in the loop tests
            newest = self.gm.stats.sequence
            for k in [k for k in self.snaps if k < newest]:
                del self.snaps[k]

    def cg(self):
        return self.gm.form_consistency_group()

    def write(self, i: int, track: int, seed: int, offset: int = 0, length: int = TS) -> None:
        self.A[i].write(track * TS + offset, rand(length, seed))

    def c_images(self):
        return [image(c) for c in self.C]


def check_promise(s: Session) -> int:
    """Assert the promise; return the sequence of the CG the C volumes hold."""
    gm = s.gm
    assert all(not t.fc.revertible for t in gm.triplets)
    assert all(not b.write_inhibited for b in s.B)
    seqs = set(gm.c_sequences)
    assert len(seqs) == 1, gm.c_sequences
    seq = seqs.pop()
    assert seq == gm.stats.sequence
    for c, want in zip(s.C, s.snaps[seq]):
        assert np.array_equal(image(c), want), f"{c.name} is not CG {seq}"
    return seq


def new_log_entries(mark: int) -> list[tuple[str, str]]:
    return faults.fired_log()[mark:]


# ---------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------

def _free(*vols) -> bool:
    return all(v._mirror is None and not v._secondary and v.relationships == []
               for v in vols)


@pytest.mark.parametrize("kw, exc", [
    (dict(decide="sometimes"), ValueError),
    (dict(cg_interval=-1.0), ValueError),
    (dict(max_drain_time=-0.5), ValueError),
    (dict(max_coordination_time=0), ValueError),
    (dict(max_coordination_time=-0.01), ValueError),
])
def test_constructor_refuses_bad_options(kw, exc):
    a, b, c = (Volume(N, TS) for _ in range(3))
    with pytest.raises(exc):
        GlobalMirror([(a, b, c)], **kw)
    assert _free(a, b, c)


def test_constructor_refuses_bad_triplets():
    a, b, c, d = (Volume(N, TS, name=n) for n in "abcd")
    with pytest.raises(ValueError):
        GlobalMirror([])
    with pytest.raises(TypeError):
        GlobalMirror([(a, b, "c")])
    with pytest.raises(ValueError):
        GlobalMirror([(a, b, a)])                         # a volume twice in a triplet
    with pytest.raises(ValueError):
        GlobalMirror([(a, b, c), (d, b, Volume(N, TS))])  # ... or across triplets
    assert _free(a, b, c, d)


def test_constructor_failure_undoes_the_earlier_triplets():
    s_vols = [Volume(N, TS, name=f"{t}{i}") for i in range(2) for t in "ABC"]
    a1, b1, c1, a2, b2, c2 = s_vols
    c1._raw_array()[:] = rand(c1.capacity, 5)
    x = Volume(N, TS, name="X")
    FlashCopy(x, c2, background_copy=False)               # c2 is taken
    with pytest.raises(LimitError):
        GlobalMirror([(a1, b1, c1), (a2, b2, c2)])
    assert _free(a1, b1, c1, a2, b2)
    assert np.array_equal(image(c1), rand(c1.capacity, 5))  # C1 left as it was
    b1.write(0, b"free")
    c1.write(0, b"free")
    # the volumes can form a session now
    GlobalMirror([(a1, b1, c1)])


def test_a_volume_in_a_pprc_pair_cannot_join_a_session():
    a, b, c, x = (Volume(N, TS) for _ in range(4))
    PPRCPair(a, x, background=False)
    with pytest.raises(LimitError):
        GlobalMirror([(a, b, c)])
    assert _free(b, c)


# ---------------------------------------------------------------------------
# One consistency group
# ---------------------------------------------------------------------------

def test_consistency_groups_commit_the_coordination_images():
    s = Session()
    gm = s.gm
    assert gm.state is GMState.IDLE and gm.c_sequences == [0, 0, 0]
    res = s.cg()
    assert res.committed and res and res.cause is None
    assert res.sequence == 1 and gm.c_sequences == [1, 1, 1]
    assert res.bytes_drained == 3 * N * TS                # the initial copy
    assert check_promise(s) == 1
    assert all(np.array_equal(image(b), a) for b, a in zip(s.B, s.snaps[1]))
    # C is NOCOPY: most of its image is read from B
    assert all(t.fc.tracks_to_copy > 0 for t in gm.triplets)
    # writes after the CG reach neither B nor C until the next CG
    s.write(0, 3, 1)
    s.write(2, 7, 2, offset=100, length=TS)               # tracks 7 and 8
    check_promise(s)
    assert np.array_equal(image(s.B[0]), s.snaps[1][0])
    res = s.cg()
    assert res.committed and res.sequence == 2
    assert res.bytes_drained == 3 * TS
    assert check_promise(s) == 2
    assert not np.array_equal(s.snaps[1][0], s.snaps[2][0])
    # B and C refuse host writes
    for v in (s.B[1], s.C[1]):
        with pytest.raises(WriteInhibitedError):
            v.write(0, b"no")
    check_promise(s)


def test_c_keeps_its_cg_while_b_moves_on():
    s = Session(n_triplets=1)
    s.cg()
    for t in range(N):
        s.write(0, t, 50 + t)
    # a failed attempt drains everything to B (B moves on), C must not
    faults.inject("prepare", volume=s.B[0])
    assert not s.cg().committed
    assert np.array_equal(image(s.B[0]), s.snaps[2][0])
    assert check_promise(s) == 1


@pytest.mark.parametrize("step", ["resync", "resync_revertible", "reverse_restore", "commit",
                                  "revert"])
def test_a_user_step_on_a_session_flashcopy_is_refused(step):
    s = Session(n_triplets=2)
    s.cg()
    s.write(0, 3, 7)
    s.cg()
    s.write(1, 5, 8)              # B moves on at the next drain; C stays on CG 2
    fc = s.gm.triplets[0].fc
    calls = {"resync": lambda: fc.resync(), "resync_revertible":
             lambda: fc.resync(revertible=True), "reverse_restore": fc.reverse_restore,
             "commit": fc.commit, "revert": fc.revert}
    before = (fc.sequence, fc.revertible, image(s.B[0]), image(s.C[0]))
    with pytest.raises(StateError, match="session .*rmgmir"):
        calls[step]()
    after = (fc.sequence, fc.revertible, image(s.B[0]), image(s.C[0]))
    assert before[:2] == after[:2] and all(np.array_equal(x, y)
                                           for x, y in zip(before[2:], after[2:]))
    assert check_promise(s) == 2
    assert s.cg().committed and check_promise(s) == 3       # the session's own steps work


# ---------------------------------------------------------------------------
# Prepare failures (claims 7 and 8)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("decide", ["after_all", "after_each"])
@pytest.mark.parametrize("bad", [0, 1, 2])
def test_prepare_failure_reverts_all(decide, bad):
    s = Session(decide=decide)
    assert s.cg().committed
    for i in range(3):
        s.write(i, 2 + i, 10 + i)
    # B[bad]'s prepare fails; harmless probes (delay=0) record which of
    # the other prepares were tried
    faults.inject("prepare", volume=s.B[bad])
    for i in range(3):
        if i != bad:
            faults.inject("prepare", volume=s.B[i], delay=0)
    mark = len(faults.fired_log())
    res = s.cg()
    assert not res.committed
    assert res.cause is Cause.PREPARE_FAILED
    assert s.B[bad].name in res.detail
    tried = [name for point, name in new_log_entries(mark) if point == "prepare"]
    if decide == "after_all":
        assert tried == ["B0", "B1", "B2"]
    else:                                                 # stops at the failure
        assert tried == [f"B{i}" for i in range(bad + 1)]
    assert check_promise(s) == 1
    assert s.gm.state is GMState.IDLE
    faults.clear()
    res = s.cg()
    assert res.committed and res.sequence == 3
    assert check_promise(s) == 3
    # the CG that failed was drained once; the next one sent nothing again
    assert res.bytes_drained == 0
    assert np.array_equal(s.snaps[2][0], s.snaps[3][0])


# ---------------------------------------------------------------------------
# Failures inside commit and revert
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 2])
def test_commit_failure_resolves_by_commit_and_goes_fatal(bad):
    s = Session()
    gm = s.gm
    assert s.cg().committed
    s.write(1, 4, 1)
    s.write(bad, 9, 2)
    faults.inject("commit", volume=s.B[bad])
    res = s.cg()
    assert res.cause is Cause.COMMIT_FAILED
    assert res.committed                                  # the rule committed the rest
    assert gm.state is GMState.FATAL
    assert "resolved by commit" in gm.fatal_reason and s.B[bad].name in gm.fatal_reason
    # a committed CG: counted once, as a success, its commit failure apart
    assert gm.stats.successes == 2 and gm.stats.commit_failures_resolved == 1
    assert "commit_failed" not in gm.stats.failures and gm.stats.attempts == 2
    assert gm.stats.as_dict()["commit_failures_resolved"] == 1
    assert check_promise(s) == 2
    # no CG forms over a fatal session, and nothing changes
    s.write(0, 0, 3)
    res = s.cg()
    assert not res.committed and res.cause is Cause.FATAL
    assert check_promise(s) == 2
    assert gm.clear_fatal() == "idle"
    assert gm.state is GMState.IDLE and gm.fatal_reason is None
    res = s.cg()
    assert res.committed and res.sequence == 3
    assert check_promise(s) == 3


def test_commit_failure_of_the_only_relationship_resolves_by_revert():
    # every relationship still revertible with the new sequence: revert all
    s = Session(n_triplets=1)
    assert s.cg().committed
    s.write(0, 1, 1)
    faults.inject("commit", volume=s.B[0])
    res = s.cg()
    assert res.cause is Cause.COMMIT_FAILED and not res.committed
    assert "resolved by revert" in s.gm.fatal_reason
    assert check_promise(s) == 1
    assert s.gm.clear_fatal() == "idle"
    assert s.cg().committed
    assert check_promise(s) == 3


def test_commit_that_keeps_failing_leaves_the_session_fatal_until_it_resolves():
    s = Session()
    gm = s.gm
    assert s.cg().committed
    s.write(2, 5, 1)
    # the commit and every retry fail, then every retry of one clear_fatal
    faults.inject("commit", volume=s.B[1], times=1 + 2 * RETRIES)
    res = s.cg()
    assert res.cause is Cause.COMMIT_FAILED and gm.state is GMState.FATAL
    assert gm.triplets[1].fc.revertible and s.B[1].write_inhibited
    assert gm.clear_fatal() == "fatal"                    # the retry failed again
    assert gm.clear_fatal() == "idle"                     # now it commits
    assert check_promise(s) == 2


def test_revert_failure_during_a_prepare_failure_resolves_by_revert():
    s = Session()
    gm = s.gm
    assert s.cg().committed
    for i in range(3):
        s.write(i, 6, 20 + i)
    faults.inject("prepare", volume=s.B[2])
    faults.inject("revert", volume=s.B[0])
    res = s.cg()
    assert not res.committed
    assert res.cause is Cause.REVERT_FAILED
    assert gm.state is GMState.FATAL
    assert "resolved by revert" in gm.fatal_reason
    assert check_promise(s) == 1
    assert s.cg().cause is Cause.FATAL
    assert gm.clear_fatal() == "idle"
    res = s.cg()
    assert res.committed
    assert check_promise(s) == res.sequence


# ---------------------------------------------------------------------------
# Coordination and drain time limits
# ---------------------------------------------------------------------------

def test_coordination_stall_fails_the_attempt_and_writes_resume():
    s = Session(max_coordination_time=0.05)
    assert s.cg().committed
    s.write(0, 2, 1)
    faults.inject("coordinate", delay=0.2)
    mark = len(faults.fired_log())
    done = threading.Event()
    errors = []

    def writer():
        try:
            while not new_log_entries(mark):              # the stall has begun
                time.sleep(0.001)
            s.write(1, 11, 2)                             # held, then let through
            done.set()
        except BaseException as e:                        # pragma: no cover
            errors.append(e)

    th = threading.Thread(target=writer)
    th.start()
    res = s.cg()
    th.join(10)
    assert not errors and done.is_set()
    assert res.cause is Cause.COORDINATION_TIMEOUT and not res.committed
    assert res.coordination_time > 0.05
    assert res.sequence not in s.snaps                    # on_coordinate not called
    assert check_promise(s) == 1
    assert all(t.pair.cg is None for t in s.gm.triplets)
    # nothing was lost: the next CG carries both writes
    res = s.cg()
    assert res.committed and res.bytes_drained == 2 * TS
    assert check_promise(s) == res.sequence


def test_drain_stall_fails_the_attempt_after_the_first_cg():
    s = Session(max_drain_time=0.1)
    # the first CG ignores the limit
    faults.inject("drain", volume=s.A[0], delay=0.2)
    res = s.cg()
    assert res.committed and res.drain_time >= 0.2
    for i in range(3):
        s.write(i, 1, 30 + i)
        s.write(i, 12, 40 + i)
    faults.inject("drain", volume=s.A[1], delay=0.2)
    res = s.cg()
    assert res.cause is Cause.DRAIN_TIMEOUT and not res.committed
    assert check_promise(s) == 1
    # the A[0] pair was drained before the stall; its B moved on, C did not
    assert np.array_equal(image(s.B[0]), s.snaps[2][0])
    for t in s.gm.triplets:
        assert t.pair.cg is None and not t.pair.side
    assert s.gm.triplets[1].pair.oos.set_indices().tolist() == [1, 12]
    res = s.cg()
    assert res.committed
    assert check_promise(s) == res.sequence


def test_drain_limit_is_set_aside_after_consecutive_drain_timeouts():
    s = Session(n_triplets=2, max_drain_time=0.1)
    assert s.cg().committed
    faults.inject("drain", volume=s.A[1], delay=0.15, times=MAX_DRAIN_FAILURES + 2)
    for k in range(MAX_DRAIN_FAILURES):
        s.write(k % 2, k, k)
        res = s.cg()
        assert res.cause is Cause.DRAIN_TIMEOUT, k
        assert check_promise(s) == 1
    s.write(1, 9, 99)
    res = s.cg()                                          # the limit is set aside once
    assert res.committed and res.drain_time >= 0.15
    assert check_promise(s) == res.sequence
    s.write(0, 15, 98)
    res = s.cg()                                          # and applies again
    assert res.cause is Cause.DRAIN_TIMEOUT
    assert s.gm.stats.failures["drain_timeout"] == MAX_DRAIN_FAILURES + 1
    check_promise(s)


def test_max_drain_time_zero_means_minutes():
    s = Session(n_triplets=1, max_drain_time=0)
    assert s.cg().committed
    faults.inject("drain", volume=s.A[0], delay=0.1)
    s.write(0, 0, 1)
    assert s.cg().committed
    check_promise(s)


def test_drain_error_fails_the_attempt():
    s = Session()
    assert s.cg().committed
    s.write(2, 3, 1)
    faults.inject("drain", volume=s.A[2])                 # no delay: the drain raises
    res = s.cg()
    assert res.cause is Cause.DRAIN_ERROR and "InjectedFault" in res.detail
    assert check_promise(s) == 1
    res = s.cg()
    assert res.committed and res.bytes_drained == TS
    check_promise(s)


# ---------------------------------------------------------------------------
# Link failure mid-drain
# ---------------------------------------------------------------------------

def test_link_failure_mid_drain():
    s = Session()
    assert s.cg().committed
    for i in range(3):
        for t in (1, 5, 9):                               # three sends per pair
            s.write(i, t, 10 * i + t)
    sent = s.link.sends
    faults.inject("link", after=4)
    res = s.cg()
    assert res.cause is Cause.LINK_DOWN and not res.committed
    assert "LinkDownError" in res.detail
    assert not s.link.up and s.link.sends == sent + 4
    assert check_promise(s) == 1
    # B0 got its CG whole, B1 a part of it, B2 nothing
    assert np.array_equal(image(s.B[0]), s.snaps[2][0])
    assert not np.array_equal(image(s.B[1]), s.snaps[2][1])
    # still down: the next attempt fails the same way
    s.write(0, 14, 7)
    assert s.cg().cause is Cause.LINK_DOWN
    assert check_promise(s) == 1
    s.link.restore()
    res = s.cg()
    assert res.committed
    assert check_promise(s) == res.sequence
    assert s.gm.stats.failures["link_down"] == 2


# ---------------------------------------------------------------------------
# Collisions
# ---------------------------------------------------------------------------

class CollidingLink(LocalLink):
    """On its first send after being armed, does a host write to a primary
    (the drain holds that primary's lock: the write goes through it)."""

    def __init__(self):
        super().__init__()
        self.action = None

    def send(self, secondary, offset, data, *, key=None):
        action, self.action = self.action, None
        if action is not None:
            action()
        super().send(secondary, offset, data, key=key)


def test_collision_saves_the_cg_version():
    link = CollidingLink()
    s = Session(n_triplets=2, link=link)
    assert s.cg().committed
    for t in (2, 6, 10):
        s.write(0, t, t)
    s.write(1, 4, 44)
    late = rand(5 * TS, 77)

    def host_write():                                     # tracks 6..11, CG tracks 6 and 10
        assert s.gm.triplets[0].pair.cg.set_indices().tolist() == [2, 6, 10]
        s.A[0].write(6 * TS + 100, late)

    link.action = host_write
    res = s.cg()
    assert res.committed and link.action is None
    assert check_promise(s) == 2                          # the CG versions, not the late write
    assert np.array_equal(image(s.B[0]), s.snaps[2][0])
    assert res.bytes_drained == 4 * TS                    # each CG track sent once
    pair = s.gm.triplets[0].pair
    assert not pair.side and pair.cg is None
    assert pair.oos.set_indices().tolist() == [6, 7, 8, 9, 10, 11]
    res = s.cg()
    assert res.committed and res.bytes_drained == 6 * TS
    assert check_promise(s) == 3
    assert np.array_equal(s.A[0].read(6 * TS + 100, 5 * TS), late)
    assert np.array_equal(s.C[0].read(6 * TS + 100, 5 * TS), late)


def test_collision_from_another_thread(monkeypatch):
    # a writer thread blocked behind the drain gets through between sends: its
    # write collides with a CG track not sent yet, whose CG version goes to
    # the side file and reaches C with the CG
    link = CollidingLink()
    s = Session(n_triplets=1, link=link)
    assert s.cg().committed
    for t in (1, 3, 5, 7, 9, 11, 13, 15):
        s.write(0, t, t)
    late = rand(TS, 88)
    A0 = s.A[0]
    wrote = threading.Event()

    def writer():
        A0.write(13 * TS, late)
        wrote.set()

    th = threading.Thread(target=writer)
    collisions = []
    collide = PPRCPair._collide

    def recorded_collide(self, t0, t1):
        collide(self, t0, t1)
        collisions.append((t0, t1, sorted(self.side)))

    lock = Volume._lock

    def drain_lock(self, *args):
        # the drain takes A0's lock again for its next send only once the
        # writer, started (and blocked) under the first send, got through
        if self is A0 and th.ident is not None \
                and threading.current_thread() is threading.main_thread():
            wrote.wait(10)
        return lock(self, *args)

    monkeypatch.setattr(PPRCPair, "_collide", recorded_collide)
    monkeypatch.setattr(Volume, "_lock", drain_lock)
    link.action = th.start                                # under A0's lock
    res = s.cg()
    th.join(10)
    assert wrote.is_set()
    assert collisions == [(13, 14, [13])]                 # the CG version was saved
    assert res.committed
    assert check_promise(s) == 2
    assert not s.gm.triplets[0].pair.side                 # and sent
    assert np.array_equal(s.A[0].read(13 * TS, TS), late)
    res = s.cg()
    assert res.committed and check_promise(s) == 3
    assert np.array_equal(s.C[0].read(13 * TS, TS), late)


# ---------------------------------------------------------------------------
# on_coordinate
# ---------------------------------------------------------------------------

def test_on_coordinate_failure_leaves_the_session_whole():
    s = Session()
    assert s.cg().committed
    s.write(0, 3, 1)
    boom = [True]
    record = s.gm.on_coordinate

    def flaky(seq):
        record(seq)
        if boom[0]:
            raise RuntimeError("callback failed")

    s.gm.on_coordinate = flaky
    with pytest.raises(RuntimeError):
        s.cg()
    boom[0] = False
    for t in s.gm.triplets:
        assert t.pair.cg is None and t.pair.oos is not None
    s.write(1, 8, 2)                                      # still recorded
    res = s.cg()
    assert res.committed and res.bytes_drained == 2 * TS
    assert check_promise(s) == res.sequence


# ---------------------------------------------------------------------------
# Stats
# ---------------------------------------------------------------------------

def test_stats():
    s = Session(max_coordination_time=0.05)
    st = s.gm.stats
    assert st.sequence == 0 and st.rpo is None and st.last_cg_time is None
    r1 = s.cg()
    s.write(0, 0, 1)
    faults.inject("prepare", volume=s.B[1])
    r2 = s.cg()
    s.write(1, 1, 2)
    faults.inject("coordinate", delay=0.08)
    r3 = s.cg()
    s.write(2, 2, 3)
    before = time.time()
    r4 = s.cg()
    assert [r.committed for r in (r1, r2, r3, r4)] == [True, False, False, True]
    assert [r.sequence for r in (r1, r2, r3, r4)] == [1, 2, 3, 4]
    assert st.sequence == 4 and st.attempts == 4 and st.successes == 2
    assert dict(st.failures) == {"prepare_failed": 1, "coordination_timeout": 1}
    assert st.last_cg_time == r4.coordinated_at and st.last_cg_time >= before
    rpo = st.rpo
    assert 0 <= rpo <= time.time() - r4.coordinated_at
    assert st.bytes_drained == sum(r.bytes_drained for r in (r1, r2, r3, r4))
    assert r1.bytes_drained == 3 * N * TS
    assert r2.bytes_drained == TS and r3.bytes_drained == 0
    assert r4.bytes_drained == 2 * TS
    p = st.phase_percentiles()
    assert set(p) == {"coordination", "drain", "flashcopy", "rpo"}
    for phase in ("coordination", "drain", "flashcopy"):
        q = p[phase]
        assert 0 <= q["p50"] <= q["p99"] <= q["max"], phase
    assert p["coordination"]["max"] >= 0.08               # the stalled attempt
    assert len(st.coordination_times) == 4 and len(st.drain_times) == 3
    assert len(st.flash_times) == 3
    d = st.as_dict()
    assert d["sequence"] == 4 and d["successes"] == 2 and d["failures"] == dict(st.failures)
    assert d["bytes_drained"] == st.bytes_drained
    assert list(s.gm.history) == [r1, r2, r3, r4]
    assert "cg=4" in repr(s.gm)


# ---------------------------------------------------------------------------
# The continuous loop
# ---------------------------------------------------------------------------

class Writers:
    """Host writer threads hammering the A volumes until stopped."""

    def __init__(self, vols, threads=2, seed=0):
        self.vols = vols
        self.stop_ = threading.Event()
        self.errors = []
        self.writes = 0
        self.threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True)
                        for i in range(threads)]

    def _run(self, seed):
        rng = np.random.default_rng(seed)
        pool = rng.integers(0, 256, 8 * TS, dtype=np.uint8)
        try:
            while not self.stop_.is_set():
                v = self.vols[int(rng.integers(len(self.vols)))]
                n = int(rng.integers(1, 2 * TS))
                off = int(rng.integers(0, v.capacity - n))
                v.write(off, pool[:n])
                self.writes += 1
                if self.writes % 64 == 0:
                    time.sleep(0.0005)
        except BaseException as e:                        # pragma: no cover
            self.errors.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_.set()
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def test_continuous_loop_with_writers():
    s = Session(n_triplets=3, n_tracks=8, keep=True)
    gm = s.gm
    with Writers(s.A) as w:
        gm.start()
        assert gm.state is GMState.RUNNING
        with pytest.raises(StateError):
            gm.start()
        assert wait_for(lambda: gm.stats.successes >= 5)
        gm.stop()
    assert w.writes > 0
    assert gm.state is GMState.IDLE
    assert gm.stats.successes >= 5
    check_promise(s)
    gm.stop()                                             # idempotent
    # a stopped session still forms single CGs
    s.write(0, 0, 1)
    assert s.cg().committed
    check_promise(s)


def test_continuous_loop_with_an_interval():
    s = Session(n_triplets=2, n_tracks=8, keep=True, cg_interval=0.05)
    gm = s.gm
    with Writers(s.A):
        gm.start()
        assert wait_for(lambda: gm.stats.attempts >= 4)
        gm.stop()
    check_promise(s)
    times = [r.coordinated_at for r in gm.history if r.coordinated_at is not None]
    assert len(times) >= 4
    assert min(np.diff(times)) >= 0.045                   # CGs are spaced by the interval
    # between CGs the pairs drain as Global Copy: more went over the link
    # than the CGs themselves carried
    assert s.link.bytes_sent > gm.stats.bytes_drained


class CountingEvent(threading.Event):
    """An Event that counts its waits: the loop's stop event, each wait one
    turn of the loop."""

    def __init__(self):
        super().__init__()
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        return super().wait(timeout)


def test_continuous_loop_goes_fatal_and_clear_fatal_resumes_it():
    s = Session(n_triplets=3, n_tracks=8, keep=True)
    gm = s.gm
    gm._stop = turns = CountingEvent()
    faults.inject("commit", volume=s.B[1], times=4)       # commit + every retry fail
    with Writers(s.A):
        gm.start()
        assert wait_for(lambda: gm.state is GMState.FATAL
                        and Cause.COMMIT_FAILED in [r.cause for r in gm.history])
        n, k = gm.stats.attempts, turns.waits
        assert wait_for(lambda: turns.waits >= k + 3)     # the loop went round, twice at least
        assert gm.stats.attempts == n                     # no CG over a fatal session
        assert gm.clear_fatal() == "running"
        assert wait_for(lambda: gm.stats.successes >= 3)
        gm.stop()
    check_promise(s)


# ---------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------

def test_recover_puts_the_last_committed_cg_on_b():
    s = Session()
    gm = s.gm
    assert s.cg().committed
    for i in range(3):
        s.write(i, 1 + i, i)
    assert s.cg().committed                               # CG 2
    for i in range(3):
        s.write(i, 4 + i, 10 + i)
    faults.inject("prepare", volume=s.B[1])
    assert not s.cg().committed                           # every B moved past CG 2
    for i in range(3):
        for t in (8, 10, 12):
            s.write(i, t, 20 + 3 * i + t)
    faults.inject("link", after=4)
    assert s.cg().cause is Cause.LINK_DOWN                # an uncommitted drain, part-sent
    s.link.restore()
    assert [np.array_equal(image(b), want) for b, want in zip(s.B, s.snaps[2])] \
        == [False, False, False]
    assert gm.recover() == 2
    for b, want in zip(s.B, s.snaps[2]):
        assert np.array_equal(image(b), want)
    check_promise(s)
    # the B volumes are ready to become primaries
    for i, b in enumerate(s.B):
        b.write(3 * TS, rand(TS, 500 + i))
        assert np.array_equal(b.read(3 * TS, TS), rand(TS, 500 + i))
    # and A writes no longer reach them, not even by a CG attempt
    before = [image(b) for b in s.B]
    s.write(0, 0, 600)
    s.write(1, 3, 601)
    with pytest.raises(StateError):
        s.cg()
    with pytest.raises(StateError):
        gm.start()
    assert gm.state is GMState.IDLE
    for b, want in zip(s.B, before):
        assert np.array_equal(image(b), want)
    check_promise(s)


def test_failback_after_recover_sends_the_tracks_the_restore_changed_on_b():
    """recover() puts CG 2 back on B over tracks A had sent to B since (a
    drained CG whose FlashCopy phase failed): failback must send B's
    restored tracks, with B's host writes and A's unsent tracks, so that A
    and B end identical (else A keeps its post-CG data on those tracks)."""
    s = Session()
    gm = s.gm
    assert s.cg().committed
    for i in range(3):
        s.write(i, 1 + i, i)
    assert s.cg().committed                               # CG 2
    for i in range(3):
        for t in (4, 8):
            s.write(i, t, 30 + 3 * i + t)                 # drained to B, never in a CG
    faults.inject("prepare", volume=s.B[1])
    assert not s.cg().committed
    assert all(np.array_equal(image(a), image(b)) for a, b in zip(s.A, s.B))
    s.write(0, 12, 70)                                    # never sent to B
    assert gm.recover() == 2
    for i, b in enumerate(s.B):
        b.write(6 * TS, rand(TS, 80 + i))
    for i, t in enumerate(gm.triplets):
        t.pair.failback()
        assert set(t.pair.oos.set_indices().tolist()) == {4, 6, 8} | ({12} if i == 0 else set())
        t.pair.drain()
        assert t.pair.out_of_sync_tracks == 0
    for a, b, want in zip(s.A, s.B, s.snaps[2]):
        assert np.array_equal(image(b)[:6 * TS], want[:6 * TS])
        assert np.array_equal(image(a), image(b))


def test_recover_again_keeps_the_host_writes_b_took_since():
    """recover() run a second time (a retry, an operator running it again)
    restored every B from its C again, throwing away the host writes B had
    acknowledged since the first."""
    s = Session()
    gm = s.gm
    assert s.cg().committed
    for i in range(3):
        s.write(i, 5, 40 + i)
    for t in gm.triplets:
        t.pair.drain()                                    # B past CG 1
    assert gm.recover() == 1
    for i, b in enumerate(s.B):
        assert np.array_equal(image(b), s.snaps[1][i])
        b.write(5 * TS, rand(TS, 90 + i))
    assert gm.recover() == 1
    for i, b in enumerate(s.B):
        assert np.array_equal(b.read(5 * TS, TS), rand(TS, 90 + i))
    check_promise(s)


def test_recover_while_the_loop_runs():
    s = Session(n_triplets=3, n_tracks=8, keep=True)
    gm = s.gm
    with Writers(s.A):
        gm.start()
        assert wait_for(lambda: gm.stats.successes >= 3)
        seq = gm.recover()
    assert gm.state is GMState.IDLE
    assert seq == gm.stats.sequence
    for b, want in zip(s.B, s.snaps[seq]):
        assert np.array_equal(image(b), want)
    for b in s.B:
        b.write(0, b"primary")


def test_commit_failing_on_every_relationship_resolves_by_revert():
    # all still revertible with the new sequence: none committed, revert all
    s = Session()
    assert s.cg().committed
    s.write(0, 2, 1)
    for b in s.B:
        faults.inject("commit", volume=b)
    res = s.cg()
    assert res.cause is Cause.COMMIT_FAILED and not res.committed
    assert "resolved by revert" in s.gm.fatal_reason
    assert check_promise(s) == 1
    assert s.gm.clear_fatal() == "idle"
    assert s.cg().committed
    check_promise(s)


def test_b_refuses_pprc_updates_while_prepared():
    s = Session(n_triplets=2)
    assert s.cg().committed
    s.write(1, 3, 1)
    faults.inject("prepare", volume=s.B[1], delay=0.2)    # B0 is prepared by then
    mark = len(faults.fired_log())
    outcome = []

    def pprc_update():
        assert wait_for(lambda: new_log_entries(mark))
        before = image(s.B[0])
        try:
            s.link.send(s.B[0], 0, rand(TS, 5), key=s.A[0])
            outcome.append("applied")
        except WriteInhibitedError:
            outcome.append("refused")
        outcome.append(np.array_equal(image(s.B[0]), before))

    th = threading.Thread(target=pprc_update)
    th.start()
    res = s.cg()
    th.join(10)
    assert outcome == ["refused", True]
    assert res.committed
    assert check_promise(s) == 2


def test_loop_survives_an_attempt_that_raises():
    # an on_coordinate callback that raises once makes the attempt raise
    s = Session(n_triplets=2, n_tracks=8, keep=True)
    gm = s.gm
    assert s.cg().committed
    recorder, raised = gm.on_coordinate, []

    def flaky(seq):
        if not raised:
            raised.append(seq)
            raise InjectedFault("on_coordinate failed once")
        if recorder is not None:
            recorder(seq)

    gm.on_coordinate = flaky
    with Writers(s.A):
        gm.start()
        assert wait_for(lambda: gm.state is GMState.FATAL)
        assert "InjectedFault" in gm.fatal_reason
        assert gm._thread.is_alive()
        check_promise(s)
        assert gm.clear_fatal() == "running"
        n = gm.stats.successes
        assert wait_for(lambda: gm.stats.successes >= n + 3)
        gm.stop()
    check_promise(s)
