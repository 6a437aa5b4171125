"""Review of issue 12 (r12): adversarial cases of the two-phase protocol
across units, the link, fencing and site-loss recovery, on the in-process
transport."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastfc
from fastfc.copyservices import sitemirror
from fastfc.copyservices.globalmirror import GMState
from fastfc.tools.testing import PromiseChecker

pytest.importorskip("ray")

from fastfc import remote  # noqa: E402
from fastfc.remote import local  # noqa: E402

TS = 4096
N = 16


@pytest.fixture(autouse=True)
def _clean_units():
    yield
    local.stop_all()


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
