"""Structured replies and block status in ``fastfc serve``: the metadata
contexts ``base:allocation`` and ``qemu:dirty-bitmap:NAME`` byte by byte
with a raw socket client, then through the real clients (nbdinfo, qemu-img,
nbdcopy) against a model of the engine's change bitmaps, and an
incremental backup that moves only the changed extents.

The client tools come from apt (qemu-utils, libnbd-bin): a missing tool
skips a test on a developer machine and fails it under ``CI``.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import fastfc
from fastfc import StorageUnit
from fastfc.copyservices.pprc import PPRCPair
from fastfc.tools import nbd, nbd_status as ns

from test_serve import need, qemu_io, run, serving_here, uri
from test_serve_protocol import Client

MIB = 1 << 20
TRACK = 65536


# -- helpers --------------------------------------------------------------------------
def make(unit: Path, n_tracks: int = 256, *, pair: bool = False, copy: bool = False) -> None:
    """S and T (thin), a FlashCopy S -> T with change recording; with
    ``pair``, B and a Global Copy pair S -> B that never drains (its
    out-of-sync bitmap keeps every write)."""
    with StorageUnit(unit) as u:
        S = u.create_volume("S", n_tracks, TRACK, thin=True)
        T = u.create_volume("T", n_tracks, TRACK, thin=True)
        fc = fastfc.FlashCopy(S, T, background_copy=copy, record=True)
        if copy:
            fc.wait()
        if pair:
            B = u.create_volume("B", n_tracks, TRACK)
            PPRCPair(S, B, mode="gcp", initial_copy=False, background=False, name="p")


def volume(server, name: str):
    for u in server.units.open.values():
        if name in u:
            return u.volume(name)
    raise KeyError(name)


def grains_of(offset: int, length: int, gs: int) -> range:
    return range(offset // gs, (offset + length - 1) // gs + 1)


def runs(marked: np.ndarray, gs: int) -> list[tuple[int, int, bool]]:
    """(offset, length, marked) of each run of equal grains, in bytes."""
    out: list[tuple[int, int, bool]] = []
    cut = np.flatnonzero(marked[1:] != marked[:-1]) + 1
    for a, b in zip(np.concatenate(([0], cut)), np.concatenate((cut, [marked.size]))):
        out.append((int(a) * gs, int(b - a) * gs, bool(marked[a])))
    return out


def merged(extents) -> list[tuple[int, int, bool]]:
    """Adjacent extents of equal state as one."""
    out: list[tuple[int, int, bool]] = []
    for off, n, st in extents:
        if out and out[-1][2] == st and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, st)
        else:
            out.append((off, n, st))
    return out


def nbdinfo_map(sock: Path, name: str, context: str | None = None):
    """nbdinfo's map: (offset, length, flagged) with flagged = dirty for a
    dirty bitmap, data (not a hole) for base:allocation."""
    opt = "--map" if context is None else f"--map={context}"
    r = run("nbdinfo", "--json", opt, uri(sock, name))
    ext = json.loads(r.stdout)
    if context is None:
        return merged((e["offset"], e["length"], not e["type"] & ns.STATE_HOLE) for e in ext)
    return merged((e["offset"], e["length"], bool(e["type"] & ns.STATE_DIRTY)) for e in ext)


def qemu_map(sock: Path, name: str, bitmap: str | None = None):
    """qemu-img map's view: with x-dirty-bitmap, qemu reports a dirty
    extent as unallocated (``data`` false) and a clean one as data."""
    opts = f"driver=nbd,export={name},server.type=unix,server.path={sock}"
    if bitmap is not None:
        opts += f",x-dirty-bitmap={bitmap}"
    r = run("qemu-img", "map", "--output=json", "--image-opts", opts)
    ext = json.loads(r.stdout)
    if bitmap is not None:
        return merged((e["start"], e["length"], not e["data"]) for e in ext)
    return merged((e["start"], e["length"], e["data"]) for e in ext)


def raw_client(path: Path, export: str, contexts=(), *, structured=True) -> tuple[Client, dict]:
    """A raw client that negotiated structured replies, selected
    ``contexts`` on ``export`` and went into transmission: it and the
    context ids by name."""
    c = Client(str(path))
    ids: dict[str, int] = {}
    if structured:
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ACK
    if contexts:
        replies = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data(export, contexts))
        assert replies[-1][0] == nbd.REP_ACK, replies
        for t, d in replies[:-1]:
            assert t == ns.REP_META_CONTEXT
            ids[d[4:].decode()] = struct.unpack(">I", d[:4])[0]
    assert c.go(export)[-1][0] == nbd.REP_ACK
    return c, ids


def meta_option(c: Client, opt: int, data: bytes) -> list[tuple[int, bytes]]:
    """A LIST or SET_META_CONTEXT option: its replies up to the ACK or error."""
    c.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, o, rtype, n = struct.unpack(">QIII", c.recv(20))
        assert magic == nbd.REPLY_MAGIC and o == opt
        replies.append((rtype, c.recv(n)))
        if rtype != ns.REP_META_CONTEXT:
            return replies


def meta_data(export: str, queries) -> bytes:
    e = export.encode()
    out = struct.pack(">I", len(e)) + e + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def chunks(c: Client, handle: int) -> list[tuple[int, int, bytes]]:
    """The structured reply chunks of one request, up to the DONE one:
    (flags, type, payload)."""
    out = []
    while True:
        magic, flags, rtype, h, n = struct.unpack(">IHHQI", c.recv(20))
        assert magic == ns.STRUCTURED_REPLY_MAGIC and h == handle, (hex(magic), h)
        out.append((flags, rtype, c.recv(n)))
        if flags & ns.REPLY_FLAG_DONE:
            return out


def send(c: Client, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
         handle: int = 7) -> None:
    c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, handle, offset, length))


def status(c: Client, offset: int, length: int, flags: int = 0, handle: int = 9):
    """BLOCK_STATUS: {context id: [(length, status)]}, or the error chunk's
    (errno, message)."""
    send(c, ns.CMD_BLOCK_STATUS, offset, length, flags, handle)
    out = {}
    for fl, rtype, body in chunks(c, handle):
        if rtype == ns.REPLY_TYPE_ERROR:
            err, mlen = struct.unpack_from(">IH", body)
            return err, body[6:6 + mlen].decode()
        assert rtype == ns.REPLY_TYPE_BLOCK_STATUS and (len(body) - 4) % 8 == 0
        (cid,) = struct.unpack_from(">I", body)
        out[cid] = [tuple(x) for x in np.frombuffer(body[4:], ">u4").reshape(-1, 2).tolist()]
    return out


def expand(desc, offset: int, gs: int, n: int) -> np.ndarray:
    """Descriptors from ``offset`` as a flag per grain (the first ``n``)."""
    out = np.zeros(n, dtype=np.int64)
    pos = offset
    for length, st in desc:
        out[pos // gs:min(n, -(-(pos + length) // gs))] = st
        pos += length
    return out


# -- the protocol, byte by byte ----------------------------------------------------------
def test_negotiation_of_structured_replies_and_meta_contexts(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 16, pair=True)
    with serving_here(unit, sock):
        c = Client(str(sock))
        # metadata contexts need structured replies first
        r = meta_option(c, ns.OPT_LIST_META_CONTEXT, meta_data("S", []))
        assert r[-1][0] == nbd.REP_ERR_INVALID and b"STRUCTURED_REPLY" in r[-1][1]
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data("S", ["base:allocation"]))
        assert r[-1][0] == nbd.REP_ERR_INVALID
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ACK
        # extended headers: not offered (clients fall back)
        assert c.option(ns.OPT_EXTENDED_HEADERS)[-1][0] == nbd.REP_ERR_UNSUP

        def listed(export, queries):
            r = meta_option(c, ns.OPT_LIST_META_CONTEXT, meta_data(export, queries))
            assert r[-1][0] == nbd.REP_ACK, r
            assert all(t == ns.REP_META_CONTEXT and d[:4] == bytes(4) for t, d in r[:-1])
            return sorted(d[4:].decode() for _, d in r[:-1])

        everything = ["base:allocation", "qemu:dirty-bitmap:B", "qemu:dirty-bitmap:T"]
        assert listed("S", []) == everything
        assert listed("S", ["qemu:"]) == everything[1:]
        assert listed("S", ["qemu:dirty-bitmap:"]) == everything[1:]
        assert listed("S", ["base:"]) == ["base:allocation"]
        assert listed("S", ["qemu:dirty-bitmap:T", "x-other:thing"]) == ["qemu:dirty-bitmap:T"]
        assert listed("T", []) == ["base:allocation", "qemu:dirty-bitmap:T"]
        assert listed("B", []) == ["base:allocation"]
        # bad input: a clear refusal
        r = meta_option(c, ns.OPT_LIST_META_CONTEXT, meta_data("nope", []))
        assert r[-1][0] == nbd.REP_ERR_UNKNOWN and b"nope" in r[-1][1]
        r = meta_option(c, ns.OPT_LIST_META_CONTEXT, meta_data("S", ["allocation"]))
        assert r[-1][0] == nbd.REP_ERR_INVALID and b"namespace" in r[-1][1]
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data("S", ["base:allocation"])[:-3])
        assert r[-1][0] == nbd.REP_ERR_INVALID and b"runs past" in r[-1][1]
        # SET: whole names only, unknown ones ignored (proto.md), ids unique
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data(
            "S", ["qemu:dirty-bitmap:T", "base:", "qemu:dirty-bitmap:nope", "base:allocation"]))
        assert r[-1][0] == nbd.REP_ACK
        got = {d[4:].decode(): struct.unpack(">I", d[:4])[0] for _, d in r[:-1]}
        assert sorted(got) == ["base:allocation", "qemu:dirty-bitmap:T"]
        assert len(set(got.values())) == 2 and 0 not in got.values()
        # GO to the export the contexts were set for: BLOCK_STATUS answers both
        assert c.go("S")[-1][0] == nbd.REP_ACK
        reply = status(c, 0, 4096)
        assert sorted(reply) == sorted(got.values())


def test_contexts_set_for_another_export_select_none(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 16)
    with serving_here(unit, sock):
        c = Client(str(sock))
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ACK
        assert meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data(
            "T", ["base:allocation"]))[-1][0] == nbd.REP_ACK
        assert c.go("S")[-1][0] == nbd.REP_ACK          # not T: nothing selected
        err, msg = status(c, 0, 4096)
        assert err == nbd.E_INVAL and "no metadata context selected" in msg
        # the connection goes on
        send(c, nbd.CMD_READ, 0, 10, handle=3)
        assert [(f, t) for f, t, _ in chunks(c, 3)] == [(1, ns.REPLY_TYPE_OFFSET_DATA)]


def test_block_status_errors(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 16)
    cap = 16 * TRACK
    with serving_here(unit, sock):
        # asked for a context the export lacks: the error names it
        c, ids = raw_client(sock, "S", ["qemu:dirty-bitmap:nope"])
        assert ids == {}
        err, msg = status(c, 0, 4096)
        assert err == nbd.E_INVAL and "qemu:dirty-bitmap:nope" in msg and "base:allocation" \
            in msg
        c, ids = raw_client(sock, "S", ["base:allocation", "qemu:dirty-bitmap:T"])
        for off, n, fl in ((cap - 4096, 8192, 0), (cap, 1, 0), (0, 0, 0),
                           (0, 4096, 1 << 2)):
            err, msg = status(c, off, n, fl)
            assert err == nbd.E_INVAL, (off, n, fl)
            assert msg
        assert sorted(status(c, cap - 4096, 4096)) == sorted(ids.values())  # still serving
        # without structured replies BLOCK_STATUS is unknown: a simple EINVAL
        c, _ = raw_client(sock, "S", structured=False)
        assert c.request(ns.CMD_BLOCK_STATUS, 0, 4096) == (nbd.E_INVAL, b"")


def test_read_replies_are_structured_once_negotiated(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 16)
    cap = 16 * TRACK
    with serving_here(unit, sock) as server:
        data = np.random.default_rng(1).integers(0, 256, cap, dtype=np.uint8).tobytes()
        volume(server, "S").write(0, data)
        c, _ = raw_client(sock, "S")
        # small reads, pipelined: one OFFSET_DATA chunk each, DONE
        for h, (off, n) in enumerate([(0, 1), (100, 4096), (cap - 7, 7)]):
            send(c, nbd.CMD_READ, off, n, handle=h)
        for h, (off, n) in enumerate([(0, 1), (100, 4096), (cap - 7, 7)]):
            [(fl, rtype, body)] = chunks(c, h)
            assert (fl, rtype) == (ns.REPLY_FLAG_DONE, ns.REPLY_TYPE_OFFSET_DATA)
            assert struct.unpack_from(">Q", body)[0] == off and body[8:] == data[off:off + n]
        # a large read (over the connection's own buffer)
        send(c, nbd.CMD_READ, 4096, 3 * MIB // 4, handle=20)
        [(fl, rtype, body)] = chunks(c, 20)
        assert rtype == ns.REPLY_TYPE_OFFSET_DATA and body[8:] == data[4096:4096 + 3 * MIB // 4]
        # errors: an error chunk with a message, never a simple reply
        for off, n, fl in ((cap - 1, 2, 0), (0, nbd.MAX_REQUEST + 1, 0), (0, 1, 1 << 3)):
            send(c, nbd.CMD_READ, off, n, fl, handle=30)
            [(fl2, rtype, body)] = chunks(c, 30)
            assert rtype == ns.REPLY_TYPE_ERROR and fl2 == ns.REPLY_FLAG_DONE
            err, mlen = struct.unpack_from(">IH", body)
            assert err == nbd.E_INVAL and len(body) == 6 + mlen and mlen > 0
        send(c, nbd.CMD_READ, 0, 0, handle=31)                  # nothing to read
        assert [(f, t) for f, t, _ in chunks(c, 31)] == [(1, ns.REPLY_TYPE_NONE)]
        # writes and flushes keep simple replies (no payload)
        assert c.request(nbd.CMD_WRITE, 0, 4, b"abcd") == (0, b"")
        assert c.request(nbd.CMD_FLUSH) == (0, b"")


def test_block_status_chunks_extents_and_req_one(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 64)
    with serving_here(unit, sock) as server:
        S = volume(server, "S")
        gs, cap = S.grain_size, S.capacity
        S.write(10 * gs, b"x" * (3 * gs))                # grains 10-12
        S.write(40 * gs + 5, b"y")                       # grain 40
        c, ids = raw_client(sock, "S", ["qemu:dirty-bitmap:T", "base:allocation"])
        dirty = ids["qemu:dirty-bitmap:T"]
        reply = status(c, 0, cap)
        assert sorted(reply) == sorted(ids.values())     # one chunk per context
        assert reply[dirty] == [(10 * gs, 0), (3 * gs, 1), (27 * gs, 0), (gs, 1),
                                (cap - 41 * gs, 0)]
        # an unaligned request: the first extent starts at its offset; the last
        # clean one may run on past its end (to the next change)
        reply = status(c, 5 * gs + 100, 6 * gs)       # ends in grain 11 (dirty)
        assert reply[dirty] == [(5 * gs - 100, 0), (2 * gs, 1)]
        reply = status(c, 13 * gs, 2 * gs)
        assert reply[dirty] == [(27 * gs, 0)]
        # REQ_ONE: exactly one extent, never past the request
        reply = status(c, 0, 4 * gs, flags=ns.CMD_FLAG_REQ_ONE)
        assert reply[dirty] == [(4 * gs, 0)]
        assert len(reply[ids["base:allocation"]]) == 1
        assert reply[ids["base:allocation"]][0][0] <= 4 * gs
        reply = status(c, 11 * gs, 30 * gs, flags=ns.CMD_FLAG_REQ_ONE)
        assert reply[dirty] == [(2 * gs, 1)]
        reply = status(c, 12 * gs + 7, 1, flags=ns.CMD_FLAG_REQ_ONE)
        assert reply[dirty] == [(1, 1)]
        # the allocation context agrees with the data: every written grain is data
        alloc = expand(status(c, 0, cap)[ids["base:allocation"]], 0, gs, cap // gs)
        assert not alloc[[10, 11, 12, 40]].any()          # (status 0: data)


def test_extents_per_reply_are_bounded(tmp_path, monkeypatch):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 64)
    monkeypatch.setattr(ns, "MAX_EXTENTS", 8)
    with serving_here(unit, sock) as server:
        S = volume(server, "S")
        gs = S.grain_size
        for g in range(0, 200, 2):                        # 200 extents of one grain
            S.write(g * gs, b"z")
        c, ids = raw_client(sock, "S", ["qemu:dirty-bitmap:T"])
        [desc] = status(c, 0, S.capacity).values()
        assert desc == [(gs, 1), (gs, 0)] * 4             # cut at 8, all inside the request
        [desc] = status(c, 8 * gs, S.capacity - 8 * gs).values()
        assert desc[0] == (gs, 1) and len(desc) == 8


def test_bitmap_reads_are_never_torn(tmp_path):
    """Each host write sets its grains' change bits under the source's
    lock; a BLOCK_STATUS read under the same lock shows all of a write's
    grains or none, however they interleave."""
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 1024)
    span = 16
    with serving_here(unit, sock) as server:
        S = volume(server, "S")
        gs = S.grain_size
        n = S.n_grains
        stop = threading.Event()

        def writer():
            for k in range(n // span):
                if stop.is_set():
                    return
                S.write(k * span * gs, bytes(span * gs))   # grains [k*span, (k+1)*span)

        c, ids = raw_client(sock, "S", ["qemu:dirty-bitmap:T"])
        t = threading.Thread(target=writer)
        t.start()
        seen = set()
        try:
            while t.is_alive() or not seen:
                [desc] = status(c, 0, S.capacity).values()
                marks = expand(desc, 0, gs, n).reshape(-1, span)
                rows = marks.sum(axis=1)
                assert set(rows.tolist()) <= {0, span}, rows     # whole writes only
                seen.add(int(rows.astype(bool).sum()))
        finally:
            stop.set()
            t.join()
        [desc] = status(c, 0, S.capacity).values()
        assert desc == [(S.capacity, 1)]
        assert len(seen) > 2, seen          # (it did look while writes landed)


def test_a_withdrawn_relationship_answers_an_error(tmp_path):
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 16, copy=True)
    with serving_here(unit, sock) as server:
        c, ids = raw_client(sock, "S", ["qemu:dirty-bitmap:T"])
        assert list(status(c, 0, 4096)) == [ids["qemu:dirty-bitmap:T"]]
        with server.lock:
            volume(server, "T").target_relationship.withdraw()
        err, msg = status(c, 0, 4096)
        assert err == nbd.E_IO and "withdrawn" in msg
        # a new FlashCopy onto T: the same name shows its recording
        with server.lock:
            fastfc.FlashCopy(volume(server, "S"), volume(server, "T"), background_copy=False,
                             record=True)
        volume(server, "S").write(8192, b"w")
        [desc] = status(c, 0, 16 * TRACK).values()
        gs = volume(server, "S").grain_size
        assert desc[:2] == [(8192 // gs * gs, 0), (gs, 1)]


# -- the real clients -------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_maps_of_the_clients_agree_with_the_engine(tmp_path, seed):
    """nbdinfo --map and qemu-img map, on the source and the target, for
    the FlashCopy's change recording and the pair's out-of-sync bitmap,
    against a model (the grains written since recording began) and the
    engine's own bitmaps, after random writes, a resync, and more writes."""
    need("nbdinfo", "qemu-img")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 64, pair=True)
    rng = np.random.default_rng(seed)
    with serving_here(unit, sock) as server:
        S, T = volume(server, "S"), volume(server, "T")
        gs, n = S.grain_size, S.n_grains
        fc_model = np.zeros(n, dtype=bool)
        pprc_model = np.zeros(n, dtype=bool)

        def scribble(k: int) -> None:
            for _ in range(k):
                vol = S if rng.random() < 0.8 else T
                off = int(rng.integers(0, S.capacity - 1))
                length = int(min(rng.integers(1, 6 * gs), S.capacity - off))
                vol.write(off, rng.integers(0, 256, length, dtype=np.uint8))
                g = grains_of(off, length, gs)
                fc_model[g.start:g.stop] = True
                if vol is S:
                    pprc_model[g.start:g.stop] = True

        def check() -> None:
            rel = T.target_relationship
            engine = (rel.src_changed | rel.tgt_changed).to_bools()
            assert np.array_equal(engine, fc_model)
            want = runs(fc_model, gs)
            for name in ("S", "T"):
                assert nbdinfo_map(sock, name, "qemu:dirty-bitmap:T") == want, name
                assert qemu_map(sock, name, "qemu:dirty-bitmap:T") == want, name
            assert np.array_equal(S.mirror.oos.to_bools(), pprc_model)
            assert nbdinfo_map(sock, "S", "qemu:dirty-bitmap:B") == runs(pprc_model, gs)
            assert qemu_map(sock, "S", "qemu:dirty-bitmap:B") == runs(pprc_model, gs)
            # base:allocation: both clients see the same, every grain written
            # is data, and what they call holes reads as zeros
            alloc = nbdinfo_map(sock, "S")
            assert qemu_map(sock, "S") == alloc
            image = S.read(0, S.capacity)
            for off, length, data in alloc:
                if not data:
                    assert not image[off:off + length].any()
                    assert not pprc_model[off // gs:(off + length) // gs].any()
            # the target: its own file where copied, the source's where it reads from it
            alloc = nbdinfo_map(sock, "T")
            assert qemu_map(sock, "T") == alloc
            image = T.read(0, T.capacity)
            for off, length, data in alloc:
                if not data:
                    assert not image[off:off + length].any()
                    assert not fc_model[off // gs:(off + length) // gs].any() or \
                        not T.target_relationship.to_copy.any_range(off // gs,
                                                                    (off + length) // gs)

        def check_last(model: np.ndarray) -> None:
            seq, grains = T.target_relationship.last_resync_changes
            assert np.array_equal(grains.to_bools(), model)
            for name in ("S", "T"):
                assert nbdinfo_map(sock, name, "qemu:dirty-bitmap:T@last-resync") == \
                    runs(model, gs), name

        scribble(40)
        check()
        # no resync yet in this server: no @last-resync context
        r = run("nbdinfo", "--map=qemu:dirty-bitmap:T@last-resync", uri(sock, "T"),
                check=False)
        assert r.returncode != 0
        with server.lock:
            T.target_relationship.resync()              # recording starts again
        last = fc_model.copy()
        fc_model[:] = False
        check()
        check_last(last)
        scribble(15)
        check()
        check_last(last)                                # fixed at the resync


def test_incremental_backup_moves_only_the_changes(tmp_path):
    """A full copy of a FlashCopy target (nbdcopy), host writes to 1% of
    the source (qemu-io), then: list the changes (nbdinfo --map of the
    dirty bitmap), resync, copy only those extents from the target
    (qemu-img convert of each extent into the backup, in place); the
    backup equals the new image byte for byte, and the bytes moved are
    the changed grains."""
    need("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 256)                                        # 16 MiB
    backup = tmp_path / "backup.img"
    rng = np.random.default_rng(7)
    with serving_here(unit, sock) as server:
        S, T = volume(server, "S"), volume(server, "T")
        gs, cap = S.grain_size, S.capacity
        with server.lock:
            T.target_relationship.withdraw(force=True)
            S.write(0, rng.integers(0, 256, cap // 3, dtype=np.uint8))
            fastfc.FlashCopy(S, T, background_copy=False, record=True)   # a snapshot
        # the full backup: nbdcopy reads only what base:allocation calls data
        # (T reads from S, thin, 2/3 holes)
        run("nbdcopy", uri(sock, "T"), backup)
        assert np.array_equal(np.fromfile(backup, np.uint8), T.read(0, cap))
        read = server.nbd.counters()["T"].bytes[nbd.OPS.index("read")]
        assert cap // 3 <= read < cap // 2, read
        # host writes to 1% of the source's grains
        grains = rng.choice(cap // gs, cap // gs // 100, replace=False)
        qemu_io(sock, "S", *(f"write -P {int(g % 250) + 1} {int(g) * gs} {gs}" for g in grains))
        # the changes, then the new image, then only they are copied
        changed = [(o, n) for o, n, dirty in nbdinfo_map(sock, "T", "qemu:dirty-bitmap:T")
                   if dirty]
        with server.lock:
            T.target_relationship.resync()
        moved = 0
        for off, length in changed:
            src = (f"driver=raw,offset={off},size={length},file.driver=nbd,file.export=T,"
                   f"file.server.type=unix,file.server.path={sock}")
            dst = f"driver=raw,offset={off},size={length},file.driver=file,file.filename={backup}"
            run("qemu-img", "convert", "-n", "--image-opts", src, "--target-image-opts", dst)
            moved += length
        assert moved == len(grains) * gs                    # the changed grains, no more
        assert np.array_equal(np.fromfile(backup, np.uint8), T.read(0, cap))
        assert np.array_equal(np.fromfile(backup, np.uint8), S.read(0, cap))
        # and the recording starts again: nothing changed since the resync
        assert nbdinfo_map(sock, "T", "qemu:dirty-bitmap:T") == [(0, cap, False)]


@pytest.mark.slow     # three resyncs copied by qemu-img under a writer: seconds
def test_an_incremental_backup_under_writes_races_none(tmp_path):
    """While a host writes to the source all along: resync, list the
    grains the resync took in (``@last-resync``), copy them from the
    target: the backup is the target's new image, and that image differs
    from the previous backup only inside the listed grains. (Listing the
    live recording and then resyncing fails this: a write between the two
    is in the new image but in no list.)"""
    need("nbdinfo", "nbdcopy", "qemu-img")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make(unit, 64)
    backup = tmp_path / "backup.img"
    with serving_here(unit, sock) as server:
        S, T = volume(server, "S"), volume(server, "T")
        gs, cap = S.grain_size, S.capacity
        run("nbdcopy", uri(sock, "T"), backup)
        stop = threading.Event()
        written = [0]          # the writer's writes so far

        def writer() -> None:
            rng = np.random.default_rng(3)
            while not stop.is_set():
                g = int(rng.integers(0, cap // gs))
                S.write(g * gs, rng.integers(1, 256, gs, dtype=np.uint8))
                written[0] += 1

        def wait_for_writes(seen: int) -> int:
            """Until the writer wrote since ``seen`` (a loaded machine may
            not have run it between two resyncs)."""
            deadline = time.monotonic() + 30
            while written[0] == seen:
                assert time.monotonic() < deadline, "the writer wrote nothing in 30 s"
                time.sleep(0.001)
            return written[0]

        w = threading.Thread(target=writer)
        w.start()
        try:
            seen = 0
            for _ in range(3):
                seen = wait_for_writes(seen)
                before = np.fromfile(backup, np.uint8)
                with server.lock:
                    T.target_relationship.resync()
                listed = [(o, n) for o, n, dirty in
                          nbdinfo_map(sock, "T", "qemu:dirty-bitmap:T@last-resync") if dirty]
                assert listed
                for off, length in listed:
                    src = (f"driver=raw,offset={off},size={length},file.driver=nbd,"
                           f"file.export=T,file.server.type=unix,file.server.path={sock}")
                    dst = (f"driver=raw,offset={off},size={length},file.driver=file,"
                           f"file.filename={backup}")
                    run("qemu-img", "convert", "-n", "--image-opts", src,
                        "--target-image-opts", dst)
                image = T.read(0, cap)
                assert np.array_equal(np.fromfile(backup, np.uint8), image)
                outside = np.ones(cap, dtype=bool)
                for off, length in listed:
                    outside[off:off + length] = False
                assert np.array_equal(before[outside], image[outside])
        finally:
            stop.set()
            w.join()


def test_block_status_over_tls(tmp_path):
    """On a TLS server nothing is negotiated before STARTTLS; after it,
    structured replies and contexts as in clear text."""
    import ssl
    from test_serve_protocol import self_signed, served
    from fastfc.tools.cli.serve import _tls_context
    cert, key = self_signed(tmp_path)
    with served(tmp_path, "A", tls=_tls_context(str(cert), str(key), None)) as (server, path):
        c = Client(path)
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ERR_TLS_REQD
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data("A", ["base:allocation"]))
        assert r[-1][0] == nbd.REP_ERR_TLS_REQD
        assert c.option(nbd.OPT_STARTTLS)[-1][0] == nbd.REP_ACK
        c.s = ssl.create_default_context(cafile=str(cert)).wrap_socket(
            c.s, server_hostname="localhost")
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data("A", ["base:allocation"]))
        assert r[-1][0] == nbd.REP_ERR_INVALID          # structured replies first
        assert c.option(nbd.OPT_STRUCTURED_REPLY)[-1][0] == nbd.REP_ACK
        r = meta_option(c, ns.OPT_SET_META_CONTEXT, meta_data("A", ["base:allocation"]))
        assert r[-1][0] == nbd.REP_ACK and r[0][0] == ns.REP_META_CONTEXT
        assert c.go("A")[-1][0] == nbd.REP_ACK
        [desc] = status(c, 0, MIB).values()
        assert desc == [(MIB, 0)]                       # a thick volume: all data
        send(c, nbd.CMD_READ, 0, 5, handle=4)
        [(fl, rtype, body)] = chunks(c, 4)
        assert rtype == ns.REPLY_TYPE_OFFSET_DATA and body == bytes(8) + bytes(5)


def test_status_from_words_equals_the_bits():
    """``Status.of_words`` (only the words where a bit changes expanded)
    against the bits themselves: random bitmaps of runs and of scattered
    bits, ORed, any start and end (not word-aligned)."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        n = int(rng.integers(1, 700))
        maps = []
        for _ in range(int(rng.integers(1, 3))):
            bm = fastfc.TrackBitmap(n)
            for _ in range(int(rng.integers(0, 8))):
                a = int(rng.integers(0, n))
                bm.set_range(a, min(n, a + int(rng.integers(1, 150))))
            for i in rng.integers(0, n, int(rng.integers(0, 10))):
                bm.set(int(i))
            maps.append(bm)
        bools = np.zeros(n, dtype=bool)
        for bm in maps:
            bools |= bm.to_bools()
        g0 = int(rng.integers(0, n))
        g1 = int(rng.integers(g0 + 1, n + 1))
        st = ns.Status.of_words([ns._words(bm, g0, g1) for bm in maps], g0, g1, 1, 0)
        assert st.n == g1 - g0
        assert np.array_equal(st.marked, bools[g0:g1]), (n, g0, g1)
        assert st.last == bools[g1 - 1]
        assert np.array_equal(st.marked, ns.Status.of_bools(bools[g0:g1], 1, 0).marked)
