"""Site loss of a durable Global Mirror session: the storage administrator's
procedure at the secondary unit alone, and the return of the old primary.

A session over storage units is recorded in the unit holding its B and C
volumes (the secondary); its A->B pairs are recorded in the unit(s) holding
the A volumes (the primary). With the primary unit gone, the secondary
still holds everything recovery needs: the session's record, the B->C
relationships and the CG decisions.

:func:`recover_session` (``StorageUnit.recover_session``, ``fastfc
recovergmir``) at the secondary alone:

1. settles a CG left in doubt by the seed's rule, through the one
   implementation of it for units reached without the session
   (:func:`fastfc.copyservices.sitemirror.recover_sites`, which the Ray path
   uses too): this unit is its one :class:`_SessionSite`;
2. fails each B over, DS8000-like (``failoverpprc`` at the secondary): B
   becomes a suspended PPRC primary of a pair B->A, recorded in this unit
   with an out-of-sync bitmap; first the tracks the fast reverse restore is
   about to bring back from C go in it (A holds another version of them: it
   sent them after the last CG), then every later host write to B;
3. fast-reverse-restores each C onto its B (B then holds the last committed
   CG), and only then lets B take host writes;
4. ends the session (its record and decisions); each B->C FlashCopy stays,
   so C keeps that CG as a point-in-time copy.

Each step can be run again after a crash: a B failed over before keeps its
record, and the host writes it took.

When the old primary unit is opened again beside this one (its directory
restored from a copy, or back from being away), :func:`restore_merged`
turns the two records into the state ``PPRCPair.failover()`` leaves at a
live site: the pair A->B failed over, recorded in A's unit, its out-of-sync
bitmap the union of the tracks A changed since it last sent them and the
tracks B changed since the last CG. A live failover leaves the same record
in B's unit (:func:`~fastfc.copyservices.pprc.record_failover`), so B's
host writes are recorded there whatever happens to A's unit; the record is
kept until the pair fails back or is removed.

Ending a session at the secondary alone instead (``rmgmir``) is
``StorageUnit.remove_session``: each B stays the secondary of its recorded
pair, which :func:`failover_alone` or :func:`release_secondary` then fail
over or free. ``failbackpprc`` then resynchronises
incrementally from B to A (A's writes since the last CG are overwritten by
B's image), and ``failoverpprc``/``failbackpprc`` on the new pair B->A go
back to the original direction later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from fastfc._core import MirrorBase
from fastfc.copyservices.flashcopy import FlashCopy
from fastfc.copyservices.pprc import FAILOVER_RECORD, PPRCPair, record_failover
from fastfc.copyservices.sitemirror import recover_sites
from fastfc.errors import StateError
from fastfc.storage.site import Done, Pending, SecondarySite, Update
from fastfc.storage.volume import locked

if TYPE_CHECKING:
    from fastfc.durable.unit import StorageUnit
    from fastfc.storage.volume import Volume

#: ``suspend_reason`` of the pair B->A that a B failed over keeps in its own
#: unit (:func:`~fastfc.copyservices.pprc.record_failover`): at the secondary
#: alone (:func:`recover_session`, :func:`failover_alone`), or live
#: (``PPRCPair.failover()``), its primary's unit away since.
SITE_FAILOVER = FAILOVER_RECORD


def is_site_failover(row: dict) -> bool:
    """Whether a pair row is the record of a B failed over, kept in B's unit
    (see :data:`SITE_FAILOVER`)."""
    return row.get("suspend_reason") == SITE_FAILOVER


class _SessionSite(SecondarySite):
    """A durable session's secondary unit, in this process, as the seed's
    rule reads and settles it (:func:`~fastfc.copyservices.sitemirror.
    recover_sites`): the session's B->C relationships, the decisions it
    recorded, and the failover of its B volumes. Only the calls of recovery
    are served; a session does not form CGs through it."""

    def __init__(self, unit: "StorageUnit", session: str) -> None:
        rows = unit.store.session_rows()
        if session not in rows:
            raise KeyError(f"no Global Mirror session named {session!r} in unit {unit.path}")
        self.unit = unit
        self.key = str(unit.path)
        self.name = str(unit.path)
        self.triplets: list[tuple[str, str, str, str]] = [tuple(t) for t in
                                                           rows[session]["triplets"]]

    @property
    def up(self) -> bool:
        return True

    def probe(self) -> bool:
        return True

    def _fcs(self) -> list[FlashCopy]:
        out = []
        for _, _, b, c in self.triplets:
            fc = self.unit.volume(c).target_relationship
            if not isinstance(fc, FlashCopy) or fc.source is not self.unit.volume(b):
                raise StateError(f"unit {self.unit.path}: {b}->{c} of the session has no "
                                 "FlashCopy; the C volume holds no CG to recover")
            out.append(fc)
        return out

    def status(self, session: str) -> dict[str, Any]:
        fcs = self._fcs()
        store = self.unit._sqlite     # a session is recorded by a unit on disk
        seqs = {fc.sequence for fc in fcs}
        return {"fcs": [(fc.target.name, bool(fc.revertible), int(fc.sequence)) for fc in fcs],
                "decisions": {q: d for q in seqs
                              if (d := store.decision(session, q)) is not None},
                "settled": {}}

    def finish(self, session: str, sequence: int, decision: str) -> Pending:
        fcs = self._fcs()
        pending = [fc for fc in fcs if fc.revertible and fc.sequence == sequence]
        with self.unit.store.transaction():
            for fc in pending:
                (fc.commit if decision == "commit" else fc.revert)(session=session)
        return Done(decision)

    def record_decision(self, session: str, sequence: int, decision: str) -> None:
        self.unit.store.cg_decision(session, sequence, decision)

    def restore_b(self, session: str) -> None:
        unit = self.unit
        fcs = self._fcs()
        if any(fc.revertible for fc in fcs) or len({fc.sequence for fc in fcs}) > 1:
            raise StateError(f"unit {unit.path}: the C volumes of {session!r} are not on one "
                             "settled CG; not restored")
        rows = {r["primary_name"]: r for r in unit.pair_records if is_site_failover(r)}
        todo = []
        with unit.store.transaction():
            for (a_unit, a_name, b_name, _), fc in zip(self.triplets, fcs):
                b = fc.source
                if not b.is_secondary:
                    continue        # restored before: B may hold host writes since
                if b_name not in rows:     # (a run a crash cut short recorded it)
                    _record_failover(unit, b, a_unit, a_name, _restored_tracks(unit, fc),
                                     "gcp")
                todo.append(fc)
        for fc in todo:
            # restore first, then let B take host writes: a crash between
            # the two restores again (B took no writes yet); at durability
            # "power" B's restored data is on the disk before its flag
            fc.reverse_restore(session=session)
            b = fc.source
            if unit.durability == "power":
                unit.store.sync(b, b.mirror.oos if b.mirror is not None else None)
            b.set_flags(secondary=False)
            unit.store.set_volume_flags(b.flags_record())

    # a session does not run through this site: recovery only
    def _recovery_only(self, *args: Any) -> Any:
        raise StateError(f"unit {self.unit.path} is served here for site-loss recovery only")

    def setup(self, session: str, pairs: Sequence[tuple[str, str]]) -> list[int]:
        return self._recovery_only()

    def apply(self, updates: Sequence[Update], token: str | None = None) -> Pending:
        return self._recovery_only()

    def prepare(self, session: str, sequence: int, after: str | None = None) -> Pending:
        return self._recovery_only()


def _restored_tracks(unit: "StorageUnit", fc: FlashCopy):
    """The tracks a fast reverse restore of ``fc`` brings back from C onto
    B, as a new bitmap of ``unit``'s store."""
    assert fc.src_changed is not None and fc.tgt_changed is not None   # record=True
    oos = unit.store.new_bitmap(fc.source.n_grains)
    oos.copy_from(fc.src_changed)
    oos.or_(fc.tgt_changed)
    oos.andnot(fc.to_copy)
    return oos


