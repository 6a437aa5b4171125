"""The FlashCopy phase over units reached by calls, in as few round trips as
the protocol allows: each unit's prepare is sent right behind its last drain
batch (no round trip of its own), then the decision is recorded and every
unit finishes. On the in-process transport: the calls' order, and the new
call boundary (between the last batch and the prepare behind it) cut every
way, the promise checked after each attempt."""

from __future__ import annotations

import numpy as np
import pytest

import fastfc
from fastfc.copyservices.globalmirror import Cause, GMState
from fastfc.storage.site import Pending
from fastfc.tools.testing import RandomWriters

# test_remote's autouse fixture crashes every in-process unit after each test here too
from test_remote import PACE, TS, N, _clean_units, make_session, restart  # noqa: F401

from fastfc.remote import local  # noqa: E402


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    return tmpfs_tmp_path


class _Seen(Pending):
    def __init__(self, log, unit, method, inner):
        self.log, self.unit, self.method, self.inner = log, unit, method, inner

    def result(self):
        self.log.append(("answer", self.unit, self.method))
        return self.inner.result()


def watch_calls(monkeypatch, before=None):
    """Log every call sent (``("send", unit, method, args)``) and every
    answer the session reads (``("answer", unit, method)``); ``before(unit,
    method, args)`` runs before a call is sent."""
    log = []
    real = local.LocalTransport.call

    def call(self, unit, method, *args):
        if before is not None:
            before(unit, method, args)
        log.append(("send", unit, method, args))
        return _Seen(log, unit, method, real(self, unit, method, *args))

    monkeypatch.setattr(local.LocalTransport, "call", call)
    return log


def test_the_prepare_rides_behind_the_last_batch(tmp_path, monkeypatch):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    for a, _, _ in trips:
        a.write(5 * TS, b"next")
    log = watch_calls(monkeypatch)
    res = gm.form_consistency_group()
    monkeypatch.undo()
    assert res.committed
    chk.check()
    for u in ("u0", "u1"):
        sent = [(e[2], e[3]) for e in log if e[0] == "send" and e[1] == u]
        methods = [m for m, _ in sent]
        # one batch (the CG is small), the prepare behind it, then the
        # decision (on the first unit) and the finish
        assert methods == (["apply", "prepare", "record_decision", "finish"] if u == "u0"
                           else ["apply", "prepare", "finish"]), methods
        apply_args, prepare_args = sent[0][1], sent[1][1]
        assert prepare_args[2] == apply_args[1]          # after= the batch's token
        i_prepare = log.index(("send", u, "prepare", prepare_args))
        # sent before the session read the batch's answer: no round trip of its own
        assert ("answer", u, "apply") not in log[:i_prepare]
    # every unit's finish is sent only once the decision's record answered
    i_record = log.index(("answer", "u0", "record_decision"))
    assert all(e[2] != "finish" for e in log[:i_record] if e[0] == "send")


def test_a_cg_with_nothing_to_send_prepares_at_once(tmp_path, monkeypatch):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    log = watch_calls(monkeypatch)
    res = gm.form_consistency_group()
    monkeypatch.undo()
    assert res.committed and res.bytes_drained == 0
    assert chk.check() == res.sequence
    sent = [(e[1], e[2]) for e in log if e[0] == "send"]
    assert ("u0", "apply") not in sent and ("u0", "prepare") in sent


def test_a_batch_that_failed_leaves_nothing_prepared_behind_it(tmp_path):
    """The last batch raises on the unit (not a crash): the prepare sent
    behind it refuses, so nothing is prepared there; the attempt fails as a
    drain error and the next one commits."""
    units, trips, gm, chk = make_session(tmp_path)
    seq = gm.form_consistency_group().sequence
    trips[0][0].write(0, b"z")

    def broken(where, i):
        if where == "apply":
            raise KeyError("no such volume")

    units[0].server.kill_point = broken
    res = gm.form_consistency_group()
    assert not res.committed and res.cause is Cause.DRAIN_ERROR
    units[0].server.kill_point = None
    for u in units:
        st = u.site.status("gm")
        assert not any(rev for _, rev, _ in st["fcs"])
        assert {q for _, _, q in st["fcs"]} == {seq}
    assert chk.check() == seq
    assert gm.form_consistency_group().committed
    chk.check()


