# Included by _core.pyx after _points.pxi: a recovery point's read-through
# restore onto a recovery volume (the reads that find it still copying, the
# background copy's chunks) and the take of points of several volumes at one
# instant. The chain, its points and their grain tables are in _points.pxi.
#
# Locking: a restore holds both volumes' locks in volume-id order; a group
# take holds every volume's lock while its points are taken.

cdef bint restore_read(VolumeBase v, Py_ssize_t offset, uint8_t* dst, Py_ssize_t n) except -1:
    """A read of ``v`` while it takes a recovery point's image: through its
    restore, under both volumes' locks. False if the restore ended meanwhile
    (the caller reads as usual)."""
    cdef PointRestoreBase rs = v._restoring
    cdef VolumeBase S, F
    if rs is None:
        return False
    S = rs.chain.volume
    F = lock_through(v, S)       # (a point of a target reads through to its source)
    try:
        if v._restoring is not rs:
            return False
        if v.base == NULL:
            raise VolumeClosedError(f"{v!r} is closed")
        if n:
            rs._read(offset, dst, n)
        return True
    finally:
        unlock_through(v, S, F)


cdef class PointRestoreBase:
    """A recovery volume taking a point's image: ``copied`` marks its grains
    already on it (the others read through the chain); background copy
    fills them in. A fresh bitmap is all clear, which costs no page until a
    bit is set: starting a restore touches nothing. While it runs the
    recovery volume is read-only. Fields guarded by the locks of both
    volumes (taken in volume-id order)."""

    cdef readonly PointBase point
    cdef readonly PointChainBase chain
    cdef readonly VolumeBase target
    cdef readonly TrackBitmap copied
    cdef readonly bint active
    cdef public Py_ssize_t _cursor

    def _start(self, PointBase point, VolumeBase target, TrackBitmap copied):
        """Begin: every grain of ``target`` reads through the chain (its
        ``copied``, all clear, given). Both volumes' locks held."""
        cdef PointChainBase c = point.chain
        if c is None or point.expired:
            raise StateError(f"{point!r} has expired")
        if copied.n_bits != target.n_grains:
            raise ValueError("copied needs a bit per grain of the recovery volume")
        self.point = point
        self.chain = c
        self.target = target
        self.copied = copied
        self.active = True
        point.pins += 1
        target._restoring = self

    cdef void _end(self) noexcept:
        self.active = False
        self.point.pins -= 1
        if self.target._restoring is self:
            self.target._restoring = None

    @property
    def grains_to_copy(self):
        """Grains not yet on the recovery volume."""
        return self.copied.n_bits - self.copied.count() if self.active else 0

    def _finish(self):
        """End the restore if nothing is left to copy; whether it ended.
        Both locks held."""
        if self.active and bm_next_clear(self.copied.w, self.copied.n_bits, 0) < 0:
            self._end()
        return not self.active

    def _abandon(self):
        """End the restore now (the target's image is then incomplete: the
        caller marks it invalid). Both locks held."""
        if self.active:
            self._end()

    cdef int _read(self, Py_ssize_t offset, uint8_t* dst, Py_ssize_t n) except -1:
        """A read of the recovery volume: grains not yet copied through the
        chain, the others from the volume. Both locks held."""
        cdef PointChainBase c = self.chain
        cdef VolumeBase T = self.target
        cdef Py_ssize_t pos = offset, end = offset + n, g, piece
        cdef int shift = T.grain_shift
        cdef Py_ssize_t k = self.point.index
        cdef const uint64_t* w = self.copied.w
        cdef const uint8_t* src
        if c.volume.base == NULL:
            raise VolumeClosedError(
                f"{c.volume!r} is closed: the restore onto {T!r} reads through it")
        if c.volume._tgt_rel is not None and c.volume._tgt_rel.source.base == NULL:
            raise VolumeClosedError(
                f"{c.volume._tgt_rel.source!r} is closed: the restore onto {T!r} reads "
                "through it")
        if c.volume._reads_allocate and n:
            c.volume._reserve_runs(NULL, offset >> shift, ((end - 1) >> shift) + 1,
                                   c.volume.n_grains)
        while pos < end:
            g = pos >> shift
            piece = ((g + 1) << shift) - pos
            if piece > end - pos:
                piece = end - pos
            src = T.base + (g << shift) if bm_test(w, g) else c._resolve(k, g)
            memcpy(dst + (pos - offset), src + (pos - (g << shift)), piece)
            pos += piece
        return 0

    def _copy_chunk(self, Py_ssize_t start, Py_ssize_t budget):
        """Copy up to ``budget`` grains not yet copied from ``start`` on into
        the recovery volume; ``(grains copied, resume position)``. Both
        locks held by the caller."""
        cdef PointChainBase c = self.chain
        cdef VolumeBase S = c.volume, T = self.target
        cdef Py_ssize_t n = T.n_grains, a, b, e, done = 0, lim
        cdef int shift = T.grain_shift
        cdef Py_ssize_t k = self.point.index
        cdef uint64_t* w = self.copied.w
        cdef const uint64_t* h = c.held.w
        cdef RelationshipBase tr = S._tgt_rel
        if not self.active:
            return 0, start
        if S.base == NULL or T.base == NULL or (tr is not None and tr.source.base == NULL):
            raise VolumeClosedError("a restore needs both volumes open (and the source "
                                    "of a FlashCopy target it reads)")
        T._reserve_runs(w, start, n, budget, True)
        if S._reads_allocate:
            S._reserve_runs(w, start, n, budget, True)
        a = bm_next_clear(w, n, start)
        while a >= 0 and done < budget:
            lim = a + (budget - done)
            if lim > n:
                lim = n
            b = bm_next_set(w, lim, a)
            if b < 0:
                b = lim
            # [a, b): grains to copy; runs no point holds come off the volume
            while a < b:
                if bm_test(h, a):
                    memcpy(T.base + (a << shift), c._resolve(k, a), c.grain_size)
                    e = a + 1
                else:
                    e = bm_next_set(h, b, a)
                    if e < 0:
                        e = b
                    if tr is not None:
                        # a target's grains still on its source are read there
                        copy_redirected(T.base + (a << shift), S.base, tr.source.base,
                                        tr.to_copy.w, a << shift, (e - a) << shift, shift)
                    else:
                        with nogil:
                            copy_big(T.base + (a << shift), S.base + (a << shift),
                                     (e - a) << shift)
                bms_set_range(w, self.copied.s, a, e)
                done += e - a
                a = e
            a = bm_next_clear(w, n, b)
        T.copied_bytes += done << shift
        return done, (a if a >= 0 else n)


