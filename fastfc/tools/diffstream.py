"""A portable, resumable diff stream of a FlashCopy target: what ``fastfc
diffflash`` writes and ``fastfc applydiff`` applies to a copy elsewhere (a
raw image file or a block device), for backups without an NBD client.

A stream carries extents of the target T's image at one sequence number:

- *incremental*: the grains T's incremental resync took in
  (:attr:`FlashCopy.last_resync_changes`), which take a copy of T's
  previous image (sequence ``base``) to this one;
- *full*: every byte of T, which makes any file of T's size its image.

Layout (integers big-endian): the magic ``FASTFC-DIFF\\n``; a header (u32
length, JSON, u32 CRC-32 of the JSON); the extent table (u64 offset, u64
length per extent, u32 CRC-32 of the table); each extent's bytes followed
by their u32 CRC-32; ``END\\n``, u64 extents, u64 bytes. Every piece is
checked before it is written, so a corrupted stream changes nothing past
its last good extent.

The receiver keeps a state file beside the image (:func:`state_path`):
the sequence of T the image holds once a stream is applied whole, and,
while one is applied in part, the extents still to come (the resume
token). The image is synced before the state file names an extent
applied. ``diffflash --resume STATE`` sends exactly those extents again,
from T's image at the same sequence; a stream is applied only onto the
image it starts from (the state's sequence equal to the stream's base).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np

MAGIC = b"FASTFC-DIFF\n"
FORMAT = 1
END = b"END\n"
#: longest extent in a stream: a full stream of a large volume, or a long
#: run of changes, is cut into pieces of this size (a resume restarts at
#: an extent's start)
MAX_EXTENT = 64 << 20
#: the receiver syncs the image and records its progress after this many
#: bytes (and at the end)
SYNC_EVERY = 256 << 20

_U32 = struct.Struct(">I")
_U64X2 = struct.Struct(">QQ")


class StreamError(Exception):
    """The stream or the state file is not what it must be: the message
    says what, and what was left as it was."""


def state_path(image: Path) -> Path:
    """The receiver's state file of ``image``."""
    return image.with_name(image.name + ".fastfc-diff")


def extents_of(runs: Iterable[tuple[int, int]], grain: int,
               capacity: int) -> list[tuple[int, int]]:
    """The (offset, length) in bytes of grain runs ``(first, last + 1)``
    (``TrackBitmap.runs()``), each cut to at most :data:`MAX_EXTENT`."""
    out: list[tuple[int, int]] = []
    for a, b in runs:
        start, stop = a * grain, min(b * grain, capacity)
        while start < stop:
            n = min(MAX_EXTENT, stop - start)
            out.append((start, n))
            start += n
    return out


def whole(capacity: int) -> list[tuple[int, int]]:
    """Every byte of a volume of ``capacity`` bytes, as extents."""
    return [(o, min(MAX_EXTENT, capacity - o)) for o in range(0, capacity, MAX_EXTENT)]


def pack_extents(extents: list[tuple[int, int]]) -> bytes:
    return np.asarray(extents, dtype=">u8").reshape(-1, 2).tobytes()


def unpack_extents(raw: bytes) -> list[tuple[int, int]]:
    a = np.frombuffer(raw, dtype=">u8").reshape(-1, 2)
    return [(int(o), int(n)) for o, n in a]


@dataclass
class Header:
    """What a stream says of itself."""

    stream: str                     # an id of the stream, kept across its resumes
    source: str
    target: str
    sequence: int                   # T's sequence the extents carry
    base: int | None                # the sequence the image must hold (None: full)
    size: int
    grain: int
    kind: str                       # "incremental" or "full"
    extents: list[tuple[int, int]] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "stream": self.stream, "source": self.source,
                "target": self.target, "sequence": self.sequence, "base": self.base,
                "size": self.size, "grain": self.grain, "kind": self.kind,
                "extents": len(self.extents), "bytes": sum(n for _, n in self.extents)}


def new_id() -> str:
    return uuid.uuid4().hex


