"""NBD structured replies and block status: what :mod:`fastfc.tools.nbd`
serves once a client negotiates ``NBD_OPT_STRUCTURED_REPLY`` and selects
metadata contexts (``NBD_OPT_SET_META_CONTEXT``), following the protocol
document (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md,
"Structured reply chunk message" and "Metadata querying").

The contexts of an export (a volume V), each answering
``NBD_CMD_BLOCK_STATUS`` in whole grains (:attr:`Volume.grain_size`):

``base:allocation``
    Holes (``NBD_STATE_HOLE | NBD_STATE_ZERO``): the grains of a thin
    volume whose file has no blocks there (``SEEK_DATA``/``SEEK_HOLE`` on
    its file); a FlashCopy target's grains still read from its source
    (``to_copy``) have the source's status. Thick and in-memory volumes
    report all data (status 0): always true, if less useful.
    A recovery point's export (``V#N``): a grain a point holds is data,
    any other has its volume's status (:class:`PointAllocation`); a
    recovery volume whose restore still copies has, for its grains not
    copied yet, its point's.
``qemu:dirty-bitmap:T``
    For each FlashCopy with change recording in which V is the source or
    the target, named after its target T: the grains written on the
    source or the target since the relationship was established or last
    incrementally resynced (``src_changed | tgt_changed``), status
    ``NBD_STATE_DIRTY`` (1). These are the only grains where T's image
    and S's current image may differ.
``qemu:dirty-bitmap:T@last-resync``
    Once this server has run an incremental resync of that FlashCopy: the
    grains that resync took in (:attr:`FlashCopy.last_resync_changes`),
    where T's image differs from its image before it. Fixed at the
    resync's instant, so a backup that resyncs first, then lists this and
    copies those grains from T, races no host write.
``qemu:dirty-bitmap:B``
    When V is the primary of a PPRC pair with secondary B (unless a
    FlashCopy target of V has that name too): the grains B does not have
    yet (the out-of-sync bitmap, and a consistency group's in flight).

A bitmap is read under the locks the engine takes to change it (the
FlashCopy's source and target, in volume-id order; a pair's primary then
secondary), a copy of the words the request covers, so a reply never
shows half of a host write's bits; it is encoded outside them. The
relationship (or pair) is looked up anew for each request: after a
resync (fresh bitmaps) the reply shows the new recording, and after a
withdraw an error chunk says so.

Extended headers (``NBD_OPT_EXTENDED_HEADERS``) are not offered: the
protocol document still calls them experimental, and the clients here
(libnbd's nbdinfo and nbdcopy, qemu's nbd driver) fall back to structured
replies when a server answers ``NBD_REP_ERR_UNSUP``.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fastfc.errors import VolumeClosedError
from fastfc.storage.volume import Volume, locked
from fastfc.tools.nbd_points import PointImage

log = logging.getLogger("fastfc.nbd")

# -- protocol constants (proto.md) ---------------------------------------------------
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_META_CONTEXT = 4
REP_ERR_TOO_BIG = (1 << 31) + 9

REPLY_FLAG_DONE = 1 << 0

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

CMD_BLOCK_STATUS = 7
CMD_FLAG_REQ_ONE = 1 << 3

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0          # qemu:dirty-bitmap:

BASE_ALLOCATION = "base:allocation"
DIRTY_BITMAP = "qemu:dirty-bitmap:"
#: the suffix of a FlashCopy's last-resync bitmap (no volume name holds "@")
LAST_RESYNC = "@last-resync"

#: descriptors in one BLOCK_STATUS chunk at most (proto.md: SHOULD NOT
#: exceed 2^20); a reply cut there covers less than was asked
MAX_EXTENTS = 1 << 16
#: contexts one SET_META_CONTEXT may select
MAX_CONTEXTS = 256
#: longest extent a descriptor's 32-bit length can carry
_MAX_LENGTH = (1 << 32) - 1
#: longest error message in an error chunk (proto.md: 4096 bytes)
_MAX_MESSAGE = 4096

E_IO, E_INVAL = 5, 22

_CHUNK = struct.Struct(">IHHQI")        # magic, flags, type, cookie, length
_DATA_CHUNK = struct.Struct(">IHHQIQ")  # ... + the data's offset
_ERROR = struct.Struct(">IH")


def data_header(handle: int, offset: int, length: int) -> bytes:
    """The header of the one ``OFFSET_DATA`` chunk answering a READ of
    ``length`` bytes at ``offset`` (its data follows)."""
    return _DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                            handle, length + 8, offset)


def none_chunk(handle: int) -> bytes:
    """A final ``NONE`` chunk: the request succeeded, nothing to carry."""
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)


def error_chunk(handle: int, err: int, message: str = "", offset: int | None = None) -> bytes:
    """A final ``ERROR`` chunk (``ERROR_OFFSET`` with an ``offset``)
    carrying NBD error ``err`` and a message for the human at the client."""
    msg = message.encode("utf-8", "replace")[:_MAX_MESSAGE]
    body = _ERROR.pack(err, len(msg)) + msg
    kind = REPLY_TYPE_ERROR
    if offset is not None:
        body += struct.pack(">Q", offset)
        kind = REPLY_TYPE_ERROR_OFFSET
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, kind, handle, len(body)) + body


def parse_meta_option(data: bytes) -> tuple[str, list[str]]:
    """The export name and the queries of a ``LIST_META_CONTEXT`` or
    ``SET_META_CONTEXT`` option's data; ValueError naming what is wrong
    (the option is answered ``NBD_REP_ERR_INVALID`` with it)."""
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes of option data: too short for an export name "
                         "and a query count")
    (nlen,) = struct.unpack_from(">I", data, 0)
    if 4 + nlen + 4 > len(data):
        raise ValueError(f"an export name of {nlen} bytes runs past the option's data")
    name = data[4:4 + nlen].decode("utf-8", "replace")
    (count,) = struct.unpack_from(">I", data, 4 + nlen)
    pos = 8 + nlen
    queries: list[str] = []
    for i in range(count):
        if pos + 4 > len(data):
            raise ValueError(f"query {i + 1} of {count} runs past the option's data")
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            raise ValueError(f"query {i + 1} of {count} ({qlen} bytes) runs past the "
                             "option's data")
        try:
            query = data[pos:pos + qlen].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"query {i + 1} of {count} is not UTF-8") from None
        if ":" not in query:
            raise ValueError(f"query {query!r} has no namespace (a context name is "
                             "namespace:leaf, e.g. base:allocation)")
        queries.append(query)
        pos += qlen
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the last query")
    return name, queries


def match_contexts(queries: Iterable[str], available: Iterable[str], *,
                   listing: bool) -> list[str]:
    """The available context names the queries select, in ``available``'s
    order. Listing (``LIST_META_CONTEXT``) no queries means every context,
    and a query ending in a colon (``base:``, ``qemu:``,
    ``qemu:dirty-bitmap:``) is a wildcard for the names it begins;
    selecting (``SET_META_CONTEXT``), only whole names select."""
    names = list(available)
    qs = list(queries)
    if listing and not qs:
        return names
    out = []
    for n in names:
        for q in qs:
            if n == q or (listing and q.endswith(":") and n.startswith(q)):
                out.append(n)
                break
    return out


#: what a SET_META_CONTEXT selected: the export's name, the (id, name) of
#: the contexts, the names asked for that the export does not offer
Selection = tuple[str, list[tuple[int, str]], list[str]]

_REP_ERR_INVALID = (1 << 31) + 3
_REP_ERR_UNKNOWN = (1 << 31) + 6


def meta_context_option(opt: int, data: bytes, structured: bool,
                        find: Callable[[str], Any], looked_up: Callable[[Callable[[], Any]], Any]
                        ) -> tuple[list[tuple[int, bytes]], Selection | None]:
    """The replies (type, payload) to a ``LIST_META_CONTEXT`` or
    ``SET_META_CONTEXT`` option, and (SET) what it selected (None: nothing,
    after an error). ``find(name)`` is the server's export lookup,
    ``looked_up(f)`` runs ``f`` under its lookup lock."""
    setting = opt == OPT_SET_META_CONTEXT
    if not structured:
        return [(_REP_ERR_INVALID, b"metadata contexts need structured replies: "
                                   b"NBD_OPT_STRUCTURED_REPLY first")], None
    try:
        name, queries = parse_meta_option(data)
    except ValueError as e:
        return [(_REP_ERR_INVALID, str(e).encode())], None
    export = find(name)
    if export is None:
        return [(_REP_ERR_UNKNOWN, f"no export (volume) named {name!r}".encode())], None
    vol = export.volume
    have = looked_up(lambda: contexts_of(vol))
    chosen = match_contexts(queries, have, listing=not setting)
    if setting and len(chosen) > MAX_CONTEXTS:
        return [(REP_ERR_TOO_BIG, f"{len(chosen)} contexts (at most {MAX_CONTEXTS})".encode())
                ], None
    picked = [(i + 1 if setting else 0, n) for i, n in enumerate(chosen)]
    replies = [(REP_META_CONTEXT, struct.pack(">I", i) + n.encode()) for i, n in picked]
    replies.append((1, b""))                  # NBD_REP_ACK
    if not setting:
        return replies, None
    missing = [q for q in queries if q not in chosen]
    if missing:
        log.info("NBD export %s offers no metadata context %s (it offers %s)",
                 name, ", ".join(missing), ", ".join(have))
    return replies, (name, picked, missing)


# -- the contexts ------------------------------------------------------------------
class ContextError(Exception):
    """A context cannot answer: ``errno`` is the NBD error, the message
    goes to the client in the error chunk."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class Status:
    """One context's answer over ``n`` grains from ``g0``: the status
    changes at each grain of ``cuts`` (ascending, in ``(0, n)``); grain 0
    is marked (status ``on``) if ``first``, else ``off``; ``more`` grains
    past the end have the last grain's status too (0: unknown), so the
    final extent may run on past the request."""
    cuts: np.ndarray
    first: bool
    n: int
    on: int
    off: int
    more: int = 0

    @classmethod
    def of_bools(cls, marked: np.ndarray, on: int, off: int, more: int = 0) -> "Status":
        """From a bool per grain (marked: ``on``)."""
        cuts = np.flatnonzero(marked[1:] != marked[:-1]) + 1
        return cls(cuts, bool(marked[0]) if marked.size else False, int(marked.size),
                   on, off, more)

    @classmethod
    def of_words(cls, words_list: list[np.ndarray], g0: int, g1: int, on: int, off: int,
                 more: int = 0) -> "Status":
        """From the words (copies, from word ``g0 >> 6``) of bitmaps whose
        OR marks a grain, in time proportional to the words plus the
        changes of status: only words where a bit differs from the one
        before it are looked at bit by bit."""
        acc = words_list[0]
        for w in words_list[1:]:
            acc = acc | w
        s = g0 - ((g0 >> 6) << 6)          # grain g0's bit in acc
        n = g1 - g0
        carry = np.empty_like(acc)
        if acc.size:
            carry[0] = acc[0] & np.uint64(1)          # no change before bit 0
            carry[1:] = acc[:-1] >> np.uint64(63)
        flips = acc ^ ((acc << np.uint64(1)) | carry)  # bit i: bit i != bit i - 1
        nz = np.flatnonzero(flips)
        idx = np.flatnonzero(np.unpackbits(flips[nz].view(np.uint8), bitorder="little"))
        pos = nz[idx >> 6].astype(np.int64) * 64 + (idx & 63)
        cuts = pos[(pos > s) & (pos < s + n)] - s
        first = bool((int(acc[0]) >> s) & 1) if n else False
        return cls(cuts, first, n, on, off, more)

    @property
    def marked(self) -> np.ndarray:
        """A bool per grain: marked (status ``on``)."""
        lengths = np.diff(np.concatenate(([0], self.cuts, [self.n])))
        return np.repeat((np.arange(lengths.size) % 2 == 0) == self.first, lengths)

    @property
    def last(self) -> bool:
        """Whether the last grain is marked."""
        return self.first ^ bool(self.cuts.size & 1)


