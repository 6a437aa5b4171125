# Included by _core.pyx: the host I/O path (VolumeBase) and the helpers it
# shares with the other kernels (write errors; the locking is _cascade.pxi's).

cdef int raise_write_error(VolumeBase v, int err, str what) except -1:
    """Raise the error for a failed ``pwrite`` to ``v``'s file."""
    if err == _errno.ENOSPC or err == _errno.EDQUOT:
        raise NoSpaceError(f"{v!r}: the filesystem has no room for {what}")
    raise OSError(err, f"writing {what} to {v!r}: {os.strerror(err)}")


cdef int raise_space(VolumeBase v, int err, Py_ssize_t nbytes) except -1:
    """Raise the error for a failed block reservation on a thin volume."""
    if err == _errno.ENOSPC or err == _errno.EDQUOT:
        raise NoSpaceError(
            f"{v!r}: the filesystem has no room for {nbytes} more bytes; nothing "
            "was written and no bitmap changed (free space and retry)")
    raise OSError(err, f"reserving {nbytes} bytes for {v!r}: {os.strerror(err)}")


#: The default grain: the engine's unit of change tracking and copying under
#: any larger track (a host write of 4 KiB copies 4 KiB, not a whole track).
GRAIN = 4096


cdef inline int log2_exact(Py_ssize_t n) noexcept:
    cdef int shift = 0
    while ((<Py_ssize_t>1) << shift) < n:
        shift += 1
    return shift


cdef inline void land_write(uint8_t* base, uint64_t* oos, uint64_t* oos_s, Py_ssize_t t0,
                            Py_ssize_t t1, const uint8_t* src, Py_ssize_t n,
                            Py_ssize_t offset) noexcept nogil:
    """The end of a host write: the out-of-sync bits (if any, and their
    summary ``oos_s``), then the data, through the mapping."""
    if oos != NULL:
        bms_set_range(oos, oos_s, t0, t1)
    memcpy(base + offset, src, n)