# -- the sender ---------------------------------------------------------------------------
def write_stream(out: IO[bytes], header: Header, read: Callable[[int, int], Any]) -> int:
    """Write ``header``'s stream to ``out``, each extent's bytes from
    ``read(offset, length)`` (the target's image); returns the bytes of
    data written."""
    meta = json.dumps(header.meta(), sort_keys=True).encode()
    table = pack_extents(header.extents)
    out.write(MAGIC + _U32.pack(len(meta)) + meta + _U32.pack(zlib.crc32(meta)))
    out.write(table + _U32.pack(zlib.crc32(table)))
    total = 0
    for off, n in header.extents:
        data = np.ascontiguousarray(read(off, n)).view(np.uint8).data
        out.write(data)
        out.write(_U32.pack(zlib.crc32(data)))
        total += n
    out.write(END + _U64X2.pack(len(header.extents), total))
    out.flush()
    return total


# -- the receiver -------------------------------------------------------------------------
def _read_exact(inp: IO[bytes], n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = inp.read(n - got)
        if not b:
            raise EOFError(f"the stream ended in {what} ({got} of {n} bytes)")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_header(inp: IO[bytes]) -> Header:
    """The header and extent table at the start of a stream."""
    try:
        magic = _read_exact(inp, len(MAGIC), "its magic")
    except EOFError:
        raise StreamError("no diff stream on the input (it is empty)") from None
    if magic != MAGIC:
        raise StreamError("the input is not a fastfc diff stream (no FASTFC-DIFF magic)")
    try:
        (n,) = _U32.unpack(_read_exact(inp, 4, "the header"))
        if n > 1 << 20:
            raise StreamError(f"a header of {n} bytes: not a fastfc diff stream")
        meta = _read_exact(inp, n, "the header")
        (crc,) = _U32.unpack(_read_exact(inp, 4, "the header"))
        if crc != zlib.crc32(meta):
            raise StreamError("the stream's header fails its CRC: corrupted")
        m = json.loads(meta)
        if m.get("format") != FORMAT:
            raise StreamError(f"stream format {m.get('format')!r}; this fastfc reads {FORMAT}")
        raw = _read_exact(inp, 16 * int(m["extents"]), "the extent table")
        (crc,) = _U32.unpack(_read_exact(inp, 4, "the extent table"))
    except EOFError as e:
        raise StreamError(f"{e}: nothing was written") from None
    if crc != zlib.crc32(raw):
        raise StreamError("the stream's extent table fails its CRC: corrupted")
    h = Header(stream=m["stream"], source=m["source"], target=m["target"],
               sequence=int(m["sequence"]), base=m["base"], size=int(m["size"]),
               grain=int(m["grain"]), kind=m["kind"], extents=unpack_extents(raw))
    for off, ln in h.extents:
        if ln <= 0 or off < 0 or off + ln > h.size:
            raise StreamError(f"an extent ({off}, {ln}) outside a volume of {h.size} bytes: "
                              "corrupted")
    return h


def load_state(image: Path) -> dict[str, Any] | None:
    """The state file of ``image`` (None: there is none)."""
    p = state_path(image)
    return read_state(p) if p.exists() else None


def read_state(p: Path) -> dict[str, Any]:
    """A state file applydiff wrote; StreamError if it is not one."""
    try:
        s = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise StreamError(f"{p} cannot be read ({e})") from None
    if not isinstance(s, dict) or s.get("format") != FORMAT:
        raise StreamError(f"{p} is not a fastfc diff state file")
    return s


def _save_state(image: Path, state: dict[str, Any]) -> None:
    p = state_path(image)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_extents(state: dict[str, Any]) -> list[tuple[int, int]]:
    return unpack_extents(base64.b64decode(state["partial"]["remaining"]))


@dataclass
class Applied:
    header: Header
    extents: int
    bytes: int
    seconds: float


def apply_stream(inp: IO[bytes], image: Path, *, create: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> Applied:
    """Apply the stream on ``inp`` to ``image`` (a file of the stream's
    size, or a block device; a full stream may ``create`` it). Refuses,
    writing nothing, a stream that does not start from what the image
    holds. An interrupted or corrupted stream leaves every extent before
    the break applied and recorded: StreamError says how to resume."""
    h = read_header(inp)
    state = load_state(image)
    if state is not None and state.get("target") not in (None, h.target):
        raise StreamError(f"{image} holds a copy of {state['target']}, this stream is of "
                          f"{h.target}: nothing was written")
    held: dict[str, Any] = state or {}
    partial = held.get("partial")
    if partial and partial["stream"] == h.stream:
        if h.extents != partial_extents(held):
            raise StreamError("this stream does not carry the extents the state file says "
                              "are left: nothing was written")
    elif partial and h.kind != "full":
        raise StreamError(
            f"{image} holds part of another stream (of {held['target']} at sequence "
            f"{partial['sequence']}); resume that one first (fastfc diffflash "
            f"{held['source']}:{held['target']} --resume {state_path(image)}) or apply a "
            "full stream: nothing was written")
    elif h.kind == "incremental":
        seq = held.get("sequence")
        if seq is None or seq != h.base:
            now = "no recorded sequence" if seq is None else f"sequence {seq}"
            raise StreamError(
                f"this stream takes {h.target} from sequence {h.base} to {h.sequence}, but "
                f"{image} holds {now}: nothing was written (a full stream, diffflash --full, "
                "makes it a copy)")
    exists = image.exists()
    if not exists and not (create and h.kind == "full" and not partial):
        raise StreamError(f"{image} does not exist (a full stream can make it: "
                          "applydiff --create)")
    flags = os.O_WRONLY | os.O_CLOEXEC | (0 if exists else os.O_CREAT)
    fd = os.open(image, flags, 0o600)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if not exists or (size < h.size and h.kind == "full" and create):
            os.ftruncate(fd, h.size)
            size = h.size
        if size != h.size:
            raise StreamError(f"{image} has {size} bytes, the stream's volume {h.size}: "
                              "nothing was written")
        base_state = {"format": FORMAT, "source": h.source, "target": h.target,
                      "sequence": None if h.kind == "full" else held.get("sequence"),
                      "partial": None}
        if partial and partial["stream"] == h.stream:
            base_state["sequence"] = held.get("sequence")
        started = time.monotonic()
        done = done_bytes = since_sync = 0

        def record(k: int) -> None:
            os.fsync(fd)
            left = h.extents[k:]
            _save_state(image, {**base_state, "partial": {
                "stream": h.stream, "sequence": h.sequence, "base": h.base, "kind": h.kind,
                "size": h.size, "grain": h.grain,
                "remaining": base64.b64encode(pack_extents(left)).decode()}})

        record(0)       # from here on the image is in between: the state says so
        try:
            for k, (off, n) in enumerate(h.extents):
                data = _read_exact(inp, n, f"extent {k + 1} of {len(h.extents)}")
                (crc,) = _U32.unpack(_read_exact(inp, 4, f"extent {k + 1}'s CRC"))
                if crc != zlib.crc32(data):
                    raise StreamError(f"extent {k + 1} of {len(h.extents)} (offset {off}) "
                                      "fails its CRC: corrupted")
                view = memoryview(data)
                while view:
                    w = os.pwrite(fd, view, off)
                    view, off = view[w:], off + w
                done, done_bytes, since_sync = k + 1, done_bytes + n, since_sync + n
                if since_sync >= SYNC_EVERY:
                    record(done)
                    since_sync = 0
                if progress is not None:
                    progress(done_bytes, sum(x for _, x in h.extents))
            end = _read_exact(inp, len(END) + 16, "its end")
            if end[:len(END)] != END or _U64X2.unpack(end[len(END):]) != (len(h.extents),
                                                                          done_bytes):
                raise StreamError("the stream's end does not match what it carried: corrupted")
        except (EOFError, StreamError) as e:
            record(done)
            raise StreamError(
                f"{e}; {done} of {len(h.extents)} extents applied and recorded: resume with "
                f"fastfc -u UNIT diffflash {h.source}:{h.target} --resume "
                f"{state_path(image)} | fastfc applydiff {image}") from None
        os.fsync(fd)
        _save_state(image, {**base_state, "sequence": h.sequence, "partial": None})
        return Applied(h, len(h.extents), done_bytes, time.monotonic() - started)
    finally:
        os.close(fd)


def extents_in(extents: list[tuple[int, int]], grain: int, n_grains: int) -> np.ndarray:
    """A bool per grain: covered by ``extents``."""
    m = np.zeros(n_grains, dtype=bool)
    for off, n in extents:
        m[off // grain:(off + n + grain - 1) // grain] = True
    return m