def _record_failover(unit: "StorageUnit", b: "Volume", a_unit: str, a_name: str,
                     oos: Any, mode: str) -> None:
    """Record B as a suspended primary of a pair B->A (A's unit named by its
    ``a_unit`` ref), its out-of-sync bitmap ``oos`` (the tracks B differs in
    from the image A's unit last knew of it), and hook B's host writes into
    it: the one failover at the secondary alone, of a session's B and of a
    plain pair's."""
    rec = record_failover(b, a_unit, a_name, mode, oos)
    unit._pair_rows.append(unit._pending(rec))
    hook = MirrorBase()
    hook.oos = oos
    b.set_mirror(hook)


def failover_alone(unit: "StorageUnit", b_name: str) -> dict:
    """``failoverpprc`` of a plain pair (in no session) at its secondary
    unit alone, its primary's unit lost: B becomes a suspended primary of a
    pair B->A recorded in this unit, recording every track it changes from
    now on, and takes host writes. When the old primary's unit is opened
    beside this one, :func:`restore_merged` restores the pair A->B failed
    over (``failback()`` then resyncs only the tracks changed on either
    side). Returns the record of B->A (as ``StorageUnit.pair_records``)."""
    unit._require_writable()
    b = unit.volume(b_name)
    rec = next((r for r in unit.secondary_records if r["secondary_name"] == b_name), None)
    if rec is None:
        if any(is_site_failover(r) and r["primary_name"] == b_name for r in unit._pair_rows):
            raise StateError(f"{b!r} was failed over before: it takes host writes, "
                             "recording them for the old primary")
        if any(t[2] == b_name for cfg in unit.store.session_rows().values()
               for t in cfg["triplets"]):
            raise StateError(f"{b!r} is a B volume of a Global Mirror session: "
                             "recover_session (recovergmir) recovers it")
        raise StateError(f"{b!r} is not the secondary of a pair whose primary's unit is away")
    if rec["primary_uuid"] is None:
        raise StateError(
            f"{b!r} is the secondary of a pair made before a secondary recorded its pair: "
            "this unit does not know its primary, so it cannot fail it over alone. Open the "
            "primary's unit beside this one once (the pair is then recorded here), or, the "
            f"primary lost for good, release_secondary({b_name!r}) (rmpprc --force) frees it")
    with locked((b,)):
        with unit.store.transaction():
            _record_failover(unit, b, rec["primary_uuid"], rec["primary_name"],
                             unit.store.new_bitmap(b.n_grains), rec["mode"])
            b.set_flags(secondary=False)
            unit.store.set_volume_flags(b.flags_record())
    return next(r for r in unit.pair_records
                if is_site_failover(r) and r["primary_name"] == b_name)


