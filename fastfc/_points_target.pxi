# Included by _core.pyx after _points.pxi: the recovery points of a
# FlashCopy target (C of B->C), and the locks their reads take.
#
# A target's logical image at grain g is its source's grain while the
# relationship's ``to_copy`` bit is set, else its own. A point of the target
# reads that image through the chain (PointChainBase._live) where no point
# holds the grain. The image changes without a host write of the target
# exactly where a step flips a ``to_copy`` bit: a resync or establish sets
# the bits of the grains changed on either side (the target then reads the
# source's new data there), a revert (or an undone step) puts the old bits
# back, a withdraw drops them all. Before such a step, the newest point
# takes each grain whose bit flips and that it lacks (save_flips): it holds
# the image its point and the older ones read there, and no grain is
# copied twice. Background copy and copy-on-write clear a bit only after
# the source's grain is on the target: the image does not change there, so
# they save nothing (no point reads a target's own grain while its bit is
# set: a point that needed it took it when the bit was set).
#
# Saving a grain into the newest point is correct at any time (a grain the
# newest lacks is unchanged since its take), so a step refused after its
# save leaves every point's image as it was; it only used a grain's room.
#
# Locking: a point of a target reads under the target's lock and its
# source's (VolumeBase._lock_io); a restore of one adds the recovery
# volume's, all three in volume-id order (lock_through).


cdef int save_flips(PointChainBase c, TrackBitmap old, TrackBitmap a, TrackBitmap b,
                    TrackBitmap d) except -1:
    """Before a FlashCopy step changes its target's ``to_copy`` from ``old``
    to ``a | b | d`` (None: no bits), the newest point of the target's chain
    ``c`` takes each grain whose bit flips and that it lacks. Uses the
    bitmaps' summaries when every one has one (a resync: only the words the
    change bitmaps may set). The source's and target's locks held."""
    cdef Py_ssize_t nw = old.n_words, ns, i, j, g, run0 = -1, run1 = -1
    cdef uint64_t m, sm
    cdef bint summed = old.s != NULL
    cdef const uint8_t* base = c.volume.base
    if c.newest is None:
        return 0
    for x in (a, b, d):
        if x is not None and (<TrackBitmap>x).s == NULL:
            summed = False
    ns = (nw + 63) >> 6 if summed else nw
    for j in range(ns):
        if summed:
            sm = old.s[j]
            if a is not None:
                sm |= a.s[j]
            if b is not None:
                sm |= b.s[j]
            if d is not None:
                sm |= d.s[j]
        else:
            sm = 1
        while sm:
            i = (j << 6) + <Py_ssize_t>__builtin_ctzll(sm) if summed else j
            sm &= sm - 1
            if i >= nw:
                break
            m = 0
            if a is not None:
                m |= a.w[i]
            if b is not None:
                m |= b.w[i]
            if d is not None:
                m |= d.w[i]
            m ^= old.w[i]
            while m:
                g = (i << 6) + <Py_ssize_t>__builtin_ctzll(m)
                m &= m - 1
                if g == run1:
                    run1 += 1
                    continue
                if run0 >= 0:
                    c._save(base, run0, run1)
                run0, run1 = g, g + 1
    if run0 >= 0:
        c._save(base, run0, run1)
    return 0


def save_point_grains(VolumeBase v, TrackBitmap mask):
    """Before ``v``'s logical image changes at the grains set in ``mask``
    (a FlashCopy establish, withdraw or undone step onto ``v``): the newest
    of its recovery points takes those it lacks. Nothing without a chain
    or a point. ``v``'s lock held (and its FlashCopy source's, if any)."""
    cdef PointChainBase c = v._chain
    if c is None or c.newest is None:
        return 0
    if mask.n_bits != v.n_grains:
        raise ValueError("save_point_grains needs a bit per grain of the volume")
    c._save_mask(v.base, mask.w)
    return 0


cdef VolumeBase lock_through(VolumeBase a, VolumeBase b):
    """Lock ``a``, ``b`` and, while ``b`` is a FlashCopy target, its source,
    in volume-id order (``a`` may be None). Returns that source (or None),
    for :func:`unlock_through`."""
    cdef RelationshipBase r
    cdef VolumeBase s, x, y, z
    while True:
        r = b._tgt_rel
        s = r.source if r is not None else None
        if s is a or s is b:
            s = None
        x, y, z = b, (a if a is not b else None), s
        # volume-id order, the Nones last (at most three volumes)
        if y is None:
            y, z = z, None
        if y is not None and y.vid < x.vid:
            x, y = y, x
        if z is not None and z.vid < y.vid:
            y, z = z, y
            if y.vid < x.vid:
                x, y = y, x
        x._acquire()
        if y is not None:
            y._acquire()
        if z is not None:
            z._acquire()
        if b._tgt_rel is r:
            return s
        if z is not None:
            z._release()
        if y is not None:
            y._release()
        x._release()


cdef void unlock_through(VolumeBase a, VolumeBase b, VolumeBase s) noexcept:
    if s is not None and s is not a and s is not b:
        s._release()
    if a is not None and a is not b:
        a._release()
    b._release()


def locked_through(VolumeBase a, VolumeBase b):
    """:func:`lock_through` for Python: returns the source locked (or None);
    release with :func:`unlocked_through`."""
    return lock_through(a, b)


def unlocked_through(VolumeBase a, VolumeBase b, VolumeBase s):
    unlock_through(a, b, s)