def take_many(list volumes, type cls, double now, double retain_for, object name):
    """Take a point (a new ``cls``, a :class:`PointBase`) on the chain of
    every volume of ``volumes`` (sorted by volume id, each with a chain; a
    volume twice is refused) at one instant: every lock is held while the points are
    taken. Each volume is checked first (open, not a PPRC secondary, not
    taking a point's image, valid): all are taken or none. Returns the points, in the order of ``volumes``."""
    cdef Py_ssize_t k, n = len(volumes), held = 0
    cdef VolumeBase v
    cdef PointChainBase c
    cdef PointBase p
    cdef list out = []
    cdef tuple group
    for k in range(n):
        v = <VolumeBase?>volumes[k]
        if v._chain is None:
            raise ValueError(f"{v!r} has no chain of recovery points")
        if k and v is volumes[k - 1]:
            raise ValueError(f"{v!r} appears twice in take_points")
        if k and v.vid < (<VolumeBase>volumes[k - 1]).vid:
            raise ValueError("take_many needs the volumes sorted by volume id")
    try:
        for k in range(n):
            (<VolumeBase>volumes[k])._acquire()
            held += 1
        for k in range(n):
            v = <VolumeBase>volumes[k]
            if v.base == NULL:
                raise VolumeClosedError(f"{v!r} is closed")
            if v._secondary:
                raise LimitError(f"{v!r} is a PPRC secondary; recovery points of a "
                                 "secondary are not supported")
            if v._restoring is not None:
                raise StateError(f"{v!r} is taking a recovery point's image; wait for its "
                                 "restore to complete")
            if v._invalid:
                raise StateError(f"{v!r} holds no valid image")
        for k in range(n):
            # a durable chain logs the take before the point exists (and
            # before any grain is saved into it)
            (<PointChainBase>(<VolumeBase>volumes[k])._chain)._log_take()
        for k in range(n):
            v = <VolumeBase>volumes[k]
            c = v._chain
            p = <PointBase?>cls.__new__(cls)
            p.taken_at = now
            p.retain_until = now + retain_for
            p.name = name
            p.chain = c
            p.seq = c.next_seq
            c.next_seq += 1
            p.index = len(c.points)
            c.points.append(p)
            c.newest = p
            out.append(p)
        group = tuple(out)
        for k in range(n):
            (<PointBase>out[k]).group = group
    finally:
        for k in range(held - 1, -1, -1):
            (<VolumeBase>volumes[k])._release()
    return out


def point_log_compacted(PointChainBase chain):
    """The shortest log that rebuilds ``chain``: per live point, oldest
    first, the seq it follows on (if a gap), its take and its grains.
    An (n, 3) int64 array. Its volume's lock held."""
    cdef PointBase p
    cdef Py_ssize_t i, k = 0, n = 1, k0
    cdef int64_t prev = 0
    for p in chain.points:
        n += 2 + p.tab.count
    out = np.zeros((n, 3), dtype=np.int64)
    cdef int64_t[:, ::1] o = out
    for p in chain.points:
        if p.seq != prev:
            o[k, 0] = LOG_NEXT_SEQ
            o[k, 1] = p.seq
            k += 1
        o[k, 0] = LOG_TAKE
        o[k, 1] = p.seq
        k += 1
        k0 = k
        for i in range(p.tab.cap):
            if p.tab.keys[i] >= 0:
                o[k, 0] = LOG_SAVE
                o[k, 1] = p.tab.keys[i]
                o[k, 2] = p.tab.slots[i]
                k += 1
        # by slot: a replay then mostly appends to the pool
        out[k0:k] = out[k0:k][np.argsort(out[k0:k, 2], kind="stable")]
        prev = p.seq + 1
    if chain.next_seq != prev:
        o[k, 0] = LOG_NEXT_SEQ
        o[k, 1] = chain.next_seq
        k += 1
    return out[:k].copy()
