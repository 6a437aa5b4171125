"""A straightforward pure-NumPy FlashCopy / Global Mirror engine: the baseline
that fastfc is judged against.

This is what a user would write without fastfc: each volume a ``uint8``
array viewed as ``(tracks, track_size)``, each bitmap a ``bool`` array (one
byte per track), data moved by per-track Python loops over NumPy slices, and
bitmap work done by whole-array NumPy operations (``np.ones``, ``|``,
``np.flatnonzero``, ``np.count_nonzero``), which is how a NumPy user would
do it. One ``threading.RLock`` per volume, with fastfc's rule: a source's
lock guards its data and the bitmaps of its relationships (a target's
not-yet-copied tracks are touched only under the source's lock).

It implements the operations the benchmarks time, with fastfc's semantics:
establish (NOCOPY, change recording), host writes with copy-on-write and
target writes, reads that redirect not-yet-copied tracks to the source,
background copy in the calling thread, incremental and revertible resync,
commit and revert, a Global Copy pair with an in-process link (collisions
send the CG version first) and a Global Mirror session that forms
consistency groups (coordinate, drain, prepare all, commit all). No faults,
no persistence, no checks beyond what keeps the data right: that is the
point of the comparison. ``benches/test_engine_numpy.py`` checks it against
fastfc.
"""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import numpy as np

CHUNK_BYTES = 4 * 1024 * 1024    # background copy holds the source lock this long, as fastfc


class NpVolume:
    """A volume: ``n_tracks * track_size`` bytes in a NumPy array.

    ``array`` may be given (an existing flat ``uint8`` array, e.g. a fastfc
    volume's backing store, or a ``numpy.memmap``) instead of allocating.
    """

    def __init__(self, n_tracks: int, track_size: int = 65536, *, array=None,
                 name: str = "") -> None:
        self.n_tracks = n_tracks
        self.track_size = track_size
        self.capacity = n_tracks * track_size
        self.array = np.zeros(self.capacity, np.uint8) if array is None else array
        assert self.array.size == self.capacity
        self.tracks = self.array.reshape(n_tracks, track_size)
        self.name = name
        self.lock = threading.RLock()
        self.src_rels: list[NpFlashCopy] = []
        self.tgt_rel: NpFlashCopy | None = None
        self.mirror: NpPair | None = None
        self.inhibits = 0

    def _span(self, offset: int, n: int) -> tuple[int, int]:
        if offset < 0 or n < 0 or offset + n > self.capacity:
            raise IndexError(f"{offset}+{n} is outside {self.name} ({self.capacity} bytes)")
        ts = self.track_size
        return offset // ts, (offset + n - 1) // ts + 1

    def write(self, offset: int, data) -> None:
        """Host write: copy-on-write to every target that still needs the
        old tracks, redirect-fill a partly written target track, record the
        change for the mirror, then store the bytes."""
        if not isinstance(data, np.ndarray):
            data = np.frombuffer(data, np.uint8)
        n = data.size
        if n == 0:
            return
        t0, t1 = self._span(offset, n)
        rel = self.tgt_rel
        with ExitStack() as stack:
            stack.enter_context(self.lock)
            if rel is not None:                   # lock order: target, then source
                stack.enter_context(rel.source.lock)
            if self.inhibits or (rel is not None and rel.revertible):
                raise RuntimeError(f"{self.name} is write-inhibited")
            self._cow(t0, t1)
            if rel is not None:
                rel._target_write(offset, n, t0, t1)
            m = self.mirror
            if m is not None:
                m._collide(t0, t1)
                m.oos[t0:t1] = True
            self.array[offset:offset + n] = data

    def _cow(self, t0: int, t1: int) -> None:
        """Copy the old tracks [t0, t1) to every target that needs them. Lock held."""
        S = self.tracks
        for rel in self.src_rels:
            tc, T = rel.to_copy, rel.target.tracks
            for t in range(t0, t1):
                if tc[t]:
                    T[t] = S[t]
                    tc[t] = False
            if rel.src_changed is not None:
                rel.src_changed[t0:t1] = True

    def _update_track(self, t: int, data: np.ndarray) -> None:
        """A PPRC update of one whole track (at a secondary)."""
        with self.lock:
            if self.inhibits:
                raise RuntimeError(f"{self.name} is write-inhibited")
            self._cow(t, t + 1)
            self.tracks[t] = data

    def _raw_array(self) -> np.ndarray:
        """The backing array (the name fastfc volumes give theirs)."""
        return self.array

    def read(self, offset: int, n: int) -> np.ndarray:
        """The logical image: a target's not-yet-copied tracks come from its source."""
        t0, t1 = self._span(offset, n)
        out = np.empty(n, np.uint8)
        rel = self.tgt_rel
        if rel is None:
            with self.lock:
                out[:] = self.array[offset:offset + n]
            return out
        ts = self.track_size
        with self.lock, rel.source.lock:
            tc, S = rel.to_copy, rel.source.array
            for t in range(t0, t1):
                a, b = max(offset, t * ts), min(offset + n, (t + 1) * ts)
                out[a - offset:b - offset] = S[a:b] if tc[t] else self.array[a:b]
        return out

    def close(self) -> None:
        self.array = self.tracks = None


