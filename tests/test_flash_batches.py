"""A storage unit records a consistency group's FlashCopy step as one batch
(``SQLiteStore.save_flashes``: one row of its FlashCopy log, folded into the
``flashcopies`` rows later).

The model: the same operations recorded batch by batch in one store and
record by record (``save_flash``) in another must read back the same rows,
while both are open (read-only view), after a kill (a copy of the files as
the page cache holds them) and after a clean close. Then a session on units:
its groups' steps recorded as batches (as the CG path records them) reopen
to the same relationships as the same session recorded per relationship
(``Store.save_flashes``'s plain loop over ``save_flash``).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastfc import FlashCopy, GlobalMirror, StorageUnit, Volume, _core, faults
from fastfc._core import TrackBitmap
from fastfc.durable.sqlite import JOURNAL_FILE, SCHEMA_VERSION
from fastfc.durable.sqlite import SQLiteStore
from fastfc.storage.store import Store


N_RELS = 5
N_MAPS = 10
N_BITS = 64
OPTS = [{"background_copy": False, "record": True, "persistent": True,
         "inhibit_target_write": True, "copy_rate": None},
        {"background_copy": True, "record": True, "persistent": True,
         "inhibit_target_write": False, "copy_rate": 1 << 20}]
MAPS = ("to_copy", "src_changed", "tgt_changed", "rv_to_copy", "rv_src_changed",
        "rv_tgt_changed")
COMPARED = ("id", "source", "target", "options", "sequence", "revertible", *MAPS,
            "rv_sequence")


class Side:
    """A store and what it keeps of each relationship (its id, options)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self.store = SQLiteStore(path, str(path))
        self.maps = [self.store.new_bitmap(N_BITS) for _ in range(N_MAPS)]
        self.ids: list[int | None] = []

    def record(self, i: int, fields: dict) -> dict:
        rec = {"id": self.ids[i], "source": f"S{i}", "target": f"T{i}"}
        for k, v in fields.items():
            rec[k] = self.maps[v] if k in MAPS and v is not None else v
        return rec

    def rows(self) -> dict[int, tuple]:
        return rows_of(self.store)

    def reopen(self) -> None:
        self.store.close()
        self.store = SQLiteStore(self.path, str(self.path))
        self.maps = [self.store.load_bitmap(m.file_id, N_BITS) for m in self.maps]

    def killed(self, where: Path) -> dict[int, tuple]:
        """The rows a unit opened after a kill now would read: a copy of the
        database files and the CG journal (the page cache holds every
        committed transaction)."""
        where.mkdir()
        for name in ("unit.db", "unit.db-wal", JOURNAL_FILE):
            if (self.path / name).exists():
                shutil.copy(self.path / name, where / name)
        (where / "bitmaps").mkdir()
        for m in self.maps:                      # the files the rows may name
            shutil.copy(m.path, where / "bitmaps" / m.path.name)
        copy = SQLiteStore(where, str(where))
        try:
            return rows_of(copy)
        finally:
            copy.close()

    def read_only(self) -> dict[int, tuple]:
        view = SQLiteStore(self.path, str(self.path), readonly=True)
        try:
            return rows_of(view)
        finally:
            view.close()


def rows_of(store: SQLiteStore) -> dict[int, tuple]:
    import json
    out = {}
    for r in store.flash_rows():
        r = dict(r, options=json.loads(r["options"]))
        out[r["id"]] = tuple(r[k] for k in COMPARED)
    return out


fields = st.fixed_dictionaries({
    "options": st.sampled_from([0, 0, 0, 1]).map(lambda k: OPTS[k]),
    "sequence": st.integers(0, (1 << 63) - 1) | st.integers(0, 40),
    "revertible": st.booleans(),
    **{k: st.none() | st.integers(0, N_MAPS - 1) for k in MAPS},
    "rv_sequence": st.none() | st.integers(0, (1 << 63) - 1),
})

