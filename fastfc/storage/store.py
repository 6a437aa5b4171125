"""Metadata stores: where every protocol step writes before its call returns.

:class:`Store` is the interface, and the in-memory store (it keeps nothing:
volumes outside a storage unit live and die with the process). A storage
unit keeps its metadata in a :class:`~fastfc.durable.sqlite.SQLiteStore`.

Stores are handed down, never looked up: a volume gets its store when it is
made (:attr:`fastfc.storage.volume.Volume.store`; :data:`MEMORY` for a volume
of no unit), and a relationship, pair or session takes the store of the
volumes it is given. What a store keeps goes in and out as records (plain
dicts: ``FlashCopy.to_record()``, ``PPRCPair.to_record()``,
``GlobalMirror.to_record()``); a store never writes onto an object nor reads
its private fields. Where a row gets an id, the save returns it and the
object keeps it.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Callable

from fastfc import _core
from fastfc._core import TrackBitmap


class Store:
    """The interface, and the in-memory store that keeps nothing.

    Bitmaps a relationship drops (a commit drops the revert image, a revert
    the new image) come back through :meth:`recycle` and serve the next
    :meth:`new_bitmap` of that size: freeing multi-MiB arrays makes the C
    allocator hand memory back to the kernel, which would make commit and
    revert cost O(bitmap) after all. The pool is bounded by
    ``POOL_BYTES``.

    Parameters
    ----------
    on_session_added, on_session_dropped : callable, optional
        ``f(session)``, called when a Global Mirror session whose B volumes
        this store records is added (:meth:`add_session`) or dropped
        (:meth:`drop_session`): how the storage unit that made the store
        learns of its sessions.
    """

    durable = False
    readonly = False
    closed = False
    #: "process" or "power": what a committed step survives (memory: nothing
    #: to sync, so "process")
    durability = "process"
    uuid: str | None = None
    POOL_BYTES = 64 << 20

    def __init__(self, *, on_session_added: Callable | None = None,
                 on_session_dropped: Callable | None = None) -> None:
        self._free: dict[int, list[TrackBitmap]] = {}
        self._free_bytes = 0
        self._free_lock = threading.Lock()
        self._on_session_added = on_session_added
        self._on_session_dropped = on_session_dropped

    @property
    def ref(self) -> str:
        """How a row of another unit names this store's unit ("" in memory)."""
        return ""

    def sync(self, *things) -> None:
        """Write volumes' and bitmaps' dirty pages to the disk now (``msync``),
        in the order given: the ordering barrier of durability "power".
        Memory keeps nothing, so here it does nothing."""

    def new_bitmap(self, n_bits: int, fill: bool = False) -> TrackBitmap:
        with self._free_lock:
            free = self._free.get(n_bits)
            bm = free.pop() if free else None
            if bm is not None:
                self._free_bytes -= bm.nbytes
        if bm is None:
            return TrackBitmap(n_bits, fill=fill)
        bm.fill(fill)
        return bm

    def new_bitmaps(self, n_bits: int, count: int) -> list[TrackBitmap]:
        """``count`` empty bitmaps of ``n_bits``, from the pool first (one
        lock for them all): a consistency group's prepares take three per
        relationship."""
        if count <= 0:
            return []
        if type(self).new_bitmap is not Store.new_bitmap:   # a store that places them
            return [self.new_bitmap(n_bits) for _ in range(count)]
        with self._free_lock:
            free = self._free.get(n_bits)
            got = []
            if free:
                got = free[-count:]
                del free[-count:]
                if got:   # one size: n_bits
                    self._free_bytes -= len(got) * got[0].nbytes
        _core.zero_bitmaps(got)
        got += [TrackBitmap(n_bits) for _ in range(count - len(got))]
        return got

    def recycle(self, bitmaps) -> None:
        """Take back bitmaps that nothing references any more."""
        with self._free_lock:
            self._free_bytes = _core.pool_bitmaps(bitmaps, self._free, self._free_bytes,
                                                  self.POOL_BYTES)

    def transaction(self, sync: bool = True):
        """Group several saves into one durable commit (one fsync)."""
        return nullcontext()

    def check_writable(self) -> None:
        """Raise if a change cannot be recorded (a closed or read-only unit):
        called before a step changes anything, so that a refusal changes
        nothing."""

    # -- records -------------------------------------------------------------
    def save_flash(self, record: dict) -> int | None:
        """Record a FlashCopy relationship (``FlashCopy.to_record()``);
        returns the id of its row (None in memory)."""
        return None

    def save_flashes(self, records: list[dict]) -> list[int | None]:
        """Record a batch of FlashCopy relationships (``FlashCopy.to_record()``
        each, each relationship at most once), the steps of one consistency
        group on this store, as one change: returns the id of each row, in
        order. A storage unit records it in a few statements whatever its
        size (:class:`~fastfc.durable.sqlite.SQLiteStore`: one row of its
        FlashCopy log). (Memory keeps nothing: its callers build no records.)"""
        return [self.save_flash(r) for r in records]

    def save_steps(self, rels: list, ids: list[int | None],
                   options: list[dict]) -> list[int | None]:
        """Record the FlashCopy relationships ``rels`` after one batched step
        (a consistency group's prepares, commits or reverts here): their row
        ids (None: no row yet) and options as the caller knows them. As
        :meth:`save_flashes` of their records, which a store may skip by
        reading the relationships' bitmaps and numbers itself. (Memory keeps
        nothing: its callers do not call.)"""
        return self.save_flashes([r.to_record() for r in rels])

    def drop_flash(self, record_id: int | None, target_flags: dict) -> None:
        """Forget relationship ``record_id`` and record its target's flags
        (``Volume.flags_record()``) in the same commit."""

    def save_pair(self, record: dict, partner: "Store | None" = None) -> int | None:
        """Record a PPRC pair (``PPRCPair.to_record()``) whose secondary's
        volumes ``partner`` records; returns the id of its row."""
        return None

    def drop_pair(self, record_id: int | None) -> None:
        pass

    def set_volume_flags(self, flags: dict) -> None:
        """Record a volume's flags (``Volume.flags_record()``)."""

    def save_secondary(self, name: str, record: dict | None) -> None:
        """Record (None: forget) what PPRC secondary ``name`` knows of its
        pair, whose row its primary's store keeps: ``primary_unit`` (the
        primary's store ``ref``), ``primary_name``, ``mode``. With the
        primary's unit lost, the secondary's unit still lists the pair and
        can fail it over (nothing in memory: a memory unit is never apart)."""

    def secondary_records(self) -> dict[str, dict]:
        """What :meth:`save_secondary` recorded, by secondary volume name."""
        return {}

    def add_session(self, record: dict, session, partners=()) -> None:
        """Record a new Global Mirror session (``GlobalMirror.to_record()``)
        whose A volumes ``partners`` (stores) record, and tell the listener."""
        if self._on_session_added is not None:
            self._on_session_added(session)

    def save_session_stats(self, name: str, stats: dict) -> None:
        """Record a session's counters (``GMStats.to_record()``). Inside an
        open transaction it is one statement of it; else its own commit,
        without an fsync (counters need no power-loss durability)."""

    def drop_session(self, name: str, session=None) -> None:
        """Forget session ``name`` and tell the listener."""
        if self._on_session_dropped is not None and session is not None:
            self._on_session_dropped(session)

    def session_rows(self) -> dict[str, dict]:
        """Recorded sessions by name (none in memory)."""
        return {}

    def session_configs(self) -> dict[str, dict]:
        """Recorded sessions' configurations by name: :meth:`session_rows`
        without their counters (one read where those take three)."""
        return {}

    def cg_decision(self, session: str, sequence: int, decision: str) -> None:
        pass

    # -- sessions over secondary sites, recorded by their A volumes' store ----------
    def save_site_session(self, name: str, record: dict) -> None:
        """Record (replace) the primary side of session ``name``, whose B
        and C volumes live on secondary sites (remote units) and whose A
        volumes this store holds: ``record`` is JSON-able (the triplets by
        name and unit, the settings, the counters; see
        :mod:`fastfc.copyservices.sitemirror`). Memory keeps nothing."""

    def save_site_stats(self, name: str, stats: dict) -> None:
        """Record the counters (``GMStats.to_record()``) of site session
        ``name``, without an fsync."""

    def site_sessions(self) -> dict[str, dict]:
        """The recorded sessions over secondary sites by name (none in
        memory)."""
        return {}

    def drop_site_session(self, name: str) -> None:
        """Forget site session ``name`` (nothing if it is not recorded)."""


#: The store of every volume that no storage unit holds.
MEMORY = Store()
