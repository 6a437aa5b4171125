"""A PPRC pair whose secondary is a volume on a secondary site (a remote
unit), reached only through :class:`~fastfc.storage.site.SecondarySite`
calls: Global Copy from a local primary, with the collision rule of a
consistency group's drain. A Global Mirror session over sites
(:mod:`fastfc.copyservices.sitemirror`) keeps one per triplet.

On the floor of FlashCopy and PPRC: like :class:`~fastfc.copyservices.pprc.PPRCPair`
it is the primary volume's mirror hook (``fastfc._core.MirrorBase``), so it
uses the core's protocol on the primary (its lock, its hook, its reads).
"""

from __future__ import annotations

import numpy as np

from fastfc._core import MirrorBase, TrackBitmap
from fastfc.errors import FastFCError, LimitError, VolumeClosedError
from fastfc.storage.site import SecondarySite, SiteVolume, Update
from fastfc.storage.volume import Volume, grain_digests

BATCH_BYTES = 16 << 20           # gathered tracks per apply call (>= 1 MiB)
HOLD_BYTES = 1 << 20             # copied per hold of A's lock while gathering
DIGEST_GRAINS = 1 << 16          # grains compared per digests call (1 MiB of digests)


class SitePair(MirrorBase):
    """Global Copy from a local primary ``a`` to ``b`` on a secondary site.

    The bitmaps (``oos``, ``spare``, ``cg``), the side file and ``taken``
    (CG tracks gathered and not yet known to be on B) are guarded by A's
    lock. Not recorded anywhere: a session over sites starts with an
    initial copy.
    """

    oos: TrackBitmap

    def __init__(self, a: Volume, b: SiteVolume, site: SecondarySite, *,
                 initial_copy: bool = True) -> None:
        if (a.n_tracks, a.track_size, a.grain_size) != (b.n_tracks, b.track_size, b.grain_size):
            raise ValueError(f"{a!r} and {b.name} differ in geometry "
                             f"({a.n_tracks}x{a.track_size} grain {a.grain_size} vs "
                             f"{b.n_tracks}x{b.track_size} grain {b.grain_size})")
        self.primary, self.remote, self.site = a, b, site
        self.name = f"{a.name}->{site.name}:{b.name}"
        self.sync = False
        self.side: dict[int, np.ndarray] = {}
        self.cg_bytes = 0
        self.bytes_sent = 0
        self.suspend_reason: str | None = None
        self.failed_over = False
        self._cursor = 0
        self.taken = TrackBitmap(a.n_grains)
        self.spare = TrackBitmap(a.n_grains)
        a._lock()
        try:
            if a._mirror is not None or a._secondary:
                raise LimitError(f"{a!r} is already in a PPRC pair")
            if a._tgt_rel is not None:
                raise LimitError(f"{a!r} is a FlashCopy target and cannot be a PPRC primary")
            self.oos = TrackBitmap(a.n_grains, fill=initial_copy)
            self.cg = None
            a._mirror = self
        finally:
            a._unlock()

    def remove(self) -> None:
        a = self.primary
        a._lock()
        try:
            if a._mirror is self:
                a._mirror = None
        finally:
            a._unlock()

    def __repr__(self) -> str:
        return f"<SitePair {self.name} oos={self.out_of_sync_tracks}>"

    def _collide(self, t0: int, t1: int) -> None:
        """A host write is about to overwrite CG tracks not yet gathered:
        keep their CG version in the side file (A's lock held)."""
        A, ts, cg = self.primary, self.primary.grain_size, self.cg
        assert cg is not None
        A._reserve_read(t0, t1)
        arr = A.array
        for t in range(t0, t1):
            if cg.test(t):
                self.side[t] = arr[t * ts:(t + 1) * ts].copy()
                cg.clear(t)

    def gather(self, bitmap: TrackBitmap, updates: list[Update], budget: int,
               taken: TrackBitmap | None, side: bool) -> tuple[int, bool]:
        """Read set tracks of ``bitmap`` (then, with ``side``, side-file
        versions) into ``updates`` as ``(B name, offsets, rows)``, up to
        ``budget`` bytes, clearing their bits (and setting the span in
        ``taken``); at most ``HOLD_BYTES`` per hold of A's lock. Returns the
        bytes gathered and whether nothing is left."""
        A, ts = self.primary, self.primary.grain_size
        hold = max(1, HOLD_BYTES // ts)
        name = self.remote.name
        got = 0
        while got + ts <= budget:
            k = min(hold, (budget - got) // ts)
            A._lock()
            try:
                if A.closed:
                    raise VolumeClosedError(f"{A!r} is closed")
                idx = bitmap.set_indices()
                if len(idx):
                    # the first k set tracks: exactly the set bits of their span
                    idx = idx[:k]
                    t0, t1 = int(idx[0]), int(idx[-1]) + 1
                    offs = idx.astype(np.int64) * ts
                    A._reserve_read(t0, t1)
                    rows = A.read_batch(offs, ts)
                    bitmap.clear_range(t0, t1)
                    if taken is not None:
                        taken.set_range(t0, t1)
                    updates.append((name, offs, rows))
                    got += len(idx) * ts
                    continue
                if side and self.side:
                    items = [self.side.popitem() for _ in range(min(k, len(self.side)))]
                    offs = np.array([t for t, _ in items], dtype=np.int64) * ts
                    updates.append((name, offs, np.stack([d for _, d in items])))
                    got += len(items) * ts
                    continue
                return got, True
            finally:
                A._unlock()
        return got, False

    def drain(self, max_bytes: int | None = None) -> int:
        """Global Copy outside a CG: send out-of-sync tracks (up to
        ``max_bytes``) and wait for the unit; on a failure their bits are set
        again and the pair suspends. Returns bytes sent."""
        if self.suspend_reason is not None or self.failed_over:
            return 0
        taken = TrackBitmap(self.primary.n_grains)
        updates: list[Update] = []
        got, _ = self.gather(self.oos, updates, min(max_bytes or BATCH_BYTES, BATCH_BYTES),
                             taken, side=False)
        if not updates:
            return 0
        try:
            self.site.apply(updates).result()
        except FastFCError as e:
            self._give_back(taken)
            self.suspend_reason = f"{type(e).__name__}: {e}"
            return 0
        self.bytes_sent += got
        return got

    def begin_drain(self) -> None:
        """The CG's tracks, as the drain begins: what a failure gives back."""
        A = self.primary
        A._lock()
        try:
            assert self.cg is not None
            self.taken.copy_from(self.cg)
            for t in self.side:
                self.taken.set(t)
        finally:
            A._unlock()

    def _give_back(self, taken: TrackBitmap) -> None:
        A = self.primary
        A._lock()
        try:
            self.oos.or_(taken)
        finally:
            A._unlock()

    def cg_end(self, ok: bool) -> None:
        """Close the CG; a failed one gives every CG track (gathered or not)
        back to the out-of-sync bitmap."""
        A = self.primary
        A._lock()
        try:
            cg = self.cg
            if cg is None:
                return
            if not ok:
                self.oos.or_(cg)
                self.oos.or_(self.taken)
                for t in self.side:
                    self.oos.set(t)
                cg.fill(False)
            self.taken.fill(False)
            self.side = {}
            self.spare, self.cg = cg, None
        finally:
            A._unlock()


def resync_by_digests(pairs: list[SitePair]) -> list[int]:
    """Continue from B volumes that hold what they hold (a resumed session):
    compare each grain of every pair's A with its B's by digest (each side
    digests its own volume, only the digests travel: ``DIGEST_GRAINS``
    grains per call, every call sent first so that the units digest while
    this process digests the A volumes) and mark every grain that differs
    out of sync. Exact whatever happened meanwhile (a primary that died
    mid-drain, a recovery that put B back to its C, host writes to B
    since): the first CG sends those grains and nothing else. Each pair is
    its A's mirror hook already, so a host write meanwhile marks its grains
    itself. Returns the grains marked per pair."""
    calls = [[(g0, min(p.primary.n_grains, g0 + DIGEST_GRAINS),
               p.site.digests(p.remote.name, g0, min(p.primary.n_grains, g0 + DIGEST_GRAINS)))
              for g0 in range(0, p.primary.n_grains, DIGEST_GRAINS)] for p in pairs]
    marked = []
    for p, chunks in zip(pairs, calls):
        A = p.primary
        differ = np.zeros(A.n_grains, np.bool_)
        for g0, g1, call in chunks:
            mine = grain_digests(A, g0, g1)
            theirs = np.asarray(call.result())
            if theirs.shape != mine.shape:
                raise FastFCError(f"{p.site.name}:{p.remote.name} gave digests of shape "
                                  f"{theirs.shape} for grains {g0}..{g1}, expected {mine.shape}")
            differ[g0:g1] = (mine != theirs).any(axis=1)
        A._lock()
        try:
            p.oos.or_(TrackBitmap.from_bools(differ))
        finally:
            A._unlock()
        marked.append(int(differ.sum()))
    return marked
