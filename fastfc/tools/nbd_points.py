"""Recovery points as NBD exports, and the status of a recovery volume's
grains while its restore copies (:mod:`fastfc.tools.nbd`,
:mod:`fastfc.tools.nbd_status`).

A point of volume V with seq N is the export ``V#N`` (the name ``lspoint``
shows; no volume name holds ``#``, so it names nothing else). It is
read-only: every write and ``WRITE_ZEROES`` gets ``EPERM`` (the client was
told ``NBD_FLAG_READ_ONLY``) and a ``FLUSH`` has nothing to do. A read goes
through the point chain (:meth:`RecoveryPoint.read`, under V's lock), so
it returns the point's image however the host writes V meanwhile.

A point that expires while a client has it open ends the export as a
removed volume does: every later request gets ``ESHUTDOWN`` (never bytes
of another image), and a new ``NBD_OPT_GO`` finds no such export. Expiry
is not held up by readers: retention is what keeps a point, and a client
left connected must not keep one past it.

``base:allocation`` of a point
(:class:`~fastfc.tools.nbd_status.PointAllocation`): a grain some point
holds (the chain's bitmap of held grains, one test per grain) is data;
any other reads as V reads it now, and has V's own status (a hole of V's
file now, a file only gaining blocks, was a hole at the point's instant).
The bitmap is read before V's status and again after, so a grain a point
took meanwhile (a FlashCopy step onto V saving what it changes, which may
be no block of V's file: a grain V read from its source) is data too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fastfc.copyservices.points import RecoveryPoint
from fastfc.errors import StateError, VolumeClosedError, WriteInhibitedError
from fastfc.storage.volume import locked

if TYPE_CHECKING:
    from fastfc.durable.unit import StorageUnit

#: what separates a volume's name from a point's seq in an export name
POINT_SEP = "#"


def point_export_name(point: RecoveryPoint) -> str:
    """``VOLUME#SEQ``: the name ``lspoint`` gives a point, its export's too."""
    return f"{point.volume.name}{POINT_SEP}{point.seq}"


def parse_point_name(name: str) -> tuple[str, int] | None:
    """``(volume, seq)`` of an export name ``VOLUME#SEQ``; None for any other name."""
    vol, sep, seq = name.rpartition(POINT_SEP)
    if not sep or not vol or not seq.isdigit() or not seq.isascii():
        return None
    return vol, int(seq)


class PointImage:
    """A recovery point standing where the NBD server expects a volume:
    the geometry of its volume, reads through the chain, no writes."""

    def __init__(self, point: RecoveryPoint) -> None:
        self.point = point
        vol = point.volume
        self.volume = vol
        self.name = point_export_name(point)
        self.capacity = vol.capacity
        self.n_tracks = vol.n_tracks
        self.track_size = vol.track_size
        self.grain_size = vol.grain_size
        self.n_grains = vol.n_grains
        # what sync_volume looks for: a point takes part in no copy
        self.source_relationships: list[Any] = []
        self.target_relationship = None
        self.mirror = None

    def __repr__(self) -> str:
        return f"<PointImage {self.name}>"

    @property
    def closed(self) -> bool:
        """Whether the export has ended: its point expired or its volume closed."""
        return self.point.expired or self.volume.closed

    def readinto(self, offset: int, out: Any) -> None:
        """The point's bytes ``[offset, offset + len(out))`` into ``out``."""
        view = memoryview(out).cast("B")
        try:
            data = self.point.read(offset, len(view))
        except StateError:
            if self.point.expired:
                raise VolumeClosedError(f"recovery point {self.name} has expired") from None
            raise
        np.asarray(view)[:] = data

    def read(self, offset: int, length: int) -> np.ndarray:
        buf = np.empty(length, dtype=np.uint8)
        self.readinto(offset, buf)
        return buf

    def write(self, offset: int, data: Any) -> None:
        raise WriteInhibitedError(f"recovery point {self.name} is immutable")

    def flush(self) -> None:
        """Nothing to make durable (a point's grains are the unit's to
        sync); refused once the point expired, as any request is then."""
        if self.closed:
            raise VolumeClosedError(f"recovery point {self.name} has expired")


    def held_bits(self, g0: int, g1: int) -> np.ndarray:
        """Which grains of ``[g0, g1)`` any point of the chain holds (a bool
        per grain), read under the volume's lock."""
        chain = self.point.chain
        with locked([self.volume]):
            if self.closed or chain is None:
                raise VolumeClosedError(f"recovery point {self.name} has expired")
            words = np.array(chain.held.words[g0 >> 6:(g1 + 63) >> 6], dtype=np.uint64)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        first = g0 & ~63
        return bits[g0 - first:g1 - first]


def describe_point(point: RecoveryPoint) -> str:
    """An export's description of a point (``NBD_OPT_LIST``, ``NBD_INFO_DESCRIPTION``)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(point.taken_at))
    label = f" {point.name!r}" if point.name else ""
    return f"recovery point{label} of {point.volume.name} taken {when} (read-only)"


def find_point(units: list["StorageUnit"], name: str) -> PointImage | None:
    """The point export ``VOLUME#SEQ`` of the first unit holding VOLUME, or None."""
    parsed = parse_point_name(name)
    if parsed is None:
        return None
    vname, seq = parsed
    for u in units:
        if vname in u:
            if u.volume(vname).closed:
                return None
            try:
                p = u.points.point(vname, seq)
            except KeyError:
                return None
            return None if p.expired else PointImage(p)
    return None


def point_names(unit: "StorageUnit") -> list[tuple[str, str]]:
    """``(export name, description)`` of every live point of ``unit``."""
    out = []
    for p in unit.points.points():
        if not p.expired and not p.volume.closed:
            out.append((point_export_name(p), describe_point(p)))
    return out