cdef class VolumeBase:
    """A volume's bytes, lock, flags and the I/O path.

    The public subclass :class:`fastfc.Volume` builds the backing array;
    this base holds a raw pointer to it so that reads and writes are C calls.
    """

    cdef readonly Py_ssize_t n_tracks
    cdef readonly Py_ssize_t track_size
    cdef readonly Py_ssize_t capacity
    cdef readonly int track_shift
    # the grain (a divisor of the track, 4 KiB by default): every bitmap of
    # the engine has a bit per grain; a 4 KiB write copies 4 KiB, not a track
    cdef readonly Py_ssize_t n_grains
    cdef readonly Py_ssize_t grain_size
    cdef readonly int grain_shift
    cdef readonly Py_ssize_t grains_per_track
    cdef readonly long long vid
    cdef uint8_t* base
    cdef object _array
    cdef object _ro          # the read-only view that .array hands out
    cdef PyThread_type_lock _lk
    cdef unsigned long _owner
    cdef int _depth
    # the write gate of the Global Mirror session it is a primary of (and
    # its slot there), and the gate passed for the lock held now
    cdef WriteGate _gate
    cdef Py_ssize_t _gate_slot
    cdef WriteGate _held_gate
    # relationships and flags, guarded by this volume's lock
    cdef public list _src_rels
    cdef public RelationshipBase _tgt_rel
    cdef public MirrorBase _mirror
    cdef public int _inhibits
    cdef public bint _secondary
    cdef public bint _invalid
    # bumped whenever _src_rels changes or one of them gets other bitmaps
    # (resync, revert), so a kernel that runs without the GIL on a copy of
    # the list and of their bitmaps' addresses can tell it went stale
    cdef public int _rels_version
    # memory-mapped file: PPRC updates write only the pages that change
    cdef public bint _file_backed
    # thin (sparse) file: blocks are reserved (fallocate) on first touch of a
    # track, before any byte lands; _alloc marks the tracks that have them
    cdef readonly bint thin
    cdef int _fd
    cdef TrackBitmap _alloc
    # thin on a memory filesystem (tmpfs): there a read fault on a hole takes
    # a page too, so reads reserve the tracks they touch as writes do
    cdef public bint _reads_allocate
    # whether a FlashCopy target of this volume is thin, as of _rels_version
    # _space_version (so a write to a thick volume tests flags, not targets)
    cdef bint _thin_targets
    cdef int _space_version
    # bytes counted for the benchmarks' amplification figures, under this
    # volume's lock (or its FlashCopy source's, which guards its tracks to
    # copy): written by hosts; and copied in by the engine (copy-on-write
    # from its source, PPRC updates and drains from its primary, background
    # copy, a virtual track fetched for a partial write, a restore)
    cdef public long long host_bytes
    cdef public long long copied_bytes
    # recovery points (_points.pxi): this volume's chain, which each write
    # saves into first; the restore its reads go through (read-only till done)
    cdef public PointChainBase _chain
    cdef public PointRestoreBase _restoring

    def __cinit__(self, *args, **kwargs):
        self._lk = PyThread_allocate_lock()
        if self._lk == NULL:
            raise MemoryError("could not allocate a volume lock")
        self.vid = next(_volume_ids)
        self._src_rels = []
        self._tgt_rel = None
        self._mirror = None
        self._fd = -1
        self._space_version = -1
        if _environment_unwarned:
            _warn_environment()

    def __dealloc__(self):
        if self._lk != NULL:
            PyThread_free_lock(self._lk)

    def _attach(self, array, Py_ssize_t track_size, int fd=-1, TrackBitmap allocated=None,
                Py_ssize_t grain_size=0):
        """Adopt ``array`` (1-D C-contiguous uint8) as the backing store.

        ``grain_size`` (a power of two dividing ``track_size``; 0: the
        smaller of the track and :data:`GRAIN`) is the unit of the engine's
        bitmaps. A thin file-backed volume passes its file descriptor (kept
        until close) and the bitmap of grains whose blocks the file already
        has. ``array`` may be read-only (a volume of a unit opened read-only
        maps its file shared and read-only, so that no private copy of a
        volume larger than memory is charged): such a volume must refuse
        every path that stores into it.
        """
        cdef const uint8_t[::1] mv = array
        if grain_size == 0:
            grain_size = track_size if track_size < GRAIN else GRAIN
        if (grain_size <= 0 or grain_size & (grain_size - 1) or grain_size > track_size
                or track_size & (track_size - 1)):
            raise ValueError(f"the grain ({grain_size} bytes) must be a power of two "
                             f"that divides the track ({track_size} bytes)")
        self._array = array
        self._ro = read_only(array)
        self.base = <uint8_t*>&mv[0]
        self.track_size = track_size
        self.track_shift = log2_exact(track_size)
        self.grain_size = grain_size
        self.grain_shift = log2_exact(grain_size)
        self.capacity = array.shape[0]
        self.n_tracks = self.capacity >> self.track_shift
        self.n_grains = self.capacity >> self.grain_shift
        self.grains_per_track = track_size >> self.grain_shift
        self.thin = allocated is not None
        if self.thin and (fd < 0 or allocated.n_bits != self.n_grains):
            raise ValueError("a thin volume needs its file descriptor and a bitmap "
                             "of n_grains bits")
        self._fd = fd
        self._alloc = allocated

    def _detach(self):
        """Forget the backing store (close). Takes this volume's lock and, if
        it is a FlashCopy target, its source's (a copy-on-write lands on a
        target under the source's lock only). Returns None if it was closed
        already, else the file descriptor a thin volume kept (-1 for none),
        for the caller to close. The arrays
        handed out keep the memory alive; the engine never touches it again."""
        cdef RelationshipBase tr = self._lock_io()
        cdef int fd = self._fd
        try:
            if self.base == NULL:
                return None
            self._array = None
            self._ro = None
            self.base = NULL
            self._fd = -1
            self._alloc = None
            if tr is not None:
                # a drain running without the GIL on a copy of the source's
                # target pointers stops at its next chunk
                tr.source._rels_version += 1
            return fd
        finally:
            unlock_io(self, tr)

    @property
    def closed(self):
        return self.base == NULL

    @property
    def array(self):
        """The volume's bytes as a read-only, zero-copy view of the backing
        store: the physical content, without FlashCopy read redirection (use
        :meth:`read` for the logical image). It stays valid after
        :meth:`close` (the memory is freed when the last view dies)."""
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._reads_allocate:
            # a view reads anywhere: on tmpfs a hole read takes a page, so a
            # thin volume there gets them all first (NoSpaceError if it can't)
            self._reserve_runs(NULL, 0, self.n_grains, self.n_grains)
        return self._ro

    def _raw_array(self):
        """The writable backing array: for tests and benchmarks that plant
        raw bytes. A write through it bypasses copy-on-write, change
        recording, mirroring and (thin volumes) space reservation."""
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._reads_allocate:
            self._reserve_runs(NULL, 0, self.n_grains, self.n_grains)
        return self._array

    # -- space (thin volumes) ------------------------------------------------
    cdef int _reserve_runs(self, const uint64_t* m, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t budget, bint clear=False) except -1:
        """Thin volume: give the file blocks for the tracks set in ``m`` (clear
        in ``m`` with ``clear``; every track when ``m`` is NULL) from
        ``start`` (below ``stop``), the first ``budget`` of them, before any
        byte lands there. Raises NoSpaceError when the filesystem is full. A
        no-op otherwise.

        On a disk filesystem (ext4, xfs) the blocks come in whole aligned
        chunks of THIN_CHUNK bytes, the largest page-cache folio. A store
        through the mapping write-faults a whole folio (readahead makes them
        up to 2 MiB, naturally aligned), and the filesystem reserves blocks,
        inside the fault, for every part of the folio without any. With
        blocks per track, a folio ran on from a reserved track into a hole:
        on a full filesystem that reservation failed and the fault was
        SIGBUS, fallocate of the track having succeeded. A folio never
        straddles an allocated chunk and a hole; within fallocated (unwritten)
        extents a fault needs nothing more (as on a thick volume)."""
        cdef Py_ssize_t a, b, c, e, lim, done = 0, ct = 1
        cdef int err = 0, shift = self.grain_shift
        cdef uint64_t* w
        if not self.thin or self._alloc is None:
            return 0
        if self._file_backed and CHUNK > self.grain_size:
            ct = CHUNK >> shift      # tracks per chunk
        w = self._alloc.w
        if m == NULL:
            a = start
        elif clear:
            a = bm_next_clear(m, stop, start)
        else:
            a = bm_next_set(m, stop, start)
        while 0 <= a < stop and done < budget:
            lim = a + (budget - done)
            if lim > stop:
                lim = stop
            if m == NULL:
                b = lim
            else:
                b = bm_next_set(m, lim, a) if clear else bm_next_clear(m, lim, a)
                if b < 0:
                    b = lim
            # reserve the tracks of [a, b) that have no blocks yet (on a
            # disk: the whole aligned chunks that hold them)
            c = bm_next_clear(w, b, a)
            while 0 <= c < b:
                e = bm_next_set(w, b, c)
                if e < 0:
                    e = b
                if ct > 1:
                    c -= c % ct
                    e += (ct - e % ct) % ct
                    if e > self.n_grains:
                        e = self.n_grains
                with nogil:
                    err = posix_fallocate(self._fd, (<off_t>c) << shift,
                                          (<off_t>(e - c)) << shift)
                if err:
                    raise_space(self, err, (e - c) << shift)
                bms_set_range(w, self._alloc.s, c, e)
                c = bm_next_clear(w, b, e) if e < b else -1
            done += b - a
            if m == NULL:
                break
            a = bm_next_clear(m, stop, b) if clear else bm_next_set(m, stop, b)
        return 0

    cdef inline bint _needs_space(self, RelationshipBase tr) except -1:
        """Whether a write here may need blocks reserved first (lock held)."""
        cdef RelationshipBase r
        if self._space_version != self._rels_version:
            self._thin_targets = False
            for r in self._src_rels:
                if r.target.thin:
                    self._thin_targets = True
            self._space_version = self._rels_version
        return self.thin or self._thin_targets or (
            tr is not None and tr.source._reads_allocate)

    cdef int _reserve_write(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        """Before a write of ``n`` bytes (n > 0) at ``offset`` lands: blocks on
        this volume (if thin), on thin FlashCopy targets for the tracks a
        copy-on-write moves, and (tmpfs) on the source of this target for a
        partly written track it fetches. Lock held."""
        cdef RelationshipBase r
        cdef int shift = self.grain_shift
        cdef Py_ssize_t t0 = offset >> shift, t1 = ((offset + n - 1) >> shift) + 1
        if self.thin:
            self._reserve_runs(NULL, t0, t1, t1 - t0)
        for r in self._src_rels:
            if r.target.thin and bm_any_range(r.to_copy.w, t0, t1):
                r.target._reserve_runs(r.to_copy.w, t0, t1, t1 - t0)
        r = self._tgt_rel
        if r is not None and r.source._reads_allocate:
            # a partly written track still on the source is fetched from it
            # (only the first and the last track can be partly written)
            if offset & (self.grain_size - 1):
                r.source._reserve_runs(r.to_copy.w, t0, t0 + 1, 1)
            if (offset + n) & (self.grain_size - 1):
                r.source._reserve_runs(r.to_copy.w, t1 - 1, t1, 1)
        return 0

    def _reserve_tracks(self, TrackBitmap mask, bint read=False):
        """Thin volume: blocks for every track set in ``mask`` before data
        lands there (``read``: before it is read, which needs them only on a
        memory filesystem). A no-op for a thick volume. Lock held."""
        if mask.n_bits != self.n_grains:
            raise ValueError("the mask must have one bit per track")
        if read and not self._reads_allocate:
            return
        self._reserve_runs(mask.w, 0, self.n_grains, self.n_grains)

    def _reserve_read(self, Py_ssize_t t0, Py_ssize_t t1):
        """Before tracks [t0, t1) are read through :attr:`array` (the PPRC
        send paths): a thin volume on a memory filesystem reserves them."""
        if self._reads_allocate and 0 <= t0 <= t1 <= self.n_grains:
            self._reserve_runs(NULL, t0, t1, t1 - t0)

    @property
    def allocated_tracks(self):
        """Thin volume: how many tracks have blocks in the file, in whole or
        in part (None for a thick or in-memory volume)."""
        if not self.thin or self._alloc is None:
            return None
        return self._alloc.count_groups(self.grains_per_track)

    @property
    def allocated_bytes(self):
        """Thin volume: the bytes of its grains with blocks (else None)."""
        if not self.thin or self._alloc is None:
            return None
        return self._alloc.count() * self.grain_size

    # -- locking (fastfc/_gate.pxi: a primary passes its session's gate) -----
    cdef inline int _acquire(self) except -1:
        volume_acquire(self)
        return 0

    cdef inline void _release(self) noexcept:
        volume_release(self)

    def _lock(self, double timeout=-1.0):
        """Acquire this volume's (re-entrant) lock; False on timeout."""
        return volume_acquire(self, timeout) == 1

    def _unlock(self):
        if self._owner != PyThread_get_thread_ident():
            raise RuntimeError("releasing a volume lock this thread does not hold")
        self._release()

    # -- host I/O ----------------------------------------------------------
    cdef int _check_range(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        if offset < 0 or n < 0 or offset > self.capacity - n:
            if offset < 0:
                what = f"offset {offset} is negative"
            elif offset > self.capacity:
                what = f"offset {offset} is past the end of the volume"
            elif n < 0:
                what = f"length {n} is negative"
            else:
                what = (f"I/O of {n} bytes at offset {offset} runs "
                        f"{offset + n - self.capacity} bytes past the end of the volume")
            raise IndexError(f"{what} (capacity {self.capacity} bytes)")
        return 0

    cdef int _check_valid_write(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        """An invalid volume (its FlashCopy was withdrawn before the copy
        completed) takes only a host write of the whole volume, which gives
        it a valid image again."""
        if self._invalid and not (offset == 0 and n == self.capacity):
            raise InvalidImageError(
                f"{self!r} does not hold a valid image (its FlashCopy was withdrawn "
                "before the copy completed) and refuses partial writes; write the "
                "whole volume (offset 0, capacity bytes) or establish a FlashCopy "
                "onto it to give it a valid image again")
        return 0

    def _valid_again(self):
        """Called after a whole-volume host write made an invalid volume
        valid (lock held); the public class records it."""

    cdef int _check_writable(self, Py_ssize_t t0, Py_ssize_t t1, int origin) except -1:
        """Refuse a write to tracks [t0, t1) that must not happen. Lock held."""
        cdef RelationshipBase r
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._inhibits or (self._src_rels and gated(self._src_rels)):
            raise WriteInhibitedError(
                f"{self!r} is write-inhibited: it is the source of a revertible "
                "FlashCopy; commit or revert it first")
        if origin == ORIGIN_HOST and self._secondary:
            raise WriteInhibitedError(
                f"{self!r} is a PPRC secondary and refuses host writes")
        if self._restoring is not None:
            raise WriteInhibitedError(
                f"{self!r} is taking a recovery point's image and is read-only until "
                "the restore's copy completes (wait() or copy() on the restore)")
        r = self._tgt_rel
        if r is not None:
            if r.revertible:
                raise WriteInhibitedError(
                    f"{self!r} is the target of a revertible FlashCopy")
            if r.inhibit_target_write:
                raise WriteInhibitedError(
                    f"{self!r} is a FlashCopy target with inhibit_target_write")
            if r.source.base == NULL and bm_any_range(r.to_copy.w, t0, t1):
                raise VolumeClosedError(
                    f"source {r.source!r} of this target is closed")
        for r in self._src_rels:
            if r.target.base == NULL and bm_any_range(r.to_copy.w, t0, t1):
                raise VolumeClosedError(
                    f"copy-on-write target {r.target!r} is closed")
        return 0

    cdef RelationshipBase _lock_io(self):
        """Lock self and, if self is a FlashCopy target, its source (and the
        volumes above it, if that is a target too); return that relationship
        (or None). :func:`unlock_io` releases them."""
        cdef RelationshipBase r
        while True:
            r = self._tgt_rel
            lock_two(self, r.source if r is not None else None)
            if self._tgt_rel is r:
                if r is None or r.source._tgt_rel is None:
                    return r
                unlock_two(self, r.source)     # a cascade: the whole chain
                lock_chain(self)
                return self._tgt_rel
            unlock_two(self, r.source if r is not None else None)

    cdef int _write(self, Py_ssize_t offset, const uint8_t* src, Py_ssize_t n,
                    int origin) except -1:
        cdef RelationshipBase tr = None, r
        cdef VolumeBase S = None
        cdef Py_ssize_t t0, t1, t, ts, k, resume, ntr, done
        cdef int shift = self.grain_shift
        cdef MirrorBase m
        cdef list rels
        cdef uint64_t* w
        cdef uint64_t* oos = NULL
        cdef uint64_t* oos_s = NULL
        cdef const uint8_t* hb
        cdef bint pending = 0, whole_tracks = 0
        # a volume on a disk: every store into it may fault (writeback cleans
        # its pages; ext4's page_mkwrite), so it runs without the GIL whatever
        # its size; in memory a small copy keeps it (cheaper than releasing)
        cdef bint on_disk = self._file_backed
        self._check_range(offset, n)
        tr = self._lock_io()
        if tr is not None:
            S = tr.source
        try:
            t0 = offset >> shift
            t1 = ((offset + n - 1) >> shift) + 1 if n else t0
            self._check_writable(t0, t1, origin)
            if origin == ORIGIN_HOST and self._invalid:
                self._check_valid_write(offset, n)
            if n == 0:
                return 0
            rels = self._src_rels
            ntr = len(rels)
            if self._needs_space(tr):
                self._reserve_write(offset, n)
            if self._chain is not None:
                # the newest recovery point takes the old grains it lacks
                self._chain._save(self.base, t0, t1)
            # ---- from here on nothing refuses: the write is applied whole
            m = self._mirror
            if m is not None and m.cg is not None and bm_any_range(m.cg.w, t0, t1):
                m._collide(t0, t1)
            if tr is not None and ntr and bm_any_range(tr.to_copy.w, t0, t1):
                cascade_cow(self, t0, t1)    # a middle volume: its logical grains
            for k in range(ntr):
                r = <RelationshipBase>rels[k]
                w = r.to_copy.w
                if bm_any_range(w, t0, t1):
                    # copy-on-write: the target takes the old tracks first
                    if ((t1 - t0) << shift) >= NOGIL_BYTES or (
                            r.target._file_backed):
                        with nogil:
                            done = copy_set_runs(r.target.base, self.base, w, t0, t1,
                                                 t1 - t0, shift, &resume)
                    else:
                        done = copy_set_runs(r.target.base, self.base, w, t0, t1, t1 - t0,
                                             shift, &resume)
                    r.target.copied_bytes += done << shift
                    if _cow_hook is not None:
                        _cow_hook(self)
                if r.src_changed is not None:
                    bms_set_range(r.src_changed.w, r.src_changed.s, t0, t1)
            if tr is not None:
                w = tr.to_copy.w
                if bm_any_range(w, t0, t1):
                    for t in range(t0, t1):
                        if bm_test(w, t):
                            ts = t << shift
                            if offset <= ts and offset + n >= ts + self.grain_size:
                                whole_tracks = 1   # cleared once the data is in
                            else:
                                # partial write of a virtual track: fetch it first
                                hb = holder_base(S, t)
                                if self.grain_size >= NOGIL_BYTES or on_disk:
                                    with nogil:
                                        memcpy(self.base + ts, hb + ts, self.grain_size)
                                else:
                                    memcpy(self.base + ts, hb + ts, self.grain_size)
                                self.copied_bytes += self.grain_size
                                bm_clear(w, t)
                if tr.tgt_changed is not None:
                    bms_set_range(tr.tgt_changed.w, tr.tgt_changed.s, t0, t1)
            # Metadata is recorded before the data lands, so that a process
            # killed mid-write (bitmaps live in memory-mapped files on a
            # storage unit) never holds a changed track that no bitmap names.
            if m is not None and m.oos is not None:
                oos = m.oos.w
                oos_s = m.oos.s
                pending = bm_any_range(oos, t0, t1)
            if n >= NOGIL_BYTES or on_disk:
                with nogil:
                    land_write(self.base, oos, oos_s, t0, t1, src, n, offset)
            else:
                land_write(self.base, oos, oos_s, t0, t1, src, n, offset)
            if origin == ORIGIN_HOST:
                self.host_bytes += n
            else:
                self.copied_bytes += n
            if whole_tracks:
                for t in range(t0, t1):
                    ts = t << shift
                    if offset <= ts and offset + n >= ts + self.grain_size:
                        bm_clear(tr.to_copy.w, t)
            if origin == ORIGIN_HOST and self._invalid:
                self._invalid = False      # the whole volume was rewritten
                self._valid_again()
            if m is not None and m.sync:
                m._sync_write(offset, n, pending)
        finally:
            unlock_io(self, tr)
        return 0

    def write(self, Py_ssize_t offset, data):
        """Write ``data`` (bytes-like or uint8 array) at byte ``offset``.

        Copy-on-write to every FlashCopy target that still needs the old
        tracks happens first; the write is then applied whole, or refused
        whole (closed, out of range, wrong type, write-inhibited).
        """
        self._write_buffer(offset, data, ORIGIN_HOST)

    def _write_origin(self, Py_ssize_t offset, data, int origin):
        """Write with an explicit origin (``PPRC`` for updates at a secondary)."""
        self._write_buffer(offset, data, origin)

    cdef int _write_buffer(self, Py_ssize_t offset, object data, int origin) except -1:
        """Borrow ``data`` as bytes and write it (the one path of :meth:`write`
        and :meth:`_write_origin`)."""
        cdef Py_buffer view
        get_read_buffer(data, &view)
        try:
            self._write(offset, <const uint8_t*>view.buf, view.len, origin)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _read(self, Py_ssize_t offset, uint8_t* dst, Py_ssize_t n) except -1:
        cdef RelationshipBase tr = None
        cdef VolumeBase S = None
        cdef Py_ssize_t t0, t1
        cdef const uint64_t* w
        cdef int shift = self.grain_shift, err = 0
        self._check_range(offset, n)
        if self._restoring is not None and restore_read(self, offset, dst, n):
            return 0
        tr = self._lock_io()
        if tr is not None:
            S = tr.source
        try:
            if self.base == NULL:
                raise VolumeClosedError(f"{self!r} is closed")
            if self._invalid:
                raise InvalidImageError(
                    f"{self!r} does not hold a valid image: its FlashCopy was "
                    "withdrawn before the copy completed")
            if n == 0:
                return 0
            t0 = offset >> shift
            t1 = ((offset + n - 1) >> shift) + 1
            if self._reads_allocate:
                # the tracks read from this volume (not those redirected)
                if tr is None:
                    self._reserve_runs(NULL, t0, t1, t1 - t0)
                else:
                    self._reserve_runs(tr.to_copy.w, t0, t1, t1 - t0, True)
            if tr is not None and S._reads_allocate and S.base != NULL:
                S._reserve_runs(tr.to_copy.w, t0, t1, t1 - t0)
            if tr is not None and bm_any_range(tr.to_copy.w, t0, t1):
                if S.base == NULL:
                    raise VolumeClosedError(f"source {S!r} of this target is closed")
                w = tr.to_copy.w
                if S._tgt_rel is not None:
                    read_logical(dst, self, offset, n)     # a cascade
                elif n >= NOGIL_BYTES:
                    with nogil:
                        copy_redirected(dst, self.base, S.base, w, offset, n, shift)
                else:
                    copy_redirected(dst, self.base, S.base, w, offset, n, shift)
            elif n >= NOGIL_BYTES and self._file_backed and self._fd >= 0:
                # a volume on a disk: a large read goes through the file, so
                # that uncached pages come in batched I/O (the mapping is
                # advised random: its faults read one page at a time)
                with nogil:
                    err = pread_all(self._fd, dst, n, offset)
                if err:
                    raise OSError(err, f"reading {n} bytes at {offset} of {self!r}: "
                                       f"{os.strerror(err)}")
            elif n >= NOGIL_BYTES:
                with nogil:
                    memcpy(dst, self.base + offset, n)
            else:
                memcpy(dst, self.base + offset, n)
        finally:
            unlock_io(self, tr)
        return 0

    def read(self, Py_ssize_t offset, Py_ssize_t length):
        """Return ``length`` bytes at ``offset`` as a new uint8 array: the
        volume's logical image (a FlashCopy target reads not-yet-copied tracks
        from its source)."""
        cdef Py_buffer view
        self._check_range(offset, length)
        out = np.empty(length, dtype=np.uint8)
        get_write_buffer(out, &view)
        try:
            self._read(offset, <uint8_t*>view.buf, length)
        finally:
            PyBuffer_Release(&view)
        return out

    def readinto(self, Py_ssize_t offset, out):
        """Read ``len(out)`` bytes at ``offset`` into a writable uint8 buffer."""
        cdef Py_buffer view
        get_write_buffer(out, &view)
        try:
            self._read(offset, <uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def write_batch(self, offsets, data, int origin=ORIGIN_HOST):
        """Write ``data[i]`` at ``offsets[i]`` for every i, in order.

        ``data`` is a 2-D C-contiguous uint8 array, one row per offset. The
        whole batch is checked (ranges, types, state) before any byte is
        written, and this volume's lock is held across it. ``origin``
        ``PPRC``: the rows are PPRC updates at a secondary (a remote unit
        applying a batch of its drain).
        """
        if origin != ORIGIN_HOST and origin != ORIGIN_PPRC:
            raise ValueError(f"origin must be HOST or PPRC, got {origin}")
        cdef const int64_t[::1] offs
        cdef Py_buffer view
        cdef Py_ssize_t i, k, L, off
        cdef RelationshipBase tr = None
        offs = as_offsets(offsets)
        if not isinstance(data, np.ndarray):
            raise TypeError(f"data must be a 2-D uint8 numpy array, not {type(data).__name__}")
        if data.ndim != 2:
            raise ValueError("data must be a 2-D uint8 array, one row per offset")
        k = offs.shape[0]
        if data.shape[0] != k:
            raise ValueError(f"{k} offsets but {data.shape[0]} rows of data")
        L = data.shape[1]
        for i in range(k):
            self._check_range(offs[i], L)
        get_read_buffer(data, &view)
        try:
            tr = self._lock_io()
            try:
                for i in range(k):
                    off = offs[i]
                    self._check_writable(off >> self.grain_shift,
                                         ((off + L - 1) >> self.grain_shift) + 1 if L else 0,
                                         origin)
                    if self._invalid:
                        self._check_valid_write(off, L)
                if L and self._needs_space(tr):
                    # every block the batch needs, before its first byte lands
                    for i in range(k):
                        self._reserve_write(offs[i], L)
                for i in range(k):
                    self._write(offs[i], <const uint8_t*>view.buf + i * L, L, origin)
            finally:
                unlock_io(self, tr)
        finally:
            PyBuffer_Release(&view)

    def read_batch(self, offsets, Py_ssize_t length):
        """Read ``length`` bytes at each offset; returns a (k, length) array."""
        cdef const int64_t[::1] offs = as_offsets(offsets)
        cdef Py_ssize_t i, k = offs.shape[0]
        cdef Py_buffer view
        for i in range(k):
            self._check_range(offs[i], length)
        out = np.empty((k, length), dtype=np.uint8)
        get_write_buffer(out, &view)
        try:
            for i in range(k):
                self._read(offs[i], <uint8_t*>view.buf + i * length, length)
        finally:
            PyBuffer_Release(&view)
        return out


# Cython records no annotation for a C-typed argument: the host I/O methods
# get those of the stub (_core.pyi) here, for help(), inspect and type hints.
VolumeBase.write.__annotations__ = {
    "offset": "int", "data": "bytes | bytearray | memoryview | np.ndarray", "return": "None"}
VolumeBase.read.__annotations__ = {"offset": "int", "length": "int", "return": "np.ndarray"}
VolumeBase.readinto.__annotations__ = {
    "offset": "int", "out": "bytearray | memoryview | np.ndarray", "return": "None"}
