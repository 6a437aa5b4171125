"""The seed's resolution rule (:func:`fastfc.copyservices.resolution.resolve`):
checked against the rule's plain statement, shown to end every C on one CG
from every reachable state, and shown to be the one rule the session and a
reopened storage unit both follow (same relationships, same action)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastfc import GlobalMirror, StorageUnit, faults
from fastfc.copyservices.resolution import pending_sequence, resolve
from fastfc.copyservices.secondary import Status, plan
from fastfc.copyservices.globalmirror import RETRIES, GMState

DECISIONS = st.sampled_from([None, "commit", "revert"])
OUTCOMES = st.sampled_from(["commit", "revert"])
RELS = st.lists(st.tuples(st.booleans(), st.integers(0, 6)), max_size=8)
SETTLED = st.lists(st.dictionaries(st.integers(0, 6), OUTCOMES, max_size=3), max_size=3)


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """This module's units live on tmpfs (conftest.tmpfs_tmp_path): none of
    its tests is about the disk, and on a busy disk their fsyncs took most
    of their time."""
    return tmpfs_tmp_path


def plain_rule(rels, settled, decision):
    """The rule as IBM states it, written out plainly: nothing in doubt,
    nothing to do; else for the newest CG in doubt, if any C already holds
    it (a relationship carries it without being revertible, or a unit says
    it committed it) commit the rest; if a unit says it reverted it, revert
    the rest; else do what the session decided, and revert when it decided
    nothing."""
    in_doubt = sorted({seq for rev, seq in rels if rev})
    if not in_doubt:
        return "nothing", None
    n = in_doubt[-1]
    some_c_holds_n = any(seq == n and not rev for rev, seq in rels) or \
        any(unit.get(n) == "commit" for unit in settled)
    if some_c_holds_n:
        return "commit", n
    if any(unit.get(n) == "revert" for unit in settled):
        return "revert", n
    return ("commit", n) if decision == "commit" else ("revert", n)


@given(RELS, SETTLED, DECISIONS, st.randoms())
def test_resolve_is_the_plain_rule(rels, settled, decision, rnd):
    want = plain_rule(rels, settled, decision)
    assert resolve(rels, settled=settled, decision=decision) == want
    # the order of relationships and of units does not matter
    shuffled = list(rels)
    rnd.shuffle(shuffled)
    units = list(settled)
    rnd.shuffle(units)
    assert resolve(shuffled, settled=units, decision=decision) == want
    # outcomes recorded for other sequences do not matter
    n = pending_sequence(rels)
    assert n == want[1]
    if n is not None:
        other = [{q: d for q, d in unit.items() if q != n} for unit in settled]
        assert resolve(rels, settled=other, decision=decision) == \
            plain_rule(rels, other, decision)


def test_resolve_refuses_a_decision_it_does_not_know():
    with pytest.raises(ValueError, match="decision"):
        resolve([(True, 2)], decision="maybe")


# -- from every reachable state, every C ends on one CG ---------------------------
# CG n-1 committed everywhere; CG n interrupted. Each relationship is, for n:
#   unprepared (carries n-1), prepared (revertible with n), committed (carries n),
#   reverted (carries n-1 again).
@st.composite
def reachable(draw):
    n = draw(st.integers(2, 5))
    count = draw(st.integers(1, 6))
    if draw(st.booleans()):
        # every prepare succeeded, "commit" recorded: some may have committed
        kinds = draw(st.lists(st.sampled_from(["prepared", "committed"]),
                              min_size=count, max_size=count))
        decision = draw(st.sampled_from(["commit", None]))   # None: the record lost
        if "committed" in kinds:
            decision = "commit"
    else:
        # a prepare failed (or the decision was not recorded): nothing committed
        kinds = draw(st.lists(st.sampled_from(["unprepared", "prepared", "reverted"]),
                              min_size=count, max_size=count))
        decision = draw(st.sampled_from(["revert", None]))
    rels = [(k == "prepared", n if k in ("prepared", "committed") else n - 1) for k in kinds]
    return n, kinds, rels, decision


@given(reachable())
def test_the_action_ends_every_c_on_one_cg(state):
    n, kinds, rels, decision = state
    action, seq = resolve(rels, decision=decision)
    if "prepared" not in kinds:
        assert action == "nothing"
        return
    assert seq == n
    ended = [(n if action == "commit" else n - 1) if rev else s for rev, s in rels]
    assert len(set(ended)) == 1, (kinds, decision, action)
    if "committed" in kinds:
        assert action == "commit"          # a C holds CG n: it cannot be taken back
    if "unprepared" in kinds or "reverted" in kinds:
        assert action == "revert"          # a C never got CG n


@given(reachable())
def test_the_session_and_a_reopened_unit_take_the_same_action(state):
    """The session decides without the recorded decision (in this process it
    knows what happened) and records the action it takes; a unit reopened
    later decides with that record: the same action, from the same
    relationships."""
    n, kinds, rels, decision = state
    in_session, seq = plan([Status([(f"C{i}", rev, s) for i, (rev, s) in enumerate(rels)])],
                           consult_decisions=False)
    recorded = in_session if seq is not None else decision
    assert resolve(rels, decision=recorded) == (in_session, seq)


# -- the same through the real paths: the session, then the unit reopened -----------
N, TS = 8, 4096


def _session(tmp_path):
    u1, u2 = StorageUnit(tmp_path / "u1"), StorageUnit(tmp_path / "u2")
    A = [u1.create_volume(f"A{i}", N, TS) for i in range(3)]
    B = [u2.create_volume(f"B{i}", N, TS) for i in range(3)]
    C = [u2.create_volume(f"C{i}", N, TS) for i in range(3)]
    for i, a in enumerate(A):
        a.write(0, np.full(a.capacity, i + 1, np.uint8))
    gm = GlobalMirror(list(zip(A, B, C)), name="gm", max_coordination_time=1.0)
    return u1, u2, gm


@pytest.mark.parametrize("stuck, prepare_fails", [
    ((1,), False),           # one commit keeps failing: the rest committed, commit it
    ((0, 2), False),
    ((0, 1, 2), False),      # every commit fails: no C holds the CG, revert (see below)
    ((0, 1, 2), True),       # a prepare failed and every revert keeps failing
    ((1,), True),            # a prepare failed and a revert keeps failing: revert it
])
def test_in_session_resolution_and_reopen_agree(tmp_path, stuck, prepare_fails):
    u1, u2, gm = _session(tmp_path)
    try:
        assert gm.form_consistency_group().committed
        for t in gm.triplets:
            t.a.write(TS, b"new")
        step = "revert" if prepare_fails else "commit"
        if prepare_fails:
            faults.inject("prepare", volume=gm.triplets[0].b)
        for i in stuck:      # the step, every retry of the resolution, and more
            faults.inject(step, volume=gm.triplets[i].b, times=1 + 2 * RETRIES)
        res = gm.form_consistency_group()
        assert gm.state is GMState.FATAL
        # what the session's resolution did (and recorded), by the rule
        # without the recorded decision: a commit that failed everywhere left
        # no C on the new CG, so it is reverted (the session's tests assert it)
        action = "commit" if res.committed else "revert"
        if len(stuck) == 3 or prepare_fails:
            assert action == "revert"
        else:
            assert action == "commit"
        assert u2.store.decision("gm", res.sequence) == action
        # the prepared relationships whose failing step is the action stay in doubt
        left = [i for i in stuck if step == action and not (prepare_fails and i == 0)]
        assert [t.fc.revertible for t in gm.triplets] == [i in left for i in range(3)]
        rels = [(t.fc.revertible, t.fc.sequence) for t in gm.triplets]
    finally:
        faults.clear()
    u1.close()
    u2.close()
    # the unit reopened: the same relationships, the recorded decision, the same action
    assert resolve(rels, decision=action) == ((action, res.sequence) if left
                                              else ("nothing", None))
    with StorageUnit(tmp_path / "u2") as u2:
        verb = "committed" if action == "commit" else "reverted"
        assert u2.recovered == ([f"session gm: CG {res.sequence} {verb} on "
                                 f"{len(left)} of 3 volumes"] if left else [])
        want = res.sequence if action == "commit" else res.sequence - 1
        assert sorted(fc.sequence for fc in u2.flashcopies) == [want] * 3
        assert not any(fc.revertible for fc in u2.flashcopies)