op = st.one_of(
    st.tuples(st.just("batch"), st.lists(st.tuples(st.integers(0, N_RELS - 1), fields),
                                         min_size=1, max_size=N_RELS,
                                         unique_by=lambda t: t[0])),
    st.tuples(st.just("one"), st.integers(0, N_RELS - 1), fields),
    st.tuples(st.just("drop"), st.integers(0, N_RELS - 1)),
    st.tuples(st.just("rolled back"), st.lists(st.tuples(st.integers(0, N_RELS - 1), fields),
                                               min_size=1, max_size=N_RELS,
                                               unique_by=lambda t: t[0])),
    st.tuples(st.just("check"), st.sampled_from(["read-only", "killed", "reopened"])),
)


class Boom(Exception):
    pass


# 60 examples under the ``ci`` profile (each builds two stores of 10 bitmap
# files and replays up to 30 steps on both); the quick loop's ``dev``
# profile takes 20 of them
@settings(max_examples=60 if settings.default.max_examples >= 60 else 20)
@given(ops=st.lists(op, max_size=30), seed=fields)
def test_batches_read_back_as_the_same_rows_as_single_saves(tmp_path_factory, ops, seed):
    tmp = tmp_path_factory.mktemp("batches")
    batched, single = Side(tmp / "batched"), Side(tmp / "single")
    kills = 0
    try:
        for side in (batched, single):
            for i in range(N_RELS):
                side.ids.append(None)
                side.ids[i] = side.store.save_flash(side.record(i, seed))
        assert batched.ids == single.ids
        for o in ops:
            kind = o[0]
            if kind in ("batch", "rolled back"):
                items = [(i, f) for i, f in o[1] if batched.ids[i] is not None]
                if not items:
                    continue
                for side in (batched, single):
                    recs = [side.record(i, f) for i, f in items]
                    try:
                        with side.store.transaction():
                            if side is batched:
                                got = side.store.save_flashes(recs)
                            else:
                                got = [side.store.save_flash(r) for r in recs]
                            assert got == [side.ids[i] for i, _ in items]
                            if kind == "rolled back":
                                raise Boom
                    except Boom:
                        pass
            elif kind == "one":
                i, f = o[1], o[2]
                if batched.ids[i] is None:
                    continue
                for side in (batched, single):
                    side.store.save_flash(side.record(i, f))
            elif kind == "drop":
                i = o[1]
                if batched.ids[i] is None:
                    continue
                for side in (batched, single):
                    side.store.drop_flash(side.ids[i], {"name": f"T{i}", "invalid": False})
                    side.ids[i] = None
            else:
                want = single.rows()
                if o[1] == "read-only":
                    assert batched.read_only() == want
                elif o[1] == "killed":
                    kills += 1
                    assert batched.killed(tmp / f"kill{kills}") == want
                else:
                    batched.reopen()
                    single.reopen()
                    assert batched.rows() == single.rows() == want
        want = single.rows()
        assert batched.read_only() == want
        assert batched.killed(tmp / "last") == want
        batched.reopen()
        assert batched.rows() == want
    finally:
        batched.store.close()
        single.store.close()


def test_batches_over_overlapping_relationships_keep_their_order(tmp_path):
    """A batch of some of a group's relationships, then the whole group
    again: the newest state of each wins, in the log and after a kill."""
    batched, single = Side(tmp_path / "b"), Side(tmp_path / "s")
    try:
        for side in (batched, single):
            side.ids = [None] * 3
            for i in range(3):
                side.ids[i] = side.store.save_flash(side.record(i, _fields(1)))
        steps = [([0, 1, 2], 2), ([1], 3), ([0, 1, 2], 4), ([2], 5), ([0, 2], 6), ([0, 1, 2], 7),
                 ([1], 8)]
        for k, (rels, seq) in enumerate(steps):
            batched.store.save_flashes([batched.record(i, _fields(seq)) for i in rels])
            for i in rels:
                single.store.save_flash(single.record(i, _fields(seq)))
            want = single.rows()
            assert batched.read_only() == want, steps[:k + 1]
            assert batched.killed(tmp_path / f"k{k}") == want, steps[:k + 1]
    finally:
        batched.store.close()
        single.store.close()


