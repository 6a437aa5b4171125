# Included by _core.pyx: the bases of a FlashCopy relationship and of a PPRC
# pair's primary hook, and the batched steps of a consistency group.

# --------------------------------------------------------------------------
# Volumes, relationships and mirror hooks
# --------------------------------------------------------------------------

cdef class MirrorBase:
    """Primary-side hook of a PPRC pair, consulted by every host write.

    ``oos``: tracks owed to the secondary, set by every write before its data
    lands (a Metro Mirror pair clears them again once the secondary has it).
    ``cg``: tracks owed to the consistency group being drained, or None; a
    write touching one first calls ``_collide`` so the CG version is saved.
    ``sync``: Metro Mirror; each write calls ``_sync_write(offset, length,
    pending)`` before it completes, with the primary's lock held; ``pending``
    tells whether a track of the write was already out of sync before it.
    """

    cdef public TrackBitmap oos
    cdef public TrackBitmap cg
    cdef public TrackBitmap spare
    cdef public bint sync

    def _collide(self, Py_ssize_t t0, Py_ssize_t t1):
        pass

    def _sync_write(self, Py_ssize_t offset, Py_ssize_t length, bint pending):
        pass


cdef class RelationshipBase:
    """The bitmaps and flags of a FlashCopy relationship, read by the I/O path.

    All fields are guarded by the source volume's lock.
    """

    cdef public VolumeBase source
    cdef public VolumeBase target
    cdef public TrackBitmap to_copy
    cdef public TrackBitmap src_changed
    cdef public TrackBitmap tgt_changed
    cdef public bint inhibit_target_write
    cdef public bint revertible
    cdef public bint active

    def _copy_chunk(self, Py_ssize_t start, Py_ssize_t max_tracks):
        """Copy up to ``max_tracks`` set tracks from ``start`` on, under the
        locks; return ``(tracks copied, resume position)``."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t done = 0, resume = 0, n
        cdef uint64_t* w
        cdef int shift
        lock_two(S, T)
        try:
            if not self.active or self.revertible:
                return 0, start
            if S.base == NULL or T.base == NULL:
                raise VolumeClosedError("background copy needs both volumes open")
            n = S.n_tracks
            shift = S.track_shift
            w = self.to_copy.w
            T._reserve_runs(w, start, n, max_tracks)
            if S._reads_allocate:
                S._reserve_runs(w, start, n, max_tracks)
            with nogil:
                done = copy_set_runs(T.base, S.base, w, start, n, max_tracks, shift, &resume)
        finally:
            unlock_two(S, T)
        return done, resume

    def _copy_tracks_where(self, TrackBitmap mask, bint to_source):
        """Copy every track set in ``mask`` between the volumes (target ->
        source when ``to_source``), clearing ``mask``. Caller holds the locks."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t resume, done
        cdef uint8_t* dst = S.base if to_source else T.base
        cdef const uint8_t* src = T.base if to_source else S.base
        cdef Py_ssize_t n = S.n_tracks
        cdef int shift = S.track_shift
        S._reserve_runs(mask.w, 0, n, n)   # no-op unless thin
        T._reserve_runs(mask.w, 0, n, n)
        with nogil:
            done = copy_set_runs(dst, src, mask.w, 0, n, n, shift, &resume)
        return done


# ---------------------------------------------------------------------------
# Batched steps of a consistency group (a secondary group's share of it)
# ---------------------------------------------------------------------------

def first_closed(list volumes):
    """The index of the first closed volume of ``volumes``, or -1."""
    cdef Py_ssize_t k
    for k in range(len(volumes)):
        if (<VolumeBase?>volumes[k]).base == NULL:
            return k
    return -1


def zero_bitmaps(list bitmaps):
    """Clear every bitmap of ``bitmaps`` (one call for a store's pool)."""
    cdef TrackBitmap bm
    for o in bitmaps:
        bm = <TrackBitmap?>o
        memset(bm.w, 0, bm.n_words * 8)