class Context:
    """A metadata context of one export."""

    name: str

    def status(self, g0: int, g1: int) -> Status:
        raise NotImplementedError


def _bits(words_list: list[np.ndarray], g0: int, g1: int) -> np.ndarray:
    """The bits ``[g0, g1)`` of the OR of the bitmaps whose word ranges
    (from word ``g0 >> 6``, copies) are given: a bool per grain."""
    acc = words_list[0]
    for w in words_list[1:]:
        acc = acc | w
    bits = np.unpackbits(np.ascontiguousarray(acc).view(np.uint8), bitorder="little")
    base = (g0 >> 6) << 6
    return bits[g0 - base:g1 - base].astype(bool)


def _words(bm: Any, g0: int, g1: int) -> np.ndarray:
    """A copy of the words of ``bm`` holding bits ``[g0, g1)`` (caller holds
    the lock that guards it)."""
    return np.array(bm.words[g0 >> 6:(g1 + 63) >> 6], dtype=np.uint64)


def _next_set(bms: list[Any], start: int, n: int) -> int:
    """The first bit at or after ``start`` set in any of ``bms`` (``n`` if none)."""
    best = n
    for bm in bms:
        k = bm.find_next_set(start)
        if 0 <= k < best:
            best = k
    return best


class FlashCopyChanges(Context):
    """``qemu:dirty-bitmap:T``: the change recording of the FlashCopy onto
    the volume ``target``."""

    def __init__(self, target: Volume) -> None:
        self.target = target
        self.name = DIRTY_BITMAP + target.name

    def status(self, g0: int, g1: int) -> Status:
        T = self.target
        rel = T.target_relationship
        if rel is None or not rel.active or rel.src_changed is None:
            raise ContextError(E_IO, f"{self.name}: no FlashCopy with change recording onto "
                                  f"{T.name} any more (withdrawn): its changes are not known")
        with locked((rel.source, T)):
            if T.target_relationship is not rel or rel.src_changed is None:
                raise ContextError(E_IO, f"{self.name}: the FlashCopy onto {T.name} changed "
                                      "while being read; ask again")
            maps = [rel.src_changed, rel.tgt_changed]
            words = [_words(bm, g0, g1) for bm in maps]
            n = T.n_grains
            more = 0
            if g1 < n:   # a clean end runs on to the next change
                more = _next_set(maps, g1, n) - g1
        st = Status.of_words(words, g0, g1, STATE_DIRTY, 0, more)
        if st.n and st.last:
            st.more = 0
        return st


