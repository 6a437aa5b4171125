"""Durable recovery points in a storage unit (fastfc.durable.points): they
survive a close and a reopen with their images, names and retention, and
what the unit refuses it refuses after a reopen too."""

from __future__ import annotations

import numpy as np
import pytest

from fastfc import StorageUnit
from fastfc.errors import ImmutablePointError, ReadOnlyUnitError, StateError


def _unit(path, durability="process"):
    u = StorageUnit(path, durability=durability)
    for n in ("a", "b"):
        u.create_volume(n, 8, 16384, grain_size=4096)
    return u


def _scribble(vol, rng, n=6):
    for _ in range(n):
        off = int(rng.integers(0, vol.capacity // 512)) * 512
        vol.write(off, rng.integers(0, 256, min(3000, vol.capacity - off), dtype=np.uint8))


@pytest.mark.parametrize("durability", ["process", "power"])
def test_points_survive_a_reopen_with_images_names_and_retention(tmp_path, durability):
    rng = np.random.default_rng(3)
    u = _unit(tmp_path, durability)
    images = {}
    for i in range(6):
        _scribble(u.volume("a"), rng)
        _scribble(u.volume("b"), rng)
        images[i] = {n: u.volume(n).read(0, u.volume(n).capacity) for n in "ab"}
        u.points.take(["a", "b"], name=f"p{i}", retain_for=3600 if i == 1 else 0)
    _scribble(u.volume("a"), rng, 20)
    u.points.expire("a", 3)
    u.close()
    with StorageUnit(tmp_path) as u:
        assert [p.seq for p in u.points.points("a")] == [0, 1, 2, 4, 5]
        assert [p.seq for p in u.points.points("b")] == list(range(6))
        for p in u.points.points():
            assert np.array_equal(p.image(), images[p.seq][p.volume.name])
            assert p.name == f"p{p.seq}"
        with pytest.raises(ImmutablePointError, match="retained"):
            u.points.expire("a", 1)
        with pytest.raises(ImmutablePointError, match="cannot be shortened"):
            u.points.retain("a", 1, 0.0)
        with pytest.raises(StateError, match="recovery points"):
            u.remove_volume("a")
        # a restore onto a new volume, then onto the source
        r = u.points.restore("a", 2, "rec")
        assert r.wait(30)
        assert np.array_equal(u.volume("rec").read(0, u.volume("rec").capacity),
                              images[2]["a"])
        u.points.restore_onto_source("b", 0)
        assert np.array_equal(u.volume("b").read(0, u.volume("b").capacity), images[0]["b"])
        # the newer points of b kept their images through that restore
        for p in u.points.points("b"):
            assert np.array_equal(p.image(), images[p.seq]["b"])
        for p in u.points.points("b")[2:]:
            u.points.expire("b", p.seq)
    with StorageUnit(tmp_path) as u:
        assert [p.seq for p in u.points.points("b")] == [0, 1]
        assert np.array_equal(u.points.point("b", 0).image(), images[0]["b"])
        assert u.recovered == []
    with StorageUnit(tmp_path, readonly=True) as u:
        with pytest.raises(ReadOnlyUnitError):
            u.points.take(["a"])


def test_a_point_taken_but_never_recorded_is_dropped_and_older_points_keep_their_images(
        tmp_path):
    """The take's log record without its row (a kill between): opening
    expires it, giving its grains to the older point, which reads as before."""
    rng = np.random.default_rng(4)
    u = _unit(tmp_path)
    a = u.volume("a")
    img0 = a.read(0, a.capacity)
    u.points.take(["a"])
    _scribble(a, rng)
    from fastfc.copyservices.points import take_points
    take_points([a])        # logged by the chain, never recorded by the unit
    _scribble(a, rng, 20)
    u.close()
    with StorageUnit(tmp_path) as u:
        assert [p.seq for p in u.points.points("a")] == [0]
        assert np.array_equal(u.points.point("a", 0).image(), img0)


def test_bad_requests_are_refused_by_name(tmp_path):
    with _unit(tmp_path) as u:
        with pytest.raises(ValueError, match="at least one"):
            u.points.take([])
        with pytest.raises(ValueError, match="twice"):
            u.points.take(["a", "a"])
        with pytest.raises(KeyError, match="no volume"):
            u.points.take(["zz"])
        with pytest.raises(KeyError, match="no recovery point"):
            u.points.expire("a", 7)


def _fd_of(path) -> int:
    """This process's descriptor open on ``path``."""
    import os
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                return int(name)
        except OSError:
            pass
    raise AssertionError(f"{path} is not open")


def test_a_failed_log_write_refuses_the_write_and_every_later_one(tmp_path):
    """A log that cannot grow (a full disk, an I/O error) refuses the host
    write whole, and every later write to that volume until the unit is
    opened again: the point's table may hold grains its log does not name,
    and a later save into them would go unlogged. After the reopen every
    point reads its image at the take."""
    import os
    from fastfc.copyservices.points import PointChain, take_points
    u = _unit(tmp_path)
    a = u.volume("a")
    a.write(0, np.full(a.capacity, 1, np.uint8))
    u.points.take(["a"], name="before")
    image = a.read(0, a.capacity)
    chain = PointChain.chain_of(a)
    while chain.log_room > 1:            # (points the unit never recorded: dropped)
        take_points([a])
    log = (tmp_path / "points" / "a.log").resolve()
    fd = _fd_of(log)
    saved = os.dup(fd)
    ro = os.open(log, os.O_RDONLY)
    os.dup2(ro, fd)                      # the log cannot grow now (EBADF)
    try:
        with pytest.raises(OSError, match="cannot write the recovery points' log"):
            a.write(4096, np.full(12288, 2, np.uint8))
        assert np.array_equal(a.read(0, a.capacity), image)      # refused whole
        os.dup2(saved, fd)               # the log writable again: still refused
        with pytest.raises(OSError, match="refuses writes until its unit is opened again"):
            a.write(4096, np.full(4096, 3, np.uint8))
        assert np.array_equal(a.read(0, a.capacity), image)
        u.volume("b").write(0, b"other volumes take writes")
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(ro)
    u.close()
    with StorageUnit(tmp_path) as u:
        a = u.volume("a")
        (p,) = u.points.points("a")
        assert np.array_equal(p.image(), image)
        a.write(4096, np.full(8192, 4, np.uint8))        # writable again
        assert np.array_equal(p.image(), image)


def _points_files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((path / "points").iterdir())}


def test_a_read_only_open_loads_the_points_and_changes_nothing(tmp_path):
    rng = np.random.default_rng(5)
    u = _unit(tmp_path)
    images = {}
    for i in range(4):
        _scribble(u.volume("a"), rng)
        images[i] = u.volume("a").read(0, u.volume("a").capacity)
        u.points.take(["a"], name=f"p{i}", retain_for=3600 if i == 0 else 0)
    _scribble(u.volume("a"), rng, 10)
    u.points.expire("a", 2)
    from fastfc.copyservices.points import take_points
    take_points([u.volume("a")])        # logged, never recorded: dropped on opening
    u.close()
    before = _points_files(tmp_path)
    with StorageUnit(tmp_path, readonly=True) as u:
        assert [(p.seq, p.name) for p in u.points.points("a")] == [(0, "p0"), (1, "p1"),
                                                                  (3, "p3")]
        for p in u.points.points("a"):
            assert np.array_equal(p.image(), images[p.seq])
        assert u.points.points("a")[0].retain_until > u.points.points("a")[0].taken_at
        with pytest.raises(ReadOnlyUnitError):
            u.points.expire("a", 1)
    assert _points_files(tmp_path) == before
    with StorageUnit(tmp_path) as u:        # read-write: the same points
        assert [p.seq for p in u.points.points("a")] == [0, 1, 3]


def test_lspoint_opens_the_unit_read_only(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fastfc.tools.cli import main
    with _unit(tmp_path) as u:
        u.points.take(["a"], name="first")
    opened = []
    real = StorageUnit.__init__

    def init(self, *a, **kw):
        opened.append(kw.get("readonly", False))
        real(self, *a, **kw)
    monkeypatch.setattr(StorageUnit, "__init__", init)
    res = CliRunner().invoke(main, ["-u", str(tmp_path), "lspoint", "--json"])
    assert res.exit_code == 0, res.output
    assert '"a#0"' in res.output and '"first"' in res.output
    assert opened == [True]


def test_the_log_is_compacted_at_a_read_write_open(tmp_path, monkeypatch):
    """A log much longer than its chain needs is rewritten when the unit
    opens read-write (a new file synced, then renamed over it): the points,
    their seqs (with the gaps of expired ones) and images are the same, and
    the next point taken continues the seqs."""
    from fastfc.durable import points as dp
    monkeypatch.setattr(dp, "COMPACT_MIN_RECORDS", 32)
    rng = np.random.default_rng(6)
    u = _unit(tmp_path)
    a = u.volume("a")
    images = {}
    for i in range(12):
        _scribble(a, rng, 4)
        images[i] = a.read(0, a.capacity)
        u.points.take(["a"])
        if i >= 2:
            u.points.expire("a", i - 2)     # keep the newest two
    _scribble(a, rng, 4)
    live = [p.seq for p in u.points.points("a")]
    assert live == [10, 11]
    records = u.points.points("a")[0].chain.log_records
    u.close()
    (tmp_path / "points" / "a.log.new").write_bytes(b"left by a kill mid-compaction")
    size = (tmp_path / "points" / "a.log").stat().st_size
    with StorageUnit(tmp_path) as u:
        chain = u.points.points("a")[0].chain
        assert chain.log_records < records // 2
        assert [p.seq for p in u.points.points("a")] == live
        for p in u.points.points("a"):
            assert np.array_equal(p.image(), images[p.seq])
        assert not (tmp_path / "points" / "a.log.new").exists()
        assert (tmp_path / "points" / "a.log").stat().st_size <= size
        assert u.points.take(["a"])[0].seq == 12
        images[12] = u.volume("a").read(0, u.volume("a").capacity)
        _scribble(u.volume("a"), rng, 4)
    with StorageUnit(tmp_path) as u:
        assert [p.seq for p in u.points.points("a")] == live + [12]
        for p in u.points.points("a"):
            assert np.array_equal(p.image(), images[p.seq])


def test_a_compaction_that_fails_leaves_the_old_log(tmp_path, monkeypatch):
    from fastfc.durable import points as dp
    monkeypatch.setattr(dp, "COMPACT_MIN_RECORDS", 8)
    rng = np.random.default_rng(7)
    with _unit(tmp_path) as u:
        for i in range(6):
            _scribble(u.volume("a"), rng)
            u.points.take(["a"])
        for i in range(4):
            u.points.expire("a", i)
        image = u.points.point("a", 5).image()
    real = _core_point_log_bytes()

    def broken(recs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("fastfc._core.point_log_bytes", broken)
    with StorageUnit(tmp_path) as u:
        assert any("not compacted" in r for r in u.recovered)
        assert np.array_equal(u.points.point("a", 5).image(), image)
        u.points.take(["a"])                # the old log takes records still
    monkeypatch.setattr("fastfc._core.point_log_bytes", real)
    with StorageUnit(tmp_path) as u:
        assert [p.seq for p in u.points.points("a")] == [4, 5, 6]
        assert np.array_equal(u.points.point("a", 5).image(), image)


def _core_point_log_bytes():
    from fastfc import _core
    return _core.point_log_bytes


def test_a_log_of_the_first_format_is_rewritten_on_opening(tmp_path):
    """Units written before the log was mapped kept 24-byte records with
    no header: opening replays them and rewrites the log."""
    from fastfc import _core
    rng = np.random.default_rng(8)
    with _unit(tmp_path) as u:
        images = {}
        for i in range(3):
            _scribble(u.volume("a"), rng)
            images[i] = u.volume("a").read(0, u.volume("a").capacity)
            u.points.take(["a"])
        _scribble(u.volume("a"), rng)
    log = tmp_path / "points" / "a.log"
    words = np.frombuffer(log.read_bytes(), dtype=np.int64)
    recs = _core.point_log_records(words.copy())
    log.write_bytes(recs.astype(np.int64).tobytes())       # the first format
    with StorageUnit(tmp_path) as u:
        for p in u.points.points("a"):
            assert np.array_equal(p.image(), images[p.seq])
    assert int(np.frombuffer(log.read_bytes()[:8], np.int64)[0]) == _core.LOG_MAGIC


@pytest.mark.parametrize("durability", ["process", "power"])
def test_the_first_bad_record_ends_the_log_and_what_follows_is_zeroed(tmp_path, durability):
    """A record a cut tore (all zeros, or failing its check) ends the log:
    the records behind it are never read, and opening zeroes them before a
    new record follows, so none of them reads as valid behind it later."""
    from fastfc.copyservices.points import PointChain
    rng = np.random.default_rng(9)
    with _unit(tmp_path, durability) as u:
        u.points.take(["a"])
        _scribble(u.volume("a"), rng, 8)
        assert PointChain.chain_of(u.volume("a")).log_records > 4
    log = tmp_path / "points" / "a.log"
    words = np.frombuffer(log.read_bytes(), np.int64).copy()
    words[3 * 4 + 1] ^= 1                        # record 3 fails its check
    log.write_bytes(words.tobytes())
    with StorageUnit(tmp_path, durability=durability) as u:
        chain = PointChain.chain_of(u.volume("a"))
        assert chain.log_records == 2            # the take and one grain
        assert not np.frombuffer(log.read_bytes(), np.int64)[3 * 4:].any()
        u.points.take(["a"])
        assert chain.log_records == 3
    with StorageUnit(tmp_path, durability=durability) as u:
        assert [p.seq for p in u.points.points("a")] == [0, 1]


def test_points_taken_after_every_point_expired_survive_a_reopen(tmp_path):
    """When the last point expires the pool is emptied (its file cut back)
    and the next points save into its first slots again: replaying that
    log must not cut the file back (the later records name those slots)."""
    rng = np.random.default_rng(10)
    with _unit(tmp_path) as u:
        u.points.take(["a"])
        _scribble(u.volume("a"), rng, 6)
        u.points.expire("a", 0)
        image = u.volume("a").read(0, u.volume("a").capacity)
        u.points.take(["a"])
        _scribble(u.volume("a"), rng, 6)
        assert u.points.point("a", 1).saved_grains
    with StorageUnit(tmp_path) as u:
        assert np.array_equal(u.points.point("a", 1).image(), image)
