"""PPRC: the in-process link and PPRC pairs (Global Copy and Metro Mirror).

Pairs are built with ``background=False`` unless a test is about the
background agent: then nothing sends but :meth:`PPRCPair.drain` and the
Metro Mirror write path, so every test is deterministic. Volumes are small
(16 tracks of 512 B) and start with random bytes on the primary.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fastfc import (FlashCopy, LimitError, Link, LinkDownError, LocalLink, PPRCMode,
                    PPRCPair, PPRCState, StateError, Volume, VolumeClosedError,
                    WriteInhibitedError, _core, faults)
from helpers import image, rand

TS = 512
N = 16


def track(v: Volume, t: int) -> np.ndarray:
    return v.read(t * v.track_size, v.track_size)


def volumes(n_tracks: int = N, track_size: int = TS, seed: int = 1):
    """A primary holding random bytes and an empty secondary."""
    a = Volume(n_tracks, track_size, name="A")
    b = Volume(n_tracks, track_size, name="B")
    a._raw_array()[:] = rand(a.capacity, seed)
    return a, b


def make_pair(mode: str = "gcp", *, synced: bool = False, link: Link | None = None,
              seed: int = 1, **kw):
    a, b = volumes(seed=seed)
    link = link if link is not None else LocalLink()
    pair = PPRCPair(a, b, link, mode=mode, background=False, **kw)
    if synced:
        assert pair.drain() == a.capacity
        assert np.array_equal(image(b), image(a))
    return a, b, link, pair


class RecordingLink(Link):
    """A custom transport: delegates to a LocalLink and records each send."""

    def __init__(self) -> None:
        self.inner = LocalLink(name="inner")
        self.log: list[tuple[int, int]] = []

    def send(self, secondary, offset, data, *, key=None):
        self.inner.send(secondary, offset, data, key=key)
        self.log.append((offset, len(data)))

    def fail(self):
        self.inner.fail()

    def restore(self):
        self.inner.restore()

    @property
    def up(self):
        return self.inner.up

    @property
    def bytes_sent(self):
        return self.inner.bytes_sent


# ---------------------------------------------------------------------------
# LocalLink
# ---------------------------------------------------------------------------

def test_local_link_delivers_and_counts():
    a, b = volumes()
    link = LocalLink()
    assert link.up and link.bytes_sent == 0 and link.sends == 0
    data = rand(700, 5)
    link.send(b, 100, data)
    link.send(b, 3000, data[:10])
    assert link.bytes_sent == 710 and link.sends == 2
    assert np.array_equal(b.read(100, 700), data)
    assert np.array_equal(b.read(3000, 10), data[:10])
    assert not b.read(0, 100).any() and not b.read(800, 2200).any()


def test_local_link_fail_and_restore():
    _, b = volumes()
    link = LocalLink()
    link.fail()
    assert not link.up
    assert "DOWN" in repr(link)
    with pytest.raises(LinkDownError):
        link.send(b, 0, rand(TS, 2))
    assert not image(b).any()
    assert link.bytes_sent == 0 and link.sends == 0
    link.restore()
    assert link.up
    link.send(b, 0, rand(TS, 2))
    assert np.array_equal(track(b, 0), rand(TS, 2))
    assert link.bytes_sent == TS and link.sends == 1


@pytest.mark.parametrize("kw", [dict(bandwidth=0), dict(bandwidth=-5.0), dict(latency=-0.001)])
def test_local_link_refuses_bad_parameters(kw):
    with pytest.raises(ValueError):
        LocalLink(**kw)


def test_local_link_latency_is_applied():
    _, b = volumes()
    link = LocalLink(latency=0.05)
    t = time.perf_counter()
    link.send(b, 0, rand(TS, 3))
    link.send(b, TS, rand(TS, 4))
    elapsed = time.perf_counter() - t
    assert elapsed >= 0.08          # two sends, 50 ms each (loose lower bound)
    assert link.bytes_sent == 2 * TS and link.sends == 2
    assert np.array_equal(b.read(0, 2 * TS), np.concatenate([rand(TS, 3), rand(TS, 4)]))


def test_local_link_bandwidth_cap_is_applied():
    _, b = volumes()
    link = LocalLink(bandwidth=100_000)           # 100 kB/s
    t = time.perf_counter()
    for i in range(4):
        link.send(b, i * 2048, rand(2048, i))      # 8 KiB in all: >= 82 ms on the wire
    elapsed = time.perf_counter() - t
    assert elapsed >= 0.06
    assert link.bytes_sent == 8192 and link.sends == 4
    assert np.array_equal(b.read(0, 8192), np.concatenate([rand(2048, i) for i in range(4)]))
    assert "MB/s" in repr(link) and "unlimited" in repr(LocalLink())


def test_link_failing_during_a_send_delivers_nothing():
    _, b = volumes()
    link = LocalLink(latency=0.5)
    timer = threading.Timer(0.02, link.fail)
    timer.start()
    try:
        with pytest.raises(LinkDownError):
            link.send(b, 0, rand(TS, 1))
    finally:
        timer.join()
    assert not image(b).any()
    assert link.bytes_sent == 0 and link.sends == 0


def test_injected_link_fault_lets_after_sends_through_then_cuts_the_link():
    a, b = volumes()
    link = LocalLink()
    faults.inject("link", after=2)
    link.send(b, 0, a.array[:TS], key=a)
    link.send(b, TS, a.array[TS:2 * TS], key=a)
    with pytest.raises(LinkDownError):
        link.send(b, 2 * TS, a.array[2 * TS:3 * TS], key=a)
    assert not link.up
    assert link.sends == 2 and not track(b, 2).any()
    assert ("link", "A") in faults.fired_log()
    link.restore()                               # the fault fired once: it is gone
    link.send(b, 2 * TS, a.array[2 * TS:3 * TS], key=a)
    assert np.array_equal(b.read(0, 3 * TS), a.array[:3 * TS])


def test_injected_link_fault_only_hits_its_volume():
    a, b = volumes()
    other = Volume(N, TS, name="other")
    link = LocalLink()
    faults.inject("link", volume=other)
    link.send(b, 0, a.array[:TS], key=a)        # another key: goes through
    assert link.up and link.sends == 1
    with pytest.raises(LinkDownError):
        link.send(b, TS, a.array[TS:2 * TS], key=other)
    assert not link.up


# ---------------------------------------------------------------------------
# The Link interface
# ---------------------------------------------------------------------------

def test_link_is_abstract():
    with pytest.raises(TypeError):
        Link()

    class Partial(Link):
        def send(self, secondary, offset, data, *, key=None):
            pass
    with pytest.raises(TypeError):
        Partial()


def test_pair_refuses_a_link_that_is_not_a_link():
    a, b = volumes()
    with pytest.raises(TypeError):
        PPRCPair(a, b, object(), background=False)
    assert a._mirror is None and not b._secondary
    b.write(0, b"ok")                            # not a secondary


@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_custom_link_subclass_carries_the_pair(mode):
    link = RecordingLink()
    a, b, _, pair = make_pair(mode, link=link)
    assert pair.link is link
    assert pair.drain() == a.capacity
    assert sum(n for _, n in link.log) == a.capacity == link.bytes_sent
    assert np.array_equal(image(b), image(a))
    link.log.clear()
    a.write(3 * TS + 7, b"custom")
    if mode == "gcp":
        assert link.log == []
        pair.drain()
        assert link.log == [(3 * TS, TS)]        # the whole track, with its current content
    else:
        assert link.log == [(3 * TS + 7, 6)]     # just the written bytes, before write() returned
    assert np.array_equal(image(b), image(a))


class WireLink(Link):
    """A custom transport that applies updates itself, as a PPRC update."""

    def __init__(self):
        self._up = True
        self.updates = 0

    def send(self, secondary, offset, data, *, key=None):
        if not self._up:
            raise LinkDownError("wire cut")
        secondary._write_origin(offset, bytes(data), _core.PPRC)
        self.updates += 1

    def fail(self):
        self._up = False

    def restore(self):
        self._up = True

    @property
    def up(self):
        return self._up


def test_custom_link_failure_suspends_the_pair():
    link = WireLink()
    a, b, _, pair = make_pair("mmir", link=link, synced=True)
    link.fail()
    a.write(5 * TS, rand(TS, 9))
    assert pair.state is PPRCState.SUSPENDED
    assert "wire cut" in pair.suspend_reason
    assert pair.oos.set_indices().tolist() == [5]
    link.restore()
    pair.resume()
    pair.drain()
    assert np.array_equal(image(b), image(a))


# ---------------------------------------------------------------------------
# Initial copy and Global Copy
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_initial_copy_sends_every_track(mode):
    a, b, link, pair = make_pair(mode)
    assert pair.mode is PPRCMode(mode)
    assert pair.state is PPRCState.COPY_PENDING
    assert pair.out_of_sync_tracks == N
    assert not image(b).any()
    assert pair.drain() == a.capacity
    assert link.bytes_sent == a.capacity == pair.bytes_sent
    assert np.array_equal(image(b), image(a))
    assert pair.out_of_sync_tracks == 0
    # Global Copy pairs stay copy pending (DS8000); Metro Mirror reaches full duplex
    expect = PPRCState.FULL_DUPLEX if mode == "mmir" else PPRCState.COPY_PENDING
    assert pair.state is expect
    assert pair.drain() == 0 and link.bytes_sent == a.capacity


def test_initial_copy_in_slices():
    a, b, link, pair = make_pair("gcp")
    assert pair.drain(max_bytes=3 * TS) == 3 * TS
    assert pair.out_of_sync_tracks == N - 3
    assert np.array_equal(b.read(0, 3 * TS), a.read(0, 3 * TS))
    assert not b.read(3 * TS, a.capacity - 3 * TS).any()
    assert pair.drain() == a.capacity - 3 * TS
    assert np.array_equal(image(b), image(a))


@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_no_initial_copy(mode):
    a, b, link, pair = make_pair(mode, initial_copy=False)
    assert pair.out_of_sync_tracks == 0
    assert pair.drain() == 0 and link.bytes_sent == 0
    assert not image(b).any()                    # nothing was sent: the caller vouches
    if mode == "mmir":
        assert pair.state is PPRCState.FULL_DUPLEX
        a.write(TS, b"x" * 10)
        assert link.bytes_sent == 10
        assert np.array_equal(b.read(TS, 10), np.frombuffer(b"x" * 10, np.uint8))


def test_global_copy_write_sets_oos_and_waits_for_the_drain():
    a, b, link, pair = make_pair("gcp", synced=True)
    sent = link.bytes_sent
    a.write(2 * TS + 100, rand(50, 1))                 # track 2
    a.write(6 * TS - 3, rand(10, 2))                   # tracks 5 and 6
    a.write(2 * TS, rand(5, 3))                        # track 2 again
    assert pair.oos.set_indices().tolist() == [2, 5, 6]
    assert pair.out_of_sync_tracks == 3
    assert link.bytes_sent == sent                     # nothing went yet
    assert not np.array_equal(image(b), image(a))
    assert np.array_equal(b.read(2 * TS, TS), rand(TS * N, 1)[2 * TS:3 * TS])
    assert pair.drain() == 3 * TS                      # each track once, current content
    assert link.bytes_sent == sent + 3 * TS
    assert np.array_equal(image(b), image(a))
    assert pair.out_of_sync_tracks == 0


# ---------------------------------------------------------------------------
# Metro Mirror
# ---------------------------------------------------------------------------

class CheckingLink(LocalLink):
    """Notes, for each send, whether the writer is still inside write()."""

    def __init__(self):
        super().__init__()
        self.inside_write = None
        self.seen_while_writing = []

    def send(self, secondary, offset, data, *, key=None):
        super().send(secondary, offset, data, key=key)
        self.seen_while_writing.append(self.inside_write)


def test_metro_mirror_write_reaches_the_secondary_before_it_returns():
    link = CheckingLink()
    a, b, _, pair = make_pair("mmir", link=link, synced=True)
    assert pair.state is PPRCState.FULL_DUPLEX
    data = rand(3 * TS, 7)
    link.inside_write = True
    a.write(4 * TS + 11, data)                   # unaligned, four tracks
    link.inside_write = False
    assert link.seen_while_writing[-1] is True
    assert np.array_equal(b.read(4 * TS + 11, 3 * TS), data)
    assert np.array_equal(image(b), image(a))
    assert pair.out_of_sync_tracks == 0
    assert pair.state is PPRCState.FULL_DUPLEX


def test_metro_mirror_during_initial_copy_defers_tracks_still_owed():
    a, b, link, pair = make_pair("mmir")
    pair.drain(max_bytes=4 * TS)                 # tracks 0..3 are on B
    a.write(TS, rand(TS, 20))                    # sent now
    assert np.array_equal(track(b, 1), rand(TS, 20))
    a.write(10 * TS, rand(TS, 21))               # track 10 is still owed: recorded
    assert not track(b, 10).any()
    assert pair.oos.test(10)
    assert pair.state is PPRCState.COPY_PENDING
    pair.drain()
    assert np.array_equal(image(b), image(a))
    assert pair.state is PPRCState.FULL_DUPLEX


def test_metro_mirror_link_down_suspends_and_records_oos():
    a, b, link, pair = make_pair("mmir", synced=True)
    before = image(b)
    link.fail()
    a.write(3 * TS + 5, rand(20, 1))             # completes although B is unreachable
    a.write(9 * TS, rand(TS + 1, 2))             # tracks 9 and 10
    assert pair.state is PPRCState.SUSPENDED
    assert "LinkDownError" in pair.suspend_reason
    assert pair.oos.set_indices().tolist() == [3, 9, 10]
    assert np.array_equal(image(b), before)
    link.restore()
    assert pair.state is PPRCState.SUSPENDED     # no automatic resume
    assert pair.drain() == 0
    a.write(12 * TS, rand(4, 3))                 # still recorded, not sent
    assert np.array_equal(image(b), before)
    sent = link.bytes_sent
    pair.resume()
    assert pair.drain() == 4 * TS                # only the OOS tracks
    assert link.bytes_sent - sent == 4 * TS
    assert np.array_equal(image(b), image(a))
    assert pair.state is PPRCState.FULL_DUPLEX


@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_suspend_and_resume_resync_only_oos_tracks(mode):
    a, b, link, pair = make_pair(mode, synced=True)
    pair.suspend()
    assert pair.state is PPRCState.SUSPENDED and pair.suspend_reason == "host"
    before = image(b)
    sent = link.bytes_sent
    for t in (2, 5, 6, 5):
        a.write(t * TS + 1, rand(TS - 2, t))
    assert link.bytes_sent == sent
    assert np.array_equal(image(b), before)
    assert pair.oos.set_indices().tolist() == [2, 5, 6]
    assert pair.drain() == 0                     # suspended: nothing moves
    pair.resume()
    assert pair.drain() == 3 * TS
    assert link.bytes_sent - sent == 3 * TS
    assert np.array_equal(image(b), image(a))
    if mode == "mmir":
        assert pair.state is PPRCState.FULL_DUPLEX


def test_suspend_reason_is_kept():
    _, _, _, pair = make_pair("gcp", synced=True)
    pair.suspend("maintenance")
    assert pair.suspend_reason == "maintenance"
    assert "maintenance" in repr(pair)


# ---------------------------------------------------------------------------
# Secondaries
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_secondary_refuses_host_writes_but_takes_pprc_updates(mode):
    a, b, link, pair = make_pair(mode, synced=True)
    before = image(b)
    with pytest.raises(WriteInhibitedError):
        b.write(0, b"host")
    with pytest.raises(WriteInhibitedError):
        b.write_batch([0, TS], np.ones((2, 8), np.uint8))
    assert np.array_equal(image(b), before)
    a.write(0, b"pprc")
    pair.drain()
    assert b.read(0, 4).tobytes() == b"pprc"


def test_update_to_a_write_inhibited_secondary_suspends_and_changes_nothing():
    a, b, link, pair = make_pair("gcp", synced=True)
    c = Volume(N, TS, name="C")
    fc = FlashCopy(b, c, background_copy=False, record=True)
    fc.resync(revertible=True)                   # B is write-inhibited now
    before = image(b)
    a.write(4 * TS, rand(TS, 4))
    assert pair.drain() == 0
    assert pair.state is PPRCState.SUSPENDED
    assert "WriteInhibitedError" in pair.suspend_reason
    assert np.array_equal(image(b), before)      # never half-applied
    assert pair.oos.set_indices().tolist() == [4]
    fc.commit()
    pair.resume()
    assert pair.drain() == TS
    assert np.array_equal(image(b), image(a))


# ---------------------------------------------------------------------------
# Failover / failback
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_failover_then_failback_resyncs_tracks_changed_on_either_side(mode):
    a, b, link, pair = make_pair(mode, synced=True)
    pair.failover()
    assert pair.state is PPRCState.SUSPENDED and pair.failed_over
    b.write(3 * TS, rand(TS, 30))                # the secondary site takes over
    b.write(8 * TS + 9, rand(4, 31))
    a.write(3 * TS + 1, rand(2, 32))             # stray writes at the old primary
    a.write(12 * TS, rand(TS, 33))
    assert link.bytes_sent == a.capacity         # nothing went either way
    with pytest.raises(StateError):
        pair.resume()
    b_image = image(b)
    pair.failback()
    assert pair.primary is b and pair.secondary is a
    assert not pair.failed_over and pair.suspend_reason is None
    assert pair.oos.set_indices().tolist() == [3, 8, 12]
    with pytest.raises(WriteInhibitedError):
        a.write(0, b"no")                        # A is the secondary now
    sent = link.bytes_sent
    assert pair.drain() == 3 * TS                # only tracks changed on either side
    assert link.bytes_sent - sent == 3 * TS
    assert np.array_equal(image(a), b_image)
    assert np.array_equal(image(b), b_image)
    # and it mirrors B -> A from now on
    b.write(5 * TS, rand(TS, 34))
    if mode == "gcp":
        assert not np.array_equal(track(a, 5), rand(TS, 34))
        pair.drain()
    else:
        assert pair.state is PPRCState.FULL_DUPLEX
    assert np.array_equal(image(a), image(b))


def test_failback_after_reopening_the_units_sends_writes_made_to_the_failed_over_secondary(tmp_path):
    """Writes to B after a failover were recorded in memory only: once the
    units were reopened they went unrecorded and failback left A stale."""
    from fastfc import StorageUnit
    with StorageUnit(tmp_path / "u1") as u1, StorageUnit(tmp_path / "u2") as u2:
        a, b = u1.create_volume("A", N, TS), u2.create_volume("B", N, TS)
        a.write(0, rand(a.capacity, 40))
        pair = PPRCPair(a, b, background=False)
        pair.drain()
        pair.failover()
        b.write(4 * TS, rand(TS, 41))            # before the reopen
    with StorageUnit(tmp_path / "u1") as u1, StorageUnit(tmp_path / "u2") as u2:
        b = u2.volume("B")
        b.write(9 * TS + 3, rand(7, 42))         # after it
        pair = u1.pairs[0]
        assert pair.failed_over
        pair.failback()
        assert pair.oos.set_indices().tolist() == [4, 9]
        pair.drain()
        assert np.array_equal(image(u1.volume("A")), image(b))


def test_failback_refused_unless_failed_over():
    a, b, link, pair = make_pair("gcp", synced=True)
    with pytest.raises(StateError):
        pair.failback()
    assert pair.primary is a and pair.secondary is b and b._secondary


# ---------------------------------------------------------------------------
# Remove and refused pairings
# ---------------------------------------------------------------------------

def test_remove_frees_both_volumes():
    a, b, link, pair = make_pair("mmir", synced=True)
    pair.remove()
    assert not pair.active
    assert a._mirror is None and not b._secondary
    b.write(0, b"free")                          # B takes host writes again
    sent = link.bytes_sent
    a.write(TS, b"alone")
    assert link.bytes_sent == sent               # nothing is mirrored
    assert b.read(TS, 5).tobytes() != b"alone"
    with pytest.raises(StateError):
        pair.drain()
    with pytest.raises(StateError):
        pair.suspend()
    pair.remove()                                # idempotent
    again = PPRCPair(b, a, link, background=False)   # the volumes can pair again
    assert again.drain() == a.capacity and np.array_equal(image(a), image(b))


def test_remove_after_failover_frees_both_volumes():
    a, b, link, pair = make_pair("gcp", synced=True)
    pair.failover()
    pair.remove()
    assert a._mirror is None and b._mirror is None and not b._secondary
    PPRCPair(a, b, link, background=False)


def _pair_state(*vols):
    return [(v._mirror, v._secondary, image(v).tobytes()) for v in vols]


def test_refused_pairings_change_nothing():
    a, b, link, pair = make_pair("gcp", synced=True)
    c = Volume(N, TS, name="C")
    d = Volume(N, TS, name="D")
    odd_count = Volume(N + 1, TS, name="odd")
    odd_size = Volume(N, 2 * TS, name="wide")
    src = Volume(N, TS, name="S")
    tgt = Volume(N, TS, name="T")
    FlashCopy(src, tgt, background_copy=False)
    everything = [a, b, c, d, odd_count, odd_size, src, tgt]
    before = _pair_state(*everything)
    cases = [
        ((c, odd_count), ValueError),            # geometry: track count
        ((c, odd_size), ValueError),             # geometry: track size
        ((c, c), ValueError),                    # same volume
        ((a, c), LimitError),                    # already a primary
        ((c, b), LimitError),                    # already a secondary
        ((b, c), LimitError),                    # a secondary cannot be a primary
        ((c, a), LimitError),                    # a primary cannot be a secondary
        ((tgt, c), LimitError),                  # FlashCopy target as primary
        ((c, tgt), LimitError),                  # FlashCopy target as secondary
    ]
    for (p, s), exc in cases:
        with pytest.raises(exc):
            PPRCPair(p, s, LocalLink(), background=False)
        assert _pair_state(*everything) == before, (p.name, s.name)
    with pytest.raises(ValueError):
        PPRCPair(c, d, mode="sync", background=False)
    assert c._mirror is None and not d._secondary
    # the existing pair is untouched and still works
    a.write(0, b"still")
    pair.drain()
    assert b.read(0, 5).tobytes() == b"still"
    # and the free volumes can still pair
    PPRCPair(c, d, background=False)


def test_closed_volume_cannot_pair():
    a, b = volumes()
    b.close()
    with pytest.raises(VolumeClosedError):
        PPRCPair(a, b, background=False)
    assert a._mirror is None
    a.write(0, b"fine")


def test_a_pprc_volume_cannot_become_a_flashcopy_target():
    a, b, link, pair = make_pair("gcp")
    x = Volume(N, TS, name="X")
    for v in (a, b):
        with pytest.raises(LimitError):
            FlashCopy(x, v, background_copy=False)
    assert x.relationships == []


# ---------------------------------------------------------------------------
# Sends stop at once when the pair is suspended or failed over mid-drain
# ---------------------------------------------------------------------------

class HookLink(LocalLink):
    """Runs ``hook`` once, right after the first send."""

    def __init__(self, hook=None):
        super().__init__()
        self.hook = hook

    def send(self, secondary, offset, data, *, key=None):
        super().send(secondary, offset, data, key=key)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()


def test_suspend_during_a_drain_stops_sending():
    link = HookLink()
    a, b, _, pair = make_pair("gcp", link=link, initial_copy=False)
    b._raw_array()[:] = a.array                         # the volumes start equal
    for t in (1, 4, 9):                           # three separate runs
        a.write(t * TS, rand(TS, t))
    link.hook = pair.suspend
    pair.drain()
    assert link.sends == 1
    assert pair.oos.set_indices().tolist() == [4, 9]
    pair.resume()
    pair.drain()
    assert np.array_equal(image(b), image(a))


def test_failover_during_a_drain_keeps_the_new_primary_writes():
    link = HookLink()
    a, b, _, pair = make_pair("gcp", link=link, initial_copy=False)
    b._raw_array()[:] = a.array                         # the volumes start equal
    for t in (1, 4, 9):
        a.write(t * TS, rand(TS, t))
    site_b = rand(TS, 99)

    def takeover():
        pair.failover()
        b.write(4 * TS, site_b)                  # a host write at the new primary

    link.hook = takeover
    pair.drain()
    assert np.array_equal(track(b, 4), site_b)   # not overwritten by the old primary
    pair.failback()
    pair.drain()
    assert np.array_equal(track(a, 4), site_b)
    assert np.array_equal(image(a), image(b))


# ---------------------------------------------------------------------------
# The background agent
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["gcp", "mmir"])
def test_background_agent_syncs(mode):
    a, b = volumes()
    link = LocalLink()
    pair = PPRCPair(a, b, link, mode=mode)       # background=True by default
    try:
        assert pair.wait_synced(timeout=10)
        assert np.array_equal(image(b), image(a))
        for t in range(0, N, 3):
            a.write(t * TS + 3, rand(TS - 3, t))
        assert pair.wait_synced(timeout=10)
        assert np.array_equal(image(b), image(a))
        if mode == "mmir":
            assert pair.state is PPRCState.FULL_DUPLEX
        # a suspended pair never counts as synced; resume lets the agent resync
        pair.suspend()
        a.write(0, rand(TS, 77))
        assert not pair.wait_synced(timeout=0.05)
        pair.resume()
        assert pair.wait_synced(timeout=10)
        assert np.array_equal(image(b), image(a))
    finally:
        pair.remove()
    assert pair._thread is None


def test_background_agent_failback():
    a, b = volumes()
    pair = PPRCPair(a, b)
    try:
        assert pair.wait_synced(timeout=10)
        pair.failover()
        b.write(2 * TS, rand(TS, 5))
        pair.failback()
        assert pair.wait_synced(timeout=10)
        assert np.array_equal(image(a), image(b))
        assert np.array_equal(track(a, 2), rand(TS, 5))
    finally:
        pair.remove()


def test_direct_drain_keeps_b_flashcopy_image_and_refuses_whole_when_inhibited():
    """The in-process fast path (unlimited LocalLink) follows B's I/O rules:
    copy-on-write to B's FlashCopy target first, and nothing applied while
    B is write-inhibited by a revertible FlashCopy."""
    link = LocalLink()
    a, b = Volume(16, TS), Volume(16, TS)
    c = Volume(16, TS)
    pair = PPRCPair(a, b, link, initial_copy=False, background=False)
    assert link.direct()
    fc = FlashCopy(b, c, background_copy=False, record=True)
    b_before = image(b)
    for t in (2, 3, 7):
        a.write(t * TS, rand(TS, t))
    fc.resync(revertible=True)            # B is now write-inhibited
    pair.drain()
    assert pair.state is PPRCState.SUSPENDED
    assert np.array_equal(image(b), b_before)             # nothing half-applied
    assert pair.oos.set_indices().tolist() == [2, 3, 7]   # still owed
    fc.revert()
    pair.resume()
    pair.drain()
    assert np.array_equal(image(b), image(a))
    assert np.array_equal(c.read(0, c.capacity), b_before)  # C kept B's old image
    assert link.bytes_sent == 3 * TS


def test_direct_drain_on_files_writes_only_changed_pages_and_keeps_images(tmp_path):
    """On file-backed volumes the fast path writes only the 4 KiB pages that
    differ; the images are the same as with whole-track copies: B equals A,
    and B's FlashCopy target keeps B's old image (copy-on-write)."""
    TS4 = 65536
    a = Volume(8, TS4, path=tmp_path / "a")
    b = Volume(8, TS4, path=tmp_path / "b")
    c = Volume(8, TS4, path=tmp_path / "c")
    b._file_backed = True      # as on a disk (tmp_path may be tmpfs elsewhere)
    base = rand(8 * TS4, 1)
    a._raw_array()[:] = base
    b._raw_array()[:] = base
    b._raw_array()[3 * TS4 + 100: 3 * TS4 + 200] = 7      # B differs from A on one page
    b_before = image(b)
    pair = PPRCPair(a, b, LocalLink(), initial_copy=False, background=False)
    fc = FlashCopy(b, c, background_copy=False, record=True)
    a.write(2 * TS4 + 5000, rand(3000, 2))          # touches pages 1 and 2 of track 2
    a.write(3 * TS4, rand(10, 3))                    # track 3: page 0
    pair.oos.set(3)                                  # and B's stray page on track 3 is owed
    pair.drain()
    assert np.array_equal(image(b), image(a))
    assert np.array_equal(c.read(0, c.capacity), b_before)


# ---------------------------------------------------------------------------
# The cow hook runs inside the one kernel that applies PPRC updates
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["pprc_drain", "pprc_copy_tracks"])
def test_cow_hook_sees_the_copy_on_write_before_the_update_lands(kernel):
    """The crash tests stop the world at the ``cow`` point: B's old tracks
    are on C by then, and A's new data is not on B yet. Both PPRC kernels
    call the hook from the production path (no per-track second path)."""
    a, b, link, pair = make_pair(synced=True)
    c = Volume(N, TS, name="C")
    fc = FlashCopy(b, c, background_copy=False, record=True)
    old_b = image(b)
    a.write(2 * TS, rand(3 * TS, 9))           # tracks 2-4 owed to B
    owed = _core.TrackBitmap(N)
    owed.set_range(2, 5)
    seen = []

    def at_cow():
        seen.append((np.array(b.array), np.array(c.array)))

    faults.inject("cow", b, action=at_cow, times=100)
    try:
        if kernel == "pprc_drain":
            assert _core.pprc_drain(a, b, owed, 64) == (3, 0)
        else:
            a._lock()
            try:
                assert _core.pprc_copy_tracks(a, b, owed, 0, N)[0] == 3
            finally:
                a._unlock()
    finally:
        faults.clear()
    assert seen, "the cow hook was not called"
    raw_b, raw_c = seen[0]
    span = slice(2 * TS, 5 * TS)
    assert np.array_equal(raw_c[span], old_b[span])   # copy-on-write done
    assert np.array_equal(raw_b[span], old_b[span])   # the update not landed yet
    assert np.array_equal(image(b), image(a))
    assert np.array_equal(image(c), old_b)
    assert fc.tracks_to_copy == N - 3


def test_a_raising_cow_hook_stops_the_drain_with_nothing_half_applied():
    a, b, link, pair = make_pair(synced=True)
    c = Volume(N, TS, name="C")
    FlashCopy(b, c, background_copy=False, record=True)
    old_b = image(b)
    a.write(0, rand(N * TS, 11))
    owed = _core.TrackBitmap(N, fill=True)

    def boom():
        raise RuntimeError("stop here")

    faults.inject("cow", b, action=boom)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            _core.pprc_drain(a, b, owed, 4)
    finally:
        faults.clear()
    assert np.array_equal(image(b), old_b)           # no update landed
    assert np.array_equal(image(c), old_b)           # C keeps B's image
    assert owed.count() == N                          # everything still owed
    assert a._lock(0) and b._lock(0)                  # no lock left held
    a._unlock()
    b._unlock()


def test_an_idle_pairs_agent_looks_less_often_and_still_sends_new_writes(monkeypatch):
    """A pair with nothing to send backs its agent off (every 10 ms, then up
    to every 100 ms), so many idle pairs cost a server little; a write
    after the idle spell is still sent without anyone asking."""
    from fastfc.copyservices import pprc as pprc_mod
    a, b, _, pair = make_pair(synced=True)
    calls = []
    real = pair.drain
    monkeypatch.setattr(pair, "drain", lambda n=None: calls.append(n) or real(n))
    pair.start()
    try:
        time.sleep(1.0)
        # at a fixed 10 ms it would look about 100 times in a second
        assert len(calls) <= 1.0 / pprc_mod.AGENT_IDLE_MAX + 8, len(calls)
        a.write(3 * TS, np.full(TS, 5, np.uint8))
        deadline = time.monotonic() + 10
        while pair.out_of_sync_tracks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pair.out_of_sync_tracks == 0
        assert np.array_equal(image(b), image(a))
    finally:
        pair.stop()
