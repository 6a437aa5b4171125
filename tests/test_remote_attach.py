"""A new primary process continues a session over secondary units
(``fastfc.remote.attach``), on the in-process transport: the primary's
record in the A volumes' storage unit, both sides' records checked against
each other, and no initial copy (the first CG sends exactly the grains
where A and B differ). tests/test_remote_ray.py does it over Ray with the
primary a real process that is SIGKILLed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastfc
from fastfc import remote
from fastfc.copyservices import sitepair
from fastfc.remote import client, local
from fastfc.tools.testing import PromiseChecker, RandomWriters

TS = 4096
N = 32
GRAIN = TS


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    return tmpfs_tmp_path


@pytest.fixture(autouse=True)
def _clean_units():
    yield
    local.stop_all()


def start_units(tmp_path, n=2):
    return [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(n)]


def primary_session(tmp_path, units, n_trip=4):
    """A primary storage unit holding the A volumes, a session over ``units``."""
    p = fastfc.StorageUnit(tmp_path / "primary")
    trips = []
    for i in range(n_trip):
        u = units[i % len(units)]
        a = p.create_volume(f"a{i}", N, TS)
        a.write(0, np.full(TS * 2, i + 1, np.uint8))
        trips.append((a, u.create_volume(f"b{i}", N, TS), u.create_volume(f"c{i}", N, TS)))
    chk = PromiseChecker()
    gm = fastfc.GlobalMirror(trips, on_coordinate=chk.on_coordinate, cg_interval=0.25)
    chk.attach(gm)
    return p, trips, gm, chk


def die(p):
    """The primary process is gone: its unit let go as a crash would (the
    session object is never used again)."""
    local_pairs = [v.mirror for v in p.volumes()]
    p.abandon()
    return local_pairs


def differing_grains(p, units, n_trip):
    """Per triplet, the grains where A (in ``p``) and B differ now, read
    whole from both sides (the reference for what a resumed session sends)."""
    out = []
    for i in range(n_trip):
        a = p.volume(f"a{i}").read(0, N * TS).reshape(-1, GRAIN)
        b = units[i % len(units)].volume(f"b{i}").read(0, N * TS).reshape(-1, GRAIN)
        out.append(int((a != b).any(axis=1).sum()))
    return out


def test_a_new_primary_attaches_and_sends_only_what_differs(tmp_path):
    units = start_units(tmp_path)
    p, trips, gm, chk = primary_session(tmp_path, units)
    with RandomWriters([t[0] for t in trips], threads=2, seed=3, pace=20e6):
        for _ in range(3):
            assert gm.form_consistency_group().committed
            chk.check()
    assert gm.form_consistency_group().committed      # B == A now
    chk.check()
    committed = gm.stats.to_record()
    # writes after the last CG (some sent as Global Copy, some not), then
    # the primary dies
    trips[0][0].write(5 * TS, b"after")
    trips[1][0].write(9 * TS + 7, b"x" * (TS + 2))       # two grains
    gm.triplets[1].pair.drain()                           # sent to B already
    trips[2][0].write(0, trips[2][0].read(0, TS))         # the same data as before
    die(p)
    del gm, trips
    p = fastfc.StorageUnit(tmp_path / "primary")
    expect = differing_grains(p, units, 4)
    assert expect == [1, 0, 0, 0]     # the drained grains are on B; a same-data write is not
    chk2 = PromiseChecker()
    gm = remote.attach(p, "gm", on_coordinate=chk2.on_coordinate)
    chk2.attach(gm)
    assert gm.cg_interval == 0.25                     # the recorded settings
    assert gm.stats.sequence == committed["sequence"]
    assert gm.stats.successes == committed["successes"]
    assert [t.pair.oos.count() for t in gm.triplets] == expect
    res = gm.form_consistency_group()
    assert res.committed and res.sequence == committed["sequence"] + 1
    assert res.bytes_drained == sum(expect) * GRAIN      # no initial copy
    assert chk2.check() == res.sequence
    assert differing_grains(p, units, 4) == [0, 0, 0, 0]
    with RandomWriters([t.a for t in gm.triplets], threads=2, seed=4, pace=20e6):
        for _ in range(3):
            assert gm.form_consistency_group().committed
            chk2.check()
    # the record goes on: counters after every attempt
    assert p.store.site_sessions()["gm"]["stats"]["sequence"] == gm.stats.sequence
    gm.close()
    assert "gm" not in p.store.site_sessions()
    p.close()


class PrimaryDied(BaseException):
    """The primary process dies here (nothing after it runs)."""


def test_attach_after_the_primary_died_between_prepare_and_commit(tmp_path, monkeypatch):
    """Killed after the decision (commit) was recorded and before any unit
    committed: the new primary's first attempt reconciles by the record,
    every C on that CG; it then sends what differs, no initial copy."""
    units = start_units(tmp_path)
    p, trips, gm, chk = primary_session(tmp_path, units)
    assert gm.form_consistency_group().committed
    for a, _, _ in trips:
        a.write(3 * TS, b"cg two")
    real = local.LocalTransport.call

    def call(self, unit, method, *args):
        if method == "finish":
            raise PrimaryDied()
        return real(self, unit, method, *args)

    monkeypatch.setattr(local.LocalTransport, "call", call)
    with pytest.raises(PrimaryDied):
        gm.form_consistency_group()
    monkeypatch.setattr(local.LocalTransport, "call", real)
    images = chk.snapshots[2]
    trips[3][0].write(20 * TS, b"later")      # after the CG, never sent
    die(p)
    del gm, trips
    p = fastfc.StorageUnit(tmp_path / "primary")
    expect = differing_grains(p, units, 4)
    assert expect == [0, 0, 0, 1]
    gm = remote.attach(p, "gm")
    res = gm.form_consistency_group()       # reconciles first: CG 2 committed by the record
    assert res.committed and res.sequence == 3, res
    assert res.bytes_drained == GRAIN
    assert gm.stats.sequence == 3 and gm.c_sequences == [3] * 4
    # CG 2 stood on every C before CG 3: the images of CG 3 are CG 2's plus the later write
    for i, t in enumerate(gm.triplets):
        want = images[i].copy()
        if i == 3:
            want[20 * TS:20 * TS + 5] = np.frombuffer(b"later", np.uint8)
        assert np.array_equal(t.c.read(0, t.c.capacity), want)
    gm.close()
    p.close()


def test_attach_after_site_loss_recovery_makes_b_secondary_again(tmp_path):
    """Recovered over the units alone (B back to C's CG, host-writable, and
    written), then the primary returns and attaches: each B refuses host
    writes again and the first CG sends exactly what differs (A's writes
    after the CG, and B's own)."""
    units = start_units(tmp_path)
    p, trips, gm, chk = primary_session(tmp_path, units)
    assert gm.form_consistency_group().committed
    trips[0][0].write(0, b"sent, never in a CG")
    gm.triplets[0].pair.drain()
    trips[1][0].write(TS, b"never sent")
    die(p)
    del gm, trips
    assert remote.recover(units, "gm") == 1
    units[0].server.unit.volume("b2").write(7 * TS, b"written at the secondary")
    p = fastfc.StorageUnit(tmp_path / "primary")
    expect = differing_grains(p, units, 4)
    assert expect == [1, 1, 1, 0]
    # refused (the primary's record newer than the units): the units
    # change nothing, each B takes host writes still
    rec = p.store.site_sessions()["gm"]
    p.store.save_site_stats("gm", {**rec["stats"], "sequence": 9})
    with pytest.raises(fastfc.StateError, match="older than CG 9"):
        remote.attach(p, "gm")
    assert not units[0].server.unit.volume("b0").is_secondary
    assert not units[1].server.unit.volume("b1").is_secondary
    p.store.save_site_stats("gm", rec["stats"])
    gm = remote.attach(p, "gm")
    assert units[0].server.unit.volume("b0").is_secondary
    with pytest.raises(fastfc.FastFCError):
        units[0].server.unit.volume("b2").write(0, b"refused")
    res = gm.form_consistency_group()
    assert res.committed and res.bytes_drained == sum(expect) * GRAIN
    assert differing_grains(p, units, 4) == [0, 0, 0, 0]
    for t in gm.triplets:
        assert np.array_equal(t.c.read(0, t.c.capacity), t.a.read(0, t.a.capacity))
    gm.close()
    p.close()


def _nothing_changed(p):
    for v in p.volumes():
        assert v.mirror is None, v


def test_records_that_disagree_are_refused_and_nothing_changes(tmp_path):
    units = start_units(tmp_path)
    p, trips, gm, chk = primary_session(tmp_path, units)
    assert gm.form_consistency_group().committed
    assert gm.form_consistency_group().committed
    die(p)
    del gm, trips
    p = fastfc.StorageUnit(tmp_path / "primary")
    with pytest.raises(KeyError, match="no session 'other'"):
        remote.attach(p, "other")
    # a session of the recorded name, made anew over the same A unit: refused
    trips = [(p.volume(f"a{i}"), units[i % 2].volume(f"b{i}"), units[i % 2].volume(f"c{i}"))
             for i in range(4)]
    with pytest.raises(fastfc.StateError, match="resume it"):
        fastfc.GlobalMirror(trips)
    _nothing_changed(p)
    # other triplets than the recorded ones
    with pytest.raises(ValueError, match="recorded with triplets"):
        fastfc.GlobalMirror(trips[::-1], resume=True)
    _nothing_changed(p)
    # the primary's record says a newer CG than the units hold
    rec = p.store.site_sessions()["gm"]
    p.store.save_site_stats("gm", {**rec["stats"], "sequence": 7})
    with pytest.raises(fastfc.StateError, match="the records disagree"):
        remote.attach(p, "gm")
    _nothing_changed(p)
    p.store.save_site_stats("gm", rec["stats"])
    # a unit that serves the session with other pairs
    units[1].server.unit.remove_served_session("gm")
    units[1].server.unit.serve_session("gm", [("b3", "c3"), ("b1", "c1")])
    with pytest.raises(fastfc.StateError, match="the records disagree"):
        remote.attach(p, "gm")
    _nothing_changed(p)
    # a unit that does not serve it at all
    units[1].server.unit.remove_served_session("gm")
    with pytest.raises(fastfc.StateError, match="serves no session"):
        remote.attach(p, "gm")
    _nothing_changed(p)
    # a unit that is down
    units[1].kill()
    with pytest.raises(remote.UnitDownError):
        remote.attach(p, "gm")
    _nothing_changed(p)
    # resume without a record, or in memory
    with pytest.raises(ValueError, match="one unit"):
        fastfc.GlobalMirror([(fastfc.Volume(N, TS), units[0].volume("b0"),
                              units[0].volume("c0"))], resume=True)
    assert remote.forget_session(p, "gm") and not remote.forget_session(p, "gm")
    with pytest.raises(KeyError):
        remote.attach(p, "gm")
    p.close()


def test_a_session_records_itself_only_in_the_one_unit_of_its_a_volumes(tmp_path):
    """A volumes in memory, or in two units: nothing is recorded (and
    nothing can be resumed); in one unit: recorded there."""
    units = start_units(tmp_path)
    p, q = fastfc.StorageUnit(tmp_path / "p"), fastfc.StorageUnit(tmp_path / "q")
    vols = [fastfc.Volume(N, TS), p.create_volume("a1", N, TS), q.create_volume("a2", N, TS),
            p.create_volume("a3", N, TS), p.create_volume("a4", N, TS)]
    bc = [(units[0].create_volume(f"b{i}", N, TS), units[0].create_volume(f"c{i}", N, TS))
          for i in range(5)]
    for name, picks in [("mem", [0]), ("two", [1, 2])]:
        gm = fastfc.GlobalMirror([(vols[i], *bc[i]) for i in picks], name=name)
        assert gm.form_consistency_group().committed
        assert p.store.site_sessions() == {} and q.store.site_sessions() == {}
        gm.close()
    gm = fastfc.GlobalMirror([(vols[i], *bc[i]) for i in (3, 4)], name="one")
    assert list(p.store.site_sessions()) == ["one"] and q.store.site_sessions() == {}
    assert p.store.site_sessions()["one"]["triplets"] == [
        ["a3", ["local", "u0"], "b3", "c3"], ["a4", ["local", "u0"], "b4", "c4"]]
    gm.close()
    p.close()
    q.close()


def test_digests_compare_what_the_grains_hold(tmp_path):
    """The digests (each side's own) find exactly the grains that differ,
    in any chunking; a small ``DIGEST_GRAINS`` makes many calls."""
    from fastfc.storage.volume import grain_digests
    v = fastfc.Volume(N, TS)
    w = fastfc.Volume(N, TS)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, N * TS, dtype=np.uint8)
    v.write(0, data)
    w.write(0, data)
    w.write(5 * TS + TS - 1, b"\x00" if data[6 * TS - 1] else b"\x01")   # last byte of grain 5
    w.write(17 * TS, b"\xff" if data[17 * TS] != 255 else b"\x00")       # first byte of 17
    dv, dw = grain_digests(v), grain_digests(w)
    assert dv.shape == (N, 16)
    assert np.flatnonzero((dv != dw).any(axis=1)).tolist() == [5, 17]
    assert np.array_equal(grain_digests(v, 3, 9), dv[3:9])
    with pytest.raises(IndexError):
        grain_digests(v, 0, N + 1)