def _fields(seq: int) -> dict:
    return {"options": OPTS[0], "sequence": seq, "revertible": seq % 2 == 0,
            **{k: (seq + j) % N_MAPS for j, k in enumerate(MAPS)}, "rv_sequence": seq - 1}


def test_a_batch_that_names_a_relationship_twice_is_refused_whole(tmp_path):
    side = Side(tmp_path / "u")
    try:
        f = {"options": OPTS[0], "sequence": 3, "revertible": False,
             **{k: None for k in MAPS}, "rv_sequence": None}
        side.ids = [None, None]
        side.ids = [side.store.save_flash(side.record(0, f)),
                    side.store.save_flash(side.record(1, f))]
        before = side.rows()
        g = dict(f, sequence=4)
        with pytest.raises(ValueError, match=r"names row\(s\) \[1\] more than once"):
            side.store.save_flashes([side.record(0, g), side.record(1, g), side.record(0, g)])
        assert side.rows() == before
        assert side.read_only() == before
    finally:
        side.store.close()


def test_a_session_step_is_a_handful_of_statements_whatever_its_size(tmp_path, monkeypatch):
    """With the groups' steps recorded as batches, a CG on units at
    durability "process" makes the same number of SQL statements at 2 and
    at 12 triplets."""
    counts = []
    for n in (2, 12):
        u1, u2 = StorageUnit(tmp_path / f"p{n}"), StorageUnit(tmp_path / f"s{n}")
        try:
            trips = [(u1.create_volume(f"A{i}", 8, 4096), u2.create_volume(f"B{i}", 8, 4096),
                      u2.create_volume(f"C{i}", 8, 4096)) for i in range(n)]
            gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=1.0)
            assert gm.form_consistency_group().committed
            seen: list[str] = []
            for u in (u1, u2):
                u.store.set_trace_callback(seen.append)   # (SQL and the CG journal's)
            for _ in range(4):
                assert gm.form_consistency_group().committed
            for u in (u1, u2):
                u.store.set_trace_callback(None)
            counts.append(len(seen) / 4)
            gm.close(discard=True)
        finally:
            u2.close()
            u1.close()
    assert counts[0] == counts[1] <= 10, counts


# -- a session on units: batched and single saves reopen alike -----------------------
def _session_run(root: Path, batched: bool, monkeypatch) -> dict:
    """A session of 4 triplets through CGs that commit and CGs that revert
    (a prepare fails), killed (its files copied while open) and reopened:
    what the reopened secondary unit holds."""
    with monkeypatch.context() as m:
        if not batched:     # each relationship's row saved by itself
            m.setattr(SQLiteStore, "save_flashes", Store.save_flashes)
        (root / "run").mkdir()
        u1, u2 = StorageUnit(root / "run" / "p"), StorageUnit(root / "run" / "s")
        rng = np.random.default_rng(5)
        A = [u1.create_volume(f"A{i}", 16, 4096) for i in range(4)]
        B = [u2.create_volume(f"B{i}", 16, 4096) for i in range(4)]
        C = [u2.create_volume(f"C{i}", 16, 4096) for i in range(4)]
        gm = GlobalMirror(list(zip(A, B, C)), name="gm", max_coordination_time=1.0)
        try:
            for cg in range(12):
                for a in A:
                    a.write(int(rng.integers(0, 16)) * 4096,
                            rng.integers(0, 256, 4096, dtype=np.uint8))
                if cg % 4 == 3:
                    faults.inject("prepare", B[cg % 4])
                gm.form_consistency_group()
            # a kill: the files as the page cache holds them
            shutil.copytree(root / "run", root / "killed")
        finally:
            faults.clear()
            gm.stop()
            u2.close()
            u1.close()
    with StorageUnit(root / "killed" / "p"), StorageUnit(root / "killed" / "s") as k2:
        fcs = sorted(k2.flashcopies, key=lambda fc: fc.target.name)
        return {"stats": (gm.stats.successes, gm.stats.attempts),
                "fcs": [(fc.source.name, fc.target.name, fc.sequence, fc.revertible,
                         fc.to_copy.set_indices().tolist(), fc.src_changed.set_indices().tolist(),
                         fc.tgt_changed.set_indices().tolist()) for fc in fcs],
                "c": [k2.volume(f"C{i}").read(0, 16 * 4096).tobytes() for i in range(4)],
                "session": k2.session("gm").c_sequences}


