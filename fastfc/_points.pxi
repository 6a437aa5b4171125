# Included by _core.pyx: recovery points (a chain of thin, cascaded NOCOPY
# copies of one volume), the copy-on-write into the newest point that the
# host write path calls; the restore and the group take are in _points_restore.pxi.
#
# docs/guide/recovery-points.md explains the design; in short:
# - A chain's points are ordered oldest .. newest. Only the newest receives
#   copy-on-write: a write to grain g that the newest point does not hold
#   saves the old grain there once, then lands. So a write copies at most
#   one grain once, however many points the chain holds.
# - A point holds the grains that changed between it and the next point:
#   a grain -> slot table (open addressing) into the chain's slot pool.
# - Point i's image at grain g: the first of points i, i+1, .., newest that
#   holds g, else the live volume's logical image (a FlashCopy target's grain
#   still to copy is on its source: _points_target.pxi). ``held`` (a bit per
#   grain, set when some point may hold it) sends every other grain to the
#   volume at once.
# - Expiring the oldest point drops its grains (no newer point reads them);
#   expiring another merges the grains its older neighbour lacks into it
#   (the values are the neighbour's own at those grains), dropping the rest.
#
# Locking: the chain, its points' tables and its pool are guarded by the
# volume's lock (as a FlashCopy source's bitmaps are). A restore onto a
# recovery volume holds both volumes' locks in volume-id order.

from cpython.list cimport PyList_GET_ITEM
from libc.stdlib cimport malloc, realloc

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void* addr, size_t length, int advice)
    int MADV_HUGEPAGE

# Durable chains (storage units) keep their pool in a file (chunk i at
# offset i << POOL_CHUNK_SHIFT, mapped shared; privately in a read-only
# unit) and log what changes their tables, in order, to a second file
# (_points_log.pxi). Replaying the log rebuilds the chain exactly.

# A pool chunk is 2 MiB (or one grain, if larger), aligned and advised for a
# huge page: it is allocated whole, then handed out a slot at a time (freed
# slots are reused first). Its first touch then faults one huge page, not a
# page per grain, which a copy-on-write of 4 KiB would otherwise pay each.
cdef enum:
    POOL_CHUNK_SHIFT = 21


cdef struct GrainTable:
    int64_t* keys        # grain, or -1 for an empty entry
    int64_t* slots       # its slot in the pool (the chain's latest: a seq)
    int64_t* prevs       # the seq of the point that held it before, or -1
    Py_ssize_t cap       # a power of two, or 0 before the first entry
    Py_ssize_t count
    int bits


cdef inline Py_ssize_t tab_home(int64_t g, int bits) noexcept nogil:
    return <Py_ssize_t>((<uint64_t>g * <uint64_t>0x9E3779B97F4A7C15ULL) >> (64 - bits))


cdef inline Py_ssize_t tab_find(const GrainTable* t, int64_t g) noexcept nogil:
    """The entry of grain ``g`` in ``t``, or -1."""
    cdef Py_ssize_t i, mask
    cdef int64_t k
    if t.count == 0:
        return -1
    mask = t.cap - 1
    i = tab_home(g, t.bits)
    while True:
        k = t.keys[i]
        if k == g:
            return i
        if k < 0:
            return -1
        i = (i + 1) & mask


cdef inline int64_t tab_get(const GrainTable* t, int64_t g) noexcept nogil:
    """The slot of grain ``g`` in ``t``, or -1."""
    cdef Py_ssize_t i = tab_find(t, g)
    return t.slots[i] if i >= 0 else -1


cdef inline void tab_insert(GrainTable* t, int64_t g, int64_t slot, int64_t prev) noexcept nogil:
    """Put a grain the table does not hold (room is the caller's)."""
    cdef Py_ssize_t mask = t.cap - 1
    cdef Py_ssize_t i = tab_home(g, t.bits)
    while t.keys[i] >= 0:
        i = (i + 1) & mask
    t.keys[i] = g
    t.slots[i] = slot
    t.prevs[i] = prev
    t.count += 1