class LastResyncChanges(Context):
    """``qemu:dirty-bitmap:T@last-resync``: the grains the last
    incremental resync of the FlashCopy onto ``target`` took in
    (:attr:`FlashCopy.last_resync_changes`): where the target's image
    differs from its image before that resync. A bitmap made once, at the
    resync's instant, and never changed: read without a lock."""

    def __init__(self, target: Volume) -> None:
        self.target = target
        self.name = DIRTY_BITMAP + target.name + LAST_RESYNC

    def status(self, g0: int, g1: int) -> Status:
        T = self.target
        rel = T.target_relationship
        last = None if rel is None or not rel.active else rel.last_resync_changes
        if last is None:
            raise ContextError(E_IO, f"{self.name}: no incremental resync of a FlashCopy onto "
                                  f"{T.name} known to this server any more")
        bm = last[1]
        n = T.n_grains
        more = _next_set([bm], g1, n) - g1 if g1 < n else 0
        st = Status.of_words([_words(bm, g0, g1)], g0, g1, STATE_DIRTY, 0, more)
        if st.n and st.last:
            st.more = 0
        return st


class MirrorOutOfSync(Context):
    """``qemu:dirty-bitmap:B``: what the PPRC pair from ``primary`` to its
    secondary B still owes B."""

    def __init__(self, primary: Volume, secondary_name: str) -> None:
        self.primary = primary
        self.name = DIRTY_BITMAP + secondary_name

    def status(self, g0: int, g1: int) -> Status:
        P = self.primary
        pair = P.mirror
        if pair is None or not getattr(pair, "active", True) or \
                DIRTY_BITMAP + pair.secondary.name != self.name:
            raise ContextError(E_IO, f"{self.name}: no PPRC pair from {P.name} to that "
                                  "secondary any more: what it owes is not known")
        # every change of these bits (a host write setting them, a drain or
        # a CG's end clearing them) runs under the primary's lock
        with locked((P,)):
            maps = [bm for bm in (pair.oos, pair.cg) if bm is not None]
            words = [_words(bm, g0, g1) for bm in maps]
            n = P.n_grains
            more = _next_set(maps, g1, n) - g1 if g1 < n else 0
        st = Status.of_words(words, g0, g1, STATE_DIRTY, 0, more)
        if st.n and st.last:
            st.more = 0
        return st