def release_secondary(unit: "StorageUnit", b_name: str) -> dict:
    """``rmpprc --force`` of a plain pair at its secondary unit alone, the
    primary's unit lost for good: B is nobody's secondary any more and takes
    host writes; it holds what the primary last sent (a Global Copy pair's
    latest writes may never have come). The old primary's unit is forgotten
    as a partner unless something else here names it, so that a copy of it
    that turns up does not take B back. Returns what was known of the pair
    (as ``StorageUnit.secondary_records``)."""
    unit._require_writable()
    b = unit.volume(b_name)
    rec = next((r for r in unit.secondary_records if r["secondary_name"] == b_name), None)
    if rec is None:
        raise StateError(f"{b!r} is not the secondary of a pair whose primary's unit is away")
    with locked((b,)):
        with unit.store.transaction():
            b.set_flags(secondary=False)
            unit.store.set_volume_flags(b.flags_record())
            unit.store.save_secondary(b_name, None)
    if rec["primary_uuid"] is not None:
        _forget_partner(unit, rec["primary_uuid"])
    return rec


def _forget_partner(unit: "StorageUnit", ref: str) -> None:
    """Forget partner ``ref`` when no pair, session or secondary of
    ``unit`` names it any more."""
    if any(r["secondary_uuid"] == ref for r in unit._pair_rows):
        return
    if any(t[0] == ref for cfg in unit.store.session_rows().values() for t in cfg["triplets"]):
        return
    if any(r["primary_unit"] == ref for r in unit.store.secondary_records().values()):
        return
    unit._sqlite.drop_partner(ref)


def recover_session(unit: "StorageUnit", name: str) -> int:
    """Site-loss recovery of session ``name`` at its secondary unit alone
    (see the module's docstring); returns the CG sequence every B holds."""
    unit._require_writable()
    if name in unit.sessions:
        raise StateError(
            f"session {name!r} runs with its primary unit(s) open: recovery at the "
            "secondary alone is for a primary that is lost (GlobalMirror.recover() "
            "recovers a running session)")
    site = _SessionSite(unit, name)
    seq = recover_sites([site], name)
    unit.store.drop_session(name)
    for _, _, _, c_name in site.triplets:      # each B->C stays, the user's now
        fc = unit.volume(c_name).target_relationship
        if isinstance(fc, FlashCopy) and fc.session == name:
            fc.session = None
    return seq