cdef int tab_reserve(GrainTable* t, Py_ssize_t more) except -1:
    """Room for ``more`` further entries at a load of at most 1/2."""
    cdef Py_ssize_t need = (t.count + more) * 2, cap = 16, i
    cdef int bits = 4
    cdef GrainTable n
    if need <= t.cap:
        return 0
    while cap < need:
        cap <<= 1
        bits += 1
    n.keys = <int64_t*>malloc(cap * sizeof(int64_t))
    n.slots = <int64_t*>malloc(cap * sizeof(int64_t))
    n.prevs = <int64_t*>malloc(cap * sizeof(int64_t))
    if n.keys == NULL or n.slots == NULL or n.prevs == NULL:
        free(n.keys)
        free(n.slots)
        free(n.prevs)
        raise MemoryError("no memory for a recovery point's grain table")
    memset(n.keys, 0xff, cap * sizeof(int64_t))
    n.cap, n.bits, n.count = cap, bits, 0
    for i in range(t.cap):
        if t.keys[i] >= 0:
            tab_insert(&n, t.keys[i], t.slots[i], t.prevs[i])
    free(t.keys)
    free(t.slots)
    free(t.prevs)
    t[0] = n
    return 0


cdef inline void tab_free(GrainTable* t) noexcept nogil:
    free(t.keys)
    free(t.slots)
    free(t.prevs)
    t.keys = t.slots = t.prevs = NULL
    t.cap = t.count = 0
    t.bits = 0


cdef class PointBase:
    """One recovery point: the grains that changed between it and the next
    point of its chain (their old contents, in the chain's slot pool).

    Guarded by the chain's volume's lock. ``index`` is its place in the
    chain (0: the oldest); ``seq`` a number that only grows along a chain;
    ``pins`` counts the restores reading through it (it cannot expire while
    any is running); ``expired`` is set once it is gone.
    """

    cdef GrainTable tab
    cdef readonly long long seq
    cdef readonly Py_ssize_t index
    cdef readonly bint expired
    cdef public int pins
    cdef readonly PointChainBase chain
    # when it was taken and until when it is kept (its chain's clock), its
    # label, and the points taken with it at the same instant
    cdef public double taken_at
    cdef public double retain_until
    cdef public object name
    cdef public tuple group

    def __dealloc__(self):
        tab_free(&self.tab)

    @property
    def saved_grains(self):
        """How many grains this point holds."""
        return self.tab.count

    @property
    def table_bytes(self):
        """The bytes of its grain table."""
        return self.tab.cap * 3 * sizeof(int64_t)

    def saved(self):
        """The grains it holds, sorted (an int64 array; tests and tools)."""
        cdef Py_ssize_t i, k = 0
        out = np.empty(self.tab.count, dtype=np.int64)
        cdef int64_t[::1] o = out
        for i in range(self.tab.cap):
            if self.tab.keys[i] >= 0:
                o[k] = self.tab.keys[i]
                k += 1
        out.sort()
        return out