class Allocation(Context):
    """``base:allocation`` of a volume: see the module's documentation."""

    name = BASE_ALLOCATION

    def __init__(self, volume: Volume) -> None:
        self.volume = volume

    def status(self, g0: int, g1: int) -> Status:
        vol = self.volume
        if vol.closed:
            raise VolumeClosedError(f"{vol.name} was removed")
        # the grains still read from a FlashCopy source (to_copy) have the
        # source's status. Bits first, files after: a file only gains
        # blocks, so each grain's answer held when the bits were read (or
        # says data, which is always true)
        owed = None
        if isinstance(vol, Volume) and vol.restoring is not None:
            return _restoring_status(vol, g0, g1)
        rel = vol.target_relationship
        if rel is not None and rel.active:
            with locked((rel.source, vol)):
                if vol.target_relationship is rel:
                    owed = _bits([_words(rel.to_copy, g0, g1)], g0, g1)
            if owed is None:            # (it changed meanwhile: all data)
                return Status.of_bools(np.ones(g1 - g0, dtype=bool), 0,
                                       STATE_HOLE | STATE_ZERO)
        path = getattr(vol, "path", None)
        gs = vol.grain_size
        if vol.thin and path is not None:
            data, more_bytes = _file_data(path, g0 * gs, g1 * gs, vol.capacity, gs)
        else:
            data, more_bytes = np.ones(g1 - g0, dtype=bool), 0
        if owed is not None and rel is not None:
            if owed.any():
                src = Allocation(rel.source).status(g0, g1).marked \
                    if rel.source.n_grains == vol.n_grains else True
                data = np.where(owed, src, data)
            more_bytes = 0
        more = more_bytes // gs
        if data.size and data[-1]:
            more = 0
        return Status.of_bools(data, 0, STATE_HOLE | STATE_ZERO, more)


