# Included by _core.pyx: locking the volumes of a copy (two of them, or a
# whole FlashCopy chain) and cascaded FlashCopy, a target that is the source
# of another (S -> T1 -> T2 ...).
#
# A volume's logical image at grain g is its own grain, unless it is the
# target of a relationship that still has g to copy: then it is its
# source's logical image at g, and so on up the chain (logical_holder). A
# path that reads a middle volume's logical image (a read or a partial write
# of its target, a copy-on-write or a background copy out of it) holds the
# locks of every volume of the chain above the volume it serves
# (lock_chain), in volume-id order like every other lock taker. Without a
# cascade nothing here runs: the I/O path tests one pointer (whether the
# source of the target written or read is itself a target).
#
# Before a middle volume's logical image changes at some grains other than
# by a host write (its relationship's resync, revert, establish onto it,
# or a forced withdraw that leaves it invalid), its own targets that still
# read those grains through it take them first (cascade_save): the cascade's
# copy-on-write, which keeps every target's image whatever happens above it.

cdef inline int lock_two(VolumeBase a, VolumeBase b) except -1:
    """Acquire two volumes' locks (b may be None) in volume-id order."""
    if b is None or b is a:
        a._acquire()
    elif a.vid < b.vid:
        a._acquire()
        b._acquire()
    else:
        b._acquire()
        a._acquire()
    return 0


cdef inline void unlock_two(VolumeBase a, VolumeBase b) noexcept:
    a._release()
    if b is not None and b is not a:
        b._release()


# a chain of more volumes than this is refused at establish (and a cycle
# never forms): chain_of stops there whatever it meets
cdef Py_ssize_t _max_chain = 64
MAX_CHAIN = _max_chain


cdef list chain_of(VolumeBase v):
    """``v`` and the volumes above it: its FlashCopy source, that source's
    source, and so on (read without the locks: lock_chain verifies)."""
    cdef list out = [v]
    cdef RelationshipBase r = v._tgt_rel
    while r is not None and len(out) <= _max_chain:
        v = r.source
        out.append(v)
        r = v._tgt_rel
    return out


def _vid(VolumeBase v):
    return v.vid


cdef int lock_chain(VolumeBase v) except -1:
    """Hold the locks of ``v`` and of every volume above it, in volume-id
    order; the chain is the one found under the locks (retried if it
    changed while they were taken)."""
    cdef list vols, now
    cdef Py_ssize_t k
    while True:
        vols = chain_of(v)
        ordered = sorted(vols, key=_vid)
        for k in range(len(ordered)):
            (<VolumeBase>ordered[k])._acquire()
        now = chain_of(v)
        if len(now) == len(vols) and all(a is b for a, b in zip(now, vols)):
            return 0
        for k in range(len(ordered) - 1, -1, -1):
            (<VolumeBase>ordered[k])._release()


cdef void unlock_chain(VolumeBase v) noexcept:
    """Release what :func:`lock_chain` took (the chain cannot change while
    its locks are held)."""
    cdef list vols
    try:
        vols = chain_of(v)
    except BaseException:
        return
    for o in vols:
        (<VolumeBase>o)._release()


cdef inline bint lock_rel(VolumeBase S, VolumeBase T) except -1:
    """Lock a relationship's source and target; when the source is itself a
    target (a cascade), the target's whole chain. Returns whether the chain
    was taken (for :func:`unlock_rel`)."""
    lock_two(S, T)
    if S._tgt_rel is None:
        return False
    unlock_two(S, T)
    lock_chain(T)
    return True


cdef inline void unlock_rel(VolumeBase S, VolumeBase T, bint chain) noexcept:
    if chain:
        unlock_chain(T)
    else:
        unlock_two(S, T)


cdef inline void unlock_io(VolumeBase v, RelationshipBase tr) noexcept:
    """Release what ``VolumeBase._lock_io`` took (``tr``: its answer)."""
    if tr is None:
        v._release()
    elif tr.source._tgt_rel is None:
        unlock_two(v, tr.source)
    else:
        unlock_chain(v)


cdef inline VolumeBase logical_holder(VolumeBase v, Py_ssize_t g):
    """The volume whose own grain ``g`` is ``v``'s logical grain ``g``."""
    cdef RelationshipBase r = v._tgt_rel
    cdef Py_ssize_t k = 0
    while r is not None and bm_test(r.to_copy.w, g) and k < _max_chain:
        v = r.source
        r = v._tgt_rel
        k += 1
    return v


cdef inline const uint8_t* holder_base(VolumeBase v, Py_ssize_t g) except NULL:
    """The bytes that hold ``v``'s logical grain ``g`` (``v.base`` when
    ``v`` is no target): a source read for its target. Locks of the chain held."""
    cdef VolumeBase h = v if v._tgt_rel is None else logical_holder(v, g)
    if h.base == NULL:
        raise VolumeClosedError(f"{h!r}, which holds grains of {v!r}'s image, is closed")
    return h.base