class NpFlashCopy:
    """A FlashCopy relationship with NOCOPY background (``copy()`` copies in
    the calling thread) and optional change recording."""

    def __init__(self, source: NpVolume, target: NpVolume, *, record: bool = False) -> None:
        if (source.n_tracks, source.track_size) != (target.n_tracks, target.track_size):
            raise ValueError("source and target differ in geometry")
        n = source.n_tracks
        with source.lock, target.lock:
            self.source, self.target, self.record = source, target, record
            self.to_copy = np.ones(n, bool)
            self.src_changed = np.zeros(n, bool) if record else None
            self.tgt_changed = np.zeros(n, bool) if record else None
            self.revertible = False
            self.sequence = 0
            self._revert_image = None
            source.src_rels.append(self)
            target.tgt_rel = self

    @property
    def tracks_to_copy(self) -> int:
        return int(np.count_nonzero(self.to_copy))

    def copy(self) -> int:
        """Copy every track the target still needs, a chunk of tracks per
        hold of the source lock."""
        S, T = self.source.tracks, self.target.tracks
        chunk = max(1, CHUNK_BYTES // self.source.track_size)
        with self.source.lock:       # a scan racing a copy-on-write reads garbage
            todo = np.flatnonzero(self.to_copy).tolist()
        done = 0
        for i in range(0, len(todo), chunk):
            with self.source.lock:
                tc = self.to_copy
                for t in todo[i:i + chunk]:
                    if tc[t]:
                        T[t] = S[t]
                        tc[t] = False
                        done += 1
        return done

    def _target_write(self, offset: int, n: int, t0: int, t1: int) -> None:
        """A host write to the target: a partly written track it still needs
        takes the source's data first. Both locks held."""
        tc, ts = self.to_copy, self.source.track_size
        S, T = self.source.tracks, self.target.tracks
        for t in range(t0, t1):
            if tc[t]:
                if offset > t * ts or offset + n < (t + 1) * ts:
                    T[t] = S[t]
                tc[t] = False
        if self.tgt_changed is not None:
            self.tgt_changed[t0:t1] = True

    def resync(self, *, revertible: bool = False, sequence: int | None = None) -> None:
        """Incremental re-establish: recopy the tracks changed on either side."""
        with self.source.lock, self.target.lock:
            new = self.to_copy | self.src_changed | self.tgt_changed
            if revertible:
                self._revert_image = (self.to_copy, self.src_changed, self.tgt_changed,
                                      self.sequence)
                self.revertible = True
                self.source.inhibits += 1
            self.to_copy = new
            self.src_changed = np.zeros(self.source.n_tracks, bool)
            self.tgt_changed = np.zeros(self.source.n_tracks, bool)
            self.sequence = self.sequence + 1 if sequence is None else sequence

    def commit(self) -> None:
        with self.source.lock, self.target.lock:
            self._revert_image = None
            self.revertible = False
            self.source.inhibits -= 1

    def revert(self) -> None:
        with self.source.lock, self.target.lock:
            (self.to_copy, self.src_changed, self.tgt_changed,
             self.sequence) = self._revert_image
            self._revert_image = None
            self.revertible = False
            self.source.inhibits -= 1

    def withdraw(self) -> None:
        with self.source.lock, self.target.lock:
            self.source.src_rels.remove(self)
            self.target.tgt_rel = None


class NpPair:
    """A Global Copy pair A -> B over an in-process link."""

    def __init__(self, primary: NpVolume, secondary: NpVolume, *,
                 initial_copy: bool = True) -> None:
        n = primary.n_tracks
        self.primary, self.secondary = primary, secondary
        self.oos = np.ones(n, bool) if initial_copy else np.zeros(n, bool)
        self.cg: np.ndarray | None = None
        primary.mirror = self

    def _collide(self, t0: int, t1: int) -> None:
        """A host write to tracks of the CG in flight sends their CG version
        first. Primary lock held."""
        cg = self.cg
        if cg is None:
            return
        A, B = self.primary.tracks, self.secondary
        for t in range(t0, t1):
            if cg[t]:
                B._update_track(t, A[t])
                cg[t] = False

    def drain_cg(self) -> int:
        """Send every track of the CG, a chunk per hold of the primary lock."""
        A, B = self.primary.tracks, self.secondary
        chunk = max(1, CHUNK_BYTES // self.primary.track_size)
        cg = self.cg
        with self.primary.lock:      # a scan racing a collision reads garbage
            todo = np.flatnonzero(cg).tolist()
        sent = 0
        for i in range(0, len(todo), chunk):
            with self.primary.lock:
                for t in todo[i:i + chunk]:
                    if cg[t]:
                        B._update_track(t, A[t])
                        cg[t] = False
                        sent += 1
        return sent * self.primary.track_size

    def remove(self) -> None:
        with self.primary.lock:
            self.primary.mirror = None


class NpGlobalMirror:
    """A Global Mirror session: A -> B Global Copy, B -> C FlashCopy (NOCOPY,
    recording); :meth:`form_cg` forms one consistency group, :meth:`start`
    forms them continuously on a thread. ``stats`` holds the same phase
    samples as fastfc's ``GMStats`` (seconds)."""

    def __init__(self, triplets, *, initial_copy: bool = False) -> None:
        self.triplets = list(triplets)
        self.pairs = [NpPair(a, b, initial_copy=initial_copy) for a, b, _ in self.triplets]
        self.fcs = [NpFlashCopy(b, c, record=True) for _, b, c in self.triplets]
        self.primaries = sorted((a for a, _, _ in self.triplets), key=id)
        self.sequence = 0
        self.stats = {"coordination": [], "drain": [], "flashcopy": [], "rpo": []}
        self.successes = 0
        self.bytes_drained = 0
        self.last_cg_time: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def form_cg(self) -> None:
        # 1. coordinate: hold every primary's writes, swap the OOS bitmaps
        t = time.perf_counter()
        with ExitStack() as stack:
            for a in self.primaries:
                stack.enter_context(a.lock)
            for p in self.pairs:
                p.cg = p.oos
                p.oos = np.zeros(p.primary.n_tracks, bool)
            coordinated_at = time.time()
        t1 = time.perf_counter()
        # 2. drain
        for p in self.pairs:
            self.bytes_drained += p.drain_cg()
        for p in self.pairs:
            with p.primary.lock:
                p.cg = None
        t2 = time.perf_counter()
        # 3. FlashCopy: prepare every B -> C, then commit every one
        self.sequence += 1
        for fc in self.fcs:
            fc.resync(revertible=True, sequence=self.sequence)
        for fc in self.fcs:
            fc.commit()
        t3 = time.perf_counter()
        self.successes += 1
        self.last_cg_time = coordinated_at
        st = self.stats
        st["coordination"].append(t1 - t)
        st["drain"].append(t2 - t1)
        st["flashcopy"].append(t3 - t2)
        st["rpo"].append(time.time() - coordinated_at)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="np-gm")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.form_cg()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def percentiles(self) -> dict[str, dict[str, float]]:
        out = {}
        for k, v in self.stats.items():
            a = np.asarray(v or [np.nan], float)
            out[k] = {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}
        return out

    def close(self) -> None:
        for p in self.pairs:
            p.remove()
        for fc in self.fcs:
            fc.withdraw()