class PointAllocation(Context):
    """``base:allocation`` of a recovery point's export: a grain some point
    of the chain holds is data; any other has its volume's status (a hole
    of the file now was one, all zeroes, at the point's instant: a file
    only gains blocks, TRIM is not offered). The held grains are read
    before the volume's status and after (see :mod:`.nbd_points`)."""

    name = BASE_ALLOCATION

    def __init__(self, image: PointImage) -> None:
        self.image = image

    def status(self, g0: int, g1: int) -> Status:
        before = self.image.held_bits(g0, g1)
        live = Allocation(self.image.volume).status(g0, g1).marked
        after = self.image.held_bits(g0, g1)
        return Status.of_bools(before | live | after, 0, STATE_HOLE | STATE_ZERO)


def _restoring_status(vol: Volume, g0: int, g1: int) -> Status:
    """``base:allocation`` of a recovery volume whose restore still copies:
    the grains not copied yet read through the point and have its status;
    the others the volume's file's (the copy bits first: a grain copied
    stays copied, and its file then has blocks there)."""
    rs = vol.restoring
    owed = None
    if rs is not None:
        with locked((rs.point.volume, vol)):
            if vol.restoring is rs:
                owed = ~_bits([_words(rs.copied, g0, g1)], g0, g1)
    if owed is None:                # (it completed meanwhile: the file says it all)
        return Allocation(vol).status(g0, g1)
    gs = vol.grain_size
    path = getattr(vol, "path", None)
    if vol.thin and path is not None:
        data, _ = _file_data(path, g0 * gs, g1 * gs, vol.capacity, gs)
    else:
        data = np.ones(g1 - g0, dtype=bool)
    if owed.any():
        assert rs is not None
        try:
            point = PointAllocation(PointImage(rs.point)).status(g0, g1).marked
        except VolumeClosedError:
            point = np.ones(g1 - g0, dtype=bool)     # (all data: always true)
        data = np.where(owed, point, data)
    return Status.of_bools(data, 0, STATE_HOLE | STATE_ZERO)


