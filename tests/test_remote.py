"""Secondary units behind calls, on the in-process transport: the same
server and session code as over Ray, without Ray (nor its start-up).

Every test that forms CGs checks the promise (tests/reference-style
snapshots taken at each coordination instant by PromiseChecker) after
every attempt, and after reconciling units that were killed mid-call.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastfc
from fastfc.copyservices import sitemirror, sitepair
from fastfc.copyservices.globalmirror import Cause, GMState
from fastfc.tools.testing import PromiseChecker, RandomWriters

# the in-process transport needs no Ray (tests/test_remote_ray.py runs the real one)
from fastfc import remote  # noqa: E402
from fastfc.remote import local  # noqa: E402
from fastfc.remote.server import EPOCH_FILE  # noqa: E402

TS = 4096
N = 32


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


@pytest.fixture(autouse=True)
def _clean_units():
    yield
    local.stop_all()


def make_units(tmp_path, n=2):
    return [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(n)]


# Host writes paced (bytes/s): every CG still takes writes mid-drain and
# mid-prepare, while an unpaced pair of writers made each attempt drain
# seconds of backlog on a loaded 2-core machine (a minute per kill test).
PACE = 50e6


def make_session(tmp_path, n_trip=4, n_units=2, **kw):
    units = make_units(tmp_path, n_units)
    trips = []
    for i in range(n_trip):
        u = units[i % n_units]
        a = fastfc.Volume(N, TS, name=f"a{i}")
        a.write(0, np.full(TS * 2, i + 1, np.uint8))
        trips.append((a, u.create_volume(f"b{i}", N, TS), u.create_volume(f"c{i}", N, TS)))
    chk = PromiseChecker()
    gm = fastfc.GlobalMirror(trips, on_coordinate=chk.on_coordinate, **kw)
    chk.attach(gm)
    return units, trips, gm, chk


def restart(tmp_path, units, i):
    units[i] = remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}")
    return units[i]


def test_import_fastfc_does_not_import_ray():
    code = "import sys, fastfc; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


# A meta-path finder that makes ``ray`` unimportable, as on a machine
# without the remote extra.
NO_RAY = """
import sys

class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoRay())
"""


def test_the_in_process_double_runs_without_ray(tmp_path):
    """With ``ray`` unimportable: ``from fastfc import remote`` works, a
    session over LocalUnits forms CGs and survives a unit killed mid-finish,
    site-loss recovery works, and only SecondaryUnit asks for Ray (a clear
    MissingDependencyError naming the extra)."""
    code = NO_RAY + f"""
import numpy as np
import fastfc
from fastfc import remote
from fastfc.tools.testing import PromiseChecker
path = {str(tmp_path)!r}
units = [remote.LocalUnit.start(f"{{path}}/u{{i}}", name=f"u{{i}}") for i in range(2)]
trips = []
for i in range(4):
    u = units[i % 2]
    a = fastfc.Volume(8, 4096, name=f"a{{i}}")
    a.write(0, np.full(4096, i + 1, np.uint8))
    trips.append((a, u.create_volume(f"b{{i}}", 8, 4096), u.create_volume(f"c{{i}}", 8, 4096)))
chk = PromiseChecker()
gm = fastfc.GlobalMirror(trips, on_coordinate=chk.on_coordinate)
chk.attach(gm)
for _ in range(3):
    assert gm.form_consistency_group().committed
    chk.check()
units[1].arm_kill("finish", 1)
res = gm.form_consistency_group()
assert res.committed and not units[1].up
units[1] = remote.LocalUnit.start(f"{{path}}/u1", name="u1")
gm.clear_fatal()
assert chk.check() == res.sequence
assert remote.recover(units, "gm") == res.sequence
assert "ray" not in sys.modules
try:
    remote.SecondaryUnit
except fastfc.MissingDependencyError as e:
    assert "fastfc[remote]" in str(e), e