def test_local_units_are_found_by_name_and_stopped(tmp_path):
    """The in-process double's attach and stop, as the Ray unit's."""
    with pytest.raises(remote.UnitDownError):
        remote.LocalUnit.attach("nobody")
    u = remote.LocalUnit.start(tmp_path / "u", name="u")
    u.create_volume("v", 4, TS)
    u.site.apply([("v", np.array([0]), np.full((1, TS), 9, np.uint8))]).result()
    assert remote.LocalUnit.attach("u") is u
    u.stop()
    assert not u.up
    with pytest.raises(remote.UnitDownError):
        remote.LocalUnit.attach("u")
    with pytest.raises(remote.UnitDownError):
        u.volume("v")
    u = remote.LocalUnit.start(tmp_path / "u", name="u")     # closed cleanly: opens again
    assert bytes(u.volume("v").read(0, 2)) == b"\x09\x09"


def test_an_a_volume_a_record_names_is_not_removed_until_the_session_is_forgotten(tmp_path):
    """A crashed primary's unit, reopened, has no pair on its A volumes
    (the pairs lived in the dead process): only the session's record says
    that a new primary resumes from them, so removing one is refused, with
    the call that forgets the record, and nothing changes; also when the
    volume's file is missing."""
    units = start_units(tmp_path)
    p, trips, gm, chk = primary_session(tmp_path, units, n_trip=2)
    assert gm.form_consistency_group().committed
    die(p)
    p = fastfc.StorageUnit(tmp_path / "primary")
    assert p.volume("a0").mirror is None                  # nothing else holds it
    image = p.volume("a0").read(0, N * TS)
    with pytest.raises(fastfc.StateError,
                       match=r"A volume of session 'gm' over secondary units.*"
                             r"forget_session\(unit, 'gm'\)"):
        p.remove_volume("a0")
    assert np.array_equal(p.volume("a0").read(0, N * TS), image)
    p.close()
    # the command line lists the record and says how to resume it
    from click.testing import CliRunner
    from fastfc.tools.cli import main
    unit = ["--unit", str(tmp_path / "primary")]
    out = CliRunner().invoke(main, [*unit, "lsgmir", "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    [row] = json.loads(out.stdout)
    assert (row["session"], row["state"], row["triplets"], row["cg_sequence"]) == \
        ("gm", "over secondary units", 2, 1)
    out = CliRunner().invoke(main, [*unit, "showgmir", "gm"], catch_exceptions=False)
    assert out.exit_code == 1 and "fastfc.remote.attach(unit, 'gm')" in out.stderr
    (tmp_path / "primary" / "volumes" / "a1.vol").unlink()
    p = fastfc.StorageUnit(tmp_path / "primary")
    with pytest.raises(fastfc.StateError, match=r"session gm over secondary units"):
        p.remove_volume("a1")
    assert remote.forget_session(p, "gm")
    p.remove_volume("a0")
    p.remove_volume("a1")
    assert p.volumes() == []
    p.close()