def test_a_session_recorded_in_batches_reopens_as_one_recorded_row_by_row(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "single").mkdir()
    (tmp_path / "batched").mkdir()
    single = _session_run(tmp_path / "single", False, monkeypatch)
    batched = _session_run(tmp_path / "batched", True, monkeypatch)
    assert single["stats"][0] < single["stats"][1]       # some CGs reverted
    assert batched == single


def test_a_groups_fresh_bitmaps_come_from_the_pool_cleared_then_from_new_files(tmp_path):
    """``SQLiteStore.new_bitmaps`` (a group's prepares take three per
    relationship): recycled files first, every one cleared, then new files;
    no file handed out twice."""
    side = Side(tmp_path / "u")
    store = side.store
    try:
        for m in side.maps:                # dirty, then recycled (no row names them)
            m.set_range(0, N_BITS)
        with store.transaction():
            store._garbage |= {m.file_id for m in side.maps}
        pooled = {m.file_id for m in store._pool.get(N_BITS, [])}
        assert pooled == {m.file_id for m in side.maps}
        got = store.new_bitmaps(N_BITS, N_MAPS + 3)
        ids = [b.file_id for b in got]
        assert len(set(ids)) == len(ids) == N_MAPS + 3
        assert set(ids[:N_MAPS]) == pooled and not set(ids[N_MAPS:]) & pooled
        assert all(not b.any() and b.n_bits == N_BITS for b in got)
        assert all((store.bitmap_dir / f"{i}.bm").exists() for i in ids)
        assert store.new_bitmaps(N_BITS, 0) == []
    finally:
        store.close()


def test_cgs_of_more_triplets_than_the_pool_size_reuse_their_bitmap_files(tmp_path,
                                                                          monkeypatch):
    """A commit drops three bitmap files per relationship and the next
    prepare takes as many: the pool keeps them all, even past its nominal
    size, so steady CGs create (and delete) no files."""
    import fastfc.durable.sqlite as sqlite_mod
    monkeypatch.setattr(sqlite_mod, "POOL_PER_SIZE", 4)
    with StorageUnit(tmp_path / "p") as u1, StorageUnit(tmp_path / "s") as u2:
        trips = [(u1.create_volume(f"A{i}", 8, 4096), u2.create_volume(f"B{i}", 8, 4096),
                  u2.create_volume(f"C{i}", 8, 4096)) for i in range(6)]
        gm = GlobalMirror(trips, initial_copy=False, max_coordination_time=1.0)
        for _ in range(2):
            assert gm.form_consistency_group().committed
        files = sorted(p.name for p in (tmp_path / "s" / "bitmaps").glob("*.bm"))
        for _ in range(3):
            assert gm.form_consistency_group().committed
        assert sorted(p.name for p in (tmp_path / "s" / "bitmaps").glob("*.bm")) == files
        gm.close(discard=True)