else:
    raise AssertionError("SecondaryUnit without ray")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_remote_volume_proxy(tmp_path):
    (u,) = make_units(tmp_path, 1)
    v = u.create_volume("v", 8, TS)
    assert (v.name, v.n_tracks, v.track_size, v.capacity) == ("v", 8, TS, 8 * TS)
    w = pickle.loads(pickle.dumps(v))
    assert np.array_equal(w.read(0, 10), np.zeros(10, np.uint8))
    u.kill()
    with pytest.raises(remote.UnitDownError, match="down"):
        w.read(0, 10)
    remote.LocalUnit.start(tmp_path / "u0", name="u0")
    assert w.read(5, 3).shape == (3,)          # the same proxy, the new server
    with pytest.raises(ValueError, match="already exists"):
        u.create_volume("v", 8, TS)
    with pytest.raises(IndexError):
        w.read(8 * TS - 1, 2)


def test_session_is_a_site_session_and_keeps_the_promise(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    # one GlobalMirror class: the B and C volumes are reached through one
    # SiteGroup (a secondary through calls) per unit
    assert type(gm) is fastfc.GlobalMirror
    assert len(gm.groups) == 2 and all(isinstance(g, sitemirror.SiteGroup) for g in gm.groups)
    with RandomWriters([t[0] for t in trips], threads=2, seed=3, pace=PACE):
        for _ in range(15):
            res = gm.form_consistency_group()
            assert res.committed, res
            chk.check()
    res = gm.form_consistency_group()
    assert res.committed
    assert chk.check() == res.sequence == gm.stats.sequence
    assert gm.c_sequences == [res.sequence] * 4
    assert gm.state is GMState.IDLE


@pytest.mark.parametrize("unit, where, i", [
    (0, "apply", 1), (1, "apply", 1), (0, "prepare", 0), (1, "prepare", 1),
    (0, "finish", 0), (1, "finish", 0), (1, "finish", 1)])
def test_unit_killed_mid_call(tmp_path, unit, where, i):
    units, trips, gm, chk = make_session(tmp_path, n_trip=6)
    with RandomWriters([t[0] for t in trips], threads=2, seed=unit):
        for _ in range(3):
            assert gm.form_consistency_group().committed
            chk.check()
        for a, _, _ in trips:      # two runs per pair: a batch of several updates
            a.write(0, b'x')
            a.write(N // 2 * TS, b'y')
        units[unit].arm_kill(where, i)
        res = gm.form_consistency_group()      # never raises
        assert not units[unit].up
        assert res.cause is not None and "u%d" % unit in res.detail
        if where == "apply":
            assert res.cause is Cause.LINK_DOWN and not res.committed
        elif where == "prepare":
            assert res.cause is Cause.PREPARE_FAILED and not res.committed
        else:
            # between commits: decided commit; the dead unit commits later
            assert res.cause is Cause.COMMIT_FAILED and res.committed
            assert gm.state is GMState.FATAL
        down = gm.form_consistency_group()     # the unit is still down
        assert not down.committed and down.cause is not None
        restart(tmp_path, units, unit)
        gm.clear_fatal()
        assert gm.state is GMState.IDLE
        assert chk.check() == gm.stats.sequence
        for _ in range(3):
            assert gm.form_consistency_group().committed
            chk.check()


def test_decision_recorded_before_any_commit(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    units[0].arm_kill("finish", 0)     # the first unit: the journal, and first to commit
    res = gm.form_consistency_group()
    restart(tmp_path, units, 0)
    st = units[0].site.status("gm")
    assert st["decisions"][res.sequence] == "commit"
    assert res.sequence not in st["settled"]           # it died before committing
    assert any(rev for _, rev, _ in st["fcs"])         # in doubt on that unit
    # the other unit committed: the rule commits the rest
    assert gm.clear_fatal() == "idle"
    assert chk.check() == res.sequence


def test_reopened_unit_does_not_settle_alone(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    units[1].arm_kill("finish", 0)
    res = gm.form_consistency_group()
    restart(tmp_path, units, 1)
    # reopened: its relationships are still revertible with the CG's sequence
    fcs = units[1].site.status("gm")["fcs"]
    assert all(rev and seq == res.sequence for _, rev, seq in fcs)
    # the next attempt is refused while FATAL; clear_fatal reconciles by the rule
    assert gm.form_consistency_group().cause is Cause.FATAL
    gm.clear_fatal()
    assert chk.check() == res.sequence


def test_calls_are_idempotent_by_sequence(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    srv = units[0].server
    seq = gm._next_sequence
    assert srv.prepare("gm", seq) == "prepared"
    assert srv.prepare("gm", seq) == "prepared"          # again: nothing more
    assert srv.finish("gm", seq, "revert") == "revert"
    assert srv.finish("gm", seq, "revert") == "revert"
    assert srv.finish("gm", seq, "commit") == "revert"   # settled: says how
    with pytest.raises(fastfc.StateError, match="settled"):
        srv.prepare("gm", seq)                           # a late duplicate
    assert [s for _, _, s in srv.status("gm")["fcs"]] == [1, 1]
    with pytest.raises(ValueError, match="decision"):
        srv.finish("gm", seq + 1, "maybe")


def test_fencing(tmp_path):
    (u,) = make_units(tmp_path, 1)
    e1 = u.info()["epoch"]
    with pytest.raises(fastfc.UnitBusyError):            # the OS lock: one owner
        remote.UnitServer(tmp_path / "u0")
    # a replacement took over (its epoch on disk): the old server refuses all
    (tmp_path / "u0" / EPOCH_FILE).write_text(str(e1 + 1))
    with pytest.raises(remote.FencedError, match="replaced"):
        u.create_volume("x", 4, TS)
    u.kill()
    u = remote.LocalUnit.start(tmp_path / "u0", name="u0")
    assert u.info()["epoch"] == e1 + 2


def test_site_loss_recovery(tmp_path):
    units, trips, gm, chk = make_session(tmp_path, n_trip=6)
    with RandomWriters([t[0] for t in trips], threads=2, seed=7, pace=PACE):
        for _ in range(4):
            assert gm.form_consistency_group().committed
            chk.check()
        units[1].arm_kill("finish", 1)        # mid-commit on the second unit
        last = gm.form_consistency_group()
    assert last.committed
    images = chk.snapshots[last.sequence]
    # the primary site is lost for good: no session object, no A volumes
    del gm, trips
    local.stop_all()
    units = [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(2)]
    assert remote.recover(units, "gm") == last.sequence
    for i in range(6):
        u = units[i % 2]
        b, c = u.volume(f"b{i}"), u.volume(f"c{i}")
        assert np.array_equal(b.read(0, b.capacity), images[i])
        assert np.array_equal(c.read(0, c.capacity), images[i])
        # B takes host writes now (failover)
        u.server.unit.volume(f"b{i}").write(0, b"x")


def test_site_loss_recovery_reverts_an_undecided_cg(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    seq = chk.check()
    images = chk.snapshots[seq]
    units[1].arm_kill("prepare", 1)
    assert not gm.form_consistency_group().committed
    local.stop_all()
    units = [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(2)]
    assert remote.recover(units, "gm") == seq
    for i in range(4):
        b = units[i % 2].volume(f"b{i}")
        assert np.array_equal(b.read(0, b.capacity), images[i])


def test_drain_sends_outside_a_lock_and_collisions_keep_the_cg(tmp_path, monkeypatch):
    """A host write to a CG track not yet gathered, made while a batch is on
    its way (so A's lock is free), must not reach B before the CG version."""
    monkeypatch.setattr(sitepair, "BATCH_BYTES", 2 * TS)   # 2 tracks per call
    units, trips, gm, chk = make_session(tmp_path, n_trip=2, n_units=1)
    assert gm.form_consistency_group().committed
    a = trips[0][0]
    a.write(0, np.full(N * TS, 7, np.uint8))                 # every track owed
    seen = []

    def during_apply(where, i):
        if where == "apply" and not seen:
            got = []

            def try_lock():
                ok = a._lock(0.5)
                got.append(ok)
                if ok:
                    a._unlock()

            th = threading.Thread(target=try_lock)
            th.start()
            th.join()
            assert got == [True], "A's lock was held while sending"
            a.write((N - 1) * TS, np.full(TS, 9, np.uint8))   # a collision
            seen.append(True)

    units[0].server.kill_point = during_apply
    res = gm.form_consistency_group()
    assert res.committed and seen
    chk.check()        # C has 7 on the last track: the CG version
    assert trips[0][2].read((N - 1) * TS, 1)[0] == 7
    assert gm.form_consistency_group().committed
    assert trips[0][2].read((N - 1) * TS, 1)[0] == 9
    chk.check()


def test_refusals_change_nothing(tmp_path):
    units = make_units(tmp_path, 2)
    a = fastfc.Volume(N, TS)
    b0, c1 = units[0].create_volume("b", N, TS), units[1].create_volume("c", N, TS)
    with pytest.raises(ValueError, match="one unit"):
        fastfc.GlobalMirror([(a, b0, c1)])
    c0 = units[0].create_volume("c", N, TS)
    with pytest.raises(ValueError, match="link"):
        fastfc.GlobalMirror([(a, b0, c0)], link=fastfc.LocalLink())
    with pytest.raises(ValueError, match="geometry"):
        fastfc.GlobalMirror([(fastfc.Volume(N + 1, TS), b0, c0)])
    assert a._mirror is None
    with pytest.raises(TypeError, match="local Volume"):
        fastfc.GlobalMirror([(b0, c0, a)])
    gm = fastfc.GlobalMirror([(a, b0, c0)])
    assert gm.form_consistency_group().committed
    with pytest.raises(fastfc.LimitError):          # a is in a session already
        fastfc.GlobalMirror([(a, units[1].create_volume("b2", N, TS), c1)], name="other")
    with pytest.raises(ValueError, match="other volumes"):
        fastfc.GlobalMirror([(fastfc.Volume(N, TS), b0, units[0].create_volume("c9", N, TS))])


def test_continuous_loop_with_a_unit_killed_and_restarted(tmp_path):
    import time
    units, trips, gm, chk = make_session(tmp_path, cg_interval=0.01)
    gm.on_result = lambda res: None
    with RandomWriters([t[0] for t in trips], threads=2, seed=9, pace=PACE):
        gm.start()
        end = time.monotonic() + 30           # a CG committed before the kill
        while not gm.stats.successes and time.monotonic() < end:
            time.sleep(0.01)
        time.sleep(0.05)
        units[1].kill()                       # the loop keeps going: failures, no raise
        end = time.monotonic() + 10

        def failed() -> bool:                 # a failed attempt, or (a kill inside a
            st = gm.stats                     # commit) FATAL, resolved, until clear_fatal
            return bool(sum(st.failures.values())) or (
                gm.state is GMState.FATAL and st.commit_failures_resolved > 0)

        while not failed() and time.monotonic() < end:
            time.sleep(0.01)
        assert gm.state in (GMState.RUNNING, GMState.FATAL)
        assert failed()
        restart(tmp_path, units, 1)
        gm.clear_fatal()
        before = gm.stats.successes
        end = time.monotonic() + 10
        while gm.stats.successes == before and time.monotonic() < end:
            time.sleep(0.01)                  # the loop forms CGs again by itself
        gm.stop()
        assert gm.stats.successes > before
    gm.clear_fatal()
    assert gm.state is GMState.IDLE
    ok = gm.stats.successes
    assert gm.form_consistency_group().committed
    chk.check()
    assert ok >= 2 and gm.stats.successes == ok + 1


def test_write_batch_with_pprc_origin_reaches_a_secondary():
    from fastfc import _core
    v = fastfc.Volume(8, TS)
    v._secondary = True
    rows = np.full((2, TS), 5, np.uint8)
    offs = np.array([0, 3 * TS], np.int64)
    with pytest.raises(fastfc.WriteInhibitedError):
        v.write_batch(offs, rows)                    # host writes refused
    assert not v.read(0, 8 * TS).any()
    v.write_batch(offs, rows, _core.PPRC)
    assert v.read(3 * TS, TS).min() == 5 and not v.read(TS, TS).any()
    with pytest.raises(ValueError, match="origin"):
        v.write_batch(offs, rows, 7)


def test_an_unexpected_error_on_a_unit_fails_the_attempt(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    trips[0][0].write(0, b"z")

    def broken(where, i):
        if where == "apply":
            raise KeyError("no such volume")

    units[0].server.kill_point = broken
    res = gm.form_consistency_group()          # a KeyError on the unit: no raise here
    assert not res.committed and res.cause is Cause.DRAIN_ERROR and "KeyError" in res.detail
    units[0].server.kill_point = None
    assert gm.form_consistency_group().committed
    chk.check()


def test_reconcile_follows_a_unit_that_reverted_over_a_stale_commit_record(tmp_path):
    """The decision record reached the first unit but its answer did not:
    the session reverted the others. Reconciling must revert the rest."""
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    seq = chk.check()
    s0, s1 = units[0].server, units[1].server
    n = seq + 1
    assert s0.prepare("gm", n) == s1.prepare("gm", n) == "prepared"
    s0.record_decision("gm", n, "commit")
    assert s1.finish("gm", n, "revert") == "revert"
    assert sitemirror.reconcile_sites([u.site for u in units], "gm") == ("revert", n)
    assert gm.c_sequences == [seq] * 4
    chk.check()


@pytest.mark.slow
def test_random_kills_never_break_the_promise(tmp_path):
    """Units crashed inside random calls, 30 attempts: the promise after each."""
    import random
    rng = random.Random(12)
    units, trips, gm, chk = make_session(tmp_path, n_trip=6)
    kills = 0
    with RandomWriters([t[0] for t in trips], threads=2, seed=4, pace=PACE):
        for _ in range(30):
            if rng.random() < 0.6:
                k = rng.randrange(2)
                units[k].arm_kill(rng.choice(["apply", "prepare", "finish"]), rng.randrange(3))
            gm.form_consistency_group()                 # never raises
            for k in range(2):
                if not units[k].up:
                    kills += 1
                    restart(tmp_path, units, k)
                units[k]._armed = None
            gm.clear_fatal()
            assert gm.state is GMState.IDLE
            chk.check()
    assert kills >= 5


def test_kill_points_are_the_shared_steps_fault_points_and_leave_none_armed(tmp_path):
    """The FlashCopy phase runs in the shared step (FlashCopyGroup); a kill
    point is reached before each relationship's prepare and commit, in
    order, and nothing stays armed after the call."""
    from fastfc import faults
    units, trips, gm, chk = make_session(tmp_path, n_trip=6)
    seen = []
    units[0].server.kill_point = lambda where, i: seen.append((where, i))
    units[0].server.kill_armed = None          # always (LocalUnit's: while one is armed)
    assert gm.form_consistency_group().committed
    assert [s for s in seen if s[0] != "apply"] == [
        ("prepare", 0), ("prepare", 1), ("prepare", 2), ("finish", 0), ("finish", 1),
        ("finish", 2)]
    assert faults.armed() == []
    f1, f2 = faults.inject("prepare"), faults.inject("prepare")
    faults.disarm(f1)
    assert len(faults.armed()) == 1 and faults.armed()[0] is f2
    faults.disarm(f1)                       # not armed: nothing happens
    faults.disarm(f2)
    assert faults.armed() == []


def test_a_unit_that_kept_its_sessions_in_a_file_serves_on(tmp_path):
    """A unit written by an earlier fastfc (the session's membership in a
    JSON file beside unit.db) is opened by the server with its session:
    the session forms CGs on it, and its CG records are kept."""
    import json
    import sqlite3
    units, trips, gm, chk = make_session(tmp_path)
    for _ in range(2):
        assert gm.form_consistency_group().committed
    settled = units[0].site.status("gm")["settled"]
    for i, u in enumerate(units):
        members = u.server.unit.served_sessions()
        u.kill()
        db = sqlite3.connect(tmp_path / f"u{i}" / "unit.db")
        db.execute("DROP TABLE served_sessions")
        db.commit()
        db.close()
        (tmp_path / f"u{i}" / "remote.sessions.json").write_text(
            json.dumps({k: [list(p) for p in v] for k, v in members.items()}))
        restart(tmp_path, units, i)
        assert not (tmp_path / f"u{i}" / "remote.sessions.json").exists()
    assert units[0].site.status("gm")["settled"] == settled
    for _ in range(2):
        assert gm.form_consistency_group().committed
        chk.check()