cdef Py_ssize_t copy_logical(uint8_t* dst, VolumeBase v, uint64_t* w, Py_ssize_t start,
                             Py_ssize_t stop, Py_ssize_t budget, bint clear,
                             Py_ssize_t* resume) except -1:
    """Copy ``v``'s logical grains set in ``w`` within ``[start, stop)``
    into ``dst`` (at the same offsets), up to ``budget`` of them, clearing
    their bits if ``clear``. Every grain's holder is checked open before
    any byte moves. Returns the grains copied; ``resume[0]`` is where to
    carry on (``stop`` if done). Locks of ``v``'s chain held."""
    cdef Py_ssize_t a, b, g, e, lim, done = 0, pass_
    cdef int shift = v.grain_shift
    cdef VolumeBase h
    for pass_ in range(2):
        done = 0
        a = bm_next_set(w, stop, start)
        while 0 <= a < stop and done < budget:
            lim = a + (budget - done)
            if lim > stop:
                lim = stop
            b = bm_next_clear(w, lim, a)
            if b < 0:
                b = lim
            g = a
            while g < b:
                h = logical_holder(v, g)
                e = g + 1
                while e < b and logical_holder(v, e) is h:
                    e += 1
                if pass_ == 0:
                    if h.base == NULL:
                        raise VolumeClosedError(
                            f"{h!r}, which holds grains of {v!r}'s image, is closed")
                else:
                    copy_big(dst + (g << shift), h.base + (g << shift), (e - g) << shift)
                g = e
            if pass_ == 1 and clear:
                bm_clear_range(w, a, b)
            done += b - a
            a = bm_next_set(w, stop, b)
    resume[0] = a if 0 <= a < stop else stop
    return done


cdef int read_logical(uint8_t* dst, VolumeBase v, Py_ssize_t offset, Py_ssize_t n) except -1:
    """Read ``n`` bytes of ``v``'s logical image at ``offset`` (a target
    whose source is itself a target). Locks of ``v``'s chain held."""
    cdef Py_ssize_t pos = offset, end = offset + n, g, piece_end
    cdef int shift = v.grain_shift
    cdef VolumeBase h
    while pos < end:
        g = pos >> shift
        h = logical_holder(v, g)
        piece_end = (g + 1) << shift
        while piece_end < end and logical_holder(v, piece_end >> shift) is h:
            piece_end += (<Py_ssize_t>1) << shift
        if piece_end > end:
            piece_end = end
        if h.base == NULL:
            raise VolumeClosedError(f"{h!r}, which holds grains of {v!r}'s image, is closed")
        memcpy(dst + (pos - offset), h.base + pos, piece_end - pos)
        pos = piece_end
    return 0


cdef int cascade_cow(VolumeBase v, Py_ssize_t t0, Py_ssize_t t1) except -1:
    """A host write to grains ``[t0, t1)`` of a middle volume ``v`` (a
    target and a source): its targets that still need those grains take
    ``v``'s logical ones (some on the volumes above it) and their bits
    clear, before the write lands. Locks of ``v``'s chain held."""
    cdef RelationshipBase r
    cdef Py_ssize_t done, resume
    for o in v._src_rels:
        r = <RelationshipBase>o
        if bm_any_range(r.to_copy.w, t0, t1):
            done = copy_logical(r.target.base, v, r.to_copy.w, t0, t1, t1 - t0, True, &resume)
            r.target.copied_bytes += done << v.grain_shift
            if _cow_hook is not None:
                _cow_hook(v)
    return 0


cdef object cascade_refusal(VolumeBase v, TrackBitmap changing):
    """Why ``v``'s logical image cannot change now at the grains set in
    ``changing`` (None: all of them), as far as its own targets go: the
    exception, or None. A thin target gets the blocks the change will copy
    into it here (a full filesystem is the refusal). Locks held."""
    cdef RelationshipBase r
    if not v._src_rels or (changing is not None and not changing.any()):
        return None
    if v._inhibits or gated(v._src_rels):
        return WriteInhibitedError(
            f"{v!r} is the source of a revertible FlashCopy: its image cannot change "
            "until that one is committed or reverted")
    try:
        for o in v._src_rels:
            r = <RelationshipBase>o
            m = r.to_copy.copy() if changing is None else (changing & r.to_copy)
            if not m.any():
                continue
            if r.target.base == NULL:
                return VolumeClosedError(
                    f"{r.target!r}, a FlashCopy target of {v!r}, is closed: it still "
                    f"needs grains of {v!r}'s image that would change")
            r.target._reserve_runs((<TrackBitmap>m).w, 0, v.n_grains, v.n_grains)
    except BaseException as e:
        return e
    return None


cdef int cascade_save(VolumeBase v, TrackBitmap changing) except -1:
    """Before ``v``'s logical image changes at the grains set in
    ``changing`` (None: all of them): each target of ``v`` takes those it
    still reads through ``v`` (they clear from its ``to_copy``) and, with
    change recording, counts them as changed on its source. Checked first
    by :func:`cascade_refusal`. Locks of ``v``'s chain held."""
    cdef RelationshipBase r
    cdef TrackBitmap m
    cdef Py_ssize_t done, resume, n = v.n_grains
    for o in v._src_rels:
        r = <RelationshipBase>o
        m = r.to_copy.copy() if changing is None else (changing & r.to_copy)
        if m.any():
            done = copy_logical(r.target.base, v, m.w, 0, n, n, False, &resume)
            r.target.copied_bytes += done << v.grain_shift
            r.to_copy.andnot(m)
        if r.src_changed is not None:
            if changing is None:
                r.src_changed.fill(True)
            else:
                r.src_changed.or_(changing)
    return 0


# -- for the Python layer (flashcopy.py) -------------------------------------

def volume_chain(VolumeBase v):
    """``v`` and the volumes above it in its FlashCopy chain (its source,
    that source's source...), as they are now."""
    return chain_of(v)


def check_image_change(VolumeBase v, TrackBitmap changing=None):
    """Raise what :func:`cascade_refusal` finds, if anything. Locks held."""
    err = cascade_refusal(v, changing)
    if err is not None:
        raise err


def save_before_change(VolumeBase v, TrackBitmap changing=None):
    """:func:`cascade_save` (checked first with :func:`check_image_change`)."""
    cascade_save(v, changing)