cdef class PointChainBase:
    """The recovery points of one volume, oldest first, and their slot pool.

    Made by :meth:`_attach` onto a volume (which then calls :meth:`_save`
    from every write); guarded by that volume's lock.
    """

    cdef readonly VolumeBase volume
    cdef readonly list points
    cdef PointBase newest
    cdef readonly TrackBitmap held
    # grain -> the seq of the newest point that took it (its ``slots``); an
    # expired seq stands for the newest live point at or before it, which
    # holds the grain now (an expiry merges into the older neighbour)
    cdef GrainTable latest
    cdef readonly Py_ssize_t grain_size
    cdef int shift
    cdef int pshift          # log2 of the slots per pool chunk
    cdef long long next_seq
    # the slot pool: chunks of 2 MiB (1 << pshift grains), and the free slots
    cdef uint8_t** chunks
    cdef Py_ssize_t n_chunks, chunks_cap
    cdef int64_t* free_slots
    cdef Py_ssize_t n_free, free_cap
    cdef int64_t next_slot
    cdef Py_ssize_t kept_chunks   # reserved (_reserve_pool): kept when emptied
    # durable chains: the pool's file (-1: in memory; mapped privately if
    # ``pool_private``: a read-only unit) and the log (_points_log.pxi)
    cdef int pool_fd
    cdef bint pool_private
    cdef PointLog log
    # a log write failed: the tables may hold grains the log does not name,
    # so nothing more is saved (host writes refused) until the unit reopens
    cdef readonly bint log_failed

    def __cinit__(self, *args, **kwargs):
        self.points = []
        self.pool_fd = -1
        self.log.fd = -1

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.n_chunks):
            self._drop_chunk(self.chunks[i])
        free(self.chunks)
        free(self.free_slots)
        tab_free(&self.latest)
        log_unmap(&self.log)

    def _attach(self, VolumeBase volume):
        """Become ``volume``'s chain (its lock held by the caller)."""
        if volume.base == NULL:
            raise VolumeClosedError(f"{volume!r} is closed")
        if volume._chain is not None:
            raise StateError(f"{volume!r} already has a chain of recovery points")
        self.volume = volume
        self.grain_size = volume.grain_size
        self.shift = volume.grain_shift
        self.pshift = POOL_CHUNK_SHIFT - self.shift if self.shift < POOL_CHUNK_SHIFT else 0
        self.held = TrackBitmap(volume.n_grains)
        volume._chain = self

    # -- the pool ------------------------------------------------------------
    cdef inline uint8_t* _slot(self, int64_t s) noexcept nogil:
        return self.chunks[s >> self.pshift] + ((s & ((1 << self.pshift) - 1)) << self.shift)

    cdef int64_t _alloc_slot(self) except -1:
        if self.n_free:
            self.n_free -= 1
            return self.free_slots[self.n_free]
        if (self.next_slot >> self.pshift) >= self.n_chunks:
            self._new_chunk()
        self.next_slot += 1
        return self.next_slot - 1

    cdef uint8_t* _new_chunk(self) except NULL:
        """Add a chunk to the pool; returns it."""
        cdef uint8_t* c = NULL
        cdef void* p
        cdef Py_ssize_t cap
        cdef size_t size = (<size_t>1) << (self.pshift + self.shift)
        if self.n_chunks == self.chunks_cap:
            cap = self.chunks_cap * 2 if self.chunks_cap else 16
            p = realloc(self.chunks, cap * sizeof(uint8_t*))
            if p == NULL:
                raise MemoryError("no memory for the recovery points' pool")
            self.chunks = <uint8_t**>p
            self.chunks_cap = cap
        if self.pool_fd >= 0:
            # (grown only: a reopened pool maps the chunks its file holds)
            if lseek(self.pool_fd, 0, SEEK_END) < <off_t>(self.n_chunks + 1) * <off_t>size:
                if self.pool_private:
                    raise ValueError("the recovery points' pool file is shorter than its "
                                     "log says")
                if ftruncate(self.pool_fd, <off_t>(self.n_chunks + 1) * <off_t>size) != 0:
                    raise OSError(errno, "cannot grow the recovery points' pool file")
            # (populated: the chunk's pages in one call, not a fault per grain saved)
            p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE if self.pool_private else MAP_SHARED | MAP_POPULATE,
                     self.pool_fd, <off_t>self.n_chunks * <off_t>size)
            if p == MAP_FAILED:
                raise OSError(errno, "cannot map the recovery points' pool file")
            c = <uint8_t*>p
        else:
            if posix_memalign(<void**>&c, <size_t>1 << POOL_CHUNK_SHIFT, size) != 0:
                raise MemoryError("no memory for the recovery points' pool")
            madvise(c, size, MADV_HUGEPAGE)
        self.chunks[self.n_chunks] = c
        self.n_chunks += 1
        return c

    def _reserve_pool(self, Py_ssize_t nbytes):
        """Make room now for ``nbytes`` more of grains than the pool has free:
        chunks allocated and touched (their page faults paid here, not by
        the writes that copy into them), and kept when the points expire.
        Returns the bytes of room. Lock held."""
        cdef Py_ssize_t need, room
        cdef uint8_t* c
        cdef size_t size = (<size_t>1) << (self.pshift + self.shift)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        need = (nbytes + self.grain_size - 1) >> self.shift
        room = (self.n_chunks << self.pshift) - self.next_slot + self.n_free
        while room < need:
            c = self._new_chunk()
            with nogil:
                memset(c, 0, size)
            room += 1 << self.pshift
        self.kept_chunks = self.n_chunks
        return room << self.shift

    cdef int _free_slot(self, int64_t s) except -1:
        cdef void* p
        cdef Py_ssize_t cap
        if self.n_free == self.free_cap:
            cap = self.free_cap * 2 if self.free_cap else 256
            p = realloc(self.free_slots, cap * sizeof(int64_t))
            if p == NULL:
                raise MemoryError("no memory for the recovery points' free list")
            self.free_slots = <int64_t*>p
            self.free_cap = cap
        self.free_slots[self.n_free] = s
        self.n_free += 1
        return 0

    @property
    def pool_bytes(self):
        """Bytes of grain data the pool holds in use (freed slots excluded)."""
        return (self.next_slot - self.n_free) << self.shift

    @property
    def links_bytes(self):
        """The bytes of the table of each grain's newest holder."""
        return self.latest.cap * 3 * sizeof(int64_t)

    @property
    def reserved_bytes(self):
        """Bytes the pool has allocated (its chunks, in use or free)."""
        return (self.n_chunks << self.pshift) << self.shift

    # -- copy-on-write (the host write path) ----------------------------------
    cdef inline const uint8_t* _live(self, Py_ssize_t g) noexcept:
        """Where the volume's logical grain ``g`` is now: on its FlashCopy
        source while a target still reads it there, else on the volume.
        The volume's lock (and a target's source's) held."""
        cdef RelationshipBase r = self.volume._tgt_rel
        if r is not None and bm_test(r.to_copy.w, g):
            return r.source.base + (g << self.shift)
        return self.volume.base + (g << self.shift)

    cdef int _save(self, const uint8_t* base, Py_ssize_t g0, Py_ssize_t g1) except -1:
        """Before grains [g0, g1) of the volume's logical image change: the
        newest point takes the old content of each one it does not hold yet
        (``base``: the volume's mapping; a FlashCopy target's grain still to
        copy is read on its source). Lock held (a target's source's too)."""
        cdef PointBase p = self.newest
        cdef RelationshipBase tr = self.volume._tgt_rel
        cdef const uint8_t* src
        cdef Py_ssize_t g
        cdef int64_t s
        cdef int shift = self.shift
        cdef Py_ssize_t e
        cdef int64_t saved[2 * 64]
        cdef Py_ssize_t nrec = 0
        if p is None:
            return 0
        if self.log_failed:
            raise OSError(EIO,
                          f"the recovery points' log of {self.volume!r} could not be "
                          "written earlier: the volume refuses writes until its unit is "
                          "opened again (every point reads as logged)")
        for g in range(g0, g1):
            if tab_get(&p.tab, g) >= 0:
                continue
            tab_reserve(&p.tab, 1)
            tab_reserve(&self.latest, 1)
            s = self._alloc_slot()
            src = base + (g << shift)
            if tr is not None and bm_test(tr.to_copy.w, g):
                src = tr.source.base + (g << shift)
            memcpy(self._slot(s), src, self.grain_size)
            if self.log.fd >= 0:
                # the grain's bytes are in the pool; its record follows, and
                # the host write only after the records are written
                saved[2 * nrec] = g
                saved[2 * nrec + 1] = s
                nrec += 1
                if nrec == 64:
                    self._log_saves(saved, nrec)
                    nrec = 0
            e = tab_find(&self.latest, g)
            if e >= 0:
                tab_insert(&p.tab, g, s, self.latest.slots[e])
                self.latest.slots[e] = p.seq
            else:
                tab_insert(&p.tab, g, s, -1)
                tab_insert(&self.latest, g, p.seq, -1)
            bms_set_range(self.held.w, self.held.s, g, g + 1)
        if nrec:
            self._log_saves(saved, nrec)
        return 0

    cdef int _log_saves(self, const int64_t* saved, Py_ssize_t n) except -1:
        """Log ``n`` saved (grain, slot) pairs. Ordered (durability "power"):
        the pool on the disk first, then the records, synced. A failure
        leaves the chain failed (see ``log_failed``)."""
        cdef Py_ssize_t i
        try:
            if self.log.ordered:
                log_sync_fd(self.pool_fd)
            for i in range(n):
                log_append(&self.log, LOG_SAVE, saved[2 * i], saved[2 * i + 1])
            if self.log.ordered:
                log_sync_fd(self.log.fd)
        except OSError as e:
            self.log_failed = True
            raise OSError(e.errno, f"cannot write the recovery points' log of "
                                   f"{self.volume!r}: {e.strerror}; the volume "
                                   "refuses writes until its unit is opened again") from None
        return 0

    cdef int _save_mask(self, const uint8_t* base, const uint64_t* w) except -1:
        """:meth:`_save` for every grain set in ``w`` (a bitmap of the
        volume's grains). Lock held."""
        cdef Py_ssize_t n = self.volume.n_grains, a, b
        if self.newest is None:
            return 0
        a = bm_next_set(w, n, 0)
        while a >= 0:
            b = bm_next_clear(w, n, a)
            if b < 0:
                b = n
            self._save(base, a, b)
            a = bm_next_set(w, n, b)
        return 0

    # -- reading a point ------------------------------------------------------
    cdef inline Py_ssize_t _at_or_before(self, int64_t seq) noexcept:
        """The index of the newest live point whose seq is at most ``seq``,
        or -1."""
        cdef Py_ssize_t lo = 0, hi = len(self.points), mid
        if seq >= self.next_seq - 1 and hi:
            return hi - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if (<PointBase>PyList_GET_ITEM(self.points, mid)).seq <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef inline const uint8_t* _resolve(self, Py_ssize_t k, Py_ssize_t g) noexcept:
        """Where point ``k``'s grain ``g`` is: in the first of points k ..
        newest that holds it, else on the volume. The points that hold a
        grain are linked newest to oldest (``prevs``): the walk visits only
        those newer than point k, each found by a binary search. Lock held."""
        cdef Py_ssize_t j, e
        cdef int64_t seq
        cdef PointBase p
        cdef const uint8_t* found = NULL
        if not bm_test(self.held.w, g):
            return self._live(g)
        e = tab_find(&self.latest, g)
        seq = self.latest.slots[e] if e >= 0 else -1
        while seq >= 0:
            j = self._at_or_before(seq)
            if j < k:
                break
            p = <PointBase>PyList_GET_ITEM(self.points, j)
            e = tab_find(&p.tab, g)
            if e < 0:
                return self._resolve_scan(k, g)     # (never: the links hold)
            found = self._slot(p.tab.slots[e])
            seq = p.tab.prevs[e]
        if found != NULL:
            return found
        return self._live(g)

    cdef const uint8_t* _resolve_scan(self, Py_ssize_t k, Py_ssize_t g) noexcept:
        """:meth:`_resolve` by looking at every point from k on."""
        cdef Py_ssize_t j, n = len(self.points)
        cdef int64_t s
        cdef PointBase p
        for j in range(k, n):
            p = <PointBase>PyList_GET_ITEM(self.points, j)
            s = tab_get(&p.tab, g)
            if s >= 0:
                return self._slot(s)
        return self._live(g)

    def _check_links(self):
        """Whether every grain of every point resolves the same through the
        links as by looking at every point (tests). Lock held."""
        cdef Py_ssize_t k, i
        for k in range(len(self.points)):
            for i in range(self.volume.n_grains):
                if self._resolve(k, i) != self._resolve_scan(k, i):
                    return False
        return True

    cdef int _read_point(self, PointBase p, Py_ssize_t offset, uint8_t* dst,
                         Py_ssize_t n) except -1:
        """Copy point ``p``'s image of bytes [offset, offset + n). Lock held."""
        cdef Py_ssize_t pos = offset, end = offset + n, g, piece
        cdef int shift = self.shift
        cdef Py_ssize_t k = p.index
        while pos < end:
            g = pos >> shift
            piece = ((g + 1) << shift) - pos
            if piece > end - pos:
                piece = end - pos
            memcpy(dst + (pos - offset), self._resolve(k, g) + (pos - (g << shift)), piece)
            pos += piece
        return 0

    def _read(self, PointBase p, Py_ssize_t offset, Py_ssize_t length):
        """Point ``p``'s bytes [offset, offset + length) as a new array."""
        cdef Py_buffer view
        cdef VolumeBase v = self.volume
        cdef RelationshipBase tr
        if p.chain is not self or p.expired:
            raise StateError(f"{p!r} has expired")
        v._check_range(offset, length)
        out = np.empty(length, dtype=np.uint8)
        get_write_buffer(out, &view)
        tr = v._lock_io()      # (a target's points read through to its source)
        try:
            if v.base == NULL:
                raise VolumeClosedError(f"{v!r} is closed: its recovery points read through it")
            if tr is not None and tr.source.base == NULL:
                raise VolumeClosedError(f"{tr.source!r} is closed: the recovery points of "
                                        f"its FlashCopy target {v!r} read through it")
            if p.expired:
                raise StateError(f"{p!r} has expired")
            if v._reads_allocate and length:
                v._reserve_runs(NULL, offset >> self.shift,
                                ((offset + length - 1) >> self.shift) + 1, v.n_grains)
            self._read_point(p, offset, <uint8_t*>view.buf, length)
        finally:
            unlock_io(v, tr)
            PyBuffer_Release(&view)
        return out

    # -- taking and expiring (the volume's lock held by the caller) ----------
    def _take(self, PointBase p):
        """Make ``p`` (fresh) the newest point: O(1), nothing moves."""
        if p.chain is not None:
            raise StateError(f"{p!r} belongs to a chain already")
        if self.volume.base == NULL:
            raise VolumeClosedError(f"{self.volume!r} is closed")
        self._log_take()
        p.chain = self
        p.seq = self.next_seq
        self.next_seq += 1
        p.index = len(self.points)
        self.points.append(p)
        self.newest = p

    def _expire(self, PointBase p):
        """Remove ``p``: the oldest drops its grains; another gives the
        grains its older neighbour lacks to it and drops the rest. Every
        other point's image stays as it was."""
        cdef PointBase q = None
        cdef Py_ssize_t i, k
        cdef int64_t g, s
        if p.chain is not self or p.expired:
            raise StateError(f"{p!r} has expired already")
        k = p.index
        if k > 0:
            q = <PointBase>self.points[k - 1]
            # room first: nothing is moved unless all of it can be
            tab_reserve(&q.tab, p.tab.count)
            if self.n_free + p.tab.count > self.free_cap:
                self._grow_free(p.tab.count)
        elif self.n_free + p.tab.count > self.free_cap:
            self._grow_free(p.tab.count)
        if self.log.fd >= 0:
            self._log_one(LOG_EXPIRE, p.seq)
        for i in range(p.tab.cap):
            g = p.tab.keys[i]
            if g < 0:
                continue
            s = p.tab.slots[i]
            if q is not None and tab_get(&q.tab, g) < 0:
                tab_insert(&q.tab, g, s, p.tab.prevs[i])
            else:
                self.free_slots[self.n_free] = s
                self.n_free += 1
        tab_free(&p.tab)
        del self.points[k]
        for i in range(k, len(self.points)):
            (<PointBase>self.points[i]).index = i
        p.expired = True
        p.index = -1
        self.newest = (<PointBase>self.points[len(self.points) - 1]) if self.points else None
        if not self.points:
            # nothing held any more: the next point starts clean
            self.held.fill(False)
            tab_free(&self.latest)
            self._release_pool()

    cdef int _grow_free(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t cap = self.free_cap if self.free_cap else 256
        cdef void* q
        while cap < self.n_free + more:
            cap *= 2
        q = realloc(self.free_slots, cap * sizeof(int64_t))
        if q == NULL:
            raise MemoryError("no memory for the recovery points' free list")
        self.free_slots = <int64_t*>q
        self.free_cap = cap
        return 0

    cdef void _drop_chunk(self, uint8_t* c) noexcept:
        if self.pool_fd >= 0:
            munmap(c, (<size_t>1) << (self.pshift + self.shift))
        else:
            free(c)

    cdef int _log_one(self, int64_t kind, int64_t a) except -1:
        """Log a take or an expiry (synced when ordered: before the lock is
        released, so no slot it frees is reused before the disk says so)."""
        try:
            log_append(&self.log, kind, a, 0)
            if self.log.ordered:
                log_sync_fd(self.log.fd)
        except OSError as e:
            self.log_failed = True
            raise OSError(e.errno, f"cannot write the recovery points' log of "
                                   f"{self.volume!r}: {e.strerror}; the volume "
                                   "refuses writes until its unit is opened again") from None
        return 0

    cdef int _log_take(self) except -1:
        """Log that the point of seq ``next_seq`` is taken (durable chains)."""
        if self.log.fd >= 0:
            self._log_one(LOG_TAKE, self.next_seq)
        return 0

    def _durable(self, int pool_fd, bint private=False):
        """Keep the pool in ``pool_fd``'s file (mapped privately if
        ``private``: a read-only unit). Before any chunk; the log is
        opened by :meth:`_open_log`."""
        if self.n_chunks:
            raise StateError("a chain's pool can be put in a file only while it is empty")
        self.pool_fd = pool_fd
        self.pool_private = private

    def _open_log(self, int log_fd, Py_ssize_t valid, bint ordered):
        """Append to the log file ``log_fd`` after its ``valid`` records (0:
        a new log) from now on; ``ordered``: durability "power"."""
        log_open(&self.log, log_fd, valid)
        self.log.ordered = ordered

    def _stop_log(self):
        """Write no more log records (a chain being closed)."""
        log_unmap(&self.log)

    @property
    def log_records(self):
        """Records in the log (the header excluded; 0 if not logging)."""
        return self.log.n - 1 if self.log.fd >= 0 else 0

    @property
    def log_room(self):
        """Records the log's mapping holds before it must grow."""
        return self.log.cap - self.log.n if self.log.fd >= 0 else 0

    def _replay_next_seq(self, int64_t seq):
        """Replay a LOG_NEXT_SEQ record: the next point taken gets ``seq``."""
        if seq < self.next_seq:
            raise ValueError(f"a recovery points' log sets the next seq back ({seq})")
        self.next_seq = seq

    @property
    def next_point_seq(self):
        """The seq the next point taken will get."""
        return self.next_seq

    def _replay_save(self, int64_t g, int64_t s):
        """Replay a LOG_SAVE record: the newest point holds grain ``g`` in
        slot ``s`` (its bytes are in the pool file). Lock held."""
        cdef PointBase p = self.newest
        cdef Py_ssize_t e, i
        if p is None:
            raise StateError("a recovery points' log saves a grain before any point")
        if g < 0 or g >= self.volume.n_grains or s < 0:
            raise ValueError(f"a recovery points' log record is out of range ({g}, {s})")
        if tab_get(&p.tab, g) >= 0:
            return
        while (s >> self.pshift) >= self.n_chunks:
            self._new_chunk()
        if s >= self.next_slot:
            for i in range(self.next_slot, s):
                self._free_slot(i)
            self.next_slot = s + 1
        else:
            for i in range(self.n_free - 1, -1, -1):
                if self.free_slots[i] == s:
                    self.free_slots[i] = self.free_slots[self.n_free - 1]
                    self.n_free -= 1
                    break
        tab_reserve(&p.tab, 1)
        tab_reserve(&self.latest, 1)
        e = tab_find(&self.latest, g)
        if e >= 0:
            tab_insert(&p.tab, g, s, self.latest.slots[e])
            self.latest.slots[e] = p.seq
        else:
            tab_insert(&p.tab, g, s, -1)
            tab_insert(&self.latest, g, p.seq, -1)
        bms_set_range(self.held.w, self.held.s, g, g + 1)

    cdef void _release_pool(self) noexcept:
        """No point left: free the chunks beyond those reserved."""
        cdef Py_ssize_t i
        for i in range(self.kept_chunks, self.n_chunks):
            self._drop_chunk(self.chunks[i])
        if self.n_chunks > self.kept_chunks:
            self.n_chunks = self.kept_chunks
            # (not while a log replays: later records name slots the file holds)
            if self.pool_fd >= 0 and self.log.fd >= 0:
                ftruncate(self.pool_fd, <off_t>self.kept_chunks
                          << <off_t>(self.pshift + self.shift))
        self.next_slot = 0
        self.n_free = 0

    def _detach(self):
        """Stop being the volume's chain (no point left). Lock held."""
        if self.points:
            raise StateError(f"{self.volume!r} still holds {len(self.points)} recovery points")
        if self.volume._chain is self:
            self.volume._chain = None