def _file_data(path: Any, start: int, stop: int, capacity: int,
               gs: int) -> tuple[np.ndarray, int]:
    """Which grains of ``[start, stop)`` (bytes, grain-aligned) of the file
    at ``path`` hold data (a grain with any block is data), and how many
    bytes of hole follow ``stop``."""
    n = (stop - start) // gs
    data = np.zeros(n, dtype=bool)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        data[:] = True
        return data, 0
    more = 0
    try:
        pos = start
        while pos < stop:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                d = capacity       # holes to the end
            if d >= stop:
                more = min(d, capacity) - stop
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), capacity)
            data[(d - start) // gs:min(n, -(-(h - start) // gs))] = True
            pos = h
    except OSError:
        data[:] = True             # no SEEK_DATA here: all data
        more = 0
    finally:
        os.close(fd)
    return data, more


def contexts_of(vol: Volume) -> dict[str, Context]:
    """Every metadata context export ``vol`` offers, by name."""
    if isinstance(vol, PointImage):
        return {BASE_ALLOCATION: PointAllocation(vol)}
    out: dict[str, Context] = {BASE_ALLOCATION: Allocation(vol)}
    rels = list(vol.source_relationships)
    tgt = vol.target_relationship
    if tgt is not None:
        rels.append(tgt)
    for rel in rels:
        if rel.active and getattr(rel, "record", False) and rel.src_changed is not None:
            out.setdefault(DIRTY_BITMAP + rel.target.name, FlashCopyChanges(rel.target))
            if rel.last_resync_changes is not None:
                out.setdefault(DIRTY_BITMAP + rel.target.name + LAST_RESYNC,
                               LastResyncChanges(rel.target))
    pair = vol.mirror
    if pair is not None and getattr(pair, "active", True):
        out.setdefault(DIRTY_BITMAP + pair.secondary.name,
                       MirrorOutOfSync(vol, pair.secondary.name))
    return out


# -- BLOCK_STATUS -------------------------------------------------------------------
def descriptors(st: Status, g0: int, gs: int, offset: int, end: int, capacity: int,
                req_one: bool) -> np.ndarray:
    """The (length, status) descriptors of ``st`` for the request
    ``[offset, end)``: consecutive from ``offset``, the runs of equal
    status coalesced; the final one may run on past ``end`` (its status
    holds there too) unless ``req_one``; at most :data:`MAX_EXTENTS`."""
    n = st.n
    starts = np.concatenate(([0], st.cuts))
    stops = np.concatenate((st.cuts, [n]))
    if req_one:
        starts, stops = starts[:1], stops[:1]
    elif starts.size > MAX_EXTENTS:
        starts, stops = starts[:MAX_EXTENTS], stops[:MAX_EXTENTS]
    lo = (g0 + starts).astype(np.int64) * gs
    hi = (g0 + stops).astype(np.int64) * gs
    lo[0] = offset
    last_is_end = stops[-1] == n
    if last_is_end:
        stop = min(int(hi[-1]), capacity)
        if req_one:
            stop = min(stop, end)
        elif st.more:
            stop = min(stop + st.more * gs, capacity)
        if stop - int(lo[-1]) > _MAX_LENGTH:
            stop = int(lo[-1]) + (_MAX_LENGTH // gs) * gs
            if stop <= int(lo[-1]):
                stop = end
        hi[-1] = stop
    elif req_one:
        hi[-1] = min(int(hi[-1]), end)
    out = np.empty((starts.size, 2), dtype=">u4")
    out[:, 0] = hi - lo
    marked = (np.arange(starts.size) & 1) == (0 if st.first else 1)
    out[:, 1] = np.where(marked, st.on, st.off)
    return out


def block_status(handle: int, vol: Volume, selected: Sequence[tuple[int, Context]],
                 offset: int, length: int, flags: int,
                 error_number: Callable[[BaseException], int],
                 unselected: Iterable[str] = ()) -> bytes:
    """The whole structured reply to one ``NBD_CMD_BLOCK_STATUS``: a
    ``BLOCK_STATUS`` chunk per selected context (the last one ``DONE``),
    or one error chunk (``error_number``: the NBD error of an exception)."""
    if not selected:
        asked = list(unselected)
        why = (f"the export {vol.name} offers no metadata context {', '.join(asked)}"
               if asked else "no metadata context selected")
        try:
            offered = ", ".join(contexts_of(vol))
        except Exception:
            offered = "none now"
        return error_chunk(handle, E_INVAL, f"{why}: NBD_CMD_BLOCK_STATUS needs "
                           "NBD_OPT_SET_META_CONTEXT selecting at least one context of "
                           f"this export before NBD_OPT_GO (it offers {offered})")
    if flags & ~(CMD_FLAG_REQ_ONE | 1):       # (FUA tolerated, as proto.md asks)
        return error_chunk(handle, E_INVAL, f"unknown command flags {flags:#x}")
    capacity = vol.capacity
    if length == 0 or offset + length > capacity:
        return error_chunk(handle, E_INVAL, f"block status of {length} bytes at {offset}: "
                           f"the export has {capacity} bytes")
    gs = vol.grain_size
    g0 = offset // gs
    g1 = min(-(-(offset + length) // gs), vol.n_grains)
    end = offset + length
    req_one = bool(flags & CMD_FLAG_REQ_ONE)
    chunks = []
    for ctx_id, ctx in selected:
        try:
            st = ctx.status(g0, g1)
        except ContextError as e:
            return error_chunk(handle, e.errno, str(e))
        except Exception as e:
            err = error_number(e)
            return error_chunk(handle, err or E_IO, f"{ctx.name}: {e}")
        desc = descriptors(st, g0, gs, offset, end, capacity, req_one)
        chunks.append((ctx_id, desc.tobytes()))
    out = bytearray()
    for i, (ctx_id, body) in enumerate(chunks):
        done = REPLY_FLAG_DONE if i == len(chunks) - 1 else 0
        out += _CHUNK.pack(STRUCTURED_REPLY_MAGIC, done, REPLY_TYPE_BLOCK_STATUS, handle,
                           4 + len(body))
        out += struct.pack(">I", ctx_id)
        out += body
    return bytes(out)
