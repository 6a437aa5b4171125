"""Adversarial cases of the two-phase protocol
across units, the link, fencing and site-loss recovery, on the in-process
transport."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastfc
from fastfc.copyservices import sitemirror, sitepair
from fastfc.copyservices.globalmirror import GMState
from fastfc.tools.testing import PromiseChecker

# test_remote fails loudly under CI without Ray (skips elsewhere), and its
# autouse fixture crashes every in-process unit after each test here too
from test_remote import _clean_units  # noqa: E402,F401

from fastfc import remote  # noqa: E402
from fastfc.remote import local  # noqa: E402

TS = 4096
N = 16


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


def make_session(tmp_path, n_trip=4, n_units=2, **kw):
    units = [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(n_units)]
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


def test_a_unit_that_lost_its_commit_is_reconciled_not_stuck(tmp_path, monkeypatch):
    """A unit answered "commit" and then lost that transaction (its host
    crashed before the un-fsynced commit reached the disk): after it restarts
    its relationships are revertible with the CG's sequence again while the
    other unit committed. The session must reconcile (commit it) rather than
    fail every later CG on that unit's refusal."""
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    srv = units[1].server
    real = srv.finish

    def lost(session, sequence, decision):
        return "commit" if decision == "commit" else real(session, sequence, decision)
    monkeypatch.setattr(srv, "finish", lost)
    res = gm.form_consistency_group()
    assert res.committed
    units[1].kill()
    units[1] = remote.LocalUnit.start(tmp_path / "u1", name="u1")
    assert any(rev for _, rev, _ in units[1].site.status("gm")["fcs"])
    for a, _, _ in trips:
        a.write(TS, b"z" * 10)
    results = [gm.form_consistency_group() for _ in range(3)]
    assert results[-1].committed, results
    assert gm.state is not GMState.FATAL
    assert len(set(gm.c_sequences)) == 1
    chk.check()


# -- the seed's rule across units, every combination of unit states ----------
# A unit's state for CG n (the previous CG n-1 committed everywhere):
#   none      never prepared n (down during prepare)
#   prepared  revertible with n (also: a unit that lost its commit or revert
#             of n, which was not fsynced)
#   committed committed n (and recorded so)
#   reverted  reverted n (and recorded so)
STATES = ("none", "prepared", "committed", "reverted")


def _reachable(states, record):
    if "committed" in states and ("reverted" in states or "none" in states):
        return False            # one decision per sequence; commit needs every prepare
    if record == "commit" and "none" in states:
        return False            # a commit is recorded only after every prepare
    if "committed" in states and record == "revert":
        return False            # what commits was recorded "commit" first
    return True


def _expected(states, record):
    if "committed" in states:
        return "commit"
    if "reverted" in states or "none" in states:
        return "revert"
    return "commit" if record == "commit" else "revert"     # all prepared: the record


def _unit_in_state(path, name, state, record, first):
    u = remote.LocalUnit.start(path, name=name)
    srv = u.server
    for v in ("b0", "c0", "b1", "c1"):
        u.create_volume(v, 4, TS)
    srv.setup("gm", [("b0", "c0"), ("b1", "c1")])
    rows = lambda x: np.full((4, TS), x, np.uint8)          # noqa: E731
    offs = np.arange(4, dtype=np.int64) * TS
    srv.apply([("b0", offs, rows(1)), ("b1", offs, rows(1))])
    assert srv.prepare("gm", 1) == "prepared" and srv.finish("gm", 1, "commit") == "commit"
    srv.apply([("b0", offs, rows(2)), ("b1", offs, rows(2))])     # CG 2's data
    if state != "none":
        srv.prepare("gm", 2)
    if state in ("committed", "reverted"):
        srv.finish("gm", 2, "commit" if state == "committed" else "revert")
    if first and record is not None:
        srv.record_decision("gm", 2, record)
    u.kill()                                                   # a crash, then reopened
    return remote.LocalUnit.start(path, name=name)