def test_a_unit_from_before_the_flashcopy_log_opens_and_is_upgraded_read_write(tmp_path):
    """Schema 1 (no flash_log table): read-only opens read it as it is; the
    first read-write open adds the table and records the current schema, which a
    fastfc that knows no log refuses."""
    import sqlite3
    path = tmp_path / "u"
    with StorageUnit(path) as u:
        s, t = u.create_volume("S", 8, 4096), u.create_volume("T", 8, 4096)
        FlashCopy(s, t, background_copy=False, record=True)
    db = sqlite3.connect(path / "unit.db")
    db.execute("DROP TABLE flash_log")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()
    with StorageUnit(path, readonly=True) as u:
        assert [fc.target.name for fc in u.flashcopies] == ["T"]
    db = sqlite3.connect(path / "unit.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("1",)
    db.close()
    with StorageUnit(path) as u:
        assert [fc.target.name for fc in u.flashcopies] == ["T"]
    db = sqlite3.connect(path / "unit.db")
    assert db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (str(SCHEMA_VERSION),)
    assert db.execute("SELECT count(*) FROM flash_log").fetchone() == (0,)
    db.close()


class _Tagged(TrackBitmap):
    """A bitmap with a file id, as a unit's bitmap files have."""


def _bitmap(fid):
    if fid == "plain":
        return TrackBitmap(8)         # a bitmap without a file
    if fid is None:
        return None
    bm = _Tagged(8)
    bm.file_id = fid
    return bm


_fids = st.one_of(st.none(), st.just("plain"), st.integers(0, 7))


@settings(max_examples=min(150, settings.default.max_examples), deadline=None)
@given(steps=st.lists(st.tuples(
           st.integers(0, 5),                                  # row id
           st.integers(0, 2**40), st.booleans(),               # sequence, revertible
           st.tuples(*[_fids] * 3), st.one_of(st.none(), st.tuples(*[_fids] * 3)),
           st.integers(0, 2**40)),                             # the revert image's sequence
           min_size=1, max_size=6, unique_by=lambda s: s[0]),
       old=st.dictionaries(st.integers(0, 5), st.frozensets(st.integers(0, 9), max_size=4),
                           max_size=5),
       in_transaction=st.booleans(), as_records=st.booleans())
def test_a_log_rows_body_and_its_file_bookkeeping_match_a_plain_model(
        steps, old, in_transaction, as_records):
    """``_core.log_rows`` (a unit's CG step record, built in one core call
    from the relationships or their records) against a plain model: each
    relationship's ten columns packed as little-endian int64, and the files
    each row names counted again from scratch."""
    missing = object()
    rows = {("fc", rid): set(f) for rid, f in old.items()}
    refs: dict[int, int] = {}
    for f in rows.values():
        for x in f:
            refs[x] = refs.get(x, 0) + 1
    undo = {} if in_transaction else None
    want_rows = {k: set(v) for k, v in rows.items()}
    want_undo: dict = {}
    want_gone: set = set()
    body = b""
    rels, ids = [], []
    src, tgt = Volume(8, 4096), Volume(8, 4096)
    for rid, seq, rev, cur, image, rvs in steps:
        maps = [_bitmap(f) for f in cur + (image or (None, None, None))]
        if image is not None and maps[3] is None:
            image = None            # (a revert image has its to_copy)
            maps[3:] = [None] * 3
        fc = FlashCopy.__new__(FlashCopy)
        fc.source, fc.target = src, tgt
        fc.to_copy, fc.src_changed, fc.tgt_changed = maps[:3]
        fc._revert_image = None if image is None else (*maps[3:], rvs)
        fc.sequence, fc.revertible = seq, rev
        fc._store_id, fc._options = rid, {}
        rels.append(fc.to_record() if as_records else fc)
        ids.append(rid)
        fids = [getattr(m, "file_id", None) for m in maps]
        body += struct.pack("<10q", rid, seq, int(rev), *[-1 if f is None else f for f in fids],
                            -1 if image is None else rvs)
        key = ("fc", rid)
        now = {f for f in fids if f is not None}
        if key not in want_undo:
            want_undo[key] = set(want_rows[key]) if key in want_rows else missing
        want_gone |= want_rows.get(key, set()) - now
        want_rows[key] = now
    want_refs: dict[int, int] = {}
    for f in want_rows.values():
        for x in f:
            want_refs[x] = want_refs.get(x, 0) + 1

    got_body, got_gone = _core.log_rows(rels, ids, rows, refs, undo, missing, -1)
    assert got_body == body
    assert got_gone == want_gone
    assert rows == want_rows
    assert refs == want_refs
    if in_transaction:
        assert undo == want_undo