def restore_merged(primary_unit: "StorageUnit", secondary_unit: "StorageUnit",
                   row: dict, a: "Volume", b: "Volume") -> PPRCPair | None:
    """Restore the pair ``row`` of ``primary_unit`` (A->B) whose B keeps a
    record of its failover in ``secondary_unit`` (failed over at the
    secondary alone, :func:`recover_session` or :func:`failover_alone`; or
    live, ``PPRCPair.failover()``, with A's unit closed or lost and restored
    from a copy since), as ``PPRCPair.failover()`` leaves a pair: failed
    over, its out-of-sync bitmap merged with B's record (every track B
    changed since A's unit last knew its image). B's record stays, B's host
    writes recorded in it, until the pair fails back or is removed: whatever
    happens to A's unit meanwhile, B's unit knows what B changed. None
    (nothing done) when B has no such record."""
    b_rows = [r for r in secondary_unit._pair_rows
              if is_site_failover(r) and r["primary_name"] == b.name
              and r["secondary_name"] == a.name and r["secondary_uuid"] == primary_unit.uuid]
    if not b_rows:
        return None
    b_row = b_rows[0]
    row["oos"].or_(b_row["oos"])
    pair = PPRCPair.from_record(a, b, dict(row, failed_over=True, suspend_reason="failover"),
                                failover_record=b_row)
    secondary_unit._pair_rows = [r for r in secondary_unit._pair_rows if r is not b_row]
    return pair


def ended_at_secondary(primary_unit: "StorageUnit", secondary_unit: "StorageUnit",
                       row: dict, a: "Volume", b: "Volume") -> bool:
    """Whether the pair ``row`` of ``primary_unit`` (A->B, not failed over)
    was ended at its secondary's unit alone while this unit was lost
    (:func:`release_secondary`, or :func:`forget_failover` after a failover
    there): B is nobody's secondary and its unit, which records its
    secondaries, records no such pair. Restoring it would make B a secondary
    again and overwrite host writes it took since, unrecorded. So the pair
    ends here too (its row dropped when this unit can write, a note in
    :attr:`~fastfc.durable.unit.StorageUnit.recovered`); A takes host writes
    unmirrored."""
    if row["failed_over"] or b.is_secondary or \
            not getattr(secondary_unit.store, "records_secondaries", False):
        return False
    rec = secondary_unit.store.secondary_records().get(b.name)
    if rec is not None and rec["primary_unit"] == primary_unit.store.ref and \
            rec["primary_name"] == a.name:
        return False
    if primary_unit.readonly:
        return True     # looked at only: the row stays, A records its writes
    with locked((a,)):
        primary_unit.store.drop_pair(row["id"])
        a.set_mirror(None)
    primary_unit.recovered.append(
        f"pair {a.name}:{b.name}: ended at the unit of {b.name} ({secondary_unit.path}) "
        f"while this one was away; ended here too, {a.name} is no longer mirrored")
    return True


def forget_failover(unit: "StorageUnit", b_name: str) -> int:
    """The old primary is lost for good: forget the record of B's failover
    at the secondary (:func:`recover_session`). B stays a host-writable
    volume, no longer recording its changes; its pair with the old primary
    is gone (a later pair from B copies in full). Unless another row names
    it, the old primary's unit is forgotten as a partner too, so that a copy
    of it that turns up does not take B back as its secondary (naming both
    units, ``-u``/``-r`` or :meth:`StorageUnit.relink`, would). Returns the
    tracks the record held."""
    unit._require_writable()
    rows = [r for r in unit._pair_rows if is_site_failover(r) and r["primary_name"] == b_name]
    if not rows:
        raise KeyError(f"volume {b_name!r} of unit {unit.path} was not failed over at the "
                       "secondary alone (recover_session)")
    row = rows[0]
    b = unit._row_volume(b_name)
    n = int(row["oos"].count_groups(b.grains_per_track))
    with locked((b,)):
        with unit.store.transaction():
            unit.store.drop_pair(row["id"])
            unit.store.save_secondary(b_name, None)
        unit._pair_rows.remove(row)
        b.set_mirror(None)
    _forget_partner(unit, row["secondary_uuid"])
    return n