def test_a_unit_restarted_between_its_last_batch_and_the_prepare_refuses(tmp_path,
                                                                          monkeypatch):
    """The unit crashes and comes back between the batch and the prepare
    behind it (the batch's answer lost): the new server never wrote that
    batch, so it refuses the prepare; the session reverts and the next CG
    sends the tracks again."""
    units, trips, gm, chk = make_session(tmp_path)
    seq = gm.form_consistency_group().sequence
    for a, _, _ in trips:
        a.write(7 * TS, b"lost")

    def before(unit, method, args):
        if unit == "u1" and method == "prepare" and len(args) == 3:
            units[1].kill()
            restart(tmp_path, units, 1)

    watch_calls(monkeypatch, before)
    res = gm.form_consistency_group()
    assert not res.committed and res.cause is Cause.PREPARE_FAILED
    assert "u1" in res.detail and "not written whole" in res.detail
    monkeypatch.undo()
    assert chk.check() == seq
    res = gm.form_consistency_group()
    assert res.committed and chk.check() == res.sequence
    assert gm.state is GMState.IDLE


@pytest.mark.parametrize("where, i", [("apply", 0), ("prepare", 0), ("prepare", 1)])
def test_another_unit_failing_its_drain_reverts_a_prepare_that_rode(tmp_path, where, i):
    """u0 sent its last batch and the prepare behind it; u1 dies in its
    drain (or in the prepare behind it): u0's prepare is reverted at once
    (B takes Global Copy again) and the promise holds through the restart."""
    units, trips, gm, chk = make_session(tmp_path)
    with RandomWriters([t[0] for t in trips], threads=2, seed=8, pace=PACE):
        seq = gm.form_consistency_group().sequence
        chk.check()
        for a, _, _ in trips:
            a.write(0, b"x")
            a.write(N // 2 * TS, b"y")
        units[1].arm_kill(where, i)
        res = gm.form_consistency_group()
        assert not res.committed and not units[1].up
        assert res.cause is (Cause.LINK_DOWN if where == "apply" else Cause.PREPARE_FAILED)
        st = units[0].site.status("gm")
        assert not any(rev for _, rev, _ in st["fcs"])     # u0: nothing left prepared
        assert st["settled"][res.sequence] == "revert"
        restart(tmp_path, units, 1)
        gm.clear_fatal()
        assert chk.check() == seq
        for _ in range(2):
            assert gm.form_consistency_group().committed
            chk.check()


def test_after_each_prepares_after_the_drain_one_unit_at_a_time(tmp_path, monkeypatch):
    """``decide="after_each"`` (claim 7): the prepares are not sent behind
    the drain; the first unit's refusal stops the rest."""
    units, trips, gm, chk = make_session(tmp_path, decide="after_each")
    assert gm.form_consistency_group().committed
    for a, _, _ in trips:
        a.write(0, b"q")
    log = watch_calls(monkeypatch)
    units[0].arm_kill("prepare", 0)
    res = gm.form_consistency_group()
    monkeypatch.undo()
    assert not res.committed and res.cause is Cause.PREPARE_FAILED
    sent = [(e[1], e[2]) for e in log if e[0] == "send"]
    assert ("u1", "prepare") not in sent
    assert all(len(e[3]) == 1 for e in log if e[0] == "send" and e[2] == "apply")


def test_the_batch_token_is_kept_per_session_and_a_failed_batch_forgets_it(tmp_path):
    units, trips, gm, chk = make_session(tmp_path)
    assert gm.form_consistency_group().committed
    srv = units[0].server
    seq = gm._next_sequence
    rows = trips[0][0].read(0, TS).reshape(1, TS)      # what B holds already
    srv.apply([("b0", np.array([0]), rows)], f"gm/{seq}/one")
    srv.apply([], "another/7/two")                 # another session's batch in between
    assert srv.prepare("gm", seq, f"gm/{seq}/one") == "prepared"
    assert srv.finish("gm", seq, "revert") == "revert"
    srv.apply([("b0", np.array([0]), rows)], f"gm/{seq + 1}/three")
    srv.apply([("b0", np.array([0]), rows)], f"gm/{seq + 1}/four")     # a later batch
    with pytest.raises(fastfc.FastFCError, match="not written whole"):
        srv.prepare("gm", seq + 1, f"gm/{seq + 1}/three")
    with pytest.raises(KeyError):
        srv.apply([("nope", np.array([0]), rows)], "another/8/five")   # fails: forgets all
    with pytest.raises(fastfc.FastFCError, match="not written whole"):
        srv.prepare("gm", seq + 1, f"gm/{seq + 1}/four")
    assert not any(rev for _, rev, _ in srv.status("gm")["fcs"])       # nothing prepared
    gm._next_sequence = seq + 2
    assert gm.form_consistency_group().committed
    chk.check()