@pytest.mark.parametrize("n_units", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_reconcile_sites_every_combination_of_unit_states(tmp_path, n_units):
    cases = 0
    for states in itertools.product(STATES, repeat=n_units):
        for record in (None, "commit", "revert"):
            if not _reachable(states, record):
                continue
            cases += 1
            local.stop_all()
            d = tmp_path / f"{cases}"
            units = [_unit_in_state(d / f"u{i}", f"u{i}", st, record, i == 0)
                     for i, st in enumerate(states)]
            sites = [u.site for u in units]
            want = _expected(states, record)
            action, n = sitemirror.reconcile_sites(sites, "gm")
            if "prepared" in states:
                assert (action, n) == (want, 2), (states, record, action)
            else:               # nothing in doubt: the newest CG every C carries
                assert (action, n) == ("nothing", 2 if want == "commit" else 1), (states, record)
            seq, fill = (2, 2) if want == "commit" else (1, 1)
            for u, st in zip(units, (s.status("gm") for s in sites)):
                assert [(rev, q) for _, rev, q in st["fcs"]] == [(False, seq)] * 2, (states, record)
                for c in ("c0", "c1"):
                    img = u.volume(c).read(0, 4 * TS)
                    assert (img == fill).all(), (states, record, u.name, c)
            # reconciling again does nothing more
            assert sitemirror.reconcile_sites(sites, "gm")[0] == "nothing"
            # site-loss recovery from here: every B back to its C, byte for byte
            assert sitemirror.recover_sites(sites, "gm") == seq
            for u in units:
                for b in ("b0", "b1"):
                    assert (u.volume(b).read(0, 4 * TS) == fill).all(), (states, record, b)
    assert cases >= (14 if n_units == 2 else 40)


# -- the link: host writes between gathering and landing ----------------------
def _writes_during_apply(units, trips, rng, log):
    """Every apply call first lets host writes hit the A volumes (after the
    call's tracks were gathered, before they land on B)."""
    def hook(where, i):
        if where != "apply" or i != 0:
            return
        for _ in range(rng.integers(1, 4)):
            a = trips[int(rng.integers(len(trips)))][0]
            t = int(rng.integers(N))
            k = int(rng.integers(1, 3))
            k = min(k, N - t)
            a.write(t * TS + int(rng.integers(TS // 2)),
                    rng.integers(0, 256, k * TS // 2, dtype=np.uint8))
            log.append((a.name, t))
    for u in units:
        u.server.kill_point = hook


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_writes_between_gather_and_send_never_land_stale(tmp_path, monkeypatch, seed):
    """Small batches, several calls per unit per CG (several in flight), host
    writes inside every send: each CG's C is A at its coordination instant,
    and once writes stop B and C converge to A exactly (a stale version
    landing after a newer one would stay on B)."""
    monkeypatch.setattr(sitepair, "BATCH_BYTES", 3 * TS)
    monkeypatch.setattr(sitepair, "HOLD_BYTES", 2 * TS)
    monkeypatch.setattr(sitemirror, "MAX_INFLIGHT_BYTES", 5 * TS)
    rng = np.random.default_rng(seed)
    units, trips, gm, chk = make_session(tmp_path, n_trip=4, n_units=2)
    assert gm.form_consistency_group().committed
    log: list = []
    _writes_during_apply(units, trips, rng, log)
    for i in range(12):
        for a, _, _ in trips:                      # owed tracks, to be gathered
            t = int(rng.integers(N - 4))
            a.write(t * TS, rng.integers(0, 256, 4 * TS, dtype=np.uint8))
        if i % 3 == 2:                             # Global Copy between CGs
            gm.groups[0].global_copy(2 * TS)
            gm.groups[1].global_copy(2 * TS)
        assert gm.form_consistency_group().committed
        chk.check()
    assert len(log) > 10
    for u in units:
        u.server.kill_point = None
    for _ in range(2):
        assert gm.form_consistency_group().committed
    chk.check()
    for a, b, c in trips:
        img = a.read(0, a.capacity)
        assert np.array_equal(b.read(0, b.capacity), img)
        assert np.array_equal(c.read(0, c.capacity), img)


# -- fencing: an orphan that still has the unit open --------------------------
def test_an_orphaned_server_writes_nothing_after_a_new_owner_opened_the_unit(tmp_path):
    """The old owner lost its host's lock view (a partition: the new owner
    on another host got the lock) but still has every file open. Every call
    it gets must refuse (FencedError) and change nothing."""
    from fastfc.durable import unit as unit_mod
    from fastfc.remote.server import FencedError, UnitServer
    old = UnitServer(tmp_path / "u")
    for v in ("b", "c", "x"):
        old.create_volume(v, 4, TS)
    old.setup("gm", [("b", "c")])
    offs = np.arange(4, dtype=np.int64) * TS
    old.apply([("b", offs, np.full((4, TS), 1, np.uint8))])
    old.prepare("gm", 1)
    # the partition: the old server keeps its files, the lock is taken over
    old.unit._unit_lock.release()
    with unit_mod._registry_lock:
        del unit_mod._open_units[str(old.path)]
    new = UnitServer(tmp_path / "u")
    assert new.epoch == old.epoch + 1
    before = {v: new.read(v, 0, 4 * TS).copy() for v in ("b", "c")}
    st = new.status("gm")
    calls = [("apply", ([("b", offs, np.full((4, TS), 9, np.uint8))],)),
             ("prepare", ("gm", 1)), ("finish", ("gm", 1, "commit")),
             ("finish", ("gm", 1, "revert")), ("record_decision", ("gm", 1, "commit")),
             ("restore_b", ("gm",)), ("setup", ("gm2", [("x", "b")])),
             ("create_volume", ("y", 4, TS)), ("read", ("b", 0, 4)), ("status", ("gm",)),
             ("info", ())]
    for method, args in calls:
        with pytest.raises(FencedError, match="replaced"):
            getattr(old, method)(*args)
    for v in ("b", "c"):
        assert np.array_equal(new.read(v, 0, 4 * TS), before[v])
    assert new.status("gm") == st
    assert new.finish("gm", 1, "commit") == "commit"
    new.close()


# -- site-loss recovery ---------------------------------------------------------
def _restart_all(tmp_path, n):
    local.stop_all()
    return [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in range(n)]


def test_recovery_after_the_primary_died_mid_drain_restores_b_to_c(tmp_path):
    """The primary is lost while a CG's tracks are half sent (B holds some
    newer tracks than C): every B must come back byte for byte as its C,
    the last committed CG."""
    units, trips, gm, chk = make_session(tmp_path, n_trip=4)
    rng = np.random.default_rng(5)
    for _ in range(3):
        for a, _, _ in trips:
            a.write(int(rng.integers(N)) * TS, rng.integers(0, 256, TS, dtype=np.uint8))
        assert gm.form_consistency_group().committed
    seq = chk.check()
    images = chk.snapshots[seq]
    for a, _, _ in trips:
        a.write(0, rng.integers(0, 256, N * TS, dtype=np.uint8))
    units[1].arm_kill("apply", 1)
    assert not gm.form_consistency_group().committed
    del gm, trips
    units = _restart_all(tmp_path, 2)
    assert remote.recover(units, "gm") == seq
    for i in range(4):
        u = units[i % 2]
        b, c = u.volume(f"b{i}"), u.volume(f"c{i}")
        assert np.array_equal(b.read(0, b.capacity), images[i])
        assert np.array_equal(c.read(0, c.capacity), images[i])


def test_recovery_twice_keeps_the_host_writes_made_after_the_first(tmp_path):
    """recover() is the failover step; a second call (a retry, an operator
    running it again) must not throw away what hosts wrote to B since."""
    units, trips, gm, chk = make_session(tmp_path, n_trip=2)
    assert gm.form_consistency_group().committed
    seq = chk.check()
    del gm, trips
    units = _restart_all(tmp_path, 2)
    assert remote.recover(units, "gm") == seq
    b = units[0].server.unit.volume("b0")
    b.write(0, b"acknowledged")
    try:
        remote.recover(units, "gm")
    except fastfc.FastFCError:
        pass                    # refusing is fine; losing the write is not
    assert bytes(units[0].volume("b0").read(0, 12)) == b"acknowledged"


def test_recovery_when_the_unit_holding_the_decision_is_lost(tmp_path):
    """The decision lives on the first unit. If that unit is lost with the
    primary, recovery over the others still ends them on one CG; if the lost
    unit comes back having committed what the others reverted, recovery
    refuses rather than restore from mixed CGs."""
    units, trips, gm, chk = make_session(tmp_path, n_trip=6, n_units=3)
    assert gm.form_consistency_group().committed
    seq = chk.check()
    for a, _, _ in trips:
        a.write(0, b"new")
    units[1].arm_kill("finish", 0)        # u0 committed (and holds the record), u1 died
    res = gm.form_consistency_group()
    assert res.committed and gm.state is GMState.FATAL
    del gm, trips
    local.stop_all()
    rest = [remote.LocalUnit.start(tmp_path / f"u{i}", name=f"u{i}") for i in (1, 2)]
    # u2 committed too (finish ran on it after u1 died): the rule commits u1
    assert remote.recover(rest, "gm") == res.sequence
    for u in rest:
        assert [q for _, rev, q in u.site.status("gm")["fcs"]] == [res.sequence] * 2
    assert seq < res.sequence


# -- the in-process transport behaves as an actor: one call at a time ----------
def test_local_unit_runs_one_call_at_a_time(tmp_path):
    """A Ray actor runs its calls one by one; the in-process double must
    too (a reader thread's call waits while the session's apply runs)."""
    import threading
    units, trips, gm, chk = make_session(tmp_path, n_trip=2, n_units=1)
    c = trips[0][2]
    state = {}

    def hook(where, i):
        if where == "apply" and "thread" not in state:
            th = state["thread"] = threading.Thread(target=lambda: state.setdefault(
                "read", c.read(0, 4)))
            th.start()
            th.join(0.2)
            state["overlapped"] = "read" in state
    units[0].server.kill_point = hook
    assert gm.form_consistency_group().committed
    state["thread"].join(5)
    assert "read" in state and state["overlapped"] is False


# -- sequences across a primary restart ------------------------------------------
@pytest.mark.parametrize("where", ["prepare", "finish"])
def test_a_new_session_process_reuses_no_settled_sequence_wrongly(tmp_path, where):
    """The primary restarts (a new session object over the same units, new
    A volumes copied in full) after a CG was reverted (prepare killed) or
    half committed (finish killed on the second unit). The new session
    settles it by the rule, never acts twice on a sequence a unit settled,
    and its first attempt commits (it uses no sequence a unit settled)."""
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    units[1].arm_kill(where, 0)
    res = gm.form_consistency_group()
    assert res.committed is (where == "finish")
    gm.close()
    units[1] = remote.LocalUnit.start(tmp_path / "u1", name="u1")
    trips2 = []
    for i, (_, b, c) in enumerate(trips):
        a = fastfc.Volume(N, TS, name=f"a{i}x")
        a.write(0, np.full(N * TS, 50 + i, np.uint8))
        trips2.append((a, b, c))
    chk2 = PromiseChecker()
    gm2 = fastfc.GlobalMirror(trips2, on_coordinate=chk2.on_coordinate)
    chk2.attach(gm2)
    assert len(set(gm2.c_sequences)) == 1 or where == "finish"
    results = [gm2.form_consistency_group() for _ in range(2)]
    assert results[-1].committed, results
    assert all(r.committed for r in results), results     # no sequence reused
    assert chk2.check() == results[-1].sequence > res.sequence
    assert len(set(gm2.c_sequences)) == 1


def test_remote_session_matches_the_local_one_on_the_same_writes(tmp_path, monkeypatch):
    """The same write sequence through a local session (B, C in this
    process) and a session over two units: after every CG the B and C
    images and sequences are the same."""
    monkeypatch.setattr(sitepair, "BATCH_BYTES", 3 * TS)
    units, trips, gm, _ = make_session(tmp_path, n_trip=4, n_units=2)
    loc = []
    for i, (a, _, _) in enumerate(trips):
        a2 = fastfc.Volume(N, TS, name=f"la{i}")
        a2.write(0, a.read(0, a.capacity))
        loc.append((a2, fastfc.Volume(N, TS, name=f"lb{i}"), fastfc.Volume(N, TS, name=f"lc{i}")))
    gl = fastfc.GlobalMirror(loc)
    rng = np.random.default_rng(9)
    for _ in range(8):
        for (a, _, _), (a2, _, _) in zip(trips, loc):
            for _ in range(3):
                off = int(rng.integers(N * TS - 3 * TS))
                data = rng.integers(0, 256, int(rng.integers(1, 3 * TS)), dtype=np.uint8)
                a.write(off, data)
                a2.write(off, data)
        r1, r2 = gm.form_consistency_group(), gl.form_consistency_group()
        assert r1.committed and r2.committed and r1.sequence == r2.sequence
        for (_, b, c), (_, b2, c2) in zip(trips, loc):
            assert np.array_equal(c.read(0, c.capacity), c2.read(0, c2.capacity))
            assert np.array_equal(b.read(0, b.capacity), b2.read(0, b2.capacity))
        assert gm.c_sequences == gl.c_sequences
    gl.close()


def test_two_servers_that_read_the_same_epoch_still_fence(tmp_path, monkeypatch):
    """Two hosts that do not share the OS lock open the unit at once and
    both read epoch 0: the one whose epoch file was replaced must refuse."""
    from fastfc.durable import unit as unit_mod
    from fastfc.remote import server as server_mod
    monkeypatch.setattr(server_mod, "_read_epoch", lambda path: 0)
    old = server_mod.UnitServer(tmp_path / "u")
    old.unit._unit_lock.release()
    with unit_mod._registry_lock:
        del unit_mod._open_units[str(old.path)]
    new = server_mod.UnitServer(tmp_path / "u")
    assert new.epoch == old.epoch == 1
    with pytest.raises(server_mod.FencedError):
        old.create_volume("v", 4, TS)
    assert new.create_volume("v", 4, TS) == ("v", 4, TS, min(TS, 4096))
    new.close()


@pytest.mark.parametrize("at", ["membership", "flags"])
def test_a_unit_killed_inside_setup_can_be_set_up_again(tmp_path, monkeypatch, at):
    """A crash inside ``setup`` (writing the session's membership, or later
    inside its transaction) must leave a unit on which the session can be
    set up when it is started again (not volumes "in use" by a session it
    never recorded)."""
    from fastfc.remote import server as server_mod
    units = [remote.LocalUnit.start(tmp_path / "u0", name="u0")]
    a = fastfc.Volume(N, TS, name="a")
    b, c = units[0].create_volume("b", N, TS), units[0].create_volume("c", N, TS)
    store = units[0].server.unit.store
    real_add, real_flags = store.add_served_session, store.set_volume_flags

    def add(name, pairs):
        if at == "membership":
            raise server_mod.KilledHere("setup")
        real_add(name, pairs)

    def flags(rec):
        real_flags(rec)
        if at == "flags":
            raise server_mod.KilledHere("setup")
    monkeypatch.setattr(store, "add_served_session", add)
    monkeypatch.setattr(store, "set_volume_flags", flags)
    with pytest.raises(fastfc.FastFCError):
        fastfc.GlobalMirror([(a, b, c)])
    assert not units[0].up
    assert a._mirror is None
    remote.LocalUnit.start(tmp_path / "u0", name="u0")
    gm = fastfc.GlobalMirror([(a, b, c)])
    assert gm.form_consistency_group().committed
    assert gm.c_sequences == [1]


@pytest.mark.parametrize("before", [True, False])
def test_the_decision_holder_killed_while_recording(tmp_path, monkeypatch, before):
    """The first unit dies while recording the decision, before or after the
    record reached its store (the answer lost either way): the session
    reverts; once the unit is back, reconciling ends every C on the previous
    CG even with a "commit" record on it."""
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    seq = chk.check()
    from fastfc.remote.server import KilledHere
    srv = units[0].server
    real = srv.record_decision

    def record(session, sequence, decision):
        if not before:
            real(session, sequence, decision)
        raise KilledHere("record")
    monkeypatch.setattr(srv, "record_decision", record)
    for a, _, _ in trips:
        a.write(0, b"new")
    res = gm.form_consistency_group()
    assert not res.committed
    units[0] = remote.LocalUnit.start(tmp_path / "u0", name="u0")
    st = units[0].site.status("gm")
    assert st["decisions"].get(res.sequence) == (None if before else "commit")
    assert gm.clear_fatal() == "idle"
    assert chk.check() == seq
    assert gm.c_sequences == [seq] * 4
    assert gm.form_consistency_group().committed
    chk.check()