def prepare_revertible_many(list rels, Py_ssize_t start, sequence, list fresh):
    """The in-memory step of ``FlashCopy.resync(revertible=True,
    sequence=sequence)`` for ``rels[start:]``, in order, each under its
    source's and target's locks: the revert image keeps the current
    bitmaps and sequence, the new ``to_copy`` is ``to_copy | src_changed |
    tgt_changed`` (into ``fresh[3k]``), the change bitmaps are the empty
    ``fresh[3k+1]`` and ``fresh[3k+2]``, the source is write-inhibited.

    The caller has checked what holds for the whole group (the sequence
    number, a store that records nothing and is writable, no fault armed at
    ``prepare``). Stops before the first relationship whose own state asks
    for the per-relationship method (withdrawn, without change recording,
    already revertible, a closed volume, a background copy to start),
    which then raises or does the step as usual. Returns the index it
    stopped at (``len(rels)`` when done).
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef TrackBitmap out, sc, tc
    if len(fresh) < 3 * n:
        raise ValueError("prepare_revertible_many needs three fresh bitmaps per relationship")
    for k in range(start, n):
        o = rels[k]
        r = <RelationshipBase?>o
        S, T = r.source, r.target
        if (not r.active or r.revertible or r.src_changed is None or r.tgt_changed is None
                or S is None or T is None or S.base == NULL or T.base == NULL):
            return k
        out = <TrackBitmap?>fresh[3 * k]
        sc = <TrackBitmap?>fresh[3 * k + 1]
        tc = <TrackBitmap?>fresh[3 * k + 2]
        if (out.n_bits != r.to_copy.n_bits or sc.n_bits != out.n_bits
                or tc.n_bits != out.n_bits or r.src_changed.n_bits != out.n_bits
                or r.tgt_changed.n_bits != out.n_bits):
            raise ValueError("prepare_revertible_many: bitmaps of different sizes")
        lock_two(S, T)
        try:
            if not r.active or r.revertible or S.base == NULL or T.base == NULL:
                return k
            bm_or3_words(out.w, r.to_copy.w, r.src_changed.w, r.tgt_changed.w, out.n_words)
            o._revert_image = (r.to_copy, r.src_changed, r.tgt_changed, o.sequence)
            r.revertible = True
            S._inhibits += 1
            r.to_copy = out
            r.src_changed = sc
            r.tgt_changed = tc
            S._rels_version += 1    # a drain that took the old bitmaps stops
            o.sequence = sequence
            o._cursor = 0
        finally:
            unlock_two(S, T)
    return n


def end_revertible_many(list rels, Py_ssize_t start, bint commit, list dropped):
    """The in-memory step of ``FlashCopy.commit()`` (``commit``) or
    ``revert()`` for ``rels[start:]``, in order, each under its source's
    and target's locks: the bitmaps that drop out (the revert image's on
    commit, the current ones on revert) are appended to ``dropped`` for the
    store's pool, and the source's write-inhibit is released.

    As :func:`prepare_revertible_many`, the caller has checked the group
    (a store that records nothing and is writable, no fault armed at
    ``commit`` / ``revert``), and it stops before the first relationship
    whose own state asks for the per-relationship method (withdrawn, not
    revertible, a closed volume, a background copy to start). Returns the
    index it stopped at (``len(rels)`` when done).
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef tuple image
    for k in range(start, n):
        o = rels[k]
        r = <RelationshipBase?>o
        S, T = r.source, r.target
        if (not r.active or not r.revertible or S is None or T is None
                or S.base == NULL or T.base == NULL or o.background_copy):
            return k
        lock_two(S, T)
        try:
            image = o._revert_image
            if not r.active or not r.revertible or image is None or S.base == NULL \
                    or T.base == NULL:
                return k
            if commit:
                dropped.extend(image[:3])
            else:
                dropped.append(r.to_copy)
                dropped.append(r.src_changed)
                dropped.append(r.tgt_changed)
                r.to_copy, r.src_changed, r.tgt_changed, o.sequence = image
                S._rels_version += 1
            o._revert_image = None
            r.revertible = False
            S._inhibits -= 1
        finally:
            unlock_two(S, T)
    return n


def cg_end_many(list primaries, list hooks):
    """Close the consistency group of every mirror hook after a drain that
    succeeded (``PPRCPair._cg_end(True)``), each under its primary's lock:
    the emptied CG bitmap becomes the spare, no CG is in flight. (A failed
    drain goes through the per-pair method, which gives the tracks back.)"""
    cdef Py_ssize_t k, n = len(hooks)
    cdef VolumeBase A
    cdef MirrorBase m
    if len(primaries) != n:
        raise ValueError("cg_end_many needs one primary per hook")
    for k in range(n):
        A = <VolumeBase?>primaries[k]
        o = hooks[k]
        m = <MirrorBase?>o
        A._acquire()
        try:
            if m.cg is not None:
                if o.side:
                    o.side = {}
                o.cg_bytes = 0
                m.spare = m.cg
                m.cg = None
        finally:
            A._release()


def pool_bitmaps(bitmaps, dict free, Py_ssize_t free_bytes, Py_ssize_t cap):
    """Put the bitmaps of ``bitmaps`` (None skipped) in ``free`` (n_bits ->
    list), while ``free_bytes`` stays within ``cap``; returns the new
    ``free_bytes``. (A store's pool: one call for a CG's bitmaps.)"""
    cdef TrackBitmap bm
    cdef Py_ssize_t last = -1, nb
    cdef list pool = None
    for o in bitmaps:
        if o is None:
            continue
        bm = <TrackBitmap?>o
        nb = bm.n_words * 8
        if free_bytes + nb > cap:
            continue
        if bm.n_bits != last or pool is None:
            pool = free.get(bm.n_bits)
            if pool is None:
                pool = free[bm.n_bits] = []
            last = bm.n_bits
        pool.append(bm)
        free_bytes += nb
    return free_bytes
